"""Tests for dipp: each one checks the code against an independent computation (a hand-derived
gradient, an exact score, a closed form, or a reference library's own result). CPU, offline.

Run: pytest -q test_dipp.py
"""
import functools
import json
import os
import re
import shlex
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the model hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

import dipp
import families
import plumbing
import promptsets
import random_weights
import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.gettempdir()  # models built once per session; TMPDIR keeps two checkouts' runs apart


@functools.lru_cache(maxsize=None)
def tiny_models(folder=os.path.join(TMP, "dipp-test-tiny")):
    """Tiny SD + CLIP folders, written once per test session (random_weights.build_random)."""
    return random_weights.build_random(folder, "tiny")


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny_models()[0], subfolder="unet")
    for p in unet.parameters():  # move off the init so cond and uncond really differ
        p.data += 0.02 * torch.randn_like(p)
    return unet.eval()


def sd_alphas_cumprod():
    """The reference schedule from diffusers itself, not from dipp."""
    from diffusers import DDPMScheduler
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return s.alphas_cumprod.double()


# ----------------------------------------------------------------------------- the read-along contract

def test_deviation_list_matches_the_markers():
    """dipp.py's header list 'Simplifications vs. the paper' and its NOTE(deviation N) markers name the same
    deviations, each marked exactly once where it happens, and no other file marks one the list lacks."""
    doc = dipp.__doc__.split("Simplifications vs. the paper")[1]
    listed = [int(n) for n in re.findall(r"^  (\d+)\. ", doc, flags=re.M)]
    sources = "".join(open(os.path.join(HERE, f)).read() for f in ("dipp.py", "families.py", "plumbing.py"))
    marked = sorted(int(n) for n in re.findall(r"NOTE\(deviation (\d+)\):", sources))
    assert listed == list(range(1, len(listed) + 1)) and len(listed) >= 8
    assert marked == listed, (listed, marked)
    assert "NOTE(deviation):" not in sources  # every marker carries its number


# ----------------------------------------------------------------------------- forward process

def test_schedule_matches_diffusers():
    """dipp's scaled-linear schedule equals diffusers' DDPMScheduler (SD1.5 settings): α² = ᾱ, σ² = 1 − ᾱ."""
    alpha, sigma = dipp.Schedule.scaled_linear().table.double()
    assert torch.allclose(alpha ** 2, sd_alphas_cumprod(), rtol=0, atol=1e-6)  # (float32's α, squared: 5e-7)
    assert torch.allclose(sigma ** 2, 1 - sd_alphas_cumprod(), rtol=0, atol=1e-6)


def test_ddpm_families_alpha_sigma_are_bit_for_bit_what_they_were():
    """The forward process now comes from the family (dipp.Schedule of α_t, σ_t tables). For every DDPM family's
    schedule (SD1.5's scaled-linear DDPM config, PixArt-α's linear one, SDXL's Euler config), loaded through
    dipp.load_teacher, α_t and σ_t at every t are bit for bit what dipp computed before: ᾱ stored in float32,
    then sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) of the indexed float32 values, as Schedule.alpha_sigma did."""
    from diffusers import DDPMScheduler
    for folder in (tiny_models()[0], tiny_pixart_models()[0], tiny_sdxl_models()[0]):
        schedule = dipp.load_teacher(folder, torch.device("cpu"), torch.float32, text_encoder=False).schedule
        abar = torch.as_tensor(DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod,
                               dtype=torch.float64).float()  # the old Schedule.__init__
        t = torch.arange(len(abar))
        old = abar[t].view(-1, 1, 1, 1)  # the old alpha_sigma
        alpha, sigma = schedule.alpha_sigma(t, 4)
        assert torch.equal(alpha, old.sqrt()) and torch.equal(sigma, (1 - old).sqrt()), folder
    old = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    assert torch.equal(dipp.Schedule.scaled_linear().table, torch.stack([old.sqrt(), (1 - old).sqrt()]))


def test_add_noise_predict_x0_round_trip():
    """predict_x0 inverts add_noise when the ε-prediction is the true noise."""
    sched = dipp.Schedule.scaled_linear()
    x0, eps = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t = torch.tensor([0, 10, 500, 900, 999])
    a, s = sched.alpha_sigma(t, 4)
    assert torch.allclose(dipp.predict_x0(dipp.add_noise(x0, eps, a, s), eps, a, s), x0, atol=1e-4)


# ----------------------------------------------------------------------------- losses

def linear_eps(seed, D=6):
    """A fixed random ε-predictor eps(x_t, t) that depends on x and t (stands in for a network)."""
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(D, D, generator=g) / D ** 0.5, torch.randn(D, generator=g)
    return lambda x, t: torch.tanh(x @ W + b * (t[:, None].float() / 1000))


@pytest.mark.parametrize("weighting", ["x0", "eps", "dmd2"])
def test_ikl_gradient_equals_hand_derived(weighting):
    """∂L_IKL/∂x0 from autograd equals w(t)·α_t·(ε̃_ref − ε̂_fake)/σ_t written out by hand."""
    torch.manual_seed(0)
    real, fake = linear_eps(1), linear_eps(2)
    x0 = torch.randn(8, 6, requires_grad=True)
    t, eps = torch.randint(20, 981, (8,)), torch.randn(8, 6)
    loss = dipp.ikl_loss(x0, t, eps, dipp.Schedule.scaled_linear(), real, fake, weighting).sum()
    (grad,) = torch.autograd.grad(loss, x0)
    abar = sd_alphas_cumprod()[t].float()[:, None]  # independent schedule (diffusers)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0.detach() + sigma * eps
    e_real, e_fake = real(x_t, t), fake(x_t, t)
    w = {"x0": sigma ** 2 / alpha ** 2, "eps": sigma / alpha}.get(weighting)
    if w is None:  # DMD2: σ²/α² divided by mean |x0 − x̂0_real|
        x0_real = (x_t - sigma * e_real) / alpha
        w = sigma ** 2 / alpha ** 2 / (x0.detach() - x0_real).abs().mean(1, keepdim=True)
    expected = w * alpha * (e_real - e_fake) / sigma
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)
    assert grad.abs().max() > 1e-3  # the check is not vacuous


def test_ikl_gradient_vanishes_when_fake_equals_teacher():
    """p_fake = p_ref (fake score is the teacher): the IKL gradient to the generator is exactly 0."""
    unet = tiny_unet()
    eps_fn = dipp.denoiser_eps(unet, families.FAMILIES["sd"])
    cond = torch.randn(2, 77, 32)
    real = dipp.guided(eps_fn, cond, torch.zeros_like(cond), 1.0)
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    t, eps = torch.tensor([100, 700]), torch.randn(2, 4, 8, 8)
    loss = dipp.ikl_loss(x0, t, eps, dipp.Schedule.scaled_linear(), real, real).sum()
    (grad,) = torch.autograd.grad(loss, x0)
    assert torch.count_nonzero(grad) == 0


def test_cfg_is_an_implicit_reward():
    """METHOD.md §5 on a tiny UNet: the guided-teacher IKL gradient equals the unguided one minus
    (ω−1)·∇x0 r_cfg, with r_cfg's gradient from separate (unbatched) cond and uncond UNet calls."""
    # float64 nets: the identity is exact, but batched and separate fp32 calls round differently (oneDNN's
    # kernels vary with the batch and even with memory layout between runs), which the tolerance must not meet
    unet = tiny_unet().double()
    eps_fn = dipp.denoiser_eps(unet, families.FAMILIES["sd"])
    fake = dipp.denoiser_eps(tiny_unet(seed=1).double(), families.FAMILIES["sd"])
    sched, omega = dipp.Schedule.scaled_linear(), 4.5
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 77, 32), torch.randn(3, 77, 32)
    x0 = torch.randn(3, 4, 8, 8, requires_grad=True)
    t, eps = torch.tensor([50, 400, 900]), torch.randn(3, 4, 8, 8)
    fake_c = lambda x, tt: fake(x, tt, cond)

    def grad_of(loss):
        return torch.autograd.grad(loss.sum(), x0)[0]

    g_guided = grad_of(dipp.ikl_loss(x0, t, eps, sched, dipp.guided(eps_fn, cond, uncond, omega), fake_c))
    g_plain = grad_of(dipp.ikl_loss(x0, t, eps, sched, dipp.guided(eps_fn, cond, uncond, 1.0), fake_c))
    g_cfg = grad_of(dipp.guidance_reward_loss(x0, t, eps, sched, lambda x, tt: eps_fn(x, tt, cond),
                                         lambda x, tt: eps_fn(x, tt, uncond)))  # = −∇ r_cfg
    assert torch.allclose(g_guided, g_plain + (omega - 1) * g_cfg, rtol=1e-3, atol=1e-5)
    assert (g_guided - g_plain).abs().max() > 1e-3  # guidance really changed the gradient


def test_fake_score_loss_is_dsm_and_detached():
    """The DSM loss equals ‖ε̂(α x0 + σ ε, t) − ε‖² averaged over dims, and sends no gradient to x0."""
    fake = linear_eps(3)
    x0 = torch.randn(4, 6, requires_grad=True)
    t, eps = torch.tensor([30, 300, 600, 950]), torch.randn(4, 6)
    loss = dipp.fake_score_loss(fake, x0, t, eps, dipp.Schedule.scaled_linear())
    abar = sd_alphas_cumprod()[t].float()[:, None]
    x_t = abar.sqrt() * x0.detach() + (1 - abar).sqrt() * eps
    assert torch.allclose(loss, ((fake(x_t, t) - eps) ** 2).mean(1), rtol=1e-5)
    assert not loss.requires_grad  # linear_eps has no parameters and x0 was detached


def test_exact_eps_minimises_dsm_on_gaussian_data():
    """For x0 ~ N(0, s²I) the exact ε-predictor E[ε|x_t] = σ x_t/(α²s² + σ²) beats perturbed ones."""
    torch.manual_seed(0)
    sched, s = dipp.Schedule.scaled_linear(), 0.7
    x0, eps = s * torch.randn(200000, 2), torch.randn(200000, 2)
    t = torch.full((200000,), 300)
    a, sg = sched.alpha_sigma(t, 2)
    exact = lambda x, tt, k=1.0: k * sg * x / (a ** 2 * s ** 2 + sg ** 2)
    losses = [dipp.fake_score_loss(lambda x, tt: exact(x, tt, k), x0, t, eps, sched).mean().item()
              for k in (0.9, 1.0, 1.1)]
    assert losses[1] < losses[0] and losses[1] < losses[2]
    closed_form = 1 - sg[0, 0].item() ** 2 / (a[0, 0].item() ** 2 * s ** 2 + sg[0, 0].item() ** 2)
    assert abs(losses[1] - closed_form) < 0.01  # the DSM floor: posterior variance of ε


def test_reward_loss_sign():
    """Minimising the reward loss increases the reward (gradient ascent on α_rew·r)."""
    r = torch.tensor([1.0, 2.0], requires_grad=True)
    dipp.reward_loss(r, 3.0).sum().backward()
    assert torch.equal(r.grad, torch.tensor([-3.0, -3.0]))


# ----------------------------------------------------------------------------- training

def read_unet(sub):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_models()[0], subfolder=sub)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def distance(a, b):
    """‖a − b‖ over all tensors of two state dicts with the keys of a."""
    return sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()


def test_training_step_moves_only_generator_and_fake_score(tmp_path):
    """One tiny step changes generator and fake score; teacher, VAE, text encoder and reward are
    bit-identical to the files they were loaded from."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTextModel
    out = str(tmp_path)
    nets = dipp.main(["--tiny", "--max_train_steps", "1", "--output_dir", out, "--reward_scale", "10",
                      "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3"])
    sd, clip = os.path.join(out, "tiny", "sd"), os.path.join(out, "tiny", "clip")
    teacher = read_unet_from(sd)
    assert same_weights(nets["teacher"], teacher)
    assert same_weights(nets["vae"], AutoencoderKL.from_pretrained(sd, subfolder="vae"))
    assert same_weights(nets["text_encoder"], CLIPTextModel.from_pretrained(sd, subfolder="text_encoder"))
    assert same_weights(nets["reward"].terms[0][2].model, CLIPModel.from_pretrained(clip))
    assert not same_weights(nets["G"].net, teacher)
    assert not same_weights(nets["fake"], teacher)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1]["step"] == 1 and all(map(lambda v: v == v, log[-1].values()))  # no NaN logged


def read_unet_from(folder):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


def readme_quickstart():
    """The `python dipp.py --tiny ...` command exactly as README gives it."""
    text = open(os.path.join(HERE, "README.md")).read()
    line = next(l for l in text.splitlines() if "python dipp.py --tiny" in l)
    command = line[line.index("python dipp.py --tiny"):].split("#")[0].split("&&")[0]
    return shlex.split(command)[2:]


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    """README's CPU command runs as written, twice into the same folder (a quick start can be re-run), and
    leaves a checkpoint, a sample grid and a generator with its model card. Then the --generate example of --help
    and README, exactly as written (no --tiny, no teacher flag), draws from it offline: dipp.json names the teacher."""
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (out/, out/generator), as a user types them
    argv = readme_quickstart()
    dipp.main(argv)
    dipp.main(argv)
    out = argv[argv.index("--output_dir") + 1]
    files = os.listdir(out)
    assert any(re.fullmatch(r"checkpoint-\d+", f) for f in files), files
    assert any(f.startswith("samples_") and f.endswith(".png") for f in files), files
    assert os.path.isfile(os.path.join(out, "generator", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "generator", "README.md"))
    commands = set()
    for text in (dipp.__doc__, open(os.path.join(HERE, "README.md")).read()):
        line = next(l for l in text.splitlines() if "--generator_init out/generator" in l)
        commands.add(line[line.index("python dipp.py --generate"):].split("`")[0].strip())
    for command in commands:  # (the same command in both, so far)
        images = dipp.main(shlex.split(command)[2:])
        assert images.shape[0] == 1 and os.path.isfile(os.path.join("dipp-out", "generated_00.png"))


def test_resume_continues_the_run(tmp_path):
    """2 steps straight == 1 step, stop, resume, 1 more step (weights identical)."""
    common = ["--tiny", "--reward", "none", "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3",
              "--checkpointing_steps", "1"]
    straight = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "a")])
    dipp.main(common + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "b")])
    resumed = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "b"),
                                  "--resume_from_checkpoint", "latest"])
    assert same_weights(straight["G"].net, resumed["G"].net)
    assert same_weights(straight["fake"], resumed["fake"])


def test_export_reloads_in_stock_diffusers_pipeline(tmp_path):
    """The exported generator folder in a stock StableDiffusionPipeline, run for one step at t*, gives
    the same images from the same noise as dipp's own one-step generation."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    out = str(tmp_path)
    dipp.main(["--tiny", "--max_train_steps", "1", "--output_dir", out, "--reward", "none",
               "--learning_rate", "1e-3"])
    prompts = ["a red bicycle", "a fox"]
    torch.manual_seed(5)
    ours = dipp.main(["--tiny", "--output_dir", out, "--generate", "|".join(prompts),
                      "--generator_init", os.path.join(out, "generator"), "--seed", "5"])
    sd = os.path.join(out, "tiny", "sd")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(sd, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(sd, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(out, "generator")),
        scheduler=DDPMScheduler.from_pretrained(sd, subfolder="scheduler", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    torch.manual_seed(5)
    z = torch.randn(2, 4, 8, 8)  # the same z ~ N(0, I) that dipp.generate drew after seeding
    theirs = pipe(prompts, timesteps=[999], latents=z, guidance_scale=1.0, output_type="pt").images
    assert torch.allclose((ours.clamp(-1, 1) + 1) / 2, theirs, atol=1e-4)


# ----------------------------------------------------------------------------- rewards

@functools.lru_cache(maxsize=None)
def offline_imagereward(folder=os.path.join(TMP, "dipp-test-imagereward")):
    """ImageReward built from a written med_config.json (1 BERT layer) and a small vocab, no download.
    The MLP head is re-initialised with a larger std so the score really depends on the image."""
    sys.modules.setdefault("clip", type(sys)("clip"))
    import ImageReward as RM
    from ImageReward.models.BLIP import blip_pretrain
    from transformers import BertTokenizer
    os.makedirs(folder, exist_ok=True)
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
               hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02, intermediate_size=3072,
               layer_norm_eps=1e-12, max_position_embeddings=512, model_type="bert", num_attention_heads=12,
               num_hidden_layers=1, pad_token_id=0, type_vocab_size=2, vocab_size=30524,
               encoder_width=768, add_cross_attention=True)
    words = "a red bicycle fox photo of the on watercolor painting".split()
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)
    for name, text in (("med_config.json", json.dumps(med)), ("vocab.txt", vocab)):  # atomically: another test
        tmp = os.path.join(folder, f"{name}.{os.getpid()}.tmp")                    # worker may be reading it
        open(tmp, "w").write(text)
        os.replace(tmp, os.path.join(folder, name))

    def init_tokenizer():  # blip_pretrain imported the name, so patch it there
        tok = BertTokenizer(os.path.join(folder, "vocab.txt"))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    original = blip_pretrain.init_tokenizer
    blip_pretrain.init_tokenizer = init_tokenizer
    try:
        torch.manual_seed(0)
        model = RM.ImageReward(med_config=os.path.join(folder, "med_config.json"), device="cpu")
    finally:
        blip_pretrain.init_tokenizer = original
    for p in model.mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval().requires_grad_(False)


def smooth_image(seed, size=96):
    """A smooth random image in [-1, 1], quantised to uint8 levels so PIL sees exactly the same pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(size, size),
                                        mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 255).round() / 127.5 - 1  # (1, 3, size, size)


def to_pil(image):
    from PIL import Image
    return Image.fromarray(((image[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def test_reward_preprocessing_matches_imagereward_pil_path():
    """dipp's torch preprocessing (differentiable) vs the package's PIL pipeline on the same image:
    pixels within 0.05 (normalised units, mean 0.01) and scores within 2% of the between-image spread."""
    model = offline_imagereward()
    fn = rewards.ImageRewardFn(model)
    for size in (96, 512):  # upsampling to 224 and SD1.5's downsampling 512 -> 224
        img = smooth_image(0, size)
        ref = model.preprocess(to_pil(img))[None]  # (1, 3, 224, 224), the package's own transform
        ours = rewards.clip_preprocess(img, 224)
        assert (ours - ref).abs().max() < 0.05 and (ours - ref).abs().mean() < 0.01
    with torch.no_grad():
        prompt = "a red bicycle"
        ours = [fn(smooth_image(s, 512), [prompt]).item() for s in (1, 2)]
        theirs = [model.score(prompt, to_pil(smooth_image(s, 512))) for s in (1, 2)]
    spread = abs(theirs[0] - theirs[1])
    assert spread > 1e-3  # the score depends on the image
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 0.02 * spread + 1e-4


def test_imagereward_gradient_reaches_generator():
    """ImageReward (offline, random weights) → torch preprocessing → VAE decode → one-step generator:
    the reward's gradient is nonzero on the generator's weights."""
    from diffusers import AutoencoderKL
    sd = tiny_models()[0]
    net = read_unet("unet").train()
    G = dipp.OneStepGenerator(net, families.FAMILIES["sd"], dipp.Schedule.scaled_linear(), 999)
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").requires_grad_(False)
    fn = rewards.ImageRewardFn(offline_imagereward())
    x0 = G(torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32))
    dipp.reward_loss(fn(dipp.decode(vae, x0), ["a fox"]), 1.0).sum().backward()
    grads = [p.grad.abs().sum() for p in G.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0


def test_clip_reward_is_cosine_similarity():
    """ClipRewardFn equals the cosine of CLIPModel's own image and text embeddings."""
    from transformers import CLIPModel, CLIPTokenizer
    clip = tiny_models()[1]
    model, tok = CLIPModel.from_pretrained(clip).eval(), CLIPTokenizer.from_pretrained(clip)
    images = smooth_image(3, 16).repeat(2, 1, 1, 1)
    prompts = ["a fox", "a red bicycle"]
    with torch.no_grad():
        out = model(input_ids=tok(prompts, padding=True, return_tensors="pt").input_ids,
                    pixel_values=rewards.clip_preprocess(images, 16))
        expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        assert torch.allclose(rewards.ClipRewardFn(model, tok)(images, prompts), expected, atol=1e-5)


# ----------------------------------------------------------------------------- bad input

def error_of(argv):
    with pytest.raises(SystemExit) as e:
        dipp.main(argv)
    return str(e.value)


def test_bad_inputs_give_one_clear_line(tmp_path):
    """Each bad input ends with one 'dipp: error: …' line naming the problem and the fix."""
    out = str(tmp_path)
    cases = {
        ("--pretrained_model_name_or_path", "./no/such/folder"): "does not exist",
        ("--pretrained_model_name_or_path", out, "--reward", "none"): "missing unet/config.json",
        ("--pretrained_model_name_or_path", "someone/not-cached-model"): "huggingface-cli download",
        ("--tiny", "--prompts", os.path.join(out, "none.txt")): "does not exist",
        ("--tiny", "--generator_timestep", "1000"): "outside the schedule",
        ("--tiny", "--t_min", "500", "--t_max", "400"): "t_min",
        ("--tiny", "--mixed_precision", "fp16", "--device", "cpu"): "needs a CUDA GPU",
        ("--tiny", "--generate", "a fox"): "--generator_init",
        ("--tiny", "--resume_from_checkpoint", "latest"): "no checkpoint",
        ("--tiny", "--shard", "fsdp", "--lora_rank", "4"): "--lora_rank cannot be combined with --shard fsdp",
        ("--tiny", "--shard", "fsdp", "--ema_decay", "0.9"): "--ema_decay cannot be combined with --shard fsdp",
        ("--tiny", "--shard", "fsdp", "--compile", "default"): "--compile cannot be combined with --shard fsdp",
        ("--tiny", "--shard", "fsdp", "--mixed_precision", "fp16"): "use bf16",
    }
    open(os.path.join(out, "empty.txt"), "w").write("\n  \n")
    cases[("--tiny", "--prompts", os.path.join(out, "empty.txt"))] = "has no prompts"
    for argv, expected in cases.items():
        message = error_of(list(argv) + ["--output_dir", os.path.join(out, "run"), "--max_train_steps", "1"])
        assert message.startswith("dipp: error:") and expected in message, (argv, message)
        assert "\n" not in message, message


def test_compile_without_a_cpu_compiler_is_a_clear_error(tmp_path, monkeypatch):
    """--compile on a CPU with no C++ compiler stops with one line instead of an inductor traceback."""
    monkeypatch.setattr(plumbing.shutil, "which", lambda name: None)
    msg = error_of(["--tiny", "--reward", "none", "--compile", "default", "--device", "cpu", "--max_train_steps",
                    "1", "--output_dir", str(tmp_path)])
    assert "needs a C++ compiler" in msg and "drop --compile" in msg


def test_bad_reward_given_to_tiny_is_caught(tmp_path):
    """--tiny swaps the reward to its tiny CLIP; an ImageReward path is checked only without --tiny."""
    msg = error_of(["--pretrained_model_name_or_path", tiny_models()[0], "--reward", "imagereward",
                    "--reward_model_path", str(tmp_path), "--output_dir", str(tmp_path / "r")])
    assert "ImageReward.pt" in msg and "huggingface-cli download THUDM/ImageReward" in msg


def test_imagereward_from_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    """With no cached ImageReward and the hub unreachable, loading it by name ends in one line."""
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/ImageReward
    msg = error_of(["--pretrained_model_name_or_path", tiny_models()[0], "--reward", "imagereward",
                    "--output_dir", str(tmp_path / "r"), "--max_train_steps", "1"])
    assert "cannot load the ImageReward model" in msg and "huggingface-cli download" in msg


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """A non-finite loss at step 2 stops training with a message naming checkpoint-1, which loads."""
    real_ikl, calls = dipp.ikl_loss, []

    def ikl_nan_on_second_call(*args, **kwargs):
        calls.append(1)
        loss, grad = real_ikl(*args, **kwargs)  # dipp_step asks for (loss, ∂loss/∂x0)
        return (loss * float("nan") if len(calls) == 2 else loss), grad

    monkeypatch.setattr(dipp, "ikl_loss", ikl_nan_on_second_call)
    out = str(tmp_path)
    msg = error_of(["--tiny", "--reward", "none", "--max_train_steps", "3", "--checkpointing_steps", "1",
                    "--output_dir", out])
    assert "training stopped at step 2" in msg and "checkpoint-1" in msg
    assert plumbing.list_checkpoints(out) == [os.path.join(out, "checkpoint-1")]
    monkeypatch.setattr(dipp, "ikl_loss", real_ikl)
    dipp.main(["--tiny", "--reward", "none", "--max_train_steps", "2", "--output_dir", out,
               "--resume_from_checkpoint", "latest"])


def test_help_lists_every_flag(capsys):
    """--help names every Config field with its help text (the CLI is the dataclass), in the Config's groups,
    each default at most once, no empty choice, and one flag (plus the --tiny shorthand) for random weights."""
    with pytest.raises(SystemExit):
        dipp.parse_config(["--help"])
    text = capsys.readouterr().out
    for f in dipp.dataclasses.fields(dipp.Config):
        assert f"--{f.name}" in text, f.name
    titles = [line.split(" (")[0].rstrip(":") for line in text.splitlines() if re.fullmatch(r"[a-z].*:", line)]
    assert titles == ["options", "models", "method", "data", "optimisation", "bookkeeping", "modes"], titles
    for flag in re.split(r"\n  (?=--)", text.split("\n  --", 1)[1]):
        assert flag.count("(default") <= 1 and "(default: )" not in flag, flag
    assert "{," not in text and ",}" not in text and "--random_sd15" not in text


def test_flags_are_exact_and_a_typo_names_the_closest():
    """No silent abbreviations; an unknown flag is one line naming the closest real ones; a replaced flag
    names its replacement; several mistakes are all named in that line; --tiny is exactly --random_weights tiny."""
    cases = {("--max_train_stpes", "2"): "unknown flag --max_train_stpes; did you mean --max_train_steps?",
             ("--max_train_step", "2"): "unknown flag --max_train_step; did you mean --max_train_steps?",
             ("--random_sd15",): "--random_sd15 is now --random_weights sd15",
             ("--tiny", "--random_weights", "sd15"): "--tiny is short for --random_weights tiny",
             ("--random_weights", ""): "invalid choice",
             # every mistake at once, not the first of them
             ("--max_train_stpes", "2", "--seed", "one", "--compile", "fast", "--learning_rat", "1"):
                 "4 problems: argument --seed: invalid int value: 'one'; argument --compile: invalid choice: 'fast' "
                 "(choose from 'none', 'default', 'max-autotune-no-cudagraphs', 'reduce-overhead'); unknown flag "
                 "--max_train_stpes; did you mean --max_train_steps?; unknown flag --learning_rat; did you mean "
                 "--learning_rate or --fake_learning_rate?"}
    for argv, expected in cases.items():
        with pytest.raises(SystemExit) as e:
            dipp.parse_config(list(argv))
        assert str(e.value).startswith("dipp: error: ") and expected in str(e.value), (argv, str(e.value))
        assert "\n" not in str(e.value)
    assert dipp.parse_config(["--tiny"]).random_weights == "tiny" and dipp.parse_config([]).random_weights == ""


@pytest.fixture
def hub_probe(monkeypatch):
    """plumbing.hub_unreachable asked afresh, with HF_HUB_OFFLINE and the libraries' offline switches restored
    afterwards (an unreachable hub sets them for the rest of the process)."""
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("transformers.utils.hub", "_is_offline_mode"),
                              ("diffusers.utils.hub_utils", "HF_HUB_OFFLINE")):
        if hasattr(sys.modules.get(module), attribute):
            monkeypatch.setattr(sys.modules[module], attribute, getattr(sys.modules[module], attribute))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    plumbing.hub_unreachable.cache_clear()
    yield monkeypatch
    plumbing.hub_unreachable.cache_clear()


def test_model_locations_fail_fast_and_honestly(tmp_path, hub_probe):
    """A missing path that can only be local is one line at once: the hub is never asked, no download advice,
    a near name suggested. With no network a hub id that is not cached is one line saying the hub cannot be
    reached and what to download; a cached one passes. Everything missing (models, ImageReward, a prompt set) is
    named in one line. No failure leaves an output folder behind."""
    import socket
    import huggingface_hub.constants
    hub_probe.chdir(tmp_path)
    (tmp_path / "models" / "sd-15").mkdir(parents=True)
    asked = []

    def no_network(address, *args, **kwargs):
        asked.append(address)
        raise socket.gaierror(-2, "Name or service not known")
    hub_probe.setattr(socket, "create_connection", no_network)
    msg = error_of(["--pretrained_model_name_or_path", "models/sd15", "--reward", "none", "--output_dir", "run"])
    assert msg == "dipp: error: --pretrained_model_name_or_path 'models/sd15' does not exist; did you mean 'models/sd-15'?"
    assert not asked and not (tmp_path / "run").exists()
    hub_probe.setenv("HOME", str(tmp_path)), hub_probe.setenv("DIPP_CACHE", str(tmp_path / "cache"))
    msg = error_of(["--pretrained_model_name_or_path", "models/sd15", "--generator_init", "models/gen.bin",
                    "--prompts", "coco1k", "--output_dir", "run"])  # everything missing in one message
    assert msg.startswith("dipp: error: 4 problems") and "(1) --pretrained_model_name_or_path 'models/sd15'" in msg \
        and "--generator_init 'models/gen.bin' does not exist" in msg and "cannot load the ImageReward model" in msg \
        and "prompt set 'coco1k'" in msg and "\n" not in msg and not (tmp_path / "run").exists(), msg
    msg = error_of(["--output_dir", "run"])  # the default teacher, a hub id, with no network
    assert "hub cannot be reached (no connection to huggingface.co" in msg and "\n" not in msg
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
    assert asked == [("huggingface.co", 443)] and not (tmp_path / "run").exists()
    hub_probe.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "models--someone--cached" / "snapshots" / "0123").mkdir(parents=True)
    plumbing.check_model_location("someone/cached", "--flag")  # in the cache: loads offline, no error


def test_a_run_that_fails_before_step_1_leaves_no_folder(tmp_path, monkeypatch):
    """A failure inside step 1 (a simulated out-of-memory, after config.json, the step-0 log and grid exist)
    takes the fresh output folder with it, so the retry does not find 'another run' there; an SDXL run's prompt
    embeddings (text_embeddings/, written before step 1) go with it too."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(plumbing.SafeOptimizer, "step", out_of_memory)
    sd, clip = tiny_models()
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="out of memory"):
        dipp.main(["--pretrained_model_name_or_path", sd, "--reward", "clip", "--reward_model_path", clip,
                   "--max_train_steps", "1", "--output_dir", str(out)])
    assert not out.exists()
    with pytest.raises(RuntimeError, match="out of memory"):
        dipp.main(["--pretrained_model_name_or_path", tiny_sdxl_models()[0], "--reward", "none", "--max_train_steps",
                   "1", "--output_dir", str(out)])
    assert not out.exists()


def test_grid_captions_break_between_words():
    """Sample-grid captions wrap at word boundaries ('oil painting', never 'oil pa/inting') and mark a cut."""
    prompt = "a still life of apples and a jug, oil painting, in the style of an old Dutch master, warm light"
    lines = plumbing.wrap_caption(prompt, 40, 2).split("\n")
    assert len(lines) == 2 and all(len(line) <= 40 for line in lines) and lines[1].endswith(" ...")
    assert all(word in prompt.split() for line in lines for word in line.removesuffix(" ...").split())


def test_import_is_light():
    """`import dipp` pulls in neither diffusers, transformers nor ImageReward (the toy stays fast)."""
    import subprocess
    code = "import sys, dipp; print(any(m in sys.modules for m in ('diffusers', 'transformers', 'ImageReward')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- 2-D toy (toy/gmm.py)

sys.path.insert(0, os.path.join(HERE, "toy"))
import gmm as toy  # noqa: E402


def toy_mixture():
    return toy.GaussianMixture([[-1.5, 1], [1.5, 1], [0, -1]], [0.6, 0.4, 0.8], [1, 2, 1], [0, 0, 1])


def test_gmm_score_is_autograd_of_log_density():
    """The closed-form diffused score equals autograd of the closed-form log p_t(x|c), for each class
    and for the unconditional mixture (c = −1), at several t."""
    gmm, sched = toy_mixture(), dipp.Schedule.scaled_linear()
    torch.manual_seed(0)
    for c in (-1, 0, 1):
        x = (2 * torch.randn(64, 2)).requires_grad_(True)
        t = torch.randint(0, 1000, (64,))
        a, s = sched.alpha_sigma(t, 2)
        cc = torch.full((64,), c)
        (auto,) = torch.autograd.grad(gmm.log_prob_t(x, a, s, cc).sum(), x)
        assert torch.allclose(gmm.score_t(x.detach(), a, s, cc), auto, rtol=1e-4, atol=1e-5)


def test_gmm_log_density_integrates_to_one_and_class_posterior_normalises():
    """p(x|c) integrates to 1 on a grid, and exp log p_t(c|x) sums to one over classes."""
    gmm, sched = toy_mixture(), dipp.Schedule.scaled_linear()
    edges, grid = toy.grid_points(6.0, 300)
    cell = (edges[1] - edges[0]) ** 2
    for c in (0, 1):
        assert abs(gmm.density_grid(grid, c).sum().item() * cell - 1) < 1e-3
    x, t = 2 * torch.randn(100, 2), torch.randint(0, 1000, (100,))
    a, s = sched.alpha_sigma(t, 2)
    assert torch.allclose(gmm.log_p_class_t(x, a, s).exp().sum(1), torch.ones(100), atol=1e-5)


def test_cfg_implicit_reward_with_exact_densities():
    """With the exact mixture, −∇x0 of dipp.guidance_reward_loss equals autograd of
    w(t)·log p_t(c | α x0 + σ ε) computed from closed-form densities (METHOD.md §5)."""
    gmm, sched = toy_mixture(), dipp.Schedule.scaled_linear()
    torch.manual_seed(1)
    x0 = torch.randn(32, 2, requires_grad=True)
    c, t, eps = torch.randint(0, 2, (32,)), torch.randint(20, 981, (32,)), torch.randn(32, 2)
    teacher = gmm.eps_fn(sched)
    loss = dipp.guidance_reward_loss(x0, t, eps, sched, lambda x, tt: teacher(x, tt, c),
                                     lambda x, tt: teacher(x, tt, torch.full_like(c, -1)), "eps")
    (ours,) = torch.autograd.grad(loss.sum(), x0)
    a, s = sched.alpha_sigma(t, 2)
    r_cfg = dipp.ikl_weight("eps", a, s)[:, 0] * gmm.log_p_class_t(a * x0 + s * eps, a, s).gather(1, c[:, None])[:, 0]
    (exact,) = torch.autograd.grad(r_cfg.sum(), x0)
    assert torch.allclose(-ours, exact, rtol=1e-3, atol=1e-5)
    assert exact.abs().max() > 1e-2


def test_guidance_reward_loss_takes_every_weighting():
    """guidance_reward_loss runs with each w(t) of ikl_weight (dmd2 included: its normaliser is read from the
    conditional teacher's x̂0) and its x0-gradient is the hand-derived −w α (ε̂_∅ − ε̂_c)/σ."""
    sched = dipp.Schedule.scaled_linear()
    torch.manual_seed(2)
    x0 = torch.randn(6, 3, requires_grad=True)
    t, eps = torch.randint(20, 981, (6,)), torch.randn(6, 3)
    A, b = torch.randn(3, 3) / 3, torch.randn(3)  # two affine ε-predictors stand in for s_c and s_∅
    eps_cond, eps_null = (lambda x, tt: x @ A), (lambda x, tt: x @ A.T + b)
    a, s = sched.alpha_sigma(t, 2)
    x_t = (a * x0 + s * eps).detach()
    for weighting in ("x0", "eps", "dmd2"):
        loss = dipp.guidance_reward_loss(x0, t, eps, sched, eps_cond, eps_null, weighting)
        (ours,) = torch.autograd.grad(loss.sum(), x0)
        w = {"x0": s ** 2 / a ** 2, "eps": s / a}.get(weighting)
        if w is None:  # σ²/α² over mean_d |x0 − x̂0_c|, x̂0_c = (x_t − σ ε̂_c)/α
            w = s ** 2 / a ** 2 / (x0.detach() - (x_t - s * eps_cond(x_t, t)) / a).abs().mean(1, keepdim=True)
        expected = -w * a * (eps_null(x_t, t) - eps_cond(x_t, t)) / s
        assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6), weighting


def test_no_import_cycles():
    """The project's modules import one another one way only (plumbing at the bottom; families, promptsets,
    random_weights, rewards above it; dipp above them; cost, evaluate, the toys, reproduce on top): every import
    statement counts, the lazy ones inside functions too (`python dipp.py` once loaded itself a second time, as the
    module `dipp`, through cost.py)."""
    import ast
    files = {f[:-3]: os.path.join(HERE, d, f) for d in ("", "toy", "bench")
             for f in os.listdir(os.path.join(HERE, d)) if f.endswith(".py") and not f.startswith(("test_", "conftest"))}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        graph[name] = found & set(files) - {name}
    assert {"dipp", "plumbing", "cost", "gmm"} <= set(graph) and "plumbing" in graph["dipp"]

    def cycle_from(name, path):
        for dep in sorted(graph[name]):
            if dep in path:
                return path[path.index(dep):] + [dep]
            found = cycle_from(dep, path + [dep])
            if found:
                return found
    for name in sorted(graph):
        assert cycle_from(name, [name]) is None, " -> ".join(cycle_from(name, [name]))
    assert not graph["plumbing"], graph["plumbing"]  # the bottom layer imports no project module


@functools.lru_cache(maxsize=None)
def toy_quick(out=os.path.join(TMP, "dipp-test-toy")):
    """The results of `toy.run(["--quick", "--out", FIGURES])` as notebook 01 runs it under DIPP_TINY=1 (its
    results.json; its files copied to out): one quick run serves the notebook's test and the toy's."""
    import shutil
    nb = executed_notebook("01_toy")
    figures = os.path.join(HERE, "toy_out_notebook")  # the notebook's FIGURES
    assert os.path.getmtime(os.path.join(figures, "results.json")) >= nb.metadata["started"]  # this run's, not older
    shutil.copytree(figures, out, dirs_exist_ok=True)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["settings"]["quick"] and results["settings"]["out"] == os.path.relpath(figures, NOTEBOOK_DIR)
    return results


def test_toy_quick_recovery_lands_near_reference():
    """α_rew = 0, ω = 1: after the quick run the generator is within MMD² 0.05 of the exact reference
    (noise floor ≈ 0; the untrained generator scores ≈ 0.5) and each mode holds 50% ± 10%."""
    rec = toy_quick()["recovery"]
    assert rec["mmd"] < 0.05 and abs(rec["mmd_floor"]) < 0.005
    for got, want in zip(rec["mode_weights"], rec["true_mode_weights"]):
        assert abs(got - want) < 0.1


def test_toy_quick_sweep_trades_kl_for_reward():
    """Raising α_rew raises both the mean reward and KL(p_θ‖p_ref), and no point beats the exact
    optimal frontier (up to the histogram's bias, measured by the reference's own KL floor)."""
    res = toy_quick()
    sweep = sorted(res["tradeoff"], key=lambda s: s["reward_scale"])
    assert sweep[-1]["reward"] > sweep[0]["reward"] + 0.2
    assert sweep[-1]["kl"] > sweep[0]["kl"]
    front = res["frontier"]
    for s in sweep:  # best reward the frontier reaches at this KL (+ the KL estimator's bias)
        best = max(f["reward"] for f in front if f["kl"] <= s["kl"] + res["reference"]["kl_floor"])
        assert s["reward"] <= best + 0.05


def test_toy_writes_its_outputs():
    """The toy writes results.json, samples.npz and toy.png, and reports the CFG comparison."""
    toy_quick()
    for f in ("results.json", "samples.npz", "toy.png"):
        assert os.path.getsize(os.path.join(TMP, "dipp-test-toy", f)) > 0
    cfg = toy_quick()["cfg"]
    assert cfg["mmd_guided_vs_explicit"] < cfg["mmd_guided_vs_unguided"]


def test_toy_calls_dipp_losses(monkeypatch):
    """The toy trains through dipp.ikl_loss and dipp.fake_score_loss (no private copies)."""
    calls = {"ikl": 0, "dsm": 0}
    ikl, dsm = dipp.ikl_loss, dipp.fake_score_loss

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(dipp, "ikl_loss", counted("ikl", ikl))
    monkeypatch.setattr(dipp, "fake_score_loss", counted("dsm", dsm))
    args = toy.parse(["--steps", "3", "--k_ta", "2"])
    gmm, sched, reward = toy.build(args)
    toy.train(gmm, sched, args, 1.0, 2.0, lambda x0, c: reward(x0))
    assert calls == {"ikl": 3, "dsm": 6}


# ----------------------------------------------------------------------------- memory switches

def test_gradient_checkpointing_changes_memory_not_math(tmp_path):
    """One step with --gradient_checkpointing gives the same weights as without, and the reward
    tower's layers really run more often (recomputed in the backward pass)."""
    from transformers.models.clip import modeling_clip
    common = ["--tiny", "--max_train_steps", "1", "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3",
              "--reward_scale", "10"]
    original = modeling_clip.CLIPEncoderLayer.forward

    def run_counting(argv):
        calls = []

        def counting(self, *a, **k):
            calls.append(1)
            return original(self, *a, **k)

        modeling_clip.CLIPEncoderLayer.forward = counting
        try:
            return dipp.main(common + argv), len(calls)
        finally:
            modeling_clip.CLIPEncoderLayer.forward = original

    plain, n_plain = run_counting(["--output_dir", str(tmp_path / "a")])
    ckpt, n_ckpt = run_counting(["--output_dir", str(tmp_path / "b"), "--gradient_checkpointing"])
    for name in ("G", "fake"):
        a, b = plain[name].state_dict(), ckpt[name].state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert n_ckpt > n_plain > 0
    assert ckpt["G"].net.is_gradient_checkpointing and ckpt["fake"].is_gradient_checkpointing


def test_bf16_on_cpu_keeps_fp32_master_weights(tmp_path):
    """--mixed_precision bf16 runs on CPU: frozen nets are stored in bf16, trainable nets stay fp32."""
    nets = dipp.main(["--tiny", "--max_train_steps", "1", "--mixed_precision", "bf16", "--device", "cpu",
                      "--output_dir", str(tmp_path)])
    assert nets["teacher"].dtype == torch.bfloat16 and nets["vae"].dtype == torch.bfloat16
    assert nets["G"].net.dtype == torch.float32 and nets["fake"].dtype == torch.float32


def test_fp16_keeps_vae_in_fp32():
    """Under fp16 the VAE is kept in fp32 (its decoder overflows fp16), the other frozen nets in fp16."""
    _, unet, vae, text_encoder, _, _ = dipp.load_teacher(tiny_models()[0], torch.device("cpu"), torch.float16)
    assert vae.dtype == torch.float32 and unet.dtype == torch.float16 and text_encoder.dtype == torch.float16


def test_fresh_run_into_a_used_output_dir_stops_or_starts_clean(tmp_path):
    """A fresh run into a folder holding another run's checkpoints stops with one line (its keep-last-K
    policy would delete its own newest checkpoint and `latest` would name the old run); with
    --overwrite_output_dir it deletes that run first, so log.jsonl and the checkpoints are its own."""
    out = str(tmp_path)
    argv = ["--tiny", "--reward", "none", "--checkpointing_steps", "1", "--output_dir", out]
    dipp.main(argv + ["--max_train_steps", "4"])
    msg = error_of(argv + ["--max_train_steps", "1"])
    assert msg.startswith("dipp: error:") and "holds another run" in msg and "--overwrite_output_dir" in msg
    assert plumbing.list_checkpoints(out)[-1].endswith("checkpoint-4")  # nothing was touched
    dipp.main(argv + ["--max_train_steps", "1", "--overwrite_output_dir"])
    assert plumbing.list_checkpoints(out) == [os.path.join(out, "checkpoint-1")]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))] == [0, 1]


# ----------------------------------------------------------------------------- notebooks

NOTEBOOKS = ["01_toy", "02_sd15_one_gpu", "03_pixart_one_gpu"]


NOTEBOOK_DIR = os.path.join(HERE, "notebooks")


@functools.lru_cache(maxsize=None)
def executed_notebook(name):
    """notebooks/<name>.py executed top to bottom with DIPP_TINY=1, once per process (notebook 01's quick toy run
    is the one the toy's tests read: toy_quick)."""
    import jupytext
    import nbclient
    from filelock import FileLock
    nb = jupytext.read(os.path.join(NOTEBOOK_DIR, f"{name}.py"))
    nb.metadata["started"] = time.time()
    # (one notebook at a time per TMPDIR: a notebook writes its outputs to a fixed folder of the checkout)
    with FileLock(os.path.join(TMP, f"dipp-test-notebook-{name}.lock")), pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIPP_TINY", "1")
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
    return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_tiny_models(name, monkeypatch):
    """Each notebook executes top to bottom with DIPP_TINY=1 (tiny random models, CPU, offline)."""
    executed_notebook(name)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_ipynb_matches_its_source(name):
    """The committed .ipynb has the same cells as its jupytext .py source. 01 (the toy, real results on a
    CPU) is stored executed top to bottom with its figures, so it reads on a code host; 02 and 03 (GPU) are
    stored without outputs."""
    import jupytext
    py = jupytext.read(os.path.join(HERE, "notebooks", f"{name}.py"))
    nb = jupytext.read(os.path.join(HERE, "notebooks", f"{name}.ipynb"))
    assert [c.source for c in py.cells] == [c.source for c in nb.cells], "run: jupytext --sync notebooks/*.py"
    code = [c for c in nb.cells if c.cell_type == "code"]
    if name == "01_toy":  # re-execute: jupyter nbconvert --to notebook --execute --inplace notebooks/01_toy.ipynb
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
        outputs = [o for c in code for o in c.outputs]
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
        assert not any(o.output_type == "error" or "DIPP_TINY" in str(o) for o in outputs)
    else:
        assert all(not c.get("outputs") for c in nb.cells)


def test_notebooks_open_in_jupyterlab(tmp_path):
    """README's way to open the notebooks, `jupyter lab` (installed by requirements.txt), serves notebook 01
    with its stored figures."""
    import socket
    import subprocess
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    command = [os.path.join(os.path.dirname(sys.executable), "jupyter"), "lab", "--no-browser", "--ip", "127.0.0.1",
               "--port", str(port), "--IdentityProvider.token", "test", "--ServerApp.root_dir", HERE]
    server = subprocess.Popen(command + (["--allow-root"] if os.geteuid() == 0 else []), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api/contents/notebooks/01_toy.ipynb?token=test"
    try:
        for _ in range(240):
            try:
                nb = json.load(urllib.request.urlopen(url, timeout=5))
                break
            except OSError:
                assert server.poll() is None, "jupyter lab exited"
                time.sleep(0.25)
        else:
            raise AssertionError("jupyter lab did not answer within a minute")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert nb["type"] == "notebook"
    assert any("image/png" in o.get("data", {}) for c in nb["content"]["cells"] for o in c.get("outputs", []))


def test_notebooks_define_no_losses():
    """Notebooks import the method from dipp.py: no loss, sampler or training step is defined in one."""
    for name in NOTEBOOKS:
        src = open(os.path.join(HERE, "notebooks", f"{name}.py")).read()
        assert not re.search(r"def \w*(loss|step|sample)\w*\(", src), name


# ----------------------------------------------------------------------------- scale: DDP, benchmark, saves

def torchrun_two(*argv):
    """`torchrun --standalone --nproc_per_node 2 dipp.py *argv`: 2 CPU processes (gloo), one intra-op thread each;
    a failure shows the end of their output."""
    import subprocess
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "dipp.py", *argv], cwd=HERE,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def two_processes(*argv, timeout=600):
    """dipp.main(argv) in 2 CPU processes (gloo, one intra-op thread each) forked from this one, with the variables
    torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the exit dipp.py's __main__ makes
    (barrier, then the group torn down): the same code as torchrun_two without three fresh interpreters, each
    importing torch, diffusers and transformers (~8 CPU-seconds each, most of a tiny 2-process run's cost).
    test_two_process_ddp_equals_one_process_with_global_batch launches the real torchrun. A failure shows the end
    of both processes' output."""
    import socket
    import traceback
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs, pids = [os.path.join(tempfile.mkdtemp(prefix="dipp-test-rank-"), "out.txt") for _ in range(2)], []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                out = os.open(logs[rank], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(out, 1), os.dup2(out, 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                dipp.main(list(argv))
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
                code = 0
            except SystemExit as e:
                print(e)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    deadline, codes = time.time() + timeout, {}
    while len(codes) < 2:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            for pid in set(pids) - set(codes):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                codes[pid] = "killed after the time limit"
        time.sleep(0.05)
    output = "".join(open(log).read()[-1500:] for log in logs)
    assert all(codes[pid] == 0 for pid in pids), (codes, output)


def test_two_process_ddp_equals_one_process_with_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo) × batch 1 gives the same generator after 2 steps as one
    process with batch 2: the update differs by < 2% of its size (float summation order only), and the
    logged global-batch losses agree. The optimisers' moments after step 1 agree too: with Adam's β1 = 0 the
    weights step ±lr whatever the gradient's scale, and the losses are forward values, so only the moments
    (exp_avg = the step's averaged gradient) see a gradient averaged twice, or summed. Resuming the 2-process
    run from checkpoint-1 (in 2 processes forked by two_processes) gives checkpoint-2 bit for bit: each rank saved its own RNG state and restores it."""
    from safetensors.torch import load_file
    common = ["--tiny", "--max_train_steps", "2", "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3",
              "--reward_scale", "10"]
    launch = lambda *argv: torchrun_two(*common, "--train_batch_size", "1", *argv)
    launch("--output_dir", str(tmp_path / "ddp"), "--checkpointing_steps", "1")
    dipp.main(common + ["--train_batch_size", "2", "--output_dir", str(tmp_path / "one"), "--checkpointing_steps", "1"])
    weights = lambda run: load_file(str(tmp_path / run / "generator" / "diffusion_pytorch_model.safetensors"))
    ddp, one, init = weights("ddp"), weights("one"), load_file(
        str(tmp_path / "one" / "tiny" / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    diff, update = distance(one, ddp), distance(one, init)
    # Adam with β1 = 0 steps ±lr on every weight whatever its gradient's size, so a gradient that is zero up to
    # float rounding (batch 2 in one call vs two calls of 1) can flip its step: ~45 of 985k weights do, which is
    # 1.2-1.4 % of the update on one x86 CPU (the bound was 1 % when it was written on another).
    assert update > 0.1 and diff < 0.02 * update, (diff, update)
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")][1:] for run in ("ddp", "one")]
    for a, b in zip(*logs):
        for key in ("loss_fake", "loss_ikl", "reward"):
            assert abs(a[key] - b[key]) <= 1e-3 * (abs(b[key]) + 1e-3), (key, a[key], b[key])
    import shutil
    state = torch.load(tmp_path / "ddp" / "checkpoint-1" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # one RNG state per rank
    single = torch.load(tmp_path / "one" / "checkpoint-1" / "state.pt", weights_only=True)
    for name in ("opt_G", "opt_fake"):  # exp_avg = g and exp_avg_sq = (1 − β2) g² after one step (β1 = 0)
        for i, moments in single[name]["state"].items():
            moments = {k: moments[k] for k in ("exp_avg", "exp_avg_sq")}
            gap, size = distance(moments, state[name]["state"][i]), distance(moments, {k: 0 for k in moments})
            assert gap <= 1e-3 * size + 1e-12, (name, i, gap, size)
    shutil.copytree(tmp_path / "ddp" / "checkpoint-1", tmp_path / "resumed" / "checkpoint-1")
    two_processes(*common, "--train_batch_size", "1", "--output_dir", str(tmp_path / "resumed"),
                  "--resume_from_checkpoint", "latest")
    for name in ("generator", "fake_score"):
        a, b = (load_file(str(tmp_path / run / "checkpoint-2" / f"{name}.safetensors")) for run in ("ddp", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_two_fsdp_processes_train_like_one_and_their_checkpoint_resumes_in_two_or_one(tmp_path):
    """--shard fsdp on tiny SDXL (the family that needs it): 2 CPU processes (gloo) with an FSDP2-sharded generator
    and fake score × batch 1 train like one process × batch 2 (the DDP test's 2 % bound and reason; the same logged
    losses). Their checkpoint has the one-process layout: whole tensors, Adam states numbered as one process numbers
    them, holding the same moments. Resumed by 2 sharded processes it gives checkpoint-2 bit for bit; by one
    process × batch 2 (world 2 -> 1), a step within the same bound of that step's update."""
    import shutil
    from safetensors.torch import load_file
    flags = ["--random_weights", "tiny_sdxl", "--max_train_steps", "2", "--learning_rate", "1e-3",
             "--fake_learning_rate", "1e-3", "--reward_scale", "10", "--shard", "fsdp"]  # (one process: shards nothing)
    one, fsdp, init = ddp_and_one_process(tmp_path, "tiny_sdxl", "sdxl/unet", "--shard", "fsdp",
                                          "--checkpointing_steps", "1")
    diff, update = distance(one, fsdp), distance(one, init)
    assert update > 0.01 and diff < 0.02 * update, (diff, update)
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("ddp", "one")]
    assert len(logs[0]) == len(logs[1]) == 3 and "val_reward" in logs[0][0]  # validation ran on the sharded G
    for a, b in zip(*logs):
        for key in set(b) & {"loss_fake", "loss_ikl", "reward", "val_reward"}:
            assert abs(a[key] - b[key]) <= 1e-3 * (abs(b[key]) + 1e-3), (key, a[key], b[key])
    state = {run: torch.load(tmp_path / run / "checkpoint-1" / "state.pt", weights_only=True) for run in ("ddp", "one")}
    assert len(state["ddp"]["rng"]) == 2 and state["ddp"].keys() == state["one"].keys()
    for name in ("opt_G", "opt_fake"):
        sharded, single = state["ddp"][name], state["one"][name]
        assert sharded["param_groups"] == single["param_groups"] and sharded["state"].keys() == single["state"].keys()
        for i, moments in single["state"].items():  # exp_avg = the step's gradient (β1 = 0): equal to float rounding
            assert torch.equal(sharded["state"][i]["step"], moments["step"]), i
            moments = {k: moments[k] for k in ("exp_avg", "exp_avg_sq")}
            gap, size = distance(moments, sharded["state"][i]), distance(moments, {k: 0 for k in moments})
            assert gap <= 1e-3 * size + 1e-12, (name, i, gap, size)
    for name in ("generator", "fake_score"):
        assert load_file(tmp_path / "ddp" / "checkpoint-1" / f"{name}.safetensors").keys() == \
            load_file(tmp_path / "one" / "checkpoint-1" / f"{name}.safetensors").keys()
    for run in ("two", "single"):
        shutil.copytree(tmp_path / "ddp" / "checkpoint-1", tmp_path / run / "checkpoint-1")
    two_processes(*flags, "--train_batch_size", "1", "--output_dir", str(tmp_path / "two"), "--resume_from_checkpoint",
                  "latest")
    dipp.main(flags + ["--train_batch_size", "2", "--output_dir", str(tmp_path / "single"),
                       "--resume_from_checkpoint", "latest"])
    read = lambda run, step, name: load_file(tmp_path / run / f"checkpoint-{step}" / f"{name}.safetensors")
    for name in ("generator", "fake_score"):
        straight, two, single = read("ddp", 2, name), read("two", 2, name), read("single", 2, name)
        assert all(torch.equal(straight[k], two[k]) for k in straight), name
        diff, update = distance(straight, single), distance(straight, read("ddp", 1, name))
        assert update > 0.01 and diff < 0.02 * update, (name, diff, update)
    resumed = torch.load(tmp_path / "two" / "checkpoint-2" / "state.pt", weights_only=True)["opt_G"]["state"]
    straight = torch.load(tmp_path / "ddp" / "checkpoint-2" / "state.pt", weights_only=True)["opt_G"]["state"]
    assert all(torch.equal(straight[i][k], resumed[i][k]) for i in straight for k in straight[i])


def test_shard_keeps_fp32_masters_bf16_blocks_an_fp32_readout_and_saves_what_one_process_saves(tmp_path):
    """plumbing.shard in a one-process gloo group (FSDP2 runs the same code at any world size; there each shard is
    the whole tensor): under bf16 the blocks compute with bf16 copies of fp32 master shards and the readout with
    fp32 weights, within bf16 rounding of the unsharded UNet under bf16 autocast. After an Adam step the gathered
    weights and optimiser state are the shards' own values bit for bit, in the layout a plain optimiser's
    state_dict has; that state loads back into a fresh sharded optimiser exactly; the exported folder holds the
    gathered weights, and the step agrees with the unsharded UNet's to float rounding (FSDP sums some gradients in
    another order). Gradient checkpointing leaves the sharded gradients bit for bit as they are."""
    import copy
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel
    fam, unet = families.FAMILIES["sd"], families.readout_in_fp32(tiny_unet(), families.FAMILIES["sd"])
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)  # x_t, t, text states
    shard = lambda dtype: plumbing.shard(copy.deepcopy(unet), fam.shard_units, fam.readout, dtype)
    local = lambda v: v.to_local() if hasattr(v, "to_local") else v  # a DTensor's shard: here the whole tensor
    equal = lambda a, b: a.keys() == b.keys() and all(torch.equal(local(a[k]), local(b[k])) for k in a)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        low, seen = shard(torch.bfloat16), {}
        for name in ("conv_in", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "conv_out"):
            low.get_submodule(name).register_forward_pre_hook(lambda m, i, n=name: seen.update({n: m.weight.dtype}))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = low(x, t, c).sample, unet(x, t, c).sample
        assert list(seen.values()) == [torch.bfloat16, torch.bfloat16, torch.float32], seen
        assert out.dtype == torch.float32 and (out - ref).abs().max() <= 0.02 * ref.abs().max()
        low.reshard()
        assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in low.parameters())
        nets = {"plain": copy.deepcopy(unet), "sharded": shard(torch.float32)}
        opts = {k: torch.optim.AdamW(plumbing.trainable(n), lr=1e-3, betas=(0.0, 0.999)) for k, n in nets.items()}
        for k, net in nets.items():
            net(x, t, c).sample.pow(2).mean().backward()
            opts[k].step()
        weights = plumbing.full_weights(nets["sharded"])
        assert equal(weights, dict(nets["sharded"].named_parameters()))
        plain, start = plumbing.full_weights(nets["plain"]), unet.state_dict()
        diff, update = distance(plain, weights), distance(plain, start)
        assert diff < 0.02 * update, (diff, update)
        own, single = opts["sharded"].state_dict(), opts["plain"].state_dict()
        gathered = plumbing.full_optimizer_state(opts["sharded"], plumbing.owner(opts["sharded"], nets))
        fresh_net = shard(torch.float32)
        fresh = torch.optim.AdamW(plumbing.trainable(fresh_net), lr=0.5)
        plumbing.load_full_optimizer_state(fresh, fresh_net, gathered)
        for state in (gathered, plumbing.full_optimizer_state(fresh, fresh_net)):
            assert state["param_groups"] == own["param_groups"] == single["param_groups"]
            assert state["state"].keys() == single["state"].keys()
            assert all(equal(state["state"][i], own["state"][i]) for i in own["state"])
            assert all(state["state"][i][k].shape == v.shape for i, s in single["state"].items() for k, v in s.items())
        plumbing.export_generator(nets["sharded"], 999, str(tmp_path / "generator"))
        exported = UNet2DConditionModel.from_pretrained(tmp_path / "generator").state_dict()
        assert equal(exported, plumbing.full_weights(nets["sharded"], trained_only=False))
        grads, calls = [], []  # diffusers' gradient checkpointing re-runs blocks inside FSDP2's gathers: same gradients
        for checkpointing in (False, True):
            net = copy.deepcopy(unet).train()
            if checkpointing:
                net.enable_gradient_checkpointing()
            net = plumbing.shard(net, fam.shard_units, fam.readout, torch.float32)
            net.get_submodule("down_blocks.1.resnets.0").register_forward_pre_hook(lambda *_: calls.append(1))
            net(x, t, c).sample.pow(2).mean().backward()
            net.reshard()
            grads.append({n: p.grad for n, p in net.named_parameters()})
        assert equal(*grads) and len(calls) == 3  # (the checkpointed block ran twice: forward, then recomputed)
    finally:
        dist.destroy_process_group()


def test_benchmark_prints_one_parseable_line(tmp_path, capsys):
    """--benchmark runs the real training step and prints one BENCHMARK json line with positive numbers;
    it writes no checkpoint or generator."""
    dipp.main(["--tiny", "--benchmark", "--max_train_steps", "4", "--output_dir", str(tmp_path)])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("BENCHMARK ")]
    assert len(lines) == 1
    result = json.loads(lines[0][len("BENCHMARK "):])
    for key in ("images_per_s", "s_per_generator_update", "s_per_fake_update", "peak_memory_gib", "warmup_s"):
        assert result[key] > 0, key
    assert result["iterations"] == 2 and result["memory_kind"] == "cpu_rss"
    assert not os.path.exists(tmp_path / "generator") and not plumbing.list_checkpoints(str(tmp_path))
    assert set(os.listdir(tmp_path)) == {"tiny"}  # no config.json, log, grid or curves either: only the models
    # FLOPs of the run's first iteration, counted as it ran: cost.py's count of the same setup on the meta device,
    # plus the CLIP reward's text features of the drawn prompt (≤ 77 tokens; cached afterwards, and by cost.py)
    import cost
    meta = cost.iteration_flops("tiny", reward="clip", guidance_scale=1.75)
    reward = cost.meta_models("tiny", dipp.Config(reward="clip"))["reward"]
    assert meta < result["flop_per_iteration"] <= meta + cost.count_flops(lambda: reward.terms[0][2].encode_text(["a"]))
    assert result["achieved_tflop_per_s"] == pytest.approx(result["flop_per_iteration"] / 1e12 * result["images_per_s"],
                                                           rel=1e-2)  # batch 1: images/s = iterations/s (rounded)
    assert result["peak_tflop_per_s"] is None and result["fraction_of_peak"] is None  # a CPU has no datasheet peak


def test_sd15_shapes_match_stable_diffusion():
    """The --random_sd15 UNet config has SD1.5's 859.52M parameters (built on the meta device, no memory)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**random_weights.SHAPES["sd15"]["unet"])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == 859.52


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A crash in the middle of writing checkpoint-2 leaves checkpoint-1 intact and resumable."""
    out = str(tmp_path)
    argv = ["--tiny", "--reward", "none", "--checkpointing_steps", "1", "--output_dir", out]
    dipp.main(argv + ["--max_train_steps", "1"])
    real_save = torch.save

    def killed(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        dipp.main(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    monkeypatch.setattr(torch, "save", real_save)
    assert plumbing.list_checkpoints(out) == [os.path.join(out, "checkpoint-1")]
    nets = dipp.main(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert plumbing.list_checkpoints(out)[-1].endswith("checkpoint-2") and nets["G"] is not None


def test_lora_mode_trains_adapters_on_one_shared_frozen_base(tmp_path):
    """--lora_rank: generator and fake-score adapters change, the shared base UNet stays bit-identical
    to the teacher file, and the merged export is a plain diffusers UNet that predicts exactly what the
    adapter-carrying generator predicts."""
    from diffusers import UNet2DConditionModel
    out = str(tmp_path)
    nets = dipp.main(["--tiny", "--lora_rank", "4", "--max_train_steps", "2", "--learning_rate", "1e-2",
                      "--fake_learning_rate", "1e-2", "--reward_scale", "10", "--output_dir", out])
    G, fake, teacher = nets["G"].net, nets["fake"], nets["teacher"]
    assert G.conv_in.weight is teacher.conv_in.weight and fake.conv_in.weight is teacher.conv_in.weight
    assert same_weights(teacher, read_unet_from(os.path.join(out, "tiny", "sd")))
    lora = lambda m: {k: v for k, v in m.state_dict().items() if "lora_B" in k}
    assert lora(G) and all(v.abs().sum() > 0 for v in lora(G).values())  # B starts at 0: it moved
    assert lora(fake) and any(v.abs().sum() > 0 for v in lora(fake).values())
    merged = UNet2DConditionModel.from_pretrained(os.path.join(out, "generator"))
    assert not any("lora" in k for k in merged.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.allclose(merged(x, t, encoder_hidden_states=c).sample, G(x, t, encoder_hidden_states=c).sample,
                              atol=1e-4)
    resumed = dipp.main(["--tiny", "--lora_rank", "4", "--max_train_steps", "3", "--output_dir", out,
                         "--resume_from_checkpoint", "latest"])  # adapter-only checkpoints resume
    assert resumed["G"].net.conv_in.weight is resumed["teacher"].conv_in.weight


def test_resume_with_wrong_lora_rank_is_a_clear_error(tmp_path):
    """A checkpoint from a LoRA run does not silently load into a full fine-tuning run."""
    out = str(tmp_path)
    dipp.main(["--tiny", "--reward", "none", "--lora_rank", "4", "--max_train_steps", "1", "--output_dir", out])
    msg = error_of(["--tiny", "--reward", "none", "--max_train_steps", "2", "--output_dir", out,
                    "--resume_from_checkpoint", "latest"])
    assert "--lora_rank" in msg and "does not match" in msg


def test_benchmark_sweep_runs_every_setup(tmp_path, monkeypatch):
    """bench/sweep.py (the prepared GPU script) runs full / checkpointing / LoRA (+ a speed switch) in one
    process on tiny models and writes a row with positive throughput for each, appended to results.jsonl
    as it goes, plus a markdown table; a configuration that fails is recorded and the sweep goes on."""
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import sweep
    real_main = dipp.main

    def fails_with_lora(argv):
        if "--lora_rank" in argv:
            raise RuntimeError("simulated failure")
        return real_main(argv)

    rows = sweep.main(["--tiny", "--batches", "1", "--steps", "3", "--out", str(tmp_path), "--setups", "table",
                       "full+reuse"])
    assert [r["setup"] for r in rows] == sweep.GROUPS["table"] + ["full+reuse"]
    assert all(r["images_per_s"] > 0 and r["peak_memory_gib"] > 0 for r in rows)
    assert rows[2]["lora_rank"] == 64 and rows[1]["gradient_checkpointing"] and rows[3]["reuse_generator_sample"]
    assert (tmp_path / "table.md").read_text().count("\n") == 2 + len(rows)
    monkeypatch.setattr(dipp, "main", fails_with_lora)
    rows = sweep.main(["--tiny", "--batches", "1", "--steps", "3", "--out", str(tmp_path), "--setups",
                       "lora64+checkpointing", "full+tinydecoder", "--profile"])
    assert "simulated failure" in rows[0]["error"] and rows[1]["images_per_s"] > 0
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6
    assert "aten::" in (tmp_path / "profile_full+tinydecoder_b1.txt").read_text()  # bench/gpu.sh profile


def test_reuse_generator_sample_is_alg1_with_a_shared_z(tmp_path, monkeypatch):
    """--reuse_generator_sample: the fake-score update trains on the generator update's own sample. That
    must equal plain Alg. 1 run with the fake update's z forced equal to the generator update's z (same θ,
    same order of updates): identical weights after 2 steps, with one generator forward per step, not two."""
    real_draw = dipp.draw_noise
    z_fixed = {}

    def same_z(B, z_shape, *a, **k):  # every draw gets one fixed z; t and ε come from the usual stream
        z, t, eps = real_draw(B, z_shape, *a, **k)
        return z_fixed.setdefault(z.shape, torch.randn(z.shape, generator=torch.Generator().manual_seed(1))), t, eps

    monkeypatch.setattr(dipp, "draw_noise", same_z)
    calls = {}
    real_forward = dipp.OneStepGenerator.forward

    def counted(self, z, cond):
        calls[run] = calls.get(run, 0) + 1
        return real_forward(self, z, cond)

    monkeypatch.setattr(dipp.OneStepGenerator, "forward", counted)
    nets = {}
    for run, extra in (("alg1", []), ("reuse", ["--reuse_generator_sample"])):
        nets[run] = dipp.main(["--tiny", "--benchmark", "--max_train_steps", "2", "--learning_rate", "1e-3",
                               "--fake_learning_rate", "1e-3", "--output_dir", str(tmp_path / run)] + extra)
    assert calls == {"alg1": 4, "reuse": 2}
    for net in ("G", "fake"):
        assert same_weights(nets["alg1"][net], nets["reuse"][net]), net
    assert not same_weights(nets["alg1"]["G"], nets["alg1"]["teacher"].float())  # the runs did train


def test_compile_is_the_same_math_and_keeps_checkpoints_loadable(tmp_path, monkeypatch):
    """--compile: every network is compiled in place (parameter names unchanged), 2 steps give the eager
    weights up to float rounding (< 1 % of the update; measured 0.10 % for G: fused kernels round
    differently, and Adam with β1 = 0 turns a rounding-sized gradient into a full-size step where the
    gradient is near 0), and its checkpoint resumes in an eager run.
    The test compiles with torch's aot_eager backend (the same graph capture, no C++ build); the default
    inductor backend passes the same check on this CPU (difference 0.044 % of the update for G, 0.004 %
    for ψ) but compiles for 5 minutes."""
    monkeypatch.setattr(plumbing, "COMPILE_BACKEND", "aot_eager")
    common = ["--tiny", "--max_train_steps", "2", "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3",
              "--checkpointing_steps", "1"]
    eager = dipp.main(common + ["--output_dir", str(tmp_path / "eager")])
    compiled = dipp.main(common + ["--compile", "default", "--output_dir", str(tmp_path / "compiled")])
    for net in (compiled["G"].net, compiled["fake"], compiled["teacher"], compiled["vae"].decoder,
                compiled["reward"].tower):
        assert net._compiled_call_impl is not None
    teacher = eager["teacher"].state_dict()  # θ0 = ψ0 = the teacher
    for net in ("G", "fake"):
        a, b = eager[net].state_dict(), compiled[net].state_dict()
        assert a.keys() == b.keys()
        diff, update = distance(a, b), distance(a, {k: teacher[k.removeprefix("net.")] for k in a})
        assert update > 0.1 and diff < 1e-2 * update, (net, float(diff / update))
    resumed = dipp.main(common[:1] + ["--max_train_steps", "3", "--output_dir", str(tmp_path / "compiled"),
                                      "--resume_from_checkpoint", "latest"])
    assert resumed["G"].net._compiled_call_impl is None


def test_ema_export_is_the_exponential_average(tmp_path):
    """--ema_decay d: after one step the exported generator is d·θ0 + (1−d)·θ1, with θ0 the teacher file
    and θ1 the raw weights in the checkpoint; resuming restores the EMA (2 straight = 1 + resume + 1)."""
    from safetensors.torch import load_file
    common = ["--tiny", "--reward", "none", "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3",
              "--ema_decay", "0.75", "--checkpointing_steps", "1"]
    out = tmp_path / "a"
    dipp.main(common + ["--max_train_steps", "1", "--output_dir", str(out)])
    theta0 = load_file(str(out / "tiny" / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    theta1 = load_file(str(out / "checkpoint-1" / "generator.safetensors"))
    exported = load_file(str(out / "generator" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(theta0[k], theta1[k]) for k in theta1)
    for k in theta1:
        assert torch.allclose(exported[k], 0.75 * theta0[k] + 0.25 * theta1[k], atol=1e-6), k
    straight = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "b")])
    resumed = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(out), "--resume_from_checkpoint",
                                  "latest"])
    ema = lambda run: load_file(str(run / "generator" / "diffusion_pytorch_model.safetensors"))
    a, b = ema(tmp_path / "b"), ema(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert same_weights(straight["G"].net, resumed["G"].net)  # G itself keeps the raw weights


# ----------------------------------------------------------------------------- the objective as documented

def tiny_sd_nets(seed=0):
    """Generator, teacher and a fake score that differs from it (so the IKL gradient is not zero)."""
    teacher, fake = tiny_unet(seed), tiny_unet(seed + 1)
    net = families.readout_in_fp32(read_unet("unet"), families.FAMILIES["sd"]).train()
    G = dipp.OneStepGenerator(net, families.FAMILIES["sd"], dipp.Schedule.scaled_linear(), 999)
    return G, dipp.denoiser_eps(teacher, families.FAMILIES["sd"]), dipp.denoiser_eps(fake, families.FAMILIES["sd"])


def generator_update(G_c, teacher_eps_c, fake_eps_c, reward_c, params, optimizer, scaler, noise, schedule, cfg):
    """The generator half of dipp.dipp_step alone (no fake-score noise given, so no fake-score update): its stats.
    Each p.grad is left as the optimizer step saw it (SafeOptimizer frees the gradients after stepping)."""
    opt = dipp.Optimizers(fake=None, G=plumbing.SafeOptimizer(params, optimizer, scaler, cfg.max_grad_norm))
    seen = {}
    hook = optimizer.register_step_pre_hook(lambda *_: seen.update({id(p): p.grad for p in params}))
    stats = dipp.dipp_step(dipp.Bound(G_c, teacher_eps_c, fake_eps_c, reward_c), opt, [noise], schedule, cfg)
    hook.remove()
    for p in params:
        p.grad = seen.get(id(p))
    return stats


def safe_step(loss, params, optimizer, scaler, max_grad_norm):
    """One step as dipp.dipp_step takes it (zero_grad, scaled backward, SafeOptimizer.step): (scale used, skipped)."""
    opt = plumbing.SafeOptimizer(params, optimizer, scaler, max_grad_norm)
    opt.zero_grad()
    opt.scaler.scale(loss).backward()
    skipped = opt.step(loss)
    return opt.loss_scale, skipped


def test_default_generator_update_keeps_w_of_t_at_batch_1():
    """With the default flags the gradient that reaches Adam scales with w(t): at batch 1 the x0 and eps
    weightings (σ²/α² vs σ/α) give gradients whose norms differ by exactly σ_t/α_t. A clip of the summed
    IKL gradient to a fixed norm (the old default, 1.0) made both unit-norm and cancelled w(t)."""
    import copy
    cond = torch.randn(1, 77, 32)
    G0, real, fake = tiny_sd_nets()
    t = torch.tensor([900])
    noise = (torch.randn(1, 4, 8, 8), t, torch.randn(1, 4, 8, 8))
    norms = {}
    for weighting in ("x0", "eps"):
        G = copy.deepcopy(G0)
        cfg = dipp.Config(reward="none", ikl_weighting=weighting)
        opt = torch.optim.AdamW(G.parameters(), lr=1e-5)
        generator_update(lambda z: G(z, cond), lambda x, t: real(x, t, cond), lambda x, t: fake(x, t, cond),
                            None, list(G.parameters()), opt, torch.amp.GradScaler("cpu", enabled=False),
                            noise, G.schedule, cfg)
        norms[weighting] = torch.cat([p.grad.flatten() for p in G.parameters()]).norm()  # what Adam stepped on
    alpha, sigma = (v.item() for v in G0.schedule.alpha_sigma(t, 1))
    assert norms["eps"] > 1.0  # far above a clip of 1: clipping would have decided the step
    assert abs(norms["x0"] / norms["eps"] / (sigma / alpha) - 1) < 1e-4, (norms, sigma / alpha)


def test_reward_gradient_is_zero_on_pixels_the_saved_image_clips():
    """Decoded pixels outside [-1, 1] are clipped in the saved PNG, so the reward must not see or reward
    them: their gradient is exactly 0, while in-range pixels get gradient."""
    from transformers import CLIPModel, CLIPTokenizer
    clip = tiny_models()[1]
    fn = rewards.ClipRewardFn(CLIPModel.from_pretrained(clip).eval(), CLIPTokenizer.from_pretrained(clip))
    images = (1.6 * torch.randn(2, 3, 24, 24)).requires_grad_(True)  # ~47 % of pixels outside [-1, 1]
    fn(images, ["a fox", "a red bicycle"]).sum().backward()
    outside = images.detach().abs() > 1
    assert outside.float().mean() > 0.3
    assert images.grad[outside].abs().max() == 0
    assert (images.grad[~outside] != 0).float().mean() > 0.5


def test_generator_readout_is_fp32_under_bf16_autocast():
    """ε̂ of the generator (and of teacher and fake score) leaves the UNet in fp32 under bf16 autocast: the
    readout x0 = (z − σ ε̂)/α amplifies its rounding 14.6× at t* = 999."""
    G, _, _ = tiny_sd_nets()
    seen = []
    G.net.register_forward_hook(lambda m, i, out: seen.append(out.sample.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0 = G(torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32))
    assert seen == [torch.float32] and x0.dtype == torch.float32
    _, teacher, vae, *_ = dipp.load_teacher(tiny_models()[0], torch.device("cpu"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher(torch.randn(1, 4, 8, 8).bfloat16(), torch.tensor([999]), encoder_hidden_states=torch.randn(1, 77, 32).bfloat16())
    assert out.sample.dtype == torch.float32


def test_loss_scaler_skips_are_reported_and_its_state_survives_resume(tmp_path):
    """SafeOptimizer.step reports a step that fp16's GradScaler skipped (overflow) and the scale it used; the
    scalers' state is saved in the checkpoint and restored on resume (it restarted at 65,536 before)."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scale, skipped = safe_step((w * 1e35).sum(), [w], opt, scaler, 0)  # 1e35 × 65536 overflows fp32
    assert skipped and scale == 2.0 ** 16 and scaler.get_scale() == 2.0 ** 15 and torch.equal(w.data, torch.ones(3))
    scale, skipped = safe_step(w.sum(), [w], opt, scaler, 0)
    assert not skipped and torch.allclose(w.data, torch.full((3,), 0.9))
    # the checkpoint round trip, through the real save/load with a tiny generator
    G, _, _ = tiny_sd_nets()
    fake = read_unet("unet")
    cfg = dipp.Config(output_dir=str(tmp_path), resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    states = {"scaler_G": scaler, "opt_G": opt}
    plumbing.save_checkpoint(cfg, 3, {"generator": G.net, "fake_score": fake}, G.t_star, states,
                             rng=plumbing.rng_states(torch.device("cpu"), 1))
    fresh = {"scaler_G": torch.amp.GradScaler("cpu"), "opt_G": torch.optim.SGD([w], lr=0.1)}
    assert plumbing.load_checkpoint(cfg, {"generator": G.net, "fake_score": fake}, fresh) == 3
    assert fresh["scaler_G"].get_scale() == 2.0 ** 15


def test_skipped_steps_are_counted_in_the_log(tmp_path, monkeypatch):
    """Every generator / fake-score step that the loss scaler skipped is counted in log.jsonl (fp16)."""
    real = plumbing.SafeOptimizer.step
    calls = []

    def skip_second(self, loss):
        calls.append(1)
        real(self, loss)
        return len(calls) == 2  # the 2nd update (step 1's generator update) is reported as skipped

    monkeypatch.setattr(plumbing.SafeOptimizer, "step", skip_second)
    monkeypatch.setattr(dipp.torch.amp.GradScaler, "is_enabled", lambda self: True)
    monkeypatch.setattr(dipp.torch.amp.GradScaler, "get_scale", lambda self: 1.0)
    dipp.main(["--tiny", "--reward", "none", "--max_train_steps", "2", "--output_dir", str(tmp_path)])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")][1:]
    assert [(r["skipped_G"], r["skipped_fake"]) for r in log] == [(1, 0), (1, 0)]


def test_draw_noise_keeps_only_this_ranks_slice():
    """Each rank keeps a copy of its slice of the global batch, not a view that pins world-sized tensors."""
    cfg = dipp.Config()
    z, t, eps = dipp.draw_noise(2, (4, 8, 8), (4, 8, 8), cfg, "cpu", rank=1, world=64)
    assert z.untyped_storage().nbytes() == z.nbytes and eps.untyped_storage().nbytes() == eps.nbytes
    torch.manual_seed(0)
    z1, t1, e1 = dipp.draw_noise(2, (4,), (4,), cfg, "cpu", rank=1, world=3)
    torch.manual_seed(0)
    z_all, t_all, e_all = dipp.draw_noise(6, (4,), (4,), cfg, "cpu")
    assert torch.equal(z1, z_all[2:4]) and torch.equal(t1, t_all[2:4]) and torch.equal(e1, e_all[2:4])


def test_device_flags_that_cannot_hold_are_one_line(tmp_path, monkeypatch):
    """--device naming a GPU this machine lacks, and --device cuda:N under torchrun (which would have
    trained on the CPU with gloo), each end in one line before anything is loaded."""
    msg = error_of(["--tiny", "--device", "cuda:3", "--output_dir", str(tmp_path)])
    assert msg.startswith("dipp: error: --device cuda:3") and "CUDA device" in msg
    assert error_of(["--tiny", "--device", "gpu", "--output_dir", str(tmp_path)]).startswith("dipp: error: --device 'gpu'")
    monkeypatch.setenv("WORLD_SIZE", "2")
    msg = error_of(["--tiny", "--device", "cuda:1", "--output_dir", str(tmp_path)])
    assert "under torchrun" in msg and "CUDA_VISIBLE_DEVICES" in msg


# ----------------------------------------------------------------------------- runs that explain themselves

def test_gradient_split_equals_autograd_of_each_term():
    """dipp_step's grad_ikl (closed form) and grad_reward (total ∂L/∂x0 from backward minus the IKL
    part) equal the per-sample RMS of autograd's gradient of each term taken separately."""
    import copy
    torch.manual_seed(0)
    cond = torch.randn(2, 77, 32)
    G, real, fake = tiny_sd_nets()
    reward = lambda x0: (x0.flatten(1) * torch.linspace(-1, 1, x0[0].numel())).mean(1).sin()  # (B,), nonlinear
    noise = (torch.randn(2, 4, 8, 8), torch.tensor([300, 950]), torch.randn(2, 4, 8, 8))
    cfg = dipp.Config(reward_scale=30.0, ikl_weighting="eps")
    real_c, fake_c = (lambda x, t: real(x, t, cond)), (lambda x, t: fake(x, t, cond))
    ref = copy.deepcopy(G)
    x0 = ref(noise[0], cond)
    g_ikl, = torch.autograd.grad(dipp.ikl_loss(x0, noise[1], noise[2], G.schedule, real_c, fake_c, "eps").sum(), x0)
    g_rew, = torch.autograd.grad(dipp.reward_loss(reward(x0), cfg.reward_scale).sum(), x0)
    per_sample_rms = lambda g: g.flatten(1).pow(2).mean(1).sqrt().mean()
    stats = generator_update(lambda z: G(z, cond), real_c, fake_c, reward, list(G.parameters()),
                                torch.optim.AdamW(G.parameters(), lr=1e-5), torch.amp.GradScaler("cpu", enabled=False),
                                noise, G.schedule, cfg)
    assert per_sample_rms(g_ikl) > 0 and per_sample_rms(g_rew) > 0
    assert torch.allclose(stats["grad_ikl"], per_sample_rms(g_ikl), rtol=1e-4)
    assert torch.allclose(stats["grad_reward"], per_sample_rms(g_rew), rtol=1e-3)


def test_held_out_reward_is_the_reward_of_fixed_noise_by_hand(tmp_path):
    """The val_reward logged at step 0 is the mean (and population std) of the reward of g_θ(z_i, c_i) on the
    validation prompts, with z_i drawn from torch.Generator().manual_seed(seed), recomputed here by hand."""
    out = tmp_path / "run"
    prompts = ["a green teapot", "two cats on a sofa", "a bridge in fog"]
    (tmp_path / "val.txt").write_text("\n".join(prompts) + "\n")
    nets = dipp.main(["--tiny", "--max_train_steps", "1", "--validation_prompts", str(tmp_path / "val.txt"),
                      "--output_dir", str(out), "--seed", "3", "--train_batch_size", "2"])
    logged = json.loads(open(out / "log.jsonl").readline())
    G0 = dipp.OneStepGenerator(nets["teacher"], nets["family"], nets["schedule"], 999)  # step 0: the generator is the teacher
    z = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = nets["family"].encode(nets["tokenizer"], nets["text_encoder"], prompts)
        r = nets["reward"](dipp.decode(nets["vae"], G0(z, cond)), prompts)
    assert logged["step"] == 0
    assert abs(logged["val_reward"] - r.mean().item()) < 1e-5
    assert abs(logged["val_reward_std"] - r.std(unbiased=False).item()) < 1e-5
    assert os.path.isfile(out / "curves.png") and os.path.isfile(out / "samples_0000.png")


def test_interrupt_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT during step 2 (sent to this process): the step finishes, checkpoint-2 is written, the run
    exits with 130; resuming to step 3 equals a straight 3-step run bit for bit."""
    import signal
    common = ["--tiny", "--reward", "none", "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3",
              "--checkpointing_steps", "100", "--max_train_steps", "3"]
    straight = dipp.main(common + ["--output_dir", str(tmp_path / "a")])
    real, calls = dipp.dipp_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, as a Ctrl-C would
        return real(*args, **kwargs)

    monkeypatch.setattr(dipp, "dipp_step", interrupted)
    with pytest.raises(SystemExit) as e:
        dipp.main(common + ["--output_dir", str(tmp_path / "b")])
    assert e.value.code == 130 and plumbing.list_checkpoints(str(tmp_path / "b"))[-1].endswith("checkpoint-2")
    monkeypatch.setattr(dipp, "dipp_step", real)
    resumed = dipp.main(common + ["--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    assert same_weights(straight["G"].net, resumed["G"].net) and same_weights(straight["fake"], resumed["fake"])
    assert [json.loads(l)["step"] for l in open(tmp_path / "b" / "log.jsonl")] == [0, 1, 2, 3]


def test_sigterm_to_a_running_training_process_checkpoints_it(tmp_path):
    """A cluster's SIGTERM to `python dipp.py`: it finishes its step, writes checkpoint-N, says how to
    resume, and exits with 143."""
    import signal
    import subprocess
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "dipp.py", "--tiny", "--reward", "none", "--max_train_steps", "100000",
                             "--checkpointing_steps", "100000", "--output_dir", str(out)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    steps = [json.loads(l)["step"] for l in log.read_text().splitlines()]
    assert proc.returncode == 143, err[-2000:]
    assert plumbing.list_checkpoints(str(out)) == [str(out / f"checkpoint-{steps[-1]}")]
    assert "--resume_from_checkpoint latest" in err


def write_unet_weights(unet, path):
    """The same weights as a diffusers folder, a .safetensors file and a torch .bin state dict."""
    from safetensors.torch import save_file
    unet.save_pretrained(path / "folder")
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(sd, str(path / "unet.safetensors"))
    torch.save(sd, path / "unet.bin")


def test_generator_init_from_a_weight_file_equals_the_folder(tmp_path):
    """--generator_init takes a UNet weight file (as DMD2 releases its one-step SD1.5 generator) on the
    teacher's config: .safetensors and .bin give exactly the generator the folder form gives."""
    unet = tiny_unet(5)
    write_unet_weights(unet, tmp_path)
    teacher, *_, schedule = dipp.load_teacher(tiny_models()[0], torch.device("cpu"), torch.float32)[1:]
    build = lambda init: dipp.build_generator(dipp.Config(generator_init=str(init)), teacher, families.FAMILIES["sd"], schedule,
                                              torch.device("cpu"))
    folder = build(tmp_path / "folder")
    assert same_weights(folder.net, unet)
    for name in ("unet.safetensors", "unet.bin"):
        assert same_weights(build(tmp_path / name).net, folder.net), name


def test_the_fake_score_starts_from_the_teacher_not_the_generator_init(tmp_path):
    """s_ψ is initialised from the reference s_ref (Diff-Instruct, DMD2: the fake score starts = teacher, so the
    IKL starts at 0 for the teacher's own samples), also when the generator starts elsewhere (--generator_init, a
    UNet of other weights): after one step at a fake learning rate far below float resolution (1e-30) the fake
    score holds the teacher's weights, not the init's."""
    unet = tiny_unet(5)  # the teacher's config, other weights
    write_unet_weights(unet, tmp_path)
    sd, _ = tiny_models()
    run = dipp.main(["--pretrained_model_name_or_path", sd, "--reward", "none", "--generator_init",
                     str(tmp_path / "unet.safetensors"), "--max_train_steps", "1", "--fake_learning_rate", "1e-30",
                     "--output_dir", str(tmp_path / "run")])
    fake, teacher = run["fake"].state_dict(), run["teacher"].state_dict()
    assert fake.keys() == teacher.keys()
    assert all(torch.allclose(fake[k].float(), v.float(), rtol=0, atol=1e-20) for k, v in teacher.items())
    assert not same_weights(unet, run["teacher"])  # (the init is not the teacher: the check above can fail)


def test_lora_adapter_adds_exactly_B_A_x():
    """--lora_rank R puts W x + B A x on each target layer, scale α/R = 1 (lora_alpha = R, as dipp documents and
    merged_lora's W ← W + B·A assumes): the adapted layer's output equals the base layer's plus B·A·x computed by
    hand, at a rank (4) where PEFT's default lora_alpha (8) would double it. The base weights stay shared."""
    torch.manual_seed(0)
    base = torch.nn.Module()
    base.to_q = torch.nn.Linear(6, 5)
    adapted = plumbing.lora_copy(base, 4, "generator", ("to_q",))
    layer = adapted.to_q
    A, B = layer.lora_A["generator"].weight, layer.lora_B["generator"].weight  # (4, 6), (5, 4)
    with torch.no_grad():
        B.normal_()  # (PEFT starts B at 0: the adapter is then invisible)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(layer(x), base.to_q(x) + x @ A.T @ B.T, atol=1e-6)
    assert layer.get_base_layer().weight is base.to_q.weight


def test_prompt_embedding_cache_is_keyed_by_dtype(tmp_path):
    """The pre-encoded prompts (SDXL's two CLIPs, PixArt's T5) are cached per text-encoder precision: a bf16 run
    and an fp32 run into one folder write two files, and each reads the rows its own encoder computes (a cache
    keyed without the dtype would hand the second run the first one's rows)."""
    folder, fam, cpu = tiny_sdxl_models()[0], families.FAMILIES["sdxl"], torch.device("cpu")
    tokenizer, cache = families.load_tokenizer(folder, fam), str(tmp_path / "text_embeddings")
    rows = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float32):  # (the third reads the first's file)
        text, _ = families.text_conditioning(folder, fam, tokenizer, [["a fox"], [""]], cpu, dtype, cache)
        rows.setdefault(dtype, []).append(text(["a fox"]))
    assert len(os.listdir(cache)) == 2
    for dtype, (first, *again) in rows.items():
        with torch.no_grad():
            direct = fam.encode(tokenizer, families.load_text_encoder(folder, fam, cpu, dtype), ["a fox", ""])
        for x, y in zip(first, direct.to(torch.float32)):  # (the batch the cache encoded: the same rounding)
            assert torch.equal(x, y[:1]), dtype
        assert all(torch.equal(x, y) for again_rows in again for x, y in zip(first, again_rows))
    assert not all(torch.equal(x, y) for x, y in zip(rows[torch.float32][0], rows[torch.bfloat16][0]))


def test_bad_generator_init_files_are_one_line(tmp_path):
    """A weight file of another architecture, a truncated file, a pickle that would run code, or a model
    folder of the other family (a PixArt transformer for an SD teacher): one line each."""
    import pickle
    teacher, *_, schedule = dipp.load_teacher(tiny_models()[0], torch.device("cpu"), torch.float32)[1:]
    wrong = {k: v for k, v in tiny_unet().state_dict().items() if "up_blocks" not in k}
    wrong["conv_in.weight"] = torch.zeros(7, 4, 3, 3)
    torch.save(wrong, tmp_path / "wrong.bin")
    write_unet_weights(tiny_unet(), tmp_path)
    data = open(tmp_path / "unet.safetensors", "rb").read()
    open(tmp_path / "cut.safetensors", "wb").write(data[: len(data) // 2])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    open(tmp_path / "evil.pt", "wb").write(pickle.dumps({"conv_in.weight": Evil()}))
    cases = {"wrong.bin": "does not match", "cut.safetensors": "cannot be read", "evil.pt": "cannot be read",
             "nothing.safetensors": "does not exist"}
    cases[os.path.join(tiny_pixart_models()[0], "transformer")] = "holds a PixArtTransformer2DModel"  # the other family
    for name, expected in cases.items():
        with pytest.raises(SystemExit) as e:
            dipp.build_generator(dipp.Config(generator_init=str(tmp_path / name)), teacher, families.FAMILIES["sd"], schedule,
                                 torch.device("cpu"))
        msg = str(e.value)
        assert msg.startswith("dipp: error:") and expected in msg and "\n" not in msg, (name, msg)


def test_a_generator_init_of_another_family_is_one_line_before_any_network(tmp_path, monkeypatch):
    """dipp.py --generator_init of another family than the teacher's (an SD-1.x UNet for an SDXL teacher and the
    reverse: one class, told apart by config and tensors; a PixArt-α transformer), as a folder or a bare weight
    file, or a truncated one: one line naming --generator_init, before any model is loaded or any file written.
    (Every pair and form: test_evaluate.py's test of families.check_generator.)"""
    sd, sdxl = tiny_models()[0], tiny_sdxl_models()[0]
    monkeypatch.setattr(dipp, "load_teacher", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(os.path.join(sd, "unet", "diffusion_pytorch_model.safetensors"), "rb").read()[:-100])
    cases = [(sdxl, os.path.join(sd, "unet"), "holds a SD-1.x UNet2DConditionModel, but the teacher is SDXL"),
             (sd, os.path.join(sdxl, "unet", "diffusion_pytorch_model.safetensors"),
              "holds the weights of a SDXL UNet2DConditionModel, but the teacher is SD-1.x"),
             (sd, os.path.join(tiny_pixart_models()[0], "transformer"), "holds a PixArt-α PixArtTransformer2DModel"),
             (sd, str(cut), "cannot be read as a weight file")]
    for teacher, init, expected in cases:
        with pytest.raises(SystemExit) as e:
            dipp.main(["--pretrained_model_name_or_path", teacher, "--generator_init", init, "--reward", "none",
                       "--output_dir", str(tmp_path / "run")])
        message = str(e.value)
        assert message.startswith(f"dipp: error: --generator_init '{init}'") and expected in message, message
        assert "\n" not in message and not (tmp_path / "run").exists()


def test_every_out_of_range_value_is_named_at_once():
    """Values out of their range are all named in one line (plumbing.check_config through all_or_die), each with its
    flag and fix; one alone keeps its own message."""
    cfg = dipp.Config(learning_rate=-1.0, guidance_scale=0.5, train_batch_size=0, t_min=990, ema_decay=1.0,
                      validation_diversity=1)
    with pytest.raises(SystemExit) as e:
        plumbing.check_config(cfg)
    msg = str(e.value)
    assert msg.startswith("dipp: error: 6 problems, each to fix before this run: (1) --learning_rate -1.0 must be > 0")
    for flag in ("--learning_rate", "--ema_decay", "--t_min", "--guidance_scale", "--train_batch_size",
                 "--validation_diversity 1: diversity needs at least 2 images per prompt"):
        assert flag in msg, flag
    assert "\n" not in msg
    with pytest.raises(SystemExit) as e:
        plumbing.check_config(dipp.Config(reward_scale=-1.0))
    assert str(e.value) == "dipp: error: --reward_scale -1.0 < 0 would minimise the reward; use α_rew >= 0"

def test_user_mistakes_are_one_line(tmp_path, monkeypatch):
    """Numeric flags outside their meaning, files that are not what they claim (a binary prompt file, a
    truncated or corrupted checkpoint), an output_dir that cannot be written: one 'dipp: error:' line each."""
    out = str(tmp_path)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a_file").write_text("x")
    cases = {
        ("--learning_rate=-1e-5",): "must be > 0", ("--fake_learning_rate", "0"): "must be > 0",
        ("--reward_scale", "nan"): "not a finite number", ("--guidance_scale", "inf"): "not a finite number",
        ("--max_grad_norm=-1",): "must be >= 0", ("--lora_rank=-4",): "must be >= 0",
        ("--adam_beta1", "1.5"): "[0, 1)", ("--max_train_steps", "0"): "positive integer",
        ("--prompts", str(tmp_path / "binary.txt")): "not UTF-8 text",
        ("--validation_prompts", str(tmp_path / "none.txt")): "--validation_prompts file",
    }
    for argv, expected in cases.items():
        steps = [] if argv[0] == "--max_train_steps" else ["--max_train_steps", "1"]
        msg = error_of(["--tiny", *argv, "--output_dir", os.path.join(out, "run"), *steps])
        assert msg.startswith("dipp: error:") and expected in msg and "\n" not in msg, (argv, msg)
    msg = error_of(["--tiny", "--output_dir", str(tmp_path / "a_file" / "run")])
    assert "cannot be written" in msg and "\n" not in msg
    # damaged checkpoints: a truncated weight file, then a corrupted state.pt
    argv = ["--tiny", "--reward", "none", "--checkpointing_steps", "1", "--output_dir", os.path.join(out, "ck")]
    dipp.main(argv + ["--max_train_steps", "1"])
    ck = tmp_path / "ck" / "checkpoint-1"
    good = (ck / "generator.safetensors").read_bytes()
    (ck / "generator.safetensors").write_bytes(good[:1000])
    msg = error_of(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert "is damaged" in msg and "generator.safetensors" in msg and "\n" not in msg
    (ck / "generator.safetensors").write_bytes(good)
    (ck / "state.pt").write_bytes(b"not a checkpoint")
    msg = error_of(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert "is damaged" in msg and "state.pt" in msg


def test_full_disk_while_checkpointing_names_the_last_good_one(tmp_path):
    """A real write failure while checkpoint-2 is written (the kernel refuses to grow a file: RLIMIT_FSIZE, no
    injected exception): in a training run, where torch.save's zip writer raises a RuntimeError naming no cause
    for state.pt, and in a direct save whose safetensors file fails (SafetensorError). Each is one line naming
    checkpoint-1, which is left byte for byte, and no half-written checkpoint-2 (or its .tmp) is left."""
    import types
    from conftest import file_size_limit
    out = str(tmp_path)
    argv = ["--tiny", "--reward", "none", "--checkpointing_steps", "1", "--output_dir", out]
    dipp.main(argv + ["--max_train_steps", "1"])
    files = lambda: {f: open(os.path.join(out, "checkpoint-1", f), "rb").read()
                     for f in os.listdir(os.path.join(out, "checkpoint-1"))}
    saved = files()
    assert len(saved["state.pt"]) > 2 * len(saved["generator.safetensors"])  # (Adam's two moments per weight)
    with file_size_limit(len(saved["state.pt"]) // 2):  # the weights fit, state.pt does not
        msg = error_of(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    net = torch.nn.Linear(64, 64)
    with file_size_limit(4096), pytest.raises(SystemExit) as e:  # its 16 kB weight file does not fit
        plumbing.save_checkpoint(types.SimpleNamespace(output_dir=out, checkpoints_total_limit=3), 2,
                                 {"generator": net, "fake_score": net}, 999, {})
    for msg, failure in ((msg, "torch.save could not write"), (str(e.value), "I/O error: File too large")):
        assert msg.startswith("dipp: error: could not write " + os.path.join(out, "checkpoint-2")), msg
        assert failure in msg and "Last good checkpoint: " + os.path.join(out, "checkpoint-1") in msg, msg
        assert "\n" not in msg
    assert files() == saved
    assert sorted(os.listdir(out)) == sorted(["checkpoint-1", "config.json", "log.jsonl", "samples_0000.png",
                                              "samples_0001.png", "curves.png", "generator", "tiny"])


def test_report_to_tensorboard_writes_events_or_names_the_package(tmp_path):
    """--report_to tensorboard writes event files when the package is installed, else says what to install."""
    argv = ["--tiny", "--reward", "none", "--max_train_steps", "1", "--report_to", "tensorboard", "--output_dir", str(tmp_path)]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "pip install tensorboard" in error_of(argv)
    else:
        dipp.main(argv)
        assert os.listdir(tmp_path / "tensorboard")


def test_curves_redraw_from_a_log_on_demand(tmp_path):
    """`python plumbing.py curves LOG` redraws curves.png from any log.jsonl."""
    import subprocess
    rows = [{"step": 0, "val_reward": 0.1, "val_reward_std": 0.05}] + [
        {"step": s, "loss_fake": 1 / s, "loss_ikl": -s, "reward": 0.1 * s, "grad_ikl": 1.0, "grad_reward": 0.2 * s}
        for s in range(1, 5)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "plumbing.py", "curves", str(tmp_path / "log.jsonl")], cwd=HERE, check=True,
                   capture_output=True)
    from PIL import Image
    assert Image.open(tmp_path / "curves.png").size[0] > 500


# ----------------------------------------------------------------------------- speed: --reward_decoder tiny

def test_tiny_reward_decoder_is_frozen_and_passes_the_reward_gradient(tmp_path):
    """--reward_decoder tiny: the reward scores TAESD's images; TAESD stays bit-identical to its file while
    the generator moves, and the reward's gradient reaches the generator through it (and not the VAE)."""
    from diffusers import AutoencoderTiny
    out = tmp_path / "run"
    nets = dipp.main(["--tiny", "--reward_decoder", "tiny", "--max_train_steps", "1", "--reward_scale", "10",
                      "--learning_rate", "1e-3", "--output_dir", str(out)])
    taesd = nets["reward_decoder"]
    assert isinstance(taesd, AutoencoderTiny) and same_weights(taesd, AutoencoderTiny.from_pretrained(out / "tiny" / "taesd"))
    assert not same_weights(nets["G"].net, read_unet_from(str(out / "tiny" / "sd")))
    G = nets["G"]
    G.zero_grad()
    x0 = G(torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32))
    nets["reward"](dipp.decode(taesd, x0), ["a fox", "a red bicycle"]).sum().backward()
    assert sum(p.grad.abs().sum() for p in G.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in list(taesd.parameters()) + list(nets["vae"].parameters()))
    with torch.no_grad():  # it decodes SD latents to [-1, 1] images of the full decoder's size
        assert dipp.decode(taesd, x0).shape == dipp.decode(nets["vae"], x0).shape


def test_tiny_reward_decoder_bad_path_is_one_line(tmp_path):
    msg = error_of(["--tiny", "--reward_decoder", "tiny", "--reward_decoder_path", str(tmp_path / "nope"),
                    "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1"])
    assert msg.startswith("dipp: error: --reward_decoder_path '") and "does not exist" in msg and "\n" not in msg


def test_random_sd15_taesd_has_taesds_shape():
    """--random_sd15 builds a TAESD-shaped tiny decoder (no download for the GPU sweep): 1.22M decoder parameters."""
    from diffusers import AutoencoderTiny
    with torch.device("meta"):
        taesd = AutoencoderTiny(**random_weights.SHAPES["sd15"]["taesd"])
    assert round(sum(p.numel() for p in taesd.decoder.parameters()) / 1e6, 2) == 1.22


# ----------------------------------------------------------------------------- PixArt-α (DiT) family

@functools.lru_cache(maxsize=None)
def tiny_pixart_models(folder=os.path.join(TMP, "dipp-test-tiny-pixart")):
    """A tiny PixArt-α folder (transformer, T5, in-process T5 tokenizer, VAE) + CLIP, written once per session."""
    return random_weights.build_random(folder, "tiny_pixart")


def tiny_pixart(seed=0):
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    net = PixArtTransformer2DModel.from_pretrained(tiny_pixart_models()[0], subfolder="transformer")
    for p in net.parameters():  # move off the init so that cond and uncond, teacher and fake really differ
        p.data += 0.05 * torch.randn_like(p)
    return net.eval()


def pixart_eps_by_hand(net, x, t, emb, mask):
    """ε̂ as PixArtAlphaPipeline computes it (not through dipp): 8 output channels, chunk(2)[0]."""
    return net(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.chunk(2, dim=1)[0]


def t5_like(lengths, seed, L=120, D=32):
    """Random T5-shaped embeddings with a padding mask: prompt i has lengths[i] real tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()  # (B, L)
    return torch.randn(len(lengths), L, D, generator=g), mask


def but_key_bias(weights):
    """A state dict without attention's to_k biases. Their gradient is exactly zero (softmax ignores a shift that
    all keys share), so Adam turns float noise into ±lr steps there, differently under a changed summation
    order (compile, DDP); they change no output. SD's UNet has no such bias."""
    return {k: v for k, v in weights.items() if not k.endswith("to_k.bias")}


def pixart_schedule():
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod.double()


def test_pixart_ikl_gradient_and_no_gradient_into_learned_sigma():
    """On a tiny PixArt transformer with a CFG teacher and masked T5 conditions: ∂L_IKL/∂x0 from autograd equals
    w α (ε̃_ref − ε̂_fake)/σ with every ε̂ computed as the stock pipeline does, under the linear schedule; and
    backprop through the one-step generator gives the proj_out rows of the learned-σ channels exactly zero
    gradient (the ε rows get gradient)."""
    teacher, fake = tiny_pixart(0), tiny_pixart(1)
    abar = pixart_schedule()
    sched, omega = dipp.Schedule.ddpm(abar), 3.0
    (emb, mask), (emb_u, mask_u) = t5_like([7, 12], 0), t5_like([1, 1], 1)
    cond, uncond = families.MaskedText(emb, mask), families.MaskedText(emb_u, mask_u)
    real = dipp.guided(dipp.denoiser_eps(teacher, families.FAMILIES["pixart"]), cond, uncond, omega)
    fake_c = lambda x, t: dipp.denoiser_eps(fake, families.FAMILIES["pixart"])(x, t, cond)
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    t, eps = torch.tensor([100, 700]), torch.randn(2, 4, 8, 8)
    (grad,) = torch.autograd.grad(dipp.ikl_loss(x0, t, eps, sched, real, fake_c).sum(), x0)
    a, s = abar[t].float().sqrt().view(-1, 1, 1, 1), (1 - abar[t].float()).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0.detach() + s * eps
    with torch.no_grad():
        e_c, e_u = pixart_eps_by_hand(teacher, x_t, t, emb, mask), pixart_eps_by_hand(teacher, x_t, t, emb_u, mask_u)
        expected = (s / a) ** 2 * a * (e_u + omega * (e_c - e_u) - pixart_eps_by_hand(fake, x_t, t, emb, mask)) / s
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-5) and grad.abs().max() > 1e-3
    net = families.readout_in_fp32(tiny_pixart(2), families.FAMILIES["pixart"]).train()
    G = dipp.OneStepGenerator(net, families.FAMILIES["pixart"], sched, 400)
    G(torch.randn(2, 4, 8, 8), cond).square().sum().backward()
    w = G.net.proj_out.weight.grad.view(2 * 2, 8, -1)  # rows ordered (patch row, patch column, channel)
    assert w[:, 4:].abs().max() == 0 and w[:, :4].abs().min(-1).values.max() > 0
    assert G.net.proj_out.bias.grad.view(4, 8)[:, 4:].abs().max() == 0


def test_pixart_cfg_is_an_implicit_reward_with_attention_masks():
    """METHOD.md §5 on the DiT path: with masked T5 conditions (prompt and empty prompt of different lengths),
    the guided teacher's IKL gradient (cond and uncond in one batched call) equals the unguided one minus
    (ω−1)·∇x0 r_cfg from separate calls; embeddings under the mask change nothing, the mask itself does."""
    teacher, fake = tiny_pixart(0).double(), tiny_pixart(1).double()  # float64: see test_cfg_is_an_implicit_reward
    eps_fn, sched, omega = dipp.denoiser_eps(teacher, families.FAMILIES["pixart"]), dipp.Schedule.ddpm(pixart_schedule()), 4.5
    cond, uncond = families.MaskedText(*t5_like([5, 9, 3], 2)), families.MaskedText(*t5_like([1, 1, 1], 3))
    fake_c = lambda x, tt: dipp.denoiser_eps(fake, families.FAMILIES["pixart"])(x, tt, cond)
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, requires_grad=True)
    t, eps = torch.tensor([50, 400, 900]), torch.randn(3, 4, 8, 8)
    grad_of = lambda loss: torch.autograd.grad(loss.sum(), x0)[0]
    g_guided = grad_of(dipp.ikl_loss(x0, t, eps, sched, dipp.guided(eps_fn, cond, uncond, omega), fake_c))
    g_plain = grad_of(dipp.ikl_loss(x0, t, eps, sched, dipp.guided(eps_fn, cond, uncond, 1.0), fake_c))
    g_cfg = grad_of(dipp.guidance_reward_loss(x0, t, eps, sched, lambda x, tt: eps_fn(x, tt, cond),
                                         lambda x, tt: eps_fn(x, tt, uncond)))
    assert torch.allclose(g_guided, g_plain + (omega - 1) * g_cfg, rtol=1e-3, atol=1e-5)
    assert (g_guided - g_plain).abs().max() > 1e-3
    x = torch.randn(3, 4, 8, 8)
    padded = families.MaskedText(cond.emb.masked_fill(cond.mask[..., None] == 0, 7.0), cond.mask)
    unmasked = families.MaskedText(cond.emb, torch.ones_like(cond.mask))
    with torch.no_grad():
        assert torch.allclose(eps_fn(x, t, padded), eps_fn(x, t, cond), atol=1e-6)
        assert (eps_fn(x, t, unmasked) - eps_fn(x, t, cond)).abs().max() > 1e-3


def test_pixart_1024_models_get_the_image_size():
    """A transformer with use_additional_conditions (the 1024-MS model's sample_size 128 turns it on) gets the
    micro-conditions as PixArtAlphaPipeline builds them: resolution [h, w] in pixels (8 per latent) and h/w."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    net = PixArtTransformer2DModel(in_channels=4, out_channels=8, use_additional_conditions=True,
                                   **random_weights.SHAPES["tiny_pixart"]["transformer"]).eval()
    emb, mask = t5_like([3, 6], 4)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([400, 400])
    size = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():
        theirs = net(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                     added_cond_kwargs=size).sample.chunk(2, dim=1)[0]
        assert torch.allclose(dipp.denoiser_eps(net, families.FAMILIES["pixart"])(x, t, families.MaskedText(emb, mask)), theirs, atol=1e-6)
        size["resolution"] = size["resolution"] / 2  # the size really enters the output
        assert (net(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=size)
                .sample.chunk(2, dim=1)[0] - theirs).abs().max() > 1e-4


def pixart_command():
    """The `python dipp.py --random_weights tiny_pixart ...` command exactly as README gives it."""
    line = next(l for l in open(os.path.join(HERE, "README.md")).read().splitlines()
                if "python dipp.py --random_weights tiny_pixart" in l)
    return shlex.split(line[line.index("python dipp.py"):].split("#")[0].split("&&")[0])[2:]


def test_pixart_readme_run_moves_only_generator_and_fake_and_resumes_from_cached_t5(tmp_path, monkeypatch):
    """README's PixArt command: teacher, VAE and reward are bit-identical to their files after training, G and ψ
    moved, T5 is gone (freed after pre-encoding) and its cached embedding of "" is T5's own (with the mask);
    1 step + resume + 1 step equals the 2 straight steps bit for bit, and the resume never loads T5."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPModel, T5EncoderModel
    argv = pixart_command()
    i = argv.index("--output_dir")
    argv[i + 1] = str(tmp_path / "a")
    nets = dipp.main(argv)
    folder, clip = str(tmp_path / "a" / "tiny_pixart" / "pixart"), str(tmp_path / "a" / "tiny_pixart" / "clip")
    teacher = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    assert same_weights(nets["teacher"], teacher) and not same_weights(nets["G"].net, teacher)
    assert not same_weights(nets["fake"], teacher) and nets["G"].t_star == 400
    assert same_weights(nets["vae"], AutoencoderKL.from_pretrained(folder, subfolder="vae"))
    assert same_weights(nets["reward"].terms[0][2].model, CLIPModel.from_pretrained(clip))
    assert nets["text_encoder"] is None
    (cache,) = os.listdir(tmp_path / "a" / "text_embeddings")
    table = load_file(str(tmp_path / "a" / "text_embeddings" / cache))
    prompts = json.loads(__import__("safetensors").safe_open(str(tmp_path / "a" / "text_embeddings" / cache), "pt")
                         .metadata()["prompts"])
    assert prompts[:len(promptsets.BUILTIN_PROMPTS)] == promptsets.BUILTIN_PROMPTS and prompts[-1] == ""
    tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")("", padding="max_length", max_length=120,
                                                                       return_tensors="pt")
    with torch.no_grad():
        t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder")(tok.input_ids, attention_mask=tok.attention_mask)[0]
    assert torch.equal(table["mask"][-1], tok.attention_mask[0]) and tok.attention_mask.sum() == 1  # just </s>
    assert torch.allclose(table["emb"][-1], t5[0], atol=1e-6)
    b = ["--output_dir", str(tmp_path / "b"), "--checkpointing_steps", "1"]
    dipp.main(argv[:i] + argv[i + 2:] + b + ["--max_train_steps", "1"])
    monkeypatch.setattr(families, "load_text_encoder", lambda *a: pytest.fail("T5 loaded although its embeddings are cached"))
    resumed = dipp.main(argv[:i] + argv[i + 2:] + b + ["--resume_from_checkpoint", "latest"])
    assert same_weights(nets["G"].net, resumed["G"].net) and same_weights(nets["fake"], resumed["fake"])


def test_pixart_lora_base_untouched_merged_export_reloads_in_stock_pipeline(tmp_path, capsys):
    """--lora_rank on PixArt: adapters move, the one shared base stays bit-identical to the teacher file, the
    merged export (no adapter file: PixArtAlphaPipeline has no load_lora_weights, one line says so) is a plain
    PixArtTransformer2DModel folder predicting what the adapter model predicts, and a
    stock PixArtAlphaPipeline (DDPM, clip_sample=False, timesteps=[t*], guidance 1) given it reproduces dipp's
    --generate images from the same noise."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel
    out = str(tmp_path)
    nets = dipp.main(["--random_weights", "tiny_pixart", "--lora_rank", "4", "--max_train_steps", "2", "--learning_rate",
                      "1e-2", "--fake_learning_rate", "1e-2", "--reward_scale", "10", "--output_dir", out])
    G, fake, teacher = nets["G"].net, nets["fake"], nets["teacher"]
    folder = os.path.join(out, "tiny_pixart", "pixart")
    assert G.pos_embed.proj.weight is teacher.pos_embed.proj.weight is fake.pos_embed.proj.weight
    assert same_weights(teacher, PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer"))
    lora = lambda m: {k: v for k, v in m.state_dict().items() if "lora_B" in k}
    assert lora(G) and all(v.abs().sum() > 0 for v in lora(G).values()) and any(v.abs().sum() > 0 for v in lora(fake).values())
    merged = PixArtTransformer2DModel.from_pretrained(os.path.join(out, "generator"))
    assert not any("lora" in k for k in merged.state_dict())
    assert json.load(open(os.path.join(out, "generator", "config.json")))["_class_name"] == "PixArtTransformer2DModel"
    assert "PixArtAlphaPipeline cannot load one" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "generator", plumbing.LORA_FILE))
    assert "PixArtAlphaPipeline.from_pretrained" in open(os.path.join(out, "generator", "README.md")).read()
    x, t, (emb, mask) = torch.randn(2, 4, 8, 8), torch.tensor([400, 999]), t5_like([4, 9], 5)
    with torch.no_grad():
        assert torch.allclose(pixart_eps_by_hand(merged, x, t, emb, mask), pixart_eps_by_hand(G, x, t, emb, mask), atol=1e-5)
    prompts = ["A red bicycle", "a fox"]
    ours = dipp.main(["--random_weights", "tiny_pixart", "--output_dir", out, "--generate", "|".join(prompts),
                      "--generator_init", os.path.join(out, "generator"), "--seed", "5"])
    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"), transformer=merged,
        scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", clip_sample=False))
    torch.manual_seed(5)
    z = torch.randn(2, 4, 8, 8)  # the same z ~ N(0, I) that dipp.generate drew after seeding
    theirs = pipe(prompts, timesteps=[400], latents=z, guidance_scale=1.0, output_type="pt", clean_caption=False,
                  use_resolution_binning=False).images
    assert torch.allclose((ours.clamp(-1, 1) + 1) / 2, theirs, atol=1e-4)


def test_pixart_switches_keep_the_math(tmp_path, monkeypatch):
    """On PixArt: --gradient_checkpointing gives the plain run's weights (and --ema_decay exports
    d²θ0 + d(1−d)θ1 + (1−d)θ2 after 2 steps); one --compile step (aot_eager) is within 0.1 % of its update; bf16
    stores the frozen nets in bf16, keeps fp32 master weights, and reads ε̂ out of the transformer in fp32."""
    from safetensors.torch import load_file
    monkeypatch.setattr(plumbing, "COMPILE_BACKEND", "aot_eager")
    common = ["--random_weights", "tiny_pixart", "--max_train_steps", "2", "--learning_rate", "1e-3",
              "--fake_learning_rate", "1e-3", "--reward_scale", "10", "--checkpointing_steps", "1"]
    run = lambda name, *flags: dipp.main(common + ["--output_dir", str(tmp_path / name), *flags])
    plain = run("plain")
    ckpt = run("ckpt", "--gradient_checkpointing", "--ema_decay", "0.75")
    assert ckpt["G"].net.is_gradient_checkpointing and ckpt["fake"].is_gradient_checkpointing
    for name in ("G", "fake"):
        a, b = plain[name].state_dict(), ckpt[name].state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    theta0 = load_file(str(tmp_path / "ckpt" / "tiny_pixart" / "pixart" / "transformer" / "diffusion_pytorch_model.safetensors"))
    theta1 = load_file(str(tmp_path / "ckpt" / "checkpoint-1" / "generator.safetensors"))
    theta2, exported = ckpt["G"].net.state_dict(), load_file(str(tmp_path / "ckpt" / "generator" / "diffusion_pytorch_model.safetensors"))
    for k in theta1:
        assert torch.allclose(exported[k], 0.75 * (0.75 * theta0[k] + 0.25 * theta1[k]) + 0.25 * theta2[k], atol=1e-6), k
    compiled = run("compiled", "--compile", "default", "--benchmark", "--max_train_steps", "1")  # vs checkpoint-1
    assert compiled["G"].net._compiled_call_impl is not None and compiled["teacher"]._compiled_call_impl is not None
    teacher = plain["teacher"].state_dict()
    for name, file in (("G", "generator"), ("fake", "fake_score")):
        a = but_key_bias(load_file(str(tmp_path / "plain" / "checkpoint-1" / f"{file}.safetensors")))
        b = {k.removeprefix("net."): v for k, v in compiled[name].state_dict().items()}
        diff, update = distance(a, b), distance(a, teacher)
        assert update > 0.01 and diff < 1e-3 * update, (name, diff, update)
    bf16 = run("bf16", "--mixed_precision", "bf16", "--max_train_steps", "1")
    assert bf16["teacher"].dtype == bf16["vae"].dtype == torch.bfloat16
    assert bf16["G"].net.dtype == bf16["fake"].dtype == torch.float32
    seen = []
    bf16["G"].net.register_forward_hook(lambda m, i, o: seen.append(o.sample.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0 = bf16["G"](torch.randn(1, 4, 8, 8), bf16["text"](promptsets.BUILTIN_PROMPTS[:1]))
    assert seen == [torch.float32] and x0.dtype == torch.float32


def ddp_and_one_process(tmp_path, shapes, denoiser, *extra):
    """Generators after 2 steps of 2 CPU processes (gloo, two_processes) × batch 1 and of one process × batch 2 on
    --random_weights `shapes`, and the initial denoiser (`denoiser`: its folder under the random models). extra:
    more flags for both runs (their folders: tmp_path/ddp and tmp_path/one)."""
    from safetensors.torch import load_file
    common = ["--random_weights", shapes, "--max_train_steps", "2", "--learning_rate", "1e-3",
              "--fake_learning_rate", "1e-3", "--reward_scale", "10", *extra]
    two_processes(*common, "--train_batch_size", "1", "--output_dir", str(tmp_path / "ddp"))
    dipp.main(common + ["--train_batch_size", "2", "--output_dir", str(tmp_path / "one")])
    weights = lambda run: load_file(str(tmp_path / run / "generator" / "diffusion_pytorch_model.safetensors"))
    init = load_file(str(tmp_path / "one" / shapes / denoiser / "diffusion_pytorch_model.safetensors"))
    return weights("one"), weights("ddp"), init


def test_pixart_two_process_ddp_equals_one_process_with_global_batch(tmp_path):
    """2 CPU processes (gloo, two_processes) × batch 1 on PixArt (rank 0 pre-encodes the prompts, rank 1 reads
    its cache) gives the generator one process with batch 2 gives, up to float summation order."""
    one, ddp, init = ddp_and_one_process(tmp_path, "tiny_pixart", "pixart/transformer")
    diff, update = distance(but_key_bias(one), ddp), distance(but_key_bias(one), init)
    assert update > 0.01 and diff < 0.01 * update, (diff, update)


def test_pixart_generator_init_takes_the_dmd_layout_a_transformer_folder_or_a_weight_file(tmp_path):
    """--generator_init on PixArt: a folder holding only transformer/ (.bin, config naming Transformer2DModel)
    and scheduler/ as PixArt-α-DMD's release, the transformer folder itself, and a .safetensors weight file all
    give the same generator, at PixArt's default t* = 400; an incomplete PixArt folder is one line."""
    import shutil
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file
    source = tiny_pixart(7)
    source.save_pretrained(tmp_path / "dmd" / "transformer", safe_serialization=False)
    config = tmp_path / "dmd" / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"PixArtTransformer2DModel"', '"Transformer2DModel"'))
    DDPMScheduler().save_pretrained(tmp_path / "dmd" / "scheduler")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "g.safetensors"))
    teacher, *_, schedule = dipp.load_teacher(tiny_pixart_models()[0], torch.device("cpu"), torch.float32,
                                              text_encoder=False)[1:]
    for init in (tmp_path / "dmd", tmp_path / "dmd" / "transformer", tmp_path / "g.safetensors"):
        G = dipp.build_generator(dipp.Config(generator_init=str(init)), teacher, families.FAMILIES["pixart"], schedule, torch.device("cpu"))
        assert same_weights(G.net, source) and G.t_star == 400, init
    shutil.copytree(tiny_pixart_models()[0], tmp_path / "broken", ignore=shutil.ignore_patterns("text_encoder"))
    msg = error_of(["--pretrained_model_name_or_path", str(tmp_path / "broken"), "--reward", "none",
                    "--output_dir", str(tmp_path / "r")])
    assert "PixArt-α folder: missing text_encoder/config.json" in msg and "\n" not in msg


def test_pixart_prompt_cache_follows_the_text_encoder_files(tmp_path):
    """The T5 embedding cache is keyed by the text encoder's files too: a T5 rewritten in the same folder
    (other weights) gets a new cache file with its own embeddings, never the old model's."""
    import shutil
    from transformers import T5EncoderModel
    folder = tmp_path / "pixart"
    shutil.copytree(tiny_pixart_models()[0], folder)
    cfg = dipp.Config(pretrained_model_name_or_path=str(folder), output_dir=str(tmp_path / "out"))
    fam, _, _, _, tok, _ = dipp.load_teacher(str(folder), torch.device("cpu"), torch.float32, text_encoder=False)
    encode = lambda: families.text_conditioning(str(folder), fam, tok, [["a fox"]], torch.device("cpu"), torch.float32,
                                                os.path.join(cfg.output_dir, "text_embeddings"))[0](["a fox"]).emb
    before = encode()
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder")
    for p in t5.parameters():
        p.data += 0.1
    t5.save_pretrained(folder / "text_encoder")
    after = encode()
    assert len(os.listdir(tmp_path / "out" / "text_embeddings")) == 2 and (after - before).abs().max() > 1e-3


def test_pixart_benchmark_sweep_and_512_shapes(tmp_path):
    """bench/sweep.py --family pixart runs the benchmark on tiny PixArt models (writing only the models and the
    prompt cache), and the --random_weights pixart512 transformer has PixArt-XL-2-512's 0.61 B parameters."""
    from diffusers import PixArtTransformer2DModel
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import sweep
    rows = sweep.main(["--tiny", "--family", "pixart", "--batches", "1", "--steps", "3", "--out", str(tmp_path),
                       "--setups", "full"])
    assert rows[0]["images_per_s"] > 0 and "--random_weights tiny_pixart" in rows[0]["command"]
    assert set(os.listdir(tmp_path / "models")) == {"tiny_pixart", "text_embeddings"}
    with torch.device("meta"):
        net = PixArtTransformer2DModel(in_channels=4, out_channels=8, **random_weights.SHAPES["pixart512"]["transformer"])
    assert round(sum(p.numel() for p in net.parameters()) / 1e9, 2) == 0.61


# ----------------------------------------------------------------------------- SDXL family (issue 22, part 1)

@functools.lru_cache(maxsize=None)
def tiny_sdxl_models(folder=os.path.join(TMP, "dipp-test-tiny-sdxl")):
    """A tiny SDXL folder (text_time UNet, CLIP-L + CLIP-bigG-with-projection of other widths, two tokenizers,
    VAE, SDXL's Euler scheduler config) + CLIP, written once per session."""
    return random_weights.build_random(folder, "tiny_sdxl")


def sdxl_pipeline(folder, unet, scheduler):
    """A stock StableDiffusionXLPipeline assembled by hand from a folder's components (as DMD2's SDXL README does
    with its one-step UNet), force_zeros_for_empty_prompt at its default (True)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
        unet=unet, scheduler=scheduler, add_watermarker=False)


def test_sdxl_conditioning_null_and_cfg_are_what_the_stock_pipeline_passes_its_unet():
    """A stock StableDiffusionXLPipeline call with CFG (ω = 3, no negative prompt), hooked at its UNet: the
    cross-attention states, pooled embeddings and time ids it passes are bit for bit dipp's c and ∅ (zeros, as
    force_zeros_for_empty_prompt), stacked (∅, c); ε̂ of the family on the same input is the UNet's output;
    and dipp.guided gives the pipeline's guided ε̂."""
    from diffusers import EulerDiscreteScheduler
    folder = tiny_sdxl_models()[0]
    fam, unet, _, text_encoder, tokenizer, _ = dipp.load_teacher(folder, torch.device("cpu"), torch.float32)
    assert fam.name == "sdxl" and isinstance(tokenizer, tuple) and text_encoder.image_size == (16, 16)
    torch.manual_seed(0)
    for p in unet.parameters():  # move off the init so that cond and uncond really differ
        p.data += 0.02 * torch.randn_like(p)
    seen = []
    unet.register_forward_hook(lambda m, args, kwargs, out: seen.append((args, kwargs, out[0])), with_kwargs=True)
    pipe = sdxl_pipeline(folder, unet, EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"))
    prompts = ["a red bicycle", "a fox in the snow"]
    pipe(prompts, num_inference_steps=1, guidance_scale=3.0, latents=torch.randn(2, 4, 8, 8), output_type="latent")
    (x, t), kw, out = seen[0]
    c = fam.encode(tokenizer, text_encoder, prompts)
    null = families.null_condition(fam, lambda p: fam.encode(tokenizer, text_encoder, p))
    both = dipp.batch_cat(null.expand_as(c), c)
    assert torch.equal(kw["encoder_hidden_states"], both.emb)
    assert torch.equal(kw["added_cond_kwargs"]["text_embeds"], both.pooled)
    assert torch.equal(kw["added_cond_kwargs"]["time_ids"], both.time_ids)
    assert null.emb.abs().sum() == 0 and null.pooled.abs().sum() == 0 and c.emb.shape == (2, 77, 32 + 48)
    assert c.time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2 and c.pooled.shape == (2, 24)
    seen.clear()
    with torch.no_grad():
        assert torch.equal(dipp.denoiser_eps(unet, fam)(x, t, both), out)
        guided = dipp.guided(dipp.denoiser_eps(unet, fam), c, null.expand_as(c), 3.0)(x[:2], t.expand(2))
    e_u, e_c = out.chunk(2)
    assert torch.allclose(guided, e_u + 3.0 * (e_c - e_u), atol=1e-5)
    assert (e_c - e_u).abs().max() > 1e-3  # the guidance really does something here


def test_sdxl_training_run_and_its_export_reproduce_a_stock_one_step_sdxl_call(tmp_path):
    """`--random_weights tiny_sdxl`, 2 steps with CFG (ω = 1.75) and the CLIP reward: only the generator and the
    fake score move. The exported generator in a stock StableDiffusionXLPipeline with DMD2-SDXL's sampler
    (LCMScheduler, num_inference_steps=1, timesteps=[399], guidance_scale=0) gives dipp's x0 = g_θ(z, c) from
    the same z (LCM's boundary terms at t = 399 differ from 1 by < 1e-7: 3e-8 measured), bit for bit with
    DDPMScheduler (clip_sample=False, as the SD test), and dipp --generate's images."""
    from diffusers import AutoencoderKL, DDPMScheduler, LCMScheduler, UNet2DConditionModel
    out = str(tmp_path)
    nets = dipp.main(["--random_weights", "tiny_sdxl", "--max_train_steps", "2", "--learning_rate", "1e-3",
                      "--fake_learning_rate", "1e-3", "--reward_scale", "10", "--output_dir", out])
    folder = os.path.join(out, "tiny_sdxl", "sdxl")
    teacher = read_unet_from(folder)
    assert nets["family"].name == "sdxl" and nets["G"].t_star == 399
    assert same_weights(nets["teacher"], teacher) and not same_weights(nets["G"].net, teacher)
    assert not same_weights(nets["fake"], teacher)
    assert same_weights(nets["vae"], AutoencoderKL.from_pretrained(folder, subfolder="vae"))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1]["step"] == 2 and all(v == v for v in log[-1].values())
    record = json.load(open(os.path.join(out, "generator", "dipp.json")))  # t*, and the teacher it came from
    assert record["generator_timestep"] == 399 and record["teacher"] == os.path.abspath(folder)
    assert record["family"] == "sdxl" and record["training"]["reward_scale"] == 10
    pipe = sdxl_pipeline(folder, UNet2DConditionModel.from_pretrained(os.path.join(out, "generator")),
                         LCMScheduler.from_pretrained(folder, subfolder="scheduler"))
    prompts = promptsets.BUILTIN_PROMPTS[:2]  # (pre-encoded: nets["text"] knows the run's prompts)
    # the z ~ N(0, I) that dipp.generate draws with the run's --seed 0 (another seed would rebuild the random models)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = pipe(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=0, latents=z,
                  output_type="latent").images
    # c as the pipeline encodes it (these 2 prompts in one batch): the run's pre-encoded rows (encoded in a batch of
    # all its prompts) differ from it in the last bits of the pooled projection, which bit for bit would see
    encoders = families.load_text_encoder(folder, nets["family"], torch.device("cpu"), torch.float32)
    cond = nets["family"].encode(nets["tokenizer"], encoders, prompts)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(cond, nets["text"](prompts)))
    with torch.no_grad():
        ours = nets["G"](z, cond)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    ddpm = sdxl_pipeline(folder, pipe.unet, DDPMScheduler.from_pretrained(folder, subfolder="scheduler", clip_sample=False))
    assert torch.equal(ours, ddpm(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=0, latents=z,
                                  output_type="latent").images)  # DDPM's last step returns x̂0 itself: bit for bit
    images = dipp.main(["--random_weights", "tiny_sdxl", "--output_dir", out, "--generate", "|".join(prompts),
                        "--generator_init", os.path.join(out, "generator")])
    theirs = pipe(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=0, latents=z,
                  output_type="pt").images
    assert torch.allclose((images.clamp(-1, 1) + 1) / 2, theirs, atol=1e-4)


def test_sdxl_generator_init_takes_dmd2s_bare_fp16_unet_file_and_unet_folders(tmp_path):
    """--generator_init on SDXL: a bare fp16 UNet state dict saved with torch.save (the layout of DMD2-SDXL's
    dmd2_sdxl_1step_unet_fp16.bin), a UNet model folder, and a pipeline folder holding unet/ give the same
    generator at SDXL's default t* = 399; the fp16 file loads into fp32 master weights."""
    from diffusers import UNet2DConditionModel
    folder = tiny_sdxl_models()[0]
    fam, teacher, *_, schedule = dipp.load_teacher(folder, torch.device("cpu"), torch.float32, text_encoder=False)
    torch.manual_seed(3)
    source = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for p in source.parameters():
        p.data = (p.data + 0.02 * torch.randn_like(p)).half().float()  # fp16-representable, as the released file
    torch.save({k: v.half() for k, v in source.state_dict().items()}, tmp_path / "dmd2_sdxl_1step_unet_fp16.bin")
    source.save_pretrained(tmp_path / "model")
    source.save_pretrained(tmp_path / "pipe" / "unet")
    for init in ("dmd2_sdxl_1step_unet_fp16.bin", "model", "pipe"):
        G = dipp.build_generator(dipp.Config(generator_init=str(tmp_path / init)), teacher, fam, schedule,
                                 torch.device("cpu"))
        assert same_weights(G.net, source) and G.t_star == 399 and G.net.dtype == torch.float32, init


def test_sdxl_lora_ema_resume_bf16_and_checkpointing_in_one_run(tmp_path):
    """SDXL with --lora_rank --ema_decay --gradient_checkpointing --mixed_precision bf16: the base is one shared
    frozen bf16 UNet (bit-identical to its file), adapters are fp32 and move, ε̂ is read out in fp32; 2 steps
    straight equal 1 step + resume + 1 step; the export is a plain merged UNet folder."""
    from diffusers import UNet2DConditionModel
    common = ["--random_weights", "tiny_sdxl", "--lora_rank", "4", "--ema_decay", "0.5", "--gradient_checkpointing",
              "--mixed_precision", "bf16", "--learning_rate", "1e-2", "--fake_learning_rate", "1e-2",
              "--reward_scale", "10", "--checkpointing_steps", "1"]
    straight = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "a")])
    G, fake, teacher = straight["G"].net, straight["fake"], straight["teacher"]
    assert G.conv_in.weight is teacher.conv_in.weight is fake.conv_in.weight and teacher.dtype == torch.bfloat16
    assert G.is_gradient_checkpointing and fake.is_gradient_checkpointing
    lora = {k: p for k, p in G.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in k and p.dtype == torch.float32 for k, p in lora.items())
    assert any(p.abs().sum() > 0 for k, p in lora.items() if "lora_B" in k)
    folder = str(tmp_path / "a" / "tiny_sdxl" / "sdxl")
    assert same_weights(teacher, UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(torch.bfloat16))
    seen = []
    G.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        straight["G"](torch.randn(1, 4, 8, 8), straight["text"](promptsets.BUILTIN_PROMPTS[:1]))
    assert seen == [torch.float32]
    dipp.main(common + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "b")])
    resumed = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "b"),
                                  "--resume_from_checkpoint", "latest"])
    assert same_weights(straight["G"].net, resumed["G"].net) and same_weights(straight["fake"], resumed["fake"])
    exported = UNet2DConditionModel.from_pretrained(str(tmp_path / "a" / "generator"))
    assert not any("lora" in k for k in exported.state_dict()) and exported.config.addition_embed_type == "text_time"


def test_sdxl_pre_encoded_training_equals_encoding_every_step(tmp_path, monkeypatch):
    """SDXL pre-encodes (families.FAMILIES["sdxl"].pre_encode): both text encoders encode the prompt lists once and
    are freed before the UNets exist. One step with CFG from the cached SDXLText rows equals the same step with the
    encoders kept and run every step (pre_encode off) to float rounding: c of every prompt and of "" within 1e-6 (the
    pooled projection rounds differently at another batch size), the logged losses within 1e-5 relative, and
    generator and fake score alike but for < 0.1 % of their elements (Adam's first step is ≈ ±lr wherever the
    gradient is not 0, so a rounding-size gradient element can flip: 0.02-0.03 % measured; ∅ = the encoded ""
    instead of zeros in one of the runs makes 6 % of the generator's elements differ)."""
    import dataclasses
    folder = tiny_sdxl_models()[0]
    common = ["--pretrained_model_name_or_path", folder, "--reward", "none", "--guidance_scale", "3",
              "--max_train_steps", "1", "--learning_rate", "1e-2", "--fake_learning_rate", "1e-2"]
    cached = dipp.main(common + ["--output_dir", str(tmp_path / "a")])
    assert cached["text_encoder"] is None and len(os.listdir(tmp_path / "a" / "text_embeddings")) == 1
    monkeypatch.setitem(families.FAMILIES, "sdxl", dataclasses.replace(families.FAMILIES["sdxl"], pre_encode=False))
    every_step = dipp.main(common + ["--output_dir", str(tmp_path / "b")])
    assert isinstance(every_step["text_encoder"], families.TextEncoders)
    assert not (tmp_path / "b" / "text_embeddings").exists()
    for prompt in promptsets.BUILTIN_PROMPTS + [""]:
        for x, y in zip(cached["text"]([prompt]), every_step["text"]([prompt])):
            assert torch.allclose(x, y, rtol=0, atol=1e-6), prompt
    logs = [json.loads(open(tmp_path / run / "log.jsonl").readlines()[-1]) for run in "ab"]
    for k in ("loss_fake", "loss_ikl", "grad_ikl"):
        assert abs(logs[0][k] - logs[1][k]) <= 1e-5 * abs(logs[1][k]), (k, logs)
    teacher = every_step["teacher"].state_dict()
    for a, b in ((cached["G"].net, every_step["G"].net), (cached["fake"], every_step["fake"])):
        a, b = a.state_dict(), b.state_dict()
        differ = sum(((a[k] - b[k]).abs() > 1e-6).sum() for k in a) / sum(v.numel() for v in a.values())
        assert distance(a, teacher) > 0.01 and differ < 1e-3, differ


def test_sdxl_shapes_are_sdxl_base():
    """--random_weights sdxl (for --benchmark) has SDXL-base-1.0's parameter counts: UNet 2.567 B, CLIP-L text
    123 M, CLIP-bigG text with projection 695 M (built on the meta device: nothing allocated)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    arch = random_weights.SHAPES["sdxl"]
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        assert round(count(UNet2DConditionModel(**arch["unet"])) / 1e6) == 2567
        assert round(count(CLIPTextModel(CLIPTextConfig(**arch["text"]))) / 1e6) == 123
        assert round(count(CLIPTextModelWithProjection(CLIPTextConfig(**arch["text2"]))) / 1e6) == 695
    assert random_weights.model_subfolder("sdxl") == "sdxl" and families.FAMILIES["sdxl"].recognise(
        {"unet": 1, "text_encoder": 1, "text_encoder_2": 1}) and not families.FAMILIES["sd"].recognise({"unet": 1, "text_encoder_2": 1})


def test_sdxl_compile_and_benchmark_keep_the_math_and_an_incomplete_folder_is_one_line(tmp_path, monkeypatch):
    """On SDXL: one --compile --benchmark step (aot_eager) is within 0.1 % of the plain step's update and prints a
    BENCHMARK line; a folder whose model_index.json names text_encoder_2 but lacks it is one line."""
    import shutil
    monkeypatch.setattr(plumbing, "COMPILE_BACKEND", "aot_eager")
    common = ["--random_weights", "tiny_sdxl", "--max_train_steps", "1", "--learning_rate", "1e-3",
              "--fake_learning_rate", "1e-3", "--reward_scale", "10", "--benchmark"]
    plain = dipp.main(common + ["--output_dir", str(tmp_path / "m")])
    compiled = dipp.main(common + ["--output_dir", str(tmp_path / "m"), "--compile", "default"])
    assert compiled["G"].net._compiled_call_impl is not None and compiled["teacher"]._compiled_call_impl is not None
    assert compiled["benchmark"] is not None
    teacher = plain["teacher"].state_dict()
    for a, b in ((plain["G"].net, compiled["G"].net), (plain["fake"], compiled["fake"])):
        a, b = a.state_dict(), b.state_dict()
        diff, update = distance(a, b), distance(a, teacher)
        assert update > 0.01 and diff < 1e-3 * update, (diff, update)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_models()[0], broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", **{
        k: ["x", "y"] for k in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}}))
    msg = error_of(["--pretrained_model_name_or_path", str(broken), "--output_dir", str(tmp_path / "r")])
    assert "SDXL folder: missing text_encoder_2/config.json" in msg and "\n" not in msg


def test_sdxl_two_process_ddp_equals_one_process_with_global_batch(tmp_path):
    """2 CPU processes (gloo, two_processes) × batch 1 on SDXL (SDXLText through DDP's forward) gives the generator
    one process with batch 2 gives, up to float summation order (the 2 % bound of the SD test)."""
    one, ddp, init = ddp_and_one_process(tmp_path, "tiny_sdxl", "sdxl/unet")
    diff, update = distance(one, ddp), distance(one, init)
    assert update > 0.01 and diff < 0.02 * update, (diff, update)


def test_sdxl_benchmark_sweep_runs_on_tiny_sdxl(tmp_path):
    """bench/sweep.py --family sdxl runs the benchmark on tiny SDXL models, writing only the models and the
    prompt cache."""
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import sweep
    rows = sweep.main(["--tiny", "--family", "sdxl", "--batches", "1", "--steps", "3", "--out", str(tmp_path),
                       "--setups", "lora64+checkpointing"])
    assert rows[0]["images_per_s"] > 0 and "--random_weights tiny_sdxl" in rows[0]["command"]
    assert set(os.listdir(tmp_path / "models")) == {"tiny_sdxl", "text_embeddings"}


# ----------------------------------------------------------------------------- the wiring of Alg. 1, against a hand-wired reference
# The tests above check each piece against an independent computation; runs that agree with each other (resume =
# straight, DDP = one process, compile = eager) cannot see a wrong wiring, since two runs of it agree. Here one
# iteration of the real training loop (dipp.main) is checked against the same iteration written out by hand from
# METHOD.md, and the wiring's single points (prompt draw, keep-last-K, stop-gradient, reward sign) one by one.

def run_recording_the_draws(monkeypatch, argv):
    """dipp.main(argv), one step; returns its result, the torch RNG state at the top of that step and the (z, t, ε)
    that draw_noise returned. train() reads its clock (plumbing.benchmark_clock) first thing in a step, before it
    draws the prompts and the noise: from that state a test replays the draws by hand."""
    states, draws = [], []
    real_clock, real_draw = plumbing.benchmark_clock, dipp.draw_noise

    def recording_clock(cfg, device):
        clock = real_clock(cfg, device)
        return lambda: (states.append(torch.get_rng_state()), clock())[1]

    monkeypatch.setattr(plumbing, "benchmark_clock", recording_clock)
    monkeypatch.setattr(dipp, "draw_noise", lambda *a, **k: draws.append(real_draw(*a, **k)) or draws[-1])
    return dipp.main(argv), states[0], draws


def hand_wired_family(kind, folder):
    """What the reference needs of a model family, from the diffusers / transformers classes as the stock pipelines
    use them (not from dipp or families.py): the denoiser, prompts -> c, ε̂ = eps(net, x_t, t, c), c repeated over a
    batch, and t*: SD's CLIP text padded to 77 tokens and DMD2's t* = 999; PixArt-α's lower-cased T5 text padded to
    120 tokens with its mask, ε̂ the first half of the 8 output channels, and PixArt-α-DMD's t* = 400."""
    if kind == "sd":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        return dict(net=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"), t_star=999,
                    encode=lambda prompts: text(tok(prompts, padding="max_length", max_length=77, truncation=True,
                                                    return_tensors="pt").input_ids)[0],
                    eps=lambda net, x, t, c: net(x, t, encoder_hidden_states=c).sample,
                    repeat=lambda c, B: c.expand(B, -1, -1))
    from diffusers import PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel
    tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder")

    def encode(prompts):
        ids = tok([p.lower() for p in prompts], padding="max_length", max_length=120, truncation=True,
                  return_tensors="pt")
        return t5(ids.input_ids, attention_mask=ids.attention_mask)[0], ids.attention_mask
    return dict(net=PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer"), t_star=400,
                encode=encode, eps=lambda net, x, t, c: pixart_eps_by_hand(net, x, t, *c),
                repeat=lambda c, B: (c[0].expand(B, -1, -1), c[1].expand(B, -1)))


def hand_wired_iteration(kind, folder, clip, rng_state, prompts, B, omega, K, reward_scale, lr):
    """One iteration of Alg. 1 written out from METHOD.md with explicit autograd, and what each part contributes.
    From rng_state: c ~ U(prompts) (B of them), then K_TA + 1 draws of z ~ N(0, I), t ~ U{20..980}, ε ~ N(0, I).
    (1) K_TA fake-score updates, θ frozen: DSM ‖ε̂_ψ(α sg[g_θ(z)] + σ ε, t, c) − ε‖², mean over batch and dims.
    (2) one generator update with the updated ψ frozen: ∂L/∂x0 = w α (ε̃_ref − ε̂_ψ)/σ with w = σ²/α² and
        ε̃_ref = ε_∅ + ω (ε_c − ε_∅) from separate teacher calls on c and on the empty prompt, plus −α_rew ∂r/∂x0
        by autograd of r = cos(CLIP image features of the VAE's decoding of x0, CLIP text features); mean over
        the batch; backpropagated into θ through g_θ(z, c) = (z − σ_{t*} ε̂_θ(z, t*, c)) / α_{t*}.
    Each net is stepped by torch.optim.Adam(lr, betas=(0, 0.999)) (Diff-Instruct's, METHOD.md §7)."""
    import copy
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPModel, CLIPTokenizer
    F = torch.nn.functional
    fam = hand_wired_family(kind, folder)
    abar = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod  # (T,), the folder's own
    alpha, sigma = (lambda t: abar[t].sqrt().view(-1, 1, 1, 1)), (lambda t: (1 - abar[t]).sqrt().view(-1, 1, 1, 1))
    eps = fam["eps"]
    teacher = fam["net"].eval().requires_grad_(False)
    G, fake = (copy.deepcopy(teacher).train().requires_grad_(True) for _ in "ab")  # θ0 = ψ0 = the teacher
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval().requires_grad_(False)
    clip_model, clip_tok = CLIPModel.from_pretrained(clip).eval().requires_grad_(False), CLIPTokenizer.from_pretrained(clip)
    g = torch.Generator()
    g.set_state(rng_state)
    batch = [prompts[i] for i in torch.randint(len(prompts), (B,), generator=g).tolist()]
    draws = [(torch.randn(B, 4, 8, 8, generator=g), torch.randint(20, 981, (B,), generator=g),
              torch.randn(B, 4, 8, 8, generator=g)) for _ in range(K + 1)]
    with torch.no_grad():
        cond, null = fam["encode"](batch), fam["repeat"](fam["encode"]([""]), B)
        text = F.normalize(clip_model.get_text_features(**clip_tok(batch, padding=True, return_tensors="pt")), dim=-1)
    t_star = torch.full((B,), fam["t_star"])
    generate = lambda z: (z - sigma(t_star) * eps(G, z, t_star, cond)) / alpha(t_star)
    opt_G, opt_fake = (torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999)) for net in (G, fake))
    fake_before = copy.deepcopy(fake)
    for z, t, e in draws[:K]:  # (1)
        with torch.no_grad():
            x0 = generate(z)
        opt_fake.zero_grad()
        (eps(fake, alpha(t) * x0 + sigma(t) * e, t, cond) - e).pow(2).mean().backward()
        opt_fake.step()
    z, t, e = draws[K]  # (2)
    x0 = generate(z)
    with torch.no_grad():
        x_t = alpha(t) * x0 + sigma(t) * e
        e_c, e_null = eps(teacher, x_t, t, cond), eps(teacher, x_t, t, null)
        e_fake, e_fake_before = eps(fake, x_t, t, cond), eps(fake_before, x_t, t, cond)
    w_alpha_over_sigma = sigma(t) ** 2 / alpha(t) ** 2 * alpha(t) / sigma(t)
    image = vae.decode(x0 / vae.config.scaling_factor).sample  # [-1, 1]
    pixels = rewards.clip_preprocess(image, clip_model.config.vision_config.image_size)
    r = (F.normalize(clip_model.get_image_features(pixel_values=pixels), dim=-1) * text).sum(-1)  # (B,)
    params = list(G.parameters())
    grad = lambda out, d_out=None: torch.autograd.grad(out, params, d_out, retain_graph=True)
    ikl = grad(x0, w_alpha_over_sigma * (e_null + omega * (e_c - e_null) - e_fake) / B)
    reward = grad(-reward_scale * r.mean())
    parts = {"guidance": grad(x0, w_alpha_over_sigma * (omega - 1) * (e_c - e_null) / B), "reward": reward,
             "fake update": grad(x0, w_alpha_over_sigma * (e_fake_before - e_fake) / B)}
    for p, a, b in zip(params, ikl, reward):
        p.grad = a + b
    opt_G.step()
    return dict(G=G, fake=fake, opt_G=opt_G, opt_fake=opt_fake, draws=draws, parts=parts,
                grad=[p.grad for p in params])


def assert_same_adam_update(run_net, run_state, ref_net, ref_opt, lr, what):
    """The run's update of one net equals the reference's. Adam's moments are compared to float tolerance: with
    β1 = 0 its first moment *is* the last gradient, its second the squares (Adam's first step, ≈ lr·sign(g),
    would hide a gradient's scale). The weights are the reference's to float precision wherever √v is not within
    rounding of 0 (there the sign of a float-noise gradient decides a ±lr step; < 1 % of the entries) or is exactly
    0, PixArt's to_k biases left out (a zero gradient that rounds to noise: see but_key_bias)."""
    names = [k for k, p in run_net.named_parameters() if p.requires_grad]
    ref = dict(ref_net.named_parameters())
    assert names == list(ref), what
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = [run_state[i][key] for i in range(len(names))], [ref_opt.state[ref[k]][key] for k in names]
        err = sum((x - y).pow(2).sum() for x, y in zip(a, b)).sqrt() / sum(y.pow(2).sum() for y in b).sqrt()
        assert err < 1e-4, (what, key, float(err))
    weights, kept, total = run_net.state_dict(), 0, 0
    for k in but_key_bias(dict.fromkeys(names)):
        scale = ref_opt.state[ref[k]]["exp_avg_sq"].sqrt()
        sure = (scale > 1e-3 * scale.pow(2).mean().sqrt()) | (scale == 0)  # 0: e.g. PixArt's learned-σ rows
        kept, total = kept + int(sure.sum()), total + sure.numel()
        diff = (weights[k] - ref[k].detach())[sure].abs().max() if sure.any() else 0
        assert diff <= 1e-4 * lr, (what, k, float(diff))
    assert kept > 0.99 * total, (what, kept, total)


def check_iteration_against_hand_wired(monkeypatch, tmp_path, kind, argv, omega, K, reward_scale, lr=1e-3, B=2):
    """One step of dipp.main(argv) against hand_wired_iteration on the models the run built and loaded: the same
    draws, each part of the reference's generator gradient > 1 % of it, and the same update of both nets (the
    optimiser states from the run's checkpoint-1, the weights from the nets it returns)."""
    out = tmp_path / "run"
    nets, rng_state, run_draws = run_recording_the_draws(monkeypatch, argv + [
        "--max_train_steps", "1", "--train_batch_size", str(B), "--learning_rate", str(lr), "--fake_learning_rate",
        str(lr), "--reward_scale", str(reward_scale), "--device", "cpu", "--output_dir", str(out)])
    models = out / ("tiny" if kind == "sd" else "tiny_pixart")
    ref = hand_wired_iteration(kind, str(models / ("sd" if kind == "sd" else "pixart")), str(models / "clip"),
                               rng_state, promptsets.BUILTIN_PROMPTS, B, omega, K, reward_scale, lr)
    assert len(run_draws) == K + 1 and all(torch.equal(a, b) for d, e in zip(run_draws, ref["draws"]) for a, b in zip(d, e)), \
        "the run's (z, t, ε) are not N(0, I), U{20..980}, N(0, I) drawn after the prompts, K_TA + 1 times"
    size = lambda grads: sum(x.pow(2).sum() for x in grads).sqrt()
    for part, grads in ref["parts"].items():  # each is far above the tolerance: leaving it out fails the test
        assert size(grads) > 0.01 * size(ref["grad"]), (part, float(size(grads) / size(ref["grad"])))
    state = torch.load(out / "checkpoint-1" / "state.pt", weights_only=True)
    assert_same_adam_update(nets["G"].net, state["opt_G"]["state"], ref["G"], ref["opt_G"], lr, "generator")
    assert_same_adam_update(nets["fake"], state["opt_fake"]["state"], ref["fake"], ref["opt_fake"], lr, "fake score")


def test_one_sd_iteration_equals_alg1_wired_by_hand(tmp_path, monkeypatch):
    """`dipp.py --tiny` for one step (batch 2, reward on) gives the generator and fake-score updates of Alg. 1 wired
    by hand (hand_wired_iteration): same prompts and noise, teacher on c and on ∅ with ω, fake score trained first,
    reward ascended. It runs with the method's defaults, ω = 1.75 (DMD2), K_TA = 1, w = σ²/α², π = U{20..980} and
    Adam β = (0, 0.999), so a changed default fails it too. The guidance, the reward and the fake update each move
    the generator's gradient by > 1 % (the tolerance is 0.01 %): a swapped argument, a swapped branch or a missing
    term fails."""
    check_iteration_against_hand_wired(monkeypatch, tmp_path, "sd", ["--tiny"], omega=1.75, K=1, reward_scale=10)


def test_one_pixart_iteration_equals_alg1_wired_by_hand(tmp_path, monkeypatch):
    """The same on tiny PixArt-α (T5 text with its mask, ∅ = the empty prompt's embedding and mask), with ω = 3 and
    K_TA = 2: two fake-score updates on fresh draws, then the generator update against the twice-updated ψ. (α_rew =
    1000: at PixArt's high t, σ/α reaches ~100 and the tiny CLIP reward's pull would be below 1 % of the IKL's.)"""
    check_iteration_against_hand_wired(monkeypatch, tmp_path, "pixart", [
        "--random_weights", "tiny_pixart", "--guidance_scale", "3", "--fake_steps_per_G", "2"],
        omega=3.0, K=2, reward_scale=1000)


def test_prompts_are_drawn_from_the_whole_file(tmp_path, monkeypatch):
    """c ~ U(prompt file): a one-line file trains (its prompt is all there is to draw), and a batch of 16 from a
    two-line file holds both lines, the last one included (a uniform draw misses one with probability 2⁻¹⁵)."""
    import dataclasses
    sd, seen = families.FAMILIES["sd"], []
    monkeypatch.setitem(families.FAMILIES, "sd", dataclasses.replace(
        sd, encode=lambda tok, enc, prompts: seen.append(list(prompts)) or sd.encode(tok, enc, prompts)))
    for lines, B in ((["a red fox"], 1), (["a red fox", "a blue whale"], 16)):
        (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
        seen.clear()
        dipp.main(["--tiny", "--benchmark", "--reward", "none", "--max_train_steps", "1", "--train_batch_size", str(B),
                   "--prompts", str(tmp_path / "prompts.txt"), "--device", "cpu", "--output_dir", str(tmp_path / "run")])
        drawn = [p for batch in seen if batch != [""] for p in batch]
        assert len(drawn) == B and set(drawn) == set(lines), (lines, drawn)


def test_keep_last_k_orders_checkpoints_by_step(tmp_path):
    """Ten checkpoints with a limit of 3 leave checkpoint-8, -9 and -10, and `latest` resumes step 10. (Sorted as
    text, checkpoint-10 comes before checkpoint-7: pruning would delete the one just written.)"""
    cfg = dipp.Config(output_dir=str(tmp_path), checkpoints_total_limit=3, resume_from_checkpoint="latest")
    nets = lambda: {"generator": torch.nn.Linear(2, 2), "fake_score": torch.nn.Linear(2, 2)}
    rng = plumbing.rng_states(torch.device("cpu"), 1)
    for step in range(1, 11):
        saved = nets()
        torch.nn.init.constant_(saved["generator"].weight, step)
        plumbing.save_checkpoint(cfg, step, saved, 999, {}, rng=rng)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-8", "checkpoint-9"]
    assert plumbing.list_checkpoints(str(tmp_path))[-1] == str(tmp_path / "checkpoint-10")
    resumed = nets()
    assert plumbing.load_checkpoint(cfg, resumed, {}) == 10
    assert torch.all(resumed["generator"].weight == 10)


def test_generator_update_differentiates_neither_score_network():
    """METHOD.md §3: both score networks are evaluated without gradient, only the explicit x_t carries one to θ.
    Under every w(t), a generator update leaves the parameters of the teacher and of the fake score (both
    trainable here) without a .grad (none was computed), while θ's have one."""
    sd = families.FAMILIES["sd"]
    cond = torch.randn(2, 77, 32)
    G, _, _ = tiny_sd_nets()
    teacher, fake = tiny_unet(0).requires_grad_(True), tiny_unet(1).requires_grad_(True)
    teacher_eps = dipp.guided(dipp.denoiser_eps(teacher, sd), cond, torch.zeros_like(cond), 2.0)
    fake_eps = lambda x, t: dipp.denoiser_eps(fake, sd)(x, t, cond)
    noise = (torch.randn(2, 4, 8, 8), torch.tensor([200, 800]), torch.randn(2, 4, 8, 8))
    params = list(G.parameters())
    for weighting in ("x0", "eps", "dmd2"):
        G.zero_grad(set_to_none=True)
        generator_update(lambda z: G(z, cond), teacher_eps, fake_eps, None, params,
                            torch.optim.AdamW(params, lr=1e-5), torch.amp.GradScaler("cpu", enabled=False), noise,
                            G.schedule, dipp.Config(reward="none", ikl_weighting=weighting))
        assert all(p.grad is None for p in [*teacher.parameters(), *fake.parameters()]), weighting
        assert sum(p.grad.abs().sum() for p in params if p.grad is not None) > 0, weighting


def test_generator_update_ascends_the_reward():
    """The reward's gradient has the sign that raises it: with the fake score equal to the teacher (the IKL gradient
    is exactly 0), the gradient a generator update hands Adam is autograd's −α_rew ∂ mean r / ∂θ of the reward
    alone, and the reward of the same z is higher after the update."""
    cond = torch.randn(2, 77, 32)
    G, real, _ = tiny_sd_nets()
    real_c = lambda x, t: real(x, t, cond)
    target = torch.randn(1, 4, 8, 8)
    reward = lambda x0: -(x0 - target).pow(2).flatten(1).mean(1)  # (B,), highest at x0 = target
    noise = (torch.randn(2, 4, 8, 8), torch.tensor([300, 700]), torch.randn(2, 4, 8, 8))
    cfg, params = dipp.Config(reward_scale=3.0), list(G.parameters())
    before = reward(G(noise[0], cond))
    expected = torch.autograd.grad(-cfg.reward_scale * before.mean(), params)
    generator_update(lambda z: G(z, cond), real_c, real_c, reward, params,
                        torch.optim.AdamW(params, lr=1e-6, betas=(0.0, 0.999), weight_decay=0.0),
                        torch.amp.GradScaler("cpu", enabled=False), noise, G.schedule, cfg)
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-6 * e.abs().max().item())
    with torch.no_grad():
        after = reward(G(noise[0], cond))
    assert after.mean() > before.mean().detach() + 1e-6, (before, after)
