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
# # 01 — Diff-Instruct++ on a 2-D toy, step by step
#
# > "we formulate the alignment problem as maximizing the expected human reward functions while
# > adding an Integral Kullback-Leibler divergence term to encourage the generator to stay close to
# > a reference diffusion process." — Diff-Instruct++, arXiv 2410.18881
#
# This notebook walks through one DI++ iteration on a 2-D Gaussian mixture whose diffused score is
# exact (so there is no teacher to pretrain), then trains a generator and draws the reward-vs-KL
# trade-off. Every loss and update comes from `dipp.py`; `toy/gmm.py` supplies the mixture and the
# small MLPs. It runs on a CPU. Set `DIPP_TINY=1` for a fast run with fewer steps (what the tests do).
#
# The outputs stored in `01_toy.ipynb` come from a full run (no `DIPP_TINY`) on a 2-core CPU:
# `jupyter nbconvert --to notebook --execute --inplace notebooks/01_toy.ipynb` (a few minutes).

# %%
import os
import sys

import matplotlib.pyplot as plt
import torch

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path[:0] = [ROOT, os.path.join(ROOT, "toy")]
import dipp  # noqa: E402
import gmm as toy  # noqa: E402
import plumbing  # noqa: E402

TINY = os.environ.get("DIPP_TINY") == "1"
plt.rcParams["figure.dpi"] = 72  # keeps the figures stored in the .ipynb small
torch.manual_seed(0)

# %% [markdown]
# ## The reference and its forward process
# p(x|c) is a mixture of Gaussians; under x_t = α_t x0 + σ_t ε every component stays Gaussian,
# N(α_t μ_k, (α_t² s_k² + σ_t²) I), so p_t and its score are exact at every t (METHOD.md §6).
# We use SD1.5's own noise schedule.

# %%
args = toy.parse(["--quick"] if TINY else [])
mixture, schedule, reward = toy.build(args)
fig, axes = plt.subplots(1, 4, figsize=(16, 4))
for ax, t in zip(axes, (0, 200, 500, 900)):
    c = torch.randint(mixture.C, (2000,))
    x0 = mixture.sample(c)
    a, s = schedule.alpha_sigma(torch.full((2000,), t), 2)
    x_t = dipp.add_noise(x0, torch.randn_like(x0), a, s)
    ax.scatter(x_t[:, 0], x_t[:, 1], c=c, s=1, cmap="coolwarm")
    ax.set(title=f"x_t at t = {t} (α = {a[0, 0]:.2f}, σ = {s[0, 0]:.2f})", xlim=(-5, 5), ylim=(-5, 5), aspect="equal")

# %% [markdown]
# ## The teacher, with and without classifier-free guidance
# The exact ε-predictor is ε = −σ_t ∇ log p_t(x|c). `dipp.guided` evaluates cond and uncond in one
# batched call and combines them as s̃ = s_∅ + ω (s_c − s_∅). The arrows show the guided score for
# class 0 at t = 300: with ω > 1 it also points away from class 1.

# %%
teacher = mixture.eps_fn(schedule)
g = torch.linspace(-4, 4, 17)
xx, yy = torch.meshgrid(g, g, indexing="xy")
pts = torch.stack([xx.flatten(), yy.flatten()], 1)
t = torch.full((len(pts),), 300)
_, sigma = schedule.alpha_sigma(t, 2)
fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, omega in zip(axes, (1.0, 3.0)):
    eps = dipp.guided(teacher, torch.zeros(len(pts), dtype=torch.long), torch.full((len(pts),), -1), omega)(pts, t)
    score = -eps / sigma
    ax.quiver(pts[:, 0], pts[:, 1], score[:, 0], score[:, 1])
    ax.set(title=f"guided score of class 0, ω = {omega}", aspect="equal")

# %% [markdown]
# ## One DI++ iteration (Alg. 1, METHOD.md §4 and §2–§3)
# `dipp.dipp_step` is the whole iteration: K_TA fake-score updates, in which s_ψ learns the score of the
# *generator's* diffused distribution by denoising score matching on detached generator samples (it starts
# at the reference: the exact teacher + a zero MLP), then one generator update on L_G = IKL − α_rew · r.
# Each phase's loss, its `backward()` and its optimizer step stand in that function (dipp.py §7).

# %%
cfg = dipp.Config(reward_scale=0.5, guidance_scale=1.0, t_min=args.t_min, t_max=args.t_max,
                  ikl_weighting=args.weighting, max_grad_norm=0)
G, fake = toy.Generator(mixture.C, args.z_dim), toy.FakeScore(mixture.C, teacher)
opt = dipp.Optimizers(fake=plumbing.cpu_adam(fake, args.lr_fake), G=plumbing.cpu_adam(G, args.lr))  # Adam, β1 = 0
B = 256
c = torch.randint(mixture.C, (B,))
nets = dipp.Bound(G_c=lambda z: G(z, c),
                  teacher_eps_c=dipp.guided(teacher, c, torch.full((B,), -1), cfg.guidance_scale),
                  fake_eps_c=lambda x_t, t: fake(x_t, t, c), reward_c=lambda x: reward(x))
noises = [dipp.draw_noise(B, (args.z_dim,), (2,), cfg, "cpu") for _ in range(2)]  # (z, t, ε): one fake, one G update
stats = dipp.dipp_step(nets, opt, noises, schedule, cfg)
print(f"DSM loss of the fake score: {stats['loss_fake'].item():.4f}")

# %% [markdown]
# ## The generator update, term by term (METHOD.md §2–§3)
# L_G = IKL surrogate − α_rew · r. The IKL surrogate's *value* means nothing; its gradient is
# w(t)·α_t·(ε̃_ref − ε̂_fake)/σ_t per sample. Here both terms' gradients on x0 by autograd, next to what
# `dipp_step` logs for choosing α_rew: the per-sample RMS of each term's pull on x0 (grad_ikl from
# the closed form, grad_reward from the gradient backward delivers to x0, minus the IKL part).

# %%
z, t, eps = noise = dipp.draw_noise(B, (args.z_dim,), (2,), cfg, "cpu")
x0 = nets.G_c(z)
ikl = dipp.ikl_loss(x0, t, eps, schedule, nets.teacher_eps_c, nets.fake_eps_c, cfg.ikl_weighting).sum()
rew = dipp.reward_loss(reward(x0), cfg.reward_scale).sum()
g_ikl, = torch.autograd.grad(ikl, x0, retain_graph=True)  # per-sample gradients (sum over the batch)
g_rew, = torch.autograd.grad(rew, x0)
print(f"autograd: RMS ∂L_IKL/∂x0 {dipp.rms(g_ikl):.4f} | RMS α_rew ∂(−r)/∂x0 {dipp.rms(g_rew):.4f}")
stats = dipp.dipp_step(nets, opt, [noise], schedule, cfg)  # only the generator update: no fake-score noise given
print({k: round(float(v), 4) for k, v in stats.items() if k not in ("loss_fake", "x0")})

# %% [markdown]
# ## A short training run, then the trade-off
# `toy.run` trains one generator per α_rew (plus the CFG runs) and compares each with the exact
# optimum of the plain-KL problem, p_ref·exp(r/β)/Z.

# %%
FIGURES = os.path.relpath(os.path.join(ROOT, "toy_out_notebook"))
results = toy.run((["--quick"] if TINY else []) + ["--out", FIGURES])

# %%
from IPython.display import Image, display  # noqa: E402

display(Image(os.path.join(FIGURES, "toy.png")))
for s in results["tradeoff"]:
    print(f"α_rew {s['reward_scale']:<5} KL {s['kl']:.3f}  mean reward {s['reward']:.3f}")
