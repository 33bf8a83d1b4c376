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
# # 03 — DI++ on PixArt-α (a DiT) with one GPU
#
# The paper's headline numbers come from a one-step generator distilled from PixArt-α, a diffusion
# *transformer*. This notebook runs the very same `dipp.py` on it: only the model-family row in
# `dipp.py` §7 differs from SD1.5 (how to load the model, encode a prompt, call the denoiser as
# ε(x_t, t, c), which layers take LoRA, the default t*); the losses and Alg. 1 are unchanged.
# We (1) load the components, (2) pre-encode the prompts with T5 once and free it, (3) measure the
# memory switches, (4) run a short alignment, (5) export and reload the generator in a stock
# diffusers `PixArtAlphaPipeline`.
#
# Needs: a CUDA GPU, the PixArt-α weights (`huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512`)
# and ImageReward (`huggingface-cli download THUDM/ImageReward`). With `DIPP_TINY=1` every cell runs
# on a tiny random PixArt (transformer, T5, tokenizer built in-process) on a CPU instead (what CI
# does), through the very same code path.

# %%
import json
import os
import sys
import time

import torch

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)
import dipp  # noqa: E402
import promptsets  # noqa: E402
import families  # noqa: E402
import plumbing  # noqa: E402
import random_weights  # noqa: E402  (tiny random models for DIPP_TINY=1)

TINY = os.environ.get("DIPP_TINY") == "1"
OUT = os.path.join(ROOT, "runs", "notebook03" + ("_tiny" if TINY else ""))
MODEL = ["--random_weights", "tiny_pixart"] if TINY else [
    "--pretrained_model_name_or_path", "PixArt-alpha/PixArt-XL-2-512x512", "--reward", "imagereward"]
GPU = torch.cuda.is_available()
print(f"tiny models: {TINY} | GPU: {torch.cuda.get_device_name() if GPU else 'none'}")

# %% [markdown]
# ## 1. The components
# `dipp.load_teacher` recognises the family from the folder layout (`transformer/` rather than `unet/`)
# or from the hub repo's `model_index.json`, and loads the teacher transformer, the VAE (the same
# latent space as SD1.5), the T5 tokenizer and the noise schedule (linear β from 1e-4 to 0.02, read
# from the scheduler config). `text_encoder=False` leaves T5 on disk: section 2 needs it only once.

# %%
if TINY:
    model_path, _ = random_weights.build_random(os.path.join(OUT, "tiny"), "tiny_pixart")
else:
    model_path = "PixArt-alpha/PixArt-XL-2-512x512"
device = plumbing.pick_device("auto")
family, teacher, vae, _, tokenizer, schedule = dipp.load_teacher(model_path, device, torch.float32, text_encoder=False)
count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
print(f"family '{family.name}': {type(teacher).__name__} {count(teacher):.1f}M params, VAE {count(vae):.1f}M")
print(f"output channels: {teacher.config.out_channels} (ε̂ and the learned variance; dipp keeps ε̂)")
print(f"LoRA targets: {family.lora_targets}")
for t_star in (999, family.t_star):
    alpha = schedule.table[0, t_star]
    print(f"t* = {t_star}: α = {alpha:.4f}, so x0 = (z − σ ε̂)/α amplifies ε errors {1 / alpha:.1f}×")

# %% [markdown]
# PixArt-α's linear schedule is much noisier at the end than SD's: at t = 999 the one-step readout would
# multiply every error of ε̂ by ~157. So dipp's PixArt default is t* = 400, the value PixArt-α-DMD
# uses (`--generator_timestep` overrides it; `--generator_init` loads PixArt-α-DMD's released
# transformer, whose repo holds only `transformer/` and `scheduler/`).

# %% [markdown]
# ## 2. T5 encodes the prompts once, then is freed
# T5-XXL has ≈ 4.8 B parameters (9.5 GB in bf16) and only ever sees the fixed prompt lists. dipp
# encodes them at start-up in batches (padded to 120 tokens, with the attention mask), caches the
# embeddings in `output_dir/text_embeddings/<hash>.safetensors` (keyed by the model and the prompts)
# and frees T5 before the three transformers are built. A second run with the same prompts — a
# resume, another setting — reads the file and never loads T5.

# %%
cfg = dipp.Config(pretrained_model_name_or_path=model_path, output_dir=os.path.join(OUT, "encode"))
prompts = promptsets.BUILTIN_PROMPTS
dtype = torch.bfloat16 if GPU else torch.float32
for attempt in ("first run (encodes)", "second run (cache)"):
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    text, text_encoder = families.text_conditioning(model_path, family, tokenizer, [prompts, [""]], device, dtype,
                                                    os.path.join(cfg.output_dir, "text_embeddings"))
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if GPU else ""
    print(f"{attempt}: {time.perf_counter() - start:.2f} s{peak}; text encoder kept: {text_encoder is not None}")
c, null = text(prompts[:2]), text([""])
print(f"c.emb {tuple(c.emb.shape)}, c.mask {tuple(c.mask.shape)}: prompt tokens {c.mask.sum(1).tolist()}, "
      f"empty prompt {null.mask.sum().item()} token (</s>)")
cache = os.path.join(cfg.output_dir, "text_embeddings")
print(f"cache: {sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) / 2**20:.2f} MiB "
      f"for {len(prompts) + 1} prompts")

# %% [markdown]
# CFG's null condition c = ∅ is the empty prompt's embedding *and* mask, as in the PixArt pipeline;
# `dipp.guided` stacks (embedding, mask) pairs along the batch, so cond and uncond still run as one
# batched transformer call.

# %% [markdown]
# ## 3. What each memory switch costs
# Four short runs of the real training step with `--benchmark`: seconds per iteration after the
# warm-up and, on a GPU, the training loop's peak memory; the same result also holds the start-up
# peak (with T5) as `startup_peak_gib`.

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
# No GPU figure for PixArt has been measured by this project yet. What to expect from the sizes:
# the 512 px transformer has 0.61 B parameters (SD1.5's UNet: 0.86 B), so full fine-tuning holds
# two fp32 transformers with Adam states (≈ 2 × 0.61 B × 16 bytes ≈ 19.5 GB) plus the bf16 teacher,
# VAE, reward and activations; LoRA shares one bf16 base among teacher, generator and fake score.
# T5 is not among them: it was freed in section 2.

# %% [markdown]
# ## 4. A short alignment run, before and after
# `dipp.main` runs Alg. 1 and returns the networks. The sample grids `samples_0000.png` (the
# generator at initialisation: the teacher read out in one step at t* = 400) and the final one come
# from the same fixed prompts and noise.

# %%
steps = 4 if TINY else 500  # (tiny: a few steps, to run the cell in seconds; the images are noise anyway)
run_dir = os.path.join(OUT, "align")
nets = dipp.main(MODEL + ["--max_train_steps", str(steps), "--output_dir", run_dir, "--validation_steps", str(steps),
                          "--overwrite_output_dir", "--checkpointing_steps", str(steps), "--reward_scale", "1",
                          "--learning_rate", "1e-5" if not TINY else "1e-3"]
                 + ([] if TINY else ["--mixed_precision", "bf16", "--gradient_checkpointing", "--train_batch_size", "4"]))

# %%
from IPython.display import Image, display  # noqa: E402

display(Image(os.path.join(run_dir, "samples_0000.png")))
display(Image(os.path.join(run_dir, f"samples_{steps:04d}.png")))
log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
print("held-out reward:", [(r["step"], round(r["val_reward"], 4)) for r in log if "val_reward" in r])

# %% [markdown]
# ## 5. Export, and reload in a stock diffusers pipeline
# Training wrote the generator as a plain `PixArtTransformer2DModel` folder (a LoRA generator is merged
# first) plus `dipp.json` with t*. A stock `PixArtAlphaPipeline` with a DDPM scheduler
# (`clip_sample=False`, whose one-step update returns x0 = (z − σ ε̂)/α), `timesteps=[t*]` and guidance 1
# gives the images dipp's `--generate` gives from the same noise.

# %%
from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel  # noqa: E402

generator = os.path.join(run_dir, "generator")
t_star = json.load(open(os.path.join(generator, "dipp.json")))["generator_timestep"]
show = prompts[:2]
ours = dipp.main(MODEL + ["--generate", "|".join(show), "--generator_init", generator,
                          "--output_dir", os.path.join(OUT, "generated")])
# the pipeline gets the cached T5 embeddings and masks of section 2 (T5 itself is optional in it)
pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=nets["vae"].float(),
                           transformer=PixArtTransformer2DModel.from_pretrained(generator),
                           scheduler=DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", clip_sample=False))
pipe = pipe.to(device)
size = pipe.transformer.config.sample_size
z = torch.randn((len(show), 4, size, size), generator=torch.Generator().manual_seed(0))  # the z dipp drew (--seed 0)
c = text(show)
with torch.no_grad():
    theirs = pipe(prompt_embeds=c.emb, prompt_attention_mask=c.mask, timesteps=[t_star], latents=z.to(device),
                  guidance_scale=1.0, output_type="pt", use_resolution_binning=False).images
print(f"t* = {t_star}; largest pixel difference dipp vs stock pipeline: "
      f"{((ours.clamp(-1, 1) + 1) / 2 - theirs).abs().max().item():.2e}")
display(Image(os.path.join(OUT, "generated", "generated_00.png")))
