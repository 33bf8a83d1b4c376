"""dipp: a read-along implementation of Diff-Instruct++ (DI++).

DI++ aligns a *one-step* text-to-image generator with human preferences using no image data: it
maximises a reward model's score of the generator's samples while an Integral-KL (IKL) divergence
to a frozen diffusion teacher keeps them realistic. The IKL gradient needs the generator's own
score, so a second diffusion model (the "fake score") is trained online on generator samples.

Paper: W. Luo, "Diff-Instruct++: Training One-step Text-to-image Generator Model to Align with
Human Preferences", arXiv 2410.18881 (TMLR 2025). Formulas follow the project's derivation in
METHOD.md, so no version-specific equation numbers are cited. Builds on Diff-Instruct, arXiv 2305.18455.

Quick start (CPU, no downloads):   python dipp.py --tiny --max_train_steps 2 --output_dir out
Stable Diffusion 1.5 on one GPU:   python dipp.py --mixed_precision bf16 --gradient_checkpointing
Generate with a trained generator: python dipp.py --generate "a red bicycle" --generator_init out/generator

Symbols (code name <-> paper):   G / OneStepGenerator  g_θ(z, c)      x0     x_0 = g_θ(z, c)
  real_eps  ε-prediction of the frozen reference s_ref, CFG-guided: s̃_ref (ω = guidance_scale)
  fake_eps  ε-prediction of the online "TA diffusion" s_ψ             reward_fn  r(x, c)
  Schedule.alpha_sigma(t)  α_t, σ_t of x_t = α_t x0 + σ_t ε            reward_scale  α_rew
  ikl_weight  w(t)      sample_timesteps  π(t)      fake_steps_per_G  K_TA (Alg. 1)

Simplifications vs. the paper (each also marked NOTE(deviation) where it happens):
  1. Discrete DDPM timesteps t ∈ {0..999} stand in for the paper's continuous t (SD1.5 is discrete).
  2. w(t), π(t) are open in the paper for SD1.5. Defaults w = σ²/α² (Diff-Instruct's σ², VP form) and
     π = U{20..980} (DMD2): on the toy they reach DI++'s exact optimum with the least jitter (README).
     Options: `--timestep_sampling lognormal` (Diff-Instruct), `--ikl_weighting eps|dmd2` (dmd2 is adaptive).
  3. The IKL term is summed over latent dimensions (a per-sample divergence) and averaged over the
     batch; this reduction sets the scale of α_rew.
  4. The generator is the teacher's UNet evaluated once at t* on pure noise (DMD2's recipe); the paper
     also initialises from other one-step models, which `--generator_init` loads.
  5. "α_cfg" is taken to mean the standard CFG scale ω; the implicit-reward weight is γ = ω − 1.
"""
# -----------------------------------------------------------------------------
# 0. Imports. Heavy libraries (diffusers, transformers, ImageReward) are imported inside the
#    functions that need them, so `import dipp` stays fast for the 2-D toy and the tests.
import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import sys
import time

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Config. Every field is a command-line flag; the inline comment is its --help text.


@dataclasses.dataclass
class Config:
    # --- models
    pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD-1.x hub id or local diffusers folder (teacher, VAE, text encoder)
    generator_init: str = ""  # UNet folder of a one-step generator to start from (default: copy of the teacher)
    tiny: bool = False  # build tiny random SD + CLIP-reward models in output_dir/tiny (no download) and use them
    # --- method (METHOD.md §2-§5)
    reward: str = "imagereward"  # r(x, c): imagereward | clip | none (none = pure Diff-Instruct distillation)
    reward_model_path: str = ""  # imagereward: folder with ImageReward.pt + med_config.json; clip: CLIPModel id/folder
    reward_scale: float = 1.0  # α_rew: weight of the explicit reward (β = 1/α_rew in the RLHF form)
    guidance_scale: float = 1.75  # ω: CFG scale of the teacher; γ = ω−1 is the implicit-reward weight (DMD2 SD1.5: 1.75)
    generator_timestep: int = 999  # t*: the timestep at which the generator UNet is evaluated on noise z
    fake_steps_per_G: int = 1  # K_TA: fake-score updates per generator update (Alg. 1; DMD2 uses 10)
    # NOTE(deviation): the paper fixes no w(t), π(t) for SD1.5. x0 + uniform are kept because on the toy's
    # exact optimum (README, "DI++'s exact optimum") they land within 4 % of m* with the least jitter; the
    # lognormal π jitters more and piles 26 % of its draws on t_min; dmd2 overshoots and can run away.
    t_min: int = 20  # π(t) lives on {t_min..t_max}: timesteps at which the IKL and DSM losses are evaluated
    t_max: int = 980  # upper end of π(t)
    timestep_sampling: str = "uniform"  # π(t): uniform (U{t_min..t_max}, DMD2) | lognormal (log σ_t/α_t ~ N(−1.2, 1.2²), Diff-Instruct/EDM)
    ikl_weighting: str = "x0"  # w(t): x0 (σ²/α², Diff-Instruct) | eps (σ/α) | dmd2 (adaptive normaliser)
    # --- data
    prompts: str = ""  # text file with one prompt per line (default: a small built-in list)
    # --- optimisation
    train_batch_size: int = 1  # prompts per step
    max_train_steps: int = 1000  # generator updates
    learning_rate: float = 1e-5  # generator learning rate (Diff-Instruct / DMD2: 1e-5)
    fake_learning_rate: float = 1e-5  # fake-score learning rate
    adam_beta1: float = 0.0  # Adam β1 for both nets (Diff-Instruct uses 0: the loss landscape moves every step)
    adam_beta2: float = 0.999  # Adam β2
    max_grad_norm: float = 1.0  # gradient clipping for both nets (0 = off)
    ema_decay: float = 0.0  # (optional) EMA of the generator's trainable weights, e.g. 0.999; grids and export use it (0 = off)
    lora_rank: int = 0  # 0 = full fine-tuning; R > 0 = generator and fake score as rank-R LoRA adapters on one shared frozen UNet
    gradient_checkpointing: bool = False  # recompute activations of generator, fake score, VAE decoder, reward tower
    mixed_precision: str = "no"  # no | fp16 | bf16: autocast with fp32 master weights; frozen nets stored in it
    compile: str = "none"  # torch.compile mode for all five networks (same math, fused kernels); the first steps compile, for minutes on SD1.5
    reuse_generator_sample: bool = False  # first fake-score update trains on the generator update's own sample, as DMD2 (one generator forward less per step; z is shared)
    # --- bookkeeping
    output_dir: str = "dipp-out"  # where config.json, log.jsonl, samples, checkpoints and generator/ go
    checkpointing_steps: int = 500  # save a resumable checkpoint every N steps
    checkpoints_total_limit: int = 3  # keep the newest K checkpoints (0 = keep all)
    resume_from_checkpoint: str = ""  # latest | path to a checkpoint-N folder
    validation_steps: int = 100  # save a sample grid from fixed noise every N steps
    seed: int = 0  # seeds torch once at start-up
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 ...
    generate: str = ""  # generate mode: prompts separated by '|', images from --generator_init, then exit
    benchmark: bool = False  # time max_train_steps iterations (no files written), print one BENCHMARK json line
    random_sd15: bool = False  # like --tiny but SD1.5-shaped (UNet 860M, VAE, CLIP-L text, CLIP ViT-L/14 reward): for --benchmark


CHOICES = {"reward": ("imagereward", "clip", "none"), "mixed_precision": ("no", "fp16", "bf16"),
           "ikl_weighting": ("x0", "eps", "dmd2"), "timestep_sampling": ("uniform", "lognormal"),
           "compile": ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead")}
BUILTIN_PROMPTS = ["a photo of a red bicycle leaning on a brick wall", "a watercolor painting of a fox",
                   "a bowl of ramen, studio lighting", "a lighthouse on a cliff at sunset",
                   "an astronaut riding a horse", "a cozy living room with a fireplace",
                   "a close-up portrait of an old fisherman", "a castle in the clouds, fantasy art"]


def die(message):
    """One clear line instead of a traceback: what is wrong and how to fix it."""
    raise SystemExit(f"dipp: error: {message}")


def parse_config(argv=None):
    """Turn every Config field into --field (type from the annotation, help from its comment)."""
    source = inspect.getsource(Config)
    helps = dict(re.findall(r"^\s+(\w+): \w+ = .+?  # (.+)$", source, flags=re.M))
    parser = argparse.ArgumentParser(prog="dipp.py", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = {"bool": bool, "int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=helps[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=helps[f.name],
                                choices=CHOICES.get(f.name))
    return Config(**vars(parser.parse_args(argv)))


def check_config(cfg, num_train_timesteps=1000):
    """Reject settings that would crash deep inside a library or train silently wrong."""
    T = num_train_timesteps
    if not 0 <= cfg.ema_decay < 1:
        die(f"--ema_decay {cfg.ema_decay} must be in [0, 1): 0 = off, 0.999 = a ~1000-step average")
    if not 0 < cfg.generator_timestep < T:
        die(f"--generator_timestep {cfg.generator_timestep} is outside the schedule; use 1..{T - 1}")
    if not 0 <= cfg.t_min < cfg.t_max < T:
        die(f"need 0 <= --t_min < --t_max < {T}, got t_min={cfg.t_min} t_max={cfg.t_max}")
    if cfg.guidance_scale < 1:
        die(f"--guidance_scale {cfg.guidance_scale} < 1 would push samples *away* from the prompt; use ω >= 1")
    for name in ("train_batch_size", "max_train_steps", "fake_steps_per_G", "checkpointing_steps",
                 "validation_steps"):
        if getattr(cfg, name) < 1:
            die(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.reward_scale < 0:
        die(f"--reward_scale {cfg.reward_scale} < 0 would minimise the reward; use α_rew >= 0")

# -----------------------------------------------------------------------------
# 2. Small utilities


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def precision(cfg, device):
    """(autocast context, dtype of frozen nets). One place decides the dtype story."""
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext(), torch.float32
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        die(f"--mixed_precision fp16 needs a CUDA GPU (device is {device}); use bf16 or no")
    dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), dtype


def optimizer_step(loss, params, opt, scaler, max_grad_norm):
    """backward + clip + step. A non-finite loss stops training before it can poison the weights."""
    bad = (~torch.isfinite(loss.detach())).float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)  # every rank stops together, or the others hang in backward
    if bad.item():
        raise FloatingPointError(f"loss became {loss.item()} (on at least one rank)")
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradient, not the fp16-scaled one
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(opt)
    scaler.update()

# -----------------------------------------------------------------------------
# 3. Forward process (METHOD.md §1): x_t = α_t x0 + σ_t ε, variance preserving (α² + σ² = 1).


class Schedule:
    """The DDPM noise schedule as α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), t ∈ {0..T−1}."""

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).float()  # (T,)
        self.T = len(self.alphas_cumprod)

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, T=1000):
        """SD1.5's schedule: β_t linear in sqrt-space; computed in float64, stored in float32."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    def alpha_sigma(self, t, ndim):
        """α_t, σ_t for integer timesteps t (B,), shaped (B, 1, ..., 1) to broadcast over x."""
        abar = self.alphas_cumprod.to(t.device)[t].view(-1, *[1] * (ndim - 1))  # (B, 1, ..)
        return abar.sqrt(), (1 - abar).sqrt()


def add_noise(x0, eps, alpha, sigma):
    return alpha * x0 + sigma * eps  # x_t, same shape as x0


def predict_x0(x_t, eps_hat, alpha, sigma):
    """Tweedie / ε-parameterisation: x̂0 = (x_t − σ_t ε̂) / α_t."""
    return (x_t - sigma * eps_hat) / alpha


# Diff-Instruct's π(t), taken from EDM (arXiv 2206.00364): log σ_VE ~ N(P_mean, P_std²), σ_VE = σ_t/α_t
LOGNORMAL_MEAN, LOGNORMAL_STD = -1.2, 1.2


def sample_timesteps(B, t_min, t_max, device, kind="uniform", schedule=None):
    """t ~ π(t) on {t_min..t_max}, (B,) integer timesteps.
        uniform  : π = U{t_min..t_max} (DMD2's range)
        lognormal: log(σ_t/α_t) ~ N(−1.2, 1.2²), Diff-Instruct's noise levels, moved to the timestep
                   with the nearest log(σ_t/α_t). On SD1.5's schedule with [20, 980] the median is
                   t = 81; t_min (σ/α = 0.14) takes 26 % of the mass, t_max 0.09 % (toy/optimum.py)."""
    assert kind in ("uniform", "lognormal"), f"unknown π(t) {kind!r}: uniform | lognormal"
    if kind == "uniform":
        return torch.randint(t_min, t_max + 1, (B,), device=device)  # t ~ U{t_min..t_max}
    # NOTE(deviation): Diff-Instruct draws a continuous VE noise level; SD1.5 has 1000 discrete ones, so
    # each draw goes to the nearest (in log σ/α) timestep and the tails beyond t_min/t_max to the ends.
    # draw_noise gets no schedule, so SD-1.x's scaled-linear one (the only one dipp trains) is the default.
    abar = (schedule or Schedule.scaled_linear()).alphas_cumprod[t_min:t_max + 1].to(device)  # (n,)
    log_sigma_ve = 0.5 * torch.log((1 - abar) / abar)  # (n,), increasing in t
    edges = (log_sigma_ve[1:] + log_sigma_ve[:-1]) / 2  # (n−1,) midpoints: nearest-neighbour boundaries
    log_sigma = LOGNORMAL_MEAN + LOGNORMAL_STD * torch.randn(B, device=device)  # log σ_VE ~ N(−1.2, 1.2²)
    return t_min + torch.bucketize(log_sigma, edges)  # (B,): nearest t; the tails land on the ends

# -----------------------------------------------------------------------------
# 4. Networks. Every network is seen by the losses as an ε-predictor eps(x_t, t) -> ε̂ with its
#    conditioning already bound (a closure), so the same losses run on a UNet and on a 2-D MLP.
#    Score and ε are the same thing in two units: s(x_t) = −ε̂(x_t) / σ_t.


def cfg_eps(eps_cond, eps_uncond, omega):
    """Classifier-free guidance, METHOD.md §5: s̃ = s_∅ + ω (s_c − s_∅) = s_c + (ω−1)(s_c − s_∅).
    ω = 1 is the plain conditional teacher; the extra (ω−1)(s_c − s_∅) is the implicit reward's pull."""
    return eps_uncond + omega * (eps_cond - eps_uncond)


def guided(eps_fn, cond, uncond, omega):
    """The teacher s̃_ref as a closure eps(x_t, t): cond and uncond in one batched call (one UNet pass)."""
    def eps(x_t, t):
        if omega == 1:
            return eps_fn(x_t, t, cond)
        e_c, e_u = eps_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
        return cfg_eps(e_c, e_u, omega)
    return eps


def unet_eps(unet):
    """A diffusers UNet as eps(x_t, t, text_emb). Inputs are cast to the net's dtype, output to fp32."""
    dtype = next(unet.parameters()).dtype  # (a DDP wrapper has no .dtype of its own)

    def eps(x_t, t, cond):
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()
    return eps


class OneStepGenerator(torch.nn.Module):
    """g_θ(z, c): the UNet evaluated once at t* on pure noise, read out as x̂0 (one step, no sampler).

    x0 = (z − σ_{t*} ε̂_θ(z, t*, c)) / α_{t*}.  NOTE(deviation): the paper leaves the one-step
    parameterisation to the initial model; we use DMD2's: z itself is the input (in VP, x_t has unit
    variance for unit-variance data, as SD latents roughly are), and t* = 999 by default. With this
    choice a stock diffusers pipeline run for one step at t* reproduces our samples exactly."""

    def __init__(self, unet, schedule, t_star):
        super().__init__()
        self.unet, self.schedule, self.t_star = unet, schedule, t_star

    def forward(self, z, cond):
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.long)  # (B,)
        alpha, sigma = self.schedule.alpha_sigma(t, z.ndim)
        eps_hat = self.unet(z, t, encoder_hidden_states=cond).sample  # (B, 4, h, w)
        return predict_x0(z, eps_hat, alpha, sigma)  # x0: (B, 4, h, w), a latent

# -----------------------------------------------------------------------------
# 5. Losses (METHOD.md §3-§5). Each returns a per-sample loss (B,); callers take the mean.


def ikl_weight(kind, alpha, sigma, x0=None, x0_real=None):
    """w(t) of the IKL, in score units. What each means for the generator's gradient ∂L/∂x0:
        x0 : w = σ²/α²  ->  ∂L/∂x0 = x̂0_fake − x̂0_ref  (difference of the two denoisers; Diff-Instruct's
             σ² weight of VE, rewritten for VP)
        eps: w = σ/α    ->  ∂L/∂x0 = ε̂_ref − ε̂_fake    (bounded; the SDS-style weight)
        dmd2: x0-weight / mean|x0 − x̂0_ref| per sample. NOTE(deviation): DMD2's adaptive normaliser
             depends on the sample, so the objective is no longer a fixed divergence."""
    if kind == "x0":
        return sigma ** 2 / alpha ** 2
    if kind == "eps":
        return sigma / alpha
    norm = (x0 - x0_real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)  # (B, 1, ..)
    return sigma ** 2 / alpha ** 2 / norm.clamp_min(1e-5)  # clamp: x0 may already equal the teacher's x̂0


def ikl_loss(x0, t, eps, schedule, real_eps, fake_eps, weighting="x0"):
    """Generator surrogate of the Integral KL, METHOD.md §3 (Diff-Instruct's key identity):
        ∇_θ D_IKL = E_{t,ε}[ w(t) (s_fake(x_t,t) − s̃_ref(x_t,t))ᵀ ∂x_t/∂θ ],  x_t = α_t g_θ(z) + σ_t ε
        L_G = w(t) ⟨ sg[s_fake − s̃_ref], x_t ⟩   so   ∂L_G/∂x0 = w α (ε̃_ref − ε̂_fake) / σ
    The loss *value* means nothing; its gradient is the estimator. Intuition: push each sample from
    where the generator's own density is high towards where the teacher's is."""
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0, eps, alpha, sigma)  # (B, ...): carries the gradient to θ through x0
    with torch.no_grad():  # sg[·]: neither score network is differentiated, only the explicit x_t
        e_real = real_eps(x_t.detach(), t)
        e_fake = fake_eps(x_t.detach(), t)
        x0_real = predict_x0(x_t, e_real, alpha, sigma)
        w = ikl_weight(weighting, alpha, sigma, x0.detach(), x0_real)
        # s_fake − s̃_ref = (−ε̂_fake + ε̃_ref) / σ   (score = −ε/σ)
        score_diff = w * (e_real - e_fake) / sigma  # (B, ...)
    # NOTE(deviation): summed over dimensions (a per-sample divergence), not averaged; sets α_rew's scale.
    return (score_diff * x_t).flatten(1).sum(1)  # (B,)


def fake_score_loss(fake_eps, x0, t, eps, schedule):
    """Denoising score matching for the fake score s_ψ on *detached* generator samples, METHOD.md §4:
        L(ψ) = E ‖ε̂_ψ(x_t, t) − ε‖²,  x_t = α_t sg[x0] + σ_t ε      (λ(t) = σ_t² in score units)
    Its minimiser is the score of the generator's diffused distribution, which the IKL needs."""
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0.detach(), eps, alpha, sigma)  # detach: ψ's loss must not move θ
    return (fake_eps(x_t, t) - eps).pow(2).flatten(1).mean(1)  # (B,)


def reward_loss(reward, reward_scale):
    """−α_rew · r(g_θ(z), c), METHOD.md §2: minimising it is gradient *ascent* on the reward, whose
    gradient flows back through the reward model, its preprocessing and the VAE decoder into θ."""
    return -reward_scale * reward  # (B,)


def cfg_reward_loss(x0, t, eps, schedule, eps_cond, eps_uncond, weighting="x0"):
    """−r_cfg surrogate, METHOD.md §5: the implicit reward that CFG adds,
        r_cfg(x0, c) = ∫ w(t) E_ε[ log p_t(c | α_t x0 + σ_t ε) ] dt,  ∇_x log p_t(c|x) = s_c − s_∅
    L = −w ⟨sg[s_c − s_∅], x_t⟩ has gradient −∇_x0 r_cfg. Not needed for training (a CFG teacher already
    contains it); the tests use it to show that ikl_loss with ω equals ikl_loss with ω = 1 plus
    (ω − 1) · cfg_reward_loss, gradient for gradient."""
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0, eps, alpha, sigma)
    with torch.no_grad():
        w = ikl_weight(weighting, alpha, sigma)
        classifier_grad = w * (eps_uncond(x_t, t) - eps_cond(x_t, t)) / sigma  # w (s_c − s_∅)
    return -(classifier_grad * x_t).flatten(1).sum(1)  # (B,)

# -----------------------------------------------------------------------------
# 6. Rewards: reward(images in [-1, 1] (B, 3, H, W), prompts) -> (B,), differentiable in images.

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size):
    """Torch version of CLIP's PIL pipeline (resize shorter side bicubic, centre crop, normalise), so
    gradients flow. Antialiased bicubic approximates PIL's filter; test_dipp.py bounds the difference."""
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    x = F.interpolate(x, size=(max(size, round(H * scale)), max(size, round(W * scale))),
                      mode="bicubic", align_corners=False, antialias=True)  # (B, 3, ≥size, ≥size)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # (B, 3, size, size); clamp as uint8 would
    mean, std = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1), x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageRewardFn:
    """ImageReward (BLIP ViT-L + BERT cross-attention + MLP head), through the package's own
    `score_gard`, the differentiable path its ReFL code uses. Output is the package's normalised score."""

    def __init__(self, model):
        self.model, self.tower = model, model.blip.visual_encoder  # tower: the part --compile compiles

    def __call__(self, images, prompts):
        m = self.model
        text = m.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                return_tensors="pt").to(images.device)  # as in ImageReward.score
        pixels = clip_preprocess(images, 224).to(next(m.parameters()).dtype)  # (B, 3, 224, 224)
        return m.score_gard(text.input_ids, text.attention_mask, pixels).float().squeeze(1)  # (B,)


class ClipRewardFn:
    """CLIP score: cosine similarity of image and prompt embeddings (in [-1, 1]; ×100 is 'CLIPScore')."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.tower = model, tokenizer, model.vision_model

    def __call__(self, images, prompts):
        size = self.model.config.vision_config.image_size
        pixels = clip_preprocess(images, size).to(self.model.dtype)  # (B, 3, size, size)
        ids = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(images.device)
        with torch.no_grad():  # the text side is a constant of the reward
            text = F.normalize(self.model.get_text_features(**ids).float(), dim=-1)  # (B, D)
        image = F.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1)
        return (image * text).sum(-1)  # (B,)


def checkpoint_blocks(blocks):
    """Gradient checkpointing for a frozen reward tower: each block's activations are recomputed in the
    backward pass instead of stored (BLIP's ViT has no switch; transformers' only acts in train mode)."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)


def load_reward(cfg, device, dtype):
    """Build reward_fn(images, prompts), or None for --reward none."""
    if cfg.reward == "none":
        return None
    if cfg.reward == "clip":
        from transformers import CLIPModel, CLIPTokenizer
        name = cfg.reward_model_path or "openai/clip-vit-large-patch14"
        model = load_or_die(lambda: CLIPModel.from_pretrained(name), name, "the CLIP reward model")
        tok = load_or_die(lambda: CLIPTokenizer.from_pretrained(name), name, "the CLIP tokenizer")
        if cfg.gradient_checkpointing:  # transformers' own switch is inactive in eval mode
            checkpoint_blocks(model.vision_model.encoder.layers)
        return ClipRewardFn(freeze(model, device, dtype), tok)
    sys.modules.setdefault("clip", type(sys)("clip"))  # ImageReward imports OpenAI's `clip` but never uses it for ImageReward
    import ImageReward as RM
    path = cfg.reward_model_path
    if path:
        files = [os.path.join(path, f) for f in ("ImageReward.pt", "med_config.json")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            die(f"--reward_model_path is missing {', '.join(missing)}; download both from the hub repo "
                "THUDM/ImageReward (huggingface-cli download THUDM/ImageReward --local-dir DIR)")
        load = lambda: RM.load(files[0], device="cpu", med_config=files[1])
    else:
        load = lambda: RM.load("ImageReward-v1.0", device="cpu")
    model = load_or_die(load, path or "THUDM/ImageReward", "the ImageReward model (and its BERT tokenizer "
                        "'bert-base-uncased')")
    model.device = device  # score_gard builds its attention mask on model.device
    if cfg.gradient_checkpointing:
        checkpoint_blocks(model.blip.visual_encoder.blocks)
    return ImageRewardFn(freeze(model, device, dtype))

# -----------------------------------------------------------------------------
# 7. Models on disk, prompts and sampling


SD_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json",
            "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")


def load_or_die(fn, name, what):
    """Call a from_pretrained-style loader; turn 'not found / offline / wrong path' into one line."""
    if name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        die(f"cannot load {what}: the path '{name}' does not exist")
    try:
        return fn()
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        die(f"cannot load {what} from '{name}' ({first[:200]}). On a machine with internet run "
            f"`huggingface-cli download {name}` (then it loads from the cache), or pass a local folder")


def load_sd(name, device, dtype):
    """Teacher UNet, VAE, text encoder, tokenizer and schedule of any diffusers SD-1.x layout."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    if os.path.isdir(name):
        missing = [f for f in SD_FILES if not os.path.isfile(os.path.join(name, f))]
        if missing:
            die(f"'{name}' is not a complete diffusers SD-1.x folder: missing {', '.join(missing)}. "
                "Get one with `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
                "--local-dir DIR`")
    get = lambda cls, sub: load_or_die(lambda: cls.from_pretrained(name, subfolder=sub), name, f"{sub}/")
    unet, vae = get(UNet2DConditionModel, "unet"), get(AutoencoderKL, "vae")
    text_encoder, tokenizer = get(CLIPTextModel, "text_encoder"), get(CLIPTokenizer, "tokenizer")
    scheduler = get(DDPMScheduler, "scheduler")
    if scheduler.config.prediction_type != "epsilon":
        die(f"'{name}' predicts {scheduler.config.prediction_type}; dipp supports ε-prediction SD-1.x models")
    # frozen nets are stored in the low-precision dtype: we never backprop into their weights
    for m in (unet, text_encoder):
        freeze(m, device, dtype)
    # NOTE: the VAE decoder stays fp32 under fp16 (its activations overflow fp16 at 512 px); bf16 is safe
    freeze(vae, device, torch.float32 if dtype == torch.float16 else dtype)
    return unet, vae, text_encoder, tokenizer, Schedule(scheduler.alphas_cumprod)


def freeze(module, device, dtype):
    """eval mode, no weight gradients, on device in dtype (cast only when needed: .to(dtype) warns)."""
    module.to(device).eval().requires_grad_(False)
    return module if dtype == torch.float32 else module.to(dtype)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts):
    """Text embeddings c as the SD pipeline makes them (pad to 77 tokens, last hidden state)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0].float()  # (B, 77, D)


def decode(vae, x0):
    """Latent x0 -> image in [-1, 1] (B, 3, H, W). SD latents are scaled by vae.config.scaling_factor."""
    dtype = vae.dtype
    with torch.autocast(x0.device.type, enabled=False) if dtype == torch.float32 else contextlib.nullcontext():
        return vae.decode(x0.to(dtype) / vae.config.scaling_factor).sample.float()


def load_prompts(path):
    if not path:
        return list(BUILTIN_PROMPTS)
    if not os.path.isfile(path):
        die(f"--prompts file '{path}' does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    if not prompts:
        die(f"--prompts file '{path}' has no prompts; write one prompt per line")
    return prompts


def save_grid(images, prompts, path):
    """Images in [-1, 1] side by side, each with its prompt underneath, as one PNG."""
    from PIL import Image, ImageDraw
    pics = [Image.fromarray(((im.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
            for im in images]
    w, h = max(256, pics[0].width), max(256, pics[0].height)
    grid = Image.new("RGB", (w * len(pics), h + 40), "white")
    for i, (pic, prompt) in enumerate(zip(pics, prompts)):
        grid.paste(pic.resize((w, h), Image.NEAREST), (i * w, 0))
        ImageDraw.Draw(grid).text((i * w + 4, h + 4), prompt[:40] + "\n" + prompt[40:80], fill="black")
    grid.save(path)

# -----------------------------------------------------------------------------
# 8. Training: Alg. 1 — K_TA fake-score updates with θ frozen, then one generator update with ψ frozen.


def draw_noise(B, z_shape, x_shape, cfg, device, rank=0, world=1):
    """z ~ N(0, I), t ~ π(t), ε ~ N(0, I) for one step. Every rank draws the *global* batch of world·B
    from the same seed and keeps its own slice, so N ranks see exactly the samples that one process
    with batch N·B sees (and the data-parallel test can demand identical results)."""
    n, mine = world * B, slice(rank * B, (rank + 1) * B)
    z = torch.randn((n, *z_shape), device=device)[mine]  # z ~ N(0, I)
    t = sample_timesteps(n, cfg.t_min, cfg.t_max, device, cfg.timestep_sampling)[mine]  # t ~ π(t)
    eps = torch.randn((n, *x_shape), device=device)[mine]  # ε ~ N(0, I)
    return z, t, eps


def fake_score_step(G, fake_eps, fake_params, opt, scaler, noise, schedule, cfg, ctx=contextlib.nullcontext(),
                    x0=None):
    """One fake-score (TA diffusion) update on fresh generator samples. G(z) and fake_eps(x_t, t) are
    closures with their conditioning bound; noise = (z, t, ε) from draw_noise. x0: a sample g_θ(z) the
    caller already has (--reuse_generator_sample), used instead of G(z). Returns the DSM loss."""
    z, t, eps = noise
    with ctx:
        if x0 is None:
            with torch.no_grad():
                x0 = G(z)
        loss = fake_score_loss(fake_eps, x0.detach(), t, eps, schedule).mean()  # θ frozen: x0 = sg[g_θ(z)]
    optimizer_step(loss, fake_params, opt, scaler, cfg.max_grad_norm)
    return loss.detach()


def generator_step(G, real_eps, fake_eps, reward_fn, G_params, opt, scaler, noise, schedule, cfg,
                   ctx=contextlib.nullcontext(), x0=None):
    """One generator update, METHOD.md §2-§3:  L_G = D_IKL surrogate − α_rew · r(g_θ(z), c).
    real_eps is the (CFG-guided) teacher, so the implicit reward (ω−1)·r_cfg is already inside the IKL
    term. ψ is not stepped here; its gradients are never computed (no_grad inside ikl_loss).
    x0: G(z) already computed *with* its graph (--reuse_generator_sample), else computed here."""
    z, t, eps = noise
    with ctx:
        x0 = G(z) if x0 is None else x0  # (B, ...): the only path by which θ receives gradient
        loss_ikl = ikl_loss(x0, t, eps, schedule, real_eps, fake_eps, cfg.ikl_weighting).mean()
        loss = loss_ikl
        reward = x0.new_full((z.shape[0],), float("nan"))  # (B,): logged as nan with --reward none
        if reward_fn is not None:
            reward = reward_fn(x0)  # (B,)
            loss = loss + reward_loss(reward, cfg.reward_scale).mean()
    optimizer_step(loss, G_params, opt, scaler, cfg.max_grad_norm)
    return {"loss_ikl": loss_ikl.detach(), "reward": reward.detach().mean()}


def make_adam(params, lr, cfg, device):
    fused = device.type == "cuda"  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=0.0,
                             fused=fused)


COMPILE_BACKEND = "inductor"  # the tests swap in "aot_eager": the same graph capture without the C++ build


def compile_nets(cfg, nets, device):
    """(optional, --compile MODE) torch.compile each network in place. Module.compile() keeps parameter
    names, so checkpoints, EMA, resume and export are unaffected, and the math is the same ops, fused.
    The first iterations compile (each net once per grad mode and batch shape; minutes for SD1.5)."""
    import torch._dynamo
    compilers = [os.environ.get("CXX"), "g++", "clang++"]  # what inductor's CPU code generation calls
    if device.type == "cpu" and COMPILE_BACKEND == "inductor" and not any(c and shutil.which(c) for c in compilers):
        die("--compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); install one or drop --compile")
    # teacher, generator and fake score share one UNet forward; give its graphs room before eager fallback
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for net in nets:
        net.compile(backend=COMPILE_BACKEND, mode=cfg.compile)


def save_checkpoint(cfg, step, G, fake, opt_G, opt_fake, ema=None):
    """Write checkpoint-N atomically (to a .tmp folder, then rename): a kill mid-save never leaves a
    half-written checkpoint-N behind. Keeps the newest cfg.checkpoints_total_limit."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from safetensors.torch import save_file
    os.makedirs(tmp)
    weights = {"generator": trainable_named(G.unet), "fake_score": trainable_named(fake)}
    if ema is not None:
        weights["generator_ema"] = dict(zip(weights["generator"], ema))
    for name, tensors in weights.items():  # full UNets, or only their LoRA adapters
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(tmp, f"{name}.safetensors"))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"step": step, "opt_G": opt_G.state_dict(), "opt_fake": opt_fake.state_dict(), "rng": rng},
               os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "dipp.json"), "w") as f:
        json.dump({"generator_timestep": G.t_star}, f)
    if os.path.isdir(final):  # re-running into the same output_dir: swap the old one out, then drop it
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    if cfg.checkpoints_total_limit > 0:
        for old in list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit]:
            shutil.rmtree(old)


def list_checkpoints(output_dir):
    found = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(output_dir) else []
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def load_checkpoint(cfg, G, fake, opt_G, opt_fake, ema=None):
    """Restore weights, optimiser state, RNG and step from --resume_from_checkpoint. Returns the step."""
    from safetensors.torch import load_file
    path = cfg.resume_from_checkpoint
    if path == "latest":
        found = list_checkpoints(cfg.output_dir)
        if not found:
            die(f"--resume_from_checkpoint latest: no checkpoint-N folder in {cfg.output_dir}")
        path = found[-1]
    if not os.path.isfile(os.path.join(path, "state.pt")):
        die(f"--resume_from_checkpoint '{path}' is not a dipp checkpoint folder (no state.pt)")
    for name, net in (("generator", G.unet), ("fake_score", fake)):
        weights = load_file(os.path.join(path, f"{name}.safetensors"))
        expected = set(trainable_named(net))
        if set(weights) != expected:
            die(f"checkpoint '{path}' does not match this model ({name}: {len(weights)} tensors saved, "
                f"{len(expected)} trainable here); resume with the --lora_rank it was trained with")
        net.load_state_dict(weights, strict=False)
    if ema is not None:
        ema_file = os.path.join(path, "generator_ema.safetensors")
        if not os.path.isfile(ema_file):
            die(f"checkpoint '{path}' has no EMA weights; resume without --ema_decay or from an EMA run")
        saved = load_file(ema_file)
        for k, e in zip(trainable_named(G.unet), ema):
            e.copy_(saved[k])
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    opt_G.load_state_dict(state["opt_G"])
    opt_fake.load_state_dict(state["opt_fake"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    print(f"resumed from {path} at step {state['step']}")
    return state["step"]


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # DMD2's list


def lora_copy(base, rank, name):
    """(optional, --lora_rank) A UNet that *shares* base's frozen weights (deepcopy with a memo mapping every
    base parameter to itself) plus one trainable rank-R LoRA adapter. Teacher, generator and fake score then
    cost one base UNet; the teacher is the base itself. LoRA's B starts at 0, so the copy starts = teacher."""
    import copy
    from peft import LoraConfig
    unet = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name=name)
    for p in unet.parameters():
        if p.requires_grad:  # PEFT gives the adapter the base's (low) dtype; train it in fp32
            p.data = p.data.float()
    return unet


def build_generator(cfg, teacher, schedule, device):
    """g_θ: a trainable fp32 copy of the teacher UNet (or of --generator_init, or a LoRA adapter on the
    teacher) used as a one-step model."""
    import copy
    from diffusers import UNet2DConditionModel
    if cfg.lora_rank:
        if cfg.generator_init:
            die("--lora_rank trains an adapter on the teacher and cannot start from --generator_init; drop one")
        unet = lora_copy(teacher, cfg.lora_rank, "generator")
    elif cfg.generator_init:
        name = cfg.generator_init
        unet = load_or_die(lambda: UNet2DConditionModel.from_pretrained(name), name, "the --generator_init UNet")
        unet.to(device, torch.float32).requires_grad_(True)
    else:
        unet = copy.deepcopy(teacher).to(device, torch.float32).requires_grad_(True)  # fp32 master weights
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return OneStepGenerator(unet.train(), schedule, cfg.generator_timestep)


def build_fake_score(cfg, teacher, device):
    """s_ψ, initialised from the reference (METHOD.md §4): an fp32 copy of the teacher, or a LoRA adapter."""
    if cfg.lora_rank:
        fake = lora_copy(teacher, cfg.lora_rank, "fake_score")
    else:
        fake = teacher.__class__.from_config(teacher.config)
        fake.load_state_dict(teacher.state_dict())
        fake.to(device, torch.float32)
    if cfg.gradient_checkpointing:
        fake.enable_gradient_checkpointing()
    return fake.train()


def trainable_named(module):
    """{name: parameter} of what training changes: the whole UNet, or only its LoRA adapter."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def trainable(module):
    return list(trainable_named(module).values())


@contextlib.contextmanager
def ema_weights(params, ema):
    """(optional) Inside the block the generator holds its EMA weights (a pointer swap, no copy), which
    sample grids and the export use when --ema_decay > 0. ema=None leaves the weights alone."""
    def swap():
        for p, e in zip(params, ema or []):
            p.data, e.data = e.data, p.data
    swap()
    try:
        yield
    finally:
        swap()


def init_distributed(cfg):
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: one process per GPU (NCCL), or per CPU process
    (gloo). Returns (rank, world_size, device). A plain `python dipp.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, pick_device(cfg.device)
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, device


def train(cfg):
    from tqdm import tqdm
    rank, world, device = init_distributed(cfg)
    main_rank = rank == 0  # only rank 0 writes files, logs and shows the progress bar
    ctx, dtype = precision(cfg, device)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: see draw_noise
    os.makedirs(cfg.output_dir, exist_ok=True)
    prompts = load_prompts(cfg.prompts)
    teacher, vae, text_encoder, tokenizer, schedule = load_sd(cfg.pretrained_model_name_or_path, device, dtype)
    check_config(cfg, schedule.T)
    G, fake = build_generator(cfg, teacher, schedule, device), build_fake_score(cfg, teacher, device)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    reward = load_reward(cfg, device, dtype)
    if cfg.compile != "none":  # before DDP wraps them; teacher/VAE/reward are frozen but still run every step
        compile_nets(cfg, [G.unet, fake, teacher, vae.decoder] + ([reward.tower] if reward else []), device)
    if main_rank:
        print("\n".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()) + f"\n(device: {device}, {world} process(es))")
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    # Data parallel: DDP all-reduces (averages) gradients during backward, so each rank's update is the
    # gradient of the mean loss over the global batch. Saving and no-grad evaluation use the bare modules.
    G_train, fake_train = G, fake
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        G_train, fake_train = DDP(G, device_ids=ids), DDP(fake, device_ids=ids)

    G_params, fake_params = trainable(G), trainable(fake)
    opt_G = make_adam(G_params, cfg.learning_rate, cfg, device)
    opt_fake = make_adam(fake_params, cfg.fake_learning_rate, cfg, device)
    scaler_G, scaler_fake = (torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for _ in "ab")
    ema = [p.detach().clone() for p in G_params] if cfg.ema_decay > 0 else None  # (optional) θ_ema
    step = load_checkpoint(cfg, G, fake, opt_G, opt_fake, ema) if cfg.resume_from_checkpoint else 0
    null_emb = encode_prompts(tokenizer, text_encoder, [""])  # (1, 77, D): c = ∅ for CFG
    latent_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    # fixed noise and prompts for the sample grids, from their own generator so training RNG is untouched
    fixed = torch.Generator().manual_seed(cfg.seed)
    val_prompts = [prompts[i % len(prompts)] for i in range(4)]
    val_z = torch.randn((4, *latent_shape), generator=fixed).to(device)  # (4, C, h, w)

    def sample_grid(tag):
        with torch.no_grad(), ctx, ema_weights(G_params, ema):
            images = decode(vae, G(val_z, encode_prompts(tokenizer, text_encoder, val_prompts)))
        save_grid(images, val_prompts, os.path.join(cfg.output_dir, f"samples_{tag}.png"))

    def synced_time():  # --benchmark's per-phase timings on a GPU need the queued kernels to finish;
        if cfg.benchmark and device.type == "cuda":  # training itself waits only once a step (.tolist())
            torch.cuda.synchronize(device)
        return time.perf_counter()

    real_eps, fake_eps, fake_train_eps = unet_eps(teacher), unet_eps(fake), unet_eps(fake_train)
    writes = main_rank and not cfg.benchmark
    log = open(os.path.join(cfg.output_dir, "log.jsonl"), "a") if writes else None
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="dipp", dynamic_ncols=True, disable=not main_rank)
    if step == 0 and writes:
        sample_grid("0000")
    B, timings = cfg.train_batch_size, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the benchmark's peak is the training loop's, not loading's
    while step < cfg.max_train_steps:
        t0 = synced_time()
        if cfg.compile == "reduce-overhead":  # CUDA graphs: last iteration's graph outputs may be reused now
            torch.compiler.cudagraph_mark_step_begin()
        batch = [prompts[i] for i in torch.randint(len(prompts), (world * B,))[rank * B:(rank + 1) * B].tolist()]  # c ~ prompts
        cond = encode_prompts(tokenizer, text_encoder, batch)  # (B, 77, D)
        G_c = lambda z: G_train(z, cond)
        real_c = guided(real_eps, cond, null_emb.expand_as(cond), cfg.guidance_scale)
        reward_c = (lambda x0: reward(decode(vae, x0), batch)) if reward is not None else None
        try:
            # (z, t, ε) for the K_TA fake updates, then for the generator update (drawn up front, same order)
            fake_noise = [draw_noise(B, latent_shape, latent_shape, cfg, device, rank, world)
                          for _ in range(cfg.fake_steps_per_G)]
            noise = draw_noise(B, latent_shape, latent_shape, cfg, device, rank, world)
            x0 = None
            if cfg.reuse_generator_sample:  # NOTE(deviation): Alg. 1 draws a fresh z for the fake update; here
                with ctx:                   # the first one trains on g_θ(z) of the generator update below (same
                    x0 = G_c(noise[0])      # θ, same order of updates; only z is shared), as DMD2 does. Its own
                                            # z is still drawn, so the random stream is the same either way.
            for k, fake_noise_k in enumerate(fake_noise):
                loss_fake = fake_score_step(G_c, lambda x_t, t: fake_train_eps(x_t, t, cond), fake_params,
                                            opt_fake, scaler_fake, fake_noise_k, schedule, cfg, ctx,
                                            x0 if k == 0 else None)
            t1 = synced_time()
            stats = generator_step(G_c, real_c, lambda x_t, t: fake_eps(x_t, t, cond), reward_c, G_params,
                                   opt_G, scaler_G, noise, schedule, cfg, ctx, x0)
        except FloatingPointError as e:
            kept = list_checkpoints(cfg.output_dir)
            die(f"training stopped at step {step + 1}: {e}. Last good checkpoint: "
                f"{kept[-1] if kept else 'none'}; lower --learning_rate or --reward_scale, or try bf16")
        if ema is not None:  # θ_ema ← d·θ_ema + (1 − d)·θ
            for e, p in zip(ema, G_params):
                e.lerp_(p.detach(), 1 - cfg.ema_decay)
        step += 1
        values = torch.stack([loss_fake.float(), stats["loss_ikl"].float(), stats["reward"].float()])
        if world > 1:  # log the global-batch means, not rank 0's share
            torch.distributed.all_reduce(values)
            values /= world
        values = values.tolist()  # waits for the step's queued GPU work, so t2 below is honest either way
        t2 = synced_time()
        timings.append((t1 - t0, t2 - t1))
        stats = {"step": step, **dict(zip(("loss_fake", "loss_ikl", "reward"), values)),
                 "img_per_s": world * B / (t2 - t0)}
        bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k != "step"})
        bar.update(1)
        if not writes:
            continue
        log.write(json.dumps(stats) + "\n")
        log.flush()
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            save_checkpoint(cfg, step, G, fake, opt_G, opt_fake, ema)
        if step % cfg.validation_steps == 0 or step == cfg.max_train_steps:
            sample_grid(f"{step:04d}")
    bar.close()
    result = print_benchmark(cfg, timings, world, device) if cfg.benchmark and main_rank else None
    if writes:
        with ema_weights(G_params, ema):  # the exported generator is the EMA one; G keeps the raw weights
            export_generator(G, os.path.join(cfg.output_dir, "generator"))
    return dict(G=G, fake=fake, teacher=teacher, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                reward=reward, schedule=schedule, benchmark=result)


def print_benchmark(cfg, timings, world, device):
    """One machine-readable line: the mean over the iterations after the first two (warm-up, which is
    also when --compile compiles: warmup_s). With --reuse_generator_sample the shared generator forward
    counts in the fake-score update's time."""
    import resource
    warm = timings[2:] or timings
    fake_s, gen_s = (sum(t[i] for t in warm) / len(warm) for i in (0, 1))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    result = {
        "images_per_s": round(world * cfg.train_batch_size / (fake_s + gen_s), 4),
        "warmup_s": round(sum(map(sum, timings[:2])), 2),
        "s_per_generator_update": round(gen_s, 5), "s_per_fake_update": round(fake_s / cfg.fake_steps_per_G, 5),
        "peak_memory_gib": round(peak / 2 ** 30, 3), "memory_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
        "batch": cfg.train_batch_size, "world": world, "iterations": len(warm), "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": cfg.gradient_checkpointing, "lora_rank": cfg.lora_rank, "compile": cfg.compile,
        "reuse_generator_sample": cfg.reuse_generator_sample,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print("BENCHMARK " + json.dumps(result))
    return result


def export_generator(G, folder):
    """The trained generator as a plain diffusers UNet folder (+ dipp.json with t*); a LoRA generator is
    merged into (a copy of) its base first, so any diffusers pipeline loads it without PEFT."""
    unet = G.unet
    if getattr(unet, "peft_config", None):  # set by add_adapter: this generator is a LoRA adapter
        import copy
        unet = copy.deepcopy(unet).to(torch.float32)  # a copy: fusing writes into the (shared) base weights
        unet.fuse_lora()
        unet.unload_lora()
    unet.save_pretrained(folder)
    with open(os.path.join(folder, "dipp.json"), "w") as f:
        json.dump({"generator_timestep": G.t_star}, f)
    print(f"generator saved to {folder}")


@torch.no_grad()
def generate(cfg):
    """One-step generation: decode(g_θ(z, c)) for each prompt, written as PNGs to output_dir."""
    if not cfg.generator_init:
        die("--generate needs --generator_init DIR (a generator folder written by training)")
    device = pick_device(cfg.device)
    ctx, dtype = precision(cfg, device)
    torch.manual_seed(cfg.seed)
    cfg.lora_rank = 0  # an exported generator is a plain UNet (a LoRA one was merged on export)
    meta = os.path.join(cfg.generator_init, "dipp.json")
    if os.path.isfile(meta):
        cfg.generator_timestep = json.load(open(meta))["generator_timestep"]
    teacher, vae, text_encoder, tokenizer, schedule = load_sd(cfg.pretrained_model_name_or_path, device, dtype)
    check_config(cfg, schedule.T)
    G = build_generator(cfg, teacher, schedule, device).eval()
    prompts = [p.strip() for p in cfg.generate.split("|") if p.strip()]
    latent_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    z = torch.randn((len(prompts), *latent_shape), device=device)  # z ~ N(0, I)
    with ctx:
        images = decode(vae, G(z, encode_prompts(tokenizer, text_encoder, prompts)))
    os.makedirs(cfg.output_dir, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        save_grid(image[None], [prompt], os.path.join(cfg.output_dir, f"generated_{i:02d}.png"))
    print(f"wrote {len(prompts)} images to {cfg.output_dir}")
    return images

# -----------------------------------------------------------------------------
# 9. main


def main(argv=None):
    cfg = parse_config(argv)
    check_config(cfg)
    rank, world, _ = init_distributed(cfg)
    if cfg.tiny or cfg.random_sd15:  # random weights, same code path as SD1.5, nothing downloaded
        shapes = "tiny" if cfg.tiny else "sd15"
        folder = os.path.join(cfg.output_dir, shapes)
        if rank == 0:
            from random_weights import build_random
            build_random(folder, shapes, cfg.seed)
        if world > 1:
            torch.distributed.barrier()  # the other ranks load what rank 0 wrote
        cfg.pretrained_model_name_or_path = os.path.join(folder, "sd")
        if cfg.reward != "none":
            cfg.reward, cfg.reward_model_path = "clip", os.path.join(folder, "clip")
    return generate(cfg) if cfg.generate else train(cfg)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # gloo can abort at interpreter exit (~1 run in 10):
        torch.distributed.barrier()               # leave together, tear down, and skip the
        torch.distributed.destroy_process_group()  # interpreter's own shutdown
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
