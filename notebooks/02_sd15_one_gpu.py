# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — DI++ on Stable Diffusion 1.5 with one GPU
#
# The same `dipp.py` code as the toy, now on SD1.5: a frozen CFG teacher UNet, a one-step generator
# UNet, a fake-score UNet, the VAE decoder and ImageReward. We (1) load everything, (2) measure what
# each memory switch costs, (3) run a short alignment and compare before/after images and rewards
# on fixed prompts and noise, (4) save, reload and generate in one step.
#
# Needs: a CUDA GPU, the SD1.5 weights (`huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5`)
# and ImageReward (`huggingface-cli download THUDM/ImageReward`). With `DIPP_TINY=1` every cell runs
# on tiny random models on a CPU instead (what CI does), through the very same code path.

# %%
import json
import os
import statistics
import sys

import torch

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)
import dipp  # noqa: E402
import promptsets  # noqa: E402
import plumbing  # noqa: E402
import random_weights  # noqa: E402  (tiny random models for DIPP_TINY=1)

TINY = os.environ.get("DIPP_TINY") == "1"
OUT = os.path.join(ROOT, "runs", "notebook02" + ("_tiny" if TINY else ""))
MODEL = ["--tiny"] if TINY else ["--pretrained_model_name_or_path", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                 "--reward", "imagereward"]
# The paper aligns a generator that is already one-step: on a GPU we start from DMD2's released one-step
# SD1.5 UNet (a bare weight file; same convention as dipp: z at t* = 999, ε-prediction). Tiny runs start
# from the teacher read out at t* = 999.
DMD2 = ("model/sdv1.5/laion6.25_sd_baseline_8node_guidance1.75_lr5e-7_seed10_dfake10_diffusion1000_gan1e-3_resume"
        "_fid8.35_checkpoint_model_041000/pytorch_model.bin")
if not TINY:
    from huggingface_hub import hf_hub_download
    GENERATOR_INIT = ["--generator_init", hf_hub_download("tianweiy/DMD2", DMD2)]  # ~3.4 GB, CC BY-NC 4.0
else:
    GENERATOR_INIT = []
GPU = torch.cuda.is_available()
print(f"tiny models: {TINY} | GPU: {torch.cuda.get_device_name() if GPU else 'none'}")

# %% [markdown]
# ## 1. The components
# `dipp.load_teacher` loads the family (families.py), teacher UNet, VAE, text encoder, tokenizer and noise
# schedule from any diffusers SD-1.x folder or hub id; frozen nets are stored in the low-precision dtype.

# %%
if TINY:
    sd_path, _ = random_weights.build_random(os.path.join(OUT, "tiny"), "tiny")
else:
    sd_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"
device = plumbing.pick_device("auto")
family, teacher, vae, text_encoder, tokenizer, schedule = dipp.load_teacher(sd_path, device, torch.float32)
count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
print(f"UNet {count(teacher):.1f}M params | VAE {count(vae):.1f}M | text encoder {count(text_encoder):.1f}M")
print(f"generator timestep t* = 999: α = {schedule.table[0, 999]:.4f}, "
      f"so x0 = (z − σ ε̂)/α amplifies ε errors {1 / schedule.table[0, 999]:.1f}×")
del teacher, vae, text_encoder

# %% [markdown]
# ## 2. What each memory switch costs
# Four short runs of the real training step with `--benchmark` (`python dipp.py ... --benchmark
# --max_train_steps 3`): seconds per iteration after the warm-up and, on a GPU, the training loop's peak
# memory, from the `BENCHMARK` result `dipp.main` returns.

# %%
def measure(name, flags, batch=1):
    """One `python dipp.py ... --benchmark` run: the real training step, timed after its 2 warm-up
    iterations, with the training loop's peak GPU memory (CPU runs report process RSS, not shown)."""
    r = dipp.main(MODEL + flags + ["--benchmark", "--max_train_steps", "3", "--train_batch_size", str(batch),
                                   "--output_dir", os.path.join(OUT, "memory")])["benchmark"]
    peak = f"{r['peak_memory_gib']:.1f} GiB" if r["memory_kind"] == "cuda_allocated" else "n/a on CPU"
    return {"setup": name, "s/iteration": round(batch / r["images_per_s"], 3), "peak GiB": peak}


setups = {"fp32, no checkpointing": [],
          "bf16 frozen nets + autocast": ["--mixed_precision", "bf16"],
          "bf16 + gradient checkpointing": ["--mixed_precision", "bf16", "--gradient_checkpointing"],
          "bf16 + checkpointing + LoRA r=64": ["--mixed_precision", "bf16", "--gradient_checkpointing",
                                               "--lora_rank", "64"]}
table = [measure(k, v) for k, v in setups.items()]
print(f"measured here ({torch.cuda.get_device_name() if GPU else 'CPU'}{', tiny models' if TINY else ''}):")
for row in table:
    print(f"  {row['setup']:<36} {row['s/iteration']:>8} s/it   peak memory {row['peak GiB']}")

# %% [markdown]
# Reference figures, **not measured by this notebook**: from the project's `shared/ECOSYSTEM.md`,
# one H100 80GB, torch 2.11, diffusers 0.42, random weights with SD1.5 shapes, one generator + one
# fake-score update, bf16 autocast with fp32 master weights:
#
# | setup | batch | s/iteration | images/s | peak GiB |
# |---|---|---|---|---|
# | full fine-tune, no checkpointing | 1 / 4 / 8 | 0.52 / 0.65 / 0.78 | 1.9 / 6.2 / 10.2 | 31.3 / 49.4 / 73.5 |
# | full fine-tune, gradient checkpointing | 1 / 4 / 8 | 1.03 / 1.13 / 1.23 | 1.0 / 3.5 / 6.5 | 28.5 / 33.5 / 44.8 |
# | LoRA r=64 on one shared bf16 base, checkpointing | 1 / 4 / 8 | 1.89 / 1.90 / 2.19 | 0.5 / 2.1 / 3.7 | 6.5 / 15.1 / 26.6 |
#
# Two fp32-Adam UNets of 860M parameters need ~27.5 GB for weights, gradients and optimiser states
# alone, so full fine-tuning does not fit a 24 GB card.
#
# Two switches buy speed rather than memory, and neither changes the objective:
# `--reuse_generator_sample` trains the fake score on the generator update's own sample (DMD2), one
# generator forward less per iteration; `--compile default` runs `torch.compile` on all five
# networks, at the price of minutes of compiling in the first iterations. A third,
# `--reward_decoder tiny`, lets the reward score TAESD's decoding instead of the full VAE's: faster,
# but the reward's gradient then passes an approximate decoder. This notebook does not time them
# (compiling would dominate a 3-step run); `bash bench/gpu.sh speed OUT` does.

# %% [markdown]
# ## 3. A short alignment run, before and after
# `dipp.main` runs Alg. 1 and returns the networks. The sample grids `samples_0000.png` (the
# generator at initialisation) and the final one come from the same fixed prompts and noise.

# %%
steps = 4 if TINY else 500  # (tiny: a few steps, to run the cell in seconds; the images are noise anyway)
run_dir = os.path.join(OUT, "align")
nets = dipp.main(MODEL + GENERATOR_INIT + ["--max_train_steps", str(steps), "--output_dir", run_dir, "--validation_steps", str(steps), "--overwrite_output_dir",
                          "--checkpointing_steps", str(steps), "--reward_scale", "1", "--learning_rate", "1e-6" if not TINY else "1e-3"]
                 + ([] if TINY else ["--mixed_precision", "bf16", "--gradient_checkpointing", "--train_batch_size", "4"]))

# %%
from IPython.display import Image, display  # noqa: E402

display(Image(os.path.join(run_dir, "samples_0000.png")))
display(Image(os.path.join(run_dir, f"samples_{steps:04d}.png")))
display(Image(os.path.join(run_dir, "curves.png")))  # losses, training and held-out reward, the two gradient sizes
log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
val = [(r["step"], round(r["val_reward"], 4)) for r in log if "val_reward" in r]
print("held-out reward (step, mean over the validation prompts, fixed noise):", val)
print("median grad_ratio (reward pull / IKL pull at x0):", statistics.median(r["grad_ratio"] for r in log if "grad_ratio" in r))

# %% [markdown]
# Rewards of the same fixed noise and prompts before (the teacher read out in one step) and after:

# %%
import contextlib  # noqa: E402

prompts = promptsets.BUILTIN_PROMPTS[:4]
size = nets["teacher"].config.sample_size
z = torch.randn((4, 4, size, size), generator=torch.Generator().manual_seed(0)).to(device)  # fixed z ~ N(0, I)
before = (dipp.build_generator(dipp.Config(generator_init=GENERATOR_INIT[1]), nets["teacher"], family, schedule, device)
          if GENERATOR_INIT else dipp.OneStepGenerator(nets["teacher"], family, schedule, 999))  # the initialisation
low = nets["teacher"].dtype
ctx = torch.autocast(device.type, dtype=low) if low != torch.float32 else contextlib.nullcontext()
with torch.no_grad(), ctx:
    cond = family.encode(nets["tokenizer"], nets["text_encoder"], prompts)
    for name, G in (("before", before), ("after", nets["G"])):
        r = nets["reward"](dipp.decode(nets["vae"], G(z, cond)), prompts)
        print(f"{name:>6}: mean reward {r.mean().item():+.4f}  per prompt {[round(v, 3) for v in r.tolist()]}")

# %% [markdown]
# ## 4. Save, reload, generate in one step
# Training wrote the generator as a plain diffusers UNet folder; `--generate` reloads it.

# %%
images = dipp.main(MODEL + ["--generate", "|".join(prompts), "--generator_init", os.path.join(run_dir, "generator"),
                            "--output_dir", os.path.join(OUT, "generated")])
print(images.shape, sorted(os.listdir(os.path.join(OUT, "generated")))[:4])
display(Image(os.path.join(OUT, "generated", "generated_00.png")))
