"""families: what differs between the text-to-image diffusion models dipp trains, one record per family.

DI++ itself never learns a family's name: dipp.py sees every denoiser as ε(x_t, t, c), a closure with the
network bound, and every prompt batch as a conditioning c it passes through. What *does* differ between
Stable Diffusion 1.x (a UNet with CLIP text), SDXL (a UNet with two CLIP encoders, a pooled embedding and
size micro-conditions), PixArt-α (a DiT with T5 text) and Stable Diffusion 3.5 (an MMDiT with CLIP-L, OpenCLIP
bigG and T5, trained as a rectified flow) is recorded here: how a model folder is recognised, which classes to
load, its forward process (DDPM's ᾱ_t or a flow's σ_t), how prompts become c and the null condition ∅ for CFG,
how the denoiser is called as ε̂ (a flow's velocity converted), which layer reads it out, the one-step
generator's default t*, where LoRA adapters go, the stock pipeline that samples the same model, and the tiny
decoder for the reward.

Adding a family is adding one `Family(...)` record and its functions (`eps`, `encode`). Nothing here is
needed to understand the method. It imports plumbing (errors, freezing), never dipp.
"""
import dataclasses
import json
import os
import typing

import torch

import plumbing

# -----------------------------------------------------------------------------
# 1. Conditioning containers


class MaskedText(typing.NamedTuple):
    """PixArt's prompt conditioning c: T5 embeddings and their attention mask (padding is masked out of the
    transformer's cross-attention). It supports what training does with SD's plain (B, 77, D) tensor:
    .to(dtype), .expand_as(other), and dipp.batch_cat for CFG's one batched call."""
    emb: torch.Tensor  # (B, L, D): T5's last hidden states, L = 120 tokens
    mask: torch.Tensor  # (B, L): 1 = prompt token, 0 = padding

    def to(self, dtype):
        return MaskedText(self.emb.to(dtype), self.mask)

    def expand_as(self, other):
        return MaskedText(self.emb.expand_as(other.emb), self.mask.expand_as(other.mask))


class SDXLText(typing.NamedTuple):
    """SDXL's conditioning c, exactly what StableDiffusionXLPipeline passes its UNet: cross-attention states, and
    `added_cond_kwargs` = {"text_embeds": pooled, "time_ids": time_ids}. All three are float tensors in the
    pipeline's dtype, so .to(dtype) casts all three (time ids are small integers: exact in fp16/bf16)."""
    emb: torch.Tensor  # (B, 77, D1 + D2): penultimate hidden states of CLIP-L and CLIP-bigG, concatenated (2048)
    pooled: torch.Tensor  # (B, P): text_encoder_2's projected pooled output (1280)
    time_ids: torch.Tensor  # (B, 6): (original H, W, crop top, left, target H, W) in pixels

    def to(self, dtype):
        return SDXLText(*(x.to(dtype) for x in self))

    def expand_as(self, other):
        return SDXLText(*(x.expand_as(y) for x, y in zip(self, other)))

    def zeroed(self):
        """∅ as StableDiffusionXLPipeline builds it when no negative prompt is given and the pipeline's
        force_zeros_for_empty_prompt is set (SDXL base's default): zero text states and pooled embedding, the
        same size micro-conditions. DMD2-SDXL's training code does the same."""
        return SDXLText(torch.zeros_like(self.emb), torch.zeros_like(self.pooled), self.time_ids)


class SD3Text(typing.NamedTuple):
    """SD3's conditioning c, exactly what StableDiffusion3Pipeline passes its transformer: the joint-attention
    sequence (CLIP-L and bigG penultimate states side by side, zero-padded to T5's width, then T5's states, or zeros
    without T5) and the pooled projections of both CLIPs."""
    emb: torch.Tensor  # (B, 77 + 256, 4096): encoder_hidden_states
    pooled: torch.Tensor  # (B, 768 + 1280): pooled_projections

    def to(self, dtype):
        return SD3Text(*(x.to(dtype) for x in self))

    def expand_as(self, other):
        return SD3Text(*(x.expand_as(y) for x, y in zip(self, other)))


class SD3Encoders(typing.NamedTuple):
    """SD3's three text encoders; `third` (T5) is None where the folder has none, as the pipeline allows: its
    sequence is then zeros of the transformer's joint_attention_dim."""
    first: torch.nn.Module  # CLIP-L, CLIPTextModelWithProjection
    second: torch.nn.Module  # OpenCLIP bigG, CLIPTextModelWithProjection
    third: typing.Any  # T5-XXL, T5EncoderModel, or None
    joint_dim: int  # the transformer's joint_attention_dim


class TextEncoders(typing.NamedTuple):
    """A family with two text encoders (SDXL): both, and the default image size (H, W) in pixels, which its
    pipeline turns into the time-id micro-conditions (unet sample_size × the VAE's downsampling factor)."""
    first: torch.nn.Module
    second: torch.nn.Module
    image_size: tuple

# -----------------------------------------------------------------------------
# 2. Per-family functions: the denoiser as ε(x_t, t, c), prompts as c


# Every eps(net, x_t, t, c, sigma) gets c already in the net's dtype and x_t in fp32 (cast here, to c's dtype); σ_t
# (B, 1, 1, 1) only a flow needs: its time input and its velocity's conversion.


def unet_eps(unet, x_t, t, cond, sigma=None):
    """SD's UNet2DConditionModel: c is CLIP's last hidden state, passed as cross-attention states."""
    return unet(x_t.to(cond.dtype), t, encoder_hidden_states=cond).sample  # ε̂: (B, 4, h, w)


def pixart_eps(transformer, x_t, t, cond, sigma=None):
    """PixArt's transformer predicts 8 channels: ε̂ and the variance its own sampler learned. Only ε̂ is a
    score (s = −ε̂/σ), so the second half is dropped, and gets exactly zero gradient."""
    # 1024-px models condition on the image size: [h, w] in pixels (VAE: 8 per latent) and h/w
    x_t, extra = x_t.to(cond.emb.dtype), None
    if getattr(transformer, "module", transformer).use_additional_conditions:  # (DDP: .module)
        B, (h, w) = x_t.shape[0], x_t.shape[-2:]
        extra = dict(resolution=x_t.new_tensor([[8.0 * h, 8.0 * w]]).expand(B, 2),
                     aspect_ratio=x_t.new_tensor([[h / w]]).expand(B, 1))
    out = transformer(x_t, encoder_hidden_states=cond.emb, encoder_attention_mask=cond.mask, timestep=t,
                      added_cond_kwargs=extra).sample  # (B, 8, h, w)
    return out[:, :x_t.shape[1]]  # ε̂: (B, 4, h, w)


def sdxl_eps(unet, x_t, t, cond, sigma=None):
    """SDXL's UNet2DConditionModel (addition_embed_type "text_time"): the pooled text embedding and the 6 time
    ids enter through added_cond_kwargs, as StableDiffusionXLPipeline passes them."""
    return unet(x_t.to(cond.emb.dtype), t, encoder_hidden_states=cond.emb,
                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample  # ε̂: (B, 4, h, w)


def sd3_velocity(transformer, x_t, t, cond, sigma):
    """SD3's SD3Transformer2DModel as StableDiffusion3Pipeline calls it: time input 1000 σ_t (its scheduler's
    timesteps are σ · num_train_timesteps), text as joint-attention states and pooled projections. It predicts the
    velocity of the flow x_t = (1 − σ) x0 + σ ε: v̂ = ε̂ − x̂0 (B, 16, h, w), in fp32."""
    assert sigma is not None, "a flow's ε(x_t, t, c) needs σ_t: build it with dipp.denoiser_eps(net, family, schedule)"
    return transformer(hidden_states=x_t.to(cond.emb.dtype), timestep=sigma.flatten() * 1000,
                       encoder_hidden_states=cond.emb, pooled_projections=cond.pooled).sample.float()


def sd3_eps(transformer, x_t, t, cond, sigma):
    """ε̂ = x_t + (1 − σ_t) v̂ (from x_t = (1 − σ) x0 + σ ε and v = ε − x0), with the fp32 x_t: the teacher (bf16)
    and the fake score (fp32) then differ by their v̂ only, not by x_t's rounding."""
    return x_t + (1 - sigma) * sd3_velocity(transformer, x_t, t, cond, sigma)  # ε̂: (B, 16, h, w)


def sd3_x0(transformer, x_t, t, cond, sigma):
    """x̂0 = x_t − σ_t v̂: the generator's readout (at σ = 1, α = 0, where ε̂ = x_t carries nothing), and what one
    step of FlowMatchEulerDiscreteScheduler from σ to 0 returns: x_t + (0 − σ) v̂."""
    return x_t - sigma * sd3_velocity(transformer, x_t, t, cond, sigma)  # x̂0: (B, 16, h, w)


@torch.no_grad()
def clip_text(tokenizer, text_encoder, prompts):
    """c as StableDiffusionPipeline makes it: pad to 77 CLIP tokens, last hidden state."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
    return text_encoder(ids)[0].float()  # (B, 77, D)


@torch.no_grad()
def t5_text(tokenizer, text_encoder, prompts):
    """c as PixArtAlphaPipeline.encode_prompt makes it without caption cleaning: lower-cased, padded to 120 T5
    tokens, the mask passed to T5 and kept for the transformer's cross-attention."""
    tok = tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=120, truncation=True,
                    return_tensors="pt").to(text_encoder.device)
    return MaskedText(text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0], tok.attention_mask)

@torch.no_grad()
def sdxl_text(tokenizers, encoders, prompts):
    """c as StableDiffusionXLPipeline.encode_prompt (clip_skip None) and _get_add_time_ids make it at the default
    size: each CLIP tokenizer pads to 77, each encoder's penultimate hidden states (hidden_states[-2]),
    concatenated; the pooled embedding is text_encoder_2's projected output; time ids (H, W, 0, 0, H, W)."""
    states = []
    for tokenizer, encoder in zip(tokenizers, encoders[:2]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (B, 77, D_i)
    pooled = out[0]  # (B, P): CLIPTextModelWithProjection's text_embeds (the second encoder's)
    H, W = encoders.image_size
    time_ids = pooled.new_tensor([[H, W, 0, 0, H, W]], dtype=torch.float32).repeat(len(prompts), 1)  # (B, 6)
    return SDXLText(torch.cat(states, -1).float(), pooled.float(), time_ids)

@torch.no_grad()
def sd3_text(tokenizers, encoders, prompts):
    """c as StableDiffusion3Pipeline.encode_prompt (clip_skip None, max_sequence_length 256) makes it: both CLIP
    tokenizers pad to CLIP-L's 77, each encoder's penultimate states (cast to CLIP-L's dtype) side by side, zero-
    padded to T5's width; T5's last states of 256 tokens (no attention mask, as the pipeline) after them, or zeros
    without T5; the pooled projections (text_embeds) of both CLIPs side by side."""
    states, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizers[0].model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2].to(encoders.first.dtype))  # (B, 77, D_i)
        pooled.append(out[0])  # (B, P_i)
    if encoders.third is None:
        t5 = states[0].new_zeros(len(prompts), 256, encoders.joint_dim)  # (B, 256, 4096)
    else:
        ids = tokenizers[2](prompts, padding="max_length", max_length=256, truncation=True, add_special_tokens=True,
                            return_tensors="pt").input_ids.to(encoders.third.device)
        t5 = encoders.third(ids)[0]  # (B, 256, 4096)
    clip = torch.nn.functional.pad(torch.cat(states, -1), (0, t5.shape[-1] - sum(s.shape[-1] for s in states)))
    return SD3Text(torch.cat([clip, t5], -2).float(), torch.cat(pooled, -1).float())  # (B, 333, 4096), (B, 2048)


def clip_pipeline_text(cond, null):
    """c and ∅ as StableDiffusionPipeline takes them already encoded (it casts them to the UNet's dtype)."""
    return dict(prompt_embeds=cond, negative_prompt_embeds=null.expand_as(cond))


def sdxl_pipeline_text(cond, null):
    """c and ∅ as StableDiffusionXLPipeline takes them already encoded: cross-attention states and pooled embeddings
    of both. Its time ids it builds itself, from the default size that sdxl_text's are made of (the test checks)."""
    null = null.expand_as(cond)
    return dict(prompt_embeds=cond.emb, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=null.emb,
                negative_pooled_prompt_embeds=null.pooled)


def sd3_pipeline_text(cond, null):
    """c and ∅ as StableDiffusion3Pipeline takes them already encoded: joint-attention states and pooled
    projections of both."""
    null = null.expand_as(cond)
    return dict(prompt_embeds=cond.emb, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=null.emb,
                negative_pooled_prompt_embeds=null.pooled)


def t5_pipeline_text(cond, null):
    """c and ∅ as PixArtAlphaPipeline takes them already encoded, with their masks (its negative prompt, "" by
    default, is then None). Its own caption cleaning and aspect-ratio binning are off: the prompts were encoded as
    t5_text does, and the size is the model's."""
    null = null.expand_as(cond)
    return dict(prompt_embeds=cond.emb, prompt_attention_mask=cond.mask, negative_prompt=None,
                negative_prompt_embeds=null.emb, negative_prompt_attention_mask=null.mask, clean_caption=False,
                use_resolution_binning=False)

# -----------------------------------------------------------------------------
# 3. The records


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """How to recognise, load, condition and call one kind of text-to-image diffusion model."""
    name: str
    title: str  # how messages name it
    recognise: typing.Callable  # recognise(index) -> bool; index: model_index.json, or a folder's subfolders
    denoiser: str  # diffusers class of the ε-network ...
    folder: str  # ... kept in this subfolder of a pipeline folder
    generator_classes: tuple  # `_class_name`s a --generator_init config may carry (old names included)
    text_encoder: str  # transformers classes of the text encoder and its tokenizer
    tokenizer: str
    text_encoder_2: str = ""  # a second text encoder and tokenizer (SDXL), in text_encoder_2/ and tokenizer_2/:
    tokenizer_2: str = ""  # then Models.tokenizer is a pair and the text encoder a TextEncoders
    text_encoder_3: str = ""  # a third (SD3's T5), in text_encoder_3/ and tokenizer_3/ where the folder has them:
    tokenizer_3: str = ""  # then Models.tokenizer is a triple (its third None without T5) and the encoder SD3Encoders
    encode: typing.Callable  # encode(tokenizer, text_encoder, prompts) -> c
    null_prompt: str = ""  # CFG's ∅ is this prompt's c, as SD's and PixArt's pipelines build it (negative prompt "")
    null_zeros: bool = False  # ... with its embeddings zeroed (c.zeroed()), as SDXL's pipeline builds it
    pre_encode: bool  # encode every prompt once at start-up (cached in output_dir), then free the text encoder ...
    condition: typing.Any = None  # ... and rebuild c from the cache as this NamedTuple (MaskedText, SDXLText)
    forward_process: str = "ddpm"  # dipp.Schedule's constructor: "ddpm" (the scheduler's ᾱ_t) or "flow" (its σ_t)
    eps: typing.Callable  # eps(net, x_t, t, c, σ_t) -> ε̂ (B, C, h, w)
    x0: typing.Optional[typing.Callable] = None  # x0(net, x_t, t, c, σ_t) -> x̂0 for the generator (None: Tweedie's)
    readout: str  # the denoiser's last layer, computed in fp32 (readout_in_fp32)
    t_star: int  # default t* of the one-step generator (dipp.OneStepGenerator)
    t_range: tuple = (20, 980)  # π(t)'s default {t_min..t_max} (NOTE(deviation 2); a flag given explicitly wins)
    lora_targets: tuple  # layers that get a LoRA adapter under --lora_rank (never the readout)
    shard_units: tuple  # classes of the blocks FSDP2 shards one by one under --shard fsdp (plumbing.shard)
    pipeline: str  # the stock diffusers pipeline that samples this family (its denoiser argument is `folder`) ...
    pipeline_parts: dict  # ... the rest of its constructor beside denoiser, VAE, tokenizer(s), scheduler ...
    pipeline_text: typing.Callable  # ... and pipeline_text(c, ∅) -> its call's keywords for prompts already encoded
    tiny_decoder: str  # AutoencoderTiny for --reward_decoder tiny (TAESD, trained on these latents)
    example: str  # a hub id of this family, for advice in messages


FAMILIES = {f.name: f for f in (
    Family(name="sd", title="SD-1.x", recognise=lambda index: "unet" in index and "text_encoder_2" not in index,
           denoiser="UNet2DConditionModel", folder="unet", generator_classes=("UNet2DConditionModel",),
           text_encoder="CLIPTextModel", tokenizer="CLIPTokenizer", encode=clip_text, pre_encode=False,
           eps=unet_eps, readout="conv_out", t_star=999, shard_units=("BasicTransformerBlock", "ResnetBlock2D"),
           lora_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                         "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                         "time_emb_proj"),  # DMD2's t* and LoRA layers
           pipeline="StableDiffusionPipeline", pipeline_text=clip_pipeline_text,
           pipeline_parts=dict(text_encoder=None, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False),
           tiny_decoder="madebyollin/taesd",
           example="stable-diffusion-v1-5/stable-diffusion-v1-5"),
    # T5-XXL (4.8 B parameters, 9.5 GB in bf16) only ever encodes the fixed prompt lists: pre-encoded, it never
    # sits beside the three transformers. t* = 400 as PixArt-α-DMD (see the deviation noted at dipp.OneStepGenerator).
    # PixArt-α-DMD's released config still names the transformer's old class, Transformer2DModel.
    Family(name="pixart", title="PixArt-α",
           recognise=lambda index: "transformer" in index and "text_encoder_2" not in index,
           denoiser="PixArtTransformer2DModel", folder="transformer",
           generator_classes=("PixArtTransformer2DModel", "Transformer2DModel"),
           text_encoder="T5EncoderModel", tokenizer="AutoTokenizer", encode=t5_text, pre_encode=True,
           condition=MaskedText, eps=pixart_eps, readout="proj_out", t_star=400,
           shard_units=("BasicTransformerBlock",),
           lora_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "adaln_single.linear"),
           pipeline="PixArtAlphaPipeline", pipeline_parts=dict(text_encoder=None), pipeline_text=t5_pipeline_text,
           tiny_decoder="madebyollin/taesd",
           example="PixArt-alpha/PixArt-XL-2-512x512"),
    # SDXL: t* = 399 and a zero ∅ as DMD2-SDXL (LCMScheduler, timesteps=[399]) and DI++-SDXL; docs/sdxl.md.
    # Its two text encoders (0.82 B) pre-encode the prompt lists, as PixArt's T5, and are freed before the UNets exist.
    Family(name="sdxl", title="SDXL", recognise=lambda index: "unet" in index and "text_encoder_2" in index,
           denoiser="UNet2DConditionModel", folder="unet", generator_classes=("UNet2DConditionModel",),
           text_encoder="CLIPTextModel", tokenizer="CLIPTokenizer", text_encoder_2="CLIPTextModelWithProjection",
           tokenizer_2="CLIPTokenizer", encode=sdxl_text, null_zeros=True, pre_encode=True, condition=SDXLText,
           eps=sdxl_eps, readout="conv_out", t_star=399, shard_units=("BasicTransformerBlock", "ResnetBlock2D"),
           lora_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                         "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                         "time_emb_proj"),
           pipeline="StableDiffusionXLPipeline", pipeline_text=sdxl_pipeline_text,  # (no watermark: it would mark
           pipeline_parts=dict(text_encoder=None, text_encoder_2=None, add_watermarker=False),  # pixels, not latents)
           tiny_decoder="madebyollin/taesdxl",
           example="stabilityai/stable-diffusion-xl-base-1.0"),
    # SD3.5: a rectified flow; t* = 999 is σ = 1, the generator x0 = z − v̂(z), one Euler step (docs/sd3.md). Its
    # three text encoders (T5-XXL alone 4.8 B) pre-encode the prompt lists and are freed, as SDXL's and PixArt's.
    # LoRA on attention (both streams, and SD3.5-Medium's second attention) and feed-forwards, as diffusers' SD3
    # LoRA script's attention defaults plus the MLPs that DMD2's SD LoRA adapts too.
    Family(name="sd3", title="SD3", recognise=lambda index: "transformer" in index and "text_encoder_2" in index,
           denoiser="SD3Transformer2DModel", folder="transformer", generator_classes=("SD3Transformer2DModel",),
           text_encoder="CLIPTextModelWithProjection", tokenizer="CLIPTokenizer",
           text_encoder_2="CLIPTextModelWithProjection", tokenizer_2="CLIPTokenizer", text_encoder_3="T5EncoderModel",
           tokenizer_3="T5TokenizerFast", encode=sd3_text, pre_encode=True, condition=SD3Text,
           forward_process="flow", eps=sd3_eps, x0=sd3_x0, readout="proj_out", t_star=999,
           t_range=(43, 812),  # SD1.5's σ/α range (0.138..13.04) on the shift-3 flow grid: docs/toy.md, SD3.5
           shard_units=("JointTransformerBlock",),
           lora_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                         "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
           pipeline="StableDiffusion3Pipeline", pipeline_text=sd3_pipeline_text,
           pipeline_parts=dict(text_encoder=None, text_encoder_2=None, text_encoder_3=None),
           tiny_decoder="madebyollin/taesd3",
           example="stabilityai/stable-diffusion-3.5-medium"))}

# -----------------------------------------------------------------------------
# 4. Loading a model folder or hub id

ADVICE = ("Get a complete one with `huggingface-cli download REPO --local-dir DIR`, REPO e.g. "
          + " or ".join(f.example for f in FAMILIES.values()))


def find_family(name):
    """The family of a local folder (from its model_index.json, else its subfolders) or of a hub id (from its
    model_index.json). One line when no family claims it."""
    if os.path.isdir(name):
        path = os.path.join(name, "model_index.json")
        index = json.load(open(path)) if os.path.isfile(path) else {
            d: None for d in os.listdir(name) if os.path.isdir(os.path.join(name, d))}
    else:
        from diffusers import DiffusionPipeline
        index = plumbing.load_or_die(lambda: DiffusionPipeline.load_config(name), name, "model_index.json")
    found = [f for f in FAMILIES.values() if f.recognise(index)]
    if not found:
        folders = " or ".join(f"{f.folder}/config.json ({f.title})" for f in FAMILIES.values())
        plumbing.die(f"'{name}' is not a diffusers model folder of a family dipp knows: missing {folders}. {ADVICE}")
    return found[0]


def family_t_range(name):
    """{"t_min", "t_max"}: π(t)'s default range for the teacher `name` (its family's t_range)."""
    return dict(zip(("t_min", "t_max"), find_family(name).t_range))


def check_folder(name):
    """The family of a diffusers folder or hub id, after checking that a local folder holds every part dipp
    loads: one line naming what is missing, before anything is loaded."""
    fam = find_family(name)
    if os.path.isdir(name):
        second = ("text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json") if fam.text_encoder_2 else ()
        if fam.text_encoder_3 and has_third_encoder(name):  # (SD3 without text_encoder_3/: no T5, as allowed)
            second += ("text_encoder_3/config.json", "tokenizer_3/tokenizer_config.json")
        missing = [f for f in (f"{fam.folder}/config.json", "vae/config.json", "text_encoder/config.json",
                               "tokenizer/tokenizer_config.json", *second, "scheduler/scheduler_config.json")
                   if not os.path.isfile(os.path.join(name, f))]
        if missing:
            plumbing.die(f"'{name}' is not a complete diffusers {fam.title} folder: missing {', '.join(missing)}. "
                         + ADVICE)
    return fam


def readout_in_fp32(net, family):
    """The denoiser's last layer (conv_out, or PixArt's and SD3's proj_out), which outputs ε̂, in fp32 under bf16
    autocast. Why: x0 = (z − σ ε̂)/α divides by α_{t*} (0.068 for SD at t* = 999), so bf16's rounding of ε̂
    (~0.2 %) would be amplified into every sample (~0.024 rms per SD latent element); the IKL gradient's
    ε̃_ref − ε̂_fake carries the same 1/α at high t. One small layer in fp32 costs nothing; same weights."""
    plumbing.fp32_layer(getattr(net, family.readout))
    return net


class Models(typing.NamedTuple):
    """What a diffusers pipeline folder holds that dipp uses."""
    family: Family
    net: torch.nn.Module  # the frozen denoiser (teacher)
    vae: torch.nn.Module
    text_encoder: typing.Any  # None when not loaded (see load_models)
    tokenizer: typing.Any
    schedule: typing.Any  # the forward process: ᾱ_t or σ_t (T,) here (family.forward_process), then a dipp.Schedule


def load_models(name, device, dtype, text_encoder=True):
    """Teacher denoiser, VAE, text encoder, tokenizer and ᾱ_t or σ_t of a diffusers folder or hub id of any family.
    Frozen nets are stored in the low-precision dtype: nothing ever backpropagates into their weights.
    text_encoder=False leaves it None: training loads it only where it is needed (see text_conditioning)."""
    import diffusers
    fam = check_folder(name)
    get = lambda cls, sub: plumbing.load_or_die(lambda: cls.from_pretrained(name, subfolder=sub), name, f"{sub}/")
    net, vae = get(getattr(diffusers, fam.denoiser), fam.folder), get(diffusers.AutoencoderKL, "vae")
    tokenizer = load_tokenizer(name, fam)
    if fam.forward_process == "flow":
        schedule = flow_sigmas(get(diffusers.FlowMatchEulerDiscreteScheduler, "scheduler"), name)
    else:
        scheduler = get(diffusers.DDPMScheduler, "scheduler")
        if scheduler.config.prediction_type != "epsilon":
            plumbing.die(f"'{name}' predicts {scheduler.config.prediction_type}; dipp supports ε-prediction models")
        schedule = scheduler.alphas_cumprod
    plumbing.freeze(net, device, dtype)
    # the VAE stays fp32 under fp16 (its decoder's activations overflow fp16 at 512 px, SDXL's at any size; the
    # alternative, madebyollin/sdxl-vae-fp16-fix, is a VAE folder to put in place of vae/); bf16 is safe
    plumbing.freeze(vae, device, torch.float32 if dtype == torch.float16 else dtype)
    text = load_text_encoder(name, fam, device, dtype) if text_encoder else None
    return Models(fam, readout_in_fp32(net, fam), vae, text, tokenizer, schedule)


def flow_sigmas(scheduler, name):
    """σ_t (T,) of a FlowMatchEulerDiscreteScheduler's training grid, t = 0 the least noisy: its own `sigmas`
    (σ = shift·s / (1 + (shift − 1)·s), s = (t + 1)/T; SD3.5's shift is 3), reversed, bit for bit what its
    pipeline's steps use. One line for a config whose sampling grid is not that one (resolution-dependent shift)."""
    odd = [k for k in ("use_dynamic_shifting", "shift_terminal", "invert_sigmas", "use_karras_sigmas",
                       "use_exponential_sigmas", "use_beta_sigmas") if scheduler.config.get(k)]
    if odd or scheduler.config.num_train_timesteps != 1000:
        plumbing.die(f"'{name}': its scheduler sets {', '.join(odd) or 'num_train_timesteps'}; dipp's flow family "
                     "supports SD3/SD3.5's FlowMatchEulerDiscreteScheduler (1000 timesteps, a fixed shift)")
    return scheduler.sigmas.flip(0)  # (T,): σ_0 = shifted 1/1000 ... σ_999 = 1


def has_third_encoder(name):
    """Whether an SD3 folder or hub id has its T5 (text_encoder_3); the pipeline also runs without it."""
    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, "text_encoder_3", "config.json"))
    from diffusers import DiffusionPipeline
    index = plumbing.load_or_die(lambda: DiffusionPipeline.load_config(name), name, "model_index.json")
    return (index.get("text_encoder_3") or [None])[0] is not None


def load_tokenizer(name, family):
    """The tokenizer, or for a family with two text encoders (SDXL) the pair (CLIP-L's, CLIP-bigG's), or with three
    (SD3) the triple, T5's None where the folder has no T5."""
    import transformers
    def get(cls, sub):
        return plumbing.load_or_die(lambda: getattr(transformers, cls).from_pretrained(name, subfolder=sub), name,
                                    f"{sub}/")
    first = get(family.tokenizer, "tokenizer")
    if family.tokenizer_3:
        third = get(family.tokenizer_3, "tokenizer_3") if has_third_encoder(name) else None
        return first, get(family.tokenizer_2, "tokenizer_2"), third
    return (first, get(family.tokenizer_2, "tokenizer_2")) if family.tokenizer_2 else first


def load_text_encoder(name, family, device, dtype):
    """The frozen text encoder; for a family with two (SDXL) a TextEncoders with both and the default size."""
    import transformers

    def load(cls, sub):
        get = lambda: getattr(transformers, cls).from_pretrained(name, subfolder=sub)
        return plumbing.freeze(plumbing.load_or_die(get, name, f"{sub}/"), device, dtype)
    first = load(family.text_encoder, "text_encoder")
    if not family.text_encoder_2:
        return first
    if family.text_encoder_3:  # SD3: T5 if the folder has it; the joint width of its zeros otherwise
        from diffusers import SD3Transformer2DModel
        config = plumbing.load_or_die(lambda: SD3Transformer2DModel.load_config(name, subfolder=family.folder), name,
                                      f"{family.folder}/")
        third = load(family.text_encoder_3, "text_encoder_3") if has_third_encoder(name) else None
        return SD3Encoders(first, load(family.text_encoder_2, "text_encoder_2"), third, config["joint_attention_dim"])
    return TextEncoders(first, load(family.text_encoder_2, "text_encoder_2"), default_image_size(name))


def default_image_size(name):
    """(H, W) in pixels that a stock pipeline samples by default: unet sample_size × 2^(VAE blocks − 1)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    unet = plumbing.load_or_die(lambda: UNet2DConditionModel.load_config(name, subfolder="unet"), name, "unet/")
    vae = plumbing.load_or_die(lambda: AutoencoderKL.load_config(name, subfolder="vae"), name, "vae/")
    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return (size, size)


def null_condition(family, text):
    """CFG's ∅ (1, ...): the null prompt's c (SD, PixArt), or that c with its embeddings zeroed (SDXL)."""
    c = text([family.null_prompt])
    return c.zeroed() if family.null_zeros else c


def text_conditioning(name, family, tokenizer, prompt_lists, device, dtype, cache_dir, main_rank=True, world=1):
    """(prompts -> c, text encoder or None). SD's CLIP encoder (123 M) runs every step. A pre-encoding family
    (PixArt's T5, SDXL's two CLIPs) encodes each prompt of the lists once, cached in cache_dir, and is freed before
    the trainable nets exist; a rerun or resume with the same prompts never loads it."""
    if not family.pre_encode:
        text_encoder = load_text_encoder(name, family, device, dtype)
        return (lambda prompts: family.encode(tokenizer, text_encoder, prompts)), text_encoder
    make_encoder = lambda: (lambda batch, enc=load_text_encoder(name, family, device, dtype):
                            family.encode(tokenizer, enc, batch)._asdict())
    parts = ["text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if family.text_encoder_2 else [])
    parts += ["text_encoder_3", "tokenizer_3", family.folder] if family.text_encoder_3 else []  # (no T5: its width)
    key = [name, family.name, str(dtype), plumbing.files_stamp(*(os.path.join(name, p) for p in parts))]
    if family.condition is SDXLText:  # SDXL's c holds the default size as time ids: a changed unet/vae config too
        key.append(list(default_image_size(name)))
    rows = plumbing.encoded_prompts(cache_dir, key, [p for ps in prompt_lists for p in ps], make_encoder, device,
                                    main_rank, world)
    return (lambda batch: family.condition(**rows(batch)).to(torch.float32)), None


def generator_subfolder(family, name):
    """Where a --generator_init model folder, pipeline folder or hub id keeps the denoiser (None: at its top),
    after checking that it is this family's: a generator of the other family is one line, not a loader error
    about attention heads."""
    sub = plumbing.find_subfolder(name, family.folder)
    plumbing.check_model_class(name, sub, family.generator_classes)
    return sub


def load_generator(name, teacher, family, device):
    """--generator_init as a trainable fp32 denoiser: a bare weight file on the teacher's config (as DMD2 releases its
    SD1.5 generator), a model folder (dipp exports one), a pipeline folder holding one (PixArt-α-DMD, DI++-SDXL) or a
    hub id; or a LoRA adapter file (or a folder of only it: dipp's pytorch_lora_weights.safetensors), merged into
    the teacher. A generator of another family is one line."""
    adapter = plumbing.lora_adapter_file(name)
    if adapter:
        return plumbing.teacher_with_lora(teacher, adapter, family).to(device).requires_grad_(True)
    if os.path.isfile(name):
        net = plumbing.load_weights_or_die(teacher.__class__.from_config(teacher.config), name)
        return net.to(device).float().requires_grad_(True)
    sub = generator_subfolder(family, name)
    load = lambda: plumbing.from_pretrained_any_variant(type(teacher), name, sub, torch_dtype=torch.float32)
    net = plumbing.load_or_die(load, name, f"the --generator_init {family.denoiser}")
    return net.to(device).requires_grad_(True)


def stock_pipeline(name, models):
    """The family's stock diffusers pipeline (StableDiffusionPipeline, PixArtAlphaPipeline, StableDiffusionXLPipeline,
    StableDiffusion3Pipeline) on already loaded models, with the scheduler class of the folder's own scheduler config
    (SD1.5: PNDM, PixArt-α: DPM-Solver++, SDXL: Euler, SD3: flow-matching Euler) rather than dipp's DDPM: what
    `Pipeline.from_pretrained(name)` builds. It holds no text encoder: it is called with prompts already encoded,
    through family.pipeline_text."""
    import diffusers
    fam = models.family
    config = plumbing.load_or_die(lambda: diffusers.DDPMScheduler.load_config(name, subfolder="scheduler"), name,
                                  "scheduler/")
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    tokenizers = dict(zip(("tokenizer", "tokenizer_2", "tokenizer_3"),
                          models.tokenizer if fam.tokenizer_2 else [models.tokenizer]))
    pipe = getattr(diffusers, fam.pipeline)(**{fam.folder: models.net}, vae=models.vae, scheduler=scheduler,
                                            **tokenizers, **fam.pipeline_parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe

# -----------------------------------------------------------------------------
# 6. Which family a generator belongs to, from its config or its tensors (SD-1.x and SDXL UNets share one class)

INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
             "projection_class_embeddings_input_dim", "caption_channels", "joint_attention_dim",
             "pooled_projection_dim", "patch_size")  # what c, x_t and ε̂ look like to the net


def family_of_config(config):
    """The family a denoiser's config.json describes (None: none dipp knows): SD3 and PixArt-α by class, SDXL's UNet by
    its size-and-pooled-text embedding (addition_embed_type "text_time"), else SD-1.x's UNet."""
    name = config.get("_class_name", "")
    if name in FAMILIES["sd3"].generator_classes or "joint_attention_dim" in config:
        return FAMILIES["sd3"]
    if name in FAMILIES["pixart"].generator_classes or "caption_channels" in config:
        return FAMILIES["pixart"]
    if name == "UNet2DConditionModel":
        return FAMILIES["sdxl"] if config.get("addition_embed_type") == "text_time" else FAMILIES["sd"]
    return None


def family_of_weights(keys):
    """The family a bare state dict's tensor names belong to (None: none dipp knows)."""
    if "add_embedding.linear_1.weight" in keys:  # SDXL's text_time embedding
        return FAMILIES["sdxl"]
    if "context_embedder.weight" in keys:  # SD3's joint-attention text projection
        return FAMILIES["sd3"]
    if any(k.startswith(("caption_projection.", "adaln_single.")) for k in keys):
        return FAMILIES["pixart"]
    if "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys:
        return FAMILIES["sd"]
    return None


def weight_shapes(path, what):
    """{tensor name: shape} of a weight file, reading no more than its header (safetensors) or memory-mapping it
    (torch's zip format): a truncated or damaged file is one line; `what` names it with the flag it came from."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # (a truncated file: an error)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # (the legacy format cannot be mapped)
        if not isinstance(state, dict):
            raise ValueError(f"a {type(state).__name__}, not a state dict")
        return {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    except Exception as e:  # truncated, not this format, or a pickle with code in it
        plumbing.die(f"{what} cannot be read as a weight file ({type(e).__name__}: "
                     f"{(str(e).strip().splitlines() or [''])[0][:120]}); it is damaged or not a weight file: "
                     "download or export it again")


def check_generator(family, teacher, name, flag):
    """Before any network is built: a generator (a model folder, a pipeline folder holding one, or a bare weight
    file) must be of the teacher's family and fit its interface (the config fields in INTERFACE; a weight file's
    tensor names and shapes against the teacher's config). SD-1.x and SDXL UNets are one class, so the class alone
    does not tell them apart. One line naming both families otherwise, and the flag of the program that was run."""
    import diffusers
    if not os.path.exists(name) or plumbing.lora_adapter_file(name):
        return  # (a hub id: from_pretrained's own checks; an adapter: teacher_with_lora checks its layers)
    load = lambda: getattr(diffusers, family.denoiser).load_config(teacher, subfolder=family.folder)
    expected = plumbing.load_or_die(load, teacher, f"the teacher's {family.folder}/config.json")
    if os.path.isfile(name):
        shapes = weight_shapes(name, f"{flag} '{name}'")
        found = family_of_weights(shapes)
        if found is not None and found is not family:
            plumbing.die(f"{flag} '{name}' holds the weights of a {found.title} {found.denoiser}, but the teacher "
                         f"is {family.title}; give a generator of the teacher's family, or that family's teacher")
        with torch.device("meta"):  # (no memory, no initialisation: the shapes only)
            net = getattr(diffusers, family.denoiser).from_config(expected)
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        wrong = [k for k in want if shapes.get(k) != want[k]] + [k for k in shapes if k not in want]
        if wrong:
            plumbing.die(f"{flag} '{name}' does not fit the teacher's {family.title} {family.denoiser} config "
                         f"({len(wrong)} tensors missing, extra or of another shape, e.g. {', '.join(wrong[:3])}); "
                         "give the weights of a generator with the teacher's architecture")
        return
    sub = plumbing.find_subfolder(name, family.folder)
    path = os.path.join(name, sub or "", "config.json")
    if not os.path.isfile(path):  # a pipeline folder of another family keeps its denoiser in another subfolder
        path = next((p for p in (os.path.join(name, f.folder, "config.json") for f in FAMILIES.values())
                     if os.path.isfile(p)), None)
        if path is None:
            return  # (the caller says what a generator folder must hold)
    try:
        config = json.load(open(path, encoding="utf-8"))
    except ValueError as e:
        plumbing.die(f"{flag} '{name}': {path} is damaged ({type(e).__name__}); download or export it again")
    found = family_of_config(config)
    if found is not family:
        what = f"a {found.title} {found.denoiser}" if found else f"a {config.get('_class_name', 'model')}"
        plumbing.die(f"{flag} '{name}' holds {what}, but the teacher is {family.title}; give a generator of the "
                     "teacher's family, or that family's teacher")
    differ = [f"{k} {config.get(k)} (the teacher's: {expected.get(k)})" for k in INTERFACE
              + (("sample_size",) if family.name == "pixart" else ()) if config.get(k) != expected.get(k)]
    if differ:
        plumbing.die(f"{flag} '{name}' is a {family.title} {family.denoiser} of another shape than the teacher's: "
                     f"{'; '.join(differ)}; give a generator of the teacher's architecture")
    weights = [f for f in sorted(os.listdir(os.path.dirname(path))) if f.endswith((".safetensors", ".bin"))]
    if not weights:
        plumbing.die(f"{flag} '{name}' has {os.path.relpath(path, name)} but no weight file beside it "
                     "(diffusion_pytorch_model.safetensors or .bin); the copy or download is incomplete")
    for f in weights[:1]:  # a truncated download or copy: one line now, not a loader error later
        weight_shapes(os.path.join(os.path.dirname(path), f), f"{flag} '{name}': its {f}")
