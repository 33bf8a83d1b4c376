"""Tests of promptsets.py: named prompt sets fetched, verified and cached, against local sources only
(a mirror folder, file:// URLs, a local HTTP server on 127.0.0.1); nothing here touches the network."""
import hashlib
import http.server
import json
import os
import pickle
import re
import threading
from collections import OrderedDict

import pytest

import plumbing
import promptsets
from promptsets import PromptSet


def one_line_error(fn, program="dipp"):
    with pytest.raises(SystemExit) as e:
        fn()
    message = str(e.value)
    assert message.startswith(f"{program}: error: ") and "\n" not in message, message
    return message


# Raw files of each kind a real set uses, and the prompts each must parse to, written out by hand.
RAW = {
    "lines.txt": (b"a red fox\n  two cats  \n\nthree dogs\n", ["a red fox", "two cats", "three dogs"]),
    # PartiPrompts quotes nothing: the '"' belongs to the prompt, and the column is found by its header
    "table.tsv": ('Prompt\tCategory\n"G I G G L E" on a wall\tText\nbond\tAbstract\n'.encode(),
                  ['"G I G G L E" on a wall', "bond"]),
    # DrawBench's export: a UTF-8 BOM, and a quoted field holding a comma
    "table.csv": ('\ufeffPrompt,Category\nA red colored car.,Colors\n"A stack, of plates.",DALL-E\n'.encode(),
                  ["A red colored car.", "A stack, of plates."]),
    "list.json": (json.dumps(["Walter White as a king.", "line\nbreak", ""]).encode(),
                  ["Walter White as a king.", "line break"]),
    "records.json": (json.dumps([{"prompt": "a cactus", "ratio": 1.0}, {"prompt": "a castle", "ratio": 2}]).encode(),
                     ["a cactus", "a castle"]),
    "captions.pkl": (pickle.dumps(["a sunset", None, "a lake"]), ["a sunset", "a lake"]),
}
KIND = {"lines.txt": "lines", "table.tsv": "tsv:Prompt", "table.csv": "csv:Prompt", "list.json": "json",
        "records.json": "json:prompt", "captions.pkl": "pickle"}
URL = "https://raw.githubusercontent.com/someone/somewhere/" + "0" * 40 + "/"


def stand_in(name, files, sha256=None, count=None, **kw):
    """A set over RAW files; sha256 and count default to those of the files as written above."""
    sha256 = sha256 or tuple(hashlib.sha256(RAW[f][0]).hexdigest() for f in files)
    count = sum(len(RAW[f][1]) for f in files) if count is None else count
    fields = dict(use="eval", urls=tuple(URL + f for f in files), sha256=sha256, count=count,
                  extract=KIND[files[0]], source="a test", licence="none", about="a stand-in")
    return PromptSet(name, **{**fields, **kw})


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty cache, a mirror folder holding RAW, and SETS replaced by stand-ins over it."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for f, (raw, _) in RAW.items():
        (mirror / f).write_bytes(raw)
    monkeypatch.setenv("DIPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIPP_PROMPTS_MIRROR", "file://" + str(mirror))
    sets = {f.split(".")[0] + "_" + f.split(".")[1]: stand_in(f.split(".")[0] + "_" + f.split(".")[1], [f])
            for f in RAW}
    sets["two_files"] = stand_in("two_files", ["list.json", "list.json"])
    sets["first_two"] = PromptSet("first_two", "eval", (), (), 2, "head", "a test", "none", "head", parent="lines_txt")
    monkeypatch.setattr(promptsets, "SETS", sets)
    return tmp_path


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "prompts"
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_sets_fetch_verify_and_cache_from_a_mirror_then_work_without_it(sandbox, monkeypatch, capsys):
    """Every extraction kind parses to the hand-written prompts; the cached file is one prompt per line; a
    second resolve reads the cache with the source gone; a path still wins; DIPP_CACHE/XDG pick the folder."""
    expected = {name: [p for f in (RAW[u.rsplit("/", 1)[1]] for u in spec.urls) for p in f[1]]
                for name, spec in promptsets.SETS.items() if spec.urls}
    expected["first_two"] = RAW["lines.txt"][1][:2]
    for name, prompts in expected.items():
        path = promptsets.resolve(name)
        assert path == str(sandbox / "cache" / "prompts" / f"{name}.txt")
        assert open(path, encoding="utf-8").read() == "".join(p + "\n" for p in prompts), name
    assert cache_files(sandbox) == sorted(f"{n}.txt" for n in expected)  # no temporary file left behind
    # a hub-only set without a pinned sha256: fetched, its format and count checked, its sha256 printed to pin it
    promptsets.SETS["unpinned"] = stand_in("unpinned", ["lines.txt"], sha256=(None,))
    assert promptsets.read_prompts(promptsets.resolve("unpinned")) == RAW["lines.txt"][1]
    assert f"got sha256 {hashlib.sha256(RAW['lines.txt'][0]).hexdigest()}, checked its format and count only" \
        in capsys.readouterr().err
    # the source gone: the cache answers, and through promptsets.load_prompts as dipp.py and evaluate.py call it
    monkeypatch.setenv("DIPP_PROMPTS_MIRROR", str(sandbox / "gone"))
    assert promptsets.load_prompts("table_tsv", ["builtin"], "--prompts") == RAW["table.tsv"][1]
    # an existing file wins over a name, even when the file is called like a set
    (sandbox / "table_tsv").write_text("mine\n")
    monkeypatch.chdir(sandbox)
    assert promptsets.resolve("table_tsv") == "table_tsv"
    monkeypatch.delenv("DIPP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert promptsets.cache_dir() == "/x/dipp/prompts"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/h")
    assert promptsets.cache_dir() == "/h/.cache/dipp/prompts"


class Server(http.server.BaseHTTPRequestHandler):
    """/missing: HTTP 404; /short: promises 100 bytes, sends 10 and closes (a truncated download)."""
    def do_GET(self):
        if self.path.endswith("/short"):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


def test_every_failure_is_one_line_and_caches_nothing(sandbox, monkeypatch):
    """Wrong checksum, too few prompts, a pickle that names a class, an unwritable cache, HF_HUB_OFFLINE=1, an
    unreachable host, an HTTP error and a truncated download: one line each naming the problem (a set that is the
    head of another names itself first: coco1k, not only coco30k); an empty cache."""
    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("no_proxy", "*")  # 127.0.0.1 directly, whatever proxy the environment names
    local = f"http://127.0.0.1:{server.server_port}/"
    evil = pickle.dumps(OrderedDict(a="b"))  # names collections.OrderedDict: unpickling it could run code
    (sandbox / "mirror" / "evil.pkl").write_bytes(evil)
    wrong = stand_in("wrong_sum", ["lines.txt"], sha256=("0" * 64,))
    cases = {
        wrong: "has sha256 " + hashlib.sha256(RAW["lines.txt"][0]).hexdigest() + ", not " + "0" * 64,
        stand_in("too_few", ["lines.txt"], count=4): "parsed to 3 prompts, not 4",
        stand_in("half_of_two", ["list.json", "lines.txt"], extract="json"): "lines.txt is not in the expected",
        stand_in("evil", ["captions.pkl"], sha256=(hashlib.sha256(evil).hexdigest(),),
                 urls=(URL + "evil.pkl",)): "refused to load collections.OrderedDict",
    }
    for spec, expected in cases.items():
        message = one_line_error(lambda: promptsets.fetch(spec))
        assert f"prompt set '{spec.name}'" in message and expected in message, message
        assert "nothing was cached" in message
    assert cache_files(sandbox) == []
    (sandbox / "a_file").write_text("x")
    monkeypatch.setenv("DIPP_CACHE", str(sandbox / "a_file"))  # a cache folder that cannot be made
    assert "cannot write the cache" in one_line_error(lambda: promptsets.resolve("lines_txt"))
    monkeypatch.setenv("DIPP_CACHE", str(sandbox / "cache"))
    monkeypatch.delenv("DIPP_PROMPTS_MIRROR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error(lambda: promptsets.fetch(wrong))
    assert "offline (HF_HUB_OFFLINE=1), not trying" in message and "DIPP_PROMPTS_MIRROR" in message, message
    message = one_line_error(lambda: promptsets.resolve("first_two"))  # a head set names itself, then its parent
    assert message.startswith("dipp: error: prompt set 'first_two' (the first 2 of 'lines_txt'): prompt set "
                              "'lines_txt': offline"), message
    assert promptsets.missing("first_two") == "python promptsets.py fetch first_two" and not promptsets.missing(
        str(sandbox / "a_file"))  # (the checklist's answer: a file is there)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    network = {
        "http://127.0.0.1:1/lines.txt": "cannot download http://127.0.0.1:1/lines.txt (",  # nothing listens
        local + "missing": "answered HTTP 404",
        local + "short": "was truncated (10 bytes, 90 missing)",
    }
    try:
        for url, expected in network.items():
            spec = stand_in("net", ["lines.txt"], urls=(url,))
            message = one_line_error(lambda: promptsets.fetch(spec))
            assert "prompt set 'net'" in message and expected in message, message
            assert "python promptsets.py fetch net" in message  # the fix: fetch elsewhere, mirror, or a path
    finally:
        server.shutdown()
        server.server_close()
    assert cache_files(sandbox) == []
    # a cached file changed since it was verified is named, not used
    monkeypatch.setenv("DIPP_PROMPTS_MIRROR", str(sandbox / "mirror"))
    path = promptsets.resolve("lines_txt")
    open(path, "a").write("one more\n")
    assert "has 4 prompts, not 3; delete it" in one_line_error(lambda: promptsets.resolve("lines_txt"))


def test_unknown_names_and_missing_paths_say_what_to_do(sandbox, tmp_path):
    """An unknown name: the closest name and where the list is, through dipp.py and evaluate.py too; a missing
    path keeps the old message."""
    message = one_line_error(lambda: promptsets.resolve("lines_tx"))
    assert "'lines_tx' is neither a file nor a named prompt set; did you mean 'lines_txt'?" in message
    assert "python promptsets.py lists the sets" in message
    assert "does not exist" in one_line_error(lambda: promptsets.resolve(str(tmp_path / "none.txt")))
    message = one_line_error(lambda: promptsets.resolve("table_csv.txt"))  # a set's name written as a file
    assert "file 'table_csv.txt' does not exist" in message and "did you mean 'table_csv'?" in message, message
    # dipp.py's --prompts/--validation_prompts and evaluate.py's --prompts all go through promptsets.load_prompts
    # (test_dipp/test_evaluate's bad-input tests show it); here the whole way through evaluate.py's main
    import evaluate
    out = str(tmp_path / "run")
    message = one_line_error(lambda: promptsets.load_prompts("first_tw", [], "--validation_prompts"))
    assert "--validation_prompts 'first_tw'" in message and "did you mean 'first_two'?" in message, message
    message = one_line_error(lambda: evaluate.main(["--tiny", "--prompts", "table_cs", "--output_dir", out]),
                             "evaluate")
    assert "--prompts 'table_cs'" in message and "did you mean 'table_csv'?" in message, message


def test_the_real_sets_are_well_formed():
    """Unique names; pinned sets: URLs pinned to a commit, 64-hex sha256 per file, a count; unpinned ones are
    exactly the hub-only sets docs/prompts.md lists; COCO's sha256 is the one issue 20 gives."""
    sets = promptsets.SETS
    assert all(name == spec.name for name, spec in sets.items()) and len(sets) == len({s.name for s in sets.values()})
    for spec in sets.values():
        assert spec.use in ("eval", "train") and spec.licence and spec.source and spec.about, spec.name
        assert spec.extract.split(":")[0] in ("lines", "tsv", "csv", "json", "pickle", "head"), spec.name
        if spec.extract == "head":
            parent = sets[spec.parent]
            assert not spec.urls and 0 < spec.count, spec.name  # the head of a set: its first `count` prompts
            assert spec.count < parent.count if parent.pinned else parent.count is None, spec.name
            continue
        assert len(spec.urls) == len(spec.sha256) > 0, spec.name
        if spec.pinned:
            assert spec.count > 0
            for url, digest in zip(spec.urls, spec.sha256):
                assert re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/.+", url), url
                assert re.fullmatch(r"[0-9a-f]{64}", digest), spec.name
    unpinned = {n for n, s in sets.items() if not s.pinned and s.extract != "head"}
    assert unpinned == {"hps", "hps_anime", "hps_concept_art", "hps_paintings", "hps_photo",
                        "laion_aesthetics_625", "pixart_dmd_toy"}
    assert sets["coco30k"].sha256 == ("edabd2a556026cbf5d36a5fffa35ad43d7ba71b72f6d640b727c1edefb7f1945",)
    assert {s.use for s in sets.values()} == {"eval", "train"}
    basenames = [promptsets.basename(u) for s in sets.values() for u in s.urls]
    assert len(basenames) == len(set(basenames)) + 4  # only hps repeats its four styles' files
