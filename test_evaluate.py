"""Tests for evaluate.py: the metrics against an independent computation (a closed form, the stock diffusers
pipeline; each scorer against its official code: test_rewards.py), on tiny random models of the real
architectures. CPU, offline.

Run: pytest -q test_evaluate.py
"""
import functools
import json
import math
import os
import shlex
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the model hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

import dipp
import evaluate
import promptsets
import rewards

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def tiny():
    """Tiny SD, generator and scorer files (evaluate.build_tiny), written once per test session into root/tiny,
    where `evaluate.py --tiny --output_dir root` writes the same files again."""
    root = tempfile.mkdtemp(prefix="dipp-test-eval-tiny-")
    folder = os.path.join(root, "tiny")
    sd, generator, weights = evaluate.build_tiny(folder)
    return dict(root=root, folder=folder, sd=sd, generator=generator, **weights)


def readme_command():
    """The `python evaluate.py --tiny ...` command exactly as README gives it."""
    text = open(os.path.join(HERE, "README.md")).read()
    line = next(l for l in text.splitlines() if "python evaluate.py --tiny" in l)
    return shlex.split(line[line.index("python evaluate.py --tiny"):].split("#")[0])[2:]


@functools.lru_cache(maxsize=None)
def readme_run():
    """README's CPU command, run once into a temporary output_dir."""
    argv = readme_command()
    i = argv.index("--output_dir")
    argv[i + 1] = tempfile.mkdtemp(prefix="dipp-test-eval-run-")
    return argv[i + 1], argv, evaluate.main(argv)


def png(out, record):
    """A written image as an int tensor (H, W, 3) of its 8-bit values."""
    import numpy as np
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(os.path.join(out, record["image"])))).int()


# ----------------------------------------------------------------------------- the whole command

def test_readme_tiny_command_writes_the_table():
    """README's --tiny command runs and writes K images per prompt per model, one scores.jsonl line per image
    and per-image metric (+ one per prompt for diversity), summary.json, table.md with every convention in
    the header and the command that produced it, and the comparison grid; every number is finite."""
    out, argv, result = readme_run()
    models, metrics = result["models"], result["metrics"]
    K = int(argv[argv.index("--images_per_prompt") + 1])
    P = len(promptsets.BUILTIN_PROMPTS)
    assert [m["kind"] for m in models] == ["teacher", "generator"] and metrics == tuple(evaluate.METRICS)
    for m in models:
        assert len([f for f in os.listdir(os.path.join(out, "images", m["slug"])) if f.endswith(".png")]) == P * K
    lines = [json.loads(l) for l in open(os.path.join(out, "scores.jsonl"))]
    assert len(lines) == len(models) * (P * K * 5 + P)  # 5 per-image metrics, diversity per prompt
    assert all(math.isfinite(l["value"]) for l in lines)
    summary = json.load(open(os.path.join(out, "summary.json")), parse_constant=pytest.fail)  # strict JSON: no NaN
    for m in summary["models"].values():
        assert m["generation_images_per_s"] > 0
        for metric in evaluate.METRICS:
            if metric != "fd_teacher" or m["kind"] == "generator":
                assert math.isfinite(m["metrics"][metric]["mean"]), metric
    assert set(summary["scoring_images_per_s"]) == {"imagereward", "clip_l", "hps", "pickscore"}
    table = open(os.path.join(out, "table.md")).read()
    assert "Command: `python evaluate.py --tiny" in table and "HPS v2.0 (100·cos)" in table
    assert "95 % Student-t confidence interval" in table and "--hps_resize legacy (no antialias" in table
    P = len(promptsets.BUILTIN_PROMPTS)
    assert summary["models"]["teacher"]["metrics"]["clip"]["t_quantile"] == evaluate.t_quantile(P - 1)
    for metric in metrics:
        assert evaluate.header(metric, evaluate.parse_args(argv)) in table
    from PIL import Image
    assert Image.open(os.path.join(out, "grid.png")).height == 30 + 128 * len(models)  # one row per model


def test_all_models_share_prompts_and_seeds():
    """Image (i, k) has the same prompt index and seed in every model, and seeds do not repeat."""
    out, _, result = readme_run()
    keys = [[(r["prompt_index"], r["image_index"], r["seed"]) for r in m["records"]] for m in result["models"]]
    assert keys[0] == keys[1] and len({s for _, _, s in keys[0]}) == len(keys[0])


def stock_pipeline(sd, unet_folder=None, scheduler_kwargs=None):
    """A StableDiffusionPipeline assembled here, independently of evaluate.py, from the tiny SD folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = (UNet2DConditionModel.from_pretrained(unet_folder) if unet_folder
            else UNet2DConditionModel.from_pretrained(sd, subfolder="unet"))
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(sd, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(sd, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer"), unet=unet,
        scheduler=DDPMScheduler.from_pretrained(sd, subfolder="scheduler", **(scheduler_kwargs or {})),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def stock_images(pipe, records, **kwargs):
    """The pipeline's own [0, 1] output from the seeds the records name, rounded to 8 bits as PNGs are."""
    prompts = [promptsets.BUILTIN_PROMPTS[r["prompt_index"]] for r in records]
    generators = [torch.Generator().manual_seed(r["seed"]) for r in records]  # z first, then DDPM's step noise
    z = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    with torch.no_grad():
        images = pipe(prompts, latents=z, generator=generators, output_type="pt", **kwargs).images  # (B, 3, 16, 16)
    return (images * 255).round().int().permute(0, 2, 3, 1)


def test_teacher_images_are_the_stock_pipeline_output():
    """The teacher's PNGs equal what a stock diffusers pipeline (its folder's scheduler, N steps, CFG)
    makes from the same seeds, up to 8-bit rounding."""
    out, argv, result = readme_run()
    records = result["models"][0]["records"][:4]
    steps = int(argv[argv.index("--teacher_steps") + 1])
    theirs = stock_images(stock_pipeline(os.path.join(out, "tiny", "sd")), records, num_inference_steps=steps,
                          guidance_scale=7.5)
    ours = torch.stack([png(out, r) for r in records])
    assert (ours - theirs).abs().max() <= 1 and (ours != theirs).float().mean() < 0.01
    assert (ours[0] - ours[1]).abs().max() > 10  # the check is not vacuous: images differ


def test_generator_images_are_one_step_samples():
    """A generator's PNGs equal the stock pipeline run for one step at t* = 999 with its UNet (dipp's
    one-step sample, as test_dipp's export test establishes) from the same seeds."""
    out, _, result = readme_run()
    gen = result["models"][1]
    theirs = stock_images(stock_pipeline(os.path.join(out, "tiny", "sd"), gen["source"], {"clip_sample": False}),
                          gen["records"][:4], timesteps=[999], guidance_scale=1.0)
    ours = torch.stack([png(out, r) for r in gen["records"][:4]])
    assert (ours - theirs).abs().max() <= 1


def test_a_rerun_keeps_what_it_wrote_and_redraws_a_retrained_generator(tmp_path):
    """Resume: evaluating again into the same folder keeps every PNG and score of an unchanged model (the files are
    not rewritten); a generator retrained in the same folder (its weights rewritten) is a new model, so its images
    are drawn again from its new weights, and its scores are recomputed; asking for more images per prompt keeps the
    images already drawn and scores them all again (a score file for fewer images is not reused)."""
    import shutil
    from diffusers import UNet2DConditionModel
    t, out = tiny(), tmp_path / "eval"
    generator = shutil.copytree(t["generator"], tmp_path / "generator")
    argv = ["--pretrained_model_name_or_path", t["sd"], "--generator", str(generator), "--max_prompts", "2",
            "--images_per_prompt", "1", "--metrics", "clip", "--clip_model", t["clip_model"], "--output_dir", str(out)]
    first = evaluate.main(argv)
    files = lambda: {p: os.path.getmtime(p) for p in map(str, out.glob("images/*/*")) if not p.endswith("key.json")}
    before = files()
    second = evaluate.main(argv)
    slug = first["models"][0]["slug"]
    assert files() == before and len(before) == 3  # 2 PNGs + the clip_l scores, untouched
    assert torch.equal(first["values"][slug]["clip"], second["values"][slug]["clip"])
    unet = UNet2DConditionModel.from_pretrained(generator)
    with torch.no_grad():
        unet.conv_out.weight.mul_(-1)  # "retrained": a different generator in the same folder
    unet.save_pretrained(generator)
    third = evaluate.main(argv)
    after = files()
    assert all(after[p] > before[p] for p in before), (before, after)  # every file written anew
    record = third["models"][0]["records"][0]
    assert not torch.equal(png(out, record), torch.from_numpy(first["models"][0]["preview"][0]).int())
    assert not torch.equal(first["values"][slug]["clip"], third["values"][slug]["clip"])
    argv[argv.index("--images_per_prompt") + 1] = "2"  # more images of each prompt: the first ones are kept
    fourth = evaluate.main(argv)
    assert len(fourth["values"][slug]["clip"]) == 4 and torch.allclose(fourth["values"][slug]["clip"][::2],
                                                                        third["values"][slug]["clip"], atol=1e-4)


# (each scorer against its official code's own result: test_rewards.py, since evaluate.py scores with rewards.py)

# ----------------------------------------------------------------------------- set metrics

def test_diversity_is_zero_for_identical_images_and_mean_pairwise_distance_otherwise():
    """diversity = 0 for K copies of one embedding; otherwise the mean of 1 − cos over ordered pairs j ≠ l."""
    e = torch.randn(1, 16).repeat(4, 1)
    assert rewards.pairwise_diversity(e).abs() < 1e-12
    e = torch.randn(4, 16)
    n = torch.nn.functional.normalize(e.double(), dim=-1)
    pairs = [1 - (n[j] @ n[l]) for j in range(4) for l in range(4) if j != l]
    assert rewards.pairwise_diversity(e) > 0.1
    assert torch.allclose(rewards.pairwise_diversity(e), torch.stack(pairs).mean())


def test_frechet_distance_matches_closed_forms():
    """FD of two 2-D Gaussians with non-commuting covariances equals the closed form
        ‖Δμ‖² + TrΣ1 + TrΣ2 − 2·sqrt(Tr(Σ1Σ2) + 2·sqrt(detΣ1·detΣ2))
    (for a 2×2 M with real eigenvalues λ1, λ2 ≥ 0: (√λ1 + √λ2)² = Tr M + 2 sqrt(det M)); a sample set
    against itself gives ≈ 0, and shifting every sample by v gives exactly ‖v‖²."""
    A = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    B = torch.tensor([[1.0, -0.7], [-0.7, 1.5]], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    assert not torch.allclose(A @ B, B @ A)
    closed = ((mu1 - mu2) ** 2).sum() + A.trace() + B.trace() - 2 * torch.sqrt(
        (A @ B).trace() + 2 * torch.sqrt(torch.det(A) * torch.det(B)))
    assert torch.allclose(evaluate.frechet_distance(mu1, A, mu2, B), closed, atol=1e-10)
    torch.manual_seed(0)
    x = torch.randn(200, 32) @ torch.randn(32, 32)  # correlated features, n > D
    stats = evaluate.gaussian_stats(x)
    assert evaluate.frechet_distance(*stats, *stats).abs() < 1e-8
    for scale in (0.5, 2.0):
        v = scale * torch.ones(32) / 32 ** 0.5  # ‖v‖ = scale
        fd = evaluate.frechet_distance(*stats, *evaluate.gaussian_stats(x + v))
        assert abs(fd.item() - scale ** 2) < 1e-6


# ----------------------------------------------------------------------------- user mistakes

def evaluate_error(fn):
    """The one-line error of fn() called as evaluate.main calls its pieces (plumbing's errors speak for evaluate)."""
    import plumbing
    with pytest.raises(SystemExit) as e, plumbing.as_program("evaluate"):
        fn()
    message = str(e.value)
    assert message.startswith("evaluate: error: ") and "\n" not in message, message
    return message


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    message = str(e.value)
    assert message.startswith("evaluate: error: ") and "\n" not in message, message
    return message


def replace_flags(base, extra):
    """base (flag, value pairs) with every flag that extra gives again left out, then extra."""
    pairs = [base[i:i + 2] for i in range(0, len(base), 2)]
    return [x for flag, value in pairs if flag not in extra for x in (flag, value)] + extra


def test_every_missing_weight_is_one_line_naming_files_and_download(tmp_path, monkeypatch):
    """Each scorer's weights missing (offline hub, absent path, incomplete folder) ends in one line that names
    the files and the download command, before anything is generated; same for the teacher and generators. All of
    them missing with the prompt set: one line naming every one (not one per attempt)."""
    t = tiny()
    base = ["--pretrained_model_name_or_path", t["sd"], "--generator", t["generator"], "--output_dir", str(tmp_path)]
    clip = ["--clip_model", t["clip_model"]]
    download = "huggingface-cli download"
    (tmp_path / "empty").mkdir()
    cases = [
        (["--metrics", "imagereward"], [f"{download} THUDM/ImageReward ImageReward.pt med_config.json"]),
        (["--metrics", "imagereward", "--imagereward_model", str(tmp_path / "empty")],
         ["lacks ImageReward.pt, med_config.json"]),
        (["--metrics", "clip"], [f"{download} openai/clip-vit-large-patch14", "--clip_model"]),
        (["--metrics", "aesthetic"] + clip,
         [f"{download} camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth"]),
        (["--metrics", "aesthetic", "--aesthetic_model", "./no/such.pth"] + clip, ["does not exist"]),
        (["--metrics", "hps"], [f"{download} xswu/HPSv2 HPS_v2_compressed.pt"]),
        (["--metrics", "hps", "--hps_version", "v2.1"], [f"{download} xswu/HPSv2 HPS_v2.1_compressed.pt"]),
        (["--metrics", "hps", "--hps_model", str(tmp_path / "HPS_v2.1_compressed.pt")], ["not comparable"]),
        (["--metrics", "pickscore"], [f"{download} yuvalkirstain/PickScore_v1"]),
        (["--metrics", "pickscore", "--pickscore_model", t["pickscore_model"]],
         [f"{download} laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]),
        (["--metrics", "clip", "--pretrained_model_name_or_path", str(tmp_path / "empty")] + clip,
         ["missing unet/config.json", "stable-diffusion-v1-5"]),
        (["--metrics", "clip", "--pretrained_model_name_or_path", "someone/not-cached"] + clip, [download]),
        (["--metrics", "clip", "--generator", str(tmp_path / "empty")] + clip, ["not a generator folder"]),
    ]
    for extra, expected in cases:
        argv = replace_flags(base, extra)
        message = error_of(argv)
        assert all(e in message for e in expected), (extra, message)
    # all of them missing at once (offline, a prompt set not cached): one message naming each, with its download
    monkeypatch.setenv("DIPP_CACHE", str(tmp_path / "cache"))  # (no prompt set cached)
    message = error_of(replace_flags(base, ["--pretrained_model_name_or_path", "someone/not-cached", "--prompts",
                                            "coco1k", "--metrics", "imagereward,hps,pickscore"]))
    wanted = ["prompt set 'coco1k'", "python promptsets.py fetch coco30k", f"{download} someone/not-cached",
              f"{download} THUDM/ImageReward", f"{download} bert-base-uncased", f"{download} xswu/HPSv2",
              f"{download} yuvalkirstain/PickScore_v1", f"{download} laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
    assert message.startswith(f"evaluate: error: {len(wanted) - 1} problems") and "\n" not in message, message
    assert all(w in message for w in wanted), message


def test_missing_scorer_package_names_it(tmp_path, monkeypatch):
    """A scorer whose package is not installed says which package to pip install."""
    t = tiny()
    base = ["--pretrained_model_name_or_path", t["sd"], "--generator", t["generator"], "--output_dir", str(tmp_path)]
    for module, metric, package in (("open_clip", "hps", "open-clip-torch==2.32.0"),
                                    ("ImageReward", "imagereward", "image-reward==1.5")):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
        message = error_of(base + ["--metrics", metric])
        assert f"pip install {package}" in message, message
        monkeypatch.undo()


def test_bad_flags_and_prompt_files_are_one_line(tmp_path):
    """Bad flags, bad prompt files and impossible metric requests each end in one 'evaluate: error:' line."""
    t = tiny()
    gen = ["--pretrained_model_name_or_path", t["sd"], "--generator", t["generator"], "--output_dir", str(tmp_path)]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cases = {
        ("--metrics", "fid"): "unknown metric",
        ("--images_per_prompt", "0"): "--images_per_prompt must be a positive",
        ("--seed", "-1"): "--seed must be in",
        ("--batch_size", "many"): "invalid int value",
        ("--hps_version", "v3"): "invalid choice",
        ("--metrics", "diversity", "--images_per_prompt", "1"): "--images_per_prompt >= 2",
        ("--metrics", "fd_teacher"): "--teacher_steps N",
        ("--teacher_steps", "2", "--teacher_guidance", "0.5"): "--teacher_guidance",
        ("--teacher_steps", "2", "--teacher_guidance", "inf"): "--teacher_guidance inf",
        ("--prompts", str(tmp_path / "none.txt")): "does not exist",
        ("--prompts", str(tmp_path / "empty.txt")): "has no prompts",
        ("--prompts", str(tmp_path / "latin1.txt")): "UTF-8",
        ("--mixed_precision", "fp16", "--device", "cpu"): "needs a CUDA GPU",
        ("--no_such_flag",): "unknown flag --no_such_flag",
        ("--generato", "x"): "did you mean --generator",
        ("--image_per_prompt", "2"): "did you mean --images_per_prompt",
    }
    for argv, expected in cases.items():
        message = error_of(gen + ["--metrics", "clip", "--clip_model", t["clip_model"]] + list(argv))
        assert expected in message, (argv, message)
    assert "nothing to evaluate" in error_of(["--output_dir", str(tmp_path)])


def test_wrong_checkpoint_files_are_one_line(tmp_path):
    """A file that is no checkpoint, an HPS file without 'state_dict', or one for another architecture:
    each is one line naming what is wrong, not a torch traceback."""
    cpu = torch.device("cpu")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": torch.zeros(1)}, tmp_path / "no_state.pt")
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, tmp_path / "other.pt")
    cases = [(lambda: rewards.load_aesthetic_head(str(tmp_path / "garbage.pt")), "cannot be read"),
             (lambda: evaluate.load_hps(str(tmp_path / "garbage.pt"), evaluate.TINY_HPS_ARCH, cpu), "cannot be read"),
             (lambda: evaluate.load_hps(str(tmp_path / "no_state.pt"), evaluate.TINY_HPS_ARCH, cpu), "no 'state_dict'"),
             (lambda: evaluate.load_hps(str(tmp_path / "other.pt"), evaluate.TINY_HPS_ARCH, cpu),
              "does not match open_clip tiny-ViT-H-14"),
             (lambda: rewards.load_aesthetic_head(str(tmp_path)), "does not exist")]
    tiny()  # registers the tiny open_clip architecture
    for load, expected in cases:
        message = evaluate_error(load)
        assert expected in message, message


# ----------------------------------------------------------------------------- PixArt-α

@functools.lru_cache(maxsize=None)
def pixart_run():
    """evaluate.py on a tiny PixArt-α teacher (2 steps of its DDPM scheduler, its stock pipeline's CFG) and a
    one-step PixArt-α generator (another random transformer, t* = 400 in its dipp.json): 2 prompts × 2 images,
    CLIP score. Records what loads when: T5 loads, its forward calls, and whether it is still alive when a
    transformer is built."""
    import weakref
    import families
    import plumbing
    import random_weights
    from diffusers import PixArtTransformer2DModel
    root = tempfile.mkdtemp(prefix="dipp-test-eval-pixart-")
    pixart, _ = random_weights.build_random(os.path.join(tempfile.gettempdir(), "dipp-test-tiny-pixart"), "tiny_pixart")
    generator = os.path.join(root, "generator")
    torch.manual_seed(1)
    PixArtTransformer2DModel(in_channels=4, out_channels=8, **random_weights.SHAPES["tiny_pixart"]["transformer"]
                             ).save_pretrained(generator)
    plumbing.write_generator_record(generator, 400)
    events, t5 = [], []
    load_text_encoder, from_pretrained = families.load_text_encoder, PixArtTransformer2DModel.from_pretrained

    def t5_loaded(*args, **kwargs):
        encoder = load_text_encoder(*args, **kwargs)
        encoder.register_forward_hook(lambda *_: events.append("t5 forward"))
        t5.append(weakref.ref(encoder))
        events.append("t5 loaded")
        return encoder

    def transformer_built(*args, **kwargs):  # (no gc.collect(): freed means freed at once, as the memory is)
        events.append("transformer built" + (" beside T5" if any(r() is not None for r in t5) else ""))
        return from_pretrained(*args, **kwargs)
    argv = ["--pretrained_model_name_or_path", pixart, "--generator", generator, "--teacher_steps", "2",
            "--max_prompts", "2", "--images_per_prompt", "2", "--metrics", "clip", "--clip_model",
            tiny()["clip_model"], "--output_dir", os.path.join(root, "eval")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(families, "load_text_encoder", t5_loaded)
        patch.setattr(PixArtTransformer2DModel, "from_pretrained", transformer_built)
        result = evaluate.main(argv)
    return dict(pixart=pixart, generator=generator, out=os.path.join(root, "eval"), result=result, events=events)


def test_pixart_prompts_are_encoded_once_and_t5_freed_before_any_transformer():
    """A PixArt-α run loads T5 once, encodes the prompts and "" in one call, and frees T5 before the teacher's or
    any generator's transformer is built."""
    events = pixart_run()["events"]
    assert events == ["t5 loaded", "t5 forward", "transformer built", "transformer built"], events


def test_pixart_teacher_row_is_the_stock_pipeline():
    """The PixArt-α teacher's PNGs equal a stock PixArtAlphaPipeline assembled here (with its T5, prompts as
    strings, its folder's scheduler, N steps, guidance 4.5 = the pipeline's default) from the same seeds."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel
    run = pixart_run()
    teacher, folder = run["result"]["models"][0], run["pixart"]
    assert teacher["kind"] == "teacher" and "CFG 4.5" in teacher["name"]
    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        transformer=PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer"),
        scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"))
    theirs = stock_images(pipe, teacher["records"], num_inference_steps=2, guidance_scale=4.5, clean_caption=False,
                          use_resolution_binning=False)
    ours = torch.stack([png(run["out"], r) for r in teacher["records"]])
    assert (ours - theirs).abs().max() <= 1 and (ours != theirs).float().mean() < 0.01
    assert (ours[0] - ours[1]).abs().max() > 10  # not vacuous: images differ


def test_pixart_generator_row_is_dipp_generate(tmp_path):
    """A PixArt-α generator's PNGs equal `dipp.py --generate` with that generator, prompt and seed."""
    run = pixart_run()
    generator = run["result"]["models"][1]
    assert generator["kind"] == "generator" and generator["generator_timestep"] == 400
    for r in [r for r in generator["records"] if r["image_index"] == 0]:
        images = dipp.main(["--pretrained_model_name_or_path", run["pixart"], "--generator_init", run["generator"],
                            "--generate", promptsets.BUILTIN_PROMPTS[r["prompt_index"]], "--seed", str(r["seed"]),
                            "--output_dir", str(tmp_path)])  # z = randn from a generator seeded with --seed
        theirs = ((images[0].clamp(-1, 1) + 1) * 127.5).round().int().permute(1, 2, 0)  # (H, W, 3)
        assert (png(run["out"], r) - theirs).abs().max() <= 1, r


# ----------------------------------------------------------------------------- SDXL

@functools.lru_cache(maxsize=None)
def sdxl_run():
    """evaluate.py on a tiny SDXL teacher (2 steps of its folder's Euler scheduler, its stock pipeline's CFG 5.0) and
    one generator (another random UNet, fp16-representable weights) in three layouts: a dipp export (dipp.json:
    t* = 399), DI++-SDXL's release (XDG-XHS/dipp_1step: unet/ with config.json and only
    diffusion_pytorch_model.fp16.safetensors, no dipp.json) and that bare file, as the DI* notebook loads it.
    2 prompts × 2 images, CLIP score. Records when the text encoders load and run, and whether they are alive when
    a UNet is built."""
    import weakref
    import families
    import plumbing
    import random_weights
    from diffusers import UNet2DConditionModel
    root = tempfile.mkdtemp(prefix="dipp-test-eval-sdxl-")
    sdxl, _ = random_weights.build_random(os.path.join(tempfile.gettempdir(), "dipp-test-tiny-sdxl"), "tiny_sdxl")
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    for p in unet.parameters():
        p.data = (p.data + 0.02 * torch.randn_like(p)).half().float()  # fp16-representable, as the released file
    generator, release = os.path.join(root, "generator"), os.path.join(root, "dipp_1step")
    unet.save_pretrained(generator)
    plumbing.write_generator_record(generator, 399)
    unet.half().save_pretrained(os.path.join(release, "unet"), variant="fp16")
    bare = os.path.join(release, "unet", "diffusion_pytorch_model.fp16.safetensors")
    assert sorted(os.listdir(os.path.join(release, "unet"))) == ["config.json", os.path.basename(bare)]
    events, encoders = [], []
    load_text_encoder, from_pretrained = families.load_text_encoder, UNet2DConditionModel.from_pretrained

    def encoders_loaded(*args, **kwargs):
        both = load_text_encoder(*args, **kwargs)
        both.first.register_forward_hook(lambda *_: events.append("text forward"))
        encoders.extend(weakref.ref(e) for e in both[:2])
        events.append("text encoders loaded")
        return both

    def unet_built(*args, **kwargs):  # (no gc.collect(): freed means freed at once, as the memory is)
        events.append("unet built" + (" beside a text encoder" if any(r() is not None for r in encoders) else ""))
        return from_pretrained(*args, **kwargs)
    argv = ["--pretrained_model_name_or_path", sdxl, "--generator", generator, "--generator", release, "--generator",
            bare, "--teacher_steps", "2", "--max_prompts", "2", "--images_per_prompt", "2", "--metrics", "clip",
            "--clip_model", tiny()["clip_model"], "--output_dir", os.path.join(root, "eval")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(families, "load_text_encoder", encoders_loaded)
        patch.setattr(UNet2DConditionModel, "from_pretrained", unet_built)
        result = evaluate.main(argv)
    return dict(sdxl=sdxl, generator=generator, out=os.path.join(root, "eval"), result=result, events=events)


def test_sdxl_teacher_row_is_the_stock_pipeline_and_its_text_encoders_are_gone_before_any_unet():
    """The SDXL teacher's PNGs equal a stock StableDiffusionXLPipeline assembled here (both text encoders, prompts as
    strings, no negative prompt: ∅ = zeros, its folder's Euler scheduler, N steps, guidance 5.0 = the pipeline's
    default) from the same seeds. The two text encoders load once, encode the prompts and "" in one call and are
    freed before the first UNet (the teacher's) is built."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from test_dipp import sdxl_pipeline
    run = sdxl_run()
    events = run["events"]
    assert events[:2] == ["text encoders loaded", "text forward"] and len(events) > 2, events
    assert set(events[2:]) == {"unet built"}, events
    teacher, folder = run["result"]["models"][0], run["sdxl"]
    assert teacher["kind"] == "teacher" and "CFG 5 (EulerDiscreteScheduler)" in teacher["name"], teacher["name"]
    pipe = sdxl_pipeline(folder, UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                         EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"))
    theirs = stock_images(pipe, teacher["records"], num_inference_steps=2, guidance_scale=5.0)
    ours = torch.stack([png(run["out"], r) for r in teacher["records"]])
    assert (ours - theirs).abs().max() <= 1 and (ours != theirs).float().mean() < 0.01
    assert (ours[0] - ours[1]).abs().max() > 10  # not vacuous: images differ


def test_sdxl_generator_rows_are_dipp_generate_in_every_released_layout(tmp_path):
    """An SDXL generator's PNGs equal `dipp.py --generate` with that generator, prompt and seed (t* = 399 from its
    dipp.json); DI++-SDXL's released layout (fp16-variant unet/ folder) and its bare .safetensors file, which carry
    no dipp.json, are sampled at SDXL's t* = 399 too and give the very same PNGs."""
    run = sdxl_run()
    rows = run["result"]["models"][1:]
    assert [m["kind"] for m in rows] == ["generator"] * 3 and {m["generator_timestep"] for m in rows} == {399}
    for r in [r for r in rows[0]["records"] if r["image_index"] == 0]:
        images = dipp.main(["--pretrained_model_name_or_path", run["sdxl"], "--generator_init", run["generator"],
                            "--generate", promptsets.BUILTIN_PROMPTS[r["prompt_index"]], "--seed", str(r["seed"]),
                            "--output_dir", str(tmp_path)])  # z = randn from a generator seeded with --seed
        theirs = ((images[0].clamp(-1, 1) + 1) * 127.5).round().int().permute(1, 2, 0)  # (H, W, 3)
        assert (png(run["out"], r) - theirs).abs().max() <= 1, r
    for model in rows[1:]:
        for r, mine in zip(model["records"], rows[0]["records"]):
            assert torch.equal(png(run["out"], r), png(run["out"], mine)), (model["source"], r)


# ----------------------------------------------------------------------------- precision, statistics, checks, faults

def test_scores_do_not_follow_mixed_precision():
    """--mixed_precision bf16 is for the models evaluated only: every per-image score evaluate.py gives the images
    of a bf16 run equals what fp32 scorers built here give the same PNGs (a scorer in bf16 would not)."""
    from PIL import Image
    t, cpu = tiny(), torch.device("cpu")
    result = evaluate.main(["--tiny", "--mixed_precision", "bf16", "--device", "cpu", "--max_prompts", "2",
                            "--images_per_prompt", "1", "--metrics", "imagereward,aesthetic,hps,pickscore,clip",
                            "--output_dir", t["root"]])  # (writes the same tiny/ files again)
    model = result["models"][0]
    images = [Image.open(os.path.join(t["root"], r["image"])).convert("RGB") for r in model["records"]]
    prompts = [promptsets.BUILTIN_PROMPTS[r["prompt_index"]] for r in model["records"]]
    clip = evaluate.load_clip_l(t["clip_model"], t["aesthetic_model"], cpu)
    scorers = [evaluate.ImageRewardScorer(rewards.ImageRewardFn(evaluate.tiny_imagereward(
               os.path.join(t["folder"], "imagereward")))), clip,
               evaluate.load_hps(t["hps_model"], evaluate.TINY_HPS_ARCH, cpu),
               evaluate.load_pickscore(t["pickscore_model"], t["pickscore_processor"], cpu)]
    expected = {k: v for scorer in scorers for k, v in scorer(images, prompts).items()}
    for metric in result["metrics"]:
        assert torch.allclose(result["values"][model["slug"]][metric], expected[metric], rtol=0, atol=1e-6), metric
    clip.clip.model.to(torch.bfloat16)
    in_bf16 = clip(images, prompts)
    assert (in_bf16["clip"] - expected["clip"]).abs().max() > 1e-3  # not vacuous


def test_interval_is_student_t_over_prompt_means():
    """t_quantile(ν) is Student's t 0.975-quantile: it equals scipy.stats.t.ppf where scipy is installed, the
    printed table value t(0.975, 7) = 2.365, and the t density integrates to 0.95 over ±t (Simpson's rule, from
    lgamma); mean_ci's half-width is t(0.975, P−1) · s / √P."""
    def density_mass(t, nu, n=4000):  # ∫_{-t}^{t} Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) (1 + x²/ν)^(-(ν+1)/2) dx
        c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
        f = lambda x: c * (1 + x * x / nu) ** (-(nu + 1) / 2)
        h = 2 * t / n
        return h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * f(-t + i * h) for i in range(n + 1))
    assert round(evaluate.t_quantile(7), 3) == 2.365 and round(evaluate.t_quantile(1), 3) == 12.706
    for nu in (1, 2, 3, 4, 7, 10, 29, 100, 999):
        assert abs(density_mass(evaluate.t_quantile(nu), nu) - 0.95) < 1e-7, nu
    try:
        from scipy.stats import t as student
    except ImportError:
        student = None
    if student is not None:
        for nu in (1, 2, 3, 4, 7, 10, 29, 100, 999, 29999):
            assert abs(evaluate.t_quantile(nu) - student.ppf(0.975, nu)) < 1e-9, nu
    values = torch.tensor([0.1, 0.4, 0.35, 0.2, 0.5, 0.3, 0.15, 0.45])
    stats = evaluate.mean_ci(values)
    expected = evaluate.t_quantile(7) * values.double().std().item() / math.sqrt(8)
    assert abs(stats["ci95"] - expected) < 1e-12 and stats["ci95"] > 1.96 * values.double().std().item() / math.sqrt(8)
    assert evaluate.mean_ci(values[:1])["ci95"] is None


def test_models_scorers_and_output_folder_are_checked_before_anything_loads(tmp_path, monkeypatch):
    """A generator of the other family, a folder that is no generator, a file that is no weight file, a t* outside the
    schedule, an aesthetic head that is not the official file (checksum) and an output folder that cannot be created
    are each one line, before any model is loaded (loading here fails the test) and before the output folder is
    made."""
    import families
    import plumbing
    import random_weights
    t = tiny()
    pixart, _ = random_weights.build_random(os.path.join(tempfile.gettempdir(), "dipp-test-tiny-pixart"), "tiny_pixart")
    late = lambda *a, **k: pytest.fail("a model was loaded before every check was done")
    monkeypatch.setattr(dipp, "load_teacher", late)
    monkeypatch.setattr(families, "text_conditioning", late)
    far = tmp_path / "far"  # a generator whose dipp.json says t* = 1000
    os.makedirs(far)
    open(far / "config.json", "w").write(open(os.path.join(t["generator"], "config.json")).read())
    __import__("shutil").copy(os.path.join(t["generator"], "diffusion_pytorch_model.safetensors"), far)  # (whole)
    plumbing.write_generator_record(str(far), 1000)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "eval"
    base = ["--pretrained_model_name_or_path", t["sd"], "--generator", t["generator"], "--metrics", "clip",
            "--clip_model", t["clip_model"], "--output_dir", str(out)]
    cases = [(["--generator", os.path.join(pixart, "transformer")], "holds a PixArt-α PixArtTransformer2DModel"),
             (["--generator", str(tmp_path)], "is not a generator folder"),
             (["--generator", str(tmp_path / "a_file")], "is a file but not a weight file"),
             (["--generator", str(far)], "t* = 1000 (its dipp.json"),
             (["--metrics", "aesthetic", "--aesthetic_model", t["aesthetic_model"]],
              f"is not the official {evaluate.AESTHETIC_FILE}: its sha256 is"),
             (["--output_dir", str(tmp_path / "a_file" / "eval")], "cannot be written")]
    for extra, expected in cases:
        message = error_of(base + extra)  # (a second --generator adds to the first)
        assert expected in message and not out.exists(), (extra, message)


def test_full_disk_and_unwritable_output_are_one_line_and_leave_nothing_half_written(tmp_path):
    """Real write failures (the kernel refuses to grow a file past a limit: RLIMIT_FSIZE) while the images are
    written, then while the reports are: one line naming the file each time; no .tmp and no partial file left,
    and the reports are all replaced or none (here none: the earlier run's stay, untouched), and so are the images
    and scores an earlier run wrote (a re-run resumes: it writes only the reports)."""
    from PIL import Image
    from conftest import file_size_limit
    t, out = tiny(), tmp_path / "eval"
    argv = ["--pretrained_model_name_or_path", t["sd"], "--generator", t["generator"], "--max_prompts", "2",
            "--images_per_prompt", "1", "--metrics", "clip", "--clip_model", t["clip_model"], "--output_dir", str(out)]
    written = lambda: sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    with file_size_limit(100):  # no PNG fits
        message = error_of(argv)
    assert "could not write" in message and "' (File too large)" in message and written() == []
    evaluate.main(argv)  # then a run that fits: a re-run keeps its images and scores and rewrites only the reports
    kept = {f: os.path.getmtime(out / f) for f in written()}
    with file_size_limit(2048):  # the reports do not all fit
        message = error_of(argv)
    images = [f for f in written() if f.startswith("images") and f.endswith(".png")]
    assert "File too large" in message and any(f"{r}'" in message for r in evaluate.REPORTS), message
    assert {f: os.path.getmtime(out / f) for f in written()} == kept and len(images) == 2, written()  # no .tmp
    assert all(Image.open(out / f).load() for f in images)  # whole PNGs


def test_damaged_caches_are_recomputed_and_a_failed_rerun_keeps_the_previous_reports(tmp_path, monkeypatch, capsys):
    """Files evaluate.py wrote and a user's bad day damaged (real files on disk): a truncated score file is scored
    again and a key.json of garbage bytes has its images drawn again, each with one line saying so, to the same
    values. A re-run that fails after drawing new images (a changed generator) leaves the previous table, summary,
    scores and grid byte for byte, and the images they describe in images/<model>.previous; the next run that
    completes replaces both. While one evaluation holds --output_dir, another into it stops in one line."""
    import shutil
    import plumbing
    from diffusers import UNet2DConditionModel
    t, out = tiny(), tmp_path / "eval"
    generator = shutil.copytree(t["generator"], tmp_path / "generator")
    argv = ["--pretrained_model_name_or_path", t["sd"], "--generator", str(generator), "--max_prompts", "2",
            "--images_per_prompt", "1", "--metrics", "clip", "--clip_model", t["clip_model"], "--output_dir", str(out)]
    first = evaluate.main(argv)
    slug = first["models"][0]["slug"]
    folder = out / "images" / slug
    scores = folder / "scores_clip_l.pt"
    scores.write_bytes(scores.read_bytes()[:100])  # truncated
    capsys.readouterr()
    second = evaluate.main(argv)
    assert f"{scores} is damaged" in capsys.readouterr().out
    assert torch.equal(second["values"][slug]["clip"], first["values"][slug]["clip"])
    (folder / "key.json").write_bytes(b"\x80\xff garbage")
    third = evaluate.main(argv)
    assert "drawing the images again (its key.json is missing or damaged)" in capsys.readouterr().out
    assert torch.equal(png(out, third["models"][0]["records"][0]), png(out, first["models"][0]["records"][0]))
    assert torch.allclose(third["values"][slug]["clip"], first["values"][slug]["clip"])
    reports = {name: (out / name).read_bytes() for name in evaluate.REPORTS}
    unet = UNet2DConditionModel.from_pretrained(generator)
    with torch.no_grad():
        unet.conv_out.weight.mul_(-1)  # a retrained generator, whose re-run then fails while scoring
    unet.save_pretrained(generator)

    def fail(*args, **kwargs):
        raise SystemExit("evaluate: error: a scorer failed")
    with monkeypatch.context() as m:
        m.setattr(evaluate, "score_all", fail)
        error_of(argv)
    assert {name: (out / name).read_bytes() for name in evaluate.REPORTS} == reports
    old = out / "images" / (slug + evaluate.PREVIOUS)
    assert torch.equal(png(out, {"image": f"images/{old.name}/00000_00.png"}),
                       torch.from_numpy(first["models"][0]["preview"][0]).int())  # the images the reports describe
    evaluate.main(argv)
    assert not old.exists() and (out / "table.md").read_bytes() != reports["table.md"]
    with plumbing.folder_lock(str(out)):  # another run holds the folder
        assert "is in use by another run" in error_of(argv)


def test_generators_of_another_family_or_damaged_are_refused_before_any_network(tmp_path, monkeypatch):
    """For every pair of SD-1.x, SDXL, PixArt-α and SD3 (SD-1.x and SDXL UNets are one class): a generator folder, a
    pipeline folder and a bare weight file of another family than the teacher's are one line naming both families
    and evaluate.py's flag (--generator), before any model is loaded; a truncated weight file, bare or in a
    folder, is one line naming --generator too. The teacher's own denoiser, in each form, passes."""
    import shutil
    import families
    import random_weights
    root = tempfile.gettempdir()
    models = {"sd": random_weights.build_random(os.path.join(root, "dipp-test-tiny"), "tiny")[0],
              "sdxl": random_weights.build_random(os.path.join(root, "dipp-test-tiny-sdxl"), "tiny_sdxl")[0],
              "pixart": random_weights.build_random(os.path.join(root, "dipp-test-tiny-pixart"), "tiny_pixart")[0],
              "sd3": random_weights.build_random(os.path.join(root, "dipp-test-tiny-sd3"), "tiny_sd3")[0]}
    late = lambda *a, **k: pytest.fail("a model was loaded before every check was done")
    monkeypatch.setattr(dipp, "load_teacher", late)
    monkeypatch.setattr(families, "text_conditioning", late)
    forms = lambda fam: {"pipeline folder": models[fam], "model folder": os.path.join(
        models[fam], families.FAMILIES[fam].folder), "weight file": os.path.join(
        models[fam], families.FAMILIES[fam].folder, "diffusion_pytorch_model.safetensors")}
    base = ["--metrics", "clip", "--clip_model", tiny()["clip_model"], "--output_dir", str(tmp_path / "eval")]
    for teacher, folder in models.items():
        family = families.FAMILIES[teacher]
        for other in models:
            for form, generator in forms(other).items():
                if other == teacher:  # (the check passes; the model would load next)
                    families.check_generator(family, folder, generator, "--generator")
                    continue
                message = error_of(["--pretrained_model_name_or_path", folder, "--generator", generator] + base)
                found = families.FAMILIES[other]
                assert f"--generator '{generator}'" in message and (f"{found.title} {found.denoiser}" in message or
                                                                    f"holds a {found.denoiser}" in message), message
                assert f"the teacher is {family.title}" in message or "uses a" in message, (teacher, other, form)
    broken = tmp_path / "unet"
    shutil.copytree(os.path.join(models["sd"], "unet"), broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a copy cut short
    for generator in (broken, weights):
        message = error_of(["--pretrained_model_name_or_path", models["sd"], "--generator", str(generator)] + base)
        assert f"--generator '{generator}'" in message and "cannot be read as a weight file" in message, message
        assert "--generator_init" not in message
    weights.unlink()  # a folder with its config but no weights
    message = error_of(["--pretrained_model_name_or_path", models["sd"], "--generator", str(broken)] + base)
    assert f"--generator '{broken}' has config.json but no weight file" in message, message
    assert not (tmp_path / "eval").exists()


def test_image_key_holds_everything_the_images_depend_on(tmp_path):
    """evaluate.py's image cache (images/<model>/key.json) is keyed by everything that changes a model's images:
    the model's files, how it is sampled, the prompts, seed, precision, device, and the teacher folder's VAE and
    text encoder, which decode and condition a generator's row too (the same generator with a VAE replaced in the
    teacher's folder draws other images)."""
    import argparse
    teacher = tmp_path / "sd"
    for part in ("vae", "text_encoder", "unet"):
        os.makedirs(teacher / part)
        (teacher / part / "config.json").write_text("{}")
    model = lambda: {"source": "gen", "files": [("gen/x", 1, 2.0)], "name": "gen (one step, t*=999)"}
    args = lambda **kw: argparse.Namespace(**{"pretrained_model_name_or_path": str(teacher), "seed": 0,
                                              "mixed_precision": "no", **kw})
    cpu = torch.device("cpu")
    key = evaluate.image_key(model(), ["a fox"], args(), cpu)
    assert key == evaluate.image_key(model(), ["a fox"], args(), cpu)
    changed = [evaluate.image_key(model(), ["a cat"], args(), cpu), evaluate.image_key(model(), ["a fox"], args(
                   seed=1), cpu), evaluate.image_key(model(), ["a fox"], args(mixed_precision="bf16"), cpu),
               evaluate.image_key(model(), ["a fox"], args(), torch.device("meta")),
               evaluate.image_key({**model(), "name": "gen (one step, t*=500)"}, ["a fox"], args(), cpu),
               evaluate.image_key({**model(), "files": [("gen/x", 1, 3.0)]}, ["a fox"], args(), cpu)]
    assert all(other != key for other in changed)
    (teacher / "unet" / "config.json").write_text("{ }")  # the teacher's UNet does not draw a generator's row
    assert evaluate.image_key(model(), ["a fox"], args(), cpu) == key
    for part in ("vae", "text_encoder"):  # its VAE and text encoder do
        (teacher / part / "config.json").write_text("{  }")
        assert evaluate.image_key(model(), ["a fox"], args(), cpu) != key, part
        key = evaluate.image_key(model(), ["a fox"], args(), cpu)
