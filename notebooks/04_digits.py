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
# # 04 — Diff-Instruct++ on real images: scikit-learn's handwritten digits
#
# > "we formulate the alignment problem as maximizing the expected human reward functions while
# > adding an Integral Kullback-Leibler divergence term to encourage the generator to stay close to
# > a reference diffusion process." — Diff-Instruct++, arXiv 2410.18881
#
# Notebook 01 checks DI++ against exact answers on a 2-D mixture. Here the teacher is *trained*: a small
# class-conditional diffusion model on the 1,797 8×8 digits that ship inside scikit-learn (the class is
# the prompt). A one-step generator is distilled from it and aligned with a reward by `dipp.py`'s own
# `dipp_step`; `toy/digits.py` supplies the data, the networks and the metrics.
# The teacher, the judge (the reward model) and the referee (the evaluator) are trained once per machine
# and cached. Set `DIPP_TINY=1` for a fast run on the `--quick` teacher (what the tests do).

# %%
import copy
import os
import sys

import matplotlib.pyplot as plt
import torch

ROOT = os.path.abspath("..") if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path[:0] = [ROOT, os.path.join(ROOT, "toy")]
import dipp  # noqa: E402
import digits  # noqa: E402
import plumbing  # noqa: E402

TINY = os.environ.get("DIPP_TINY") == "1"
torch.manual_seed(0)
torch.set_num_threads(1)  # small MLPs: one thread is as fast, and leaves the other core free
args = digits.parse(["--quick"] if TINY else [])

# %% [markdown]
# ## The data and the three trained networks
# Pixels 0..16 become [−1, 1] (ink = +1). The teacher is an ε-predicting MLP trained by denoising score
# matching (`dipp.fake_score_loss`, the same DSM the fake score uses) with 10 % of labels dropped to ∅, so
# one network gives both s_c and s_∅ for CFG. The **judge** (an MLP classifier) is the reward model:
# r(x, c) = log p_judge(c|x), "does the image show the prompt". The **referee** (a small CNN) only
# measures: its accuracy and its feature space for Fréchet distances, so a generator that fools the
# judge does not also grade itself.

# %%
data = digits.load_data()
teacher, judge, referee, info = digits.load_models(args)
schedule = digits.make_schedule()
print({k: v for k, v in info.items()})
c = digits.eval_prompts(5)
shown = {"real digits": data["x_test"][torch.cat([(data["c_test"] == k).nonzero()[:5, 0] for k in range(10)])]}
for omega in (1.0, args.guidance_scale):
    shown[f"teacher, 50 steps, ω = {omega:g}"] = digits.sample_teacher(teacher, schedule, c, 50, omega,
                                                                       torch.Generator().manual_seed(0))
fig, axes = plt.subplots(1, 3, figsize=(15, 3))
for ax, (title, x) in zip(axes, shown.items()):
    ax.imshow(-digits.grid(x, c), cmap="gray", vmin=-1, vmax=1)
    ax.set(title=title)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## One DI++ iteration (METHOD.md §2–§4, Alg. 1)
# Both the generator g_θ and the fake score s_ψ start as copies of the teacher; g_θ is the teacher's
# ε-network read out once at t* (`digits.Generator`). `dipp.dipp_step` runs one fake-score update (DSM on
# detached generator samples), then one generator update: the IKL surrogate plus −α_rew·r. It reports how
# hard each term pulls on x0 (per-sample RMS of ∂L/∂x0: grad_ikl, grad_reward), which is how α_rew is chosen.

# %%
cfg = dipp.Config(reward_scale=10.0, guidance_scale=1.0, t_min=args.t_min, t_max=args.t_max, max_grad_norm=0)
G = digits.Generator(teacher, schedule, args.t_star)
fake = copy.deepcopy(teacher).requires_grad_(True)
opt = dipp.Optimizers(fake=plumbing.cpu_adam(fake, args.lr_fake), G=plumbing.cpu_adam(G, args.lr))  # Adam, β1 = 0
B = 64
c = torch.randint(10, (B,))
nets = dipp.Bound(G_c=lambda z: G(z, c),
                  teacher_eps_c=dipp.guided(teacher, c, torch.full((B,), -1), cfg.guidance_scale),
                  fake_eps_c=lambda x_t, t: fake(x_t, t, c), reward_c=lambda x0: digits.judge_reward(judge)(x0, c))
noises = [dipp.draw_noise(B, digits.SHAPE, digits.SHAPE, cfg, "cpu") for _ in range(2)]  # one fake, one G update
stats = dipp.dipp_step(nets, opt, noises, schedule, cfg)
print({k: round(float(v), 4) for k, v in stats.items() if k != "x0"})  # x0: the sample itself

# %% [markdown]
# ## A short run: Diff-Instruct against DI++ with the judge
# `digits.train` is the loop above (dipp's steps, with the prompt bound into closures), plus an EMA of θ.
# We follow the judge's reward and the referee's accuracy on fixed noise while training.

# %%
runs = {"Diff-Instruct (α_rew = 0)": 0.0, "DI++, judge, α_rew = 10": 10.0}
short = copy.copy(args)
short.steps = 30 if TINY else 300
curves = {}
for name, reward_scale in runs.items():
    trace = []

    def record(step, G):
        if step % (10 if TINY else 50) == 0:
            x = digits.one_step_samples(G, short, digits.COMMON_Z)
            c_eval = digits.eval_prompts(short.eval_per_class)
            with torch.no_grad():
                trace.append((step, digits.judge_reward(judge)(x, c_eval).mean().item(),
                              (referee(digits.to_image(x)).argmax(1) == c_eval).float().mean().item()))
    G, _ = digits.train(teacher, schedule, short, reward_scale, 1.0,
                        digits.judge_reward(judge) if reward_scale else None, on_step=record)
    curves[name] = (trace, G)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, (trace, _) in curves.items():
    steps, reward, accuracy = zip(*trace)
    axes[0].plot(steps, reward, "o-", label=name)
    axes[1].plot(steps, accuracy, "o-", label=name)
axes[0].set(xlabel="generator step", ylabel="judge log p(c|x)", title="the reward")
axes[1].set(xlabel="generator step", ylabel="referee accuracy", title="an independent reading of the prompt")
axes[0].legend()
plt.show()

# %% [markdown]
# ## The full run
# `python toy/digits.py` repeats this over α_rew for two rewards (the judge, and "ink": bolder digits),
# CFG ω against its explicit implicit reward, w(t) and K_TA, three seeds each. Its figure is
# `toy/digits.png`; the table, the wall times and what the numbers say are in `docs/digits.md`.

# %%
from IPython.display import Image, display  # noqa: E402

display(Image(os.path.join(ROOT, "toy", "digits.png")))
