"""cost: what a DI++ run will cost before it starts. FLOPs of one training iteration (or of sampling one image),
counted on the real architectures on PyTorch's meta device: no weights, no memory, no GPU (a CPU takes seconds
for the tiny shapes, about a minute of CPU time for an SD1.5 iteration).

    python cost.py                        # SD1.5: FLOPs per iteration of each setup, and the time on an H100
    python cost.py --family pixart --batch 4 --device "NVIDIA A100-SXM4-80GB" --setups full lora

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
import dataclasses
import json
import os
import sys
import tempfile

import torch

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


def meta_reward(name, arch, gradient_checkpointing=False):
    """One reward of rewards.RECORDS on the meta device, built from its real architecture (the CLIP reward from
    the `arch` shapes, which are openai/clip-vit-large-patch14's for sd15): ImageReward by its package's own classes,
    HPS by open_clip's own ViT-H-14, PickScore and the aesthetic predictor's CLIP-L by transformers' CLIPModel."""
    from transformers import CLIPConfig, CLIPModel
    frozen = lambda net: plumbing.freeze(net, META, torch.float32)
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


def meta_models(shapes, cfg, device=META):
    """dipp's networks for a run of cfg on the architecture `shapes`, on the meta device, built as dipp.train
    builds them (dipp.build_generator, dipp.build_fake_score, the reward and decoder switches of dipp.load_reward
    and dipp.load_reward_decoder)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    arch, fam = architecture(shapes)
    frozen = lambda net: plumbing.freeze(net, device, torch.float32)  # (no autocast on meta: FLOPs are dtype-blind)
    with torch.device(device):
        if fam.name == "pixart":
            teacher = PixArtTransformer2DModel(in_channels=4, out_channels=8, **arch["transformer"])
            schedule = dipp.Schedule(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device="cpu"), 0))
        else:
            teacher = UNet2DConditionModel(**arch["unet"])
            schedule = dipp.Schedule.scaled_linear()
        teacher = families.readout_in_fp32(frozen(teacher), fam)
        vae = frozen(AutoencoderKL(**arch["vae"]))
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
                               else meta_reward(name, arch, cfg.gradient_checkpointing))
                              for name, weight in terms]) if terms else None
        reward_vae = vae
        if cfg.reward_decoder == "tiny" and reward is not None:
            reward_vae = AutoencoderTiny(**arch["taesd"])
            if cfg.gradient_checkpointing:
                reward_vae.enable_gradient_checkpointing()
            reward_vae = frozen(reward_vae)
        if fam.name == "pixart":  # T5 ran once at start-up; training reads its cached embeddings (no FLOPs)
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
                text=text, encode_text=encode_text, schedule=schedule)

# -----------------------------------------------------------------------------
# 4. FLOPs of one training iteration, and of sampling one image

SWITCHES = ("lora_rank", "gradient_checkpointing", "reuse_generator_sample", "fake_steps_per_G", "reward",
            "reward_decoder", "guidance_scale")


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
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        plumbing.die(f"unknown switch(es) {sorted(unknown)}; choose from {list(SWITCHES)}")
    cfg = dipp.Config(train_batch_size=batch, **switches)
    plumbing.check_config(cfg)
    rewards.parse(cfg.reward, "reward")  # one line for a wrong name or weight
    if cfg.reward_decoder not in dipp.CHOICES["reward_decoder"]:
        plumbing.die(f"reward_decoder must be one of {dipp.CHOICES['reward_decoder']}; got {cfg.reward_decoder}")
    m = meta_models(shapes, cfg, device)
    fam, teacher, G, fake, reward, schedule = (m[k] for k in ("family", "teacher", "G", "fake", "reward", "schedule"))
    null = families.null_condition(fam, m["text"])  # start-up work, as in dipp.train
    teacher_eps, fake_eps = dipp.denoiser_eps(teacher, fam), dipp.denoiser_eps(fake, fam)
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
        dipp.dipp_step(nets, opt, noises, schedule, cfg)
    return count_flops(iteration)


def sample_parts(shapes, guidance_scale=1.0):
    """FLOPs of the pieces that sampling ONE image (batch 1) is made of: {"text": the prompt's encoding (and the
    empty prompt's under CFG), "step": one denoiser pass (on cond and uncond, batched, when guidance_scale > 1),
    "decode": one VAE decode}. PixArt's text encoder here is the full T5-XXL (24 layers, 120 tokens): evaluation
    encodes its prompts; training does not."""
    from transformers import T5Config, T5EncoderModel
    arch, fam = architecture(shapes)
    m = meta_models(shapes, dipp.Config(reward="none"))
    text = m["encode_text"]  # (sampling encodes each prompt: SDXL's two CLIPs included)
    if fam.name == "pixart":  # the real depth of T5-XXL (random_weights' has 2 of its 24 layers)
        with torch.device(META):
            t5 = T5EncoderModel(T5Config(**(T5_XXL if not shapes.startswith("tiny") else arch["t5"])))
        text = lambda prompts: fam.encode(MetaTokenizer(120), plumbing.freeze(t5, META, torch.float32), prompts)
    eps = dipp.denoiser_eps(m["teacher"], fam)
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
# 5. The table: python cost.py [--family sd15|pixart|sdxl] [--batch B] [switch flags]

SETUPS = {  # name -> (label, switches on top of the base run given by the flags)
    "full": ("full fine-tuning", {}), "lora": ("LoRA r=64 (--lora_rank 64)", dict(lora_rank=64)),
    "checkpointing": ("--gradient_checkpointing", dict(gradient_checkpointing=True)),
    "reuse": ("--reuse_generator_sample", dict(reuse_generator_sample=True)),
    "tiny_decoder": ("--reward_decoder tiny", dict(reward_decoder="tiny")),
    "fake2": ("--fake_steps_per_G 2", dict(fake_steps_per_G=2)),
    "no_reward": ("--reward none", dict(reward="none")),
    "no_cfg": ("--guidance_scale 1 (no CFG)", dict(guidance_scale=1.0)),
}
GUIDANCE = {"sd": 1.75, "pixart": 4.5, "sdxl": 1.0}  # the base run's ω: dipp's (DMD2 SD1.5), README's PixArt-α,
# DMD2-SDXL's
SAMPLE_GUIDANCE = {"sd": 7.5, "pixart": 4.5, "sdxl": 5.0}  # the stock pipelines' default CFG for the teacher rows


def arch_image_size(shapes):
    """The decoded image's side for a family's shapes: latent side × the VAE's upsampling."""
    arch, fam = architecture(shapes)
    latent = arch["transformer"]["sample_size"] if fam.name == "pixart" else arch["unet"]["sample_size"]
    return latent * 2 ** (len(arch["vae"]["block_out_channels"]) - 1)


def table(family, batch, device_name, utilisation, base, setups):
    """Markdown rows: each setup's TFLOP per iteration and per image, vs the first row, and the estimated time."""
    rows = ["| setup | TFLOP / iteration | TFLOP / image-iteration | vs first row | est. s / iteration |",
            "|---|---|---|---|---|"]
    first = None
    for name in setups:
        label, switches = SETUPS[name]
        flops = iteration_flops(family, batch, **{**base, **switches})
        first = first or flops
        seconds = estimate_seconds(flops, device_name, utilisation)
        rows.append(f"| {label} | {flops / 1e12:.4g} | {flops / batch / 1e12:.4g} | {flops / first:.3f} | "
                    f"{'—' if seconds is None else f'{seconds:.3g}'} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = plumbing.FlagParser("cost.py", __doc__.split("\n\n")[0])  # (exact flags, one-line errors)
    p.add_argument("--family", default="sd15", help="sd15, pixart (512 px) or sdxl (1024 px): random_weights shapes")
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
    args = p.parse_args(argv)
    if args.batch < 1:
        plumbing.die(f"--batch must be a positive integer, got {args.batch}")
    plumbing.check_ranges(p, args, {
        "utilisation": (lambda v: 0 < v <= 1, "a fraction of the card's peak, 0 < F <= 1 (e.g. 0.4)"),
        "sample_steps": (lambda v: v >= 0, ">= 0 (0 = no sampling count)")})
    _, fam = architecture(args.family)
    given = {k: v for k in SWITCHES if (v := getattr(args, k)) is not None and v is not False}  # (0 is a value)
    base = {"guidance_scale": GUIDANCE[fam.name], **given}
    if args.rewards:
        size = arch_image_size(args.family)
        print(f"reward models, one {size}² image (resized to 224 inside each), batch 1:")
        return reward_table(size)
    peak = plumbing.peak_tflops(args.device)
    print(f"{args.family}, batch {args.batch}, base run {base}; time = FLOPs / ({args.device}: "
          f"{peak or 'unknown'} TFLOP/s dense bf16 peak × {args.utilisation} utilisation)")
    table(args.family, args.batch, args.device, args.utilisation, base, args.setups)
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
