"""DI++ on a 2-D class-conditional Gaussian mixture with an *exact* teacher.

The reference p(x|c) is a Gaussian mixture, so its diffused score and log p_t(c|x) are closed-form
(METHOD.md §6): no pretraining, and every claim can be checked against an exact answer. Everything
DI++-specific (losses, CFG, the generator and fake-score updates) is imported from dipp.py; this
file holds only the mixture, two small MLPs, metrics and plots.

    python toy/gmm.py                # the default experiments, 77 s on 2 CPU cores (docs/toy.md) -> toy_out/
    python toy/gmm.py --quick        # 47 CPU-seconds (200 s on a loaded 2-core CPU): fewer steps and α_rew values

Experiments (numbers in toy_out/results.json, figure in toy_out/toy.png):
  recovery  α_rew = 0, ω = 1: the generator should match the reference (MMD vs the noise floor).
  tradeoff  a sweep over α_rew: mean reward against KL(p_θ‖p_ref), next to the exact optimal
            frontier of the plain-KL problem, p_β ∝ p_ref·exp(r/β) (β = 1/α_rew).
  cfg       ω > 1 with no explicit reward vs ω = 1 plus the explicit reward r_cfg with α = ω − 1
            (METHOD.md §5): the two should give the same distribution.
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dipp  # noqa: E402  (the repo root holds dipp.py)
import plumbing  # noqa: E402  (one-line errors, the process pool)

# -----------------------------------------------------------------------------
# The exact reference: p(x|c) = Σ_{k∈K_c} π_k N(μ_k, s_k² I), diffused in closed form.


class GaussianMixture:
    """Class-conditional 2-D mixture. Component k has mean μ_k, std s_k, weight π_k, class c_k.
    Under x_t = α x0 + σ ε, component k becomes N(α μ_k, (α² s_k² + σ²) I) (METHOD.md §6)."""

    def __init__(self, means, stds, weights, classes):
        self.mu = torch.tensor(means, dtype=torch.float32)  # (K, 2)
        self.s = torch.tensor(stds, dtype=torch.float32)  # (K,)
        self.pi = torch.tensor(weights, dtype=torch.float32)  # (K,)
        self.cls = torch.tensor(classes)  # (K,)
        self.C = int(self.cls.max()) + 1
        # p(c) = Σ_{k∈K_c} π_k; within a class the weights renormalise to π_k / p(c)
        self.p_c = torch.zeros(self.C).index_add_(0, self.cls, self.pi) / self.pi.sum()  # (C,)

    def _log_comp(self, x, alpha, sigma):
        """log π_k N(x; α μ_k, v_k I) for every component: (B, K), with v_k = α² s_k² + σ²."""
        v = alpha ** 2 * self.s ** 2 + sigma ** 2  # (B, K)
        d2 = (x[:, None, :] - alpha[..., None] * self.mu).pow(2).sum(-1)  # (B, K)
        return torch.log(self.pi / self.pi.sum()) - d2 / (2 * v) - torch.log(2 * math.pi * v)

    def log_prob_t(self, x, alpha, sigma, c):
        """log p_t(x|c) (c ≥ 0) or log p_t(x) (c = −1), exact; alpha, sigma: (B, 1)."""
        lp = self._log_comp(x, alpha, sigma)  # (B, K)
        mask = (self.cls[None, :] == c[:, None]) | (c[:, None] < 0)  # (B, K): components in K_c
        return torch.logsumexp(lp.masked_fill(~mask, -float("inf")), 1) - torch.log(
            torch.where(c >= 0, self.p_c[c.clamp_min(0)], torch.ones(())))  # (B,)

    def score_t(self, x, alpha, sigma, c):
        """∇_x log p_t(x|c) = Σ_k γ_k (α μ_k − x)/v_k, γ_k the responsibilities (via logsumexp)."""
        lp = self._log_comp(x, alpha, sigma)
        mask = (self.cls[None, :] == c[:, None]) | (c[:, None] < 0)
        gamma = torch.softmax(lp.masked_fill(~mask, -float("inf")), 1)  # (B, K)
        v = alpha ** 2 * self.s ** 2 + sigma ** 2  # (B, K)
        diff = alpha[..., None] * self.mu - x[:, None, :]  # (B, K, 2)
        return (gamma[..., None] * diff / v[..., None]).sum(1)  # (B, 2)

    def log_p_class_t(self, x, alpha, sigma):
        """log p_t(c|x) = log p(c) + log p_t(x|c) − log p_t(x), for every class: (B, C)."""
        B = x.shape[0]
        lx = self.log_prob_t(x, alpha, sigma, torch.full((B,), -1))
        return torch.stack([torch.log(self.p_c[c]) + self.log_prob_t(x, alpha, sigma, torch.full((B,), c))
                            - lx for c in range(self.C)], 1)

    def eps_fn(self, schedule):
        """The exact teacher as dipp's ε-predictor eps(x_t, t, c): ε = −σ_t s(x_t)."""
        def eps(x_t, t, c):
            alpha, sigma = schedule.alpha_sigma(t, 2)  # (B, 1)
            return -sigma * self.score_t(x_t, alpha, sigma, c)
        return eps

    def sample(self, c, generator=None):
        """Exact samples x ~ p(x|c), one per entry of c (B,)."""
        w = (self.cls[None, :] == c[:, None]) * self.pi  # (B, K)
        k = torch.multinomial(w, 1, generator=generator)[:, 0]  # k ~ π_k within class c
        return self.mu[k] + self.s[k, None] * torch.randn(len(c), 2, generator=generator)  # (B, 2)

    def density_grid(self, grid, c):
        """Exact p(x|c) at grid points (N, 2), at t = 0."""
        one, zero = torch.ones(len(grid), 1), torch.zeros(len(grid), 1)
        return self.log_prob_t(grid, one, zero, torch.full((len(grid),), c)).exp()


# -----------------------------------------------------------------------------
# Rewards and networks


def make_reward(kind, direction, centre, width):
    """r(x): 'linear' ⟨d, x⟩ or 'bump' exp(−‖x − m‖² / 2w²). Differentiable, (B, 2) -> (B,)."""
    if kind == "linear":
        d = torch.tensor(direction, dtype=torch.float32)
        return lambda x: x @ d
    m = torch.tensor(centre, dtype=torch.float32)
    return lambda x: torch.exp(-(x - m).pow(2).sum(-1) / (2 * width ** 2))


class MLP(torch.nn.Module):
    def __init__(self, d_in, d_out, width=128, zero_last=False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, d_out))
        if zero_last:
            torch.nn.init.zeros_(self.net[-1].weight)
            torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x)


class Generator(torch.nn.Module):
    """g_θ(z, c) = z[:, :2] + MLP([z, onehot(c)]), z ∈ R^{z_dim}: starts near N(0, I) in 2-D. Noise of
    more than 2 dimensions lets a smooth map split mass between modes without folding the plane."""

    def __init__(self, C, z_dim):
        super().__init__()
        self.C, self.z_dim, self.mlp = C, z_dim, MLP(z_dim + C, 2, width=128)

    def forward(self, z, c):
        return z[:, :2] + self.mlp(torch.cat([z, torch.nn.functional.one_hot(c, self.C).float()], 1))  # (B, 2)


class FakeScore(torch.nn.Module):
    """s_ψ as an ε-predictor: the exact conditional teacher plus a zero-initialised MLP correction, so ψ
    starts *at* the reference, as in the paper (METHOD.md §4) where the fake score is a copy of it.
    velocity_schedule: the correction is a *velocity*, as a flow network's output is (SD3.5: ε̂ = x_t + α_t v̂,
    so an error δv̂ is an ε error α_t δv̂): the MLP's output is scaled by α_t of that schedule. None: in ε units."""

    def __init__(self, C, teacher_eps, velocity_schedule=None):
        super().__init__()
        self.C, self.teacher_eps, self.mlp = C, teacher_eps, MLP(2 + 8 + C, 2, zero_last=True)
        self.velocity_schedule = velocity_schedule

    def forward(self, x_t, t, c):
        freqs = torch.arange(4, dtype=torch.float32)  # time embedding: sin/cos of t/T at 4 scales
        phase = (t[:, None].float() / 1000) * math.pi * 2 ** freqs  # (B, 4)
        emb = torch.cat([x_t, phase.sin(), phase.cos(), torch.nn.functional.one_hot(c, self.C).float()], 1)
        if self.velocity_schedule is not None:  # ε̂ = x_t + α (v_ref + δv): the correction enters times α_t
            return self.teacher_eps(x_t, t, c) + self.velocity_schedule.alpha_sigma(t, 2)[0] * self.mlp(emb)
        return self.teacher_eps(x_t, t, c) + self.mlp(emb)  # (B, 2)


# -----------------------------------------------------------------------------
# Training: dipp's own Alg. 1 iteration (dipp.dipp_step), with the toy's conditioning bound into closures.


def train(gmm, schedule, args, reward_scale, omega, reward_fn=None, seed=0, on_step=None):
    """Train g_θ with DI++ against the exact mixture. reward_fn(x0, c) -> (B,) or None.
    on_step(step, G), if given, is called before the first update and after every update."""
    torch.manual_seed(seed)
    cfg = dipp.Config(reward_scale=reward_scale, guidance_scale=omega, fake_steps_per_G=args.k_ta,
                      t_min=args.t_min, t_max=args.t_max, timestep_sampling=args.timestep_sampling,
                      ikl_weighting=args.weighting, max_grad_norm=0)
    teacher = gmm.eps_fn(schedule)
    velocity = schedule if getattr(args, "fake_param", "eps") == "v" else None  # (toy/optimum.py --fake_param)
    G, fake = Generator(gmm.C, args.z_dim), FakeScore(gmm.C, teacher, velocity)
    opt = dipp.Optimizers(fake=plumbing.cpu_adam(fake, args.lr_fake), G=plumbing.cpu_adam(G, args.lr))  # Adam, β1 = 0
    B = args.batch
    if on_step is not None:
        on_step(0, G)
    for step in range(args.steps):
        c = torch.randint(gmm.C, (B,))  # c ~ U{classes}
        uncond = torch.full((B,), -1)  # c = ∅: the unconditional mixture
        nets = dipp.Bound(G_c=lambda z: G(z, c), teacher_eps_c=dipp.guided(teacher, c, uncond, omega),
                          fake_eps_c=lambda x_t, t: fake(x_t, t, c),  # the fake score is never guided
                          reward_c=(lambda x0: reward_fn(x0, c)) if reward_fn else None)
        noises = [dipp.draw_noise(B, (args.z_dim,), (2,), cfg, "cpu", schedule=schedule)  # π(t) on this schedule
                  for _ in range(cfg.fake_steps_per_G + 1)]
        dipp.dipp_step(nets, opt, noises, schedule, cfg)
        if on_step is not None:
            on_step(step + 1, G)
    return G


def guidance_reward(gmm, schedule, args):
    """The implicit reward of CFG as an *explicit* reward (METHOD.md §5), one Monte-Carlo sample:
        r_cfg(x0, c) = w(t) log p_t(c | α_t x0 + σ_t ε),  t ~ π(t), ε ~ N(0, I)
    with the same w(t) and π(t) as the IKL term (dipp.ikl_weight, dipp.sample_timesteps)."""
    def r(x0, c):
        t = dipp.sample_timesteps(len(x0), args.t_min, args.t_max, x0.device, args.timestep_sampling,
                                  schedule)  # t ~ π(t)
        alpha, sigma = schedule.alpha_sigma(t, 2)
        x_t = dipp.add_noise(x0, torch.randn_like(x0), alpha, sigma)  # (B, 2)
        w = dipp.ikl_weight(args.weighting, alpha, sigma)[:, 0]  # (B,)
        return w * gmm.log_p_class_t(x_t, alpha, sigma).gather(1, c[:, None])[:, 0]
    return r


# -----------------------------------------------------------------------------
# Metrics


def mmd(x, y, bandwidths=(0.2, 0.5, 1.0, 2.0)):
    """Unbiased MMD² with a sum of RBF kernels: 0 in expectation iff the distributions agree."""
    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h ** 2)) for h in bandwidths)
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
            - 2 * k(x, y).mean()).item()


def grid_points(lim, bins):
    edges = torch.linspace(-lim, lim, bins + 1)
    centres = (edges[1:] + edges[:-1]) / 2
    gx, gy = torch.meshgrid(centres, centres, indexing="ij")
    return edges, torch.stack([gx.flatten(), gy.flatten()], 1)  # (bins², 2)


def kl_on_grid(samples, p_grid, edges):
    """KL(q‖p) with q the histogram of samples and p the exact density, both on the same grid.
    (Histograms bias this upwards by about (occupied bins)/(2N); the reference's own samples show it.)"""
    bins = len(edges) - 1
    idx = torch.bucketize(samples.clamp(edges[0] + 1e-6, edges[-1] - 1e-6), edges) - 1  # (N, 2)
    q = torch.bincount(idx[:, 0] * bins + idx[:, 1], minlength=bins * bins).float()
    q, p = q / q.sum(), p_grid / p_grid.sum()
    nz = q > 0
    return (q[nz] * (q[nz] / p[nz].clamp_min(1e-30)).log()).sum().item()


def frontier(gmm, reward, grid, betas):
    """Exact optimum of max E_q[r] − β KL(q‖p_ref): q_β ∝ p_ref exp(r/β), per class, on the grid.
    Returns (mean KL, mean reward) over classes for each β."""
    r = reward(grid)  # (G,)
    out = []
    for beta in betas:
        kls, rews = [], []
        for c in range(gmm.C):
            p = gmm.density_grid(grid, c)
            p = p / p.sum()
            q = torch.softmax(p.clamp_min(1e-30).log() + r / beta, 0)  # q_β on the grid
            kls.append((q * (q.clamp_min(1e-30).log() - p.clamp_min(1e-30).log())).sum().item())
            rews.append((q * r).sum().item())
        out.append((sum(kls) / gmm.C, sum(rews) / gmm.C))
    return out


def evaluate(G, gmm, reward, grid, edges, n, seed):
    """Per-class samples of g_θ, their mean reward, grid KL to p_ref(·|c) and MMD to exact samples."""
    g = torch.Generator().manual_seed(seed)
    res = {"kl": [], "reward": [], "mmd": [], "samples": []}
    for c in range(gmm.C):
        cc = torch.full((n,), c)
        with torch.no_grad():
            x = G(torch.randn(n, G.z_dim, generator=g), cc)  # z ~ N(0, I)
        res["samples"].append(x)
        res["kl"].append(kl_on_grid(x, gmm.density_grid(grid, c), edges))
        res["reward"].append(reward(x).mean().item())
        res["mmd"].append(mmd(x[:2000], gmm.sample(cc[:2000], g)))
    return {"kl": sum(res["kl"]) / gmm.C, "reward": sum(res["reward"]) / gmm.C,
            "mmd": sum(res["mmd"]) / gmm.C, "samples": torch.cat(res["samples"]),
            "labels": torch.arange(gmm.C).repeat_interleave(n)}


def mode_weights(x, c, gmm):
    """Fraction of class-c samples assigned to each of its components (by exact responsibility)."""
    one, zero = torch.ones(len(x), 1), torch.zeros(len(x), 1)
    lp = gmm._log_comp(x, one, zero).masked_fill(gmm.cls[None, :] != c, -float("inf"))
    return torch.bincount(lp.argmax(1), minlength=len(gmm.pi)).float() / len(x)


# -----------------------------------------------------------------------------
# Entry point


def parse(argv=None):
    p = plumbing.FlagParser("toy/gmm.py", __doc__.split("\n\n")[0])  # (exact flags, one-line errors)
    p.add_argument("--means", type=float, nargs="+", default=[-1.5, 1, 1.5, 1, -1.5, -1, 1.5, -1],
                   help="component means x1 y1 x2 y2 ...")
    p.add_argument("--stds", type=float, nargs="+", default=[0.6], help="component stds (one = all)")
    p.add_argument("--weights", type=float, nargs="+", default=[1], help="component weights (one = equal)")
    p.add_argument("--classes", type=int, nargs="+", default=[0, 0, 1, 1], help="class of each component")
    p.add_argument("--reward", choices=("linear", "bump"), default="linear", help="r(x) for the trade-off")
    p.add_argument("--direction", type=float, nargs=2, default=[1.0, 0.0], help="linear reward: d in ⟨d, x⟩")
    p.add_argument("--centre", type=float, nargs=2, default=[1.5, 1.0], help="bump reward: centre m")
    p.add_argument("--width", type=float, default=1.0, help="bump reward: width w")
    p.add_argument("--reward_scales", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0],
                   help="α_rew values of the trade-off sweep (0 = the recovery run)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="ω of the CFG experiment (γ = ω − 1)")
    p.add_argument("--weighting", choices=("x0", "eps"), default="eps", help="w(t), see dipp.ikl_weight")
    p.add_argument("--t_min", type=int, default=20, help="π(t) lives on {t_min..t_max}")
    p.add_argument("--t_max", type=int, default=980, help="π(t) upper end")
    p.add_argument("--timestep_sampling", choices=("uniform", "lognormal"), default="uniform",
                   help="π(t), see dipp.sample_timesteps")
    p.add_argument("--z_dim", type=int, default=16, help="dimension of the generator's noise z (>= 2)")
    p.add_argument("--k_ta", type=int, default=2, help="K_TA: fake-score updates per generator update")
    p.add_argument("--steps", type=int, default=1000, help="generator updates per run")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="generator Adam learning rate")
    p.add_argument("--lr_fake", type=float, default=2e-3, help="fake-score Adam learning rate")
    p.add_argument("--eval_samples", type=int, default=20000, help="samples per class for the metrics")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run (others add 1, 2, ...)")
    p.add_argument("--out", default="toy_out", help="output folder")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel training runs")
    p.add_argument("--quick", action="store_true",
                   help="short runs: fewer steps and α_rew values (47 CPU-seconds), the figure titled QUICK VERSION")
    args = p.parse_args(argv)
    if args.quick:  # (a flag given explicitly wins over the preset)
        plumbing.apply_preset(args, dict(steps=500, eval_samples=4000, reward_scales=[0.0, 0.5]), argv)
    K = len(args.classes)
    args.stds = args.stds * K if len(args.stds) == 1 else args.stds
    args.weights = args.weights * K if len(args.weights) == 1 else args.weights
    if len(args.means) != 2 * K or len(args.stds) != K or len(args.weights) != K:
        p.error(f"--means needs 2 numbers per component and --stds/--weights one each; --classes gave {K} components")
    if sorted(set(args.classes)) != list(range(max(args.classes) + 1)):
        p.error("--classes must use every class 0..C-1")
    if min(args.stds) <= 0 or min(args.weights) <= 0:
        p.error("--stds and --weights must be positive")
    if args.guidance_scale < 1 or min(args.reward_scales) < 0:
        p.error("need --guidance_scale >= 1 and --reward_scales >= 0")
    if args.z_dim < 2 or args.k_ta < 1 or args.steps < 1 or args.batch < 2:
        p.error("need --z_dim >= 2, --k_ta >= 1, --steps >= 1 and --batch >= 2")
    finite = lambda v: math.isfinite(v)
    plumbing.check_ranges(p, args, {
        "width": (lambda v: v > 0 and finite(v), "> 0 (the bump's width; 0 divides by zero)"),
        "lr": (lambda v: v > 0 and finite(v), "> 0"), "lr_fake": (lambda v: v > 0 and finite(v), "> 0"),
        "eval_samples": (lambda v: v >= 2, ">= 2 (the metrics compare sample sets)"),
        "workers": (lambda v: v >= 1, ">= 1 (1 = no worker processes)"),
        "means": (finite, "finite"), "direction": (finite, "finite"), "centre": (finite, "finite"),
        "stds": (finite, "finite"), "weights": (finite, "finite"), "reward_scales": (finite, "finite"),
        "guidance_scale": (finite, "finite")})
    plumbing.check_config(dipp.Config(t_min=args.t_min, t_max=args.t_max))  # π(t) inside the schedule
    return args


def build(args):
    """The reference mixture, the schedule and the reward named by the arguments."""
    gmm = GaussianMixture([args.means[i:i + 2] for i in range(0, len(args.means), 2)], args.stds,
                          args.weights, args.classes)
    return gmm, dipp.Schedule.scaled_linear(), make_reward(args.reward, args.direction, args.centre, args.width)


def grid_limit(args):
    """Half-width of the square that holds the reference and the reward-shifted samples."""
    return 2 + float(torch.tensor(args.means).abs().max()) + 5 * max(args.stds)


def grid_for(args):
    return grid_points(grid_limit(args), 60)


def job(args, name, reward_scale, omega, seed):
    """One training run + its evaluation; a plain function of picklable arguments so that runs can
    go to worker processes. name: 'reward' (explicit r), 'cfg_guided' (none) or 'cfg_explicit' (r_cfg)."""
    torch.set_num_threads(1)  # small MLPs: one thread per run, runs in parallel across cores
    gmm, schedule, reward = build(args)
    reward_fn = {"reward": lambda x0, c: reward(x0), "cfg_guided": None,
                 "cfg_explicit": guidance_reward(gmm, schedule, args)}[name]
    G = train(gmm, schedule, args, reward_scale, omega, reward_fn, seed=seed)
    edges, grid = grid_for(args)
    return evaluate(G, gmm, reward, grid, edges, args.eval_samples, seed=10_000 + seed)


def summary(results):
    """The numbers that matter, as a short table (every number is in results.json)."""
    ref = results["reference"]
    lines = [f"reference: mean reward {ref['reward']:.3f}; noise floors MMD² {ref['mmd_floor']:.4f}, "
             f"KL {ref['kl_floor']:.3f}", "α_rew  KL(p_θ‖p_ref)  mean reward  MMD² to reference"]
    lines += [f"{s['reward_scale']:<6g} {s['kl']:<15.3f} {s['reward']:<12.3f} {s['mmd']:.4f}"
              for s in results["tradeoff"]]
    if "recovery" in results:
        rec = results["recovery"]
        lines.append(f"recovery (α_rew = 0): MMD² {rec['mmd']:.4f}; mode weights "
                     f"{' '.join(f'{w:.2f}' for w in rec['mode_weights'])} (exact "
                     f"{' '.join(f'{w:.2f}' for w in rec['true_mode_weights'])})")
    cfg, unguided = results["cfg"], results["cfg"]["mmd_guided_vs_unguided"]
    lines.append(f"CFG ω = {cfg['omega']:g}, MMD² between generators: guided vs unguided + (ω−1)·r_cfg "
                 f"{cfg['mmd_guided_vs_explicit']:.4f}, seed vs seed {cfg['mmd_guided_seed_vs_seed']:.4f}"
                 + (f", guided vs unguided {unguided:.4f}" if unguided is not None else ""))
    return "\n".join(lines)


def run(argv=None):
    args = parse(argv)
    t_start = time.time()
    plumbing.writable_dir(args.out, "--out")
    gmm, schedule, reward = build(args)
    edges, grid = grid_for(args)
    n, omega = args.eval_samples, args.guidance_scale

    # every training run, in parallel over the CPU cores
    jobs = {f"reward_{a:g}": ("reward", a, 1.0, args.seed) for a in args.reward_scales}
    jobs["cfg_guided"] = ("cfg_guided", 0.0, omega, args.seed)  # CFG teacher, no explicit reward
    jobs["cfg_guided_seed2"] = ("cfg_guided", 0.0, omega, args.seed + 1)  # the training-noise floor
    jobs["cfg_explicit"] = ("cfg_explicit", omega - 1, 1.0, args.seed)  # unguided teacher + (ω−1)·r_cfg
    print(f"{len(jobs)} training runs of {args.steps} steps on {args.workers} worker(s) ...", flush=True)
    if args.workers > 1:
        runs = plumbing.run_in_processes(job, {k: (args, *v) for k, v in jobs.items()}, args.workers)
    else:
        runs = {k: job(args, *v) for k, v in jobs.items()}

    # noise floors: exact reference samples against exact reference samples
    g = torch.Generator().manual_seed(12345)
    ref = [gmm.sample(torch.full((n,), c), g) for c in range(gmm.C)]
    floor = {"mmd": sum(mmd(r[:2000], gmm.sample(torch.full((2000,), c), g)) for c, r in enumerate(ref)) / gmm.C,
             "kl": sum(kl_on_grid(r, gmm.density_grid(grid, c), edges) for c, r in enumerate(ref)) / gmm.C}
    results = {"reference": {"mmd_floor": floor["mmd"], "kl_floor": floor["kl"],
                             "reward": sum(reward(r).mean().item() for r in ref) / gmm.C}}
    results["tradeoff"] = [{"reward_scale": a, **{k: runs[f"reward_{a:g}"][k] for k in ("kl", "reward", "mmd")}}
                           for a in args.reward_scales]
    betas = torch.logspace(-1.5, 2, 40).tolist()
    results["frontier"] = [{"beta": b, "kl": k, "reward": r}
                           for b, (k, r) in zip(betas, frontier(gmm, reward, grid, betas))]
    # where the plain-KL optimum sits for the *same* α_rew (β = 1/α): DI++'s regulariser, the IKL, is
    # weaker than the KL (KL(q_t‖p_t) ≤ KL(q‖p)), so DI++ at α_rew is expected to travel further
    alphas = [a for a in args.reward_scales if a > 0]
    results["tilted_same_alpha"] = [{"reward_scale": a, "kl": k, "reward": r}
                                    for a, (k, r) in zip(alphas, frontier(gmm, reward, grid, [1 / a for a in alphas]))]
    if 0.0 in args.reward_scales:
        rec = runs["reward_0"]
        weights = torch.stack([mode_weights(rec["samples"][rec["labels"] == c], c, gmm) for c in range(gmm.C)]).sum(0)
        results["recovery"] = {"mmd": rec["mmd"], "mmd_floor": floor["mmd"], "kl": rec["kl"], "kl_floor": floor["kl"],
                               "mode_weights": weights.tolist(),
                               "true_mode_weights": (gmm.pi / gmm.pi.sum() / gmm.p_c[gmm.cls]).tolist()}
    pair = lambda a, b: sum(mmd(a["samples"][a["labels"] == c][:2000], b["samples"][b["labels"] == c][:2000])
                            for c in range(gmm.C)) / gmm.C
    results["cfg"] = {"omega": omega,
                      "mmd_guided_vs_explicit": pair(runs["cfg_guided"], runs["cfg_explicit"]),
                      "mmd_guided_seed_vs_seed": pair(runs["cfg_guided"], runs["cfg_guided_seed2"]),
                      "mmd_guided_vs_unguided": pair(runs["cfg_guided"], runs["reward_0"]) if "reward_0" in runs else None}
    results["wall_time_s"] = time.time() - t_start
    results["settings"] = vars(args)

    json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)
    import numpy as np
    np.savez(os.path.join(args.out, "samples.npz"), reference=torch.cat(ref).numpy(),
             labels=runs["cfg_guided"]["labels"].numpy(), **{k: v["samples"].numpy() for k, v in runs.items()})
    plot(gmm, ref, runs, results, args, os.path.join(args.out, "toy.png"))
    print(summary(results))
    print(f"wrote {args.out}/results.json, samples.npz, toy.png in {results['wall_time_s']:.1f} s")
    return results


def plot(gmm, ref, runs, results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = max(a for a in args.reward_scales)
    panels = [("reference p(x|c)", torch.cat(ref), None), ("DI++, α_rew = 0", None, "reward_0"),
              (f"DI++, α_rew = {top:g}", None, f"reward_{top:g}"),
              (f"CFG ω = {args.guidance_scale:g}", None, "cfg_guided"),
              (f"ω = 1 + r_cfg, α = {args.guidance_scale - 1:g}", None, "cfg_explicit")]
    fig, axes = plt.subplots(1, 6, figsize=(24, 4))
    lim = grid_limit(args)
    labels_ref = torch.arange(gmm.C).repeat_interleave(len(ref[0]))
    for ax, (title, x, key) in zip(axes, panels):
        if key is not None and key not in runs:
            ax.set_visible(False)
            continue
        x, lab = (x, labels_ref) if key is None else (runs[key]["samples"], runs[key]["labels"])
        for c in range(gmm.C):
            pts = x[lab == c][:3000]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, label=f"c = {c}")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, aspect="equal")
    axes[0].legend(markerscale=8, loc="lower left")
    ax = axes[5]
    ax.plot([f["kl"] for f in results["frontier"]], [f["reward"] for f in results["frontier"]], "k-",
            label="exact optimum of E[r] − β·KL")
    ax.plot([s["kl"] for s in results["tradeoff"]], [s["reward"] for s in results["tradeoff"]], "o-",
            color="C3", label="DI++ (α_rew sweep)")
    ax.plot([s["kl"] for s in results["tilted_same_alpha"]], [s["reward"] for s in results["tilted_same_alpha"]],
            "x", color="k", label="exact optimum at β = 1/α_rew")
    for s in results["tradeoff"]:
        ax.annotate(f"α={s['reward_scale']:g}", (s["kl"], s["reward"]), fontsize=8)
    ax.set(xlabel="KL(p_θ ‖ p_ref) on a grid", ylabel="mean reward", title="reward vs KL",
           xlim=(0, 1.2 * max(s["kl"] for s in results["tradeoff"]) + 0.05))
    ax.legend(loc="lower right", fontsize=8)
    if args.quick:  # not to be mistaken for toy/toy.png, which `python toy/gmm.py` (no --quick) draws
        fig.suptitle(f"QUICK VERSION (python toy/gmm.py --quick: {args.steps} steps, α_rew ∈ "
                     f"{{{', '.join(f'{a:g}' for a in args.reward_scales)}}}); the full figure: python toy/gmm.py",
                     color="C3", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    with plumbing.as_program("toy/gmm"), plumbing.stopped_in_one_line(
            "nothing of this run is kept; run the command again"):  # (one line; the worker processes end too)
        run()
