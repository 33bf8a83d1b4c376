"""cost: what a DI++ run will cost before it starts. FLOPs of one training iteration (or of sampling one image)
and the peak GPU memory of one iteration (section 5), counted on the real architectures on PyTorch's meta device:
no weights, no memory, no GPU (a CPU takes seconds for the tiny shapes, about a minute for an SD1.5 iteration).

    python cost.py                        # SD1.5: FLOPs, time on an H100 and peak memory of each setup
    python cost.py --family pixart --batch 4 --device "NVIDIA A100-SXM4-80GB" --setups full lora
    python cost.py --which_card           # which card fits which setup of SD1.5, PixArt-α and SDXL (docs/cost.md)

How the count is made. torch.utils.flop_counter.FlopCounterMode sees every aten op and adds up the FLOPs of the
matrix products (mm, addmm, bmm, convolutions and their backward, attention): 2·m·n·k per matmul, a backward
pass 2× its forward (input and weight gradients; a weight-only or input-only gradient is 1×). It does *not*
count elementwise work (normalisation, activations, Adam's update, the loss): little arithmetic next to the
matrix products, but at small batch much of the time. iteration_flops builds dipp's own networks with dipp's own
builders on the meta device and runs dipp.dipp_step once, so the count follows the code: a switch that changes
what the code runs changes the count. The estimated time is FLOPs ÷ (the card's peak × UTILISATION).

Attention is counted as the arithmetic it does (QKᵀ and PV: 4·B·heads·L_q·L_k·d forward, twice that backward)
whichever kernel runs it, so a count on the meta device, a CPU or a GPU agree. (torch's own table counts a
flash kernel's backward as 2.5× its forward, for the scores it recomputes, and counts nothing for the CPU's
attention kernel.)

Not needed to understand DI++; it imports dipp and nothing in the training path imports it (--benchmark counts the
first, warm-up, iteration of the real run with the same counter, plumbing.flop_counter).
"""
import collections
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dipp
import families
import plumbing
import random_weights
import rewards

# -----------------------------------------------------------------------------
# 1. Counting


def count_flops(fn):
    """FLOPs of running fn() (forward and backward passes as they happen inside it), counted with the attention
    convention above (plumbing.flop_counter, which dipp.py's --benchmark uses too)."""
    with plumbing.flop_counter() as c:
        fn()
    return c.get_total_flops()

# -----------------------------------------------------------------------------
# 2. Cards: their dense bf16 peaks are plumbing.PEAK_TFLOPS (read by --benchmark too; the sources are noted there).

# UTILISATION, from ECOSYSTEM.md's only GPU data (H100 SXM, SD1.5 shapes, full fine-tuning, bf16 autocast, eager):
# ~13.5 TFLOP per iteration at batch 1, so ~8 × 13.5 = 108 TFLOP at batch 8, done in 0.78 s:
#     108 / 0.78 = 138 TFLOP/s achieved;  138 / 989.4 = 0.14 of the datasheet peak
# (0.18 of the 780 TFLOP/s that an 8192³ bf16 matmul reached on that card). Batch 1 is worse: 13.5 / 0.52 s =
# 26 TFLOP/s = 0.026. The default is the batch-8 figure, rounded: estimates at batch 1 are ~5× optimistic.
UTILISATION = 0.14


def estimate_seconds(flops, device_name=None, utilisation=None):
    """flops ÷ (peak × utilisation), in seconds; device_name None = the visible GPU. None when the peak is unknown."""
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    peak = plumbing.peak_tflops(device_name)
    return None if peak is None else flops / (peak * 1e12 * (UTILISATION if utilisation is None else utilisation))

# -----------------------------------------------------------------------------
# 3. dipp's networks on the meta device

META = torch.device("meta")  # the default device of the counts below
# BLIP's med_config.json, which ImageReward v1.0 ships on the hub (THUDM/ImageReward) and the image-reward package
# does not: BERT-base with cross-attention to the image (encoder_width is replaced by the ViT's width, 1024).
BLIP_MED_CONFIG = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                       hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02, intermediate_size=3072,
                       layer_norm_eps=1e-12, max_position_embeddings=512, model_type="bert", num_attention_heads=12,
                       num_hidden_layers=12, pad_token_id=0, type_vocab_size=2, vocab_size=30524, encoder_width=768,
                       add_cross_attention=True)
# T5-v1.1-XXL's encoder (PixArt-α's text encoder, 4.76 B parameters). random_weights keeps 2 of its 24 layers;
# training never runs it (dipp pre-encodes the prompts), sampling does.
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")
ALIASES = {"pixart": "pixart512"}  # the names this module takes for random_weights.SHAPES' keys


class MetaTokenizer:
    """A tokenizer for meta tensors: every prompt becomes max_length tokens (the pipelines pad to max_length: CLIP
    77, BLIP 35; the CLIP reward pads to its longest prompt, here counted at 77)."""

    def __init__(self, length=77):
        self.model_max_length = length

    def __call__(self, prompts, max_length=None, **kwargs):
        from transformers import BatchEncoding
        shape = (len(prompts), max_length or self.model_max_length)
        return BatchEncoding({"input_ids": torch.zeros(shape, dtype=torch.long),
                              "attention_mask": torch.ones(shape, dtype=torch.long)})


def architecture(shapes):
    """(random_weights.SHAPES entry, its families.Family) for a shapes name."""
    name = ALIASES.get(shapes, shapes)
    if name not in random_weights.SHAPES:
        plumbing.die(f"unknown shapes '{shapes}'; choose from {sorted(set(random_weights.SHAPES) | set(ALIASES))}")
    return random_weights.SHAPES[name], families.FAMILIES[random_weights.model_subfolder(name)]


def meta_imagereward():
    """ImageReward built by the image-reward package's own classes (BLIP ViT-L/16 at 224 + BERT-base with
    cross-attention + MLP) on the meta device, with BLIP's med_config and a MetaTokenizer for its BERT tokenizer."""
    sys.modules.setdefault("clip", type(sys)("clip"))  # as rewards.import_imagereward: an unused import
    import ImageReward as RM
    from accelerate import init_empty_weights  # (a dependency of peft)
    from ImageReward.models.BLIP import blip_pretrain
    original = blip_pretrain.init_tokenizer  # blip_pretrain imported the name: patch it there
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "med_config.json")
        json.dump(BLIP_MED_CONFIG, open(path, "w"))
        blip_pretrain.init_tokenizer = lambda: MetaTokenizer(35)
        try:  # not under torch.device(META): BLIP's ViT calls .item() while it builds; parameters go to meta
            with torch.device("cpu"), init_empty_weights():
                model = RM.ImageReward(med_config=path, device=META)
        finally:
            blip_pretrain.init_tokenizer = original
    return model.to(META)


# PickScore v1's tower (yuvalkirstain/PickScore_v1's config.json: laion's CLIP-ViT-H-14 in transformers' CLIPModel)
CLIP_H = dict(text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
              vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                          image_size=224, patch_size=14, hidden_act="gelu"), projection_dim=1024)
CLIP_L = dict(text=random_weights.SHAPES["sd15"]["text"], vision=random_weights.SHAPES["sd15"]["vision"],
              projection_dim=768)  # openai/clip-vit-large-patch14: the aesthetic predictor's CLIP


def meta_reward(name, arch, gradient_checkpointing=False, dtype=torch.float32):
    """One reward of rewards.RECORDS on the meta device, built from its real architecture (the CLIP reward from
    the `arch` shapes, which are openai/clip-vit-large-patch14's for sd15): ImageReward by its package's own classes,
    HPS by open_clip's own ViT-H-14, PickScore and the aesthetic predictor's CLIP-L by transformers' CLIPModel."""
    from transformers import CLIPConfig, CLIPModel
    frozen = lambda net: plumbing.freeze(net, META, dtype)  # (dtype: the --mixed_precision one, for memory counts)
    clip_model = lambda c: frozen(CLIPModel(CLIPConfig(text_config=c["text"], vision_config=c["vision"],
                                                       projection_dim=c["projection_dim"])))
    if name == "imagereward":
        fn = rewards.ImageRewardFn(frozen(meta_imagereward()))
    elif name == "hps20" or name == "hps21":  # same architecture; the text side is constant, as PromptCache keeps it
        with torch.device(META):
            model = rewards.import_open_clip().create_model(rewards.HPS_ARCH, device=META)
        fn = rewards.HPSRewardFn(frozen(model), lambda prompts: torch.zeros(len(prompts), 77, dtype=torch.long))
    elif name == "clip":
        with torch.device(META):
            return clip_reward(arch, frozen, gradient_checkpointing)
    else:
        with torch.device(META):
            if name == "pickscore":
                fn = rewards.PickScoreFn(clip_model(CLIP_H), MetaTokenizer(77))
            else:
                fn = rewards.AestheticFn(rewards.ClipRewardFn(clip_model(CLIP_L), MetaTokenizer(77)),
                                         frozen(rewards.AestheticHead()))
    if gradient_checkpointing:  # the blocks rewards.load_one wraps
        for tower in fn.towers:
            plumbing.checkpoint_blocks(getattr(tower, "blocks", None) or getattr(getattr(tower, "encoder", None),
                                                                                 "layers", None)
                                       or tower.transformer.resblocks)
    return fn


def reward_cost(name, size=512):
    """{parameters: all of the reward's tensors, image_parameters: its image tower's (and head's), flops: scoring
    one size² decoded image forward and backward to its pixels} of one reward, on the meta device with its real
    architecture. The text side runs once per prompt (PromptCache) and is not in the FLOPs."""
    fn = meta_reward(name, random_weights.SHAPES["sd15"])
    warm_text_caches(fn, ["a prompt"])
    model = fn.clip.model if name == "aesthetic" else fn.model
    modules = [model] + ([fn.head] if name == "aesthetic" else [])
    x = torch.zeros(1, 3, size, size, device=META, requires_grad=True)
    return dict(parameters=sum(p.numel() for m in modules for p in m.parameters()),
                image_parameters=sum(p.numel() for m in fn.towers + modules[1:] for p in m.parameters()),
                flops=count_flops(lambda: fn(x, ["a prompt"]).sum().backward()))


def reward_table(size=512):
    """Markdown rows: each reward's parameters, their bytes in fp32 and bf16, and its FLOPs per image."""
    rows = ["| reward | parameters (M) | of which image side (M) | fp32 GB | bf16 GB | GFLOP / image, fwd + bwd |",
            "|---|---|---|---|---|---|"]
    print("\n".join(rows))
    for name in rewards.NAMES:
        c = reward_cost(name, size)
        rows.append(f"| {name} | {c['parameters'] / 1e6:.1f} | {c['image_parameters'] / 1e6:.1f} | "
                    f"{c['parameters'] * 4 / 1e9:.2f} | {c['parameters'] * 2 / 1e9:.2f} | {c['flops'] / 1e9:.1f} |")
        print(rows[-1], flush=True)
    return rows


def warm_text_caches(reward, prompts):
    """Encode the prompts once into each reward's PromptCache, as a run does before its first step."""
    for fn in ([f for _, _, f in reward.terms] if isinstance(reward, rewards.Mix) else [reward]):
        fn = getattr(fn, "clip", fn)  # (the aesthetic head ignores the prompt)
        if hasattr(fn, "encode_text"):
            fn.text.batch(prompts, fn.encode_text)


class NoUpdate:
    """Stands in for Adam inside a count: its update is elementwise (no FLOPs counted) and slow on meta tensors."""

    def __init__(self, params):
        self.params = params

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


def clip_reward(arch, frozen, gradient_checkpointing):
    """The CLIP reward with the `arch` shapes (openai/clip-vit-large-patch14's for sd15: SHAPES' text and vision
    towers) on the current default device (the tests count it on a CPU too)."""
    from transformers import CLIPConfig, CLIPModel
    model = frozen(CLIPModel(CLIPConfig(text_config=arch["text"], vision_config=arch["vision"],
                                        projection_dim=arch["text"]["projection_dim"])))
    if gradient_checkpointing:
        plumbing.checkpoint_blocks(model.vision_model.encoder.layers)
    return rewards.ClipRewardFn(model, MetaTokenizer(77))


def meta_models(shapes, cfg, device=META, dtype=torch.float32):
    """dipp's networks for a run of cfg on the architecture `shapes`, on the meta device, built as dipp.train
    builds them (dipp.build_generator, dipp.build_fake_score, the reward and decoder switches of dipp.load_reward
    and dipp.load_reward_decoder). dtype: the frozen networks' (the --mixed_precision one; the VAE stays fp32 under
    fp16, as families.load_models keeps it); "text_encoder" is the one a run keeps (SD's CLIP; None where the
    prompts are pre-encoded)."""
    from diffusers import (AutoencoderKL, AutoencoderTiny, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel)
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    arch, fam = architecture(shapes)
    frozen = lambda net, dtype=dtype: plumbing.freeze(net, device, dtype)  # (FLOPs are dtype-blind; memory is not)
    with torch.device(device):
        if fam.name == "sd3":  # SD3.5's flow: its scheduler's shift-3 sigmas (random_weights writes that config)
            teacher = SD3Transformer2DModel(**arch["sd3"])
            schedule = dipp.Schedule.flow(families.flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), shapes))
        elif fam.name == "pixart":
            teacher = PixArtTransformer2DModel(in_channels=4, out_channels=8, **arch["transformer"])
            schedule = dipp.Schedule.ddpm(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device="cpu"), 0))
        else:
            teacher = UNet2DConditionModel(**arch["unet"])
            schedule = dipp.Schedule.scaled_linear()
        teacher = families.readout_in_fp32(frozen(teacher), fam)
        vae = frozen(AutoencoderKL(**arch["vae"]), torch.float32 if dtype == torch.float16 else dtype)
        cfg.generator_timestep = fam.t_star
        G = dipp.build_generator(cfg, teacher, fam, schedule, device)
        fake = dipp.build_fake_score(cfg, teacher, fam, device)
        if cfg.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        terms = rewards.parse(cfg.reward)
        if any(name != "clip" for name, _ in terms) and device != META:
            plumbing.die(f"the {cfg.reward} reward is counted on the meta device only (its weights are not here)")
        # a Mix of each reward's tower, as rewards.load builds it (clip: on `device`, for the tests' CPU counts)
        reward = rewards.Mix([(name, weight, clip_reward(arch, frozen, cfg.gradient_checkpointing) if name == "clip"
                               else meta_reward(name, arch, cfg.gradient_checkpointing, dtype))
                              for name, weight in terms]) if terms else None
        reward_vae = vae
        if cfg.reward_decoder == "tiny" and reward is not None:
            reward_vae = AutoencoderTiny(**arch["taesd"])
            if cfg.gradient_checkpointing:
                reward_vae.enable_gradient_checkpointing()
            reward_vae = frozen(reward_vae)
        if fam.name == "sd3":  # its three text encoders ran once at start-up, as PixArt's T5 (no FLOPs)
            config = arch["sd3"]
            text = encode_text = lambda prompts: families.SD3Text(
                torch.zeros(len(prompts), 77 + 256, config["joint_attention_dim"], device=device),
                torch.zeros(len(prompts), config["pooled_projection_dim"], device=device))
        elif fam.name == "pixart":  # T5 ran once at start-up; training reads its cached embeddings (no FLOPs)
            width = arch["transformer"]["caption_channels"]
            text = encode_text = lambda prompts: families.MaskedText(
                torch.zeros(len(prompts), 120, width, device=device), torch.ones(len(prompts), 120, device=device))
        else:  # SD and SDXL encode every batch's prompts with CLIP, every step (families.text_conditioning)
            encoder = frozen(CLIPTextModel(CLIPTextConfig(**arch["text"])))
            tokenizer = MetaTokenizer(77)
            if fam.text_encoder_2:
                size = arch["unet"]["sample_size"] * 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
                encoder = families.TextEncoders(
                    encoder, frozen(CLIPTextModelWithProjection(CLIPTextConfig(**arch["text2"]))), (size, size))
                tokenizer = (tokenizer, tokenizer)
            text = encode_text = lambda prompts: fam.encode(tokenizer, encoder, prompts)
            if fam.pre_encode:  # SDXL: its two CLIPs encode the prompt list once at start-up, then training reads
                cache, encode = {}, text  # the cached c (iteration_flops encodes its batch before it counts)
                text = lambda prompts: cache.get(tuple(prompts)) or cache.setdefault(tuple(prompts), encode(prompts))
    return dict(family=fam, teacher=teacher, vae=vae, G=G, fake=fake, reward=reward, reward_decoder=reward_vae,
                text=text, encode_text=encode_text, schedule=schedule,
                text_encoder=None if fam.pre_encode else encoder)

# -----------------------------------------------------------------------------
# 4. FLOPs of one training iteration, and of sampling one image

SWITCHES = ("lora_rank", "gradient_checkpointing", "reuse_generator_sample", "fake_steps_per_G", "reward",
            "reward_decoder", "guidance_scale")
MEMORY_SWITCHES = ("mixed_precision", "ema_decay", "watch_rewards")  # iteration_memory's too: they change no
# training FLOP (a watched reward scores only the validation samples, but its weights stay on the GPU)


def prepare_iteration(shapes, batch=1, device=META, dtype=torch.float32, ctx=contextlib.nullcontext(),
                      **switches):
    """ONE DI++ iteration of dipp.py at `batch` prompts, ready to run: {"iteration": a function that runs it,
    "models": meta_models' networks, "opt": the optimizers, "cfg"}. iteration_flops counts what it computes,
    iteration_memory what it holds; dtype: the frozen networks' (--mixed_precision's), ctx: dipp_step's
    autocast."""
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        plumbing.die(f"unknown switch(es) {sorted(unknown)}; choose from {list(SWITCHES)}")
    cfg = dipp.Config(train_batch_size=batch, **switches)
    plumbing.check_config(cfg)
    rewards.parse(cfg.reward, "reward")  # one line for a wrong name or weight
    if cfg.reward_decoder not in dipp.CHOICES["reward_decoder"]:
        plumbing.die(f"reward_decoder must be one of {dipp.CHOICES['reward_decoder']}; got {cfg.reward_decoder}")
    m = meta_models(shapes, cfg, device, dtype)
    fam, teacher, G, fake, reward, schedule = (m[k] for k in ("family", "teacher", "G", "fake", "reward", "schedule"))
    null = families.null_condition(fam, m["text"])  # start-up work, as in dipp.train
    teacher_eps, fake_eps = dipp.denoiser_eps(teacher, fam, schedule), dipp.denoiser_eps(fake, fam, schedule)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt = dipp.Optimizers(*(plumbing.SafeOptimizer(plumbing.trainable(net), NoUpdate(plumbing.trainable(net)), scaler)
                            for net in (fake, G)))
    latent_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    prompts = [f"prompt {i}" for i in range(batch)]
    if reward is not None:  # each reward encodes each prompt once per run (PromptCache)
        warm_text_caches(reward, prompts)
    if fam.pre_encode:  # start-up work (PixArt's T5, SDXL's CLIPs), not an iteration's
        m["text"](prompts)

    def iteration():  # the body of dipp.train's loop, on meta tensors
        cond = m["text"](prompts)
        nets = dipp.Bound(G_c=lambda z: G(z, cond),
                          teacher_eps_c=dipp.guided(teacher_eps, cond, null.expand_as(cond), cfg.guidance_scale),
                          fake_eps_c=lambda x_t, t: fake_eps(x_t, t, cond),
                          reward_c=(lambda x0: reward(dipp.decode(m["reward_decoder"], x0), prompts)) if reward
                          else None)
        noises = [dipp.draw_noise(batch, latent_shape, latent_shape, cfg, device, schedule=schedule)
                  for _ in range(cfg.fake_steps_per_G + 1)]
        dipp.dipp_step(nets, opt, noises, schedule, cfg, ctx)
    return dict(iteration=iteration, models=m, opt=opt, cfg=cfg)


def iteration_flops(shapes, batch=1, device=META, **switches):
    """FLOPs of ONE DI++ iteration of dipp.py at `batch` prompts: K_TA fake-score updates and one generator
    update, exactly as dipp.dipp_step runs them, plus the per-step text encoding of SD-1.x (PixArt's T5 and
    SDXL's two CLIPs run once at start-up and are not counted). Counted on the meta device with the real architecture of
    random_weights.SHAPES[shapes] ("sd15", "pixart", "sdxl"; "tiny*" for tests). switches: dipp's flags
    lora_rank, gradient_checkpointing, reuse_generator_sample, fake_steps_per_G, reward (imagereward | clip |
    none), reward_decoder (full | tiny), guidance_scale (> 1: the teacher runs on cond and uncond).
    Counted: every matmul, convolution and attention product, forward and backward, including the forward that
    gradient checkpointing recomputes. Not counted: elementwise ops (norms, activations, the losses), Adam's
    update, the optimiser's and DDP's memory traffic. The reward's prompt tokens are counted as new each step (a
    real run caches them per prompt); ImageReward is the image-reward package's own classes (BLIP ViT-L/16 at
    224 + BERT-base), the CLIP reward openai/clip-vit-large-patch14's shapes."""
    return count_flops(prepare_iteration(shapes, batch, device, **switches)["iteration"])


def sample_parts(shapes, guidance_scale=1.0):
    """FLOPs of the pieces that sampling ONE image (batch 1) is made of: {"text": the prompt's encoding (and the
    empty prompt's under CFG), "step": one denoiser pass (on cond and uncond, batched, when guidance_scale > 1),
    "decode": one VAE decode}. PixArt's text encoder here is the full T5-XXL (24 layers, 120 tokens), SD3's its two
    CLIPs and the full T5-XXL at 256 tokens: evaluation encodes its prompts; training does not."""
    from transformers import T5Config, T5EncoderModel
    arch, fam = architecture(shapes)
    m = meta_models(shapes, dipp.Config(reward="none"))
    text = m["encode_text"]  # (sampling encodes each prompt: SDXL's two CLIPs included)
    if fam.name in ("pixart", "sd3"):  # the real depth of T5-XXL (random_weights' has 2 of its 24 layers)
        with torch.device(META):
            t5 = T5EncoderModel(T5Config(**(T5_XXL if not shapes.startswith("tiny") else arch["t5"])))
        t5 = plumbing.freeze(t5, META, torch.float32)
        text = lambda prompts: fam.encode(MetaTokenizer(120), t5, prompts)
        if fam.name == "sd3":  # its two CLIPs (with projections) and T5, every prompt padded as its pipeline pads
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection
            with torch.device(META):
                clips = [plumbing.freeze(CLIPTextModelWithProjection(CLIPTextConfig(**arch[k])), META, torch.float32)
                         for k in ("text", "text2")]
            encoders = families.SD3Encoders(*clips, t5, arch["sd3"]["joint_attention_dim"])
            text = lambda prompts: fam.encode((MetaTokenizer(77), MetaTokenizer(77), MetaTokenizer(256)), encoders,
                                              prompts)
    eps = dipp.denoiser_eps(m["teacher"], fam, m["schedule"])
    config = m["teacher"].config
    x = torch.zeros(1, config.in_channels, config.sample_size, config.sample_size, device=META)  # (1, 4, h, w)
    t = torch.full((1,), fam.t_star, device=META)
    cond = text(["a prompt"])
    null = text([fam.null_prompt]) if guidance_scale > 1 else None
    with torch.no_grad():
        return dict(text=count_flops(lambda: [text(["a prompt"])] + ([text([fam.null_prompt])] if null is not None
                                                                     else [])),
                    step=count_flops(lambda: dipp.guided(eps, cond, null, guidance_scale)(x, t) if null is not None
                                     else eps(x, t, cond)),
                    decode=count_flops(lambda: dipp.decode(m["vae"], x)))


def sample_flops(shapes, steps, guidance_scale=1.0):
    """FLOPs to sample ONE image for evaluation: text encoding + steps × one denoiser pass (×2 under CFG) + one VAE
    decode (sample_parts). Every step has the same shapes, so one is counted and multiplied. A one-step generator
    is steps=1, guidance_scale=1. The sampler's own arithmetic is elementwise (not counted)."""
    parts = sample_parts(shapes, guidance_scale)
    return parts["text"] + steps * parts["step"] + parts["decode"]

# -----------------------------------------------------------------------------
# 5. Memory: the bytes a GPU would hold at the peak of one iteration ("will it fit?", docs/cost.md)
#
# How it is counted. prepare_iteration's iteration runs on the meta device (shapes and dtypes, no data) under
# MemoryTracker, a TorchDispatchMode: it sees every aten op, forward and backward (autograd carries the mode into the
# backward pass) and every tensor an op returns. A return that the op's schema marks as aliasing an input (a view, an
# in-place op) is no new memory; any other gets its storage's size, and a weakref.finalize on that storage sees it
# freed. torch keeps a storage's Python object alive exactly as long as the storage, so what autograd saves for the
# backward pass stays counted until the backward pass drops it, whoever holds it. (saved_tensors_hooks would see only
# what autograd saves: not an op's transient output, nor a gradient, nor the 512-px maps of the decoder between two
# saved ones, which set the peak as much as the saved ones.)
#
# What the meta device does not do as a GPU does, and is put right here:
#   - autocast: the meta device has none, so MetaAutocast (a TorchFunctionMode, dipp_step's `ctx`) plays CUDA's:
#     matmuls, convolutions and attention in the low dtype, norms, softmax, sums and losses in fp32, and a trainable
#     fp32 weight's low-precision copy cached until the autocast block ends (as torch.autocast caches it);
#   - attention: the meta device runs SDPA's math path, which keeps the L×L probabilities for the backward pass; a GPU
#     runs flash or memory-efficient attention, which keeps the output and its log-sum-exp (B, heads, L) only.
#     FlashAttentionMemory allocates exactly that (and flash's fp32 dq accumulator, transiently, in the backward).
# Weights, optimiser states and the EMA are known without running anything: they are counted from the networks,
# each tensor in its dtype (every allocation rounded up to the CUDA caching allocator's 512 bytes).

GiB = 2 ** 30
F = torch.nn.functional
BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this
PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("weights", "trainable", "gradients", "optimizer", "ema", "activations")  # the breakdown's keys
# CUDA autocast's op lists (torch.amp docs: "CUDA Ops that can autocast to float16 / to float32"), as Python calls
LOW_OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
           torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm, torch.einsum,
           torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.baddbmm,
           torch.Tensor.addmm, F.scaled_dot_product_attention}
FP32_OPS = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
            torch.Tensor.softmax, torch.Tensor.log_softmax, F.mse_loss, F.normalize, torch.sum, torch.Tensor.sum,
            torch.pow, torch.Tensor.pow, torch.exp, torch.Tensor.exp, torch.rsqrt, torch.Tensor.rsqrt,
            torch.norm, torch.Tensor.norm, torch.cumsum, torch.Tensor.cumsum}


def block(nbytes):
    return -(-nbytes // BLOCK) * BLOCK


class MemoryTracker(TorchDispatchMode):
    """Live bytes of the tensors created inside it, by label ("activations" unless label() says otherwise), and the
    breakdown at the moment their sum was largest: `with MemoryTracker() as m: ...; m.peak, m.at_peak`."""

    def __init__(self):
        super().__init__()
        self.live, self.totals = {}, collections.Counter()  # storage key -> (label, bytes); label -> bytes
        self.peak, self.at_peak = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(torch.utils._pytree.tree_leaves(out)):
            ret = returns[min(i, len(returns) - 1)] if returns else None
            if isinstance(t, torch.Tensor) and not (ret is not None and ret.alias_info is not None):
                self.add(t)
        return out

    def add(self, t, label="activations"):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return t
        self.live[key] = (label, block(storage.nbytes()))
        self.totals[label] += self.live[key][1]
        weakref.finalize(storage, self.free, key).atexit = False
        total = sum(self.totals.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.totals)
        return t

    def free(self, key):
        label, nbytes = self.live.pop(key, (None, 0))
        if label:
            self.totals[label] -= nbytes

    def label(self, t, label):
        """Count t's storage under `label` from now on (a gradient is made by a backward op, then becomes .grad)."""
        key = t.untyped_storage()._cdata
        if key not in self.live:
            return self.add(t, label)
        old, nbytes = self.live[key]
        self.live[key] = (label, nbytes)
        self.totals[old] -= nbytes
        self.totals[label] += nbytes
        return t


class FlashAttentionMemory(torch.autograd.Function):
    """SDPA as a flash / memory-efficient kernel holds it: the output and the log-sum-exp are saved with q, k, v;
    no L×L matrix. Shapes only (meta tensors): no values are computed."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, heads, L_q, d_v)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, heads, L_q)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # flash's fp32 dq, transient
        del accumulator
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class MetaAutocast(TorchFunctionMode):
    """torch.autocast for the meta device, used as dipp_step's ctx (entered once per phase): LOW_OPS take their
    floating inputs in `dtype`, FP32_OPS in fp32; a trainable weight's cast is cached until the block ends. off()
    (plumbing.autocast_off inside a count) turns it off, as autocast_off does on a GPU."""

    def __init__(self, dtype, label=lambda t, name: t):
        super().__init__()
        self.dtype, self.cache, self.enabled, self.label = dtype, {}, True, label  # label: MemoryTracker.label

    def __exit__(self, *exc):
        self.cache.clear()  # torch.autocast frees its weight casts when the outermost block ends
        return super().__exit__(*exc)

    def active(self):
        return self.enabled and self in torch.overrides._get_current_function_mode_stack()

    @contextlib.contextmanager
    def off(self):
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype):
            return x
        if x.is_leaf and x.requires_grad and dtype == self.dtype:  # autocast's cache: one copy per weight
            if id(x) not in self.cache:
                self.cache[id(x)] = self.label(x.to(dtype), "autocast_copies")
            return self.cache[id(x)]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and (func in LOW_OPS or func in FP32_OPS):
            dtype = self.dtype if func in LOW_OPS else torch.float32
            args = [self.cast(a, dtype) for a in args]
            kwargs = {k: self.cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting_memory(autocast):
    """Inside: every F.scaled_dot_product_attention runs as FlashAttentionMemory (under autocast in its dtype),
    plumbing.autocast_off turns MetaAutocast off, and gradient checkpointing recomputes a block under the autocast
    state of its forward pass, as torch's checkpoint does with torch.autocast (the backward pass runs outside
    dipp_step's autocast blocks). Module attributes are patched, so diffusers' and transformers' calls see them."""
    import torch.utils.checkpoint as ck
    originals = F.scaled_dot_product_attention, plumbing.autocast_off, ck.checkpoint
    on = isinstance(autocast, MetaAutocast)

    def sdpa(q, k, v, *args, **kwargs):
        if on and autocast.active():
            q, k, v = (autocast.cast(x, autocast.dtype) for x in (q, k, v))
        return FlashAttentionMemory.apply(q, k, v)

    def checkpoint(fn, *args, **kwargs):
        again = on and autocast.active()

        def run(*a, **k):
            inside = on and autocast in torch.overrides._get_current_function_mode_stack()
            with autocast if again and not inside else contextlib.nullcontext():
                return fn(*a, **k)
        return originals[2](run, *args, **kwargs)

    F.scaled_dot_product_attention, ck.checkpoint = sdpa, checkpoint
    if on:
        plumbing.autocast_off = lambda x: autocast.off()
    try:
        yield
    finally:
        F.scaled_dot_product_attention, plumbing.autocast_off, ck.checkpoint = originals


def step_keeps_gradients(device=META):
    """Whether dipp's optimizer step (plumbing.SafeOptimizer) leaves the gradients it stepped with alive until the
    next zero_grad (dipp_step calls that just before each backward pass): then, in a steady-state iteration, each
    network's gradients of the previous iteration are still held while the other network trains. Asked of the code
    itself, on one weight, so the count follows a change there."""
    w = torch.zeros(1, device=device, requires_grad=True)
    w.grad = torch.zeros(1, device=device)
    plumbing.SafeOptimizer([w], NoUpdate([w]), torch.amp.GradScaler("cpu", enabled=False)).step(w.sum())
    return w.grad is not None


def modules_of(fn, depth=2):
    """The networks a reward function holds (its model, an aesthetic head, the CLIP model inside another reward)."""
    found = []
    for value in vars(fn).values():
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif depth > 1 and hasattr(value, "__dict__") and not isinstance(value, (type, torch.Tensor)):
            found += modules_of(value, depth - 1)
    return found


def network_bytes(nets):
    """{"weights": bytes of every parameter and buffer the networks hold (shared ones once: LoRA's base),
    "trainable": of those, the trainable ones (fp32 masters)}."""
    seen, out = set(), collections.Counter()
    for net in nets:
        for t in [*net.parameters(), *net.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out["trainable" if t.requires_grad else "weights"] += block(t.numel() * t.element_size())
    return out


def iteration_memory(shapes, batch=1, ranks=1, device=META, mixed_precision="no", ema_decay=0.0, watch_rewards="",
                     **switches):
    """Peak bytes one process holds in ONE DI++ iteration of dipp.py (a steady-state one: the optimiser states exist,
    and the previous iteration's gradients are held if the optimizer step leaves them alive: step_keeps_gradients
    asks the code; SafeOptimizer frees them), and what makes it up: {"weights" (frozen), "trainable" (fp32 masters), "gradients",
    "optimizer" (AdamW: 2 fp32 moments per trainable weight), "ema", "activations" (everything else alive at the peak:
    what autograd saved, autocast's weight copies, the op running), "total"}. ranks > 1: FSDP2 (--shard fsdp), each
    rank holding 1/ranks of the trainable weights, their gradients and optimiser states. watch_rewards: dipp's flag
    (those models' weights are held for validation). switches: iteration_flops'. Not counted: the CUDA context,
    cuBLAS/cuDNN workspaces and the caching allocator's unused reserve (docs/cost.md)."""
    if mixed_precision not in PRECISION:
        plumbing.die(f"mixed_precision must be one of {list(PRECISION)}, got {mixed_precision!r}")
    if ranks < 1 or (ranks > 1 and (switches.get("lora_rank") or ema_decay)):
        plumbing.die(f"ranks must be ≥ 1, and FSDP2 (ranks > 1) shards full fine-tuning without EMA; got "
                     f"ranks={ranks}")
    dtype = PRECISION[mixed_precision]
    tracker = MemoryTracker()
    autocast = MetaAutocast(dtype, tracker.label) if dtype != torch.float32 else contextlib.nullcontext()
    from diffusers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # (diffusers warns at every .to(bf16) of a model that it has no fp32 modules)
    try:
        with counting_memory(autocast):  # (the reward towers' checkpointing is set up while they are built)
            run = prepare_iteration(shapes, batch, device, dtype, autocast, **switches)
    finally:
        logging.set_verbosity(verbosity)
    m, opt = run["models"], run["opt"]
    reward = [net for _, _, fn in (m["reward"].terms if m["reward"] is not None else []) for net in modules_of(fn)]
    arch, _ = architecture(shapes)  # --watch_rewards: frozen models held for validation, never trained on
    watched = [net for name, _ in rewards.parse_watch(watch_rewards)
               for net in modules_of(meta_reward(name, arch, dtype=dtype))]
    parts = network_bytes([net for net in (m["teacher"], m["vae"], m["G"], m["fake"], *reward, *watched,
                                           m["reward_decoder"], m["text_encoder"]) if net is not None])
    trained = opt.fake.params + opt.G.params
    parts["optimizer"] = sum(2 * block(p.numel() * 4) for p in trained)  # exp_avg, exp_avg_sq in fp32
    parts["ema"] = sum(block(p.numel() * 4) for p in opt.G.params) if ema_decay > 0 else 0
    def relabel(p):  # a backward op made p.grad; from now on it is a gradient
        tracker.label(p.grad, "gradients")

    hooks = [p.register_post_accumulate_grad_hook(relabel) for p in trained]
    try:
        with counting_memory(autocast), tracker:
            for p in trained if step_keeps_gradients(device) else ():  # the previous iteration's gradients
                p.grad = tracker.label(torch.empty_like(p), "gradients")
            run["iteration"]()
    finally:
        for p in trained:
            p.grad = None
        for hook in hooks:
            hook.remove()
    copies = tracker.at_peak.get("autocast_copies", 0)
    parts.update(gradients=tracker.at_peak.get("gradients", 0),
                 activations=tracker.at_peak.get("activations", 0) + copies)
    return shard(dict({k: int(parts[k]) for k in PARTS}, autocast_copies=copies), ranks)


def shard(parts, ranks):
    """An iteration_memory breakdown as each of `ranks` FSDP2 processes holds it: 1/ranks of the trainable weights,
    their gradients and optimiser states; and no autocast copy of the whole trainable weights (FSDP2's mixed
    precision gathers each block in the low dtype, so autocast has nothing to copy; the one block gathered at a
    time is not counted). "autocast_copies": the part of the activations that autocast's weight copies are."""
    out = {k: -(-v // ranks) if k in ("trainable", "gradients", "optimizer", "ema") else v
           for k, v in parts.items() if k in PARTS}
    copies = parts.get("autocast_copies", 0)
    if ranks > 1:
        out["activations"], copies = out["activations"] - copies, 0
    return dict(out, total=sum(out.values()), autocast_copies=copies)


def cached(kind, count, *key):
    """count() remembered in the user's cache ($DIPP_CACHE/cost, else ~/.cache/dipp/cost), keyed by `kind`, its
    arguments, the code that counts (dipp.py, families.py, cost.py, random_weights.py, plumbing.py, rewards.py) and
    the library versions: reproduce.counted's scheme, for any count (FLOPs, memory). A cache that cannot be written
    only costs the next call its count."""
    import hashlib
    import diffusers
    import promptsets
    here = os.path.dirname(os.path.abspath(__file__))
    code = b"".join(open(os.path.join(here, f), "rb").read() for f in (
        "dipp.py", "families.py", "cost.py", "random_weights.py", "plumbing.py", "rewards.py"))
    digest = hashlib.sha256(json.dumps([kind, key, torch.__version__, diffusers.__version__], sort_keys=True,
                                       default=str).encode() + code).hexdigest()[:16]
    path = os.path.join(os.path.dirname(promptsets.cache_dir()), "cost", f"{kind}-{digest}.json")
    if os.path.isfile(path):
        try:
            return json.load(open(path))[kind]
        except (OSError, ValueError, KeyError):  # a damaged entry is counted again
            pass
    value = count()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({kind: value, "key": key}, f, default=str)
        os.replace(path + ".tmp", path)
    except OSError:
        pass
    return value


def memory(shapes, batch=1, ranks=1, **switches):
    """iteration_memory on the meta device, cached (real shapes take a minute of CPU); ranks: shard()."""
    if ranks > 1 and (switches.get("lora_rank") or switches.get("ema_decay")):
        plumbing.die("FSDP2 (ranks > 1) shards full fine-tuning without EMA (dipp's --shard fsdp); got "
                     f"lora_rank={switches.get('lora_rank')}, ema_decay={switches.get('ema_decay')}")
    return shard(cached("memory", lambda: iteration_memory(shapes, batch, 1, **switches), shapes, batch,
                        sorted(switches.items())), ranks)


# Will it fit? A run fits a card when its counted peak plus HEADROOM is at most the card's free memory. HEADROOM is what
# the count leaves out (docs/cost.md, "Against the reference"): the caching allocator's reserve beyond the live
# tensors and the cuBLAS/cuDNN workspaces. (The CUDA context is already taken out of torch.cuda.mem_get_info's
# free memory.)
HEADROOM = (0.10, 1 * GiB)  # × the count, + bytes
# What to try, in this order and cumulatively, when a run does not fit: switches that cost FLOPs but not quality, a
# smaller batch (halving), then the approximate decoder (deviation 6).
FIT_STEPS = (("gradient_checkpointing", True, "--gradient_checkpointing"), ("lora_rank", 64, "--lora_rank 64"),
             ("mixed_precision", "bf16", "--mixed_precision bf16"))


def fits(need, free):
    return need * (1 + HEADROOM[0]) + HEADROOM[1] <= free


def fit(shapes, batch, free, ranks=1, **switches):
    """Whether one process of the run fits `free` bytes, and where it does not, the first setup that does, trying
    FIT_STEPS, then halving the batch, then --reward_decoder tiny: {"need": bytes, "fits": bool, "flags": the
    switches to add (None: nothing tried fits), "then": their need}. Every count is memory()'s (cached)."""
    need = memory(shapes, batch, ranks, **switches)["total"]
    verdict = dict(need=need, fits=fits(need, free), flags=None, then=None)
    if verdict["fits"]:
        return verdict
    run, flags, candidates = dict(switches), [], []
    for name, value, flag in FIT_STEPS:
        if run.get(name) or (name == "mixed_precision" and run.get(name, "no") != "no") or (name == "lora_rank"
                                                                                                and ranks > 1):
            continue  # already on (a LoRA of another rank, fp16 included); FSDP2 shards full fine-tuning only
        run, flags = {**run, name: value}, flags + [flag]
        candidates.append((run, batch, flags))
    for smaller in [batch >> k for k in range(1, batch.bit_length())]:  # batch/2, batch/4, ..., 1
        candidates.append((run, smaller, flags + [f"--train_batch_size {smaller}"]))
    if run.get("reward", "imagereward") != "none" and run.get("reward_decoder", "full") == "full":
        candidates.append(({**run, "reward_decoder": "tiny"}, 1, flags + ["--train_batch_size 1"] * (batch > 1)
                           + ["--reward_decoder tiny"]))
    for switches_, batch_, flags_ in candidates:
        then = memory(shapes, batch_, ranks, **switches_)["total"]
        if fits(then, free):
            return dict(verdict, flags=flags_, then=then)
    return verdict

# "Which card?": docs/cost.md's table. Each family at reproduce.py's recipe (batch, ω; bf16 autocast, ImageReward,
# K_TA = 1: another fake-score update adds only its noise draw, as each frees its graph before the next) and at
# batch 1, full fine-tuning vs LoRA r=64, with and without gradient checkpointing. Cards by their memory as torch
# sees it, less ~0.5 GiB of CUDA context: what mem_get_info reports free on an idle card.
RECIPE_RUNS = {"sd15": (8, 1.75), "pixart512": (8, 4.5), "sdxl": (4, 7.5)}  # (batch, ω): reproduce.RECIPES' (a test)
CARDS = {"24 GB": 23.5 * GiB, "40 GB": 39.0 * GiB, "48 GB": 44.0 * GiB, "80 GB": 78.6 * GiB}


def which_card(families=tuple(RECIPE_RUNS), ranks=(2, 4, 8)):
    """Markdown rows: peak GiB per setup and whether it fits each of CARDS (fits(): the count + HEADROOM); for full
    fine-tuning with checkpointing at the recipe's batch, also per FSDP2 rank over each of `ranks` GPUs."""
    rows = ["| model | setup | batch | peak GiB | " + " | ".join(CARDS) + " |",
            "|---|---|---|---|" + "---|" * len(CARDS)]
    for shapes in families:
        architecture(shapes)  # (one line for an unknown name)
        batch, omega = RECIPE_RUNS.get(ALIASES.get(shapes, shapes), (2, 1.75))  # (tiny shapes: a test's)
        for lora in (0, 64):
            for checkpointing in (False, True):
                for b in sorted({1, batch}):
                    label = ("LoRA r=64" if lora else "full") + (" + checkpointing" if checkpointing else "")
                    switches = dict(lora_rank=lora, gradient_checkpointing=checkpointing, guidance_scale=omega,
                                    mixed_precision="bf16")
                    for n in [1] + (list(ranks) if not lora and checkpointing and b == batch else []):
                        m = memory(shapes, b, n, **switches)
                        cells = ["✓" if fits(m["total"], free) else "✗" for free in CARDS.values()]
                        rows.append(f"| {shapes} | {label}{f', FSDP2 over {n} GPUs' if n > 1 else ''} | {b} | "
                                    f"{m['total'] / GiB:.1f} | " + " | ".join(cells) + " |")
                        print(rows[-1], flush=True)
    return rows

# -----------------------------------------------------------------------------
# 6. The table: python cost.py [--family sd15|pixart|sdxl] [--batch B] [switch flags]

SETUPS = {  # name -> (label, switches on top of the base run given by the flags)
    "full": ("full fine-tuning", {}), "lora": ("LoRA r=64 (--lora_rank 64)", dict(lora_rank=64)),
    "checkpointing": ("--gradient_checkpointing", dict(gradient_checkpointing=True)),
    "reuse": ("--reuse_generator_sample", dict(reuse_generator_sample=True)),
    "tiny_decoder": ("--reward_decoder tiny", dict(reward_decoder="tiny")),
    "fake2": ("--fake_steps_per_G 2", dict(fake_steps_per_G=2)),
    "no_reward": ("--reward none", dict(reward="none")),
    "no_cfg": ("--guidance_scale 1 (no CFG)", dict(guidance_scale=1.0)),
}
GUIDANCE = {"sd": 1.75, "pixart": 4.5, "sdxl": 1.0, "sd3": 4.5}  # the base run's ω: dipp's (DMD2 SD1.5), README's
# PixArt-α, DMD2-SDXL's, docs/sd3.md's (SD3.5-Medium's model card)
SAMPLE_GUIDANCE = {"sd": 7.5, "pixart": 4.5, "sdxl": 5.0, "sd3": 7.0}  # the stock pipelines' default CFG (teacher rows)


def arch_image_size(shapes):
    """The decoded image's side for a family's shapes: latent side × the VAE's upsampling."""
    arch, fam = architecture(shapes)
    latent = arch["transformer"]["sample_size"] if fam.name == "pixart" else arch["unet"]["sample_size"]
    return latent * 2 ** (len(arch["vae"]["block_out_channels"]) - 1)


def table(family, batch, device_name, utilisation, base, setups, memory_base=None, ranks=1):
    """Markdown rows: each setup's TFLOP per iteration and per image, vs the first row, and the estimated time;
    with memory_base (mixed_precision, ema_decay) also its peak memory per process (memory(), cached) and what
    makes it up."""
    rows = ["| setup | TFLOP / iteration | TFLOP / image-iteration | vs first row | est. s / iteration |"
            + (" peak GiB | weights + trainable + grads + Adam + EMA / activations |" if memory_base is not None
               else ""), "|---|---|---|---|---|" + ("---|---|" if memory_base is not None else "")]
    print("\n".join(rows), flush=True)  # (the columns' names, before the first count)
    first = None
    for name in setups:
        label, switches = SETUPS[name]
        flops = cached("flops", lambda: iteration_flops(family, batch, **{**base, **switches}), family, batch,
                       sorted({**base, **switches}.items()))
        first = first or flops
        seconds = estimate_seconds(flops, device_name, utilisation)
        rows.append(f"| {label} | {flops / 1e12:.4g} | {flops / batch / 1e12:.4g} | {flops / first:.3f} | "
                    f"{'—' if seconds is None else f'{seconds:.3g}'} |")
        if memory_base is not None:
            if ranks > 1 and switches.get("lora_rank"):
                rows[-1] += " — (FSDP2 shards full fine-tuning) | |"
            else:
                m = memory(family, batch, ranks, **{**base, **switches, **memory_base})
                static = m["weights"] + m["trainable"] + m["gradients"] + m["optimizer"] + m["ema"]
                rows[-1] += (f" {m['total'] / GiB:.1f} | {' + '.join(f'{m[k] / GiB:.1f}' for k in PARTS[:5])} = "
                             f"{static / GiB:.1f} / {m['activations'] / GiB:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = plumbing.FlagParser("cost.py", __doc__.split("\n\n")[0])  # (exact flags, one-line errors)
    p.add_argument("--family", default="sd15", help="sd15, pixart (512 px), sdxl, sd35_medium or sd35_large (1024 "
                   "px): random_weights shapes")
    p.add_argument("--batch", type=int, default=1, help="prompts per iteration (dipp's --train_batch_size)")
    p.add_argument("--device", default="NVIDIA H100 80GB HBM3", help="card for the time estimate, named as "
                   "torch.cuda.get_device_name names it")
    p.add_argument("--utilisation", type=float, default=UTILISATION, help="achieved / peak (default: from H100 data)")
    p.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS), help="rows, each = the base "
                   "run + one switch (none: no table)")
    p.add_argument("--rewards", action="store_true", help="only the table of every reward model (rewards.py): "
                   "parameters, their bytes, FLOPs to score one decoded image of the family's size, forward and backward")
    p.add_argument("--sample_steps", type=int, default=0, help="also count sampling one image: the teacher with N "
                   "steps (CFG as its pipeline) and the one-step generator; 0 = skip")
    types = {f.name: f.type for f in dataclasses.fields(dipp.Config)}
    for name in SWITCHES:  # the base run's switches, as dipp's flags
        if types[name] is bool:
            p.add_argument(f"--{name}", action="store_true")
        else:
            p.add_argument(f"--{name}", type=types[name], default=None, choices=dipp.CHOICES.get(name))
    for name in MEMORY_SWITCHES:  # what changes the memory and not the FLOPs
        p.add_argument(f"--{name}", type=types[name], default=None, choices=dipp.CHOICES.get(name))
    p.add_argument("--ranks", type=int, default=1, help="processes under torchrun with --shard fsdp: the memory "
                   "column is one rank's, holding 1/N of the trainable weights, gradients and Adam states")
    p.add_argument("--no_memory", action="store_true", help="leave out the memory column (halves the counting)")
    p.add_argument("--fit", type=float, default=None, metavar="GIB", help="instead of the table: whether the base run "
                   "fits a card with GIB GiB free, and else the switches that make it fit, as one JSON line (what "
                   "dipp.py checks before it loads anything on a GPU)")
    p.add_argument("--which_card", nargs="*", default=None, metavar="FAMILY", help="instead of the table: "
                   "docs/cost.md's 'which card?' table for these families (none given: sd15 pixart sdxl), counted "
                   "(minutes) or cached")
    args = p.parse_args(argv)
    if args.which_card is not None:
        return which_card(args.which_card or tuple(RECIPE_RUNS))
    if args.batch < 1 or args.ranks < 1:
        plumbing.die(f"--batch and --ranks must be positive integers, got {args.batch} and {args.ranks}")
    plumbing.check_ranges(p, args, {
        "utilisation": (lambda v: 0 < v <= 1, "a fraction of the card's peak, 0 < F <= 1 (e.g. 0.4)"),
        "sample_steps": (lambda v: v >= 0, ">= 0 (0 = no sampling count)"),
        "fit": (lambda v: v is None or v > 0, "the card's free memory in GiB, > 0 (e.g. 23.5)")})
    _, fam = architecture(args.family)
    given = {k: v for k in SWITCHES if (v := getattr(args, k)) is not None and v is not False}  # (0 is a value)
    base = {"guidance_scale": GUIDANCE[fam.name], **given}
    memory_base = {k: v for k in MEMORY_SWITCHES if (v := getattr(args, k)) is not None}
    if args.fit is not None:
        verdict = fit(args.family, args.batch, args.fit * GiB, args.ranks, **base, **memory_base)
        print(json.dumps({k: v / GiB if k in ("need", "then") and v is not None else v for k, v in verdict.items()}))
        return verdict
    if args.rewards:
        size = arch_image_size(args.family)
        print(f"reward models, one {size}² image (resized to 224 inside each), batch 1:")
        return reward_table(size)
    peak = plumbing.peak_tflops(args.device)
    print(f"{args.family}, batch {args.batch}, base run {base}; time = FLOPs / ({args.device}: "
          f"{peak or 'unknown'} TFLOP/s dense bf16 peak × {args.utilisation} utilisation)")
    if not args.no_memory:
        precision = memory_base.get("mixed_precision", "no")
        print(f"memory: one process's peak in one iteration, --mixed_precision {precision}"
              + (f", FSDP2 over {args.ranks} ranks" if args.ranks > 1 else "")
              + " (cost.iteration_memory; docs/cost.md)")
    table(args.family, args.batch, args.device, args.utilisation, base, args.setups,
          None if args.no_memory else memory_base, args.ranks)
    if args.sample_steps:
        for label, steps, omega in ((f"teacher, {args.sample_steps} steps, CFG {SAMPLE_GUIDANCE[fam.name]}",
                                     args.sample_steps, SAMPLE_GUIDANCE[fam.name]), ("one-step generator", 1, 1.0)):
            parts = sample_parts(args.family, omega)
            total = parts["text"] + steps * parts["step"] + parts["decode"]
            print(f"sampling one image, {label}: {total / 1e12:.4g} TFLOP (text {parts['text'] / 1e12:.4g}, "
                  f"denoiser {steps} × {parts['step'] / 1e12:.4g}, decode {parts['decode'] / 1e12:.4g})")


if __name__ == "__main__":
    with plumbing.as_program("cost"), plumbing.stopped_in_one_line("nothing is kept; run the command again"):
        main()  # (one-line errors, dipp's checks included, speak for cost.py)
