"""Tests for reproduce.py: the chain download → calibrate → train → evaluate → table on tiny random weights (CPU,
offline), that a re-run resumes every stage, and the plan of the real recipes. Run: pytest -q test_reproduce.py
"""
import functools
import json
import os
import re
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the model hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIPP_CACHE", tempfile.mkdtemp(prefix="dipp-test-cache-"))  # (the FLOP counts' cache: not ~)

import plumbing
import reproduce


def in_process(command, cwd=None, pass_fds=()):
    """plumbing.run_child for a stage's `python dipp.py|evaluate.py ARGS`: that script's main(ARGS) run in this
    process, with the exit status the interpreter would give (a one-line error: 1) and no signal. The commands,
    commands.sh and the exit-status handling are reproduce.run's own (passing signals on to a child process is
    run_child's, tested with real processes); what is saved is a fresh interpreter per stage, each importing
    torch, diffusers and transformers (~8 CPU-seconds, 4 stages in the two runs)."""
    import importlib
    import sys
    assert command[0] == sys.executable and command[1].endswith((os.sep + "dipp.py", os.sep + "evaluate.py")), command
    script = importlib.import_module(os.path.basename(command[1])[:-3])
    try:
        script.main(command[2:])
    except SystemExit as e:
        if e.code not in (None, 0):
            print(e.code, file=sys.stderr)
            return (e.code if isinstance(e.code, int) else 1), None
    return 0, None


@functools.lru_cache(maxsize=None)
def tiny_chain():
    """`python reproduce.py sd15 --tiny` (DMD2's layout: the released generator is a bare UNet state dict), run
    once, then once more as a user re-running the same command would; its stages in this process (in_process)."""
    import pytest
    import plumbing
    out = os.path.join(tempfile.mkdtemp(prefix="dipp-test-reproduce-"), "sd15")
    argv = ["sd15", "--tiny", "--output_dir", out]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plumbing, "run_child", in_process)
        reproduce.main(argv)
        first = {p: os.path.getmtime(p) for p in files(out)}
        table = open(os.path.join(out, "table.md")).read()
        reproduce.main(argv)
    return out, first, table


def files(out):
    """The evaluation's images and scores, and the trained generator's weights."""
    return [os.path.join(d, f) for sub in ("eval/images", "train/generator") for d, _, fs in
            os.walk(os.path.join(out, sub)) for f in fs if f.endswith((".png", ".pt", ".safetensors"))]


def test_tiny_chain_writes_the_table_with_every_row_and_column():
    """table.md has the three measured rows (teacher, the released generator, the result) with a number and an
    interval in every column, the recipe's published rows, the calibrated α_rew, and every column's convention."""
    out, _, table = tiny_chain()
    recipe = reproduce.RECIPES["sd15"]
    summary = json.load(open(os.path.join(out, "eval", "summary.json")))
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header, measured, published = rows[0], rows[1:4], rows[4:]
    for metric in reproduce.METRIC_ORDER:
        assert summary["headers"][metric] in header
    assert [r.split(" | ")[0] for r in measured] == ["| teacher, measured (2 steps)",
                                                     "| released one-step generator (the init), measured",
                                                     "| DI++ (this run), measured"]
    for row in measured:  # five cells, each a number ± its interval
        assert len(re.findall(r"-?\d[\d.e-]* ± \d", row)) == len(reproduce.METRIC_ORDER), row
    assert [r.split(" | ")[0] for r in published] == [f"| {p.row}, published" for p in recipe.published]
    calibration = json.load(open(os.path.join(out, "calibration.json")))
    ratios = [json.loads(line).get("grad_ratio") for line in open(os.path.join(out, "calibrate", "log.jsonl"))]
    assert calibration["median_grad_ratio_at_1"] == statistics.median(r for r in ratios if r is not None)
    # α_rew = target / median ratio at α_rew = 1 (the ratio is linear in α_rew), to two significant digits
    assert calibration["reward_scale"] == float(f"{reproduce.TARGET_RATIO / calibration['median_grad_ratio_at_1']:.2g}")
    train = [c for c in open(os.path.join(out, "commands.sh")).read().splitlines() if c.endswith("/train")][0]
    assert f"--reward_scale {calibration['reward_scale']:g}" in train or \
        f"--reward_scale {calibration['reward_scale']}" in train
    assert f"α_rew = {calibration['reward_scale']:g} (calibrated" in table
    assert "95 % Student-t" in table and "HPS v2.0 (100·cos)" in table
    assert f"Command: `python reproduce.py sd15 --tiny --output_dir {out}`" in table
    # the three rows are the teacher, the bare weight file and dipp's export, each sampled by evaluate.py
    sources = {m["kind"]: m["source"] for m in summary["models"].values() if m["kind"] == "teacher"}
    generators = [m["source"] for m in summary["models"].values() if m["kind"] == "generator"]
    assert sources and generators[0].endswith("pytorch_model.bin") and generators[1] == os.path.join(
        out, "train", "generator")


def test_rerunning_the_command_resumes_every_stage():
    """The second run trains nothing (the run finished), draws no image and computes no score again (evaluate.py
    keeps what it wrote for the same model, settings and scorer), and writes the same table."""
    out, first, table = tiny_chain()
    assert first and {p: os.path.getmtime(p) for p in files(out)} == first
    commands = open(os.path.join(out, "commands.sh")).read().splitlines()
    assert sum("dipp.py" in c and "calibrate" in c for c in commands) == 1  # calibration.json was read back
    assert sum("dipp.py" in c and "/train " in c + " " for c in commands) == 1  # the finished run was kept
    strip = lambda t: re.sub(r"Command: .*", "", t)
    assert strip(open(os.path.join(out, "table.md")).read()) == strip(table)


def test_an_unfinished_training_run_resumes_from_its_latest_checkpoint(tmp_path):
    """A run with checkpoints but no export (killed) resumes from the latest; a folder without checkpoints (killed
    before the first) starts afresh, as dipp.py would refuse a fresh run into a used folder."""
    folder = tmp_path / "train"
    assert reproduce.resume_flags(str(folder)) == []
    folder.mkdir()
    (folder / "log.jsonl").write_text("{}\n")
    assert reproduce.resume_flags(str(folder)) == ["--overwrite_output_dir"]
    (folder / "checkpoint-250").mkdir()
    assert reproduce.resume_flags(str(folder)) == ["--resume_from_checkpoint", "latest"]
    assert not reproduce.finished(str(folder), 250)  # no generator/ yet
    (folder / "generator").mkdir()
    (folder / "generator" / "config.json").write_text("{}")
    assert reproduce.finished(str(folder), 250) and not reproduce.finished(str(folder), 500)


def test_plans_of_the_published_recipes(capsys, monkeypatch):
    """--plan runs nothing and prints, for each real recipe: the downloads (teacher, released generator, reward,
    every scorer), the dipp.py flags the recipe documents, and each stage's cost = FLOPs ÷ (peak × utilisation).
    cost.py's counts are tested in test_cost.py; here they are stand-ins (a real SDXL count takes minutes), so the
    arithmetic on them is checked against a hand computation. The downloads are a checklist: with a hub cache that
    holds only ImageReward's two files and no prompt set cached, every other download and both prompt sets are
    marked missing, each with the command that fetches it."""
    import cost
    import huggingface_hub.constants
    import promptsets
    monkeypatch.setenv("DIPP_CACHE", tempfile.mkdtemp(prefix="dipp-test-cache-"))  # (the counts' cache: not ~)
    hub = tempfile.mkdtemp(prefix="dipp-test-hub-")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub)
    os.makedirs(os.path.join(hub, "models--THUDM--ImageReward", "snapshots", "0123"))
    for f in ("ImageReward.pt", "med_config.json"):
        open(os.path.join(hub, "models--THUDM--ImageReward", "snapshots", "0123", f), "w").close()
    calls = []
    monkeypatch.setattr(cost, "iteration_flops", lambda shapes, batch, **sw: calls.append((shapes, batch, sw)) or 1e13)
    monkeypatch.setattr(cost, "sample_flops", lambda shapes, steps, guidance: 1e12 * steps * (2 if guidance > 1 else 1))
    GiB, memory_calls = 2 ** 30, []
    monkeypatch.setattr(cost, "iteration_memory", lambda shapes, batch, ranks, **sw: memory_calls.append(
        (ranks, sw)) or dict(weights=GiB, trainable=2 * GiB, gradients=2 * GiB, optimizer=4 * GiB, ema=0,
                             activations=batch * GiB, total=(9 + batch) * GiB))
    for name, recipe in reproduce.RECIPES.items():
        out = tempfile.mkdtemp(prefix="dipp-test-plan-")
        plan = reproduce.main([name, "--plan", "--output_dir", out, "--card", "H100 SXM", "--nproc", "2"])
        printed = capsys.readouterr().out
        assert "[x] THUDM/ImageReward " in printed and f"[ ] {recipe.teacher} " in printed
        assert f"missing: {len(plan.downloads) - 1 + 2};" in printed and "download THUDM/ImageReward" not in printed
        assert f"DiffusionPipeline.download('{recipe.teacher}')" in printed  # (what download() fetches)
        assert "huggingface-cli download bert-base-uncased vocab.txt tokenizer_config.json config.json\n" in printed
        for prompts in (recipe.train_prompts, recipe.eval_prompts):
            assert f"[ ] prompt set {prompts} " in printed and f"python promptsets.py fetch {prompts}\n" in printed
        repos = [d[0] for d in plan.downloads]
        assert repos[:3] == [recipe.teacher, recipe.init[0], "THUDM/ImageReward"]
        assert {"openai/clip-vit-large-patch14", "xswu/HPSv2", "yuvalkirstain/PickScore_v1"} <= set(repos)
        for f in recipe.train:
            assert f in plan.train
        assert ("--shard" in plan.train) == recipe.shard  # FSDP2 only where the nets outgrow one GPU
        assert reproduce.flag(plan.train, "--prompts") == recipe.train_prompts
        assert reproduce.flag(plan.evaluate, "--prompts") == recipe.eval_prompts
        shapes, batch, switches = calls[-1]
        assert shapes == recipe.shapes and batch == int(reproduce.flag(recipe.train, "--train_batch_size"))
        assert switches["fake_steps_per_G"] == int(reproduce.flag(recipe.train, "--fake_steps_per_G"))
        peak, util = plumbing.peak_tflops("H100 SXM"), cost.UTILISATION
        train_h = 1e13 * 2000 * 2 / (peak * 1e12 * util) / 3600 / 2  # 2 GPUs, each its own batch
        assert f"train      {1e13 * 2000 * 2 / 1e15:10.4g} PFLOP  ≈ {train_h:.3g} h on 2 × H100 SXM" in printed
        steps, n = recipe.teacher_steps, promptsets.SETS[recipe.eval_prompts].count
        eval_flops = n * (1e12 * steps * 2 + 2 * 1e12)  # teacher under CFG + two one-step generators, 1 image each
        assert f"evaluate   {eval_flops / 1e15:10.4g} PFLOP  ≈ " in printed
        ranks, sw = memory_calls[-1]  # the memory beside the hours: the training run's, on each GPU
        assert ranks == 1 and sw["mixed_precision"] == "bf16" and sw["gradient_checkpointing"]
        total = batch + (5 if recipe.shard else 9)  # FSDP2 over 2: half the trainable weights, gradients, Adam
        assert f"memory     {total:.1f} GiB per GPU at batch {batch}{' (FSDP2 over 2)' if recipe.shard else ''}" \
            in printed
        assert f"activations {batch:.1f}; fits a card of {24 if total * 1.1 + 1 <= 23.5 else 40} GB" in printed
        assert os.listdir(out) == []  # nothing was run or written


def test_a_kill_stops_the_stage_running_and_its_child(tmp_path):
    """SIGTERM (a scheduler's, `timeout`'s) to a real `python reproduce.py sd15 --tiny` once its first stage (the
    calibration's dipp.py) runs as its child: the child is stopped too (its pid is gone, not left training),
    reproduce exits 143 with one line saying how to continue, and OUT's lock is free for that re-run (which
    resume_flags and test_rerunning_the_command_resumes_every_stage cover)."""
    import signal
    import subprocess
    import sys
    import time
    import plumbing
    out = str(tmp_path / "sd15")
    commands = os.path.join(out, "commands.sh")
    parent = subprocess.Popen([sys.executable, reproduce.__file__, "sd15", "--tiny", "--output_dir", out],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(reproduce.__file__))
    children, deadline = [], time.time() + 180
    while not children and parent.poll() is None and time.time() < deadline:  # the first stage has started
        time.sleep(0.1)
        if os.path.isfile(commands):
            children = open(f"/proc/{parent.pid}/task/{parent.pid}/children").read().split()
    assert children, parent.communicate()
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=60)
    assert parent.returncode == 143 and "stopped by signal 15" in err and "Run the same reproduce.py command" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("reproduce: stopped by signal 15"), err
    assert not os.path.exists(f"/proc/{children[0]}"), "the stage's process outlived reproduce.py"
    with plumbing.folder_lock(out):  # (free: this would stop the test otherwise)
        pass


def test_a_second_run_into_the_folder_is_refused_and_a_stage_dies_with_reproduce(tmp_path):
    """While a run holds OUT (its lock), another reproduce.py into it stops in one line before doing anything. A
    stage's process is stopped (SIGTERM) even when reproduce.py dies of SIGKILL, which no handler sees
    (PR_SET_PDEATHSIG), and until it has stopped it still holds OUT's lock (inherited)."""
    import signal
    import subprocess
    import sys
    import time
    import plumbing
    import pytest
    out = str(tmp_path / "out")
    with plumbing.folder_lock(out):
        with pytest.raises(SystemExit) as e:
            reproduce.main(["sd15", "--tiny", "--output_dir", out])
    assert str(e.value).startswith("reproduce: error: --output_dir") and "in use by another run" in str(e.value)
    assert os.listdir(out) == []
    script = ("import os, sys, plumbing\n"
              "with plumbing.folder_lock(sys.argv[1]) as fd:\n"
              "    plumbing.run_child([sys.executable, '-c', 'import time; print(1, flush=True); time.sleep(60)'],"
              " pass_fds=[fd])\n")
    parent = subprocess.Popen([sys.executable, "-c", script, out], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(reproduce.__file__))
    assert parent.stdout.readline() == "1\n"  # the child runs
    child = int(open(f"/proc/{parent.pid}/task/{parent.pid}/children").read().split()[0])
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z" \
            and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() < deadline, "the child outlived its parent's SIGKILL"
    with plumbing.folder_lock(out):  # released with the child
        pass


def test_damaged_records_are_recomputed_with_one_line(tmp_path, monkeypatch, capsys):
    """calibration.json truncated or of garbage bytes: the calibration runs again (here a stand-in run writing a
    known log) and α_rew = TARGET_RATIO / median grad_ratio, said in one line. A damaged cached FLOP count is
    counted again."""
    import argparse
    out = str(tmp_path)
    ratios = [0.01, 0.03, 0.02]

    def calibration_run(command, out):
        folder = command[command.index("--output_dir") + 1]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "log.jsonl"), "w") as f:
            f.write("".join(json.dumps({"step": i, "grad_ratio": r}) + "\n" for i, r in enumerate(ratios)))
    monkeypatch.setattr(reproduce, "run", calibration_run)
    args = argparse.Namespace(reward_scale=None, tiny=True, nproc=1)
    plan = reproduce.Plan([], {}, ["--max_train_steps", "2", "--generator_init", "INIT"], [], 2, True)
    path = os.path.join(out, "calibration.json")
    for damage in (b'{"reward_scale": 1', b"\x80\x81\xfe garbage", b'{"reward_scale": -3}'):
        open(path, "wb").write(damage)
        assert reproduce.calibrate(args, plan, out, "INIT") == float(f"{reproduce.TARGET_RATIO / 0.02:.2g}")
        assert f"{path} is damaged" in capsys.readouterr().out
        assert json.load(open(path))["median_grad_ratio_at_1"] == 0.02
    monkeypatch.setenv("DIPP_CACHE", str(tmp_path / "cache"))
    assert reproduce.counted(lambda: 5.0, "a key") == 5.0
    [cached] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    open(cached, "w").write('{"flops": ')
    assert reproduce.counted(lambda: 7.0, "a key") == 7.0 and "is damaged; counting again" in capsys.readouterr().out
    assert reproduce.counted(lambda: 9.0, "a key") == 7.0  # written back whole


def test_bad_flags_and_an_unwritable_folder_are_one_line(tmp_path):
    """Each mistake is one line naming its flag, before anything is built or written: a utilisation of 0 (which
    the cost estimate used to replace silently by its default) or above 1, no GPUs, a negative prompt count, a
    negative α_rew, a misspelt flag, an output folder that cannot be made (its parent is a file). An explicit
    --max_prompts 0 means all prompts under --tiny too, not --tiny's 3."""
    import argparse
    import pytest
    (tmp_path / "a_file").write_text("")
    cases = [(["--utilisation", "0"], "--utilisation 0.0: must be a fraction of the peak"),
             (["--utilisation", "1.5"], "--utilisation 1.5: must be a fraction"),
             (["--nproc", "0"], "--nproc 0: must be >= 1"),
             (["--max_prompts", "-1"], "--max_prompts -1: must be >= 0"),
             (["--reward_scale", "-1"], "minimises the reward"),
             (["--nproc", "0", "--utilisation", "0"], "2 problems: --nproc 0: must be >= 1; --utilisation 0.0"),
             (["--max_train_step", "3"], "unknown flag --max_train_step; did you mean --max_train_steps"),
             (["--output_dir", str(tmp_path / "a_file" / "out")], "cannot be written")]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as e:
            reproduce.main(["sd15", "--tiny", "--plan", *extra])
        message = str(e.value)
        assert message.startswith("reproduce: error: ") and "\n" not in message and expected in message, message
    plan = lambda *flags: reproduce.make_plan(reproduce.RECIPES["sd15"], argparse.Namespace(
        **vars(reproduce.parse_args(["sd15", "--tiny", *flags]))), str(tmp_path / "out"))
    assert reproduce.flag(plan("--max_prompts", "0").evaluate, "--max_prompts") == "0"
    assert reproduce.flag(plan().evaluate, "--max_prompts") == "3"
