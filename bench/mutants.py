"""Mutation testing for dipp: does the suite fail when the method breaks?

Each mutant below is one small, realistic bug (a swapped argument, a flipped sign, an off-by-one, a missing
detach, a wrong default), written as an exact text edit of one of the method's files, with the tests that should
catch it. The tool copies the repository (the files git tracks, plus untracked ones it does not ignore) to a scratch
folder, never touching the working tree, then for each mutant: checks that its snippet occurs exactly once (else
the mutant is STALE: an error, never a kill), applies it, runs its tests (`pytest -x`, with a time limit) and
restores the file. A mutant is KILLED when one of its tests fails and SURVIVES when all of them pass.

    python bench/mutants.py                       # every mutant (~20-40 min on 2 cores), then the score
    python bench/mutants.py --only cfg-cond-uncond-swapped list-checkpoints-alphabetical
    python bench/mutants.py --list                # the mutants and their tests, nothing run
    python bench/mutants.py --check               # only check that every snippet still matches once
    python bench/mutants.py --every --only ...    # run all of each mutant's tests: which of them catch it

Before the mutants, the tests they name are run once on the unmutated copy (--no-baseline skips it): a test
that already fails would count every mutant it names as killed. Not part of the test suite: too slow for CI.
The last score and its command are in docs/mutants.md.

Why a curated list rather than mutmut or cosmic-ray: those generate every operator swap in every line (thousands
of mutants for dipp.py, most in messages, CLI plumbing or equivalent code), and each needs a run of the tests that
cover it; with a ~5-minute suite that is days of CPU. A short list of bugs someone could really write, each
naming the test meant to catch it, runs in minutes and reads as documentation of what each test guards.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutant(typing.NamedTuple):
    name: str
    file: str  # path relative to the repository root
    old: str  # exact text, must occur exactly once in the file
    new: str  # what replaces it
    tests: tuple  # pytest node ids that should fail on the mutant
    bug: str  # what goes wrong in a real run


WIRING_SD = "test_dipp.py::test_one_sd_iteration_equals_alg1_wired_by_hand"
WIRING_PIXART = "test_dipp.py::test_one_pixart_iteration_equals_alg1_wired_by_hand"

MUTANTS = [
    # --- the five that survived the suite before issue 24, and the two caught only by luck
    Mutant("cfg-cond-uncond-swapped", "dipp.py",
           "guided(teacher_eps, c, null.expand_as(c), cfg.guidance_scale)",
           "guided(teacher_eps, null.expand_as(c), c, cfg.guidance_scale)",
           (WIRING_SD, WIRING_PIXART), "the teacher is guided towards ∅ and away from the prompt (negative CFG)"),
    Mutant("teacher-fake-swapped", "dipp.py",
           "ikl_loss(x0, t, eps, schedule, nets.teacher_eps_c, nets.fake_eps_c,",
           "ikl_loss(x0, t, eps, schedule, nets.fake_eps_c, nets.teacher_eps_c,",
           (WIRING_SD, WIRING_PIXART), "the IKL pushes the generator away from the teacher"),
    Mutant("last-prompt-never-drawn", "dipp.py",
           "torch.randint(len(prompts), (world * B,))",
           "torch.randint(len(prompts) - 1, (world * B,))",
           ("test_dipp.py::test_prompts_are_drawn_from_the_whole_file", WIRING_SD),
           "the last prompt is never drawn; a one-line prompt file crashes"),
    Mutant("mean-ci-divides-by-n", "evaluate.py",
           "v.std(unbiased=True).item() / math.sqrt(P)",
           "v.std(unbiased=True).item() / P",
           ("test_evaluate.py::test_interval_is_student_t_over_prompt_means",),
           "confidence intervals √P times too narrow"),
    Mutant("list-checkpoints-alphabetical", "plumbing.py",
           "sorted(found, key=lambda d: int(d.split(\"-\")[1]))",
           "sorted(found)",
           ("test_dipp.py::test_keep_last_k_orders_checkpoints_by_step",),
           "with checkpoints 7-10 and a limit of 3, pruning deletes checkpoint-10 and `latest` resumes 9"),
    Mutant("ikl-stop-gradient-removed", "dipp.py",
           "with torch.no_grad():  # sg[·]: neither score network is differentiated",
           "with contextlib.nullcontext():  # sg[·]: neither score network is differentiated",
           ("test_dipp.py::test_generator_update_differentiates_neither_score_network",),
           "every generator step also backpropagates through both score networks (x0 weighting: silently)"),
    Mutant("reward-ascent-flipped", "dipp.py",
           "loss_G = loss_G + reward_loss(reward, cfg.reward_scale).mean()",
           "loss_G = loss_G - reward_loss(reward, cfg.reward_scale).mean()",
           ("test_dipp.py::test_generator_update_ascends_the_reward", WIRING_SD),
           "the generator minimises the reward"),
    # --- dipp.py: the method
    Mutant("cfg-formula-base", "dipp.py",
           "return eps_uncond + omega * (eps_cond - eps_uncond)",
           "return eps_cond + omega * (eps_cond - eps_uncond)",
           ("test_dipp.py::test_cfg_is_an_implicit_reward",), "guidance of ω + 1 instead of ω"),
    Mutant("cfg-batched-halves-swapped", "dipp.py",
           "e_c, e_null = eps(torch.cat([x_t, x_t])",
           "e_null, e_c = eps(torch.cat([x_t, x_t])",
           ("test_dipp.py::test_cfg_is_an_implicit_reward",), "cond and uncond read from the wrong halves"),
    Mutant("ikl-difference-sign", "dipp.py",
           "score_diff = w * (e_teacher - e_fake) / sigma",
           "score_diff = w * (e_fake - e_teacher) / sigma",
           ("test_dipp.py::test_ikl_gradient_equals_hand_derived",), "the IKL gradient points the wrong way"),
    Mutant("ikl-weight-x0-power", "dipp.py",
           "if kind == \"x0\":\n        return sigma ** 2 / alpha ** 2",
           "if kind == \"x0\":\n        return sigma ** 2 / alpha",
           ("test_dipp.py::test_ikl_gradient_equals_hand_derived",), "w(t) = σ²/α instead of σ²/α²"),
    Mutant("ikl-summed-over-batch", "dipp.py",
           "loss_G = loss_ikl.mean()",
           "loss_G = loss_ikl.sum()",
           (WIRING_SD,), "the IKL's weight next to α_rew grows with the batch size"),
    Mutant("reward-detached", "dipp.py",
           "reward = nets.reward_c(x0)  # (B,)",
           "reward = nets.reward_c(x0.detach())  # (B,)",
           (WIRING_SD, "test_dipp.py::test_generator_update_ascends_the_reward"),
           "the reward is logged but its gradient never reaches θ"),
    Mutant("dsm-sample-not-detached", "dipp.py",
           "x_t = add_noise(x0.detach(), eps, alpha, sigma)  # detach",
           "x_t = add_noise(x0, eps, alpha, sigma)  # detach",
           ("test_dipp.py::test_fake_score_loss_is_dsm_and_detached",), "the DSM loss can move θ"),
    Mutant("alpha-not-square-rooted", "dipp.py",
           "return cls(abar.sqrt(), (1 - abar).sqrt())",
           "return cls(abar, (1 - abar).sqrt())",
           ("test_dipp.py::test_ikl_gradient_equals_hand_derived",), "α_t = ᾱ_t: not variance preserving"),
    Mutant("uniform-t-misses-t-max", "dipp.py",
           "torch.randint(t_min, t_max + 1, (B,)",
           "torch.randint(t_min, t_max, (B,)",
           ("test_toy.py::test_lognormal_sampler_matches_exact_pmf", WIRING_SD), "t_max is never drawn"),
    Mutant("generator-t-star-off-by-one", "dipp.py",
           "t = torch.full((z.shape[0],), self.t_star,",
           "t = torch.full((z.shape[0],), self.t_star - 1,",
           ("test_dipp.py::test_export_reloads_in_stock_diffusers_pipeline",),
           "the generator runs at t* − 1: a stock pipeline at t* gives other images"),
    Mutant("generator-noise-is-the-first-draw", "dipp.py",
           "*fake_noises, (z, t, eps) = noises",
           "(z, t, eps), *fake_noises = noises",
           (WIRING_SD,), "the generator update takes the noise drawn for the fake-score update"),
    Mutant("fake-update-not-stepped", "dipp.py",
           "skipped_fake += opt.fake.step(loss_fake)",
           "skipped_fake += False",
           (WIRING_SD, WIRING_PIXART), "the fake score never learns the generator's distribution"),
    Mutant("default-guidance-1", "dipp.py",
           "guidance_scale: float = 1.75",
           "guidance_scale: float = 1.0",
           (WIRING_SD,), "the default teacher is unguided (DMD2's SD1.5 uses 1.75)"),
    Mutant("default-adam-beta1-0.9", "dipp.py",
           "adam_beta1: float = 0.0",
           "adam_beta1: float = 0.9",
           (WIRING_SD,), "momentum on a loss landscape that moves every step (Diff-Instruct uses 0)"),
    Mutant("default-grad-clip-1", "dipp.py",
           "max_grad_norm: float = 0.0",
           "max_grad_norm: float = 1.0",
           ("test_dipp.py::test_default_generator_update_keeps_w_of_t_at_batch_1",),
           "clipping the summed IKL gradient cancels w(t)"),
    # --- plumbing.py: what keeps a run alive
    Mutant("adam-betas-swapped", "plumbing.py",
           "(self.cfg.adam_beta1, self.cfg.adam_beta2)",
           "(self.cfg.adam_beta2, self.cfg.adam_beta1)",
           (WIRING_SD,), "β1 = 0.999, β2 = 0: the first step looks right, every later one does not"),
    Mutant("adamw-default-weight-decay", "plumbing.py",
           "weight_decay=0.0,",
           "weight_decay=1e-2,",
           (WIRING_SD,), "AdamW's default decay pulls θ and ψ towards 0"),
    Mutant("grad-clip-at-zero", "plumbing.py",
           "if self.max_grad_norm > 0:",
           "if self.max_grad_norm >= 0:",
           ("test_dipp.py::test_training_step_moves_only_generator_and_fake_score",),
           "--max_grad_norm 0 (off) clips every gradient to 0: nothing trains"),
    Mutant("gradients-kept-after-step", "plumbing.py",
           "        # docs/cost.md)\n        self.optimizer.zero_grad(set_to_none=True)\n",
           "        # docs/cost.md)\n",
           ("test_cost.py::test_weights_gradients_and_adam_states_match_a_hand_count",),
           "each network's gradients live through the other's phase (SD1.5 full fine-tuning: 6.4 GiB more)"),
    Mutant("ema-weight-swapped", "plumbing.py",
           "torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)",
           "torch._foreach_lerp_(ema, [p.detach() for p in params], decay)",
           ("test_dipp.py::test_ema_export_is_the_exponential_average",), "the EMA forgets at rate d, not 1 − d"),
    Mutant("keep-last-k-off-by-one", "plumbing.py",
           "list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit]",
           "list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit - 1]",
           ("test_dipp.py::test_keep_last_k_orders_checkpoints_by_step",), "K + 1 checkpoints kept"),
    Mutant("latest-is-the-oldest", "plumbing.py",
           "path = found[-1]",
           "path = found[0]",
           ("test_dipp.py::test_keep_last_k_orders_checkpoints_by_step",), "`latest` resumes the oldest checkpoint"),
    Mutant("pull-on-sample-sign", "plumbing.py",
           "* (self.known.shape[0] / loss_scale) - self.known",
           "* (self.known.shape[0] / loss_scale) + self.known",
           ("test_dipp.py::test_gradient_split_equals_autograd_of_each_term",), "grad_reward logs the wrong size"),
    # --- families.py: what differs between SD-1.x and PixArt-α
    Mutant("pixart-variance-half-read", "families.py",
           "return out[:, :x_t.shape[1]]",
           "return out[:, x_t.shape[1]:]",
           ("test_dipp.py::test_pixart_ikl_gradient_and_no_gradient_into_learned_sigma",),
           "PixArt's learned variance read as ε̂"),
    Mutant("pixart-null-mask-from-prompt", "families.py",
           "self.mask.expand_as(other.mask)",
           "other.mask",
           (WIRING_PIXART,), "PixArt's ∅ attends over the prompt's token count"),
    Mutant("t5-prompts-not-lower-cased", "families.py",
           "[p.lower().strip() for p in prompts]",
           "[p.strip() for p in prompts]",
           ("test_dipp.py::test_pixart_lora_base_untouched_merged_export_reloads_in_stock_pipeline",),
           "T5 sees other text than PixArtAlphaPipeline gives it"),
    Mutant("sd-default-t-star", "families.py",
           "readout=\"conv_out\", t_star=999",
           "readout=\"conv_out\", t_star=998",
           ("test_dipp.py::test_export_reloads_in_stock_diffusers_pipeline", WIRING_SD), "SD's generator at t* = 998"),
    Mutant("pixart-1024-size-in-latents", "families.py",
           "resolution=x_t.new_tensor([[8.0 * h, 8.0 * w]])",
           "resolution=x_t.new_tensor([[1.0 * h, 1.0 * w]])",
           ("test_dipp.py::test_pixart_1024_models_get_the_image_size",),
           "the 1024-px model is told the latent size, not the image size"),
    Mutant("sd3-eps-from-velocity-sigma", "families.py",
           "return x_t + (1 - sigma) * sd3_velocity(",
           "return x_t + sigma * sd3_velocity(",
           ("test_sd3.py::test_sd3_eps_and_x0_from_the_velocity_match_the_schedulers_step",),
           "SD3's velocity converted to ε̂ with σ for α: every IKL and DSM term is off"),
    Mutant("sd3-time-input-unscaled", "families.py",
           "timestep=sigma.flatten() * 1000,",
           "timestep=sigma.flatten(),",
           ("test_sd3.py::test_sd3_training_run_and_its_export_reproduce_a_stock_one_step_sd3_call",),
           "SD3's transformer told σ where it was trained on 1000 σ"),
    Mutant("sd3-sigmas-not-reversed", "families.py",
           "return scheduler.sigmas.flip(0)",
           "return scheduler.sigmas",
           ("test_sd3.py::test_sd3_schedule_is_its_flow_schedulers_sigmas",),
           "t = 0 is pure noise: π(t), w(t) and t* all on the wrong end of the flow"),
    # --- evaluate.py: the paper's table
    Mutant("diversity-counts-the-diagonal", "rewards.py",
           "/ (K * (K - 1))",
           "/ (K * K)",
           ("test_evaluate.py::test_diversity_is_zero_for_identical_images_and_mean_pairwise_distance_otherwise",),
           "diversity averaged over K² pairs, self-pairs included"),
    Mutant("frechet-cross-term-halved", "evaluate.py",
           "cov2.trace() - 2 * tr_covmean",
           "cov2.trace() - tr_covmean",
           ("test_evaluate.py::test_frechet_distance_matches_closed_forms",), "FD without the factor 2"),
    Mutant("clip-score-not-clamped", "rewards.py",
           "lambda s: 100 * s.clamp_min(0)",
           "lambda s: 100 * s",
           ("test_rewards.py::test_clip_score_is_100_times_clamped_cosine",),
           "negative CLIP scores, unlike torchmetrics' CLIPScore"),
    Mutant("image-seeds-collide", "evaluate.py",
           "return seed * 2 ** 40 + i * 2 ** 16 + k",
           "return seed * 2 ** 40 + i + k",
           ("test_evaluate.py::test_all_models_share_prompts_and_seeds",), "image (0, 1) and (1, 0) share their z"),
    # --- issues 20 and 22: SDXL's ∅, FSDP2, evaluation resume, the reproduction's α_rew
    Mutant("sdxl-null-not-zeroed", "families.py",
           "return c.zeroed() if family.null_zeros else c",
           "return c",
           ("test_evaluate.py::test_sdxl_teacher_row_is_the_stock_pipeline_and_its_text_encoders_are_gone_before_any_unet",),
           "SDXL's CFG uses the encoded \"\" instead of the zeros its pipeline (and DMD2-SDXL) use"),
    Mutant("fsdp-shards-nothing", "plumbing.py",
           "for net in (G.net, fake) if self.sharded else ():",
           "for net in ():",
           ("test_dipp.py::test_two_fsdp_processes_train_like_one_and_their_checkpoint_resumes_in_two_or_one",),
           "--shard fsdp trains N unsynchronised copies (no gradient averaging)"),
    Mutant("evaluate-resume-ignores-the-model", "evaluate.py",
           "if os.path.isdir(folder) and not (os.path.isfile(key_file) and open(key_file, \"rb\").read() == text.encode()):",
           "if False:",
           ("test_evaluate.py::test_a_rerun_keeps_what_it_wrote_and_redraws_a_retrained_generator",),
           "a retrained generator is scored on the old generator's images"),
    Mutant("calibration-inverted", "reproduce.py",
           "scale = float(f\"{TARGET_RATIO / median:.2g}\")",
           "scale = float(f\"{median / TARGET_RATIO:.2g}\")",
           ("test_reproduce.py::test_tiny_chain_writes_the_table_with_every_row_and_column",),
           "α_rew moves away from the aimed gradient ratio instead of towards it"),
    # --- issue 29: the realistic bugs a fresh mutant set found unseen, and their siblings
    Mutant("fake-score-from-generator-init", "dipp.py",
           "G, fake = build_generator(cfg, teacher, fam, schedule, device), build_fake_score(cfg, teacher, fam, device)",
           "G = build_generator(cfg, teacher, fam, schedule, device); fake = build_fake_score(cfg, G.net, fam, device)",
           ("test_dipp.py::test_the_fake_score_starts_from_the_teacher_not_the_generator_init",),
           "with --generator_init the fake score starts at the generator, not at s_ref: the IKL's reference is lost"),
    Mutant("lora-peft-default-alpha", "plumbing.py",
           "LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))",
           "LoraConfig(r=rank, target_modules=list(targets))",
           ("test_dipp.py::test_lora_adapter_adds_exactly_B_A_x",),
           "PEFT's default lora_alpha = 8: the adapter's scale becomes 8/r (2× at r = 4, 1/8 at r = 64)"),
    Mutant("text-cache-key-without-dtype", "families.py",
           "key = [name, family.name, str(dtype), plumbing.files_stamp(",
           "key = [name, family.name, plumbing.files_stamp(",
           ("test_dipp.py::test_prompt_embedding_cache_is_keyed_by_dtype",),
           "a bf16 run reads the prompt embeddings an fp32 run cached in the same folder (or the reverse)"),
    Mutant("ddp-gradients-averaged-twice", "dipp.py",
           "opt.G.scaler.scale(loss_G).backward()",
           "opt.G.scaler.scale(loss_G / (torch.distributed.get_world_size() if torch.distributed.is_initialized() "
           "else 1)).backward()",
           ("test_dipp.py::test_two_process_ddp_equals_one_process_with_global_batch",),
           "under DDP every gradient is divided by the world size once more (invisible to Adam with β1 = 0 until "
           "its second moment, the clipping norm or another optimiser sees it)"),
    Mutant("image-key-without-the-teacher", "evaluate.py",
           "\"teacher\": teacher, \"teacher_parts\": shared,",
           "",
           ("test_evaluate.py::test_image_key_holds_everything_the_images_depend_on",),
           "a generator re-evaluated with another VAE or text encoder in the teacher's folder keeps the old images"),
]


def repo_files(root):
    """The files a checkout holds: tracked, plus untracked ones git does not ignore (a new test file counts)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))]


def scratch_copy(root, dest):
    for f in repo_files(root):
        os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
        shutil.copy2(os.path.join(root, f), os.path.join(dest, f))


def stale(mutant, root):
    """None when the mutant applies (its snippet occurs exactly once), else why not."""
    path = os.path.join(root, mutant.file)
    if not os.path.isfile(path):
        return f"{mutant.file} does not exist"
    n = open(path, encoding="utf-8").read().count(mutant.old)
    return None if n == 1 else f"snippet occurs {n} times in {mutant.file}"


def run_tests(copy, tests, args, stop_first=True):
    """(pytest's exit code or 'timeout', seconds, the failing tests) for tests run in the scratch copy."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", COLUMNS="400",
               TMPDIR=os.path.join(copy, ".tmp"))  # the copy's own tiny models and tmp_path folders; wide summary lines
    # -n 0: in this one process (pytest.ini's two workers would each import everything for a mutant's few tests)
    cmd = [args.python, "-B", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
           *(["-x"] if stop_first else []), *tests]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends torchrun children too
    try:
        out, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.time() - t0, []
    failed = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if proc.returncode not in (0, 1):  # 2 interrupted, 3 internal error, 4 usage (e.g. no such test), 5 none collected
        failed = out.strip().splitlines()[-3:]
    return proc.returncode, time.time() - t0, failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    p.add_argument("--check", action="store_true", help="only check that every snippet matches exactly once")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the named tests on unmutated code")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run (timeout = killed)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    p.add_argument("--every", action="store_true", help="run all of a mutant's tests, not stop at the first failure")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    p.add_argument("--width", type=int, default=120, help="characters of each failing test's summary line to print")
    args = p.parse_args(argv)
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "duplicate mutant names"
    unknown = [n for n in args.only if n not in names]
    if unknown:
        p.error(f"unknown mutant(s): {', '.join(unknown)}")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.file:12s} {m.bug}\n{'':49s}tests: {' '.join(t.split('::')[1] for t in m.tests)}")
        return 0
    errors = {m.name: why for m in chosen if (why := stale(m, HERE))}
    for name, why in errors.items():
        print(f"STALE    {name}: {why}")
    if args.check:
        print(f"{len(chosen) - len(errors)}/{len(chosen)} mutants apply")
        return 1 if errors else 0
    copy = tempfile.mkdtemp(prefix="dipp-mutants-")
    print(f"scratch copy: {copy}")
    results = {}
    try:
        scratch_copy(HERE, copy)
        os.makedirs(os.path.join(copy, ".tmp"))
        runnable = [m for m in chosen if m.name not in errors]
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in runnable for t in m.tests))
            rc, seconds, failed = run_tests(copy, tests, args, stop_first=False)
            print(f"baseline: {len(tests)} tests on the unmutated copy, {seconds:.0f} s, "
                  f"{'pass' if rc == 0 else f'FAIL ({rc}): {failed}'}")
            if rc != 0:
                print("a named test fails without any mutant: fix it first (or pass --no-baseline)")
                return 2
        for m in runnable:
            path = os.path.join(copy, m.file)
            original = open(path, encoding="utf-8").read()
            open(path, "w", encoding="utf-8").write(original.replace(m.old, m.new))
            try:
                rc, seconds, failed = run_tests(copy, list(m.tests), args, stop_first=not args.every)
            finally:
                open(path, "w", encoding="utf-8").write(original)
            if rc == "timeout":
                verdict, detail = "KILLED", f"timeout after {seconds:.0f} s"
            elif rc == 1:
                short = [f.split(" - ")[0].split("::")[-1] + f[len(f.split(" - ")[0]):] for f in failed]
                verdict, detail = "KILLED", "by " + "; ".join(f[:args.width] for f in short)
            elif rc == 0:
                verdict, detail = "SURVIVED", f"{len(m.tests)} test(s) pass"
            else:
                verdict, detail = "ERROR", f"pytest exit {rc}: {' | '.join(failed)}"
                errors[m.name] = detail
            results[m.name] = verdict
            print(f"{verdict:8s} {m.name} ({m.file}, {seconds:.0f} s) {detail}", flush=True)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    killed = sum(v == "KILLED" for v in results.values())
    survivors = [n for n, v in results.items() if v == "SURVIVED"]
    print(f"\nscore: {killed}/{len(chosen)} killed, {len(survivors)} survived, {len(errors)} error(s)")
    if survivors:
        print("survivors: " + ", ".join(survivors))
    if errors:
        print("errors: " + ", ".join(errors))
    return 0 if not survivors and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
