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

import plumbing
import reproduce


def in_process(command, cwd=None):
    """subprocess.call for a stage's `python dipp.py|evaluate.py ARGS`: that script's main(ARGS) run in this process,
    with the exit status the interpreter would give (a one-line error: 1). The commands, commands.sh and the
    exit-status handling are reproduce.run's own; what is saved is a fresh interpreter per stage, each importing
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
            return e.code if isinstance(e.code, int) else 1
    return 0


@functools.lru_cache(maxsize=None)
def tiny_chain():
    """`python reproduce.py sd15 --tiny` (DMD2's layout: the released generator is a bare UNet state dict), run
    once, then once more as a user re-running the same command would; its stages in this process (in_process)."""
    import pytest
    out = os.path.join(tempfile.mkdtemp(prefix="dipp-test-reproduce-"), "sd15")
    argv = ["sd15", "--tiny", "--output_dir", out]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reproduce.subprocess, "call", in_process)
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
    arithmetic on them is checked against a hand computation."""
    import cost
    import promptsets
    monkeypatch.setenv("DIPP_CACHE", tempfile.mkdtemp(prefix="dipp-test-cache-"))  # (the counts' cache: not ~)
    calls = []
    monkeypatch.setattr(cost, "iteration_flops", lambda shapes, batch, **sw: calls.append((shapes, batch, sw)) or 1e13)
    monkeypatch.setattr(cost, "sample_flops", lambda shapes, steps, guidance: 1e12 * steps * (2 if guidance > 1 else 1))
    for name, recipe in reproduce.RECIPES.items():
        out = tempfile.mkdtemp(prefix="dipp-test-plan-")
        plan = reproduce.main([name, "--plan", "--output_dir", out, "--card", "H100 SXM", "--nproc", "2"])
        printed = capsys.readouterr().out
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
        assert os.listdir(out) == []  # nothing was run or written
