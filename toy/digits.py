"""DI++ on real images that ship inside scikit-learn: 8×8 handwritten digits, a trained teacher, a laptop.

The 2-D toy (toy/gmm.py) checks DI++ against exact answers; this one checks that the whole method works
on images with a teacher that was *trained*: a small class-conditional diffusion model on the 1,797
digits of `sklearn.datasets.load_digits` (the class is the prompt; CFG by label dropout). One-step
generators are then distilled from it and aligned with a reward by dipp.py's own losses and Alg. 1 steps
(`dipp.dipp_step`, `dipp.guided`, `dipp.guidance_reward_loss`); this file holds
only the data, three small networks, the teacher's multi-step sampler, metrics and plots.

    python toy/digits.py            # the full run (3 seeds), see docs/digits.md for its wall time -> digits_out/
    python toy/digits.py --quick    # ~1 min on 2 CPU cores: what test_toy.py runs

Rewards, each an analogue of a preference model trained on data:
  judge  r(x, c) = log p_judge(c | x): a small MLP classifier trained on the real digits recognises the
         prompt (ImageReward's "does the image match the text", at 64 pixels).
  ink    r(x, c) = Σ_pixels ink(x): "bolder digits", a taste that the data does not share.
Measurements use a *different* network, the referee (a small CNN trained on the same digits): its accuracy,
and a Fréchet distance in its feature space to the teacher's samples and to held-out real digits, so that
a generator that fools the judge does not also grade itself. The teacher, judge and referee are trained
once per machine and cached under $XDG_CACHE_HOME/dipp/digits (~/.cache/dipp/digits), keyed by their
settings and a hash of the code that trains them.
"""
import copy
import hashlib
import inspect
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dipp  # noqa: E402  (the repo root holds dipp.py)
import evaluate  # noqa: E402  (its Fréchet distance, the one the SD evaluation uses)
import plumbing  # noqa: E402  (the optimizer bundle, and dipp's optional EMA of the generator)
import rewards  # noqa: E402  (rewards.Mix: dipp's weighted reward sum; pairwise_diversity, the SD evaluation's)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimum  # noqa: E402  (toy/optimum.py's process pool for independent runs)

C = 10  # classes = prompts; c = −1 is the empty prompt ∅ (as in toy/gmm.py)
SHAPE = (1, 8, 8)  # one image: 1 channel, 8×8 pixels

# -----------------------------------------------------------------------------
# Data: sklearn's digits, pixels 0..16 mapped to [−1, 1] (ink = +1, paper = −1)


def load_data(held_out=450, seed=0):
    """The 1,797 digits as images (N, 1, 8, 8) in [−1, 1] and labels (N,), split once by a fixed
    permutation: the teacher, judge and referee train on the rest; `held_out` digits are only ever
    a reference for the metrics (the real-data row of the table)."""
    from sklearn.datasets import load_digits  # bundled in the wheel: no download
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # (1797, 1, 8, 8)
    c = torch.tensor(digits.target, dtype=torch.long)  # (1797,)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:held_out], perm[held_out:]
    return {"x_train": x[train], "c_train": c[train], "x_test": x[test], "c_test": c[test]}


def to_image(x0):
    """What would be saved: pixels clipped to [−1, 1]. The rewards and the referee see this (as dipp's
    rewards see the clipped decoded image), so values outside the pixel range buy no reward."""
    return x0.clamp(-1, 1)


def ink(x):
    """Ink per pixel in [0, 1]: 0 = paper, 1 = full stroke. (B, 1, 8, 8) -> (B, 64)."""
    return ((to_image(x) + 1) / 2).flatten(1)

# -----------------------------------------------------------------------------
# Networks: the ε-predictor (teacher, fake score, generator share it), the judge, the referee


class EpsMLP(torch.nn.Module):
    """ε̂(x_t, t, c) on the flattened 64-pixel image: a residual MLP; the time (sin/cos of t at 16
    frequencies) and the class (a learned embedding, index C = ∅) are added to every block's input."""

    def __init__(self, width=128, depth=3):
        super().__init__()
        self.inp = torch.nn.Linear(64, width)
        self.time = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.SiLU(), torch.nn.Linear(width, width))
        self.label = torch.nn.Embedding(C + 1, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.LayerNorm(width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width)) for _ in range(depth))
        self.out = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.SiLU(), torch.nn.Linear(width, 64))

    def forward(self, x_t, t, c):
        freqs = torch.exp(-math.log(1000) * torch.arange(16, device=x_t.device) / 16)  # (16,), periods 1..1000 steps
        phase = t[:, None].float() * freqs  # (B, 16)
        emb = self.time(torch.cat([phase.sin(), phase.cos()], 1)) + self.label(torch.where(c < 0, C, c))  # (B, W)
        h = self.inp(x_t.flatten(1))  # (B, W)
        for block in self.blocks:
            h = h + block(h + emb)  # (B, W)
        return self.out(h).view_as(x_t)  # ε̂: (B, 1, 8, 8)


class Judge(torch.nn.Module):
    """The reward model: an MLP classifier of clean digits, logits (B, C). Its log p(c|x) is the reward."""

    def __init__(self, width=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, C))

    def forward(self, x):
        return self.net(x)  # (B, C)


class Referee(torch.nn.Module):
    """The evaluator: a small CNN (a different architecture and seed from the judge), logits (B, C);
    its penultimate layer (B, 64) is the feature space of the Fréchet distances."""

    def __init__(self, channels=16):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, channels, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, 2 * channels, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(2 * channels * 16, 64), torch.nn.SiLU())
        self.head = torch.nn.Linear(64, C)

    def forward(self, x):
        return self.head(self.features(x))  # (B, C)


class Generator(torch.nn.Module):
    """g_θ(z, c): a trainable copy of the teacher's ε-network evaluated once at t* on z ~ N(0, I), read out
    as x̂0 = (z − σ_t* ε̂_θ(z, t*, c)) / α_t* — dipp.OneStepGenerator's recipe (which is bound to diffusers'
    model families, so it is written out here for the MLP).
    NOTE(deviation): t* = 700 (α = 0.29), not SD's 999 (α = 0.068): at 999 the MLP's ε̂ errors are
    amplified 15× into x0 and distillation made the samples *worse* in every setting tried (docs/digits.md);
    SiD-LSG starts at 625 for the same reason, dipp's PixArt-α at 400."""

    def __init__(self, teacher, schedule, t_star):
        super().__init__()
        self.eps_net, self.schedule, self.t_star = copy.deepcopy(teacher).requires_grad_(True), schedule, t_star

    def forward(self, z, c):
        t = torch.full((z.shape[0],), self.t_star, dtype=torch.long, device=z.device)  # (B,)
        alpha, sigma = self.schedule.alpha_sigma(t, z.ndim)  # (B, 1, 1, 1)
        return dipp.predict_x0(z, self.eps_net(z, t, c), alpha, sigma)  # x0: (B, 1, 8, 8)

# -----------------------------------------------------------------------------
# The data side: train the teacher (plain ε-prediction DSM) and the two classifiers, once per machine


def train_teacher(data, schedule, settings):
    """A class-conditional ε-predictor by denoising score matching on the real digits,
        min E_{x0,c,t,ε} ‖ε̂(α_t x0 + σ_t ε, t, c') − ε‖²,  c' = ∅ with probability p_drop, else c
    (dipp.fake_score_loss is that loss: the same DSM the fake score uses). The label dropout trains the
    unconditional model ε̂(x_t, t, ∅) inside the same network, which CFG needs. Returns the EMA weights."""
    torch.manual_seed(settings["seed"])
    net = EpsMLP(settings["width"], settings["depth"])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=settings["lr"])
    # one-cycle: a short warm-up, then a cosine decay to ~0, so the last weights (and the EMA) settle
    lr_at = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=settings["steps"], pct_start=0.05)
    from tqdm import tqdm
    x, c, B = data["x_train"], data["c_train"], settings["batch"]
    for step in tqdm(range(settings["steps"]), desc="teacher", unit="step", mininterval=2):  # (minutes on a CPU)
        i = torch.randint(len(x), (B,))  # a minibatch, with replacement
        c_drop = torch.where(torch.rand(B) < settings["p_drop"], -1, c[i])  # c' ~ ∅ w.p. p_drop, else c
        t = dipp.sample_timesteps(B, 0, schedule.T - 1, "cpu")  # t ~ U{0..T−1}
        loss = dipp.fake_score_loss(lambda x_t, t: net(x_t, t, c_drop), x[i], t, torch.randn_like(x[i]),
                                    schedule).mean()  # ε ~ N(0, I)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - settings["ema"])  # EMA: a smoother teacher than the last iterate
    return ema, {"final_loss": loss.item()}


def train_classifier(data, settings):
    """The judge or the referee: cross-entropy on the training digits (Adam, fixed steps). Returns the
    network and its accuracy on the held-out digits."""
    torch.manual_seed(settings["seed"])
    net = Judge(settings["width"]) if settings["kind"] == "judge" else Referee(settings["width"])
    opt = torch.optim.Adam(net.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    x, c = data["x_train"], data["c_train"]
    for step in range(settings["steps"]):
        i = torch.randint(len(x), (settings["batch"],))
        loss = F.cross_entropy(net(x[i]), c[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (net(data["x_test"]).argmax(1) == data["c_test"]).float().mean().item()
    return net, {"held_out_accuracy": accuracy}


def cache_dir(args):
    """--cache_dir, else $XDG_CACHE_HOME/dipp/digits, else ~/.cache/dipp/digits."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return args.cache_dir or os.path.join(base, "dipp", "digits")


KEYS = {}  # (kind, settings) -> cache key, computed once per process


def cached(kind, settings, code, train_fn, folder, log=print):
    """A trained network from folder/<kind>-<key>.pt, else trained by train_fn() and stored there.
    key = sha256 of the settings and of the source of every function in `code` (the network, the data,
    the training loop, the dipp functions it calls), so a change to any of them retrains. The file is
    written under a temporary name and renamed: a reader never sees half of one."""
    memo = (kind, json.dumps(settings, sort_keys=True))
    if memo not in KEYS:  # inspect.getsource re-reads and re-parses the files: once per process is enough
        source = "".join(inspect.getsource(f) for f in code)
        KEYS[memo] = hashlib.sha256((memo[1] + source).encode()).hexdigest()[:16]
    path = os.path.join(folder, f"{kind}-{KEYS[memo]}.pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
            net = build_net(kind, settings)
            net.load_state_dict(saved["state_dict"])
            return net.eval().requires_grad_(False), saved["info"]
        except Exception as e:  # a damaged file (truncated, overwritten): torch raises several kinds of error
            log(f"{path} is damaged ({type(e).__name__}: {str(e).strip()[:80]}); training the {kind} again")
    log(f"training the {kind} (once per machine; cached as {path}) ...")
    start = time.time()
    net, info = train_fn()
    info = {**info, "train_seconds": round(time.time() - start, 1)}
    log(f"{kind}: {info}")
    plumbing.writable_dir(folder, "--cache_dir")
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"state_dict": net.state_dict(), "settings": settings, "info": info}, tmp)
    os.replace(tmp, path)
    return net.eval().requires_grad_(False), info


def build_net(kind, settings):
    if kind == "teacher":
        return EpsMLP(settings["width"], settings["depth"])
    return Judge(settings["width"]) if kind == "judge" else Referee(settings["width"])


def load_models(args, log=print):
    """(teacher, judge, referee, info): from the cache, trained first if absent."""
    folder = cache_dir(args)  # the data (1.5 s to parse) is only loaded if something must be trained
    teacher_code = [load_data, EpsMLP, train_teacher, make_schedule, dipp.fake_score_loss, dipp.add_noise,
                    dipp.Schedule, dipp.sample_timesteps]
    teacher, teacher_info = cached("teacher", args.teacher, teacher_code,
                                   lambda: train_teacher(load_data(), make_schedule(), args.teacher), folder, log)
    classifier_code = [load_data, Judge, Referee, train_classifier]
    judge, judge_info = cached("judge", args.judge, classifier_code,
                               lambda: train_classifier(load_data(), args.judge), folder, log)
    referee, referee_info = cached("referee", args.referee, classifier_code,
                                   lambda: train_classifier(load_data(), args.referee), folder, log)
    return teacher, judge, referee, {"teacher": teacher_info, "judge": judge_info, "referee": referee_info}


def make_schedule():
    """SD1.5's scaled-linear ᾱ_t (dipp's default), so π(t), w(t) and t_min/t_max mean what they mean there."""
    return dipp.Schedule.scaled_linear()

# -----------------------------------------------------------------------------
# The teacher's multi-step sampler (data-side: DI++ never samples the teacher)


@torch.no_grad()
def sample_teacher(teacher, schedule, c, steps, omega, generator):
    """Deterministic DDIM (η = 0) with `steps` steps from t = T−1 to 0, CFG-guided with ω through
    dipp.guided: x_{t'} = α_{t'} x̂0 + σ_{t'} ε̃, the x̂0 and ε̃ of the guided teacher at t. c: (B,)."""
    x = torch.randn((len(c), *SHAPE), generator=generator)  # x_T ~ N(0, I): (B, 1, 8, 8)
    eps_fn = dipp.guided(teacher, c, torch.full_like(c, -1), omega)
    ts = torch.linspace(schedule.T - 1, 0, steps).round().long().tolist()
    for t_now, t_next in zip(ts, ts[1:] + [None]):
        t = torch.full((len(c),), t_now, dtype=torch.long)
        alpha, sigma = schedule.alpha_sigma(t, x.ndim)
        eps = eps_fn(x, t)  # (B, 1, 8, 8)
        x0 = dipp.predict_x0(x, eps, alpha, sigma)  # (B, 1, 8, 8)
        if t_next is None:
            return x0
        alpha, sigma = schedule.alpha_sigma(torch.full_like(t, t_next), x.ndim)
        x = dipp.add_noise(x0, eps, alpha, sigma)  # (B, 1, 8, 8)

# -----------------------------------------------------------------------------
# Rewards r(x0, c) -> (B,), differentiable in x0


def judge_reward(judge):
    """r(x, c) = log p_judge(c | x): how surely a classifier trained on real digits reads the prompt."""
    return lambda x0, c: F.log_softmax(judge(to_image(x0)), 1).gather(1, c[:, None])[:, 0]  # (B,)


def ink_reward(x0, c):
    """r(x, c) = Σ ink: pixels of stroke (real digits: about 20 of 64). A taste, not a fact about the data."""
    return ink(x0).sum(1)  # (B,)


def guidance_reward(teacher, schedule, cfg):
    """The implicit reward of CFG as an *explicit* reward (METHOD.md §5), one Monte-Carlo draw:
        r_cfg(x0, c) = w(t) log p_t(c | α_t x0 + σ_t ε),  t ~ π(t), ε ~ N(0, I).
    A trained teacher gives only its gradient, ∇ log p_t(c|x_t) = s_c − s_∅, so the value returned is
    dipp.guidance_reward_loss's surrogate (−1×): meaningless as a number, exact as a gradient."""
    def r(x0, c):
        t = dipp.sample_timesteps(len(x0), cfg.t_min, cfg.t_max, x0.device, cfg.timestep_sampling, schedule)
        eps = torch.randn_like(x0)  # ε ~ N(0, I)
        cond = lambda x_t, t: teacher(x_t, t, c)
        uncond = lambda x_t, t: teacher(x_t, t, torch.full_like(c, -1))
        return -dipp.guidance_reward_loss(x0, t, eps, schedule, cond, uncond, cfg.ikl_weighting)  # (B,)
    return r

# -----------------------------------------------------------------------------
# DI++: dipp's own Alg. 1 steps, with the digits' conditioning bound into closures (as toy/gmm.py)


def train(teacher, schedule, args, reward_scale, omega, reward_fn=None, seed=0, weighting="x0", k_ta=1,
          on_step=None):
    """Distil g_θ from the teacher and align it with reward_fn(x0, c) -> (B,) (None: Diff-Instruct).
    on_step(step, G), if given, is called before the first update and after every update."""
    torch.manual_seed(seed)
    cfg = dipp.Config(reward_scale=reward_scale, guidance_scale=omega, fake_steps_per_G=k_ta,
                      t_min=args.t_min, t_max=args.t_max, ikl_weighting=weighting, max_grad_norm=0)
    G = Generator(teacher, schedule, args.t_star)  # θ and ψ both start at the teacher (METHOD.md §4)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    opt = dipp.Optimizers(fake=plumbing.cpu_adam(fake, args.lr_fake), G=plumbing.cpu_adam(G, args.lr))  # Adam, β1 = 0
    # (optional) EMA of θ, dipp's --ema_decay: the generator that is evaluated. With Adam at a constant step
    # the last iterate jitters (measured on a judge α_rew = 10 run: FD to the teacher 57 at step 400, 14 at 500)
    params = list(G.parameters())
    ema = [p.detach().clone() for p in params] if args.ema > 0 else None
    evaluated = lambda: plumbing.ema_weights(params, ema)  # inside it G holds θ_ema (a swap, no copy)
    B, log = args.batch, []
    if on_step is not None:
        with evaluated():
            on_step(0, G)
    for step in range(args.steps):
        c = torch.randint(C, (B,))  # c ~ U{0..9}: the prompts
        nets = dipp.Bound(G_c=lambda z: G(z, c), teacher_eps_c=dipp.guided(teacher, c, torch.full((B,), -1), omega),
                          fake_eps_c=lambda x_t, t: fake(x_t, t, c),  # s̃_ref with CFG ω; the fake score never guided
                          reward_c=(lambda x0: reward_fn(x0, c)) if reward_fn is not None else None)
        noises = [dipp.draw_noise(B, SHAPE, SHAPE, cfg, "cpu") for _ in range(cfg.fake_steps_per_G + 1)]
        stats = dipp.dipp_step(nets, opt, noises, schedule, cfg)  # Alg. 1: K_TA fake-score updates, one G update
        if ema is not None:
            plumbing.ema_update(ema, params, args.ema)
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, **{k: float(v) for k, v in stats.items() if not k.startswith("skipped") and k != "x0"}})
        if on_step is not None:
            with evaluated():
                on_step(step + 1, G)
    if ema is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, ema)  # from here on G is the EMA generator
    return G, log

# -----------------------------------------------------------------------------
# Metrics


def measure(x, c, judge, referee, references):
    """The table's columns for samples x (N, 1, 8, 8) of prompts c (N,):
    judge     mean log p_judge(c|x)            (the reward; 0 = certain)
    referee   referee accuracy                 (an independent reading of the prompt)
    fd_teacher, fd_data   Fréchet distance in the referee's features to the teacher's 50-step samples
              (ω = 1) and to the held-out real digits
    diversity mean 1 − cos between the ink images of two samples of one prompt (0 = one image per prompt)
    ink       mean pixels of ink (of 64)
    and the second table's realism outside the referee (`realism`): fd_<space>_<ref>, kid_<space>_<ref>."""
    with torch.no_grad():
        img = to_image(x)
        logits = referee(img)  # (N, C)
        stats = evaluate.gaussian_stats(referee.features(img))
        out = {"judge": judge_reward(judge)(x, c).mean().item(),
               "referee": (logits.argmax(1) == c).float().mean().item(),
               **{f"fd_{name}": evaluate.frechet_distance(*stats, *ref).item()
                  for name, ref in references["stats"].items()},
               "diversity": sum(rewards.pairwise_diversity(ink(x[c == k])).item() for k in range(C)) / C,
               "ink": ink(x).sum(1).mean().item(),
               **realism(x, c, references["sets"], references["spaces"])}
    return out

# Realism outside the referee: the same sets compared in pixels and in a third classifier's features, digit by digit


def pixels(x):
    """The pixel space: the clipped image as a 64-vector in [−1, 1], float64."""
    return to_image(x).flatten(1).double()  # (N, 64)


def mlp_features(data):
    """A feature space that neither training nor the referee uses: scikit-learn's MLPClassifier (one hidden
    layer of 64 ReLU units, its own seed, scikit-learn's own Adam) trained on the training digits
    (0.8 s; 98.4 % on the held-out ones). Returns x -> its hidden activations relu(x W1 + b1), (N, 64)."""
    from sklearn.neural_network import MLPClassifier
    mlp = MLPClassifier(hidden_layer_sizes=(64,), random_state=3, max_iter=500).fit(
        data["x_train"].flatten(1).double().numpy(), data["c_train"].numpy())
    W, b = torch.from_numpy(mlp.coefs_[0]), torch.from_numpy(mlp.intercepts_[0])  # (64, 64), (64,)
    features = lambda x: torch.relu(pixels(x) @ W + b)  # (N, 64)
    features.sklearn = mlp  # (the test checks these are the layer sklearn's own predict_proba uses)
    return features


def kid(x, y):
    """Kernel MMD as KID computes it (Bińkowski et al. 2018), in any feature space: the unbiased MMD² with
    the cubic polynomial kernel k(a, b) = (a·b / D + 1)³,
        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)
    x (m, D), y (n, D). Unbiased, so it is ≈ 0 (and may be < 0) for two samples of one distribution, and
    its mean does not depend on m and n (FD's bias does), which matters for ~45 held-out digits per class."""
    x, y = x.double(), y.double()
    m, n, D = len(x), len(y), x.shape[1]
    k = lambda a, b: (a @ b.T / D + 1) ** 3
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * k(x, y).mean())


def realism(x, c, sets, spaces):
    """Per digit k, the samples of prompt k against the reference images of class k, in every feature space:
    Fréchet distance (evaluate.frechet_distance of the two sets' Gaussian stats) and KID (`kid`), each
    averaged over the 10 digits. sets: {ref: (x_ref, c_ref)}; spaces: {space: x -> (N, D)}.
    Returns {fd_<space>_<ref>, kid_<space>_<ref>}. Per digit, so that a generator with the right digits in
    the wrong proportions, or the right average look but wrong strokes for each digit, is not hidden."""
    out = {}
    for space, f in spaces.items():
        fx = f(x)
        for ref, (x_ref, c_ref) in sets.items():
            fr = f(x_ref)
            pairs = [(fx[c == k], fr[c_ref == k]) for k in range(C)]
            out[f"fd_{space}_{ref}"] = sum(evaluate.frechet_distance(*evaluate.gaussian_stats(a),
                                                                     *evaluate.gaussian_stats(b)).item()
                                           for a, b in pairs) / C
            out[f"kid_{space}_{ref}"] = sum(kid(a, b).item() for a, b in pairs) / C
    return out


REALISM = tuple(f"{m}_{space}_{ref}" for space in ("pixels", "mlp") for ref in ("data", "teacher")
                for m in ("fd", "kid"))


def eval_prompts(n):
    return torch.arange(C).repeat_interleave(n)  # (C·n,): n samples of every digit

# -----------------------------------------------------------------------------
# Experiments


def job(args, name, reward, reward_scale, omega, seed, weighting="x0", k_ta=1):
    """One training run; a function of picklable arguments, so runs can go to worker processes. Returns
    the generator's samples for the metrics (fixed z per seed) and its training log.
    reward: 'none' | 'judge' | 'ink' | 'cfg' (the explicit r_cfg, with an unguided teacher) | 'mix:λ' (the
    weighted sum λ·mix_judge·judge + (1−λ)·mix_ink·ink, through rewards.Mix as dipp's --reward "a=w,b=v")."""
    torch.set_num_threads(1)  # small MLPs: one thread per run, runs in parallel across cores
    teacher, judge, _, _ = load_models(args, log=lambda *a: None)
    schedule = make_schedule()
    cfg = dipp.Config(t_min=args.t_min, t_max=args.t_max, ikl_weighting=weighting)
    if reward.startswith("mix:"):
        lam = float(reward[4:])
        terms = [("judge", lam * args.mix_judge, judge_reward(judge)), ("ink", (1 - lam) * args.mix_ink, ink_reward)]
        reward_fn = rewards.Mix([term for term in terms if term[1] > 0])
    else:
        reward_fn = {"none": None, "judge": judge_reward(judge), "ink": ink_reward,
                     "cfg": guidance_reward(teacher, schedule, cfg)}[reward]
    start = time.time()
    G, log = train(teacher, schedule, args, reward_scale, omega, reward_fn, seed, weighting, k_ta)
    seconds = time.time() - start
    # two sets of samples: z drawn from the run's seed (the table: its spread includes the sampling noise),
    # and one z shared by every run (run-vs-run comparisons, where a shared z cancels the sampling noise)
    return {"samples": one_step_samples(G, args, 10_000 + seed),
            "samples_shared_z": one_step_samples(G, args, COMMON_Z), "train_seconds": seconds, "log": log}


COMMON_Z = 99_999  # the seed of the noise shared by every run


def one_step_samples(G, args, z_seed):
    """eval_per_class samples of every digit from noise z ~ N(0, I) drawn with seed z_seed."""
    c = eval_prompts(args.eval_per_class)
    with torch.no_grad():
        return G(torch.randn((len(c), *SHAPE), generator=torch.Generator().manual_seed(z_seed)), c)


def references(args, teacher, referee, data):
    """The two references, the teacher's 50-step samples at ω = 1 (seed 12345, not one of the table's) and
    the held-out digits: "stats", their Gaussian statistics in the referee's features (the first table);
    "sets", the images themselves, with "spaces", the pixels and the sklearn MLP's features (`realism`)."""
    c = eval_prompts(args.eval_per_class)
    x = sample_teacher(teacher, make_schedule(), c, args.teacher_steps, 1.0, torch.Generator().manual_seed(12345))
    with torch.no_grad():
        stats = {"teacher": evaluate.gaussian_stats(referee.features(to_image(x))),
                 "data": evaluate.gaussian_stats(referee.features(data["x_test"]))}
    return {"stats": stats, "sets": {"data": (data["x_test"], data["c_test"]), "teacher": (x, c)},
            "spaces": {"pixels": pixels, "mlp": mlp_features(data)}}


def experiments(args):
    """{name: (reward, α_rew, ω, weighting, K_TA)} of every generator run, each repeated over the seeds."""
    runs = {"distilled": ("none", 0.0, 1.0, "x0", 1)}
    runs.update({f"judge_{a:g}": ("judge", a, 1.0, "x0", 1) for a in args.judge_scales})
    runs.update({f"ink_{a:g}": ("ink", a, 1.0, "x0", 1) for a in args.ink_scales})
    runs.update({f"mix_{lam:g}": (f"mix:{lam!r}", 1.0, 1.0, "x0", 1) for lam in args.mix_weights})
    if args.guidance_scale > 1:
        runs["cfg_guided"] = ("none", 0.0, args.guidance_scale, "x0", 1)  # CFG teacher, no explicit reward
        runs["cfg_explicit"] = ("cfg", args.guidance_scale - 1, 1.0, "x0", 1)  # unguided + (ω−1)·r_cfg
    if args.extras:
        runs["distilled_eps"] = ("none", 0.0, 1.0, "eps", 1)  # w(t) = σ/α instead of σ²/α²
        runs["distilled_k4"] = ("none", 0.0, 1.0, "x0", 4)  # K_TA = 4 fake-score updates per generator update
    return runs




def summarise(values):
    """mean and spread (sample std over seeds; 0 for one seed) of a list of numbers."""
    v = torch.tensor(values, dtype=torch.float64)
    return {"mean": v.mean().item(), "std": v.std().item() if len(v) > 1 else 0.0, "n": len(v)}


METRICS = ("judge", "referee", "fd_teacher", "fd_data", "diversity", "ink") + REALISM


def run(argv=None):
    args = parse(argv)
    if args.replot:
        return replot(args)
    if args.remeasure:
        return remeasure(args)
    t_start = time.time()
    plumbing.writable_dir(args.out, "--out")
    torch.set_num_threads(1)
    teacher, judge, referee, info = load_models(args)  # trained here, once, if not cached yet
    print(f"teacher, judge, referee ready in {time.time() - t_start:.1f} s; held-out accuracy "
          f"judge {info['judge']['held_out_accuracy']:.3f}, referee {info['referee']['held_out_accuracy']:.3f}")
    schedule, data = make_schedule(), load_data()
    refs = references(args, teacher, referee, data)
    rows, samples, per_seed_samples = {}, {}, {}  # per_seed_samples: every seed's x, for --remeasure

    # reference rows: held-out digits; the teacher's 50-step samples (ω = 1 and ω); the one-step teacher at t*
    c = eval_prompts(args.eval_per_class)
    rows["data"] = {k: summarise([v]) for k, v in
                    measure(data["x_test"], data["c_test"], judge, referee, refs).items()}
    samples["data"] = (data["x_test"], data["c_test"])
    # the noise floor of FD to data: the digits everything trained on, against the held-out ones
    rows["data_train"] = {k: summarise([v]) for k, v in
                          measure(data["x_train"], data["c_train"], judge, referee, refs).items()}
    for omega in sorted({1.0, args.guidance_scale}):
        per_seed = [sample_teacher(teacher, schedule, c, args.teacher_steps, omega,
                                   torch.Generator().manual_seed(args.seed + s)) for s in range(args.seeds)]
        ms = [measure(x, c, judge, referee, refs) for x in per_seed]
        rows[f"teacher_{omega:g}"] = {k: summarise([m[k] for m in ms]) for k in METRICS}
        samples[f"teacher_{omega:g}"] = (per_seed[0], c)
        per_seed_samples[f"teacher_{omega:g}"] = per_seed
    init = Generator(teacher, schedule, args.t_star)
    per_seed = [one_step_samples(init, args, 10_000 + args.seed + s) for s in range(args.seeds)]
    ms = [measure(x, c, judge, referee, refs) for x in per_seed]
    rows["init"] = {k: summarise([m[k] for m in ms]) for k in METRICS}
    samples["init"] = (per_seed[0], c)
    per_seed_samples["init"] = per_seed

    # every generator run × seed, in parallel over the CPU cores
    runs = experiments(args)
    jobs = {(name, s): (name, *spec[:3], args.seed + s, *spec[3:]) for name, spec in runs.items()
            for s in range(args.seeds)}
    print(f"{len(jobs)} generator runs of {args.steps} steps on {args.workers} worker(s) ...", flush=True)
    results = optimum.run_all(args, jobs, job)  # over args.workers processes
    for name in runs:
        res = [results[(name, s)] for s in range(args.seeds)]
        ms = [measure(r["samples"], c, judge, referee, refs) for r in res]
        rows[name] = {k: summarise([m[k] for m in ms]) for k in METRICS}
        samples[name] = (res[0]["samples"], c)
        per_seed_samples[name] = [r["samples"] for r in res]
    # the two CFG runs against each other (same z), with two seeds of the guided run as the yardstick
    if "cfg_guided" in runs:
        fd = lambda a, b: frechet_between(results[a]["samples_shared_z"], results[b]["samples_shared_z"], referee)
        seeds = range(args.seeds)
        pairs = lambda other: summarise([fd(("cfg_guided", s), other(s)) for s in seeds])
        rows["cfg"] = {"fd_guided_vs_explicit": pairs(lambda s: ("cfg_explicit", s)),
                       "fd_guided_vs_unguided": pairs(lambda s: ("distilled", s))}
        if args.seeds > 1:  # the yardstick: the same run, another seed
            rows["cfg"]["fd_guided_seed_vs_seed"] = pairs(lambda s: ("cfg_guided", (s + 1) % args.seeds))
    out = {"rows": rows, "runs": {name: {"spec": spec} for name, spec in runs.items()},
           "models": info, "train_seconds_per_run": summarise([r["train_seconds"] for r in results.values()]),
           "logs": {f"{k[0]}/{k[1]}": r["log"] for k, r in results.items()},
           "wall_time_s": time.time() - t_start, "settings": vars(args)}
    table = report(rows, args)
    path = lambda name: os.path.join(args.out, name)  # all three replaced together, or none (a kill, a full disk)
    plumbing.write_files({path("results.json"): evaluate.text_file(json.dumps(out, indent=1)),
                          path("samples.pt"): lambda tmp: torch.save({k: list(v) for k, v in samples.items()}, tmp),
                          path("samples_per_seed.pt"): lambda tmp: torch.save(per_seed_samples, tmp),
                          path("table.md"): evaluate.text_file(table + "\n")})
    print(table)
    plot(samples, rows, args, os.path.join(args.out, "digits.png"))
    print(f"wrote {args.out}/results.json, table.md, digits.png in {out['wall_time_s']:.1f} s")
    return out


def frechet_between(x, y, referee):
    with torch.no_grad():
        return evaluate.frechet_distance(*evaluate.gaussian_stats(referee.features(to_image(x))),
                                         *evaluate.gaussian_stats(referee.features(to_image(y)))).item()

# -----------------------------------------------------------------------------
# Report: one table, one figure


def label(name, args):
    """A row's name in the table."""
    if name.startswith("teacher_"):
        return f"teacher, {args.teacher_steps}-step DDIM, ω = {name[8:]}"
    if name == "distilled":
        return "Diff-Instruct (α_rew = 0)"
    if name.startswith("mix_"):
        lam = float(name[4:])
        return f"DI++, {lam * args.mix_judge:g}·judge + {(1 - lam) * args.mix_ink:g}·ink (λ = {lam:g})"
    if name.startswith(("judge_", "ink_")):
        kind, a = name.split("_")
        return f"DI++, {kind} reward, α_rew = {a}"
    return {"data": "real digits, held out (the FD-to-data reference)", "data_train": "real digits, training split",
            "init": f"one step of the teacher at t* = {args.t_star} (the init)",
            "cfg_guided": f"Diff-Instruct with CFG teacher ω = {args.guidance_scale:g}",
            "cfg_explicit": f"ω = 1 + explicit r_cfg, α_rew = ω − 1 = {args.guidance_scale - 1:g}",
            "distilled_eps": "Diff-Instruct, w(t) = σ/α (`eps`)",
            "distilled_k4": "Diff-Instruct, K_TA = 4"}.get(name, name)


def fmt(s, digits):
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def report(rows, args):
    head = ("| samples | judge log p(c\\|x) ↑ (reward) | referee accuracy | FD to teacher | FD to data | "
            "diversity | ink (px) |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows.items():
        if name == "cfg":
            continue
        lines.append(f"| {label(name, args)} | {fmt(r['judge'], 3)} | {fmt(r['referee'], 3)} | "
                     f"{fmt(r['fd_teacher'], 1)} | "
                     f"{fmt(r['fd_data'], 1)} | {fmt(r['diversity'], 3)} | {fmt(r['ink'], 1)} |")
    if any(REALISM[0] in r for r in rows.values()):  # (results.json of runs before these columns lack them)
        lines += ["", "Realism outside the referee, per digit then averaged over the 10 (FD: Fréchet distance; KID: "
                  "kernel MMD², ×10³), in pixels and in the hidden features of a scikit-learn MLP:", "",
                  "| samples | pixels: FD to data | KID to data | FD to teacher | KID to teacher | "
                  "MLP: FD to data | KID to data | FD to teacher | KID to teacher |", "|---" * 9 + "|"]
        for name, r in rows.items():
            if REALISM[0] in r:
                cells = ["— (itself)" if name == "data" and k.endswith("_data")  # (a set against itself: no number)
                         else fmt({**r[k], **{v: r[k][v] * 1e3 for v in ("mean", "std")}}, 1) if k.startswith("kid")
                         else fmt(r[k], 1) for k in REALISM]
                lines.append(f"| {label(name, args)} | " + " | ".join(cells) + " |")
    if "cfg" in rows:
        r = rows["cfg"]
        seed = f"; guided, seed vs seed {fmt(r['fd_guided_seed_vs_seed'], 1)}" if "fd_guided_seed_vs_seed" in r else ""
        lines.append(f"\nCFG ω = {args.guidance_scale:g} vs ω = 1 + (ω−1)·r_cfg, FD between the two one-step "
                     f"generators: {fmt(r['fd_guided_vs_explicit'], 1)}{seed}; guided vs unguided (α_rew = 0) "
                     f"{fmt(r['fd_guided_vs_unguided'], 1)}")
    return "\n".join(lines)


def grid(x, c, per_class=5):
    """A (5·9, 10·9) image: one column per digit, `per_class` samples of it stacked, 1 pixel of paper between."""
    pad = lambda img: F.pad(img, (0, 1, 0, 1), value=-1)  # (9, 9)
    cols = [torch.cat([pad(img[0]) for img in to_image(x[c == k][:per_class])], 0) for k in range(C)]  # (45, 9) each
    return torch.cat(cols, 1)  # (45, 90)


def plot(samples, rows, args, path):
    """Top: sample grids (one row per digit). Bottom: each reward against the distance to the teacher, and
    realism (FD to held-out digits) and diversity as α_rew grows. Error bars: std over seeds."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    judge_top, ink_top = args.judge_scales[-2:], args.ink_scales[-2:]
    panels = [("data", "real digits (held out)"), ("teacher_1", f"teacher, {args.teacher_steps} steps, ω=1"),
              ("init", f"one step at t*={args.t_star} (init)"), ("distilled", "Diff-Instruct (α_rew=0)")]
    panels += [(f"judge_{a:g}", f"DI++ judge, α_rew={a:g}") for a in judge_top]
    panels += [(f"ink_{a:g}", f"DI++ ink, α_rew={a:g}") for a in ink_top]
    panels += [("cfg_guided", f"CFG ω={args.guidance_scale:g}, one step"),
               ("cfg_explicit", f"ω=1 + {args.guidance_scale - 1:g}·r_cfg, one step")]
    panels = [p for p in panels if p[0] in samples][:10]
    fig = plt.figure(figsize=(16, 8.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1])
    grids, plots = top.subplots(2, 5).flatten(), bottom.subplots(1, 4)
    for ax in grids[len(panels):]:
        ax.axis("off")
    for ax, (key, title) in zip(grids, panels):
        ax.imshow(-grid(*samples[key]), cmap="gray", vmin=-1, vmax=1)  # ink dark on white paper
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    teacher = rows.get("teacher_1")
    sweeps = [(p, c, [("distilled", 0.0)] + [(f"{p}_{a:g}", a) for a in getattr(args, f"{p}_scales")])
              for p, c in (("judge", "C3"), ("ink", "C0"))]
    sweeps = [(p, c, [(n, a) for n, a in pts if n in rows]) for p, c, pts in sweeps]
    for ax, (prefix, color, pts) in zip(plots[:2], sweeps):
        xs, ys = [rows[n]["fd_teacher"] for n, _ in pts], [rows[n][prefix] for n, _ in pts]
        ax.errorbar([v["mean"] for v in xs], [v["mean"] for v in ys], xerr=[v["std"] for v in xs],
                    yerr=[v["std"] for v in ys], fmt="o-", color=color, label=f"DI++, {prefix} reward")
        for (n, a), xv, yv in zip(pts, xs, ys):
            ax.annotate(f"α={a:g}", (xv["mean"], yv["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for key, mark, lab in (("cfg_guided", "s", f"CFG ω={args.guidance_scale:g}, α_rew=0"),
                               ("cfg_explicit", "^", f"ω=1 + {args.guidance_scale - 1:g}·r_cfg")):
            if key in rows:
                ax.errorbar(rows[key]["fd_teacher"]["mean"], rows[key][prefix]["mean"],
                            xerr=rows[key]["fd_teacher"]["std"], yerr=rows[key][prefix]["std"], fmt=mark,
                            color="k" if mark == "s" else "C2", label=lab)
        if teacher is not None:
            ax.axhline(teacher[prefix]["mean"], color="k", lw=0.8, ls="--", label="teacher, 50 steps")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set(xlabel="FD to the teacher's samples (log)", title=f"{prefix} reward vs distance to teacher",
               ylabel="judge log p(c|x)" if prefix == "judge" else "ink (pixels)")
        ax.legend(fontsize=7)
    for ax, (metric, ylabel) in zip(plots[2:], (("fd_data", "FD to held-out digits"), ("diversity", "diversity"))):
        for prefix, color, pts in sweeps:
            ax.errorbar([a for _, a in pts], [rows[n][metric]["mean"] for n, _ in pts],
                        [rows[n][metric]["std"] for n, _ in pts], fmt="o-", color=color, label=f"{prefix} reward")
        for name, ls, lab in (("teacher_1", "--", "teacher, 50 steps"), ("data_train", ":", "training digits")):
            if name in rows:
                ax.axhline(rows[name][metric]["mean"], color="k", lw=0.8, ls=ls, label=lab)
        ax.set_xscale("symlog", linthresh=0.3)
        if metric == "fd_data":
            ax.set_yscale("log")
            ax.set_yticks([20, 50, 100, 200, 500, 1000], ["20", "50", "100", "200", "500", "1000"])
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ticks = sorted({a for _, _, pts in sweeps for _, a in pts})
        ax.set_xticks(ticks, [f"{a:g}" for a in ticks])
        ax.set(xlabel="α_rew", ylabel=ylabel, title=f"{ylabel} vs α_rew")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    from PIL import Image
    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)  # palette PNG, ~4× smaller


def replot(args):
    """Redraw the figure and the table from a finished run's results.json and samples.pt (no training)."""
    try:
        out = json.load(open(os.path.join(args.out, "results.json"), encoding="utf-8"))
        samples = torch.load(os.path.join(args.out, "samples.pt"), weights_only=True)
        out["rows"], samples.items()
    except Exception as e:  # missing, truncated or overwritten: nothing to redraw from
        plumbing.die(f"--replot: {args.out}/results.json and samples.pt cannot be read ({type(e).__name__}: "
                     f"{str(e).strip()[:80]}); run the same command without --replot to compute them again")
    plot({k: tuple(v) for k, v in samples.items()}, out["rows"], args, os.path.join(args.out, "digits.png"))
    print(report(out["rows"], args))


def remeasure(args):
    """Recompute every row's metrics (METRICS, the realism columns included) from a finished run's
    samples_per_seed.pt, with the run's own networks from the cache: no generator is trained again. Rewrites
    results.json and table.md and redraws the figure; the CFG pair distances are kept as they were."""
    try:
        out = json.load(open(os.path.join(args.out, "results.json"), encoding="utf-8"))
        per_seed = torch.load(os.path.join(args.out, "samples_per_seed.pt"), weights_only=True)
        samples = torch.load(os.path.join(args.out, "samples.pt"), weights_only=True)
        saved = out["settings"]
    except Exception as e:  # missing (a run older than samples_per_seed.pt), truncated or overwritten
        plumbing.die(f"--remeasure: {args.out}/results.json, samples.pt and samples_per_seed.pt cannot be read "
                     f"({type(e).__name__}: {str(e).strip()[:80]}); run the same command without --remeasure")
    for key in ("teacher", "judge", "referee", "teacher_steps", "eval_per_class"):  # the run's networks and sets
        setattr(args, key, saved[key])
    teacher, judge, referee, _ = load_models(args)
    data = load_data()
    refs = references(args, teacher, referee, data)
    rows = {"data": {k: summarise([v]) for k, v in measure(data["x_test"], data["c_test"], judge, referee,
                                                                refs).items()},
            "data_train": {k: summarise([v]) for k, v in measure(data["x_train"], data["c_train"], judge, referee,
                                                                      refs).items()}}
    for name, xs in per_seed.items():
        ms = [measure(x, eval_prompts(len(x) // C), judge, referee, refs) for x in xs]
        rows[name] = {k: summarise([m[k] for m in ms]) for k in METRICS}
    out["rows"] = {**rows, **{k: v for k, v in out["rows"].items() if k not in rows}}  # ("cfg": kept)
    table = report(out["rows"], args)
    plumbing.write_files({os.path.join(args.out, "results.json"): evaluate.text_file(json.dumps(out, indent=1)),
                          os.path.join(args.out, "table.md"): evaluate.text_file(table + "\n")})
    plot({k: tuple(v) for k, v in samples.items()}, out["rows"], args, os.path.join(args.out, "digits.png"))
    print(table)


# -----------------------------------------------------------------------------
# Entry point


# The data-side networks, trained once per machine (settings are part of the cache key). The teacher: EpsMLP
# width × depth (139k parameters), Adam one-cycle to lr, p_drop of labels dropped to ∅ for CFG, EMA decay of its
# weights. 3000 steps: 70 s on one busy core; 95 % of its 50-step samples are read right by the referee (4000
# steps at lr 1e-3 gave 92 %). The quick teacher (tests) trades quality for time: 1000 steps, 15–25 s, 79 %.
TEACHER = dict(width=128, depth=3, steps=3000, batch=256, lr=3e-3, p_drop=0.1, ema=0.995, seed=0)
QUICK_TEACHER = dict(TEACHER, steps=1000, batch=128, lr=5e-3)
JUDGE = dict(kind="judge", width=128, steps=600, batch=128, lr=2e-3, weight_decay=0.0, seed=1)  # 97.8 % held out
REFEREE = dict(kind="referee", width=16, steps=600, batch=64, lr=3e-3, weight_decay=0.0, seed=2)  # 99.1 % held out


def parse(argv=None):
    p = plumbing.FlagParser("toy/digits.py", __doc__.split("\n\n")[0])  # (exact flags, one-line errors)
    p.add_argument("--judge_scales", type=float, nargs="*", default=[1.0, 10.0, 100.0],
                   help="α_rew of the judge-reward runs")
    p.add_argument("--ink_scales", type=float, nargs="*", default=[0.3, 1.0], help="α_rew of the ink-reward runs")
    p.add_argument("--mix_weights", type=float, nargs="*", default=[], metavar="λ",
                   help="runs on the weighted sum λ·mix_judge·judge + (1−λ)·mix_ink·ink (α_rew = 1), one per λ in [0, 1]")
    p.add_argument("--mix_judge", type=float, default=10.0, help="the judge's weight at λ = 1")
    p.add_argument("--mix_ink", type=float, default=0.3, help="the ink's weight at λ = 0")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="ω of the CFG experiment (1 = skip it)")
    p.add_argument("--extras", type=int, default=1, help="1: also w(t) = σ/α and K_TA = 4 at α_rew = 0")
    p.add_argument("--t_star", type=int, default=700, help="t* of the one-step generator")
    p.add_argument("--t_min", type=int, default=20, help="π(t) = U{t_min..t_max}")
    p.add_argument("--t_max", type=int, default=980, help="π(t) = U{t_min..t_max}")
    p.add_argument("--steps", type=int, default=400, help="generator updates per run")
    p.add_argument("--batch", type=int, default=128, help="batch size (prompts per step)")
    p.add_argument("--lr", type=float, default=1e-4, help="generator Adam learning rate")
    p.add_argument("--lr_fake", type=float, default=1e-4, help="fake-score Adam learning rate")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the evaluated generator (0 = last iterate)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per run (mean ± std over them)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--eval_per_class", type=int, default=200, help="samples per digit for the metrics")
    p.add_argument("--teacher_steps", type=int, default=50, help="DDIM steps of the teacher's own samples")
    p.add_argument("--cache_dir", default="", help="where the trained teacher/judge/referee are kept "
                   "(default $XDG_CACHE_HOME/dipp/digits or ~/.cache/dipp/digits)")
    p.add_argument("--out", default="digits_out", help="output folder")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel training runs")
    p.add_argument("--quick", action="store_true", help="a small teacher, one seed, four short runs (~1 min)")
    p.add_argument("--replot", action="store_true", help="redraw --out's figure and table from its saved results")
    p.add_argument("--remeasure", action="store_true", help="recompute --out's metrics from its saved samples "
                   "(samples_per_seed.pt), no generator training; then redraw")
    args = p.parse_args(argv)
    args.teacher, args.judge, args.referee = dict(TEACHER), dict(JUDGE), dict(REFEREE)
    if args.quick:  # (a flag given explicitly wins over the preset)
        args.teacher = dict(QUICK_TEACHER)
        plumbing.apply_preset(args, dict(judge_scales=[10.0], ink_scales=[], extras=0, seeds=1, steps=150, batch=64,
                                         ema=0.95, eval_per_class=100, workers=1), argv)
    if args.t_star < 1 or args.t_star >= 1000 or args.steps < 1 or args.batch < 2 or args.seeds < 1:
        p.error("need 1 <= --t_star <= 999, --steps >= 1, --batch >= 2, --seeds >= 1")
    if args.guidance_scale < 1 or min(args.judge_scales + args.ink_scales + [0]) < 0:
        p.error("need --guidance_scale >= 1 and reward scales >= 0")
    finite = lambda v: math.isfinite(v)
    plumbing.check_ranges(p, args, {
        "extras": (lambda v: v in (0, 1), "0 or 1"), "lr": (lambda v: v > 0 and finite(v), "> 0"),
        "lr_fake": (lambda v: v > 0 and finite(v), "> 0"), "ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "eval_per_class": (lambda v: v >= 2, ">= 2"), "teacher_steps": (lambda v: v >= 1, ">= 1"),
        "workers": (lambda v: v >= 1, ">= 1 (1 = no worker processes)"),
        "judge_scales": (finite, "finite"), "ink_scales": (finite, "finite"),
        "guidance_scale": (finite, "finite")})
    if not all(0 <= lam <= 1 for lam in args.mix_weights) or not all(0 <= v < math.inf for v in (args.mix_judge,
                                                                                                   args.mix_ink)):
        p.error("need every --mix_weights λ in [0, 1] and finite --mix_judge, --mix_ink >= 0")
    plumbing.check_config(dipp.Config(t_min=args.t_min, t_max=args.t_max))  # π(t) inside the schedule
    return args


if __name__ == "__main__":
    with plumbing.as_program("toy/digits"), plumbing.stopped_in_one_line(
            "nothing of this run is kept; run the command again"):  # (one line; the worker processes end too)
        run()
