"""DI++'s exact optimum: a Gaussian reference, a linear reward, and what α_rew means.

Reference p = N(μ, s² I), reward r(x) = aᵀx. The objective whose gradient dipp's generator update follows,
    J(q) = −α_rew E_q[aᵀx] + Σ_t π(t) w(t) KL(q_t ‖ p_t)          (w(t) = dipp.ikl_weight, score units)
is minimised by q* = N(m*, s² I) with
    m* = μ + α_rew a / W,   W = Σ_t π(t) w(t) α_t² / (α_t² s² + σ_t²)
(METHOD.md §6), while the plain-KL (RLHF) optimum, max E_q[r] − KL(q‖p)/α_rew, is μ + α_rew s² a.
So the same α_rew moves samples by an amount set by w(t) and π(t). This file trains DI++ (dipp's own
dipp_step, through toy/gmm.py's train) and measures the generator against m*.

    python toy/optimum.py            # α_rew sweep, ~1 min on 2 CPU cores -> optimum_out/{optimum.json,optimum.png}
    python toy/optimum.py --study    # weighting study: w(t) × π(t) × seeds -> optimum_out/{study.json,study.png}
    python toy/optimum.py --quick    # one short run, for the tests
    python toy/optimum.py --schedule flow --shift 3 [--study] [--fake_param v]   # on SD3.5's flow path -> optimum_flow_out/
                                     (docs/toy.md, "The flow-matching schedule (SD3.5)")

Everything exact (π(t) as a vector, W, m*, the closed-form IKL) is computed here from the schedule;
everything that trains is dipp's. DMD2's weighting has no W (its normaliser depends on the sample, so
it is not a fixed divergence): for it, W is *measured* at q = N(μ + δa, s² I) from dipp.ikl_loss's
mean gradient, which predicts where the mean would stop if the spread stayed s.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dipp  # noqa: E402  (the repo root holds dipp.py)
import plumbing  # noqa: E402
import gmm as toy  # noqa: E402  (the exact Gaussian teacher, the MLPs and DI++'s training loop)
import plumbing  # noqa: E402  (one-line errors, the process pool)

# -----------------------------------------------------------------------------
# Forward processes: SD1.5's DDPM schedule (dipp.Schedule) or SD3.5's flow-matching path


def flow_sigmas(shift, T=1000):
    """σ_t, t ∈ {0..T−1} increasing (t = 0 the least noisy), the floats diffusers' FlowMatchEulerDiscreteScheduler(
    num_train_timesteps=T, shift=shift) builds as its training `sigmas` (which run from σ = 1 down: the same list
    reversed), computed in its float32 order of operations:
        u = linspace(1, T, T) / T,   σ = shift·u / (1 + (shift − 1)·u)       (SD3's timestep shift; SD3.5: 3.0)
    so σ_{T−1} = 1 (pure noise) and σ_0 = shift/(T + shift − 1)."""
    u = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)) / T  # (T,) float32, as diffusers
    return shift * u / (1 + (shift - 1) * u)


def make_schedule(args):
    """The forward process named by --schedule: 'ddpm' is SD1.5's scaled-linear dipp.Schedule (the default),
    'flow' SD3.5's rectified flow with --shift."""
    return dipp.Schedule.flow(flow_sigmas(args.shift)) if args.schedule == "flow" else dipp.Schedule.scaled_linear()


def alpha_problem(schedule, t_max):
    """None if α_t > 0 on {0..t_max}; else a one-line reason. On a flow path α_{T−1} = 1 − σ = 0: w(t) = σ²/α²
    (and x̂0 = (x_t − σ ε̂)/α in dipp.ikl_loss) divide by α, so t = T−1 gives inf/NaN, and near it every ε error
    is amplified σ/α-fold (155× at t = 980 with shift 3). Hence π's range stops short of σ = 1, as SD's does
    (U{20..980}); t_max's own α is the smallest, α_t falling in t."""
    alpha, sigma = schedule.alpha_sigma(torch.tensor([t_max]), 1)
    if not alpha.item() > 0:
        return f"--t_max {t_max}: α_t = 1 − σ_t = {alpha.item():g} there, and w(t) divides by α; use --t_max <= " \
               f"{schedule.T - 2} (980: SD's U{{20..980}}, σ/α = 155 on the shift-3 flow)"
    return None

# -----------------------------------------------------------------------------
# Exact quantities: π(t) as a vector, W, m*, the closed-form IKL between isotropic Gaussians


def timestep_pmf(schedule, kind, t_min, t_max, mean=dipp.LOGNORMAL_MEAN, std=dipp.LOGNORMAL_STD):
    """π(t) over {0..T−1} as probabilities (T,), float64, computed exactly rather than sampled:
    uniform: 1/(t_max − t_min + 1) on the range; lognormal: the N(mean, std²) mass of log(σ_t/α_t)
    between the midpoints to the neighbouring timesteps, tails to the ends (mean, std: dipp's N(−1.2, 1.2²)
    unless given). (The reference that test_toy.py compares dipp.sample_timesteps' histogram against.)"""
    pmf = torch.zeros(schedule.T, dtype=torch.float64)
    if kind == "uniform":
        pmf[t_min:t_max + 1] = 1 / (t_max - t_min + 1)
        return pmf
    alpha, sigma = schedule.table.double()[:, t_min:t_max + 1]  # 2 × (n,)
    log_sigma_ve = torch.log(sigma / alpha)  # (n,), as dipp.sample_timesteps computes it
    z = ((log_sigma_ve[1:] + log_sigma_ve[:-1]) / 2 - mean) / std
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * (1 + torch.erf(z / math.sqrt(2))),
                     torch.ones(1, dtype=torch.float64)])  # (n+1,): Φ at the bin edges
    pmf[t_min:t_max + 1] = cdf[1:] - cdf[:-1]
    return pmf


def all_alpha_sigma(schedule):
    t = torch.arange(schedule.T)
    alpha, sigma = schedule.alpha_sigma(t, 1)  # (T,)
    return alpha.double(), sigma.double()


def alpha_sigma_on(schedule, pmf):
    """α_t, σ_t (T,) float64 where π(t) > 0, and α = σ = 1 elsewhere: on a flow path α_{T−1} = 0 makes w(t) =
    σ²/α² infinite at t = T−1, outside π's range, and π·w = 0·∞ would be NaN (in the value, and in autograd's
    backward even through a mask). The placeholders only ever meet π(t) = 0, so the sums are unchanged."""
    alpha, sigma = all_alpha_sigma(schedule)
    off = pmf == 0
    return alpha.masked_fill(off, 1.0), sigma.masked_fill(off, 1.0)


def ikl_W(schedule, pmf, weighting, s):
    """W = Σ_t π(t) w(t) α_t² / (α_t² s² + σ_t²): the IKL's curvature in the mean (METHOD.md §6).
    w(t) is dipp.ikl_weight itself ('x0' or 'eps'; 'dmd2' has none, see dmd2_W)."""
    alpha, sigma = alpha_sigma_on(schedule, pmf)
    w = dipp.ikl_weight(weighting, alpha, sigma)  # (T,)
    return (pmf * w * alpha ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2)).sum().item()


def optimum_mean(mu, a, reward_scale, W):
    """m* = μ + α_rew a / W: the DI++ optimum's mean (its covariance is the reference's, s² I)."""
    return [m + reward_scale * ai / W for m, ai in zip(mu, a)]


def plain_kl_mean(mu, a, reward_scale, s):
    """Mean of the plain-KL optimum p·exp(α_rew aᵀx)/Z = N(μ + α_rew s² a, s² I)."""
    return [m + reward_scale * s ** 2 * ai for m, ai in zip(mu, a)]


def exact_ikl(schedule, pmf, weighting, mu, s, m, s_q):
    """Σ_t π(t) w(t) KL(N(α m, v_q I) ‖ N(α μ, v_p I)) in closed form, v = α² s² + σ², d = len(μ):
        KL = d/2 (v_q/v_p − 1 − log(v_q/v_p)) + α² ‖m − μ‖² / (2 v_p).   m, s_q may require grad."""
    alpha, sigma = alpha_sigma_on(schedule, pmf)
    w = dipp.ikl_weight(weighting, alpha, sigma)  # (T,)
    v_q, v_p = alpha ** 2 * s_q ** 2 + sigma ** 2, alpha ** 2 * s ** 2 + sigma ** 2  # (T,)
    mu = torch.as_tensor(mu, dtype=torch.float64)
    kl = len(mu) / 2 * (v_q / v_p - 1 - torch.log(v_q / v_p)) + alpha ** 2 * (m - mu).pow(2).sum() / (2 * v_p)
    return (pmf * w * kl).sum()


def gaussian(mu, s):
    """N(μ, s² I) as a one-component toy.GaussianMixture: its exact diffused score is the teacher."""
    return toy.GaussianMixture([list(mu)], [s], [1.0], [0])


def mean_ikl_grad(schedule, pmf, weighting, mu, s, m, s_q, n=256, seed=0):
    """E[∂ dipp.ikl_loss / ∂(m, s_q)] for the generator x0 = m + s_q z, with *exact* scores: the
    teacher is N(μ, s²) diffused, the fake score N(m, s_q²) diffused. The sum over t is exact (every t
    in π's support, weighted by π(t)); z and ε are Monte Carlo, n per timestep, common to every call
    with the same seed. Returns (grad_m (d,), grad_s_q ()) in float64."""
    g = torch.Generator().manual_seed(seed)
    support = pmf.nonzero()[:, 0]
    t = support.repeat_interleave(n)  # (|supp|·n,)
    m = torch.tensor(m, dtype=torch.float32, requires_grad=True)
    s_q_ = torch.tensor(float(s_q), requires_grad=True)
    z = torch.randn(len(t), len(mu), generator=g)  # z ~ N(0, I)
    eps = torch.randn(len(t), len(mu), generator=g)  # ε ~ N(0, I)
    x0 = m + s_q_ * z  # (N, d)
    c = torch.zeros(len(t), dtype=torch.long)
    real = lambda x_t, tt: gaussian(mu, s).eps_fn(schedule)(x_t, tt, c)
    fake = lambda x_t, tt: gaussian(m.tolist(), s_q).eps_fn(schedule)(x_t, tt, c)
    loss = dipp.ikl_loss(x0, t, eps, schedule, real, fake, weighting)  # (N,)
    weights = (pmf[t] / n).float()  # each timestep's share of π, split over its n samples
    grad_m, grad_s = torch.autograd.grad((weights * loss).sum(), (m, s_q_))
    return grad_m.double(), grad_s.double()


def dmd2_W(schedule, pmf, mu, s, a, shift, n=256):
    """DMD2's 'W' at q = N(μ + shift·a, s² I): the component along a of dipp.ikl_loss's mean gradient
    over the shift. Unlike x0/eps it depends on where q is (the normaliser grows with ‖x0 − x̂0_ref‖)."""
    a_hat = torch.tensor(a, dtype=torch.float64) / math.hypot(*a)
    m = (torch.tensor(mu, dtype=torch.float64) + shift * a_hat).tolist()
    grad_m, _ = mean_ikl_grad(schedule, pmf, "dmd2", mu, s, m, s, n)
    return (grad_m @ a_hat).item() / shift


def curvature(schedule, args, weighting, sampling, shift):
    """W of (w, π), and the α_rew that puts m* at μ + shift·â (so every setting has the same target)."""
    pmf = timestep_pmf(schedule, sampling, args.t_min, args.t_max)
    if weighting == "dmd2":
        W = dmd2_W(schedule, pmf, args.mu, args.s, args.a, shift)
    else:
        W = ikl_W(schedule, pmf, weighting, args.s)
    return W, W * shift / math.hypot(*args.a)

# -----------------------------------------------------------------------------
# Training: toy/gmm.py's DI++ loop (dipp's Alg. 1 steps) on the Gaussian reference


def run_one(args, weighting, sampling, reward_scale, seed):
    """Train one generator; return its mean and per-axis spread (from args.eval_samples fixed z) at
    step 0 and every args.log_every steps."""
    torch.set_num_threads(1)  # small MLPs: one thread per run, runs in parallel across cores
    schedule = make_schedule(args)
    reference = gaussian(args.mu, args.s)
    a = torch.tensor(args.a)
    run_args = argparse.Namespace(**{**vars(args), "weighting": weighting, "timestep_sampling": sampling})
    z_eval = torch.randn(args.eval_samples, args.z_dim, generator=torch.Generator().manual_seed(10_000 + seed))
    c_eval = torch.zeros(args.eval_samples, dtype=torch.long)
    trace = []

    def log(step, G):
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                x = G(z_eval, c_eval)  # (N, 2)
            trace.append({"step": step, "mean": x.mean(0).tolist(), "std": x.std(0).tolist()})

    toy.train(reference, schedule, run_args, reward_scale, 1.0, lambda x0, c: x0 @ a, seed=seed, on_step=log)
    return trace


def run_all(args, jobs, fn=None):
    """jobs: {name: arguments} -> {name: fn(args, *arguments)}, over args.workers processes. fn defaults to
    run_one (arguments: weighting, sampling, reward_scale, seed); toy/digits.py passes its own job."""
    fn = fn or run_one
    if args.workers > 1 and len(jobs) > 1:
        return plumbing.run_in_processes(fn, {k: (args, *v) for k, v in jobs.items()}, args.workers)
    return {k: fn(args, *v) for k, v in jobs.items()}


def errors(point, m_star, mu, s):
    """Relative error of the mean, ‖m − m*‖ / ‖m* − μ‖, and of the spread, max_i |std_i − s| / s."""
    dist = math.dist(point["mean"], m_star) / math.dist(m_star, mu)
    return dist, max(abs(v - s) / s for v in point["std"])


def summarise(trace, m_star, mu, s, a):
    """Numbers for one run. The generator jitters around its fixed point (Adam at a constant step size),
    so its *position* is the average of the logged means over the second half (a Polyak average):
      rel_err     ‖m̄ − m*‖ / ‖m* − μ‖ of that average (None when there is no m*)
      jitter      RMS of ‖m(step) − m̄‖ / ‖m* − μ‖ over the same window
      shift       (m̄ − μ)·â, the distance travelled along the reward direction
      drift       change of the shift per 1000 steps over the window (≈ 0 once converged)
      reach       first logged step at which ‖m − m*‖ < 0.2 ‖m* − μ‖ (80 % of the way), or None
      std_along / std_across  the spread along â and across it, to compare with s."""
    steps = trace[-1]["step"]
    late = [p for p in trace if p["step"] > steps / 2]
    mean = torch.tensor([p["mean"] for p in late]).mean(0)  # (2,)
    a_hat = torch.tensor(a) / math.hypot(*a)
    shifts = [(torch.tensor(p["mean"]) - torch.tensor(mu)) @ a_hat for p in late]
    std = torch.tensor([p["std"] for p in late]).mean(0)
    out = {"mean": mean.tolist(), "shift": float((mean - torch.tensor(mu)) @ a_hat),
           "drift": float(shifts[-1] - shifts[0]) / max(late[-1]["step"] - late[0]["step"], 1) * 1000,
           "std_along": float(std @ a_hat.abs()), "std_across": float(std @ (1 - a_hat.abs())),
           "rel_err": None, "jitter": None, "reach": None}
    if m_star is not None:
        scale = math.dist(m_star, mu)
        out["reach"] = next((p["step"] for p in trace if math.dist(p["mean"], m_star) < 0.2 * scale), None)
        out["rel_err"] = math.dist(mean.tolist(), m_star) / scale
        out["jitter"] = math.sqrt(sum(math.dist(p["mean"], mean.tolist()) ** 2 for p in late) / len(late)) / scale
    return out


def tail_mean(trace, step):
    """The Polyak average at `step`: the mean of the logged means over (step/2, step]."""
    window = [p["mean"] for p in trace if step / 2 < p["step"] <= step]
    return torch.tensor(window).mean(0).tolist()


def dmd2_shift(schedule, args, sampling, reward_scale, shifts=None):
    """Where DMD2's mean would stop (spread held at s): the δ with δ·W_dmd2(δ) = α_rew ‖a‖, from the
    restoring force F(δ) = δ·W_dmd2(δ) on a grid of δ. F saturates (at about the dimension, 2, for a
    shift along one axis: the normaliser grows like the distance), so for α_rew‖a‖ above max F there
    is no fixed point and the mean runs away: returns None then."""
    shifts = shifts or [0.05 * 1.25 ** k for k in range(36)]  # 0.05 .. 120
    pmf = timestep_pmf(schedule, sampling, args.t_min, args.t_max)
    force = [d * dmd2_W(schedule, pmf, args.mu, args.s, args.a, d, n=32) for d in shifts]
    target = reward_scale * math.hypot(*args.a)
    for k in range(1, len(shifts)):
        if force[k] >= target:  # F is increasing: interpolate linearly inside the bracket
            lo, hi = force[k - 1], force[k]
            return shifts[k - 1] + (target - lo) / (hi - lo) * (shifts[k] - shifts[k - 1])
    return None

# -----------------------------------------------------------------------------
# The two experiments


SETTINGS_SWEEP = [("x0", "uniform"), ("eps", "uniform"), ("dmd2", "uniform"), ("x0", "lognormal")]
SETTINGS_STUDY = [(w, p) for p in ("uniform", "lognormal") for w in ("x0", "eps", "dmd2")]


def label(weighting, sampling):
    return f"{weighting}/{sampling}"


def sweep(args, schedule):
    """α_rew sweep: the measured shift against α_rew/W (DI++) and α_rew s² (plain KL)."""
    jobs = {f"{label(w, p)}@{r:g}": (w, p, r, args.seed) for w, p in SETTINGS_SWEEP for r in args.reward_scales}
    print(f"optimum: {len(jobs)} runs of {args.steps} steps on {args.workers} worker(s) ...", flush=True)
    traces = run_all(args, jobs)
    rows = []
    for w, p in SETTINGS_SWEEP:
        pmf = timestep_pmf(schedule, p, args.t_min, args.t_max)
        W = None if w == "dmd2" else ikl_W(schedule, pmf, w, args.s)
        for r in args.reward_scales:
            trace = traces[f"{label(w, p)}@{r:g}"]
            if W is None:
                d = dmd2_shift(schedule, args, p, r)
                a_hat = [ai / math.hypot(*args.a) for ai in args.a]
                m_star = None if d is None else [m + d * ai for m, ai in zip(args.mu, a_hat)]
            else:
                m_star = optimum_mean(args.mu, args.a, r, W)
            rows.append({"weighting": w, "sampling": p, "reward_scale": r, "W": W, "mu": args.mu, "m_star": m_star,
                         "plain_kl_mean": plain_kl_mean(args.mu, args.a, r, args.s),
                         **summarise(trace, m_star, args.mu, args.s, args.a), "trace": trace})
    return rows


def study(args, schedule):
    """Every (w, π) with the same target m* = μ + δ·â (α_rew = W·δ/‖a‖), over args.seeds seeds."""
    cal = {(w, p): curvature(schedule, args, w, p, args.target_shift) for w, p in SETTINGS_STUDY}
    jobs = {f"{label(w, p)}#{k}": (w, p, cal[w, p][1], args.seed + k)
            for w, p in SETTINGS_STUDY for k in range(args.seeds)}
    print(f"study: {len(jobs)} runs of {args.steps} steps on {args.workers} worker(s) ...", flush=True)
    traces = run_all(args, jobs)
    a_hat = [ai / math.hypot(*args.a) for ai in args.a]
    m_star = [m + args.target_shift * ai for m, ai in zip(args.mu, a_hat)]
    out = []
    for w, p in SETTINGS_STUDY:
        W, r = cal[w, p]
        runs = [traces[f"{label(w, p)}#{k}"] for k in range(args.seeds)]
        per_seed = [summarise(tr, m_star, args.mu, args.s, args.a) for tr in runs]
        curve = torch.tensor([[math.dist(q["mean"], m_star) / args.target_shift for q in tr] for tr in runs])
        tail = torch.tensor([[math.dist(tail_mean(tr, q["step"]), m_star) / args.target_shift for q in tr[1:]]
                             for tr in runs])  # the Polyak average's error as the run goes on
        values = lambda key: torch.tensor([math.nan if x[key] is None else float(x[key]) for x in per_seed])
        stat = lambda key: [float(values(key).mean()), float(values(key).std())]  # nan: not reached
        out.append({"weighting": w, "sampling": p, "W": W, "reward_scale": r,
                    "steps": [q["step"] for q in runs[0]],
                    "err_mean": curve.mean(0).tolist(), "err_std": curve.std(0).tolist(),  # over seeds
                    "tail_err_mean": tail.mean(0).tolist(), "tail_err_std": tail.std(0).tolist(),  # from step 1
                    **{k: stat(k) for k in ("rel_err", "jitter", "reach", "shift", "drift", "std_along",
                                            "std_across")},
                    "per_seed": per_seed, "traces": runs})
    return {"m_star": m_star, "rows": out}

# -----------------------------------------------------------------------------
# Figures


def schedule_tag(args):
    """'' on the default DDPM schedule (its figures as before), the flow path named otherwise."""
    return f"on SD3.5's flow path (shift {args.shift:g})" if args.schedule == "flow" else ""


def plot_sweep(rows, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    top = max(args.reward_scales)
    grid = torch.linspace(0, top, 50).tolist()
    norm_a = math.hypot(*args.a)
    top_shift = 1.15 * max(math.dist(row["m_star"], args.mu) for row in rows if row["m_star"] is not None)
    ax.plot(grid, [r * args.s ** 2 * norm_a for r in grid], "k--", label="plain-KL optimum, α_rew s²‖a‖")
    for k, (w, p) in enumerate(SETTINGS_SWEEP):
        mine = [row for row in rows if (row["weighting"], row["sampling"]) == (w, p)]
        colour = f"C{k}"
        if mine[0]["W"] is not None:
            ax.plot(grid, [r * norm_a / mine[0]["W"] for r in grid], "-", color=colour,
                    label=f"{label(w, p)}: m* = α_rew‖a‖/W, W = {mine[0]['W']:.3f}")
        else:
            pred = [(row["reward_scale"], row["m_star"]) for row in mine if row["m_star"] is not None]
            ax.plot([r for r, _ in pred], [math.dist(m, args.mu) for _, m in pred], ":", color=colour,
                    label=f"{label(w, p)}: fixed point if the spread stayed s (none beyond)")
        done = [row for row in mine if row["m_star"] is not None]
        ax.errorbar([row["reward_scale"] for row in done], [row["shift"] for row in done],
                    yerr=[row["jitter"] * math.dist(row["m_star"], args.mu) for row in done],
                    fmt="o", color=colour, capsize=3)
        for row in mine:
            if row["m_star"] is None:  # no fixed point: the mean runs away, drawn at the top edge
                ax.plot(row["reward_scale"], 0.97 * top_shift, "^", color=colour)
                ax.annotate(f"{label(w, p)} runs away\n(shift {row['shift']:.2g} at the end) ",
                            (row["reward_scale"], 0.93 * top_shift), color=colour, fontsize=7, ha="right", va="top")
            cut = lambda v: min(v, 2.4 * args.s)
            ax2.plot(row["reward_scale"], cut(row["std_along"]), "o", color=colour)
            ax2.plot(row["reward_scale"], cut(row["std_across"]), "x", color=colour)
    ax.set(xlabel="α_rew", ylabel="shift of the generator's mean along a", ylim=(0, top_shift),
           title=f"DI++ on N(μ, {args.s:g}² I), r = aᵀx: measured (dots) vs exact (lines)\n{schedule_tag(args)}".rstrip())
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax2.axhline(args.s, color="k", ls="--", label="s (every exact optimum)")
    ax2.set(xlabel="α_rew", ylabel="generator's std (o along a, x across; cut at 2.4 s)",
            title="spread (colours as on the left)", ylim=(0, 2.5 * args.s))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_study(res, args, schedule, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, row in enumerate(res["rows"]):
        style = "-" if row["sampling"] == "uniform" else "--"
        ax.plot(row["steps"], row["err_mean"], style, color=f"C{k % 3}", lw=0.5, alpha=0.35)
        m, sd = torch.tensor(row["tail_err_mean"]), torch.tensor(row["tail_err_std"])
        ax.plot(row["steps"][1:], m, style, color=f"C{k % 3}", label=label(row["weighting"], row["sampling"]))
        ax.fill_between(row["steps"][1:], (m - sd).clamp_min(1e-3), m + sd, color=f"C{k % 3}", alpha=0.12)
    ax.set(xscale="log", yscale="log", xlabel="generator step", ylabel="‖m − m*‖ / ‖m* − μ‖",
           title=f"error to m*: Polyak average (thick, ± std over {args.seeds} seeds)\nand the current mean (thin)")
    ax.legend(fontsize=7)
    t = torch.arange(schedule.T)
    for k, w in enumerate(("x0", "eps")):
        for p, style in (("uniform", "-"), ("lognormal", "--")):
            pmf = timestep_pmf(schedule, p, args.t_min, args.t_max)
            alpha, sigma = alpha_sigma_on(schedule, pmf)
            integrand = dipp.ikl_weight(w, alpha, sigma) * alpha ** 2 / (alpha ** 2 * args.s ** 2 + sigma ** 2)
            ax2.plot(t, (pmf * integrand).cumsum(0), style, color=f"C{k}", label=f"{w}/{p}")
    ax2.set(xlabel="t", ylabel="Σ_{t' ≤ t} π(t') w(t') α² / (α² s² + σ²)",
            title="where W comes from (cumulative; the end is W)" + ("\n" + schedule_tag(args)).rstrip())
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

# -----------------------------------------------------------------------------
# Entry point


def parse(argv=None):
    p = plumbing.FlagParser("toy/optimum.py", __doc__.split("\n\n")[0])  # (exact flags, one-line errors)
    p.add_argument("--study", action="store_true", help="run the weighting study instead of the α_rew sweep")
    p.add_argument("--quick", action="store_true", help="one short x0/uniform run, for the tests (~15 s)")
    p.add_argument("--mu", type=float, nargs=2, default=[0.0, 0.0], help="reference mean μ")
    p.add_argument("--s", type=float, default=1.0, help="reference std s (1: the generator starts near it)")
    p.add_argument("--a", type=float, nargs=2, default=[1.0, 0.0], help="reward r(x) = aᵀx")
    p.add_argument("--reward_scales", type=float, nargs="+", default=[0.5, 1.0, 2.5], help="α_rew of the sweep")
    p.add_argument("--target_shift", type=float, default=1.0, help="study: ‖m* − μ‖, the same for every (w, π)")
    p.add_argument("--seeds", type=int, default=4, help="study: seeds per (w, π)")
    p.add_argument("--t_min", type=int, default=20, help="π(t) lives on {t_min..t_max}")
    p.add_argument("--t_max", type=int, default=980, help="π(t) upper end")
    p.add_argument("--z_dim", type=int, default=16, help="dimension of the generator's noise z")
    p.add_argument("--k_ta", type=int, default=2, help="K_TA: fake-score updates per generator update")
    p.add_argument("--steps", type=int, default=None, help="generator updates per run (sweep 400, study 2000)")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="generator Adam learning rate")
    p.add_argument("--lr_fake", type=float, default=2e-3, help="fake-score Adam learning rate")
    p.add_argument("--eval_samples", type=int, default=4096, help="generator samples per measurement (fixed z)")
    p.add_argument("--log_every", type=int, default=10, help="measure the generator every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run")
    p.add_argument("--schedule", choices=["ddpm", "flow"], default="ddpm",
                   help="forward process: SD1.5's scaled-linear DDPM schedule, or SD3.5's flow path (α_t = 1 − σ_t)")
    p.add_argument("--shift", type=float, default=3.0, help="--schedule flow: the scheduler's shift (SD3.5: 3.0)")
    p.add_argument("--fake_param", choices=["eps", "v"], default="eps",
                   help="the fake score's learned correction: in ε units (SD1.5's UNet) or a velocity (SD3.5's "
                        "transformer: ε̂ = x_t + α_t v̂, so its error enters times α_t)")
    p.add_argument("--out", default=None, help="output folder (optimum_out; optimum_flow_out with --schedule flow)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel training runs")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2000 if args.study else 400
    if args.out is None:
        args.out = "optimum_flow_out" if args.schedule == "flow" else "optimum_out"
    if args.quick:  # (a flag given explicitly wins over the preset)
        plumbing.apply_preset(args, dict(steps=300, reward_scales=[1.0]), argv)
    if args.s <= 0 or math.hypot(*args.a) == 0 or min(args.reward_scales) < 0 or args.target_shift <= 0:
        p.error("need --s > 0, a nonzero --a, --reward_scales >= 0 and --target_shift > 0")
    if args.steps < 2 or args.seeds < 2 or args.log_every < 1:
        p.error("need --steps >= 2, --seeds >= 2 (the study reports a spread) and --log_every >= 1")
    finite = lambda v: math.isfinite(v)
    plumbing.check_ranges(p, args, {
        "z_dim": (lambda v: v >= 2, ">= 2"), "k_ta": (lambda v: v >= 1, ">= 1"),
        "batch": (lambda v: v >= 2, ">= 2"), "lr": (lambda v: v > 0 and finite(v), "> 0"),
        "lr_fake": (lambda v: v > 0 and finite(v), "> 0"), "eval_samples": (lambda v: v >= 2, ">= 2"),
        "workers": (lambda v: v >= 1, ">= 1 (1 = no worker processes)"), "mu": (finite, "finite"),
        "a": (finite, "finite"), "s": (finite, "finite"), "reward_scales": (finite, "finite"),
        "target_shift": (finite, "finite"), "shift": (lambda v: v > 0 and finite(v), "> 0 (SD3.5: 3.0)")})
    plumbing.check_config(dipp.Config(t_min=args.t_min, t_max=args.t_max))  # π(t) inside the schedule
    problem = alpha_problem(make_schedule(args), args.t_max)  # a flow's α reaches 0 at t = T−1
    if problem:
        p.error(problem)
    return args


def flow_facts(schedule, args):
    """What the flow path does to w(t) and π(t), for the docs: σ/α at π's ends, the log-normal π's draws in
    t, and W under SD3's own training π: rectified flow's logit-normal u (logit u ~ N(0, 1), SD3's paper's
    rf/lognorm(0, 1)) pushed through the shift, σ/α = shift·u/(1 − u), is log(σ/α) ~ N(log shift, 1)."""
    alpha, sigma = all_alpha_sigma(schedule)
    lognormal = timestep_pmf(schedule, "lognormal", args.t_min, args.t_max)
    sd3 = timestep_pmf(schedule, "lognormal", args.t_min, args.t_max, mean=math.log(args.shift), std=1.0)
    ratio = lambda t: (sigma[t] / alpha[t]).item()
    return {"sigma_over_alpha_at_t_min": ratio(args.t_min), "sigma_over_alpha_at_t_max": ratio(args.t_max),
            "lognormal_mass_t_ge_500": lognormal[500:].sum().item(),
            "sd3_training_pi_W": {w: ikl_W(schedule, sd3, w, args.s) for w in ("x0", "eps")},
            "sd3_training_pi_median_t": int((sd3.cumsum(0) >= 0.5).nonzero()[0]),
            "sd3_training_pi_mass_at_ends": [sd3[args.t_min].item(), sd3[args.t_max].item()]}


def quick(args, schedule):
    """The CI check: one x0/uniform run (dipp's default w, π) at α_rew = W: m* = μ + a."""
    W = ikl_W(schedule, timestep_pmf(schedule, "uniform", args.t_min, args.t_max), "x0", args.s)
    r = args.reward_scales[0] * W
    m_star = optimum_mean(args.mu, args.a, r, W)
    trace = run_one(args, "x0", "uniform", r, args.seed)
    return {"W": W, "reward_scale": r, "m_star": m_star, "plain_kl_mean": plain_kl_mean(args.mu, args.a, r, args.s),
            **summarise(trace, m_star, args.mu, args.s, args.a), "trace": trace}


def run(argv=None):
    args = parse(argv)
    t_start = time.time()
    plumbing.writable_dir(args.out, "--out")
    schedule = make_schedule(args)
    lognormal = timestep_pmf(schedule, "lognormal", args.t_min, args.t_max)
    exact = {"W": {label(w, p): ikl_W(schedule, timestep_pmf(schedule, p, args.t_min, args.t_max), w, args.s)
                   for p in ("uniform", "lognormal") for w in ("x0", "eps")},
             "plain_kl_W": 1 / args.s ** 2,
             "lognormal_mass_at_t_min": lognormal[args.t_min].item(),
             "lognormal_mass_at_t_max": lognormal[args.t_max].item(),
             "lognormal_median_t": int((lognormal.cumsum(0) >= 0.5).nonzero()[0])}
    if args.schedule == "flow":
        exact.update(flow_facts(schedule, args))
    if args.quick:
        name, res = "quick", quick(args, schedule)
    elif args.study:
        name, res = "study", study(args, schedule)
    else:
        name, res = "optimum", {"sweep": sweep(args, schedule)}
    res.update(exact=exact, args=vars(args), wall_time_s=time.time() - t_start)
    json.dump(res, open(os.path.join(args.out, f"{name}.json"), "w"), indent=1)
    if name == "study":
        plot_study(res, args, schedule, os.path.join(args.out, "study.png"))
        report_study(res)
    elif name == "optimum":
        plot_sweep(res["sweep"], args, os.path.join(args.out, "optimum.png"))
        report_sweep(res["sweep"])
    print(f"wrote {args.out}/{name}.json{'' if name == 'quick' else ', ' + name + '.png'} "
          f"in {res['wall_time_s']:.1f} s")
    return res


def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def report_sweep(rows):
    print("setting          α_rew  W      | shift: DI++ exact  measured  plain-KL | rel.err  jitter | std along/across")
    for row in rows:
        exact = None if row["m_star"] is None else math.dist(row["m_star"], row["mu"])
        note = "" if row["m_star"] is not None else f"  no optimum: drift {row['drift']:.2f} per 1000 steps"
        print(f"{label(row['weighting'], row['sampling']):16s} {row['reward_scale']:5.2f}  {fmt(row['W']):5s}  | "
              f"{fmt(exact):>17s}  {row['shift']:8.3f}  {math.dist(row['plain_kl_mean'], row['mu']):8.3f} | "
              f"{fmt(row['rel_err']):7s}  {fmt(row['jitter']):6s} | {row['std_along']:.3f}/{row['std_across']:.3f}{note}")


def report_study(res):
    print("(mean ± std over seeds)  W      α_rew | rel.err (Polyak)  jitter         80 % reached  "
          "shift            | std along        std across")
    pm = lambda pair, spec=".3f": f"{format(pair[0], spec)} ± {format(pair[1], spec)}"
    for row in res["rows"]:
        print(f"{label(row['weighting'], row['sampling']):23s} {row['W']:.3f}  {row['reward_scale']:.3f} | "
              f"{pm(row['rel_err'])}     {pm(row['jitter'])}  {pm(row['reach'], '.0f'):12s}  {pm(row['shift'])} | "
              f"{pm(row['std_along'])}  {pm(row['std_across'])}")


if __name__ == "__main__":
    with plumbing.as_program("toy/optimum"), plumbing.stopped_in_one_line(
            "nothing of this run is kept; run the command again"):  # (one line; the worker processes end too)
        run()
