"""dipp: a read-along implementation of Diff-Instruct++ (DI++).

DI++ aligns a *one-step* text-to-image generator with human preferences using no image data: it
maximises a reward model's score of the generator's samples while an Integral-KL (IKL) divergence
to a frozen diffusion teacher keeps them realistic. The IKL gradient needs the generator's own
score, so a second diffusion model (the "fake score") is trained online on generator samples.

Paper: W. Luo, "Diff-Instruct++: Training One-step Text-to-image Generator Model to Align with Human Preferences",
arXiv 2410.18881 (TMLR 2025); builds on Diff-Instruct, arXiv 2305.18455. Formulas follow METHOD.md's derivation.

Quick start (CPU, no downloads):   python dipp.py --tiny --max_train_steps 2 --output_dir out --overwrite_output_dir
Stable Diffusion 1.5 on one GPU:   python dipp.py --mixed_precision bf16 --gradient_checkpointing
Another family (PixArt-α, SDXL):   the same + --pretrained_model_name_or_path PixArt-alpha/PixArt-XL-2-512x512
Generate with a trained generator: python dipp.py --generate "a red bicycle" --generator_init out/generator

Symbols (code <-> paper, METHOD.md §1):  G, OneStepGenerator  g_θ(z, c);  G.net  ε̂_θ;  G.t_star  t*
  teacher_eps  the frozen teacher s_ref as an ε-predictor, CFG-guided by `guided`: s̃_ref (ω = guidance_scale)
  fake_eps  the online fake score s_ψ (the paper's "TA diffusion")    reward_fn  r(x, c);  reward_scale  α_rew
  Schedule.alpha_sigma(t)  α_t, σ_t of x_t = α_t x0 + σ_t ε;  ikl_weight w(t);  sample_timesteps π(t);
  fake_steps_per_G  K_TA.  `cfg` is always the Config (the flags); classifier-free guidance is "guidance".

Simplifications vs. the paper (each marked `NOTE(deviation N)` where it happens; a test keeps the two in step):
  1. Discrete timesteps t ∈ {0..999} stand in for the paper's continuous t (the teachers' DDPM or flow grids are).
  2. w(t), π(t) are open in the paper for SD1.5. Defaults w = σ²/α² (Diff-Instruct's σ², VP form) and
     π = U{20..980} (DMD2): on the toy they reach DI++'s exact optimum with the least jitter (docs/toy.md); on
     SD3.5's flow π = U{43..812}, the same σ/α range (families.py's t_range).
  3. `--timestep_sampling lognormal` (Diff-Instruct's continuous noise levels) moves each draw to the nearest timestep.
  4. The generator is the teacher's denoiser evaluated once at t* on pure noise (DMD2's recipe; t* = 999 for SD, 399
     for SDXL as DMD2-SDXL, 400 for PixArt-α as PixArt-α-DMD, 999 (σ=1) for SD3.5); the paper also uses others.
  5. "α_cfg" is taken to mean the standard CFG scale ω; the implicit-reward weight is γ = ω − 1.
  6. (opt-in) `--reward_decoder tiny`: the reward scores TAESD's decoding of x0, not the full VAE's.
  7. `--ikl_weighting dmd2`: DMD2's adaptive normaliser depends on the sample: no longer a fixed divergence.
  8. (opt-in) `--reuse_generator_sample`: the first fake-score update trains on the generator update's sample.
"""
# -----------------------------------------------------------------------------
# 0. Imports. Heavy libraries (diffusers, transformers, ImageReward) are imported inside the functions that
#    need them, so `import dipp` stays fast for the 2-D toy. Machinery is called by module, so each call site
#    shows what it is: families.py (what differs between SD1.5, SDXL, PixArt-α, SD3.5), rewards.py (the reward
#    models), promptsets.py (prompt files and named sets), plumbing.py (what keeps a run alive). None imports dipp.
import contextlib
import copy
import dataclasses
import math
import os
import sys
import typing

import torch

import families
import plumbing
import promptsets
import rewards

# -----------------------------------------------------------------------------
# 1. Forward process and noise (METHOD.md §1): x_t = α_t x0 + σ_t ε, DDPM's (α² + σ² = 1) or a flow's (α + σ = 1).


class Schedule:
    """α_t, σ_t over t ∈ {0..T−1} as the teacher's family defines them: DDPM's α = sqrt(ᾱ), σ = sqrt(1 − ᾱ) (SD1.5,
    SDXL, PixArt-α) or a flow's α = 1 − σ, σ its scheduler's shifted sigmas (SD3.5). NOTE(deviation 1): the paper's
    t is continuous; the teachers were trained on T = 1000 discrete noise levels: t is an integer, ∫ dt a sum."""

    def __init__(self, alpha, sigma):
        self.table = torch.stack([torch.as_tensor(alpha), torch.as_tensor(sigma)]).float()  # (2, T): α_t, σ_t
        self.T, self.on_device = self.table.shape[1], {}  # a copy per device, made once (see `on`)

    @classmethod
    def ddpm(cls, alphas_cumprod):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).float()  # (T,) ᾱ_t, stored in float32
        return cls(abar.sqrt(), (1 - abar).sqrt())

    @classmethod
    def flow(cls, sigmas):
        return cls(1 - torch.as_tensor(sigmas).float(), sigmas)  # σ_t (T,) increasing in t, σ_{T−1} = 1: α = 0

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, T=1000):
        """SD1.5's schedule: β_t linear in sqrt-space; computed in float64, stored in float32."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        return cls.ddpm(torch.cumprod(1 - betas, 0))

    def on(self, device):
        """(α_t, σ_t) as a (2, T) table on `device`, copied there once: a host→device copy per call would sync."""
        device = torch.device(device)
        if device not in self.on_device:
            self.on_device[device] = self.table.to(device)
        return self.on_device[device]

    def alpha_sigma(self, t, ndim):
        """α_t, σ_t for integer timesteps t (B,), shaped (B, 1, ..., 1) to broadcast over x."""
        return self.on(t.device)[:, t].view(2, -1, *[1] * (ndim - 1)).unbind(0)  # α_t, σ_t: (B, 1, ..) each


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
                   t = 81; t_min (σ/α = 0.14) takes 26 % of the mass, t_max 0.09 % (toy/optimum.py).
    NOTE(deviation 2): the paper fixes no π(t) (nor w(t), ikl_weight) for SD1.5. uniform + x0 are the defaults
    because on the toy's exact optimum they land within 4 % of m* (the Polyak-averaged mean's distance to m*
    over ‖m* − μ‖, mean + std of 4 seeds: docs/toy.md's weighting study) with the least jitter; the lognormal π
    jitters more, dmd2 overshoots and can run away."""
    assert kind in ("uniform", "lognormal"), f"unknown π(t) {kind!r}: uniform | lognormal"
    if kind == "uniform":
        return torch.randint(t_min, t_max + 1, (B,), device=device)  # t ~ U{t_min..t_max}
    # NOTE(deviation 3): Diff-Instruct draws a continuous VE noise level; SD1.5 has 1000 discrete ones, so
    # each draw goes to the nearest (in log σ/α) timestep and the tails beyond t_min/t_max to the ends.
    # Without a schedule (the toy, old callers) SD-1.x's scaled-linear one is used.
    alpha, sigma = (schedule or Schedule.scaled_linear()).on(device)[:, t_min:t_max + 1]  # 2 × (n,)
    log_sigma_ve = torch.log(sigma / alpha)  # (n,), increasing in t
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


def draw_prompts(prompts, B, rank=0, world=1):
    """c ~ U{prompts}: B prompts of the training list, uniformly with replacement (Alg. 1's prompt draw). As in
    draw_noise, every rank draws the global batch of world·B from the same seed and keeps its own slice."""
    mine = torch.randint(len(prompts), (world * B,))[rank * B:(rank + 1) * B]  # (B,) indices, c ~ U{prompts}
    return [prompts[i] for i in mine.tolist()]

# -----------------------------------------------------------------------------
# 2. The one-step generator g_θ. Every network is seen by the method as an ε-predictor eps(x_t, t, c) -> ε̂, its
#    family's call bound once (denoiser_eps, OneStepGenerator), so the same generator, losses and Alg. 1 run on a
#    UNet, a DiT and a 2-D MLP. Score and ε are one thing in two units: s = −ε̂ / σ_t.


def denoiser_eps(net, family, schedule=None):
    """A diffusers denoiser of `family` (families.py) as eps(x_t, t, c) -> ε̂ in fp32. c is cast to the net's dtype
    (bf16/fp16 under --mixed_precision), x_t by the family's call, given σ_t for a flow (SD3.5): ε̂ = x_t + (1−σ) v̂."""
    dtype = next(net.parameters()).dtype  # (a DDP wrapper has no .dtype of its own)

    def eps(x_t, t, c):
        sigma = schedule.alpha_sigma(t, x_t.ndim)[1] if schedule else None  # (B, 1, ..)
        return family.eps(net, x_t, t, c.to(dtype), sigma).float()
    return eps


class OneStepGenerator(torch.nn.Module):
    """g_θ(z, c): the denoiser `net` of `family` (a UNet or PixArt's transformer, see families.py) evaluated once
    at t* on pure noise, read out as x̂0 (one step, no sampler):

        x0 = g_θ(z, c) = (z − σ_{t*} ε̂_θ(z, t*, c)) / α_{t*}   (a flow family: z − σ_{t*} v̂_θ)   (METHOD.md §1)

    NOTE(deviation 4): the paper leaves the one-step parameterisation to the initial model; we use DMD2's:
    z itself is the input (in VP, x_t has unit variance for unit-variance data, as SD latents roughly
    are), and t* = 999 for SD; 400 for PixArt-α, as PixArt-α-DMD (its linear schedule has α_999 = 0.0064,
    which would amplify ε errors 157×); 999 for SD3.5, σ = 1: one Euler step of the flow, x0 = z − v̂(z).
    With this choice a stock diffusers pipeline run for one step at t* reproduces our samples exactly."""

    def __init__(self, net, family, schedule, t_star):
        super().__init__()
        self.net, self.family, self.schedule, self.t_star = net, family, schedule, t_star

    def forward(self, z, c):
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.long)  # (B,)
        alpha, sigma = self.schedule.alpha_sigma(t, z.ndim)
        if self.family.x0 is not None:  # a flow's x̂0 = z − σ v̂ from its velocity: at σ = 1, ε̂ = z and α = 0
            return self.family.x0(self.net, z, t, c, sigma)  # x0: (B, 16, h, w), a latent
        eps_hat = self.family.eps(self.net, z, t, c, sigma)  # (B, 4, h, w): fp32 master weights, no cast needed
        return predict_x0(z, eps_hat, alpha, sigma)  # x0: (B, 4, h, w), a latent


def build_generator(cfg, teacher, family, schedule, device):
    """g_θ: a trainable fp32 copy of the teacher's denoiser (or of --generator_init; or a LoRA adapter on the teacher)
    used as a one-step model."""
    if cfg.lora_rank:  # rank-R adapters on the teacher's frozen weights, which the fake score's adapter shares
        net = plumbing.lora_copy(teacher, cfg.lora_rank, "generator", family.lora_targets)
    elif cfg.generator_init:  # a released one-step model (DMD2, PixArt-α-DMD, DI++-SDXL) or a dipp export
        net = families.load_generator(cfg.generator_init, teacher, family, device)
    else:
        net = copy.deepcopy(teacher).to(device).float().requires_grad_(True)  # fp32 master weights
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    net = families.readout_in_fp32(net, family).train()
    return OneStepGenerator(net, family, schedule, cfg.generator_timestep or family.t_star)

# -----------------------------------------------------------------------------
# 3. The frozen teacher s_ref with classifier-free guidance (METHOD.md §5)


def classifier_free_guidance(eps_cond, eps_uncond, omega):
    """s̃ = s_∅ + ω (s_c − s_∅) = s_c + (ω−1)(s_c − s_∅), in ε units (the factor −1/σ_t is common to all three).
    ω = 1 is the plain conditional teacher; the extra (ω−1)(s_c − s_∅) is the implicit reward's pull.
    NOTE(deviation 5): the paper's α_cfg is read as this standard ω, so the implicit-reward weight is ω − 1."""
    return eps_uncond + omega * (eps_cond - eps_uncond)


def batch_cat(a, b):
    """Two conditionings stacked along the batch: tensors, or tuples of tensors (PixArt's text + mask)."""
    return torch.cat([a, b]) if torch.is_tensor(a) else type(a)(*map(batch_cat, a, b))


def guided(eps, c, null, omega):
    """The teacher s̃_ref with c bound, as a closure eps_c(x_t, t): c and ∅ in one batched call (one denoiser pass)."""
    def eps_c(x_t, t):
        if omega == 1:
            return eps(x_t, t, c)
        e_c, e_null = eps(torch.cat([x_t, x_t]), torch.cat([t, t]), batch_cat(c, null)).chunk(2)
        return classifier_free_guidance(e_c, e_null, omega)
    return eps_c


def load_teacher(name, device, dtype, text_encoder=True):
    """The frozen teacher of any family (families.py picks it from the folder or hub id): its denoiser,
    VAE, text encoder (None unless asked), tokenizer and noise schedule, as a families.Models."""
    models = families.load_models(name, device, dtype, text_encoder)  # its schedule: ᾱ_t (DDPM) or σ_t (flow)
    return models._replace(schedule=getattr(Schedule, models.family.forward_process)(models.schedule))

# -----------------------------------------------------------------------------
# 4. The fake score s_ψ (the paper's "TA diffusion"), METHOD.md §4


def build_fake_score(cfg, teacher, family, device):
    """s_ψ, initialised from the teacher (so that s_ψ = s_ref before training, as in Diff-Instruct and DMD2): an fp32
    copy of the teacher's denoiser, or a LoRA adapter on it."""
    if cfg.lora_rank:
        fake = plumbing.lora_copy(teacher, cfg.lora_rank, "fake_score", family.lora_targets)
    else:  # never from --generator_init: s_ψ starts at s_ref whatever the generator starts from
        fake = teacher.__class__.from_config(teacher.config)
        fake.load_state_dict(teacher.state_dict())
        fake.to(device).float()  # (.float(), not .to(dtype): diffusers warns on the latter)
    if cfg.gradient_checkpointing:
        fake.enable_gradient_checkpointing()
    return families.readout_in_fp32(fake, family).train()

# -----------------------------------------------------------------------------
# 5. The reward interface: reward_fn(images in [-1, 1] (B, 3, H, W), prompts) -> (B,), differentiable in the
#    images. The models themselves (ImageReward, CLIP score) are in rewards.py; the reward sees decoded pixels.


def load_reward(cfg, device, dtype):
    """reward_fn(images, prompts) -> (B,) for --reward, frozen: Σ_i w_i r_i, a rewards.Mix of one reward or of
    --reward's weighted sum; None for --reward none (pure Diff-Instruct)."""
    return rewards.load(cfg.reward, cfg.reward_model_path, device, dtype, cfg.gradient_checkpointing)


def load_watched(cfg, reward_fn, device, dtype):
    """What validation scores and training never sees: {name: reward fn} of --watch_rewards, and (with
    --validation_diversity K) a rewards.Diversity of K images per held-out prompt, on a CLIP the run already holds."""
    watched = {name: rewards.load_one(name, path, device, dtype)
               for name, path in rewards.parse_watch(cfg.watch_rewards)}
    held = {**{name: fn for name, _, fn in (reward_fn.terms if reward_fn is not None else [])}, **watched}
    return watched, rewards.load_diversity(cfg.validation_diversity, held, device, dtype)


def load_reward_decoder(cfg, family, vae, device, dtype):
    """The decoder whose images the reward scores: the full VAE, or (--reward_decoder tiny) TAESD.
    NOTE(deviation 6): with TAESD the reward's gradient reaches x0 through an approximate decoder (a distilled
    ~1M-parameter one, much cheaper than the VAE decoder whose forward and backward are ~30 % of a step on
    SD1.5), so the reward is that of TAESD's image, not of the image the user will see."""
    if cfg.reward_decoder == "full" or cfg.reward == "none":
        return vae
    return plumbing.load_tiny_decoder(cfg.reward_decoder_path or family.tiny_decoder, device, dtype,
                                      cfg.gradient_checkpointing)


def decode(vae, x0):
    """Latent x0 -> image in [-1, 1] (B, 3, H, W). SD latents are scaled by vae.config.scaling_factor."""
    dtype, shift = vae.dtype, getattr(vae.config, "shift_factor", None) or 0  # SD3.5's are also shifted
    with plumbing.autocast_off(x0) if dtype == torch.float32 else contextlib.nullcontext():
        return vae.decode(x0.to(dtype) / vae.config.scaling_factor + shift).sample.float()

# -----------------------------------------------------------------------------
# 6. Losses (METHOD.md §2-§5). Each returns a per-sample loss (B,); callers take the mean over the batch.


def ikl_weight(kind, alpha, sigma, x0=None, x0_teacher=None):
    """w(t) of the IKL, in score units. What each means for the generator's gradient ∂L/∂x0:
        x0 : w = σ²/α²  ->  ∂L/∂x0 = x̂0_fake − x̂0_teacher  (difference of the two denoisers; Diff-Instruct's
             σ² weight of VE, rewritten for VP)
        eps: w = σ/α    ->  ∂L/∂x0 = ε̃_teacher − ε̂_fake    (bounded; the SDS-style weight)
        dmd2: x0-weight / mean|x0 − x̂0_teacher| per sample. NOTE(deviation 7): DMD2's adaptive normaliser
             depends on the sample, so the objective is no longer a fixed divergence."""
    if kind == "x0":
        return sigma ** 2 / alpha ** 2
    if kind == "eps":
        return sigma / alpha
    norm = (x0 - x0_teacher).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)  # (B, 1, ..)
    return sigma ** 2 / alpha ** 2 / norm.clamp_min(1e-5)  # clamp: x0 may already equal the teacher's x̂0


def ikl_loss(x0, t, eps, schedule, teacher_eps_c, fake_eps_c, weighting="x0", with_grad=False):
    """Generator surrogate of the Integral KL, METHOD.md §3 (Diff-Instruct's key identity):
        ∇_θ D_IKL = E_{t,ε}[ w(t) (s_fake(x_t,t) − s̃_ref(x_t,t))ᵀ ∂x_t/∂θ ],  x_t = α_t g_θ(z) + σ_t ε
        L_G = w(t) ⟨ sg[s_fake − s̃_ref], x_t ⟩   so   ∂L_G/∂x0 = w α (ε̃_teacher − ε̂_fake) / σ
    teacher_eps_c, fake_eps_c: (x_t, t) -> ε̂ with the prompts c bound. The loss *value* means nothing; its
    gradient is the estimator. Intuition: push each sample from where the generator's own density is high
    towards where the teacher's is. with_grad=True also returns that closed-form ∂L_G/∂x0 (B, ...), detached,
    for logging the size of the IKL's pull."""
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0, eps, alpha, sigma)  # (B, ...): carries the gradient to θ through x0
    with torch.no_grad():  # sg[·]: neither score network is differentiated, only the explicit x_t
        e_teacher = teacher_eps_c(x_t.detach(), t)
        e_fake = fake_eps_c(x_t.detach(), t)
        x0_teacher = predict_x0(x_t, e_teacher, alpha, sigma)
        w = ikl_weight(weighting, alpha, sigma, x0.detach(), x0_teacher)
        # s_fake − s̃_ref = (−ε̂_fake + ε̃_teacher) / σ   (score = −ε/σ)
        score_diff = w * (e_teacher - e_fake) / sigma  # (B, ...)
    # ⟨·,·⟩ *sums* over dimensions: the IKL is a divergence per sample (as Diff-Instruct's code sums), and the sum
    # sets α_rew's scale (a reward is one number per image, however many latent dimensions it has)
    loss = (score_diff * x_t).flatten(1).sum(1)  # (B,)
    return (loss, alpha * score_diff) if with_grad else loss  # ∂L_G/∂x0 = α · score_diff: x_t = α x0 + σ ε


def fake_score_loss(fake_eps_c, x0, t, eps, schedule):
    """Denoising score matching for the fake score s_ψ on *detached* generator samples, METHOD.md §4:
        L(ψ) = E ‖ε̂_ψ(x_t, t) − ε‖²,  x_t = α_t sg[x0] + σ_t ε      (λ(t) = σ_t² in score units)
    Its minimiser is the score of the generator's diffused distribution, which the IKL needs."""
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0.detach(), eps, alpha, sigma)  # detach: ψ's loss must not move θ
    # a *mean* over dimensions, unlike the IKL's sum: the DSM minimiser is the same either way, and the mean
    # keeps the loss O(1) whatever the latent size, as diffusers' training scripts compute it
    return (fake_eps_c(x_t, t) - eps).pow(2).flatten(1).mean(1)  # (B,)


def reward_loss(reward, reward_scale):
    """−α_rew · r(g_θ(z), c), METHOD.md §2: minimising it is gradient *ascent* on the reward, whose
    gradient flows back through the reward model, its preprocessing and the VAE decoder into θ."""
    return -reward_scale * reward  # (B,)


def guidance_reward_loss(x0, t, eps, schedule, eps_cond_c, eps_null_c, weighting="x0"):
    """−r_cfg surrogate, METHOD.md §5: the implicit reward that classifier-free guidance adds,
        r_cfg(x0, c) = ∫ w(t) E_ε[ log p_t(c | α_t x0 + σ_t ε) ] dt,  ∇_x log p_t(c|x) = s_c − s_∅
    L = −w ⟨sg[s_c − s_∅], x_t⟩ has gradient −∇_x0 r_cfg. Not needed for training (a guided teacher already
    contains it); the tests use it to show that ikl_loss with ω equals ikl_loss with ω = 1 plus
    (ω − 1) · guidance_reward_loss, gradient for gradient. `weighting` as in ikl_weight (dmd2 included)."""
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    x_t = add_noise(x0, eps, alpha, sigma)
    with torch.no_grad():
        e_cond = eps_cond_c(x_t, t)
        # dmd2's normaliser reads the conditional teacher's x̂0, as ikl_loss reads the (ω = 1) teacher's
        w = ikl_weight(weighting, alpha, sigma, x0.detach(), predict_x0(x_t, e_cond, alpha, sigma))
        classifier_grad = w * (eps_null_c(x_t, t) - e_cond) / sigma  # w (s_c − s_∅)
    return -(classifier_grad * x_t).flatten(1).sum(1)  # (B,)

# -----------------------------------------------------------------------------
# 7. One DI++ iteration, Alg. 1: K_TA fake-score updates with θ frozen, then one generator update with ψ frozen.


class Bound(typing.NamedTuple):
    """One batch's networks with its prompts c bound (the `_c`): all that Alg. 1 sees."""
    G_c: typing.Callable  # z -> x0 = g_θ(z, c)   (under torchrun: through DDP, so backward averages gradients)
    teacher_eps_c: typing.Callable  # (x_t, t) -> ε̃: the frozen teacher with CFG, `guided`
    fake_eps_c: typing.Callable  # (x_t, t) -> ε̂_ψ: the fake score (DDP under torchrun)
    reward_c: typing.Optional[typing.Callable]  # x0 -> r(decode(x0), c), or None for --reward none


class Optimizers(typing.NamedTuple):
    """Which optimizer steps which parameters: ψ in phase (1), θ in phase (2)."""
    fake: typing.Any  # plumbing.SafeOptimizer: AdamW on ψ's trainable weights, fp16's loss scaler, clipping
    G: typing.Any  # the same on θ's


def rms(g):
    return g.flatten(1).pow(2).mean(1).sqrt().mean()  # per-sample RMS over dimensions, averaged over the batch


def dipp_step(nets, opt, noises, schedule, cfg, ctx=contextlib.nullcontext(), clock=lambda: None):
    """One iteration of Alg. 1. nets: Bound; opt: Optimizers; noises: K_TA + 1 draws of (z, t, ε), the fake-score
    updates' first and the generator update's last. Returns the losses, the mean reward, the size of the IKL's and
    the reward's pull on the sample (for choosing α_rew), how many updates fp16's loss scaler skipped, and the
    sample x0 (detached). clock() marks the end of the first phase (--benchmark times the two apart)."""
    *fake_noises, (z, t, eps) = noises
    x0, skipped_fake, loss_fake = None, 0, torch.tensor(float("nan"))  # (nan: no fake update, as in some tests)
    # NOTE(deviation 8): Alg. 1 draws a fresh z for the fake update; with --reuse_generator_sample the first one
    # trains on g_θ(z) of the generator update below (same θ, same order of updates; only z is shared), as DMD2
    # does. Its own z is still drawn, so the random stream is the same either way.
    if cfg.reuse_generator_sample:
        with ctx:
            x0 = nets.G_c(z)
    # (1) K_TA fake-score updates: DSM on sg[g_θ(z)] teaches s_ψ the generator's current distribution; θ frozen
    for k, (z_k, t_k, eps_k) in enumerate(fake_noises):
        with ctx:
            with torch.no_grad():  # sg[g_θ(z)]: θ is frozen in this phase, so no graph through the generator
                x0_k = x0 if k == 0 and x0 is not None else nets.G_c(z_k)
            loss_fake = fake_score_loss(nets.fake_eps_c, x0_k.detach(), t_k, eps_k, schedule).mean()
        opt.fake.zero_grad()
        opt.fake.scaler.scale(loss_fake).backward()  # ∂L_DSM/∂ψ: x0 is detached, so ψ is all this loss reaches
        skipped_fake += opt.fake.step(loss_fake)  # a non-finite loss stops the run; else unscale, clip, AdamW on ψ
    clock()
    # (2) one generator update: L_G = IKL towards the CFG teacher (the implicit reward inside) − α_rew · r
    with ctx:
        x0 = nets.G_c(z) if x0 is None else x0  # (B, ...): the only path by which θ receives gradient
        loss_ikl, grad_ikl = ikl_loss(x0, t, eps, schedule, nets.teacher_eps_c, nets.fake_eps_c, cfg.ikl_weighting,
                                      with_grad=True)
        loss_G = loss_ikl.mean()
        reward = x0.new_full((x0.shape[0],), float("nan"))  # (B,): logged as nan with --reward none
        if nets.reward_c is not None:
            reward = nets.reward_c(x0)  # (B,)
            loss_G = loss_G + reward_loss(reward, cfg.reward_scale).mean()
    pull = plumbing.PullOnSample(x0, grad_ikl, watch=nets.reward_c is not None)  # ∂L_G/∂x0 minus the IKL's part
    opt.G.zero_grad()
    opt.G.scaler.scale(loss_G).backward()  # ∂L_G/∂θ through x0 = g_θ(z) alone: ikl_loss's sg[·] keeps ψ out
    skipped_G = opt.G.step(loss_G)  # ψ has no gradient to step with; only θ moves here
    return {"loss_fake": loss_fake.detach(), "loss_ikl": loss_ikl.detach().mean(), "reward": reward.detach().mean(),
            "grad_ikl": rms(grad_ikl), "grad_reward": rms(pull.rest(opt.G.loss_scale)),
            "skipped_fake": skipped_fake, "skipped_G": skipped_G, "x0": x0.detach()}

# -----------------------------------------------------------------------------
# 8. The training loop: Alg. 1 repeated. What keeps a real run alive (torchrun, compile, checkpoints, resume, EMA,
#    signals, logs, validation, the benchmark) sits behind plumbing.RunKeeper.


def train(cfg):
    """Set up the networks, then per step: draw a prompt batch c and (z, t, ε) → one DI++ iteration → keep the
    run; then export g_θ to output_dir/generator."""
    run = plumbing.RunKeeper(cfg)  # torchrun, device, precision, the output folder
    device, ctx, B = run.device, run.autocast, cfg.train_batch_size
    torch.manual_seed(cfg.seed)  # the same seed on every rank: see draw_noise
    if run.main_rank:  # (a minute or more on real weights before the settings line and the progress bar)
        print(f"loading {cfg.pretrained_model_name_or_path}{'' if cfg.reward == 'none' else ' and the reward'}, "
              "building G and ψ ...", flush=True)
    prompts = promptsets.load_prompts(cfg.prompts, promptsets.BUILTIN_PROMPTS, "--prompts")  # default: 8 built in
    val_prompts = promptsets.load_prompts(cfg.validation_prompts, promptsets.VALIDATION_PROMPTS,
                                          "--validation_prompts")
    fam, teacher, vae, _, tokenizer, schedule = load_teacher(cfg.pretrained_model_name_or_path, device, run.dtype,
                                                             text_encoder=False)
    cfg.generator_timestep = cfg.generator_timestep or fam.t_star  # 0 = the family's default t*
    plumbing.check_config(cfg, schedule.T, schedule.table[0])  # (a flow's α_999 = 0: π(t) must stay below it)
    # prompts -> c; PixArt's T5 and SDXL's two CLIPs encode the three lists once, then are freed (before G and ψ exist)
    text, text_encoder = families.text_conditioning(
        cfg.pretrained_model_name_or_path, fam, tokenizer, [prompts, val_prompts, [fam.null_prompt]], device,
        run.dtype, os.path.join(cfg.output_dir, "text_embeddings"), run.main_rank, run.world)
    G, fake = build_generator(cfg, teacher, fam, schedule, device), build_fake_score(cfg, teacher, fam, device)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    reward_fn = load_reward(cfg, device, run.dtype)
    reward_decoder = load_reward_decoder(cfg, fam, vae, device, run.dtype)
    watched, diversity = load_watched(cfg, reward_fn, device, run.dtype)  # (optional) scored at validation only
    frozen = [teacher, reward_decoder.decoder] + (reward_fn.towers if reward_fn is not None else [])  # not trained
    G_train, fake_train = run.wrap(G, fake, fam, frozen)  # --compile; under torchrun DDP, or FSDP2 shards
    opt = Optimizers(fake=run.optimizer(fake, cfg.fake_learning_rate), G=run.optimizer(G, cfg.learning_rate))
    null = families.null_condition(fam, text)  # c = ∅ for CFG: the empty prompt's c (SDXL: zeroed)
    latent_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    teacher_eps, fake_eps = denoiser_eps(teacher, fam, schedule), denoiser_eps(fake_train, fam, schedule)
    run.start({"generator": G.net, "fake_score": fake}, opt, G,  # resume; the held-out reward on fixed noise, a grid
              sample=lambda z, prompts: decode(vae, G(z.to(device), text(prompts))), reward_fn=reward_fn,
              val_prompts=val_prompts, latent_shape=latent_shape, watch=watched, diversity=diversity)
    with run.guard():  # signals finish the step and checkpoint; a non-finite loss names the last good checkpoint
        while run.step < cfg.max_train_steps:
            run.begin_step()
            batch = draw_prompts(prompts, B, run.rank, run.world)  # c ~ U{prompts}
            c = text(batch)  # (B, 77, D), or MaskedText((B, 120, D), (B, 120)), or SDXLText
            nets = Bound(G_c=lambda z: G_train(z, c),
                         teacher_eps_c=guided(teacher_eps, c, null.expand_as(c), cfg.guidance_scale),
                         fake_eps_c=lambda x_t, t: fake_eps(x_t, t, c),
                         reward_c=(lambda x0: reward_fn(decode(reward_decoder, x0), batch)) if reward_fn is not None
                         else None)
            # (z, t, ε) for the K_TA fake updates, then for the generator update (drawn up front, in that order)
            noises = [draw_noise(B, latent_shape, latent_shape, cfg, device, run.rank, run.world, schedule)
                      for _ in range(cfg.fake_steps_per_G + 1)]
            stats = dipp_step(nets, opt, noises, schedule, cfg, ctx, run.between_phases)
            if run.logs_reward_terms(reward_fn):  # (optional) a mix's per-term pulls cost a decoder VJP each
                with ctx:
                    stats.update(rewards.term_stats(reward_fn, lambda x: decode(reward_decoder, x), stats["x0"],
                                                    opt.G.loss_scale))
            run.end_step(stats)
    run.finish()  # the log's curves, the benchmark line, and output_dir/generator (EMA weights if kept)
    return dict(G=G, fake=fake, teacher=teacher, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                reward=reward_fn, reward_decoder=reward_decoder, schedule=schedule, benchmark=run.benchmark,
                text=text, family=fam)


@torch.no_grad()
def generate(cfg):
    """One-step generation: decode(g_θ(z, c)) for each prompt, written as PNGs to output_dir."""
    if not cfg.generator_init:
        plumbing.die("--generate needs --generator_init DIR (a generator folder written by training)")
    device = plumbing.pick_device(cfg.device)
    ctx, dtype = plumbing.precision(cfg.mixed_precision, device)
    torch.manual_seed(cfg.seed)
    cfg.lora_rank = 0  # an exported generator is a plain model (a LoRA one was merged on export)
    cfg.generator_timestep = plumbing.read_generator_record(cfg.generator_init) or cfg.generator_timestep
    fam, teacher, vae, _, tokenizer, schedule = load_teacher(cfg.pretrained_model_name_or_path, device, dtype,
                                                             text_encoder=False)
    plumbing.check_config(cfg, schedule.T)
    prompts = [p.strip() for p in cfg.generate.split("|") if p.strip()]
    text, _ = families.text_conditioning(cfg.pretrained_model_name_or_path, fam, tokenizer, [prompts], device, dtype,
                                         os.path.join(cfg.output_dir, "text_embeddings"))
    G = build_generator(cfg, teacher, fam, schedule, device).eval()
    latent_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    # z ~ N(0, I) from its own seeded generator: loading may draw from torch's (PixArt's __init__ does)
    z = torch.randn((len(prompts), *latent_shape), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    with ctx:
        images = decode(vae, G(z, text(prompts)))
    plumbing.save_images(images, prompts, cfg.output_dir)  # output_dir/generated_NN.png, one per prompt
    return images

# -----------------------------------------------------------------------------
# 9. Configuration: every field is a command-line flag; the inline comment is its --help text.


@dataclasses.dataclass
class Config:
    # --- models (hub id or local folder; each is fetched into the hub cache when online)
    pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the teacher: an SD-1.x, SDXL,
        # PixArt-α or SD3.5 hub id or diffusers folder (denoiser, VAE, text encoders); the family is read from its
        # layout; --generate: by default the teacher the generator's dipp.json records
    generator_init: str = ""  # one-step generator to start from: its model folder, a pipeline folder with unet/ or
        # transformer/ (PixArt-α-DMD, DI++-SDXL), a weight file, or a LoRA adapter file (dipp's
        # pytorch_lora_weights.safetensors: the teacher with it merged in) (default: a copy of the teacher)
    random_weights: str = ""  # instead of the teacher and reward above, random-weight models of the same architectures
        # built in output_dir/<name>: tiny, tiny_pixart, tiny_sdxl, tiny_sd3 (CPU, seconds) or sd15, pixart512, sdxl,
        # sd35_medium, sd35_large (real shapes, for --benchmark)
    tiny: bool = False  # short for --random_weights tiny: the SD1.5 code path on tiny random models, CPU, no download
    # --- method (METHOD.md §2-§5)
    reward: str = "imagereward"  # r(x, c): imagereward, clip, hps20, hps21, pickscore, aesthetic, or a weighted sum
        # "imagereward=1,pickscore=0.5" (docs/rewards.md); none = pure Diff-Instruct distillation
    reward_model_path: str = ""  # PATH (one reward) or NAME=PATH,... per reward: a folder or weight file; "" = each
        # reward's default hub weights (rewards.RECORDS; ImageReward: THUDM/ImageReward)
    watch_rewards: str = ""  # rewards NOT trained on, scored on the validation samples at each validation (val_NAME
        # in log.jsonl and curves.png), e.g. "pickscore,hps21"; NAME=PATH for weights of your own
    validation_diversity: int = 0  # K >= 2: each validation also draws K images per held-out prompt and logs
        # val_diversity, their mean pairwise 1 - cos in CLIP (evaluate.py's diversity; a run without CLIP then
        # watches CLIP ViT-L/14); 0 = off
    reward_decoder: str = "full"  # the reward sees the full VAE decoder's images, or TAESD's (tiny: faster,
        # approximate; grids, validation and export keep the full one)
    reward_decoder_path: str = ""  # --reward_decoder tiny: AutoencoderTiny hub id or folder (default: the family's
        # TAESD, e.g. madebyollin/taesd for SD latents)
    reward_scale: float = 1.0  # α_rew: weight of the explicit reward (β = 1/α_rew in the RLHF form)
    guidance_scale: float = 1.75  # ω: CFG scale of the teacher; γ = ω−1 is the implicit-reward weight (DMD2 SD1.5:
        # 1.75)
    generator_timestep: int = 0  # t*: the timestep at which the generator's denoiser sees noise z; 0 = the family's
        # (SD 999, PixArt-α 400, SDXL 399, SD3.5 999: σ = 1)
    fake_steps_per_G: int = 1  # K_TA: fake-score updates per generator update (Alg. 1; DMD2 uses 10)
    t_min: int = 20  # π(t) lives on {t_min..t_max}: timesteps at which the IKL and DSM losses are evaluated
        # (an SD3.5 teacher's default: 43..812, SD1.5's σ/α range on its flow grid)
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
    verbose: bool = False  # print every setting before training (they are always saved in OUTPUT_DIR/config.json)
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1 ...
    # --- modes (instead of training)
    generate: str = ""  # prompts separated by '|': write one image each from --generator_init, then exit
    benchmark: bool = False  # time --max_train_steps iterations and print one BENCHMARK json line; writes no config,
        # log, grid or checkpoint
    ignore_memory_check: bool = False  # on a GPU, dipp first counts the run's peak memory (cost.py --fit) and stops,
        # naming the switches that would fit, where the card's free memory is short; this flag runs it anyway


CHOICES = {"mixed_precision": ("no", "fp16", "bf16"), "ikl_weighting": ("x0", "eps", "dmd2"),
           "timestep_sampling": ("uniform", "lognormal"), "reward_decoder": ("full", "tiny"), "shard": ("none", "fsdp"),
           "compile": ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead"),
           "report_to": ("none", "tensorboard", "wandb"), "random_weights": ("tiny", "tiny_pixart", "tiny_sdxl",
                                                                             "tiny_sd3", "sd15", "pixart512", "sdxl",
                                                                             "sd35_medium", "sd35_large")}


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


# -----------------------------------------------------------------------------
# 10. main


def main(argv=None):
    cfg = parse_config(argv)
    plumbing.check_config(cfg)
    rewards.check_flags(cfg.reward, cfg.reward_model_path, cfg.watch_rewards)  # names, weights, syntax: one line
    cfg.watch_rewards = rewards.watch_for_diversity(cfg.reward, cfg.watch_rewards, cfg.validation_diversity)
    rank, world, device = plumbing.init_distributed(cfg)
    if cfg.random_weights:  # same code path as SD1.5 / PixArt-α / SDXL, nothing downloaded
        from random_weights import use_random_weights
        use_random_weights(cfg, rank, world)  # builds them in output_dir, points the model/reward paths there
    from random_weights import build_random  # (rebuilds a random-weight teacher whose folder is gone)
    plumbing.use_recorded_teacher(cfg, argv, build_random)  # --generate: the teacher the generator's dipp.json names
    # a mistyped path, an incomplete model folder, an unreachable hub, a prompt set not fetched: all of them in one
    # line now, not one per attempt after loading
    checks = [lambda: plumbing.check_model_locations(plumbing.model_locations(cfg))]
    if os.path.isdir(cfg.pretrained_model_name_or_path):
        def teacher_folder():  # complete, and a --generator_init of its family
            family = families.check_folder(cfg.pretrained_model_name_or_path)
            if cfg.generator_init:  # SD-1.x and SDXL UNets are one class: the family read from its config or tensors
                families.check_generator(family, cfg.pretrained_model_name_or_path, cfg.generator_init,
                                         "--generator_init")
        checks.append(teacher_folder)
    if not cfg.generate:  # every reward's weights, trained on or watched (after --tiny pointed them at its own)
        checks.append(lambda: rewards.check_flags(cfg.reward, cfg.reward_model_path, cfg.watch_rewards, weights=True))
        # the prompt sets (a named set is fetched here when online; train() then reads it from the cache)
        checks += [lambda v=v, f=f: promptsets.load_prompts(v, [""], f) for v, f in (
            (cfg.prompts, "--prompts"), (cfg.validation_prompts, "--validation_prompts")) if v]
    plumbing.all_or_die(*checks)
    if not cfg.generate:  # π(t)'s range: the family's where --t_min / --t_max were not given (SD3.5: 43..812)
        plumbing.apply_preset(cfg, families.family_t_range(cfg.pretrained_model_name_or_path), argv)
    if not cfg.generate and rank == 0:  # will it fit? (CUDA only: cost.py counts the peak before anything is loaded)
        plumbing.check_memory(cfg, device, lambda: families.find_family(cfg.pretrained_model_name_or_path).name, world)
    with plumbing.tidy_if_stopped_early(cfg.output_dir, rank == 0):  # a run that fails before step 1 leaves no files
        return generate(cfg) if cfg.generate else train(cfg)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # gloo can abort at interpreter exit (~1 run in 10):
        torch.distributed.barrier()               # leave together, tear down, and skip the
        torch.distributed.destroy_process_group()  # interpreter's own shutdown
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
