"""reproduce.py: from a fresh clone to the paper's table, one command per published DI++ row this code can reach.

    python reproduce.py pixart --plan   # what it downloads and what each stage costs on this card; nothing runs
    python reproduce.py pixart          # the headline row: PixArt-α-512 from PixArt-α-DMD, ImageReward
    python reproduce.py sd15            # the SD1.5 row: from DMD2's one-step UNet, ImageReward
    python reproduce.py sdxl --nproc 8  # DI++-SDXL (the released model's row): from DMD2-SDXL, FSDP2 on 8 GPUs
    python reproduce.py pixart --tiny   # the whole chain on tiny random weights, on a CPU, in about a minute

Each recipe runs five stages into --output_dir (default runs/reproduce-NAME), each a command it prints first:
  1. download  the teacher, the released one-step generator, the reward, the scorers, the prompt sets
  2. calibrate α_rew: 20 steps at α_rew = 1, then α_rew = TARGET_RATIO / median grad_ratio (docs/training.md,
               "Choosing --reward_scale"); skipped when --reward_scale is given
  3. train     python dipp.py ... (torchrun with --nproc N), checkpoints every 250 steps
  4. evaluate  python evaluate.py: the teacher, the released generator and the result, same prompts and seeds
  5. table     OUT/table.md: the three measured rows, the published rows beside them, every convention labelled
Run the same command again to resume: training from its latest checkpoint, evaluation keeping the images and
scores already written, the stages already finished skipped. Reference: docs/reproduce.md.
"""
import json
import math
import os
import shlex
import statistics
import sys
import time
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_RATIO = 0.3  # grad_ratio = α_rew‖∂r/∂x0‖ / ‖∂L_IKL/∂x0‖ aimed at: docs/training.md's 0.1–1, geometric middle
CALIBRATION_STEPS = 20  # (--tiny: 2)


class Published(typing.NamedTuple):
    row: str  # as the source names it
    values: dict  # evaluate.py metric name -> value, on evaluate.py's scale
    source: str  # where the number is printed, and any conversion made


class Recipe(typing.NamedTuple):
    title: str
    teacher: str  # hub id
    shapes: str  # random_weights.SHAPES entry of the real architecture (the cost estimate) ...
    tiny_shapes: str  # ... and of the tiny one (--tiny)
    init: tuple  # (hub id, file in it or None for the whole repo): the released one-step generator
    init_note: str
    train: list  # dipp.py flags: every choice the paper leaves open, each explained in docs/reproduce.md
    train_prompts: str  # a named prompt set (promptsets.py)
    eval_prompts: str
    teacher_steps: int  # the teacher row: its stock pipeline, N steps, the pipeline's default CFG
    evaluate: list  # evaluate.py flags shared by the three rows
    published: list  # [Published]
    shard: bool = False  # --nproc > 1 trains with --shard fsdp (FSDP2) instead of DDP: the two nets outgrow one GPU
    note: str = ""  # what the table does not reproduce


# What every recipe's training run shares; each recipe adds ω, K_TA, the learning rates and the batch
TRAINING = ["--reward", "imagereward", "--max_train_steps", "2000", "--mixed_precision", "bf16",
            "--gradient_checkpointing", "--checkpointing_steps", "250", "--validation_steps", "250"]

RECIPES = {
    "pixart": Recipe(
        title="DI++ DiT: PixArt-α-512, one step, from PixArt-α-DMD, ImageReward (the paper's headline row)",
        teacher="PixArt-alpha/PixArt-XL-2-512x512", shapes="pixart512", tiny_shapes="tiny_pixart",
        init=("PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512", None),
        init_note="PixArt-α-DMD's one-step transformer (transformer/ + scheduler/), sampled at t* = 400",
        train=["--guidance_scale", "4.5", "--fake_steps_per_G", "5", "--learning_rate", "1e-6",
               "--fake_learning_rate", "1e-6", "--train_batch_size", "8", *TRAINING],
        train_prompts="laion_aesthetics_625_20k", eval_prompts="coco30k", teacher_steps=30,
        evaluate=["--images_per_prompt", "1", "--hps_version", "v2.0",
                  "--metrics", "aesthetic,imagereward,hps,pickscore,clip"],
        published=[
            Published("PixArt-α, 30 steps", {"aesthetic": 5.97, "imagereward": 0.82, "pickscore": 22.6},
                      "SIM paper's table, COCO prompts (PickScore printed there as 0.226: ×100 here)"),
            Published("DI++ DiT, one step", {"aesthetic": 6.19, "imagereward": 1.24, "hps": 28.48},
                      "DI++ paper (arXiv 2410.18881), COCO validation prompts; HPS v2.0, on a prompt set our "
                      "sources do not state (HPSv2's own benchmark prompts are the usual one: then the measured HPS, "
                      "on COCO, is not comparable)")]),
    "sd15": Recipe(
        title="DI++ on SD1.5: one step, from DMD2's one-step UNet, ImageReward",
        teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", shapes="sd15", tiny_shapes="tiny",
        init=("tianweiy/DMD2", "model/sdv1.5/laion6.25_sd_baseline_8node_guidance1.75_lr5e-7_seed10_dfake10_"
                               "diffusion1000_gan1e-3_resume_fid8.35_checkpoint_model_041000/pytorch_model.bin"),
        init_note="DMD2's released SD1.5 one-step UNet (a bare state dict, CC BY-NC 4.0), sampled at t* = 999",
        train=["--guidance_scale", "1.75", "--fake_steps_per_G", "10", "--learning_rate", "1e-6",
               "--fake_learning_rate", "1e-6", "--train_batch_size", "8", *TRAINING],
        train_prompts="laion_aesthetics_625", eval_prompts="coco30k", teacher_steps=25,
        evaluate=["--images_per_prompt", "1", "--hps_version", "v2.0",
                  "--metrics", "aesthetic,imagereward,hps,pickscore,clip"],
        published=[
            Published("SD1.5, 25 steps", {"aesthetic": 5.26, "imagereward": 0.18, "pickscore": 21.7},
                      "SIM paper's table, COCO prompts (PickScore printed there as 0.217: ×100 here)"),
            Published("Hyper-SD15, one step (a one-step baseline, not this run's init)",
                      {"aesthetic": 5.79, "imagereward": 0.29, "pickscore": 21.5},
                      "SIM paper's table, COCO prompts (PickScore 0.215 there)")]),
    "sdxl": Recipe(
        title="DI++-SDXL: SDXL-base, one step, from DMD2-SDXL's one-step UNet, ImageReward, Parti prompts at 1024 px",
        teacher="stabilityai/stable-diffusion-xl-base-1.0", shapes="sdxl", tiny_shapes="tiny_sdxl",
        init=("tianweiy/DMD2", "dmd2_sdxl_1step_unet_fp16.bin"),
        init_note="DMD2-SDXL's one-step UNet (a bare fp16 state dict, CC BY-NC 4.0), sampled at t* = 399",
        train=["--guidance_scale", "7.5", "--fake_steps_per_G", "5", "--learning_rate", "5e-7",
               "--fake_learning_rate", "5e-7", "--train_batch_size", "4", *TRAINING],
        train_prompts="laion_aesthetics_625", eval_prompts="parti", teacher_steps=50,
        evaluate=["--images_per_prompt", "1", "--hps_version", "v2.1", "--batch_size", "4",
                  "--teacher_guidance", "7.5", "--mixed_precision", "fp16",  # (the DI* notebook's)
                  "--metrics", "aesthetic,imagereward,pickscore,clip"],
        published=[
            Published("SDXL-Base, 50 steps", {"imagereward": 0.887, "aesthetic": 5.72, "pickscore": 22.74,
                                              "clip": 32.72}, "Diff-Instruct* README, Parti prompts, 1024 px"),
            Published("DMD2-SDXL, one step", {"imagereward": 0.930, "aesthetic": 5.51, "pickscore": 22.49,
                                              "clip": 32.97}, "Diff-Instruct* README"),
            Published("DI++-SDXL, one step", {"imagereward": 1.061, "aesthetic": 5.58, "pickscore": 22.60,
                                              "clip": 32.94}, "Diff-Instruct* README; (α_rew, α_cfg) = (100, 7.5); "
                                                              "PickScore 0.2260 there (×100 here); its CLIP score's "
                                                              "backbone and scale are not stated")],
        shard=True,
        note="HPS v2.1 (the README's 29.72 average) is scored on the HPSv2 benchmark's four styles, not on Parti: "
             "run evaluate.py --prompts hps_anime (and the other three) --hps_version v2.1 on the same folders"),
}


def parse_args(argv):
    import plumbing
    p = plumbing.FlagParser("reproduce.py", __doc__.split("\n\n")[0])  # (exact flags; each mistake one line)
    p.usage = "python reproduce.py {pixart,sd15,sdxl} [--flag VALUE ...]   (python reproduce.py --help lists them all)"
    p.add_argument("recipe", choices=tuple(RECIPES), help="which published row")
    p.add_argument("--output_dir", default="", metavar="DIR", help="default runs/reproduce-RECIPE (-tiny)")
    p.add_argument("--plan", action="store_true", help="print the downloads, the commands and the cost; run nothing")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random weights and scorers, 8 built-in prompts, a few steps: the chain on a CPU")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="train on N GPUs (torchrun); the batch is per GPU")
    p.add_argument("--card", default="", metavar="NAME",
                   help="the GPU the cost is estimated for (default: this machine's), e.g. 'H100 SXM'")
    p.add_argument("--utilisation", type=float, default=None, metavar="F",
                   help="fraction of the card's bf16 peak the estimate assumes (default: cost.UTILISATION)")
    p.add_argument("--reward_scale", type=float, default=None, metavar="A",
                   help="α_rew; given, the calibration stage is skipped")
    p.add_argument("--max_train_steps", type=int, default=None, metavar="N", help="override the recipe's 2000")
    p.add_argument("--max_prompts", type=int, default=None, metavar="N",
                   help="evaluate on the first N prompts of the set (0 = all; default all, --tiny 3)")
    args = p.parse_args(argv)
    import plumbing  # every bad value named at once (the check_ranges of cost.py and the toys)
    given = lambda test: lambda v: v is None or test(v)  # (None: the recipe's own value)
    plumbing.check_ranges(p, args, {
        "nproc": (lambda v: v >= 1, ">= 1"), "max_train_steps": (given(lambda v: v >= 1), ">= 1"),
        "max_prompts": (given(lambda v: v >= 0), ">= 0 (0 = all)"),
        "utilisation": (given(lambda v: 0 < v <= 1), "a fraction of the peak, 0 < F <= 1 (e.g. 0.4)"),
        "reward_scale": (given(lambda v: v >= 0 and math.isfinite(v)),
                         "a finite α_rew >= 0 (< 0 minimises the reward)")})
    args.output_dir = args.output_dir or os.path.join("runs", f"reproduce-{args.recipe}" + ("-tiny" * args.tiny))
    return args

# -----------------------------------------------------------------------------
# The stages' commands. Everything a stage needs is named here, so --plan can print it before anything runs.


def flag(flags, name, default=None):
    return flags[flags.index(name) + 1] if name in flags else default


def set_flag(flags, name, value):
    flags = list(flags)
    if name in flags:
        flags[flags.index(name) + 1] = str(value)
    else:
        flags += [name, str(value)]
    return flags


class Plan(typing.NamedTuple):
    downloads: list  # [(hub id, file patterns or None = the whole repo, what for)]; [1] is the released generator
    models: dict  # teacher, init, reward paths/ids as the commands use them
    train: list  # dipp.py flags (without output_dir and resume)
    evaluate: list  # evaluate.py flags (without --generator)
    steps: int
    calibrate: bool


def make_plan(recipe, args, out):
    """The flags of every stage. --tiny swaps the hub models for tiny random ones built under OUT/models (the
    released generator becomes the tiny teacher's own denoiser, written in the released file's layout), the
    prompt sets for dipp's built-in prompts, and the step counts for a few."""
    import evaluate
    train = list(recipe.train)
    steps = args.max_train_steps or int(flag(train, "--max_train_steps"))
    if args.tiny:
        models = tiny_models(recipe, os.path.join(out, "models"))
        steps = args.max_train_steps or 2
        train = set_flag(set_flag(train, "--train_batch_size", 1), "--mixed_precision", "no")
        train = [f for f in train if f != "--gradient_checkpointing"]
        train = set_flag(set_flag(set_flag(train, "--fake_steps_per_G", 1), "--checkpointing_steps", steps),
                         "--validation_steps", steps)
        train = set_flag(set_flag(set_flag(train, "--reward", "clip"), "--reward_model_path", models["reward"]),
                         "--learning_rate", "1e-3")
        prompts = []
        few = 3 if args.max_prompts is None else args.max_prompts  # (an explicit 0 = all 8 built-in prompts)
        ev = ["--tiny", "--teacher_steps", "2", "--max_prompts", str(few), "--images_per_prompt", "2", "--metrics",
              "aesthetic,imagereward,hps,pickscore,clip", "--hps_version", flag(recipe.evaluate, "--hps_version")]
        downloads = []
    else:
        models = {"teacher": recipe.teacher, "init": None, "reward": "THUDM/ImageReward"}
        prompts = ["--prompts", recipe.train_prompts]
        ev = list(recipe.evaluate) + ["--teacher_steps", str(recipe.teacher_steps), "--prompts", recipe.eval_prompts]
        ev += [] if "--mixed_precision" in ev else ["--mixed_precision", "bf16"]
        ev += [] if "--batch_size" in ev else ["--batch_size", "16"]
        ev += ["--max_prompts", str(args.max_prompts)] if args.max_prompts else []
        d = evaluate.parse_args([])  # the scorers' default hub ids, as evaluate.py loads them
        downloads = [(recipe.teacher, None, "the teacher (diffusers pipeline)"),
                     (recipe.init[0], [recipe.init[1]] if recipe.init[1] else None, recipe.init_note),
                     ("THUDM/ImageReward", ["ImageReward.pt", "med_config.json"], "the reward, ImageReward v1.0"),
                     ("bert-base-uncased", ["vocab.txt", "tokenizer_config.json", "config.json"],
                      "ImageReward's tokenizer"),
                     (d.clip_model, ["*.json", "*.txt", "WEIGHTS"], "aesthetic and CLIP score: OpenAI CLIP ViT-L/14"),
                     (d.aesthetic_model, [evaluate.AESTHETIC_FILE], "the LAION aesthetic predictor v2 head"),
                     (d.hps_model, [evaluate.HPS_FILES[flag(recipe.evaluate, "--hps_version")]], "HPS"),
                     (d.pickscore_model, ["*.json", "*.txt", "WEIGHTS"], "PickScore v1"),
                     (d.pickscore_processor, ["*.json", "*.txt"], "PickScore's processor")]
    train = set_flag(train, "--max_train_steps", steps)
    train += ["--shard", "fsdp"] if recipe.shard and args.nproc > 1 else []
    train = ["--pretrained_model_name_or_path", models["teacher"], "--generator_init", "INIT"] + train + prompts
    return Plan(downloads, models, train, ["--pretrained_model_name_or_path", models["teacher"]] + ev, steps,
                calibrate=args.reward_scale is None)


def tiny_models(recipe, folder):
    """Tiny random stand-ins, in the layouts of the real downloads: the teacher folder (random_weights), and the
    'released generator' = the teacher's denoiser as a bare state dict (DMD2's SD1.5 file) or a pipeline folder
    with transformer/ (PixArt-α-DMD's)."""
    import torch
    import random_weights
    teacher, reward = random_weights.build_random(folder, recipe.tiny_shapes)
    sub = random_weights.model_subfolder(recipe.tiny_shapes)
    net = "transformer" if sub == "pixart" else "unet"
    if recipe.init[1]:  # a bare weight file, as DMD2 releases it
        init = os.path.join(folder, "init", os.path.basename(recipe.init[1]))
        if not os.path.isfile(init):
            from safetensors.torch import load_file
            os.makedirs(os.path.dirname(init), exist_ok=True)
            weights = load_file(os.path.join(teacher, net, "diffusion_pytorch_model.safetensors"))
            torch.save(weights, init)
    else:  # a pipeline folder holding the transformer, as PixArt-α-DMD's repo
        init = os.path.join(folder, "init")
        if not os.path.isdir(os.path.join(init, net)):
            import shutil
            shutil.copytree(os.path.join(teacher, net), os.path.join(init, net))
    return {"teacher": teacher, "init": init, "reward": reward}

# -----------------------------------------------------------------------------
# Stage 1: downloads (the hub's own library; sizes from the hub's listing when it can be reached)


def resolve_patterns(repo, patterns):
    """'WEIGHTS' in patterns: the repo's safetensors weights if it has any, else its .bin (what from_pretrained
    loads), so a repo that holds both is not downloaded twice."""
    if not patterns or "WEIGHTS" not in patterns:
        return patterns
    from huggingface_hub import list_repo_files
    files = list_repo_files(repo)
    weights = [f for f in files if f.endswith(".safetensors") and "/" not in f] or \
              [f for f in files if f.endswith(".bin") and "/" not in f]
    return [p for p in patterns if p != "WEIGHTS"] + weights


def download_size(repo, patterns):
    """Bytes the download needs, from the hub's file listing; None when the hub cannot be reached."""
    import fnmatch
    try:
        from huggingface_hub import HfApi
        info = HfApi().model_info(repo, files_metadata=True, timeout=10)
    except Exception:
        return None
    files = [s for s in info.siblings if patterns is None
             or any(fnmatch.fnmatch(s.rfilename, p) for p in resolve_patterns(repo, patterns))]
    return sum(s.size or 0 for s in files)


def in_cache(repo, patterns):
    """Whether the hub cache holds repo's snapshot with every named file (a pattern with a wildcard, or the repo's
    own weights, counts as there when the snapshot is)."""
    import glob
    import plumbing
    if not plumbing.in_hub_cache(repo):
        return False
    from huggingface_hub.constants import HF_HUB_CACHE
    snapshots = glob.glob(os.path.join(HF_HUB_CACHE, "models--" + repo.replace("/", "--"), "snapshots", "*"))
    named = [p for p in patterns or () if p != "WEIGHTS" and not any(c in p for c in "*?[")]
    return any(all(os.path.exists(os.path.join(snap, p)) for p in named) for snap in snapshots)


def fetch_command(repo, patterns, teacher=False):
    """The line that fetches one download: the teacher as download() fetches it (what from_pretrained reads, not
    every variant the repo holds); else huggingface-cli, file names as they are, patterns with --include (WEIGHTS,
    the repo's top-level weights: its safetensors, which the CLIP and PickScore repos hold)."""
    if teacher:
        return f"python -c \"from diffusers import DiffusionPipeline; DiffusionPipeline.download('{repo}')\""
    if not patterns:
        return f"huggingface-cli download {repo}"
    patterns = ["*.safetensors" if p == "WEIGHTS" else p for p in patterns]
    if any(c in p for p in patterns for c in "*?["):
        return f"huggingface-cli download {repo} --include " + " ".join(f"'{p}'" for p in patterns)
    return f"huggingface-cli download {repo} " + " ".join(patterns)


def download(plan):
    """Fetch everything into the hub cache; returns the local path of the released generator."""
    import huggingface_hub
    from diffusers import DiffusionPipeline
    init = None
    for repo, patterns, what in plan.downloads:
        print(f"download: {repo} ({what})", flush=True)
        try:
            if (repo, patterns, what) == plan.downloads[0]:  # the teacher: what from_pretrained reads, in its
                DiffusionPipeline.download(repo)  # preferred format (safetensors over .bin, no duplicates)
                continue
            path = huggingface_hub.snapshot_download(repo, allow_patterns=resolve_patterns(repo, patterns))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            import plumbing
            plumbing.die(f"cannot download {repo} ({what}): {first}. Check the network and, for gated models, "
                         "`huggingface-cli login`; then run the same command again")
        if (repo, patterns, what) == plan.downloads[1]:
            init = os.path.join(path, patterns[0]) if patterns else path
    return init

# -----------------------------------------------------------------------------
# Stage 2-4: the runs, each a subprocess with its command printed first


LOCK = []  # the file descriptor of OUT's lock while main() holds it: every stage's process inherits it


def run(command, out):
    """One stage as a child process. A SIGINT/SIGTERM to reproduce.py reaches it (plumbing.run_child): dipp.py
    writes its checkpoint, and both stop; a re-run continues from what was kept."""
    import plumbing
    print("$ " + shlex.join(command), flush=True)
    with open(os.path.join(out, "commands.sh"), "a") as f:
        f.write(shlex.join(command) + "\n")
    code, signum = plumbing.run_child(command, cwd=HERE, pass_fds=LOCK)  # (an orphan would keep OUT locked)
    if signum:
        print(f"reproduce: stopped by signal {signum}; the stage above stopped too (exit code {code}). Run the same "
              "reproduce.py command again to continue: finished stages are kept, training resumes from its latest "
              "checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    if code:
        plumbing.die(f"the stage above stopped with exit code {code}; fix what it said and run the same reproduce.py "
                     "command again (finished stages are kept)")


def dipp_command(args, flags):
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                os.path.join(HERE, "dipp.py")] + flags
    return [sys.executable, os.path.join(HERE, "dipp.py")] + flags


def finished(folder, steps):
    """A training run that reached `steps` and exported its generator."""
    import plumbing
    kept = plumbing.list_checkpoints(folder)
    return (os.path.isfile(os.path.join(folder, "generator", "config.json")) and bool(kept)
            and int(kept[-1].rsplit("-", 1)[1]) >= steps)


def resume_flags(folder):
    """Resume from the latest checkpoint; a folder with none holds nothing worth keeping (a run killed before its
    first checkpoint), so it is started afresh."""
    import plumbing
    if plumbing.list_checkpoints(folder):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite_output_dir"] if os.path.isdir(folder) else []


def calibrate(args, plan, out, init):
    """α_rew = TARGET_RATIO / median grad_ratio over CALIBRATION_STEPS steps at α_rew = 1 (grad_ratio is linear in
    α_rew: docs/training.md). Written to OUT/calibration.json and read from it on a re-run."""
    path = os.path.join(out, "calibration.json")
    if args.reward_scale is not None:
        return args.reward_scale
    if os.path.isfile(path):
        try:
            scale = json.load(open(path, encoding="utf-8"))["reward_scale"]
            if isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0:
                return scale
            problem = f"its reward_scale {scale!r} is not a number >= 0"
        except (ValueError, KeyError, TypeError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            problem = f"{type(e).__name__}: {str(e)[:80]}"
        print(f"{path} is damaged ({problem}); calibrating again")
    folder, steps = os.path.join(out, "calibrate"), 2 if args.tiny else CALIBRATION_STEPS
    flags = set_flag(set_flag(plan.train, "--max_train_steps", steps), "--reward_scale", 1)
    if "--prompts" in flags:  # its first 1,000 prompts (PixArt's T5 embeds each once: ~1 MiB a prompt)
        import promptsets
        few = os.path.join(out, "calibration_prompts.txt")
        with open(few, "w", encoding="utf-8") as f:
            f.write("\n".join(promptsets.load_prompts(flag(flags, "--prompts"), [], "--prompts")[:1000]) + "\n")
        flags = set_flag(flags, "--prompts", few)
    flags = set_flag(set_flag(flags, "--generator_init", init), "--checkpointing_steps", steps)
    run(dipp_command(args, flags + ["--output_dir", folder, "--overwrite_output_dir"]), out)
    ratios = [json.loads(line).get("grad_ratio") for line in open(os.path.join(folder, "log.jsonl"))]
    ratios = [r for r in ratios if r is not None and math.isfinite(r) and r > 0]
    if not ratios:
        import plumbing
        plumbing.die(f"the calibration run logged no grad_ratio ({folder}/log.jsonl); pass --reward_scale A to "
                     "choose α_rew yourself")
    median = statistics.median(ratios)
    scale = float(f"{TARGET_RATIO / median:.2g}")
    with open(path + ".tmp", "w") as f:  # (complete or absent: a re-run reads it back)
        json.dump({"reward_scale": scale, "median_grad_ratio_at_1": median, "target_ratio": TARGET_RATIO,
                   "steps": len(ratios)}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"calibrated: median grad_ratio {median:.3g} at α_rew = 1 -> α_rew = {scale:g}")
    return scale

# -----------------------------------------------------------------------------
# Stage 5: the table


METRIC_ORDER = ("aesthetic", "imagereward", "hps", "pickscore", "clip")


def write_table(recipe, args, out, plan, reward_scale):
    """OUT/table.md: the measured rows from evaluate.py's summary.json, then the published ones, same columns."""
    import evaluate
    summary = json.load(open(os.path.join(out, "eval", "summary.json")))
    metrics = [m for m in METRIC_ORDER if m in summary["metrics"]]
    headers = summary["headers"]
    labels = {"teacher": f"teacher, measured ({flag(plan.evaluate, '--teacher_steps')} steps)",
              "init": "released one-step generator (the init), measured", "result": "DI++ (this run), measured"}

    def cell(stats):
        return "—" if stats is None else f"{stats['mean']:.4g} ± {stats['ci95']:.2g}"
    lines = [f"# {recipe.title}", "", f"Command: `python reproduce.py {shlex.join(args.argv)}`", "",
             "| row | " + " | ".join(headers[m] for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    result = os.path.join(out, "train", "generator")
    kind = lambda m: m["kind"] if m["kind"] == "teacher" else "result" if m["source"] == result else "init"
    rows = sorted(summary["models"].values(), key=lambda m: list(labels).index(kind(m)))
    for model in rows:
        label = labels[kind(model)]
        lines.append(f"| {label} | " + " | ".join(cell(model["metrics"].get(m)) for m in metrics) + " |")
    for p in recipe.published:
        lines.append(f"| {p.row}, published | " + " | ".join(
            f"{p.values[m]:g}" if m in p.values else "—" for m in metrics) + " |")
    prompts = "dipp's 8 built-in prompts" if args.tiny else f"`{recipe.eval_prompts}` (promptsets.py)"
    lines += ["", "Conventions:",
              f"- Prompts: {prompts}, {summary['prompts']} used, {summary['images_per_prompt']} image(s) per prompt, "
              f"seed {summary['seed']}; every row saw the same prompts and initial noise.",
              f"- Training: {recipe.train_prompts if not args.tiny else 'built-in'} prompts, {plan.steps} steps, "
              f"--reward {flag(plan.train, '--reward')}, α_rew = {reward_scale:g}" +
              (" (calibrated on the whole reward's grad_ratio, a mix's terms together at their given weights: "
               "calibration.json)" if plan.calibrate else " (given)") +
              "; the other flags in commands.sh.",
              "- Published rows as their sources print them: " + "; ".join(f"{p.row}: {p.source}"
                                                                            for p in recipe.published) + ".",
              "- Measured ± is the 95 % Student-t interval over per-prompt means; published rows state none.",
              *([f"- Not reproduced here: {recipe.note}."] if recipe.note else []),
              "- Each column's convention, from evaluate.py:"]
    lines += ["  " + line for line in evaluate.conventions(metrics, evaluate.parse_args(
        ["--hps_version", summary["hps_version"], "--hps_resize", summary["hps_resize"]])).splitlines()]
    if args.tiny:
        lines += ["", "(--tiny: random weights and random scorers; the numbers mean nothing, the chain is the point.)"]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def main(argv=None):
    """Every error is one line (plumbing.as_program); a SIGINT/SIGTERM stops the stage running and this process,
    with one line saying how to continue; OUT is locked while this runs (a second run into it stops at once)."""
    import plumbing
    argv = sys.argv[1:] if argv is None else list(argv)
    with plumbing.as_program("reproduce"), plumbing.stopped_in_one_line(
            "run the same reproduce.py command again to continue (finished stages are kept)"):
        args = parse_args(argv)
        args.argv = argv  # (table.md names the command)
        if args.plan:
            return reproduce(args)
        with plumbing.folder_lock(os.path.abspath(args.output_dir)) as fd:
            LOCK.append(fd)
            try:
                return reproduce(args)
            finally:
                LOCK.remove(fd)


def reproduce(args):
    import plumbing
    recipe, out = RECIPES[args.recipe], os.path.abspath(args.output_dir)
    plumbing.writable_dir(out)  # (one line for a folder that cannot be written)
    plan = make_plan(recipe, args, out)
    print_plan(recipe, args, plan)
    if args.plan:
        return plan
    init = plan.models["init"] or download(plan)
    if not args.tiny:  # the prompt sets too, before any run starts (fetched once, verified, cached)
        import promptsets
        for name in (recipe.train_prompts, recipe.eval_prompts):
            print(f"prompts: {name} -> {promptsets.resolve(name)}")
    train = set_flag(plan.train, "--generator_init", init)
    scale = calibrate(args, plan._replace(train=train), out, init)
    folder = os.path.join(out, "train")
    if finished(folder, plan.steps):
        print(f"train: {folder} finished its {plan.steps} steps; kept")
    else:
        flags = set_flag(train, "--reward_scale", scale) + ["--output_dir", folder] + resume_flags(folder)
        run(dipp_command(args, flags), out)
    run([sys.executable, os.path.join(HERE, "evaluate.py")] + plan.evaluate +
        ["--generator", init, "--generator", os.path.join(folder, "generator"), "--output_dir",
         os.path.join(out, "eval")], out)
    print(write_table(recipe, args, out, plan, scale))
    print(f"wrote {out}/table.md")


def print_plan(recipe, args, plan):
    """What will be downloaded (with sizes when the hub answers), the commands, and the cost on the card."""
    print(f"{recipe.title}\n")
    if plan.downloads:
        import promptsets
        print("downloads (into the hub cache), a checklist: [x] is here already, [ ] is missing:")
        for repo, patterns, what in plan.downloads:
            size = download_size(repo, patterns) if args.plan else None
            print(f"  [{'x' if in_cache(repo, patterns) else ' '}] {repo:48s} {what}"
                  + (f"  [{size / 2 ** 30:.1f} GiB]" if size else ""))
        for name, use in ((recipe.train_prompts, "training"), (recipe.eval_prompts, "evaluation")):
            print(f"  [{' ' if promptsets.missing(name) else 'x'}] prompt set {name:37s} {use} prompts (promptsets.py)")
        missing = [fetch_command(repo, patterns, teacher=i == 0) for i, (repo, patterns, _) in enumerate(plan.downloads)
                   if not in_cache(repo, patterns)]
        missing += [m for m in map(promptsets.missing, (recipe.train_prompts, recipe.eval_prompts)) if m]
        print(f"  missing: {len(missing)}; `python reproduce.py {args.recipe}` fetches them all when online, or one by"
              " one:\n" + "".join(f"    {m}\n" for m in missing) if missing else "  nothing is missing\n")
    print("stages:")
    print(f"  calibrate  {CALIBRATION_STEPS} steps at α_rew = 1" if plan.calibrate else
          f"  calibrate  skipped: --reward_scale {args.reward_scale:g}")
    print(f"  train      python dipp.py {shlex.join(plan.train)}")
    if recipe.shard and args.nproc == 1 and not args.tiny:
        print("             (one process: full fine-tuning of these nets needs ~79 GB before activations, docs/sdxl.md;"
              " --nproc N shards them with FSDP2)")
    print(f"  evaluate   python evaluate.py {shlex.join(plan.evaluate)} --generator INIT --generator RESULT")
    print_cost(recipe, args, plan)


def counted(count, *key):
    """count() (a FLOP count: minutes for SDXL on a laptop CPU) remembered in the user's cache, keyed by its
    arguments, the code that counts (dipp.py, families.py, cost.py, random_weights.py) and the library versions,
    so a re-run (a resume) prints its plan at once."""
    import hashlib
    import promptsets
    import diffusers
    import torch
    code = b"".join(open(os.path.join(HERE, f), "rb").read() for f in ("dipp.py", "families.py", "cost.py",
                                                                       "random_weights.py"))
    digest = hashlib.sha256(json.dumps([key, torch.__version__, diffusers.__version__], sort_keys=True).encode()
                            + code).hexdigest()[:16]
    path = os.path.join(os.path.dirname(promptsets.cache_dir()), "cost", f"{digest}.json")
    if os.path.isfile(path):
        try:
            flops = json.load(open(path, encoding="utf-8"))["flops"]
            if isinstance(flops, (int, float)) and flops > 0:
                return flops
        except (ValueError, KeyError, TypeError):
            pass
        print(f"the cached FLOP count {path} is damaged; counting again")
    flops = count()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"flops": flops, "key": key}, f)
        os.replace(path + ".tmp", path)
    except OSError:  # a cache that cannot be written only costs the next plan its count
        pass
    return flops


def print_cost(recipe, args, plan):
    """Hours per stage = FLOPs ÷ (the card's bf16 peak × a stated utilisation) ÷ GPUs. FLOPs: cost.py, counted on
    the meta device through dipp's own code on the real shapes (docs/cost.md); the scorers are not counted."""
    import cost
    import dipp
    import evaluate
    import families
    import plumbing
    import promptsets
    import random_weights
    import torch
    card = args.card or (torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    util = args.utilisation or cost.UTILISATION
    peak = plumbing.peak_tflops(card) if card else None
    batch = int(flag(plan.train, "--train_batch_size"))
    switches = dict(gradient_checkpointing="--gradient_checkpointing" in plan.train,
                    reward=flag(plan.train, "--reward"),
                    fake_steps_per_G=int(flag(plan.train, "--fake_steps_per_G")),
                    guidance_scale=float(flag(plan.train, "--guidance_scale")))
    shapes = recipe.tiny_shapes if args.tiny else recipe.shapes
    print(f"\ncost ({shapes} shapes; FLOPs counted on the meta device by cost.py, and kept for the next plan):",
          flush=True)

    def timed(label, count, *key):  # (a real SDXL count takes minutes: say what runs, and for how long)
        start = time.perf_counter()
        print(f"  counting {label} ...", end="", flush=True)
        flops = counted(count, *key)  # (tiny: 3-10 s on a CPU; a re-run: at once)
        print(f" {time.perf_counter() - start:.0f} s", flush=True)
        return flops
    per_iteration = timed("one training iteration", lambda: cost.iteration_flops(shapes, batch=batch, **switches),
                          shapes, batch, switches)  # one process's iteration
    available = len(promptsets.BUILTIN_PROMPTS) if args.tiny else promptsets.SETS[recipe.eval_prompts].count
    prompts = min(int(flag(plan.evaluate, "--max_prompts", 0)) or available, available)
    per_image = int(flag(plan.evaluate, "--images_per_prompt"))
    family = families.FAMILIES[random_weights.model_subfolder(shapes)]  # (evaluate.py's default: its pipeline's)
    guidance = float(flag(plan.evaluate, "--teacher_guidance", evaluate.pipeline_guidance(family)))
    teacher_steps = int(flag(plan.evaluate, "--teacher_steps"))
    stages = {"calibrate": per_iteration * CALIBRATION_STEPS * args.nproc if plan.calibrate else 0,
              "train": per_iteration * plan.steps * args.nproc,  # every GPU runs its own batch
              "evaluate": prompts * per_image * (
                  timed("one teacher sample", lambda: cost.sample_flops(shapes, teacher_steps, guidance), shapes,
                        "sample", teacher_steps, guidance)
                  + 2 * timed("one generator sample", lambda: cost.sample_flops(shapes, 1, 1.0), shapes, "sample"))}
    print(f"  one training iteration: {per_iteration / 1e12:.4g} TFLOP at batch {batch} per GPU; evaluation: "
          f"{prompts} prompts × {per_image} image(s) × 3 models (teacher at {teacher_steps} steps, CFG {guidance:g})")
    for stage, flops in stages.items():
        if not flops:
            continue
        gpus = args.nproc if stage != "evaluate" else 1  # evaluate.py runs on one GPU
        line = f"  {stage:10s} {flops / 1e15:10.4g} PFLOP"
        if peak:
            hours = cost.estimate_seconds(flops, card, util) / 3600 / gpus
            line += f"  ≈ {hours:.3g} h on {gpus} × {card} at {util:.0%} of its {peak:g} TFLOP/s bf16 peak"
        print(line)
    if not peak:
        print(f"  (no time estimate: {'no GPU here' if not card else f'no peak known for {card!r}'}; "
              "pass --card, e.g. --card 'H100 SXM')")
    print_memory(shapes, batch, switches, plan, args)
    return stages


def print_memory(shapes, batch, switches, plan, args):
    """The training run's peak memory per GPU, beside its hours: cost.memory, counted on the meta device through the
    same iteration (docs/cost.md, "Will it fit?"), cached as the FLOPs are."""
    import cost
    ranks = args.nproc if "fsdp" in plan.train else 1
    switches = dict(switches, mixed_precision=flag(plan.train, "--mixed_precision", "no"))
    m = (cost.iteration_memory if args.tiny else cost.memory)(shapes, batch, ranks, **switches)
    fits = [card for card, free in cost.CARDS.items() if cost.fits(m["total"], free)]  # docs/cost.md's cards
    print(f"  memory     {m['total'] / cost.GiB:.1f} GiB per GPU at batch {batch}"
          + (f" (FSDP2 over {ranks})" if ranks > 1 else "") + f": weights {m['weights'] / cost.GiB:.1f}, trainable "
          f"{m['trainable'] / cost.GiB:.1f}, gradients {m['gradients'] / cost.GiB:.1f}, Adam "
          f"{m['optimizer'] / cost.GiB:.1f}, activations {m['activations'] / cost.GiB:.1f}; fits a card of "
          + (fits[0] if fits else "none of 24-80 GB: --nproc N shards it, or a smaller --train_batch_size")
          + (" or more" if fits and fits[0] != list(cost.CARDS)[-1] else ""))


if __name__ == "__main__":
    main()
