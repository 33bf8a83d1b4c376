"""promptsets: named prompt sets, fetched on first use from their public source, verified, cached.

`--prompts coco1k` (dipp.py, evaluate.py) means: the 1,000 first COCO-2014 captions of GigaGAN's list, downloaded
once from a URL pinned to a commit, checked against the sha256 of the raw file and the number of prompts it must
parse to, and kept as one prompt per line (UTF-8) in `cache_dir()`. The repository ships no prompt data. A file
path still works and wins over a name. Sources, licences and the failure messages: docs/prompts.md.

    python promptsets.py                 # the sets: name, use, count, source, licence, cached or not
    python promptsets.py fetch coco30k   # fetch (and verify) now, e.g. before going offline

Every failure (no network, HF_HUB_OFFLINE=1, an HTTP error, a wrong checksum, a truncated download, a wrong count)
is one line naming the set, what went wrong and the fix, and leaves nothing in the cache: files are written to a
temporary name in the cache folder and renamed into place only once verified. DIPP_PROMPTS_MIRROR=<folder or
file:// URL> reads each raw file from there by its basename instead of its URL (a local mirror, and the tests).

Machinery: imports plumbing (for its one-line errors) and nothing of the method.
"""
import csv
import difflib
import hashlib
import http.client
import io
import json
import os
import pickle
import re
import shlex
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple, Optional

TIMEOUT_S = 30  # per network operation (connect, each read), not the whole download


class PromptSet(NamedTuple):
    name: str
    use: str  # "eval" or "train"
    urls: tuple  # the raw files, each pinned to a commit (GitHub) or, where marked unpinned, a hub branch
    sha256: tuple  # sha256 of each raw file; None where it could not be computed when the record was written
    count: Optional[int]  # prompts after parsing (blank ones dropped); None: not known (unpinned hub data)
    extract: str  # lines | tsv:COLUMN | csv:COLUMN | json | json:FIELD | pickle | head (first `count` of `parent`)
    source: str  # who publishes it, where
    licence: str  # as the source states it
    about: str  # one line: what it is, which paper uses it for what
    parent: str = ""  # for extract="head": the set it is the beginning of

    @property
    def pinned(self):
        return bool(self.sha256) and all(self.sha256) and self.count is not None


_SID = "https://raw.githubusercontent.com/mingyuanzhou/SiD-LSG/3ea64877a535a27aec3866ad589195b6cc7a85b3/"
_PARTI = "https://raw.githubusercontent.com/google-research/parti/2c99f6652cbc7f0d0441aa91f4c7e7055bcb0071/"
_DRAWBENCH = ("https://raw.githubusercontent.com/kennymckormick/DrawBench-Glance/"
              "fd4117bc76a78a1519d1b061144efca9cd131270/")
_HPD = "https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark/"  # NOTE: a branch, not a revision
_HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
_COCO_LICENCE = "CC BY 4.0 (COCO annotations, cocodataset.org terms of use)"
_HPS_LICENCE = "Apache 2.0 (the HPSv2 repository; the hub dataset's own card was not readable offline)"
_HPS_SOURCE = "HPSv2 benchmark (Wu et al. 2023, arXiv 2306.09341), hub dataset zhwang/HPDv2 benchmark/"
_HPS_UNPINNED = "; hub-only: no pinned sha256 (checked: JSON list of strings, 800 a style)"

SETS = {s.name: s for s in [
    PromptSet("coco30k", "eval", (_SID + "prompts/captions.txt",),
              ("edabd2a556026cbf5d36a5fffa35ad43d7ba71b72f6d640b727c1edefb7f1945",), 30000, "lines",
              "GigaGAN's COCO-2014 caption list, as copied in SiD-LSG prompts/captions.txt (identical to DMD2's "
              "main/coco_eval/captions_coco14_test.txt)", _COCO_LICENCE,
              "30,000 COCO-2014 val captions: zero-shot FID/CLIP of GigaGAN, DMD2, SiD-LSG; DI++ scores COCO prompts"),
    PromptSet("coco1k", "eval", (), (), 1000, "head", "the first 1,000 of coco30k", _COCO_LICENCE,
              "quick evaluation set: the first 1,000 of coco30k (same images as a 30k run's first 1,000)",
              parent="coco30k"),
    PromptSet("parti", "eval", (_PARTI + "PartiPrompts.tsv",),
              ("fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb",), 1632, "tsv:Prompt",
              "PartiPrompts (Yu et al. 2022), google-research/parti PartiPrompts.tsv, column Prompt", "Apache 2.0",
              "1,632 prompts in 12 categories × 11 challenges; DI++ on SDXL reports Parti prompts"),
    PromptSet("drawbench", "eval", (_DRAWBENCH + "imagen.csv",),
              ("5e135bae590252ac2913fb6f4bd551699dd8211e856943385321c59b896d5efb",), 200, "csv:Prompt",
              "DrawBench (Imagen, Saharia et al. 2022; published as a Google Sheet), as exported in "
              "kennymckormick/DrawBench-Glance imagen.csv", "none stated (neither the Imagen sheet nor the copy)",
              "200 prompts in 11 categories (colours, counting, text, ...); HPSv2's second benchmark"),
    PromptSet("hps", "eval", tuple(_HPD + f"{s}.json" for s in _HPS_STYLES), (None,) * 4, 3200, "json",
              _HPS_SOURCE + " (the four styles, in this order: " + ", ".join(_HPS_STYLES) + ")", _HPS_LICENCE,
              "HPSv2 benchmark prompts, all four styles" + _HPS_UNPINNED),
    *[PromptSet("hps_" + s.replace("-", "_"), "eval", (_HPD + f"{s}.json",), (None,), 800, "json",
                _HPS_SOURCE + f"{s}.json", _HPS_LICENCE, f"HPSv2 benchmark prompts, style {s}" + _HPS_UNPINNED)
      for s in _HPS_STYLES],
    PromptSet("laion_aesthetics_625", "train",
              ("https://huggingface.co/tianweiy/DMD2/resolve/main/data/laion/captions_laion_score6.25.pkl",),
              (None,), None, "pickle",
              "DMD2's SD1.5 training prompts (Yin et al. 2024), hub tianweiy/DMD2 data/laion/ (a pickled list)",
              "captions: LAION-5B metadata, CC BY 4.0; DMD2 releases its work under CC BY-NC-SA 4.0",
              "LAION-Aesthetics 6.25+ captions, the kind DI++ trained SD1.5 on; hub-only: no pinned sha256 or count"),
    PromptSet("laion_aesthetics_625_20k", "train", (), (), 20000, "head", "the first 20,000 of laion_aesthetics_625",
              "as laion_aesthetics_625",
              "reproduce.py pixart's training prompts: T5-XXL embeds each prompt into ~0.94 MiB, so 20,000 (18.8 "
              "GiB on disk) rather than the whole list; 2,000 steps × batch 8 draw 16,000",
              parent="laion_aesthetics_625"),
    PromptSet("pixart_dmd_toy", "train",
              ("https://huggingface.co/datasets/PixArt-alpha/pixart-sigma-toy-dataset/resolve/main/InternData/"
               "data_info.json",), (None,), None, "json:prompt",
              "PixArt-α-DMD's published training recipe (PixArt-sigma asset/docs/pixart_dmd.md) reads the prompts "
              "of hub dataset PixArt-alpha/pixart-sigma-toy-dataset InternData/data_info.json",
              "Apache 2.0 (the PixArt-sigma repository; the dataset's card was not readable offline)",
              "prompts of PixArt's one-step (DMD) trainer, a toy set; hub-only: no pinned sha256 or count"),
]}


def cache_dir():
    """$DIPP_CACHE/prompts, else $XDG_CACHE_HOME/dipp/prompts, else ~/.cache/dipp/prompts."""
    if os.environ.get("DIPP_CACHE"):
        return os.path.join(os.environ["DIPP_CACHE"], "prompts")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dipp", "prompts")


def cached_path(name):
    return os.path.join(cache_dir(), name + ".txt")


def die(message):
    import plumbing  # lazily: listing the sets should not import torch
    plumbing.die(message)


def resolve(value, flag="--prompts"):
    """--prompts VALUE -> a prompt file: an existing file as is, else a named set's cached, verified file
    (fetched on first use), else one line naming the value, the closest name and where the list is."""
    if os.path.isfile(value):
        return value
    if value in SETS:
        return fetch(SETS[value])
    stem = os.path.splitext(os.path.basename(value))[0]  # `coco1k.txt` (the old README's file) -> 'coco1k'
    close = difflib.get_close_matches(stem, SETS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    if os.sep in value or "/" in value or stem != value:  # meant as a path: the old message, and the name
        die(f"{flag} file '{value}' does not exist; give a text file with one prompt per line, or a named set "
            f"({hint}python promptsets.py lists them)")
    die(f"{flag} '{value}' is neither a file nor a named prompt set; {hint}python promptsets.py lists the sets")


def missing(value):
    """None when --prompts VALUE can be read without a network (a file, or a named set already cached, or the set
    it is the head of); else what to run to get it. For the checklists (reproduce.py --plan)."""
    if os.path.isfile(value) or value not in SETS:  # (not a set: resolve() says what is wrong)
        return None
    spec = SETS[value]
    if os.path.isfile(cached_path(value)) or (spec.parent and os.path.isfile(cached_path(spec.parent))):
        return None
    return f"python promptsets.py fetch {value}"


def fetch(spec):
    """The set's prompt file in the cache, fetched and verified first if it is not there yet."""
    path = cached_path(spec.name)
    if os.path.isfile(path):
        n = sum(1 for line in open(path, encoding="utf-8", errors="replace") if line.strip())
        if spec.count is not None and n != spec.count:  # edited or damaged since it was verified
            die(f"prompt set '{spec.name}': the cached {path} has {n} prompts, not {spec.count}; delete it to "
                "fetch it again")
        return path
    if spec.extract == "head":  # the first `count` of its parent: a parent it cannot get is named with this set
        try:
            prompts = read_prompts(fetch(SETS[spec.parent]))[:spec.count]
        except SystemExit as e:
            die(f"prompt set '{spec.name}' (the first {spec.count:,} of '{spec.parent}'): "
                + str(e).split(": error: ", 1)[-1])
    else:
        prompts = []
        for i, url in enumerate(spec.urls):
            raw, digest = download(spec, url)
            expected = spec.sha256[i]
            if expected is not None and digest != expected:
                die(f"prompt set '{spec.name}': {basename(url)} has sha256 {digest}, not {expected} (the source "
                    "changed or the download was damaged); nothing was cached. Try again, or give a file path")
            prompts += parse(spec, raw, url)
            if expected is None:
                print(f"prompt set '{spec.name}': {basename(url)} has no pinned sha256 (hub-only when SETS was "
                      f"written); got sha256 {digest}, checked its format" + (" and count" if spec.count else "")
                      + " only", file=sys.stderr)
    if spec.count is not None and len(prompts) != spec.count:
        die(f"prompt set '{spec.name}' parsed to {len(prompts)} prompts, not {spec.count} (a truncated or "
            "different file); nothing was cached. Try again, or give a file path")
    if not prompts:
        die(f"prompt set '{spec.name}' parsed to no prompts; nothing was cached. Give a file path instead")
    try:
        write_atomically(path, "".join(p + "\n" for p in prompts).encode("utf-8"))
    except OSError as e:
        die(f"prompt set '{spec.name}': cannot write the cache {cache_dir()} ({e}); set DIPP_CACHE to a writable "
            "folder")
    return path


def basename(url):
    return os.path.basename(urllib.parse.urlparse(url).path)


def download(spec, url):
    """(bytes, sha256 hex) of one raw file: from DIPP_PROMPTS_MIRROR by basename if set, else from its URL."""
    where = how_to_get(spec, url)
    mirror = os.environ.get("DIPP_PROMPTS_MIRROR", "")
    if mirror:
        folder = urllib.parse.urlparse(mirror).path if mirror.startswith("file://") else mirror
        local = os.path.join(folder, basename(url))
        if not os.path.isfile(local):
            die(f"prompt set '{spec.name}': {basename(url)} is not in DIPP_PROMPTS_MIRROR={mirror}; {where}")
        with open(local, "rb") as f:
            raw = f.read()
        return raw, hashlib.sha256(raw).hexdigest()
    if not url.startswith("file://") and os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        die(f"prompt set '{spec.name}': offline (HF_HUB_OFFLINE=1), not trying {url}; {where}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            raw = response.read()  # these files are small (≤ a few MB); http.client checks Content-Length
    except urllib.error.HTTPError as e:
        die(f"prompt set '{spec.name}': {url} answered HTTP {e.code} {e.reason}; {where}")
    except http.client.IncompleteRead as e:
        die(f"prompt set '{spec.name}': the download of {url} was truncated ({len(e.partial)} bytes, "
            f"{e.expected} missing); nothing was cached. Try again; {where}")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # no network, DNS, refused, timeout
        reason = getattr(e, "reason", e)
        die(f"prompt set '{spec.name}': cannot download {url} ({reason}); {where}")
    return raw, hashlib.sha256(raw).hexdigest()


def how_to_get(spec, url):
    return (f"download it on a machine with network (python promptsets.py fetch {spec.name}) and copy "
            f"{cached_path(spec.name)}, or put {basename(url)} in a folder and set DIPP_PROMPTS_MIRROR to it, "
            "or give a file path")


class _DataOnly(pickle.Unpickler):
    """Unpickles lists, strings and None only: a pickle that names any class or function (i.e. could run code)
    is refused."""
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def parse(spec, raw, url):
    """Raw file -> its prompts, one line each (inner line breaks become spaces, blanks dropped)."""
    kind, _, column = spec.extract.partition(":")
    try:
        if kind == "lines":
            items = raw.decode("utf-8").splitlines()
        elif kind in ("tsv", "csv"):
            text = raw.decode("utf-8-sig")
            if kind == "tsv":  # PartiPrompts quotes nothing: a '"' is part of the prompt, so no csv quoting
                rows = [line.split("\t") for line in text.splitlines() if line]
                header, rows = rows[0], rows[1:]
                items = [row[header.index(column)] for row in rows]
            else:
                items = [row[column] for row in csv.DictReader(io.StringIO(text, newline=""))]
        elif kind == "json":
            data = json.loads(raw.decode("utf-8"))
            items = [item[column] for item in data] if column else data
        elif kind == "pickle":
            items = _DataOnly(io.BytesIO(raw)).load()
        else:
            raise ValueError(f"unknown extract '{spec.extract}'")
        if not isinstance(items, list) or not all(p is None or isinstance(p, str) for p in items):
            raise ValueError("not a list of strings")
    except (ValueError, KeyError, IndexError, TypeError, pickle.UnpicklingError, EOFError) as e:
        die(f"prompt set '{spec.name}': {basename(url)} is not in the expected format ({spec.extract}: {e}); "
            "nothing was cached. Give a file path instead")
    return [p for p in (re.sub(r"[\r\n]+", " ", p or "").strip() for p in items) if p]


def read_prompts(path):
    return [line.strip() for line in open(path, encoding="utf-8") if line.strip()]


def write_atomically(path, data):
    """Write to a temporary file next to `path`, then rename: a reader sees the whole file or none, and a
    failure (or two processes fetching at once, e.g. under torchrun) never leaves a partial file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); a cache is as readable as any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def table():
    """The sets as a text table: name, use, count, cached or not, licence, source."""
    rows = [(s.name, s.use, "?" if s.count is None else str(s.count) + ("" if s.pinned or s.parent else "*"),
             "yes" if os.path.isfile(cached_path(s.name)) else "no", s.licence, s.source) for s in SETS.values()]
    head = ("name", "use", "count", "cached", "licence", "source")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] + " | " + r[5] for r in [head] + rows]
    return "\n".join(lines) + f"\n* / ?: no pinned sha256 (hub-only; docs/prompts.md). Cache: {cache_dir()}\n"


# dipp.py's defaults: --prompts and --validation_prompts without a value (disjoint lists)
BUILTIN_PROMPTS = ["a photo of a red bicycle leaning on a brick wall", "a watercolor painting of a fox",
                   "a bowl of ramen, studio lighting", "a lighthouse on a cliff at sunset",
                   "an astronaut riding a horse", "a cozy living room with a fireplace",
                   "a close-up portrait of an old fisherman", "a castle in the clouds, fantasy art"]
VALIDATION_PROMPTS = ["a golden retriever running on a beach", "a still life of apples and a jug, oil painting",
                      "a snowy mountain village at night", "a robot reading a book in a library",
                      "a hot air balloon over green hills", "a plate of sushi on a wooden table",
                      "a portrait of a woman in a red coat, rain", "a sailing ship in a storm, dramatic light"]


def load_prompts(path, default, flag):
    """One prompt per line of a UTF-8 text file (blank lines skipped), a named set (promptsets.py: fetched and
    verified on first use, then cached), or the built-in list `default`."""
    if not path:
        return list(default)
    path = resolve(path, flag)
    try:
        prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    except UnicodeDecodeError:
        die(f"{flag} file '{path}' is not UTF-8 text; give a text file with one prompt per line")
    if not prompts or any("\x00" in p for p in prompts):
        die(f"{flag} file '{path}' has no prompts (or is binary); write one prompt per line")
    return prompts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(table(), end="")
        return
    if argv[0] != "fetch" or len(argv) < 2:
        sys.exit(f"promptsets: error: unexpected {shlex.join(argv)}; run `python promptsets.py` (the sets) or "
                 "`python promptsets.py fetch NAME...`")
    import plumbing
    with plumbing.as_program("promptsets"):
        for name in argv[1:]:
            print(f"{name}: {resolve(name, 'fetch')}")


if __name__ == "__main__":
    main()
