"""dipp: a read-along implementation of Diff-Instruct++ (DI++).

DI++ aligns a *one-step* text-to-image generator with human preferences using no image data: it
maximises a reward model's score of the generator's samples while an Integral-KL (IKL) divergence
to a frozen diffusion teacher keeps them realistic. The IKL gradient needs the generator's own
score, so a second diffusion model (the "fake score") is trained online on generator samples.

Paper: W. Luo, "Diff-Instruct++: Training One-step Text-to-image Generator Model to Align with
Human Preferences", arXiv 2410.18881 (TMLR 2025). Formulas follow the project's derivation in
METHOD.md, so no version-specific equation numbers are cited. Builds on Diff-Instruct, arXiv 2305.18455.

Quick start (CPU, no downloads):   python dipp.py --tiny --max_train_steps 2 --output_dir out --overwrite_output_dir
Stable Diffusion 1.5 on one GPU:   python dipp.py --mixed_precision bf16 --gradient_checkpointing
PixArt-α (a DiT) on one GPU:       the same + --pretrained_model_name_or_path PixArt-alpha/PixArt-XL-2-512x512
Generate with a trained generator: python dipp.py --generate "a red bicycle" --generator_init out/generator

Symbols (code name <-> paper, as in METHOD.md §1):   G / OneStepGenerator  g_θ(z, c),  x0 = g_θ(z, c)
  real_eps  ε-prediction of the frozen reference s_ref, CFG-guided: s̃_ref (ω = guidance_scale)
  fake_eps  ε-prediction of the online "TA diffusion" s_ψ             reward_fn  r(x, c)
  Schedule.alpha_sigma(t)  α_t, σ_t of x_t = α_t x0 + σ_t ε            reward_scale  α_rew
  ikl_weight  w(t)      sample_timesteps  π(t)      fake_steps_per_G  K_TA (Alg. 1)
  G.net  the denoiser ε_θ inside g_θ; G.t_star  t*;  families.py: what differs between SD-1.x and PixArt-α

Simplifications vs. the paper (each marked `NOTE(deviation N)` where it happens; a test keeps the two in step):
  1. Discrete DDPM timesteps t ∈ {0..999} stand in for the paper's continuous t (SD1.5 and PixArt-α are discrete).
  2. w(t), π(t) are open in the paper for SD1.5. Defaults w = σ²/α² (Diff-Instruct's σ², VP form) and
     π = U{20..980} (DMD2): on the toy they reach DI++'s exact optimum with the least jitter (docs).
  3. `--timestep_sampling lognormal` (Diff-Instruct's continuous noise levels) moves each draw to the nearest
     discrete timestep.
  4. `--ikl_weighting dmd2`: DMD2's adaptive normaliser depends on the sample: no longer a fixed divergence.
  5. The generator is the teacher's denoiser evaluated once at t* on pure noise (DMD2's recipe; t* = 999 for SD,
     399 for SDXL as DMD2-SDXL, 400 for PixArt-α as PixArt-α-DMD); the paper also starts from other one-step models.
  6. "α_cfg" is taken to mean the standard CFG scale ω; the implicit-reward weight is γ = ω − 1.
  7. (opt-in) `--reward_decoder tiny`: the reward scores TAESD's decoding of x0, not the full VAE's.
  8. (opt-in) `--reuse_generator_sample`: the first fake-score update trains on the generator update's sample.
"""
# -----------------------------------------------------------------------------
# 0. Imports. Heavy libraries (diffusers, transformers, ImageReward) are imported inside the
#    functions that need them, so `import dipp` stays fast for the 2-D toy and the tests.
#    Machinery is called by module, so every call site shows what it is: plumbing.py keeps a run
#    alive (checkpoints, EMA, LoRA sharing, torchrun, compile, export, logs); families.py knows
#    SD-1.x and PixArt-α. Neither imports dipp.
import contextlib
import dataclasses
import math
import os
import sys
import typing

import torch
import torch.nn.functional as F

import families
import plumbing
import rewards

# -----------------------------------------------------------------------------
# 1. Config. Every field is a command-line flag; the inline comment is its --help text.


@dataclasses.dataclass
class Config:
    # --- models (hub id or local folder; each is fetched into the hub cache when online)
    pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the teacher: an SD-1.x or
        # PixArt-α hub id or diffusers folder (denoiser, VAE, text encoder); the family is read from its layout
    generator_init: str = ""  # one-step generator to start from: its model folder, a pipeline folder with unet/ or
        # transformer/ (PixArt-α-DMD), or a weight file (default: a copy of the teacher)
    random_weights: str = ""  # instead of the teacher and reward above, random-weight models of the same architectures
        # built in output_dir/<name>: tiny, tiny_pixart, tiny_sdxl (CPU, seconds) or sd15, pixart512, sdxl (real
        # shapes, for --benchmark)
    tiny: bool = False  # short for --random_weights tiny: the SD1.5 code path on tiny random models, CPU, no download
    # --- method (METHOD.md §2-§5)
    reward: str = "imagereward"  # r(x, c); none = pure Diff-Instruct distillation
    reward_model_path: str = ""  # imagereward: a folder with ImageReward.pt + med_config.json, else THUDM/ImageReward
        # from the hub; clip: a CLIPModel id or folder, else openai/clip-vit-large-patch14
    reward_decoder: str = "full"  # the reward sees the full VAE decoder's images, or TAESD's (tiny: faster,
        # approximate; grids, validation and export keep the full one)
    reward_decoder_path: str = ""  # --reward_decoder tiny: AutoencoderTiny hub id or folder (default:
        # madebyollin/taesd, TAESD for SD latents)
    reward_scale: float = 1.0  # α_rew: weight of the explicit reward (β = 1/α_rew in the RLHF form)
    guidance_scale: float = 1.75  # ω: CFG scale of the teacher; γ = ω−1 is the implicit-reward weight (DMD2 SD1.5:
        # 1.75)
    generator_timestep: int = 0  # t*: the timestep at which the generator's denoiser sees noise z; 0 = the family's
        # (SD 999, PixArt-α 400, SDXL 399)
    fake_steps_per_G: int = 1  # K_TA: fake-score updates per generator update (Alg. 1; DMD2 uses 10)
    # NOTE(deviation 2): the paper fixes no w(t), π(t) for SD1.5. x0 + uniform are kept because on the toy's
    # exact optimum (docs/toy.md, "DI++'s exact optimum") they land within 4 % of m* with the least jitter; the
    # lognormal π jitters more and piles 26 % of its draws on t_min; dmd2 overshoots and can run away.
    t_min: int = 20  # π(t) lives on {t_min..t_max}: timesteps at which the IKL and DSM losses are evaluated
    t_max: int = 980  # upper end of π(t)
    timestep_sampling: str = "uniform"  # π(t): uniform is U{t_min..t_max} (DMD2); lognormal is log σ_t/α_t ~ N(−1.2,
        # 1.2²) (Diff-Instruct/EDM)
    ikl_weighting: str = "x0"  # w(t): x0 is σ²/α² (Diff-Instruct); eps is σ/α; dmd2 is DMD2's adaptive normaliser
    # --- data
    prompts: str = ""  # training prompts: a text file, one prompt per line, or a named set: python promptsets.py
        # lists them (default: 8 built-in prompts)
    validation_prompts: str = ""  # held-out prompts: a file or a named set, as --prompts (default: 8 built-in
        # prompts disjoint from the training ones)
    # --- optimisation
    train_batch_size: int = 1  # prompts per step (per process under torchrun)
    max_train_steps: int = 1000  # generator updates
    learning_rate: float = 1e-5  # generator learning rate (Diff-Instruct / DMD2: 1e-5)
    fake_learning_rate: float = 1e-5  # fake-score learning rate
    adam_beta1: float = 0.0  # Adam β1 for both nets (Diff-Instruct uses 0: the loss landscape moves every step)
    adam_beta2: float = 0.999  # Adam β2
    max_grad_norm: float = 0.0  # clip each net's gradient norm; 0 = off, as Diff-Instruct (clipping the summed IKL
        # gradient would cancel w(t))
    ema_decay: float = 0.0  # (optional) EMA of the generator's trainable weights, e.g. 0.999; grids and export use it;
        # 0 = off
    lora_rank: int = 0  # 0 = full fine-tuning; R > 0 = generator and fake score as rank-R LoRA adapters on one shared
        # frozen denoiser
    gradient_checkpointing: bool = False  # recompute activations of generator, fake score, VAE decoder, reward tower
        # (less memory)
    mixed_precision: str = "no"  # autocast with fp32 master weights; frozen nets stored in it (fp16 needs CUDA)
    shard: str = "none"  # under torchrun: none = DDP (each process holds the generator and fake score whole); fsdp =
        # FSDP2, each of N processes holds 1/N of their weights, gradients and Adam states (full fine-tuning of SDXL)
    compile: str = "none"  # torch.compile mode for all five networks (same math, fused kernels); the first steps
        # compile, for minutes on SD1.5
    reuse_generator_sample: bool = False  # first fake-score update trains on the generator update's own sample, as DMD2
        # (one generator forward less per step; z is shared)
    # --- bookkeeping
    output_dir: str = "dipp-out"  # where config.json, log.jsonl, samples, checkpoints and generator/ go
    overwrite_output_dir: bool = False  # a fresh run into a folder holding another run deletes that run first (without
        # it: an error)
    checkpointing_steps: int = 500  # save a resumable checkpoint every N steps
    checkpoints_total_limit: int = 3  # keep the newest K checkpoints; 0 = keep all
    resume_from_checkpoint: str = ""  # 'latest' (in --output_dir) or the path of a checkpoint-N folder
    validation_steps: int = 100  # every N steps: held-out reward on --validation_prompts with fixed noise, and a sample
        # grid
    report_to: str = "none"  # also send log.jsonl's numbers to TensorBoard or wandb (the package must be installed)
    seed: int = 0  # seeds torch once at start-up
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...
    # --- modes (instead of training)
    generate: str = ""  # prompts separated by '|': write one image each from --generator_init, then exit
    benchmark: bool = False  # time --max_train_steps iterations and print one BENCHMARK json line; writes no config,
        # log, grid or checkpoint


CHOICES = {"reward": ("imagereward", "clip", "none"), "mixed_precision": ("no", "fp16", "bf16"),
           "ikl_weighting": ("x0", "eps", "dmd2"), "timestep_sampling": ("uniform", "lognormal"),
           "compile": ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead"),
           "report_to": ("none", "tensorboard", "wandb"), "reward_decoder": ("full", "tiny"), "shard": ("none", "fsdp"),
           "random_weights": ("tiny", "tiny_pixart", "tiny_sdxl", "sd15", "pixart512", "sdxl")}
BUILTIN_PROMPTS = ["a photo of a red bicycle leaning on a brick wall", "a watercolor painting of a fox",
                   "a bowl of ramen, studio lighting", "a lighthouse on a cliff at sunset",
                   "an astronaut riding a horse", "a cozy living room with a fireplace",
                   "a close-up portrait of an old fisherman", "a castle in the clouds, fantasy art"]
VALIDATION_PROMPTS = ["a golden retriever running on a beach", "a still life of apples and a jug, oil painting",
                      "a snowy mountain village at night", "a robot reading a book in a library",
                      "a hot air balloon over green hills", "a plate of sushi on a wooden table",
                      "a portrait of a woman in a red coat, rain", "a sailing ship in a storm, dramatic light"]


def parse_config(argv=None):
    """Every Config field is a flag --field: type from its annotation, help from its inline comment, --help
    grouped by the `# ---` comments above. --tiny is resolved here into --random_weights tiny."""
    blocks = __doc__.split("\n\n")
    cfg = plumbing.parse_dataclass(Config, argv, CHOICES, prog="dipp.py", description=blocks[1] + "\n\n" + blocks[3],
                                   renamed={"--random_sd15": "--random_weights sd15"})
    if cfg.tiny and cfg.random_weights not in ("", "tiny"):
        plumbing.die(f"--tiny is short for --random_weights tiny; drop it or --random_weights {cfg.random_weights}")
    cfg.random_weights = "tiny" if cfg.tiny else cfg.random_weights
    return cfg


def check_config(cfg, T=1000):
    """Reject settings that would crash deep inside a library or train silently wrong: one line each.
    T: the schedule's number of timesteps (known once the model is loaded)."""
    die = plumbing.die
    for f in dataclasses.fields(cfg):
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            die(f"--{f.name} {getattr(cfg, f.name)} is not a finite number")
    for name in ("learning_rate", "fake_learning_rate"):
        if getattr(cfg, name) <= 0:
            die(f"--{name} {getattr(cfg, name)} must be > 0 (Diff-Instruct and DMD2 use 1e-5)")
    if not (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1):
        die(f"--adam_beta1/--adam_beta2 must be in [0, 1), got {cfg.adam_beta1}, {cfg.adam_beta2}")
    for name in ("max_grad_norm", "lora_rank", "checkpoints_total_limit"):
        if getattr(cfg, name) < 0:
            die(f"--{name} {getattr(cfg, name)} must be >= 0 (0 = off)")
    if not 0 <= cfg.ema_decay < 1:
        die(f"--ema_decay {cfg.ema_decay} must be in [0, 1): 0 = off, 0.999 = a ~1000-step average")
    if not 0 <= cfg.generator_timestep < T:
        die(f"--generator_timestep {cfg.generator_timestep} is outside the schedule; use 1..{T - 1} (0 = the family's)")
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
    plumbing.check_shard(cfg)  # --shard fsdp with a switch it does not support yet: one line

# -----------------------------------------------------------------------------
# 2. Forward process and noise (METHOD.md §1): x_t = α_t x0 + σ_t ε, variance preserving (α² + σ² = 1).


class Schedule:
    """The DDPM noise schedule as α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t), t ∈ {0..T−1}.
    NOTE(deviation 1): the paper's t is continuous; SD1.5 and PixArt-α were trained on T = 1000 discrete
    timesteps, so t is an integer here and every integral over t is a sum over them."""

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).float()  # (T,)
        self.T = len(self.alphas_cumprod)
        self.on_device = {}  # a copy per device, made once: a host→device copy per call would sync every step

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, T=1000):
        """SD1.5's schedule: β_t linear in sqrt-space; computed in float64, stored in float32."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    def on(self, device):
        """ᾱ_t (T,) on `device`, copied there the first time it is asked for."""
        device = torch.device(device)
        if device not in self.on_device:
            self.on_device[device] = self.alphas_cumprod.to(device)
        return self.on_device[device]

    def alpha_sigma(self, t, ndim):
        """α_t, σ_t for integer timesteps t (B,), shaped (B, 1, ..., 1) to broadcast over x."""
        abar = self.on(t.device)[t].view(-1, *[1] * (ndim - 1))  # (B, 1, ..)
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
    # NOTE(deviation 3): Diff-Instruct draws a continuous VE noise level; SD1.5 has 1000 discrete ones, so
    # each draw goes to the nearest (in log σ/α) timestep and the tails beyond t_min/t_max to the ends.
    # Without a schedule (the toy, old callers) SD-1.x's scaled-linear one is used.
    abar = (schedule or Schedule.scaled_linear()).on(device)[t_min:t_max + 1]  # (n,)
    log_sigma_ve = 0.5 * torch.log((1 - abar) / abar)  # (n,), increasing in t
    edges = (log_sigma_ve[1:] + log_sigma_ve[:-1]) / 2  # (n−1,) midpoints: nearest-neighbour boundaries
    log_sigma = LOGNORMAL_MEAN + LOGNORMAL_STD * torch.randn(B, device=device)  # log σ_VE ~ N(−1.2, 1.2²)
    return t_min + torch.bucketize(log_sigma, edges)  # (B,): nearest t; the tails land on the ends


def draw_noise(B, z_shape, x_shape, cfg, device, rank=0, world=1, schedule=None):
    """z ~ N(0, I), t ~ π(t), ε ~ N(0, I) for one update. Every rank draws the *global* batch of world·B
    from the same seed and keeps its own slice, so N ranks see exactly the samples that one process
    with batch N·B sees (and the data-parallel test can demand identical results)."""
    n, mine = world * B, slice(rank * B, (rank + 1) * B)
    own = lambda x: x[mine].clone() if world > 1 else x  # a copy of this rank's slice frees the global batch
    z = own(torch.randn((n, *z_shape), device=device))  # z ~ N(0, I)
    t = own(sample_timesteps(n, cfg.t_min, cfg.t_max, device, cfg.timestep_sampling, schedule))  # t ~ π(t)
    eps = own(torch.randn((n, *x_shape), device=device))  # ε ~ N(0, I)
    return z, t, eps

# -----------------------------------------------------------------------------
# 3. The one-step generator g_θ. Every network is seen by the method as an ε-predictor: eps(x_t, t, c)
#    -> ε̂, its family's call bound once (denoiser_eps, OneStepGenerator), so the same generator, losses
#    and Alg. 1 run on a UNet, a DiT and a 2-D MLP. Score and ε are one thing in two units: s = −ε̂ / σ_t.


def denoiser_eps(net, family):
    """A diffusers denoiser of `family` (families.py) as eps(x_t, t, c) -> ε̂ in fp32. Inputs are cast to the
    net's dtype: the frozen teacher is stored in bf16/fp16 under --mixed_precision."""
    dtype = next(net.parameters()).dtype  # (a DDP wrapper has no .dtype of its own)

    def eps(x_t, t, cond):
        return family.eps(net, x_t.to(dtype), t, cond.to(dtype)).float()
    return eps


class OneStepGenerator(torch.nn.Module):
    """g_θ(z, c): the denoiser `net` of `family` (a UNet or PixArt's transformer, see families.py) evaluated once
    at t* on pure noise, read out as x̂0 (one step, no sampler):

        x0 = g_θ(z, c) = (z − σ_{t*} ε̂_θ(z, t*, c)) / α_{t*}                  (METHOD.md §1)

    NOTE(deviation 5): the paper leaves the one-step parameterisation to the initial model; we use DMD2's:
    z itself is the input (in VP, x_t has unit variance for unit-variance data, as SD latents roughly
    are), and t* = 999 for SD; 400 for PixArt-α, as PixArt-α-DMD (its linear schedule has α_999 = 0.0064,
    which would amplify ε errors 157×). With this choice a stock diffusers pipeline run for one step at t*
    reproduces our samples exactly."""

    def __init__(self, net, family, schedule, t_star):
        super().__init__()
        self.net, self.family, self.schedule, self.t_star = net, family, schedule, t_star

    def forward(self, z, cond):
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.long)  # (B,)
        alpha, sigma = self.schedule.alpha_sigma(t, z.ndim)
        eps_hat = self.family.eps(self.net, z, t, cond)  # (B, 4, h, w): fp32 master weights, no cast needed
        return predict_x0(z, eps_hat, alpha, sigma)  # x0: (B, 4, h, w), a latent


def build_generator(cfg, teacher, family, schedule, device):
    """g_θ: a trainable fp32 copy of the teacher's denoiser (or of --generator_init: a model folder, a pipeline
    folder holding one, or a weight file on the teacher's config; or a LoRA adapter on the teacher) used as a
    one-step model."""
    import copy
    if cfg.lora_rank:
        if cfg.generator_init:
            plumbing.die("--lora_rank trains an adapter on the teacher and cannot start from --generator_init; "
                         "drop one")
        net = plumbing.lora_copy(teacher, cfg.lora_rank, "generator", family.lora_targets)
    elif os.path.isfile(cfg.generator_init):  # a bare weight file, as DMD2 releases its SD1.5 generator
        net = plumbing.load_weights_or_die(teacher.__class__.from_config(teacher.config), cfg.generator_init)
        net.to(device).float().requires_grad_(True)
    elif cfg.generator_init:  # a model folder (dipp exports one), a pipeline folder (PixArt-α-DMD, DI++-SDXL), hub id
        name, sub = cfg.generator_init, families.generator_subfolder(family, cfg.generator_init)
        load = lambda: plumbing.from_pretrained_any_variant(type(teacher), name, sub, torch_dtype=torch.float32)
        net = plumbing.load_or_die(load, name, f"the --generator_init {family.denoiser}")
        net.to(device).requires_grad_(True)
    else:
        net = copy.deepcopy(teacher).to(device).float().requires_grad_(True)  # fp32 master weights
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    net = families.readout_in_fp32(net, family).train()
    return OneStepGenerator(net, family, schedule, cfg.generator_timestep or family.t_star)

# -----------------------------------------------------------------------------
# 4. The frozen teacher s_ref with classifier-free guidance (METHOD.md §5)


def cfg_eps(eps_cond, eps_uncond, omega):
    """Classifier-free guidance: s̃ = s_∅ + ω (s_c − s_∅) = s_c + (ω−1)(s_c − s_∅).
    ω = 1 is the plain conditional teacher; the extra (ω−1)(s_c − s_∅) is the implicit reward's pull.
    NOTE(deviation 6): the paper's α_cfg is read as this standard ω, so the implicit-reward weight is ω − 1."""
    return eps_uncond + omega * (eps_cond - eps_uncond)


def batch_cat(a, b):
    """Two conditionings stacked along the batch: tensors, or tuples of tensors (PixArt's text + mask)."""
    return torch.cat([a, b]) if torch.is_tensor(a) else type(a)(*map(batch_cat, a, b))


def guided(eps_fn, cond, uncond, omega):
    """The teacher s̃_ref as a closure eps(x_t, t): cond and uncond in one batched call (one denoiser pass)."""
    def eps(x_t, t):
        if omega == 1:
            return eps_fn(x_t, t, cond)
        e_c, e_u = eps_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), batch_cat(cond, uncond)).chunk(2)
        return cfg_eps(e_c, e_u, omega)
    return eps


def load_teacher(name, device, dtype, text_encoder=True):
    """The frozen reference of any family (families.py picks it from the folder or hub id): its denoiser,
    VAE, text encoder (None unless asked), tokenizer and noise schedule, as a families.Models."""
    models = families.load_models(name, device, dtype, text_encoder)
    return models._replace(schedule=Schedule(models.schedule))

# -----------------------------------------------------------------------------
# 5. The fake score s_ψ (the paper's "TA diffusion"), METHOD.md §4


def build_fake_score(cfg, teacher, family, device):
    """s_ψ, initialised from the reference (so that s_ψ = s_ref before training, as in Diff-Instruct and DMD2):
    an fp32 copy of the teacher, or a LoRA adapter on it."""
    if cfg.lora_rank:
        fake = plumbing.lora_copy(teacher, cfg.lora_rank, "fake_score", family.lora_targets)
    else:
        fake = teacher.__class__.from_config(teacher.config)
        fake.load_state_dict(teacher.state_dict())
        fake.to(device).float()  # (.float(), not .to(dtype): diffusers warns on the latter)
    if cfg.gradient_checkpointing:
        fake.enable_gradient_checkpointing()
    return families.readout_in_fp32(fake, family).train()

# -----------------------------------------------------------------------------
# 6. Rewards: reward(images in [-1, 1] (B, 3, H, W), prompts) -> (B,), differentiable in images (rewards.py).


def load_reward(cfg, device, dtype):
    """Build reward_fn(images, prompts), or None for --reward none (the models themselves: rewards.py)."""
    return rewards.load(cfg.reward, cfg.reward_model_path, device, dtype, cfg.gradient_checkpointing)

def load_reward_decoder(cfg, family, vae, device, dtype):
    """The decoder whose images the reward scores: the full VAE, or (--reward_decoder tiny) TAESD.
    NOTE(deviation 7): with TAESD the reward's gradient reaches x0 through an approximate decoder (a distilled
    ~1M-parameter one, much cheaper than the VAE decoder whose forward and backward are ~30 % of a step on
    SD1.5), so the reward is that of TAESD's image, not of the image the user will see."""
    if cfg.reward_decoder == "full" or cfg.reward == "none":
        return vae
    from diffusers import AutoencoderTiny
    name = cfg.reward_decoder_path or family.tiny_decoder
    taesd = plumbing.load_or_die(lambda: AutoencoderTiny.from_pretrained(name), name,
                                 "the --reward_decoder tiny weights (TAESD)")
    if cfg.gradient_checkpointing:
        taesd.enable_gradient_checkpointing()
    return plumbing.freeze(taesd, device, dtype)


def decode(vae, x0):
    """Latent x0 -> image in [-1, 1] (B, 3, H, W). SD latents are scaled by vae.config.scaling_factor."""
    dtype = vae.dtype
    with plumbing.autocast_off(x0) if dtype == torch.float32 else contextlib.nullcontext():
        return vae.decode(x0.to(dtype) / vae.config.scaling_factor).sample.float()

# -----------------------------------------------------------------------------
# 7. Losses (METHOD.md §2-§5). Each returns a per-sample loss (B,); callers take the mean.


def ikl_weight(kind, alpha, sigma, x0=None, x0_real=None):
    """w(t) of the IKL, in score units. What each means for the generator's gradient ∂L/∂x0:
        x0 : w = σ²/α²  ->  ∂L/∂x0 = x̂0_fake − x̂0_ref  (difference of the two denoisers; Diff-Instruct's
             σ² weight of VE, rewritten for VP)
        eps: w = σ/α    ->  ∂L/∂x0 = ε̂_ref − ε̂_fake    (bounded; the SDS-style weight)
        dmd2: x0-weight / mean|x0 − x̂0_ref| per sample. NOTE(deviation 4): DMD2's adaptive normaliser
             depends on the sample, so the objective is no longer a fixed divergence."""
    if kind == "x0":
        return sigma ** 2 / alpha ** 2
    if kind == "eps":
        return sigma / alpha
    norm = (x0 - x0_real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)  # (B, 1, ..)
    return sigma ** 2 / alpha ** 2 / norm.clamp_min(1e-5)  # clamp: x0 may already equal the teacher's x̂0


def ikl_loss(x0, t, eps, schedule, real_eps, fake_eps, weighting="x0", with_grad=False):
    """Generator surrogate of the Integral KL, METHOD.md §3 (Diff-Instruct's key identity):
        ∇_θ D_IKL = E_{t,ε}[ w(t) (s_fake(x_t,t) − s̃_ref(x_t,t))ᵀ ∂x_t/∂θ ],  x_t = α_t g_θ(z) + σ_t ε
        L_G = w(t) ⟨ sg[s_fake − s̃_ref], x_t ⟩   so   ∂L_G/∂x0 = w α (ε̃_ref − ε̂_fake) / σ
    The loss *value* means nothing; its gradient is the estimator. Intuition: push each sample from
    where the generator's own density is high towards where the teacher's is. with_grad=True also returns
    that closed-form ∂L_G/∂x0 (B, ...), detached, for logging the size of the IKL's pull."""
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0, eps, alpha, sigma)  # (B, ...): carries the gradient to θ through x0
    with torch.no_grad():  # sg[·]: neither score network is differentiated, only the explicit x_t
        e_real = real_eps(x_t.detach(), t)
        e_fake = fake_eps(x_t.detach(), t)
        x0_real = predict_x0(x_t, e_real, alpha, sigma)
        w = ikl_weight(weighting, alpha, sigma, x0.detach(), x0_real)
        # s_fake − s̃_ref = (−ε̂_fake + ε̃_ref) / σ   (score = −ε/σ)
        score_diff = w * (e_real - e_fake) / sigma  # (B, ...)
    # ⟨·,·⟩ sums over dimensions (a per-sample divergence, as Diff-Instruct's code sums); this sets α_rew's scale
    loss = (score_diff * x_t).flatten(1).sum(1)  # (B,)
    return (loss, alpha * score_diff) if with_grad else loss  # ∂L_G/∂x0 = α · score_diff: x_t = α x0 + σ ε


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
# 8. One DI++ iteration, Alg. 1: K_TA fake-score updates with θ frozen, then one generator update with ψ frozen.


def fake_score_step(G, fake_eps, fake_params, opt, scaler, noise, schedule, cfg, ctx=contextlib.nullcontext(),
                    x0=None):
    """One fake-score (TA diffusion) update on fresh generator samples. G(z) and fake_eps(x_t, t) are
    closures with their conditioning bound; noise = (z, t, ε) from draw_noise. x0: a sample g_θ(z) the
    caller already has (--reuse_generator_sample), used instead of G(z). Returns the DSM loss and whether
    fp16's loss scaler skipped the step."""
    z, t, eps = noise
    with ctx:
        if x0 is None:
            with torch.no_grad():
                x0 = G(z)
        loss = fake_score_loss(fake_eps, x0.detach(), t, eps, schedule).mean()  # θ frozen: x0 = sg[g_θ(z)]
    _, skipped = plumbing.optimizer_step(loss, fake_params, opt, scaler, cfg.max_grad_norm)
    return {"loss_fake": loss.detach(), "skipped": skipped}


def rms(g):
    return g.flatten(1).pow(2).mean(1).sqrt().mean()  # per-sample RMS over dimensions, averaged over the batch


def generator_step(G, real_eps, fake_eps, reward_fn, G_params, opt, scaler, noise, schedule, cfg,
                   ctx=contextlib.nullcontext(), x0=None):
    """One generator update, METHOD.md §2-§3:  L_G = D_IKL surrogate − α_rew · r(g_θ(z), c).
    real_eps is the (CFG-guided) teacher, so the implicit reward (ω−1)·r_cfg is already inside the IKL
    term. ψ is not stepped here; its gradients are never computed (no_grad inside ikl_loss).
    x0: G(z) already computed *with* its graph (--reuse_generator_sample), else computed here.
    Also returns the size of each term's pull on the sample, for choosing α_rew (plumbing.PullOnSample)."""
    z, t, eps = noise
    B = z.shape[0]
    with ctx:
        x0 = G(z) if x0 is None else x0  # (B, ...): the only path by which θ receives gradient
        loss_ikl, grad_ikl = ikl_loss(x0, t, eps, schedule, real_eps, fake_eps, cfg.ikl_weighting, with_grad=True)
        loss = loss_ikl.mean()
        reward = x0.new_full((B,), float("nan"))  # (B,): logged as nan with --reward none
        if reward_fn is not None:
            reward = reward_fn(x0)  # (B,)
            loss = loss + reward_loss(reward, cfg.reward_scale).mean()
    pull = plumbing.PullOnSample(x0, grad_ikl, watch=reward_fn is not None)
    scale, skipped = plumbing.optimizer_step(loss, G_params, opt, scaler, cfg.max_grad_norm)
    return {"loss_ikl": loss_ikl.detach().mean(), "reward": reward.detach().mean(), "grad_ikl": rms(grad_ikl),
            "grad_reward": rms(pull.rest(scale)), "skipped": skipped}


class Bound(typing.NamedTuple):
    """One batch's networks with its prompts c bound: all that Alg. 1 sees (closures over x or z only)."""
    G: typing.Callable  # z -> x0 = g_θ(z, c)   (under torchrun: through DDP, so backward averages gradients)
    real_eps: typing.Callable  # (x_t, t) -> ε̃_ref: the frozen teacher with CFG
    fake_eps: typing.Callable  # (x_t, t) -> ε̂_ψ: the fake score as the generator's IKL reads it (no gradient)
    fake_train_eps: typing.Callable  # (x_t, t) -> ε̂_ψ as its own DSM update trains it (DDP under torchrun)
    reward: typing.Optional[typing.Callable]  # x0 -> r(decode(x0), c), or None for --reward none


def dipp_step(nets, fake_opt, G_opt, noises, schedule, cfg, ctx=contextlib.nullcontext(), clock=lambda: 0.0):
    """One iteration of Alg. 1. nets: Bound; *_opt: (params, optimiser, loss scaler); noises: K_TA + 1 draws
    of (z, t, ε), the fake-score updates' first and the generator update's last. Returns the last fake-score
    update's stats (with "skipped": how many of the K_TA updates fp16's loss scaler skipped), the generator
    update's, and clock() between the two phases (--benchmark times them apart)."""
    *fake_noises, noise = noises
    x0 = None
    if cfg.reuse_generator_sample:  # NOTE(deviation 8): Alg. 1 draws a fresh z for the fake update; here
        with ctx:                   # the first one trains on g_θ(z) of the generator update below (same
            x0 = nets.G(noise[0])   # θ, same order of updates; only z is shared), as DMD2 does. Its own
    skipped = 0                     # z is still drawn, so the random stream is the same either way.
    # (1) K_TA fake-score updates: DSM on sg[g_θ(z)] teaches s_ψ the generator's current distribution
    for k, fake_noise in enumerate(fake_noises):
        fake_stats = fake_score_step(nets.G, nets.fake_train_eps, *fake_opt, fake_noise, schedule, cfg, ctx,
                                     x0 if k == 0 else None)
        skipped += fake_stats["skipped"]
    t_fake = clock()
    # (2) one generator update: IKL towards the CFG teacher (the implicit reward inside) − α_rew · r
    stats = generator_step(nets.G, nets.real_eps, nets.fake_eps, nets.reward, *G_opt, noise, schedule, cfg, ctx, x0)
    return {**fake_stats, "skipped": skipped}, stats, t_fake

# -----------------------------------------------------------------------------
# 9. The training loop: Alg. 1 repeated, with what keeps a real run alive (torchrun, resume, checkpoints,
#    signals, logs, EMA). Machinery lives in plumbing.py, called by module.


def precision(cfg, device):
    """(autocast context, dtype of the frozen nets) for --mixed_precision. Trainable nets keep fp32 master
    weights; the readout layers run in fp32 (families.readout_in_fp32); the VAE stays fp32 under fp16."""
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext(), torch.float32
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        plumbing.die(f"--mixed_precision fp16 needs a CUDA GPU (device is {device}); use bf16 or no")
    dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), dtype


def train(cfg):
    from tqdm import tqdm
    rank, world, device = plumbing.init_distributed(cfg)
    main_rank = rank == 0  # only rank 0 writes files, logs and shows the progress bar
    writes = main_rank and not cfg.benchmark
    ctx, dtype = precision(cfg, device)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: see draw_noise
    if not cfg.benchmark:  # one line for an unwritable folder; never mix this run with another's files
        plumbing.prepare_output_dir(cfg, main_rank)
    prompts = plumbing.load_prompts(cfg.prompts, BUILTIN_PROMPTS, "--prompts")
    val_prompts = plumbing.load_prompts(cfg.validation_prompts, VALIDATION_PROMPTS, "--validation_prompts")
    fam, teacher, vae, _, tokenizer, schedule = load_teacher(cfg.pretrained_model_name_or_path, device, dtype,
                                                             text_encoder=False)
    cfg.generator_timestep = cfg.generator_timestep or fam.t_star  # 0 = the family's default t*
    check_config(cfg, schedule.T)
    # prompts -> c; PixArt's T5 and SDXL's two CLIPs encode the three lists once, then are freed (before G and ψ exist)
    text, text_encoder = families.text_conditioning(
        cfg.pretrained_model_name_or_path, fam, tokenizer, [prompts, val_prompts, [fam.null_prompt]], device, dtype,
        os.path.join(cfg.output_dir, "text_embeddings"), main_rank, world)
    G, fake = build_generator(cfg, teacher, fam, schedule, device), build_fake_score(cfg, teacher, fam, device)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    reward, reward_vae = load_reward(cfg, device, dtype), load_reward_decoder(cfg, fam, vae, device, dtype)
    if cfg.compile != "none":  # before DDP wraps them; teacher/VAE/reward are frozen but still run every step
        plumbing.compile_nets(cfg, [G.net, fake, teacher, reward_vae.decoder] + ([reward.tower] if reward else []),
                              device)
    sharded = cfg.shard == "fsdp" and world > 1  # (--shard fsdp in one process: nothing to shard, a plain run)
    note = ", FSDP2" if sharded else ", one process: nothing to shard" if cfg.shard != "none" else ""
    plumbing.record_config(cfg, main_rank, writes, f"(device: {device}, {world} process(es){note})")  # + config.json
    # Data parallel: DDP all-reduces (averages) gradients during backward, so each rank's update is the
    # gradient of the mean loss over the global batch. Saving and no-grad evaluation use the bare modules.
    # --shard fsdp: FSDP2 shards G's denoiser and ψ in place instead (plumbing.shard; same averaged update), so every
    # rank must run each call of them, also validation and saving. The frozen teacher, VAE and reward stay whole.
    for net in (G.net, fake) if sharded else ():
        plumbing.shard(net, fam.shard_units, fam.readout, dtype)
    G_train, fake_train = (m if sharded else plumbing.data_parallel(m, device, world) for m in (G, fake))

    G_params, fake_params = plumbing.trainable(G), plumbing.trainable(fake)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_G = plumbing.make_adam(G_params, cfg.learning_rate, betas, device)
    opt_fake = plumbing.make_adam(fake_params, cfg.fake_learning_rate, betas, device)
    scaler_G, scaler_fake = (torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for _ in "ab")
    states = dict(opt_G=opt_G, opt_fake=opt_fake, scaler_G=scaler_G, scaler_fake=scaler_fake)  # checkpointed
    trained = {"generator": G.net, "fake_score": fake}  # what a checkpoint holds (their trainable tensors)
    ema = [p.detach().clone() for p in G_params] if cfg.ema_decay > 0 else None  # (optional) θ_ema
    step = (plumbing.load_checkpoint(cfg, trained, states, ema, rank, world, device)
            if cfg.resume_from_checkpoint else 0)
    null_emb = families.null_condition(fam, text)  # c = ∅ for CFG: the empty prompt's c (SDXL: zeroed)
    latent_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    # fixed noise for the held-out prompts, from its own generator so the training RNG is untouched
    val_z = torch.randn((len(val_prompts), *latent_shape), generator=torch.Generator().manual_seed(cfg.seed))

    # held-out reward (mean, spread) of decode(g_θ(z_i, c_i)) with the same z_i every time, and a sample grid
    sample = lambda z, c: decode(vae, G(z.to(device), text(c)))  # the full decoder: what the user will see
    validate = lambda tag: plumbing.held_out_reward(
        sample, reward, val_prompts, val_z, cfg.train_batch_size, [ctx, plumbing.ema_weights(G_params, ema)],
        os.path.join(cfg.output_dir, f"samples_{tag}.png") if main_rank else None)
    validates = writes or (sharded and not cfg.benchmark)  # (a sharded G runs only when every rank runs it)
    synced_time = plumbing.benchmark_clock(cfg, device)  # per-phase timings; synced on a GPU only under --benchmark
    import cost  # (cost.py imports dipp) --benchmark: the FLOPs of the first, untimed, iteration; else does nothing
    flops = cost.FirstIteration(cfg.benchmark)

    real_eps, fake_eps, fake_train_eps = (denoiser_eps(net, fam) for net in (teacher, fake, fake_train))
    log = plumbing.RunLog(cfg, step) if writes else None
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="dipp", dynamic_ncols=True, disable=not main_rank)
    if step == 0 and validates:
        held_out = validate("0000")
        if writes:
            log.write({"step": 0, **held_out})
    B, timings, skipped = cfg.train_batch_size, [], {"skipped_G": 0, "skipped_fake": 0}
    startup_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the benchmark's peak is the training loop's, not loading's
    with plumbing.StopSignals() as signals:
        while step < cfg.max_train_steps:
            t0 = synced_time()
            if cfg.compile == "reduce-overhead":  # CUDA graphs: last iteration's graph outputs may be reused now
                torch.compiler.cudagraph_mark_step_begin()
            flops.begin()
            # c ~ the prompt list, uniformly: every rank draws the global batch and keeps its slice (draw_noise)
            batch = [prompts[i] for i in torch.randint(len(prompts), (world * B,))[rank * B:(rank + 1) * B].tolist()]
            cond = text(batch)  # c: (B, 77, D), or MaskedText((B, 120, D), (B, 120)), or SDXLText
            nets = Bound(G=lambda z: G_train(z, cond),
                         real_eps=guided(real_eps, cond, null_emb.expand_as(cond), cfg.guidance_scale),
                         fake_eps=lambda x_t, t: fake_eps(x_t, t, cond),
                         fake_train_eps=lambda x_t, t: fake_train_eps(x_t, t, cond),
                         reward=(lambda x0: reward(decode(reward_vae, x0), batch)) if reward is not None else None)
            # (z, t, ε) for the K_TA fake updates, then for the generator update (drawn up front, in that order)
            noises = [draw_noise(B, latent_shape, latent_shape, cfg, device, rank, world, schedule)
                      for _ in range(cfg.fake_steps_per_G + 1)]
            try:
                fake_stats, stats, t1 = dipp_step(nets, (fake_params, opt_fake, scaler_fake),
                                                  (G_params, opt_G, scaler_G), noises, schedule, cfg, ctx, synced_time)
            except FloatingPointError as e:  # one line naming the last good checkpoint
                plumbing.die_non_finite(cfg, step + 1, e)
            flops.end()
            skipped["skipped_fake"] += fake_stats["skipped"]  # fp16 overflow: GradScaler skipped; counted, not hidden
            skipped["skipped_G"] += stats["skipped"]
            if ema is not None:  # (optional) θ_ema ← d·θ_ema + (1 − d)·θ
                plumbing.ema_update(ema, G_params, cfg.ema_decay)
            step += 1
            # global-batch means over ranks (and whether a signal reached any rank); waits for the step's GPU work
            values, stop = plumbing.global_means({"loss_fake": fake_stats["loss_fake"], **{k: stats[k] for k in (
                "loss_ikl", "reward", "grad_ikl", "grad_reward")}}, signals.requested, world)
            t2 = synced_time()
            timings.append((t1 - t0, t2 - t1))
            stats = {"step": step, **values, "grad_ratio": values["grad_reward"] / max(values["grad_ikl"], 1e-30),
                     "img_per_s": world * B / (t2 - t0), **(skipped if scaler_G.is_enabled() else {})}
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k not in ("step", "loss_ikl")})
            bar.update(1)
            if cfg.benchmark:
                continue
            last = step == cfg.max_train_steps or stop
            if step % cfg.checkpointing_steps == 0 or last:
                rng = plumbing.rng_states(device, world)  # a collective: every rank's RNG, so resume replays nothing
                # every rank calls it (a sharded net is gathered whole first); rank 0 writes
                plumbing.save_checkpoint(cfg, step, trained, G.t_star, states, ema, rng, write=main_rank)
            held_out = validate(f"{step:04d}") if validates and (step % cfg.validation_steps == 0 or last) else {}
            if main_rank:
                log.write({**stats, **held_out})
            if stop:  # checkpoint-{step} is written: say how to resume, exit 130 (SIGINT) or 143 (SIGTERM)
                bar.close()
                signals.exit(cfg, step, log if main_rank else None)
    bar.close()
    result = None
    if cfg.benchmark and main_rank:
        switches = ("mixed_precision", "gradient_checkpointing", "lora_rank", "compile", "reuse_generator_sample")
        result = plumbing.print_benchmark(timings, B, cfg.fake_steps_per_G, world, device, startup_peak,
                                          {k: getattr(cfg, k) for k in switches}, flops.total, cost.peak_tflops)
    if writes:
        log.close()  # also draws curves.png from log.jsonl
    if not cfg.benchmark:  # every rank calls it (a sharded generator is gathered whole first); rank 0 writes
        with plumbing.ema_weights(G_params, ema):  # the exported generator is the EMA one; G keeps the raw weights
            plumbing.export_generator(G.net, G.t_star, os.path.join(cfg.output_dir, "generator"), write=writes)
    return dict(G=G, fake=fake, teacher=teacher, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                reward=reward, reward_decoder=reward_vae, schedule=schedule, benchmark=result, text=text, family=fam)


@torch.no_grad()
def generate(cfg):
    """One-step generation: decode(g_θ(z, c)) for each prompt, written as PNGs to output_dir."""
    if not cfg.generator_init:
        plumbing.die("--generate needs --generator_init DIR (a generator folder written by training)")
    device = plumbing.pick_device(cfg.device)
    ctx, dtype = precision(cfg, device)
    torch.manual_seed(cfg.seed)
    cfg.lora_rank = 0  # an exported generator is a plain model (a LoRA one was merged on export)
    cfg.generator_timestep = plumbing.read_generator_record(cfg.generator_init) or cfg.generator_timestep
    fam, teacher, vae, _, tokenizer, schedule = load_teacher(cfg.pretrained_model_name_or_path, device, dtype,
                                                             text_encoder=False)
    check_config(cfg, schedule.T)
    prompts = [p.strip() for p in cfg.generate.split("|") if p.strip()]
    text, _ = families.text_conditioning(cfg.pretrained_model_name_or_path, fam, tokenizer, [prompts], device, dtype,
                                         os.path.join(cfg.output_dir, "text_embeddings"))
    G = build_generator(cfg, teacher, fam, schedule, device).eval()
    latent_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    # z ~ N(0, I) from its own seeded generator: loading may draw from torch's (PixArt's __init__ does)
    z = torch.randn((len(prompts), *latent_shape), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    with ctx:
        images = decode(vae, G(z, text(prompts)))
    os.makedirs(cfg.output_dir, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        plumbing.save_grid(image[None], [prompt], os.path.join(cfg.output_dir, f"generated_{i:02d}.png"))
    print(f"wrote {len(prompts)} images to {cfg.output_dir}")
    return images

# -----------------------------------------------------------------------------
# 10. main


def model_locations(cfg):
    """(name, flag) of every model folder or hub id the run will load. (A default TAESD is the family's;
    --generate loads no reward.)"""
    reward = {"clip": cfg.reward_model_path or rewards.CLIP_REWARD, "imagereward": cfg.reward_model_path}.get(cfg.reward, "")
    reward = "" if cfg.generate else reward
    decoder = cfg.reward_decoder_path if cfg.reward_decoder == "tiny" and cfg.reward != "none" else ""
    return [(name, flag) for name, flag in ((cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path"),
                                            (cfg.generator_init, "--generator_init"), (reward, "--reward_model_path"),
                                            (decoder, "--reward_decoder_path")) if name]


def main(argv=None):
    cfg = parse_config(argv)
    check_config(cfg)
    rank, world, _ = plumbing.init_distributed(cfg)
    if cfg.random_weights:  # same code path as SD1.5 / PixArt-α, nothing downloaded
        from random_weights import use_random_weights
        use_random_weights(cfg, rank, world)  # builds them in output_dir, points the model/reward paths there
    # a mistyped path, an incomplete model folder or an unreachable hub: one line now, not after loading
    plumbing.check_model_locations(model_locations(cfg))
    if os.path.isdir(cfg.pretrained_model_name_or_path):
        families.check_folder(cfg.pretrained_model_name_or_path)
    if cfg.reward == "imagereward" and not cfg.reward_model_path and not cfg.generate:
        plumbing.check_imagereward_cache()
    with plumbing.tidy_if_stopped_early(cfg.output_dir, rank == 0):  # a run that fails before step 1 leaves no files
        return generate(cfg) if cfg.generate else train(cfg)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # gloo can abort at interpreter exit (~1 run in 10):
        torch.distributed.barrier()               # leave together, tear down, and skip the
        torch.distributed.destroy_process_group()  # interpreter's own shutdown
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
