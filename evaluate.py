"""evaluate.py: the paper's table for any one-step generator (and its teacher) on a prompt set.

Every model sees the same prompts and the same initial noise z (one seed per image: `image_seed`).
One-step generators are sampled as `dipp.py --generate` samples them, decode(g_θ(z, c)) at the t* stored in
the folder's dipp.json; the teacher runs its family's stock diffusers pipeline (StableDiffusionPipeline,
PixArtAlphaPipeline, StableDiffusionXLPipeline or StableDiffusion3Pipeline) with its own scheduler, N steps and
CFG, as a user of the teacher would. Prompts are encoded once (PixArt-α's T5, SDXL's two and SD3.5's three text
encoders are then freed, before any denoiser is built). Images are written as PNGs first and every scorer reads
those PNGs, so the numbers belong to the files on disk; only one scorer is in memory at a time, and each runs in
the precision its official code uses, whatever --mixed_precision says.

Quick start (CPU, no downloads, seconds):  python evaluate.py --tiny --teacher_steps 2 --output_dir eval_tiny
Generators against the SD1.5 teacher:     python evaluate.py --generator runs/a/generator \
    --generator runs/b/generator --teacher_steps 25 --prompts prompts.txt
PixArt-α generators against PixArt-α:     the same + --pretrained_model_name_or_path PixArt-alpha/PixArt-XL-2-512x512
    --teacher_steps 30 (the SIM paper's PixArt-α row)
SDXL (DI++-SDXL's table, docs/evaluation.md): --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0
    --teacher_steps 50 --teacher_guidance 7.5 --hps_version v2.1 --generator dipp_1step/unet/...fp16.safetensors

The metrics (--metrics) and the convention of each, as table.md states them: METRICS below. Each mean comes
with a 95 % Student-t interval over the P per-prompt means. Reference: docs/evaluation.md.
"""
# -----------------------------------------------------------------------------
# 0. Imports. Heavy libraries are imported inside the functions that need them (as in dipp.py).
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
import typing

import torch
import torch.nn.functional as F

import dipp
import families
import plumbing
import promptsets
import rewards

die = plumbing.die  # one line instead of a traceback; it says "evaluate: error:" while main() runs


class Metric(typing.NamedTuple):
    scorer: str  # the scorer that computes it (one scorer in memory at a time; clip_l serves four metrics)
    per_image: bool  # one value per image (else one per prompt or per model)
    header: str  # table.md's column title: it carries the convention, so a number is never read on the wrong scale
    convention: str  # how it is computed, as table.md's notes state it


METRICS = {
    "imagereward": Metric("imagereward", True, "ImageReward v1.0",
                          "THUDM ImageReward v1.0 (BLIP ViT-L/16 + BERT, prompt cut to 35 tokens), the package's own "
                          "preprocessing; (MLP − 0.16717) / 1.03334 as `ImageReward.score()` returns it "
                          "[arXiv 2304.05977]. The model dipp trains against"),
    "aesthetic": Metric("clip_l", True, "Aesthetic v2 (CLIP-L/14 MLP)",
                        "LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE.pth, its official sha256; linear "
                        "MLP 768→1024→128→64→16→1) on the L2-normalised OpenAI CLIP ViT-L/14 image embedding, ≈ 1–10"),
    "hps": Metric("hps", True, "HPS {hps_version} (100·cos)",
                  "open_clip ViT-H-14 with xswu/HPSv2 `{hps_file}`; longest side to 224 (bicubic, {hps_resize}) + "
                  "zero pad; 100 × cosine of normalised embeddings, no logit scale [arXiv 2306.09341]. v2.0 and v2.1 "
                  "are not comparable (the DI++ paper reports v2.0, its SDXL table v2.1)"),
    "pickscore": Metric("pickscore", True, "PickScore v1 (logit_scale·cos)",
                        "yuvalkirstain/PickScore_v1 with the laion CLIP-ViT-H-14 processor; logit_scale · cosine "
                        "(≈21–23; tables such as SIM's print it ÷ 100, e.g. 0.217) [arXiv 2305.01569]"),
    "clip": Metric("clip_l", True, "CLIP score (ViT-L/14, 100·max(cos,0))",
                   "OpenAI CLIP ViT-L/14 (transformers), 100 · max(cosine, 0), torchmetrics' CLIPScore"),
    "diversity": Metric("clip_l", False, "diversity (1−cos CLIP-L/14, K={images_per_prompt})",
                        "per prompt, mean pairwise cosine distance (1 − cos) between the CLIP ViT-L/14 embeddings of "
                        "its K images; 0 = the K seeds gave one image (mode collapse)"),
    "fd_teacher": Metric("clip_l", False, "FD to teacher (CLIP-L/14)",
                         "Fréchet distance between the normalised CLIP ViT-L/14 embeddings of the model's and the "
                         "teacher's images (same prompts and seeds); biased upward when there are fewer images than "
                         "dimensions (768), so compare runs only at equal image counts. One number per model"),
}
# where each scorer's weights come from: rewards.py's records (one copy, shared with training)
AESTHETIC_FILE, AESTHETIC_SHA256 = rewards.AESTHETIC_FILE, rewards.AESTHETIC_SHA256
HPS_FILES, HPS_RESIZE = rewards.HPS_FILES, rewards.HPS_RESIZE
PACKAGES = {"imagereward": ("ImageReward", "image-reward==1.5"), "hps": ("open_clip", "open-clip-torch==2.32.0")}
REPORTS = ("prompts.txt", "scores.jsonl", "summary.json", "table.md", "grid.png")  # written together, at the end

# -----------------------------------------------------------------------------
# 1. Command line


def parse_args(argv):
    """The flags in the groups --help shows them in; exact names only, an unknown one names the closest
    (plumbing.FlagParser, as dipp.py's)."""
    p = plumbing.FlagParser("evaluate.py", "\n\n".join(__doc__.split("\n\n")[i] for i in (0, 2)))
    a = p.add_argument_group("what to evaluate").add_argument
    a("--generator", action="append", default=[], metavar="DIR",
      help="one-step generator folder written by dipp (its UNet or transformer + dipp.json), a pipeline folder "
           "holding one in unet/ or transformer/ (PixArt-α-DMD's, DI++-SDXL's), or a bare weight file on the "
           "teacher's config (DMD2-SDXL's .bin, DI++-SDXL's unet .safetensors), or a LoRA adapter file on the teacher "
           "(dipp's pytorch_lora_weights.safetensors, or a folder holding only it); repeat to compare several")
    a("--generator_timestep", type=int, default=0, metavar="INT",
      help="t* for a generator folder without dipp.json, or a weight file (0 = the family's: SD 999, PixArt-α 400, "
           "SDXL 399, SD3.5 999)")
    a("--pretrained_model_name_or_path", default=None, metavar="STR",
      help="the teacher, SD-1.x, PixArt-α, SDXL or SD3.5: hub id or diffusers folder (also supplies VAE and text "
           f"encoder to the generators, which must be of its family); default {dipp.Config.pretrained_model_name_or_path}, "
           "or with --tiny a tiny random SD")
    a("--teacher_steps", type=int, default=0, metavar="INT",
      help="sample the teacher with N steps of its folder's own scheduler (0 = no teacher row). Published rows: "
           "SD1.5 25 steps, PixArt-α 30 steps (SIM paper's table), SDXL 50 steps (DI* table)")
    a("--teacher_guidance", type=float, default=None, metavar="FLOAT",
      help="CFG scale of the teacher (diffusers' guidance_scale); default: its stock pipeline's, 7.5 for SD-1.x, "
           "4.5 for PixArt-α, 5.0 for SDXL (DI*'s SDXL row used 7.5), 7.0 for SD3.5")
    a("--tiny", action="store_true",
      help="tiny random scorers of the real architectures, and a tiny random SD teacher and generator where "
           "none is given (CPU, seconds, no download)")
    a = p.add_argument_group("prompts and seeds").add_argument
    a("--prompts", default="", metavar="STR", help="a text file, one prompt per line, or a named set: "
      "python promptsets.py lists them (default: dipp's 8 built-in prompts)")
    a("--max_prompts", type=int, default=0, metavar="INT", help="use the first N prompts of the file; 0 = all")
    a("--images_per_prompt", type=int, default=4, metavar="INT", help="K images per prompt (seeds image_seed(seed, i, k))")
    a("--seed", type=int, default=0, metavar="INT", help="base seed of the initial noise, shared by every model")
    a = p.add_argument_group("metrics and each scorer's weights (hub id or local path)").add_argument
    a("--metrics", default="all", metavar="STR", help=f"all, or a comma-separated subset of {','.join(METRICS)}")
    a("--hps_version", default="v2.0", choices=tuple(HPS_FILES),
      help="HPS checkpoint; the DI++ paper reports v2.0, the DI++-SDXL table v2.1")
    a("--hps_resize", default="legacy", choices=tuple(HPS_RESIZE),
      help="HPS's resize to 224: legacy = no antialias, as HPSv2's published numbers were computed (torchvision "
           "< 0.17); antialias = what HPSv2's code does under torchvision >= 0.17")
    a("--imagereward_model", default=rewards.RECORDS["imagereward"].weights["model"].hub, metavar="STR",
      help="hub id or folder with ImageReward.pt + med_config.json")
    a("--clip_model", default=rewards.CLIP_L, metavar="STR",
      help="OpenAI CLIP ViT-L/14 (aesthetic, clip, diversity, fd_teacher)")
    a("--aesthetic_model", default=rewards.RECORDS["aesthetic"].weights["head"].hub, metavar="STR",
      help=f"hub id, folder or file: {AESTHETIC_FILE} (checked against the official file's sha256)")
    a("--hps_model", default=rewards.RECORDS["hps20"].weights["model"].hub, metavar="STR", help="hub id, folder or file: the HPS checkpoint of --hps_version")
    a("--pickscore_model", default=rewards.RECORDS["pickscore"].weights["model"].hub, metavar="STR", help="hub id or folder of the PickScore CLIPModel")
    a("--pickscore_processor", default=rewards.CLIP_H, metavar="STR",
      help="hub id or folder of PickScore's CLIP-H processor")
    a = p.add_argument_group("machinery").add_argument
    a("--batch_size", type=int, default=8, metavar="INT", help="images per generation / scoring batch")
    a("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
      help="for the models evaluated, as in dipp (frozen nets stored in it, autocast); the scorers always run in "
           "their official precision")
    a("--device", default="auto", metavar="STR", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...")
    a("--output_dir", default="eval", metavar="STR", help="where images/, scores.jsonl, summary.json, table.md, grid.png go")
    return p.parse_args(argv)


def check_args(args):
    """Bad flags end here, before anything is loaded. Returns the metrics to compute."""
    chosen = tuple(METRICS) if args.metrics == "all" else tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        die(f"unknown metric(s) {', '.join(unknown) or '(none given)'} in --metrics; choose from {','.join(METRICS)}")
    for name in ("images_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            die(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 23 or args.images_per_prompt >= 2 ** 16:
        die(f"--seed must be in [0, 2^23) and --images_per_prompt < 65536 (the layout of image_seed), "
            f"got {args.seed} and {args.images_per_prompt}")
    if args.teacher_steps < 0 or args.max_prompts < 0:
        die("--teacher_steps and --max_prompts must be >= 0 (0 = no teacher / all prompts)")
    if args.teacher_guidance is not None and not 1 <= args.teacher_guidance < math.inf:
        die(f"--teacher_guidance {args.teacher_guidance} is not in [1, ∞); use 1 (no CFG) or more (SD1.5 default 7.5)")
    has_generator = bool(args.generator) or (args.tiny and not args.pretrained_model_name_or_path)  # (--tiny's)
    if not has_generator and not args.teacher_steps:
        die("nothing to evaluate: give --generator DIR (repeatable) and/or --teacher_steps N")
    # Set metrics that cannot be computed: an error when asked for by name, a note when implied by 'all'
    needs = {"diversity": (args.images_per_prompt >= 2, "--images_per_prompt >= 2"),
             "fd_teacher": (args.teacher_steps > 0 and has_generator, "--teacher_steps N and a --generator")}
    for metric, (possible, what) in needs.items():
        if metric in chosen and not possible:
            if args.metrics != "all":
                die(f"--metrics {metric} needs {what}")
            print(f"note: {metric} skipped (needs {what})")
            chosen = tuple(m for m in chosen if m != metric)
    return chosen


def check_models(args):
    """Before any model is loaded or any image drawn: the teacher's family (from its folder or hub id; a local
    folder must be complete) and every --generator: a folder of that family (a generator of the other family is
    one line naming both classes), with a t* inside the teacher's schedule. Returns (family, [(folder, the dipp
    Config that builds its generator)])."""
    import diffusers
    name = args.pretrained_model_name_or_path
    plumbing.check_model_locations([(name, "--pretrained_model_name_or_path")]  # a mistyped path: no hub contact
                                   + [(folder, "--generator") for folder in args.generator])
    family = families.check_folder(name)
    T = plumbing.load_or_die(lambda: diffusers.DDPMScheduler.load_config(name, subfolder="scheduler"), name,
                             "scheduler/")["num_train_timesteps"]
    generators = []
    for folder in args.generator:
        adapter = plumbing.lora_adapter_file(folder)  # a LoRA adapter (file, or a folder of only it): teacher + it
        if os.path.isfile(folder) and not folder.endswith((".safetensors", ".bin", ".pt", ".pth")):
            die(f"--generator '{folder}' is a file but not a weight file (.safetensors, .bin, .pt, .pth); give a "
                "generator folder, or the UNet's weight file (DMD2-SDXL's .bin, DI++-SDXL's .safetensors)")
        families.check_generator(family, name, folder, "--generator")  # SD-1.x vs SDXL: same class, other family
        sub = families.generator_subfolder(family, folder) if os.path.isdir(folder) and not adapter else None
        model = os.path.isfile(folder) or os.path.isfile(os.path.join(folder, sub or "", "config.json"))
        if not adapter and not model:
            die(f"--generator '{folder}' is not a generator folder (no config.json, nor {family.folder}/config.json)"
                "; give the generator/ folder that dipp.py writes at the end of training, or a weight file")
        t_star = plumbing.read_generator_record(folder) or args.generator_timestep or family.t_star
        if not 0 < t_star < T:
            die(f"--generator '{folder}' would be sampled at t* = {t_star} (its dipp.json, or --generator_timestep), "
                f"outside the teacher's schedule 1..{T - 1}")
        generators.append((folder, dipp.Config(generator_init=folder, generator_timestep=t_star)))
    return family, generators

# -----------------------------------------------------------------------------
# 2. Weights: every scorer loads by hub id or local path; a missing one is one line


def locate(name, files, flag, what, patterns=None):
    """Paths of `files` in a local folder, or a local file given directly (single-file weights), or in
    hub repo `name` (downloaded into the hub cache when online, read from it offline). Nothing large is
    loaded here: main() calls this for every scorer before generating, so a missing file costs seconds."""
    if os.path.isfile(name) and len(files) == 1:
        return [name]
    if os.path.isdir(name):
        missing = [f for f in files if not os.path.isfile(os.path.join(name, f))]
        if missing:
            die(f"{flag} folder '{name}' lacks {', '.join(missing)} ({what})")
        return [os.path.join(name, f) for f in files]
    if (name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)
            or ("/" in name and plumbing.looks_local(name))):  # a path: the hub is not asked
        die(f"{flag} '{name}' does not exist; give a hub id or a local path holding {', '.join(files)}")
    from huggingface_hub import snapshot_download
    fetch = f"huggingface-cli download {name} {' '.join(files)}"
    offline = plumbing.hub_unreachable()  # (then the hub library reads its cache only: no retries)
    try:
        folder = snapshot_download(name, allow_patterns=patterns or files)
    except Exception as e:  # offline, unknown repo, no network: the hub raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # the first sentence
        why = f"it is not in the hub cache and the hub cannot be reached ({offline})" if offline else first[:160]
        die(f"cannot get {what} ({', '.join(files)}) of '{name}': {why}. On a machine with internet "
            f"run `{fetch}` (it then loads from the hub cache), or pass {flag} PATH")
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        die(f"the hub cache of '{name}' lacks {', '.join(missing)} ({what}); run `{fetch}` or pass {flag} PATH")
    return [os.path.join(folder, f) for f in files]


def check_aesthetic_file(path):
    """The aesthetic head's bytes are the published file's, whichever mirror or folder they came from."""
    rewards.check_sha256(path, AESTHETIC_SHA256, AESTHETIC_FILE, "christophschuhmann/improved-aesthetic-predictor")


import_imagereward, import_open_clip = rewards.import_imagereward, rewards.import_open_clip


def require(metric):
    """A scorer whose package is missing says which one to install."""
    module, package = PACKAGES[metric]
    try:
        import_imagereward() if metric == "imagereward" else import_open_clip()
    except ImportError:
        die(f"--metrics {metric} needs the Python package {package}: pip install {package} "
            f"(or leave {metric} out of --metrics)")


def locate_all(args, metrics):
    """Fail fast: find (or fetch) every scorer's files before a single image is generated or the output folder
    is made (check_models has checked the teacher and the generators); every one missing, in one message."""
    found = {}
    hf_model = ["config.json"]  # a transformers CLIPModel folder; its weights are resolved by from_pretrained
    processor = ["preprocessor_config.json", "tokenizer_config.json"]
    small = ["*.json", "*.txt"]

    def imagereward():
        require("imagereward")
        if not args.tiny:  # (--tiny builds its ImageReward in-process, see §6)
            ir = locate(args.imagereward_model, list(rewards.RECORDS["imagereward"].weights["model"].files),
                        "--imagereward_model", "the ImageReward weights")
            found["imagereward"] = os.path.dirname(ir[0])

    def bert():
        if not args.tiny:
            locate("bert-base-uncased", ["vocab.txt"], "(ImageReward's BLIP tokenizer)",
                   "the BERT tokenizer ImageReward's BLIP uses", ["vocab.txt", "tokenizer_config.json", "config.json"])

    def clip():  # transformers models: checked here, then loaded by name, so from_pretrained fetches the weights
        locate(args.clip_model, hf_model + processor, "--clip_model", "OpenAI CLIP ViT-L/14", small)
        found["clip"] = args.clip_model

    def aesthetic():
        found["aesthetic"] = locate(args.aesthetic_model, [AESTHETIC_FILE], "--aesthetic_model",
                                    "the LAION aesthetic predictor v2 head")[0]
        if not args.tiny:  # (--tiny's head is a random stand-in)
            check_aesthetic_file(found["aesthetic"])

    def hps():
        require("hps")
        hps_file = HPS_FILES[args.hps_version]
        other = [f for v, f in HPS_FILES.items() if v != args.hps_version][0]
        if os.path.basename(args.hps_model) == other:
            die(f"--hps_model '{args.hps_model}' is the {other} checkpoint but --hps_version is {args.hps_version}; "
                "the two versions are not comparable, pick one")
        found["hps"] = locate(args.hps_model, [hps_file], "--hps_model", f"the HPS {args.hps_version} checkpoint")[0]

    def pickscore():
        locate(args.pickscore_model, hf_model, "--pickscore_model", "the PickScore v1 model", small)
        found["pickscore"] = args.pickscore_model

    def pickscore_processor():
        locate(args.pickscore_processor, processor, "--pickscore_processor", "PickScore's CLIP-H processor", small)
        found["pickscore_processor"] = args.pickscore_processor

    clip_l = any(METRICS[m].scorer == "clip_l" for m in metrics)
    plumbing.all_or_die(*(check for check, wanted in (
        (imagereward, "imagereward" in metrics), (bert, "imagereward" in metrics), (clip, clip_l),
        (aesthetic, "aesthetic" in metrics), (hps, "hps" in metrics), (pickscore, "pickscore" in metrics),
        (pickscore_processor, "pickscore" in metrics)) if wanted))
    return found


# -----------------------------------------------------------------------------
# 3. Sampling: the same z for every model; one-step generators as dipp, the teacher as its stock pipeline


def image_seed(seed, i, k):
    """Seed of image k of prompt i. It depends on nothing else, so every model gets the same z, and a
    run on the first 1,000 COCO prompts draws the same noise as those prompts in a 30k run."""
    assert i < 2 ** 24 and k < 2 ** 16 and 0 <= seed < 2 ** 23, "seed layout: seed·2⁴⁰ + i·2¹⁶ + k"
    return seed * 2 ** 40 + i * 2 ** 16 + k


def initial_noise(seeds, latent_shape):
    """z ~ N(0, I), drawn on the CPU from each image's own generator, so images depend neither on the batch
    nor on the device. The generators are returned too: a stochastic sampler (e.g. DDPM's ancestral steps)
    continues each image's own stream after z, so it is as reproducible as the deterministic ones."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(latent_shape, generator=g) for g in generators]), generators  # (B, 4, h, w)


def to_unit_images(vae, x0):
    """Latent -> image in [0, 1] (B, 3, H, W): dipp.decode, then what diffusers' postprocess does."""
    return (dipp.decode(vae, x0).clamp(-1, 1) + 1) / 2


@torch.no_grad()
def one_step_images(G, vae, cond, z, ctx):
    """dipp's one-step sample decode(g_θ(z, c)), under the same autocast as `dipp.py --generate`."""
    with ctx:
        return to_unit_images(vae, G(z, cond))


@torch.no_grad()
def teacher_images(pipe, family, vae, cond, null, z, generators, steps, guidance, ctx):
    """N-step CFG sampling by the stock pipeline from the given z, with c and ∅ (negative prompt "", the
    pipelines' default) already encoded. The pipeline stops at the latent and dipp.decode turns it into pixels:
    the same math as the pipeline's own decode + postprocess (the tests check it)."""
    with ctx:
        latents = pipe(num_inference_steps=steps, guidance_scale=guidance, latents=z, generator=generators,
                       output_type="latent", **family.pipeline_text(cond, null)).images  # (B, 4, h, w)
        return to_unit_images(vae, latents)


def synchronize(device):  # honest timings on a GPU: wait for the queued kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_png(path, pixels):
    """An (H, W, 3) uint8 image as a PNG that is complete or absent (plumbing.write_files)."""
    from PIL import Image
    plumbing.write_files({path: lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG")})


def image_key(model, prompts, args, device):
    """What a model's images depend on, beyond (i, k): the model (its files' names, sizes and mtimes, so a
    generator retrained in the same folder is new), the teacher folder's VAE and text encoder(s) that decode and
    condition every row (a generator's images change with them), how it is sampled, the prompts, the seed, the
    precision and the device type. An images/<model>/ folder written under another key is not reused."""
    teacher = args.pretrained_model_name_or_path
    shared = plumbing.files_stamp(*(os.path.join(teacher, p) for p in (
        "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")))
    return {"model": model["source"], "files": model.pop("files"), "sampling": model["name"],
            "teacher": teacher, "teacher_parts": shared,
            "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "seed": args.seed,
            "mixed_precision": args.mixed_precision, "device": device.type}


PREVIOUS = ".previous"  # images/<model>.previous/: the images the reports on disk describe, until replaced


def reusable_images(folder, key):
    """Resume: the PNGs already in folder when it was written under the same key (every PNG is complete or
    absent: save_png), else none. Images of another model or setting are never mixed with these: they are moved
    aside to folder.previous (the reports still on disk describe them) and deleted only once this run's reports
    have replaced those (write_reports). Returns the set of reusable file names."""
    key_file, text = os.path.join(folder, "key.json"), json.dumps(key, sort_keys=True)
    if os.path.isdir(folder) and not (os.path.isfile(key_file) and open(key_file, "rb").read() == text.encode()):
        why = "its key.json is missing or damaged" if not os.path.isfile(key_file) or not valid_json(key_file) \
            else "they were drawn for another model or other settings"
        print(f"{folder}: drawing the images again ({why})")
        if os.path.isdir(folder + PREVIOUS):  # (a run stopped before its reports: this folder is its own partial)
            shutil.rmtree(folder)
        else:
            os.replace(folder, folder + PREVIOUS)
    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(key_file):
        plumbing.write_files({key_file: text_file(text)})
    return set(os.listdir(folder))


def valid_json(path):
    try:
        json.load(open(path, encoding="utf-8"))
        return True
    except ValueError:  # (JSONDecodeError, UnicodeDecodeError)
        return False


def generate(model, sample, prompts, args, latent_shape, device):
    """Sample K images per prompt with `sample(prompts, z, generators) -> [0, 1] images`, write them as PNGs (8-bit,
    as diffusers' numpy_to_pil rounds) and return one record per image. Records are prompt-major. Images that an
    earlier run wrote for the same model and settings are kept, not drawn again (a re-run resumes)."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm
    K, folder = args.images_per_prompt, os.path.join(args.output_dir, "images", model["slug"])
    model["key"] = image_key(model, prompts, args, device)
    done = reusable_images(folder, model["key"])
    name = lambda i, k: f"{i:05d}_{k:02d}.png"
    records = [{"prompt_index": i, "image_index": k, "seed": image_seed(args.seed, i, k),
                "image": os.path.join("images", model["slug"], name(i, k))} for i in range(len(prompts))
               for k in range(K)]
    todo = [(i, k) for i in range(len(prompts)) for k in range(K) if name(i, k) not in done]
    if len(todo) < len(records):
        print(f"{model['slug']}: {len(records) - len(todo)} of {len(records)} images kept from an earlier run")
    seconds, preview = 0.0, {}
    for start in tqdm(range(0, len(todo), args.batch_size), desc=f"generate {model['slug']}", dynamic_ncols=True):
        batch = todo[start:start + args.batch_size]
        seeds = [image_seed(args.seed, i, k) for i, k in batch]
        z, generators = initial_noise(seeds, latent_shape)
        synchronize(device)
        t0 = time.perf_counter()
        images = sample([prompts[i] for i, _ in batch], z.to(device), generators)
        synchronize(device)
        seconds += time.perf_counter() - t0
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for (i, k), pix in zip(batch, pixels):
            save_png(os.path.join(folder, name(i, k)), pix)
            if k == 0 and i < 8:
                preview[i] = pix  # (H, W, 3) uint8, for the comparison grid
    for i in range(min(8, len(prompts))):  # the grid's images that were kept, read back
        if i not in preview:
            preview[i] = np.array(Image.open(os.path.join(folder, name(i, 0))).convert("RGB"))
    speed = len(todo) / seconds if todo else None  # (None: nothing was drawn in this run)
    model.update(records=records, preview=preview, generation_images_per_s=speed)
    return model


def model_files(path):
    """plumbing.files_stamp of a local model (a file, or a folder and its subfolders); [] for a hub id."""
    if os.path.isfile(path):
        return [(path, os.path.getsize(path), os.path.getmtime(path))]
    subs = sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(path) else []
    return plumbing.files_stamp(path, *subs)


def generate_all(args, family, generators, prompts, device, ctx, dtype):
    """The prompts are encoded once (PixArt-α's T5, SDXL's two CLIPs, encode them and "" into
    output_dir/text_embeddings and are freed before any denoiser is built), then the teacher's row (if asked) and
    each generator's, one at a time."""
    name = args.pretrained_model_name_or_path
    text, _ = families.text_conditioning(name, family, families.load_tokenizer(name, family),
                                         [prompts, [family.null_prompt]], device, dtype,
                                         os.path.join(args.output_dir, "text_embeddings"))
    null = families.null_condition(family, text)  # ∅ as the stock pipeline builds it: "" encoded (SDXL: zeroed)
    teacher = dipp.load_teacher(name, device, dtype, text_encoder=False)
    net_dtype = next(teacher.net.parameters()).dtype
    latent_shape = (teacher.net.config.in_channels, teacher.net.config.sample_size, teacher.net.config.sample_size)
    models = []
    if args.teacher_steps:
        pipe = families.stock_pipeline(name, teacher)
        title = f"teacher: {args.teacher_steps} steps, CFG {args.teacher_guidance:g} ({type(pipe.scheduler).__name__})"

        def sample(p, z, gens):  # z in the net's dtype, as the pipeline draws it when loaded in that dtype
            return teacher_images(pipe, family, teacher.vae, text(p), null, z.to(net_dtype), gens, args.teacher_steps,
                                  args.teacher_guidance, ctx)
        model = {"slug": "teacher", "name": title, "kind": "teacher", "source": name, "files": model_files(name)}
        models.append(generate(model, sample, prompts, args, latent_shape, device))
        del pipe
    slugs = {"teacher"}
    for folder, cfg in generators:
        G = dipp.build_generator(cfg, teacher.net, family, teacher.schedule, device).eval().requires_grad_(False)
        parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)[-2:]  # runs/a/generator -> a_generator
        slug = re.sub(r"[^\w.-]+", "_", "_".join(parts))
        while slug in slugs:
            slug += "_"
        slugs.add(slug)

        def sample(p, z, gens, G=G):  # one step: no sampler noise, gens unused
            return one_step_images(G, teacher.vae, text(p), z, ctx)
        model = {"slug": slug, "name": f"{folder} (one step, t*={G.t_star})", "kind": "generator", "source": folder,
                 "generator_timestep": G.t_star, "files": model_files(folder)}
        models.append(generate(model, sample, prompts, args, latent_shape, device))
        del G, sample  # free this generator before the next one is loaded
    return models

# -----------------------------------------------------------------------------
# 4. Scorers. Each maps (PIL images, prompts) -> {metric: (B,) tensor}: rewards.py's models (the same ones dipp
#    trains against), each through its evaluation path `score_pil` (the official code's own preprocessing of the
#    PIL image), on the published scale (rewards.RECORDS[name].published). All scores are fp32 on the CPU. Each
#    scorer runs in the precision of its official code, whatever --mixed_precision (which is for the models
#    evaluated): its weights in fp32, and HPS under fp16 autocast on CUDA, as HPSv2's img_score.py.

CLIP_MEAN, CLIP_STD = rewards.CLIP_MEAN, rewards.CLIP_STD  # OpenAI CLIP's, used by every scorer here
FP32 = torch.float32


class RewardScorer:
    """One reward of rewards.py as one metric: {metric: published(fn.score_pil(images, prompts))}."""

    def __init__(self, metric, name, reward):
        self.metric, self.name, self.reward = metric, name, reward

    def __call__(self, images, prompts):
        return {self.metric: rewards.RECORDS[self.name].published(self.reward.score_pil(images, prompts))}


def ImageRewardScorer(reward):
    """ImageReward's `score()` batched (rewards.ImageRewardFn.score_pil)."""
    return RewardScorer("imagereward", "imagereward", reward)


def load_imagereward(folder, device):
    """The very model dipp trains against (ImageReward.pt + med_config.json), in fp32."""
    return ImageRewardScorer(rewards.load_one("imagereward", folder or "", device, FP32, pil=True))


class ClipLScorer:
    """OpenAI CLIP ViT-L/14 (transformers), one pass for four metrics: the normalised image embedding e
    (diversity, fd_teacher), clip (rewards.RECORDS['clip'].published: 100 · max(cos, 0)) and aesthetic (the
    LAION head on e; only with the real ViT-L/14 is this meaningful). clip: a rewards.ClipRewardFn with its
    PIL processor; aesthetic: a rewards.AestheticFn on the same CLIP, or None."""

    def __init__(self, clip, aesthetic=None):
        self.clip, self.aesthetic = clip, aesthetic

    @torch.no_grad()
    def __call__(self, images, prompts):
        e = self.clip.embed_pil(images)  # (B, 768)
        out = {"embedding": e, "clip": rewards.RECORDS["clip"].published(self.clip.score_embedding(e, prompts))}
        if self.aesthetic is not None:
            out["aesthetic"] = self.aesthetic.score_embedding(e)
        return out


def load_clip_l(folder, aesthetic_path, device):
    """CLIP ViT-L/14 in fp32 with its slow (PIL) image processor; the aesthetic head if asked (its file was
    checked against the official sha256 by locate_all)."""
    clip = rewards.load_one("clip", {"model": folder}, device, FP32, pil=True)
    if aesthetic_path and clip.model.config.projection_dim != 768:
        die(f"--clip_model '{folder}' embeds in {clip.model.config.projection_dim}-d; the aesthetic head needs OpenAI "
            "CLIP ViT-L/14 (768-d), any other CLIP gives meaningless numbers")
    head = rewards.load_aesthetic_head(aesthetic_path) if aesthetic_path else None
    return ClipLScorer(clip, rewards.AestheticFn(clip, head) if head is not None else None)


def load_hps(path, arch, device, resize="legacy", version="v2.0"):
    """HPS (rewards.RECORDS['hps20'] / ['hps21']): open_clip's ViT-H-14 with the checkpoint loaded strictly,
    fp32 weights, scored under fp16 autocast on CUDA as HPSv2's precision='amp'; published as 100 · cos."""
    name = {"v2.0": "hps20", "v2.1": "hps21"}[version]
    return RewardScorer("hps", name, rewards.load_one(name, {"model": path}, device, FP32, pil=True, resize=resize,
                                                      arch=arch))


def load_pickscore(model_folder, processor_folder, device):
    """PickScore v1 (rewards.RECORDS['pickscore']) with the CLIP-H processor, fp32."""
    return RewardScorer("pickscore", "pickscore", rewards.load_one(
        "pickscore", {"model": model_folder, "processor": processor_folder}, device, FP32, pil=True))


def score_images(scorer, model, prompts, args):
    """Run one scorer over one model's PNGs; returns {key: tensor over images, in record order}."""
    from PIL import Image
    from tqdm import tqdm
    records, out = model["records"], {}
    for start in tqdm(range(0, len(records), args.batch_size), desc=f"  {model['slug']}", dynamic_ncols=True,
                      leave=False):
        batch = records[start:start + args.batch_size]
        images = [Image.open(os.path.join(args.output_dir, r["image"])).convert("RGB") for r in batch]
        for key, value in scorer(images, [prompts[r["prompt_index"]] for r in batch]).items():
            out.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in out.items()}


def score_all(models, metrics, weights, prompts, args, device, tiny_scorers=None):
    """One scorer in memory at a time; each runs over every model's images. Returns the per-image values
    (model slug -> key -> tensor) and the scoring speed of each scorer (images/s, PNG loading included).
    No precision is passed: each loader builds its scorer as its official code runs it."""
    loaders = {
        "imagereward": lambda: load_imagereward(weights.get("imagereward"), device),
        "clip_l": lambda: load_clip_l(weights["clip"], weights.get("aesthetic"), device),
        "hps": lambda: load_hps(weights["hps"], weights.get("hps_arch", rewards.HPS_ARCH), device, args.hps_resize,
                                args.hps_version),
        "pickscore": lambda: load_pickscore(weights["pickscore"], weights["pickscore_processor"], device),
    }
    values, speed = {m["slug"]: {} for m in models}, {}
    for name, load in loaders.items():
        serves = [m for m in metrics if METRICS[m].scorer == name]
        if not serves:
            continue
        # Resume: a model's scores from an earlier run are kept when its images and this scorer are the same
        key = {"scorer": name, "weights": {k: weights.get(k) for k in SCORER_WEIGHTS[name]},
               "tiny": args.tiny, "hps": [args.hps_version, args.hps_resize] if name == "hps" else None}
        cached = {m["slug"]: cached_scores(args.output_dir, m, key) for m in models}
        todo = [m for m in models if cached[m["slug"]] is None]
        scorer = ((tiny_scorers or {}).get(name) or load()) if todo else None
        print(f"scoring with {name} ({', '.join(serves)})" + (f"; kept for {len(models) - len(todo)} model(s) from "
                                                              "an earlier run" if len(todo) < len(models) else ""))
        synchronize(device)
        t0, n = time.perf_counter(), 0
        for model in models:
            if model in todo:
                cached[model["slug"]] = score_images(scorer, model, prompts, args)
                n += len(model["records"])
                save_scores(args.output_dir, model, key, cached[model["slug"]])
            values[model["slug"]].update(cached[model["slug"]])
        synchronize(device)
        if n:
            speed[name] = n / max(time.perf_counter() - t0, 1e-9)
        del scorer
    return values, speed


SCORER_WEIGHTS = {"imagereward": ("imagereward",), "clip_l": ("clip", "aesthetic"), "hps": ("hps", "hps_arch"),
                  "pickscore": ("pickscore", "pickscore_processor")}  # the `weights` entries each scorer loads


def scores_path(out, model, key):
    return os.path.join(out, "images", model["slug"], f"scores_{key['scorer']}.pt")


def cached_scores(out, model, key):
    """{key: tensor over images} one scorer wrote for this model's images (same images/<model>/key.json, same
    scorer and weights), or None."""
    path = scores_path(out, model, key)
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, weights_only=True)
        same = saved["key"] == json.dumps([model["key"], key], sort_keys=True)
    except Exception as e:  # a damaged file (truncated, overwritten): torch raises several kinds of error
        print(f"{path} is damaged ({type(e).__name__}: {str(e).strip()[:80]}); scoring again")
        return None
    whole = all(len(v) == len(model["records"]) for v in saved["values"].values())  # (--images_per_prompt changed)
    return saved["values"] if same and whole else None


def save_scores(out, model, key, values):
    """Saved beside the images (atomically), so a changed model, which empties images/<model>/, drops them too."""
    saved = {"key": json.dumps([model["key"], key], sort_keys=True), "values": values}
    plumbing.write_files({scores_path(out, model, key): lambda tmp: torch.save(saved, tmp)})

# -----------------------------------------------------------------------------
# 5. Set metrics: diversity within a prompt (rewards.pairwise_diversity), Fréchet distance to the teacher


def gaussian_stats(features):
    """Mean and unbiased covariance (as FID implementations use) of features (n, D), in float64."""
    x = features.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / max(x.shape[0] - 1, 1)


def frechet_distance(mu1, cov1, mu2, cov2):
    """Fréchet (2-Wasserstein²) distance between N(μ1, Σ1) and N(μ2, Σ2), the formula of FID:
        FD = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)
    Tr (Σ1Σ2)^½ = Σ_i √λ_i with λ_i the eigenvalues of Σ1^½ Σ2 Σ1^½ (symmetric PSD, same spectrum as
    Σ1Σ2), so two float64 eigendecompositions replace scipy's sqrtm and its complex round-off."""
    w, V = torch.linalg.eigh(cov1)
    sqrt1 = (V * w.clamp_min(0).sqrt()) @ V.T  # Σ1^½
    M = sqrt1 @ cov2 @ sqrt1
    tr_covmean = torch.linalg.eigvalsh((M + M.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * tr_covmean

# -----------------------------------------------------------------------------
# 6. (optional) --tiny: random-weight stand-ins of the real architectures, built in seconds


TINY_HPS_ARCH = rewards.TINY_HPS_ARCH  # an open_clip model config registered at run time (same CLIP class)
tiny_imagereward, tiny_imagereward_classes = rewards.tiny_imagereward, rewards.tiny_imagereward_classes


def build_tiny(folder, hps_version="v2.0", seed=0):
    """Writes, under `folder`: dipp's tiny SD (random_weights.build_random, identical to `dipp.py --tiny`'s),
    the untrained one-step generator (the teacher UNet at t* = 999, dipp's initialisation) and small
    scorers in their real file formats (rewards.build_tiny), which then load through the real loaders. ImageReward
    is built in-process (tiny_imagereward). Returns (SD folder, generator folder, weights)."""
    from diffusers import UNet2DConditionModel
    from random_weights import build_random
    sd, _ = build_random(folder, "tiny", seed)
    generator = os.path.join(folder, "generator")
    at = rewards.build_tiny(os.path.join(folder, "scorers"), os.path.join(sd, "tokenizer"), seed)
    weights = dict(clip_model=at["clip"]["model"], aesthetic_model=at["aesthetic"]["head"],
                   hps_model=at[{"v2.0": "hps20", "v2.1": "hps21"}[hps_version]]["model"],
                   pickscore_model=at["pickscore"]["model"], pickscore_processor=at["pickscore"]["processor"])
    stamp, marker = json.dumps({"seed": seed}), os.path.join(folder, "tiny_generator.json")
    if not (os.path.isfile(marker) and open(marker).read() == stamp):  # (else kept: a re-run resumes, same files)
        UNet2DConditionModel.from_pretrained(sd, subfolder="unet").save_pretrained(generator)
        plumbing.write_generator_record(generator, 999)
        open(marker, "w").write(stamp)
    return sd, generator, weights

# -----------------------------------------------------------------------------
# 7. Statistics and reports


@functools.lru_cache(maxsize=None)
def t_quantile(dof, p=0.975):
    """t_{p, ν}: the p-quantile of Student's t with ν = dof (an integer) degrees of freedom, to double precision.
    With θ = atan(t / √ν), P(|T| ≤ t) has a closed form [Abramowitz & Stegun 26.7.3-4]:
        ν odd:  (2/π) (θ + sin θ (cos θ + (2/3) cos³θ + … + (2·4···(ν−3))/(1·3···(ν−2)) cos^(ν−2) θ))
        ν even: sin θ (1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + … + (1·3···(ν−3))/(2·4···(ν−2)) cos^(ν−2) θ)
    It rises with θ from 0 to 1 on [0, π/2], so bisection finds the θ where it equals 2p − 1."""
    odd = dof % 2

    def central(theta):  # P(|T| ≤ √ν tan θ)
        c2, term, total = math.cos(theta) ** 2, math.cos(theta) if odd else 1.0, 0.0
        for k in range((dof - 1) // 2 if odd else dof // 2):
            total += term
            term *= c2 * ((2 * k + 2) / (2 * k + 3) if odd else (2 * k + 1) / (2 * k + 2))
        return 2 / math.pi * (theta + math.sin(theta) * total) if odd else math.sin(theta) * total

    lo, hi = 0.0, math.pi / 2
    for _ in range(64):  # the interval halves each time: far below double precision at the end
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < 2 * p - 1 else (lo, mid)
    return math.sqrt(dof) * math.tan((lo + hi) / 2)


def mean_ci(per_prompt):
    """Mean and the half-width of its 95 % Student-t confidence interval over per-prompt values,
    t_{0.975, P−1} · s / √P (the K images of a prompt are not independent, so the prompt is the unit; P is small
    enough, 8 by default, that 1.96 would make the interval too narrow: t_{0.975, 7} = 2.365)."""
    v, P = per_prompt.double(), len(per_prompt)
    if P < 2:  # one prompt: no spread to estimate
        return {"mean": v.mean().item(), "ci95": None, "n_prompts": P}
    t = t_quantile(P - 1)
    return {"mean": v.mean().item(), "ci95": t * v.std(unbiased=True).item() / math.sqrt(P), "n_prompts": P,
            "t_quantile": t}


def header(metric, args):
    """Column titles carry the convention, so a number is never read on the wrong scale."""
    return METRICS[metric].header.format(hps_version=args.hps_version, images_per_prompt=args.images_per_prompt)


def conventions(metrics, args):
    """table.md's notes: each column's convention, the interval, the scorers' precision."""
    lines = [f"- {header(m, args)}: " + METRICS[m].convention.format(
        hps_version=args.hps_version, hps_file=HPS_FILES[args.hps_version], hps_resize=HPS_RESIZE[args.hps_resize])
        for m in metrics]
    lines += ["- ± is the 95 % Student-t confidence interval of the mean over the P per-prompt means, "
              "t_{0.975, P−1} · s / √P.",
              "- Every scorer ran in its official code's precision, whatever --mixed_precision (which applies to "
              "the models evaluated only): fp32 weights; HPS under fp16 autocast on CUDA (HPSv2's img_score.py)."]
    if "hps" in metrics:
        lines += [f"- HPS resize: --hps_resize {args.hps_resize} ({HPS_RESIZE[args.hps_resize]})."]
    return "\n".join(lines) + "\n"


def summarise(models, values, metrics, args):
    """Per metric and model: mean and 95 % CI over prompts (set metrics included)."""
    P, K = len(models[0]["records"]) // args.images_per_prompt, args.images_per_prompt
    teacher = next((m for m in models if m["kind"] == "teacher"), None)
    for model in models:
        v, stats = values[model["slug"]], {}
        for metric in (m for m in metrics if METRICS[m].per_image):
            stats[metric] = mean_ci(v[metric].view(P, K).mean(1))
        if "diversity" in metrics:
            per_prompt = v["embedding"].view(P, K, -1)  # (P, K, 768)
            model["diversity_per_prompt"] = torch.stack([rewards.pairwise_diversity(e) for e in per_prompt])  # (P,)
            stats["diversity"] = mean_ci(model["diversity_per_prompt"])
        if "fd_teacher" in metrics and teacher is not None and model is not teacher:
            reference = gaussian_stats(values["teacher"]["embedding"])
            fd = frechet_distance(*gaussian_stats(v["embedding"]), *reference)
            stats["fd_teacher"] = {"mean": fd.item(), "ci95": None, "n_images": len(v["embedding"])}
        model["stats"] = stats


def text_file(content):
    """A writer for plumbing.write_files; closing inside `with` lets a failed final flush raise too."""
    def write(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
    return write


def write_reports(models, values, metrics, prompts, args, command, speed):
    """prompts.txt, scores.jsonl, summary.json, table.md and grid.png, all or none of them (plumbing.write_files)."""
    out = args.output_dir

    def scores(path):  # one line per image and metric (diversity: per prompt)
        with open(path, "w") as f:
            for model in models:
                for metric in (m for m in metrics if METRICS[m].per_image):
                    for r, value in zip(model["records"], values[model["slug"]][metric].tolist()):
                        f.write(json.dumps({"model": model["slug"], "metric": metric, "value": value, **r}) + "\n")
                for i, value in enumerate(model.get("diversity_per_prompt", torch.empty(0)).tolist()):
                    line = {"model": model["slug"], "metric": "diversity", "value": value, "prompt_index": i}
                    f.write(json.dumps(line) + "\n")
    summary = {"command": command, "config": vars(args), "prompts": len(prompts),
               "images_per_prompt": args.images_per_prompt,
               "seed": args.seed, "hps_version": args.hps_version, "hps_resize": args.hps_resize,
               "metrics": list(metrics), "headers": {m: header(m, args) for m in metrics},
               "interval": "95 % Student-t over per-prompt means: mean ± t_{0.975, P-1} · s / √P",
               "scoring_images_per_s": {k: round(v, 3) for k, v in speed.items()},
               "models": {m["slug"]: {"name": m["name"], "kind": m["kind"], "source": m["source"],
                                      "generation_images_per_s": m["generation_images_per_s"] and
                                      round(m["generation_images_per_s"], 3),
                                      "metrics": m["stats"]} for m in models}}

    def cell(s):
        if s is None:
            return "—"
        return f"{s['mean']:.4g}" if s["ci95"] is None else f"{s['mean']:.4g} ± {s['ci95']:.2g}"

    lines = [f"# Evaluation: {len(prompts)} prompts × {args.images_per_prompt} images, seed {args.seed}", "",
             f"Command: `{command}`", "",
             "| model | " + " | ".join(header(m, args) for m in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {m['name']} | " + " | ".join(cell(m["stats"].get(k)) for k in metrics) + " |" for m in models]
    if args.tiny:
        lines += ["", "(--tiny: every scorer is a random-weight stand-in, and so are the teacher and generator unless "
                      "given; the values mean nothing, the layout and the code path are the point.)"]
    lines += ["", "Conventions:", conventions(metrics, args),
              "Speed on this machine (images/s): generation " +
              ", ".join(f"{m['slug']} " + (f"{m['generation_images_per_s']:.3g}" if m["generation_images_per_s"]
                                          else "(kept from an earlier run)") for m in models) +
              "; scoring " + (", ".join(f"{k} {v:.3g}" for k, v in speed.items()) or "(kept from an earlier run)") + "."]
    table = "\n".join(lines) + "\n"
    path = lambda name: os.path.join(out, name)
    plumbing.write_files({path("prompts.txt"): text_file("\n".join(prompts) + "\n"), path("scores.jsonl"): scores,
                          path("summary.json"): text_file(json.dumps(summary, indent=1)),
                          path("table.md"): text_file(table),
                          path("grid.png"): lambda tmp: save_comparison_grid(models, prompts, tmp)})
    return table


def save_comparison_grid(models, prompts, path, tile=128):
    """One row per model, one column per prompt (its first image, k = 0): same prompts, same seeds."""
    from PIL import Image, ImageDraw
    columns = sorted(models[0]["preview"])
    label_w, head_h = 240, 30
    grid = Image.new("RGB", (label_w + tile * len(columns), head_h + tile * len(models)), "white")
    draw = ImageDraw.Draw(grid)
    for c, i in enumerate(columns):
        draw.text((label_w + c * tile + 2, 2), plumbing.wrap_caption(prompts[i], 22, 2), fill="black")
    for r, model in enumerate(models):
        draw.text((4, head_h + r * tile + 4), plumbing.wrap_caption(model["name"], 34, 8), fill="black")
        for c, i in enumerate(columns):
            pic = Image.fromarray(model["preview"][i]).resize((tile, tile), Image.NEAREST)
            grid.paste(pic, (label_w + c * tile, head_h + r * tile))
    grid.save(path, format="PNG")

# -----------------------------------------------------------------------------
# 8. main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with plumbing.as_program("evaluate"), plumbing.stopped_in_one_line(  # (SIGTERM too: one line, exit 143)
            "run the same command again: the images and scores already written are kept"):
        args = parse_args(argv)
        metrics = check_args(args)
        device = plumbing.pick_device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            die(f"--device {args.device}: no CUDA GPU is visible; use --device cpu")
        threads = torch.get_num_threads()
        if args.tiny and device.type == "cpu":
            # Tiny models are far too small for intra-op threads: on a shared CPU their OpenMP workers mostly
            # spin (the --tiny run took 9 s with 1 thread, 29-46 s with 2, on this project's busy 2-core machine)
            torch.set_num_threads(1)
        try:
            return run(args, metrics, device, "python evaluate.py " + shlex.join(argv))
        finally:
            torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)


def pipeline_guidance(family):
    """The family's stock pipeline's own default CFG scale: 7.5 (SD-1.x), 4.5 (PixArt-α), 5.0 (SDXL)."""
    import inspect
    import diffusers
    return inspect.signature(getattr(diffusers, family.pipeline).__call__).parameters["guidance_scale"].default


def wrote_an_image(folder):
    images = os.path.join(folder, "images")
    return os.path.isdir(images) and any(os.listdir(os.path.join(images, m)) for m in os.listdir(images))


def run(args, metrics, device, command):
    """The evaluation, holding --output_dir's lock from the moment it first writes there (plumbing.folder_lock):
    a second evaluate.py into the same folder stops in one line instead of mixing its images with these."""
    with contextlib.ExitStack() as held:
        return evaluate(args, metrics, device, command,
                        lock=lambda: held.enter_context(plumbing.folder_lock(args.output_dir)))


def evaluate(args, metrics, device, command, lock):
    ctx, dtype = plumbing.precision(args.mixed_precision, device)
    tiny_scorers, hps_arch = {}, "ViT-H-14"
    if args.tiny:  # random stand-ins for everything, loaded by the same code as the real weights
        lock()
        sd, generator, tiny_weights = build_tiny(os.path.join(args.output_dir, "tiny"), args.hps_version, args.seed)
        if not args.pretrained_model_name_or_path:  # (a teacher given, e.g. a tiny PixArt-α, keeps its generators)
            args.pretrained_model_name_or_path, args.generator = sd, args.generator or [generator]
        vars(args).update(tiny_weights)
        hps_arch = TINY_HPS_ARCH
    args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or dipp.Config.pretrained_model_name_or_path
    # Everything is checked before any model is loaded or any image drawn: the prompts, models, scorers' files
    # (all that is missing in one message), then the output folder
    prompts, (family, generators), weights = plumbing.all_or_die(
        lambda: promptsets.load_prompts(args.prompts, promptsets.BUILTIN_PROMPTS, "--prompts"),
        lambda: check_models(args), lambda: locate_all(args, metrics))
    prompts = prompts[:args.max_prompts] if args.max_prompts else prompts
    if len(prompts) >= 2 ** 24:
        die(f"{len(prompts)} prompts is more than image_seed's layout allows (2^24); use --max_prompts")
    if args.teacher_guidance is None:
        args.teacher_guidance = pipeline_guidance(family)
    weights = dict(weights, hps_arch=hps_arch)
    if not args.tiny:
        lock()
    if args.tiny and "imagereward" in metrics:
        tiny_scorers["imagereward"] = ImageRewardScorer(rewards.ImageRewardFn(plumbing.freeze(
            tiny_imagereward(os.path.join(args.output_dir, "tiny", "imagereward"), device), device, torch.float32)))
    torch.manual_seed(args.seed)  # every image has its own generator; this pins anything else that is random
    print(f"evaluating {len(prompts)} prompts × {args.images_per_prompt} images on {device}; "
          f"metrics: {', '.join(metrics)}")
    with plumbing.tidy_if_stopped_early(args.output_dir, progress=wrote_an_image,
                                        run_files="images|text_embeddings"):
        models = generate_all(args, family, generators, prompts, device, ctx, dtype)  # (images/<model>/: at its 1st)
    values, speed = score_all(models, metrics, weights, prompts, args, device, tiny_scorers)
    summarise(models, values, metrics, args)
    table = write_reports(models, values, metrics, prompts, args, command, speed)  # (the old ones until here)
    images = os.path.join(args.output_dir, "images")
    for name in os.listdir(images):  # the images that the replaced reports described
        if name.endswith(PREVIOUS):
            shutil.rmtree(os.path.join(images, name))
    print(table + f"wrote {args.output_dir}/: images/, scores.jsonl, summary.json, table.md, grid.png")
    return {"models": models, "values": values, "speed": speed, "metrics": metrics}


if __name__ == "__main__":
    main()
