"""Tests for the SD3.5 family (issue 33): a flow-matching teacher behind the same method. Each check compares
dipp with diffusers' own FlowMatchEulerDiscreteScheduler and StableDiffusion3Pipeline on tiny random weights of the
real classes (random_weights.py, `--random_weights tiny_sd3`). CPU, offline.

Run: pytest -q test_sd3.py
"""
import functools
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the model hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

import dipp
import families
import promptsets
import random_weights

TMP = tempfile.gettempdir()
CPU = torch.device("cpu")
PROMPTS = ["a red bicycle", "a fox in the snow"]


@functools.lru_cache(maxsize=None)
def tiny_sd3_models(folder=os.path.join(TMP, "dipp-test-tiny-sd3")):
    """A tiny SD3.5 folder (SD3Transformer2DModel with dual attention and RMS q/k norm, CLIP-L + bigG with
    projections of other widths, T5, three tokenizers, a 16-channel VAE with scaling and shift factors, SD3.5's
    flow scheduler config, shift 3) + CLIP, written once per session."""
    return random_weights.build_random(folder, "tiny_sd3")


def moved_transformer(folder, seed=0):
    """The folder's transformer, moved off its init (a random init's proj_out is zero: every v̂ would be 0)."""
    from diffusers import SD3Transformer2DModel
    net = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    torch.manual_seed(seed)
    for p in net.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return net


def sd3_pipeline(folder, transformer, t5=True, scheduler=None):
    """A stock StableDiffusion3Pipeline from the folder's own parts (it encodes the prompts itself); without T5 as
    the pipeline allows (text_encoder_3=None, tokenizer_3=None)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    get = lambda cls, sub: cls.from_pretrained(folder, subfolder=sub)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=get(AutoencoderKL, "vae"),
        scheduler=scheduler or get(FlowMatchEulerDiscreteScheduler, "scheduler"),
        text_encoder=get(CLIPTextModelWithProjection, "text_encoder"), tokenizer=get(CLIPTokenizer, "tokenizer"),
        text_encoder_2=get(CLIPTextModelWithProjection, "text_encoder_2"),
        tokenizer_2=get(CLIPTokenizer, "tokenizer_2"),
        text_encoder_3=get(T5EncoderModel, "text_encoder_3") if t5 else None,
        tokenizer_3=get(T5TokenizerFast, "tokenizer_3") if t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def without_t5(folder, tmp_path):
    """The folder without text_encoder_3/ and tokenizer_3/ (links to the rest): SD3 as its pipeline runs without T5."""
    out = tmp_path / "no_t5"
    out.mkdir()
    for sub in os.listdir(folder):
        if sub not in ("text_encoder_3", "tokenizer_3"):
            os.symlink(os.path.join(folder, sub), out / sub)
    return str(out)


def test_sd3_schedule_is_its_flow_schedulers_sigmas():
    """dipp.load_teacher on an SD3 folder gives the flow forward process: σ_t is FlowMatchEulerDiscreteScheduler's
    own training sigmas (shift 3) bit for bit, t = 0 the least noisy; by hand σ_t = 3s / (1 + 2s), s = (t + 1)/1000;
    α_t = 1 − σ_t, so x_t = α_t x0 + σ_t ε is the scheduler's own scale_noise; σ_999 = 1 exactly (α = 0, t*)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    folder = tiny_sd3_models()[0]
    models = dipp.load_teacher(folder, CPU, torch.float32, text_encoder=False)
    assert models.family.name == "sd3" and models.family.forward_process == "flow"
    alpha, sigma = models.schedule.alpha_sigma(torch.arange(1000), 1)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert torch.equal(sigma, scheduler.sigmas.flip(0)) and torch.equal(alpha, 1 - sigma)
    s = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(sigma.double(), 3 * s / (1 + 2 * s), rtol=0, atol=1e-6)  # (float32: 2e-7)
    assert sigma[999] == 1 and alpha[999] == 0 and sigma[0] > 0
    x0, eps, t = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4), torch.tensor([0, 500, 980])
    a, sg = models.schedule.alpha_sigma(t, 4)
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[999 - t], eps)  # (its timesteps run from noisy to clean)
    assert torch.allclose(dipp.add_noise(x0, eps, a, sg), theirs, rtol=0, atol=1e-6)


def test_sd3_eps_and_x0_from_the_velocity_match_the_schedulers_step():
    """The SD3 transformer seen as ε(x_t, t, c) and as the generator's x̂0: at σ_t of the training grid (t = 999
    included, where α = 0), family.x0 equals one step of a FlowMatchEulerDiscreteScheduler from σ_t to 0 given the
    pipeline's own call of the transformer (timestep 1000 σ_t), bit for bit; ε̂ = x_t + (1 − σ) v̂ is consistent
    with it (x_t = (1 − σ) x̂0 + σ ε̂, ε̂ − x̂0 = v̂); and a velocity that is exactly ε − x0 gives back ε and x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    folder = tiny_sd3_models()[0]
    fam, schedule = families.FAMILIES["sd3"], dipp.load_teacher(folder, CPU, torch.float32, text_encoder=False).schedule
    net = moved_transformer(folder)
    torch.manual_seed(1)
    c = families.SD3Text(torch.randn(2, 333, 96), torch.randn(2, 56))
    for t_int in (999, 700, 100):
        t = torch.full((2,), t_int)
        _, sigma = schedule.alpha_sigma(t, 4)
        x_t = torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            v = net(hidden_states=x_t, timestep=(sigma.flatten() * 1000), encoder_hidden_states=c.emb,
                    pooled_projections=c.pooled).sample
            step = FlowMatchEulerDiscreteScheduler(shift=1.0)  # (no shift: its one sigma is σ_t itself)
            step.set_timesteps(sigmas=[sigma[0].item()])
            assert step.timesteps[0] == sigma[0, 0, 0, 0] * 1000
            theirs = step.step(v, step.timesteps[0], x_t).prev_sample  # x_t + (0 − σ) v̂
            x0 = fam.x0(net, x_t, t, c, sigma)
            eps = dipp.denoiser_eps(net, fam, schedule)(x_t, t, c)
        assert torch.equal(x0, theirs), t_int
        assert torch.allclose(eps - x0, v, atol=1e-5) and torch.allclose((1 - sigma) * x0 + sigma * eps, x_t, atol=1e-5)
        assert v.abs().mean() > 0.1  # the check is not vacuous
    # a perfect velocity v = ε − x0 at x_t = (1 − σ) x0 + σ ε: the conversion gives the true ε and x0 back
    x0, noise, t = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8), torch.tensor([20, 500, 980])
    alpha, sigma = schedule.alpha_sigma(t, 4)
    x_t = dipp.add_noise(x0, noise, alpha, sigma)
    perfect = lambda **kw: type("Out", (), {"sample": noise - x0})()
    assert torch.allclose(fam.eps(perfect, x_t, t, c, sigma), noise, atol=1e-5)
    assert torch.allclose(fam.x0(perfect, x_t, t, c, sigma), x0, atol=1e-5)


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_null_and_cfg_are_what_the_stock_pipeline_passes_its_transformer(t5, tmp_path):
    """A stock StableDiffusion3Pipeline call with CFG (ω = 3, no negative prompt), hooked at its transformer, with
    T5 and without (text_encoder_3=None; dipp: a folder without text_encoder_3/): the joint-attention states and
    pooled projections it passes are bit for bit dipp's c and ∅ (the empty prompt encoded, not zeroed), stacked
    (∅, c), at timestep 1000 (σ = 1); ε̂ of the family on that input is x_t + (1 − σ) v̂ of the transformer's output,
    and dipp.guided gives the pipeline's guided velocity, converted."""
    folder = tiny_sd3_models()[0]
    folder = folder if t5 else without_t5(folder, tmp_path)
    fam, _, _, encoders, tokenizer, schedule = dipp.load_teacher(folder, CPU, torch.float32)
    assert (encoders.third is not None) == t5 and (tokenizer[2] is not None) == t5 and encoders.joint_dim == 96
    net = moved_transformer(folder)
    seen = []
    net.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out[0])), with_kwargs=True)
    pipe = sd3_pipeline(folder, net, t5=t5)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe(PROMPTS, num_inference_steps=1, guidance_scale=3.0, latents=z, output_type="latent")
    kw, v = seen[0]
    encode = lambda p: fam.encode(tokenizer, encoders, p)
    c, null = encode(PROMPTS), families.null_condition(fam, encode)
    # ∅ as the pipeline encodes it, [""] × B in one batch: dipp's ∅ (a batch of 1) differs from it in the last bit
    # of the pooled projection only (CLIP's text_projection matmul rounds by batch size: 2.4e-7 measured)
    null_b = encode([""] * 2)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(null_b, null.expand_as(c)))
    both = dipp.batch_cat(null_b, c)
    assert torch.equal(kw["encoder_hidden_states"], both.emb) and torch.equal(kw["pooled_projections"], both.pooled)
    assert c.emb.shape == (2, 77 + 256, 96) and c.pooled.shape == (2, 32 + 24)
    assert (c.emb[:, 77:].abs().sum() > 0) == t5 and c.emb[:, :77, 32 + 48:].abs().sum() == 0  # T5's rows; padding
    assert torch.equal(kw["timestep"], torch.full((4,), 1000.0)) and torch.equal(kw["hidden_states"], torch.cat([z, z]))
    t = torch.full((4,), 999)
    with torch.no_grad():  # the family's call of the transformer is the pipeline's: x̂0 = z − 1 · v̂ of its output
        x0 = fam.x0(net, torch.cat([z, z]), t, both, schedule.alpha_sigma(t, 4)[1])
        assert torch.equal(x0, torch.cat([z, z]) - v)
        t = torch.full((2,), 700)
        x = torch.randn(2, 16, 8, 8)
        guided = dipp.guided(dipp.denoiser_eps(net, fam, schedule), c, null_b, 3.0)(x, t)
        sigma = schedule.alpha_sigma(t, 4)[1]
        v_u, v_c = net(hidden_states=torch.cat([x, x]), timestep=torch.cat([sigma, sigma]).flatten() * 1000,
                       encoder_hidden_states=both.emb, pooled_projections=both.pooled).sample.chunk(2)
    # CFG is linear and ε̂ = x + (1 − σ) v̂ is affine in v̂ with a shared x: guiding ε̂ is guiding v̂ (the pipeline's)
    assert torch.allclose(guided, x + (1 - sigma) * (v_u + 3.0 * (v_c - v_u)), atol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-3  # the guidance really does something here


def test_sd3_training_run_and_its_export_reproduce_a_stock_one_step_sd3_call(tmp_path):
    """`python dipp.py --random_weights tiny_sd3 --max_train_steps 2` end to end (CFG ω = 1.75, the CLIP reward,
    a checkpoint): only the generator and the fake score move. The exported generator in a stock
    StableDiffusion3Pipeline with its own scheduler (one Euler step from σ = 1 to 0: num_inference_steps=1,
    guidance off; and the model card's call, sigmas=[1]) gives dipp's x0 = g_θ(z, c) = z − v̂ from the same z bit for
    bit, and `dipp.py --generate`'s images (through the VAE's scaling and shift factors) to 1e-4."""
    from diffusers import SD3Transformer2DModel
    out = str(tmp_path)
    nets = dipp.main(["--random_weights", "tiny_sd3", "--max_train_steps", "2", "--learning_rate", "1e-3",
                      "--fake_learning_rate", "1e-3", "--reward_scale", "10", "--checkpointing_steps", "2",
                      "--output_dir", out])
    folder = os.path.join(out, "tiny_sd3", "sd3")
    teacher = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    from test_dipp import same_weights as same
    assert nets["family"].name == "sd3" and nets["G"].t_star == 999
    config = json.load(open(os.path.join(out, "config.json")))  # π(t): the family's range (no --t_min / --t_max given)
    assert (config["t_min"], config["t_max"]) == (43, 812) == families.FAMILIES["sd3"].t_range
    assert same(nets["teacher"], teacher) and not same(nets["G"].net, teacher) and not same(nets["fake"], teacher)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1]["step"] == 2 and all(v == v for v in log[-1].values())
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))
    record = json.load(open(os.path.join(out, "generator", "dipp.json")))
    assert record["generator_timestep"] == 999 and record["family"] == "sd3"
    generator = SD3Transformer2DModel.from_pretrained(os.path.join(out, "generator"))
    pipe = sd3_pipeline(folder, generator)
    prompts = promptsets.BUILTIN_PROMPTS[:2]
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))  # dipp.generate's z with --seed 0
    theirs = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="latent").images
    encoders = families.load_text_encoder(folder, nets["family"], CPU, torch.float32)
    cond = nets["family"].encode(nets["tokenizer"], encoders, prompts)  # as the pipeline encodes these two
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(cond, nets["text"](prompts)))
    with torch.no_grad():
        ours = nets["G"](z, cond)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    card = open(os.path.join(out, "generator", "README.md")).read()  # its sampling call, as the card writes it:
    assert "sigmas=[1], guidance_scale=1)" in card and "DDPMScheduler" not in card
    assert torch.equal(pipe(prompts, sigmas=[1], guidance_scale=1, latents=z, output_type="latent").images, theirs)
    images = dipp.main(["--random_weights", "tiny_sd3", "--output_dir", out, "--generate", "|".join(prompts),
                        "--generator_init", os.path.join(out, "generator")])
    theirs = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt").images
    assert torch.allclose((images.clamp(-1, 1) + 1) / 2, theirs, atol=1e-4)
    assert theirs.std() > 0.01  # (images, not a constant)


def test_sd3_lora_adapter_in_a_stock_pipeline_reproduces_generate(tmp_path):
    """A LoRA run on tiny SD3 (rank 4, one step) writes pytorch_lora_weights.safetensors beside the merged
    transformer. A stock StableDiffusion3Pipeline on the *teacher* folder with `load_lora_weights(<run>/generator)`
    gets an adapter on every layer dipp trained, at dipp's scale α/r = 1, and one step from σ = 1 with guidance
    off, from the latents `dipp.py --generate` draws, gives --generate's images (1e-4: the unfused pipeline computes
    W x + B(A x) where the merged one computes (W + BA) x); the teacher alone gives other images."""
    import plumbing
    from peft.tuners.tuners_utils import BaseTunerLayer
    out = str(tmp_path)
    dipp.main(["--random_weights", "tiny_sd3", "--lora_rank", "4", "--max_train_steps", "1", "--learning_rate", "1e-2",
               "--fake_learning_rate", "1e-2", "--reward_scale", "10", "--output_dir", out])
    generator, folder = os.path.join(out, "generator"), os.path.join(out, "tiny_sd3", "sd3")
    record = json.load(open(os.path.join(generator, "dipp.json")))
    assert record["lora"]["rank"] == 4 and record["lora"]["alpha"] == 4
    images = dipp.main(["--generate", "|".join(PROMPTS), "--generator_init", generator, "--output_dir", out + "/gen"])
    from diffusers import SD3Transformer2DModel
    pipe = sd3_pipeline(folder, SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"))
    pipe.load_lora_weights(generator, weight_name=plumbing.LORA_FILE)  # (offline, diffusers needs weight_name)
    scales = [next(iter(m.scaling.values())) for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer)]
    assert len(scales) == record["lora"]["layers"] and set(scales) == {1.0}
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))  # dipp.generate's z, --seed 0
    run = lambda: pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt").images
    theirs = run()
    ours = (images.clamp(-1, 1) + 1) / 2
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    pipe.unload_lora_weights()
    assert (run() - theirs).abs().max() > 1e-3


def test_sd3_lora_ema_resume_bf16_and_checkpointing_in_one_run(tmp_path):
    """SD3 with --lora_rank --ema_decay --gradient_checkpointing --mixed_precision bf16: the base is one shared frozen
    bf16 transformer, adapters are fp32 and move, v̂ is read out in fp32 (proj_out); 2 steps straight equal 1 step +
    resume + 1 step, generator and fake score bit for bit."""
    folder, clip = tiny_sd3_models()
    common = ["--pretrained_model_name_or_path", folder, "--reward", "clip", "--reward_model_path", clip,
              "--lora_rank", "4", "--ema_decay", "0.5", "--gradient_checkpointing", "--mixed_precision", "bf16",
              "--learning_rate", "1e-2", "--fake_learning_rate", "1e-2", "--reward_scale", "10",
              "--checkpointing_steps", "1"]
    straight = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "a")])
    G, fake, teacher = straight["G"].net, straight["fake"], straight["teacher"]
    assert G.pos_embed.proj.weight is teacher.pos_embed.proj.weight is fake.pos_embed.proj.weight  # one base
    assert teacher.dtype == torch.bfloat16 and G.is_gradient_checkpointing and fake.is_gradient_checkpointing
    lora = {k: p for k, p in G.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in k and p.dtype == torch.float32 for k, p in lora.items())
    assert any(p.abs().sum() > 0 for k, p in lora.items() if "lora_B" in k)
    seen = []
    G.proj_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        straight["G"](torch.randn(1, 16, 8, 8), straight["text"](promptsets.BUILTIN_PROMPTS[:1]))
    assert seen == [torch.float32]
    dipp.main(common + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "b")])
    resumed = dipp.main(common + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "b"),
                                  "--resume_from_checkpoint", "latest"])
    from test_dipp import same_weights
    assert same_weights(straight["G"].net, resumed["G"].net) and same_weights(straight["fake"], resumed["fake"])


def test_sd3_generator_init_takes_a_transformer_folder_a_pipeline_folder_and_a_weight_file(tmp_path):
    """--generator_init on SD3: a transformer model folder, a pipeline folder holding transformer/ and a bare
    safetensors file give the same fp32 generator at t* = 999."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file
    folder = tiny_sd3_models()[0]
    fam, teacher, *_, schedule = dipp.load_teacher(folder, CPU, torch.float32, text_encoder=False)
    source = moved_transformer(folder, seed=3)
    source.save_pretrained(tmp_path / "model")
    source.save_pretrained(tmp_path / "pipe" / "transformer")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "generator.safetensors")
    want = source.state_dict()
    for init in ("model", "pipe", "generator.safetensors"):
        families.check_generator(fam, folder, str(tmp_path / init), "--generator_init")  # (no exit: it fits)
        G = dipp.build_generator(dipp.Config(generator_init=str(tmp_path / init)), teacher, fam, schedule, CPU)
        got = G.net.state_dict()
        assert G.t_star == 999 and all(torch.equal(got[k], want[k]) for k in want), init


def test_sd3_t_max_at_sigma_1_is_one_line(tmp_path):
    """--t_max 999 on SD3 puts π(t) where α = 0 (σ = 1: w(t) = σ²/α² infinite; given explicitly, it wins over the
    family's range): one line naming the largest t_max allowed, before the text encoders or the trainable nets
    exist; on SD1.5 (α_999 = 0.068) 999 is allowed."""
    folder = tiny_sd3_models()[0]
    with pytest.raises(SystemExit) as e:
        dipp.main(["--pretrained_model_name_or_path", folder, "--reward", "none", "--t_max", "999",
                   "--output_dir", str(tmp_path / "run")])
    message = str(e.value)
    assert "--t_max 999: α_t = 0 there" in message and "use --t_max <= 998" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
    import plumbing
    plumbing.check_config(dipp.Config(t_max=999), 1000, dipp.Schedule.scaled_linear().table[0])  # (no exit)


def test_a_gated_hub_model_without_access_is_one_line_saying_how_to_get_it(monkeypatch):
    """SD3.5's weights are gated. The hub's answer to a user who has not accepted the licence (huggingface_hub's
    GatedRepoError, raised where diffusers downloads model_index.json; diffusers turns it into "not a valid model
    identifier") is one line naming the licence page and the login, not the advice to download the model."""
    import diffusers.configuration_utils
    from huggingface_hub.errors import GatedRepoError
    import plumbing

    def refused(repo_id, **kwargs):
        raise GatedRepoError(f"403 Client Error. Cannot access gated repo for url https://huggingface.co/{repo_id}.")
    monkeypatch.setattr(diffusers.configuration_utils, "hf_hub_download", refused)
    monkeypatch.setattr(plumbing, "hub_unreachable", lambda: None)  # (the tests are offline; the refusal is the hub's)
    name = "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(SystemExit) as e:
        families.find_family(name)
    message = str(e.value)
    assert f"accept its licence at https://huggingface.co/{name} and log in" in message and "\n" not in message
    assert "huggingface-cli download" not in message


def test_a_generator_of_another_family_for_an_sd3_teacher_is_one_line(tmp_path):
    """families.check_generator before any network: an SD-1.x UNet (folder or bare weight file) given to an SD3
    teacher, and SD3's transformer given to SD-1.x and PixArt-α teachers, are one line naming both families."""
    import test_dipp
    sd, sd3 = test_dipp.tiny_models()[0], tiny_sd3_models()[0]
    pixart = test_dipp.tiny_pixart_models()[0]
    cases = [(sd3, os.path.join(sd, "unet"), "holds a SD-1.x UNet2DConditionModel, but the teacher is SD3"),
             (sd3, os.path.join(sd, "unet", "diffusion_pytorch_model.safetensors"),
              "holds the weights of a SD-1.x UNet2DConditionModel, but the teacher is SD3"),
             (sd, os.path.join(sd3, "transformer"), "holds a SD3 SD3Transformer2DModel, but the teacher is SD-1.x"),
             (pixart, os.path.join(sd3, "transformer", "diffusion_pytorch_model.safetensors"),
              "holds the weights of a SD3 SD3Transformer2DModel, but the teacher is PixArt-α")]
    for teacher, init, expected in cases:
        with pytest.raises(SystemExit) as e:
            families.check_generator(families.check_folder(teacher), teacher, init, "--generator_init")
        message = str(e.value)
        assert message.startswith(f"dipp: error: --generator_init '{init}'") and expected in message, message
        assert "\n" not in message


def test_evaluate_samples_an_sd3_teacher_as_its_stock_pipeline_and_a_generator_as_generate(tmp_path):
    """evaluate.py on a tiny SD3.5 teacher (2 steps of its folder's flow scheduler at StableDiffusion3Pipeline's own
    default CFG, 7.0) and an SD3 generator export (dipp.json: t* = 999): the teacher's PNGs equal a stock
    StableDiffusion3Pipeline assembled here from the same seeds (its z drawn as evaluate.image_latents draws it),
    and the generator's equal `dipp.py --generate` with that prompt and seed, to 8-bit rounding."""
    import evaluate
    import plumbing
    from test_evaluate import png as saved_png
    folder = tiny_sd3_models()[0]
    teacher, generator = tmp_path / "teacher", str(tmp_path / "generator")
    teacher.mkdir()
    for sub in os.listdir(folder):  # the folder, with a transformer moved off its init (proj_out = 0: v̂ = 0)
        if sub != "transformer":
            os.symlink(os.path.join(folder, sub), teacher / sub)
    moved_transformer(folder, seed=0).save_pretrained(teacher / "transformer")
    moved_transformer(folder, seed=1).save_pretrained(generator)
    plumbing.write_generator_record(generator, 999)
    out = tmp_path / "eval"
    result = evaluate.main(["--tiny", "--pretrained_model_name_or_path", str(teacher), "--generator", generator,
                            "--teacher_steps", "2", "--max_prompts", "2", "--images_per_prompt", "1", "--metrics",
                            "clip", "--output_dir", str(out)])
    png = lambda r: saved_png(str(out), r)  # (H, W, 3) 8-bit values
    rows = result["models"]
    assert [m["kind"] for m in rows] == ["teacher", "generator"] and "CFG 7" in rows[0]["name"], rows[0]["name"]
    records = rows[0]["records"]
    pipe = sd3_pipeline(str(teacher), moved_transformer(folder, seed=0))
    cfg = pipe.transformer.config
    z = torch.stack([torch.randn(cfg.in_channels, cfg.sample_size, cfg.sample_size,
                                 generator=torch.Generator().manual_seed(r["seed"])) for r in records])
    with torch.no_grad():
        images = pipe([promptsets.BUILTIN_PROMPTS[r["prompt_index"]] for r in records], latents=z,
                      num_inference_steps=2, guidance_scale=7.0, output_type="pt").images
    theirs = (images * 255).round().int().permute(0, 2, 3, 1)
    ours = torch.stack([png(r) for r in records])
    assert (ours - theirs).abs().max() <= 1 and (ours[0] - ours[1]).abs().max() > 10  # (not vacuous)
    for r in rows[1]["records"]:
        images = dipp.main(["--pretrained_model_name_or_path", str(teacher), "--generator_init", generator,
                            "--generate", promptsets.BUILTIN_PROMPTS[r["prompt_index"]], "--seed", str(r["seed"]),
                            "--output_dir", str(tmp_path / "gen")])
        assert (png(r) - ((images[0].clamp(-1, 1) + 1) * 127.5).round().int().permute(1, 2, 0)).abs().max() <= 1
