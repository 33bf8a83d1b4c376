"""Random-weight model folders for `dipp.py --random_weights tiny|tiny_pixart|tiny_sdxl|tiny_sd3|sd15|pixart512|sdxl`
(`--tiny` is short for the first) and for the tests.

Not needed to understand DI++. The components are written with save_pretrained, so dipp loads them
through exactly the same code as the real SD1.5 / PixArt-α weights; nothing is downloaded. A PixArt folder
holds a PixArtTransformer2DModel, a T5 encoder and a T5 tokenizer built in-process, and the same VAE as SD.
An SDXL folder holds a "text_time" UNet, CLIPTextModel + CLIPTextModelWithProjection with two tokenizers, a VAE
with SDXL's scaling factor and SDXL's EulerDiscreteScheduler config. An SD3 folder holds an SD3.5-style
SD3Transformer2DModel (dual attention, RMS q/k norm), two CLIPTextModelWithProjection + a T5 with their tokenizers,
a 16-channel VAE with a scaling and a shift factor, and SD3.5's FlowMatchEulerDiscreteScheduler config (shift 3).
"""
import json
import os

import torch

SHAPES = {  # diffusers / transformers configs: tiny (CPU tests) and SD1.5's own (for --benchmark)
    "tiny": dict(
        unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16),
        vae=dict(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=16, sample_size=16,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  vocab_size=1000, max_position_embeddings=77, projection_dim=32),
        vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    image_size=16, patch_size=4, projection_dim=32),
        taesd=dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                   num_decoder_blocks=(1, 1), upsampling_scaling_factor=2)),
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  vocab_size=49408, max_position_embeddings=77, projection_dim=768),
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    image_size=224, patch_size=14, projection_dim=768),
        taesd=dict()),  # AutoencoderTiny's defaults are TAESD's architecture (madebyollin/taesd)
}
# PixArt-α: the transformer as diffusers' own tests build it (tiny), and the 512 px model's config (pixart512).
SHAPES["tiny_pixart"] = dict(
    SHAPES["tiny"], transformer=dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=3, caption_channels=32, cross_attention_dim=24),
    t5=dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=64))
# T5 has XXL's width (the transformer sees embeddings of the real shape) but 2 of its 24 layers: it runs once at
# start-up and is freed before training (dipp pre-encodes the prompts), so the timed loop never holds it.
SHAPES["pixart512"] = dict(
    SHAPES["sd15"], transformer=dict(sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72,
                                     num_attention_heads=16, caption_channels=4096, cross_attention_dim=1152),
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2, vocab_size=32128))

# SDXL: the UNet as diffusers' own SDXL pipeline tests build it (text_time embedding, linear projections), with
# two text encoders of different widths so that a mix-up of the two cannot pass: cross-attention sees 32 + 48,
# the added embedding 6 time ids × 8 + the second encoder's projection (24). `sdxl` is SDXL-base-1.0's config.
SHAPES["tiny_sdxl"] = dict(
    SHAPES["tiny"], unet=dict(SHAPES["tiny"]["unet"], cross_attention_dim=80, use_linear_projection=True,
                              addition_embed_type="text_time", addition_time_embed_dim=8,
                              projection_class_embeddings_input_dim=6 * 8 + 24),
    vae=dict(SHAPES["tiny"]["vae"], scaling_factor=0.13025),
    text2=dict(SHAPES["tiny"]["text"], hidden_size=48, projection_dim=24, hidden_act="gelu"))
SHAPES["sdxl"] = dict(
    SHAPES["sd15"], unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                              attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                              cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                              addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 1280),
    vae=dict(SHAPES["sd15"]["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=dict(SHAPES["sd15"]["text"], hidden_act="quick_gelu"),  # CLIP ViT-L/14's text tower
    text2=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,  # OpenCLIP
               vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))  # bigG/14

# SD3.5: the transformer of SD3.5-Medium's kind (dual attention in its first layer, qk_norm "rms_norm") at diffusers'
# test size; CLIP-L (32 wide, pooled 32) and bigG (48 wide, pooled 24) of different widths, so that a mix-up cannot
# pass, padded to T5's 96 (joint_attention_dim); pooled 32 + 24. The VAE has 16 latent channels and SD3.5's factors.
SHAPES["tiny_sd3"] = dict(
    SHAPES["tiny"], sd3=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                             joint_attention_dim=96, pooled_projection_dim=32 + 24, pos_embed_max_size=16,
                             dual_attention_layers=(0,), qk_norm="rms_norm"),
    vae=dict(SHAPES["tiny"]["vae"], latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False),
    text2=dict(SHAPES["tiny"]["text"], hidden_size=48, projection_dim=24, hidden_act="gelu"),
    t5=dict(d_model=96, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=64),
    taesd=dict(SHAPES["tiny"]["taesd"], latent_channels=16))

# SD3.5-Medium's and -Large's configs (their transformer/config.json; text encoders CLIP ViT-L/14 and OpenCLIP bigG/14
# with projections; VAE 16 channels, scaling 1.5305, shift 0.0609), for --benchmark and cost.py: T5 at XXL's width
# (4096) with 2 of its 24 layers, as pixart512's: it only pre-encodes the prompts, then is freed.
SD35 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")
SHAPES["sd35_medium"] = dict(
    SHAPES["sdxl"], sd3=dict(SD35, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                             pos_embed_max_size=384, dual_attention_layers=tuple(range(13))),
    vae=dict(SHAPES["sd15"]["vae"], sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False),
    text2=dict(SHAPES["sdxl"]["text2"]),
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=2, vocab_size=32128),
    taesd=dict(latent_channels=16))
SHAPES["sd35_large"] = dict(
    SHAPES["sd35_medium"], sd3=dict(SD35, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                    pos_embed_max_size=192, dual_attention_layers=()))


def model_subfolder(shapes):
    """Where build_random writes the diffusion model of SHAPES[shapes], under its folder."""
    arch = SHAPES[shapes]
    return "sd3" if "sd3" in arch else "pixart" if "transformer" in arch else "sdxl" if "text2" in arch else "sd"


def build_random(folder, shapes="tiny", seed=0):
    """A diffusers model folder with random weights and a CLIP reward model, written with save_pretrained so
    that dipp runs the very same loading code as for real weights. Returns (model folder, CLIP folder):
    SD-1.x (UNet, VAE, CLIP text encoder + tokenizer, scheduler) in folder/sd, or PixArt-α (transformer, VAE,
    T5 encoder + tokenizer, scheduler) in folder/pixart, or SDXL (UNet, VAE, two CLIP text encoders + tokenizers,
    scheduler) in folder/sdxl, or SD3 (transformer, VAE, two CLIPs and a T5 + tokenizers, scheduler) in folder/sd3."""
    from filelock import FileLock  # (huggingface_hub's own dependency)
    arch, clip = SHAPES[shapes], os.path.join(folder, "clip")
    sd = os.path.join(folder, model_subfolder(shapes))
    stamp, marker = json.dumps({"shapes": arch, "seed": seed}), os.path.join(folder, "random_weights.json")
    written = lambda: os.path.isfile(marker) and open(marker).read() == stamp  # (SD1.5 shapes: ~6 GB to write)
    if not written():
        os.makedirs(folder, exist_ok=True)
        # Two processes building one folder at once (parallel test workers) would write the same files under
        # each other: the second waits here, then finds the marker that the first writes last.
        with FileLock(os.path.join(folder, ".build.lock")):
            if not written():
                _write_random(folder, arch, sd, clip, seed)
                open(marker, "w").write(stamp)
    return sd, clip


def _write_random(folder, arch, sd, clip, seed):
    """build_random's writing, inside its lock."""
    from diffusers import (AutoencoderKL, AutoencoderTiny, DDPMScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel, SD3Transformer2DModel,
                           UNet2DConditionModel)
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer, T5Config, T5EncoderModel)
    torch.manual_seed(seed)
    if "sd3" in arch:  # SD3.5: a rectified flow, SD3.5's scheduler config (shift 3); see SHAPES["tiny_sd3"]
        SD3Transformer2DModel(**arch["sd3"]).save_pretrained(os.path.join(sd, "transformer"))
        for sub, text in (("text_encoder", arch["text"]), ("text_encoder_2", arch["text2"])):
            CLIPTextModelWithProjection(CLIPTextConfig(**text)).save_pretrained(os.path.join(sd, sub))
        T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **arch["t5"])).save_pretrained(
            os.path.join(sd, "text_encoder_3"))
        t5_tokenizer().save_pretrained(os.path.join(sd, "tokenizer_3"))
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(sd, "scheduler"))
    elif "transformer" in arch:  # PixArt-α: ε and the learned variance (8 channels); linear β schedule
        PixArtTransformer2DModel(in_channels=4, out_channels=8, **arch["transformer"]).save_pretrained(
            os.path.join(sd, "transformer"))
        T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **arch["t5"])).save_pretrained(
            os.path.join(sd, "text_encoder"))
        t5_tokenizer().save_pretrained(os.path.join(sd, "tokenizer"))
        schedule = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    elif "text2" in arch:  # SDXL: SD's β schedule, saved as SDXL-base's Euler config (dipp reads only its ᾱ)
        UNet2DConditionModel(**arch["unet"]).save_pretrained(os.path.join(sd, "unet"))
        CLIPTextModel(CLIPTextConfig(**arch["text"])).save_pretrained(os.path.join(sd, "text_encoder"))
        CLIPTextModelWithProjection(CLIPTextConfig(**arch["text2"])).save_pretrained(os.path.join(sd, "text_encoder_2"))
        schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    else:
        UNet2DConditionModel(**arch["unet"]).save_pretrained(os.path.join(sd, "unet"))
        CLIPTextModel(CLIPTextConfig(**arch["text"])).save_pretrained(os.path.join(sd, "text_encoder"))
        schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    AutoencoderKL(**arch["vae"]).save_pretrained(os.path.join(sd, "vae"))
    if "text2" in arch and "sd3" not in arch:
        EulerDiscreteScheduler(prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                               **schedule).save_pretrained(os.path.join(sd, "scheduler"))
    elif "sd3" not in arch:  # (SD3's flow scheduler is written above)
        DDPMScheduler(clip_sample=False, prediction_type="epsilon", **schedule).save_pretrained(os.path.join(sd, "scheduler"))
    AutoencoderTiny(**arch["taesd"]).save_pretrained(os.path.join(folder, "taesd"))  # for --reward_decoder tiny
    CLIPModel(CLIPConfig(text_config=arch["text"], vision_config=arch["vision"],
                         projection_dim=arch["text"]["projection_dim"])).save_pretrained(clip)
    # A byte-level BPE tokenizer with no merges: every character is a token (vocabulary of 514).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]  # GPT-2's bytes_to_unicode
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizers = [] if "transformer" in arch else [os.path.join(sd, "tokenizer")]
    tokenizers += [os.path.join(sd, "tokenizer_2")] if "text2" in arch else []
    for out in [clip] + tokenizers:
        os.makedirs(out, exist_ok=True)
        json.dump(vocab, open(os.path.join(out, "vocab.json"), "w"))
        open(os.path.join(out, "merges.txt"), "w").write("#version: 0.2\n")
        pad = dict(pad_token="!") if out.endswith("tokenizer_2") else {}  # SDXL's tokenizer_2 pads with "!"
        CLIPTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"),
                      model_max_length=77, **pad).save_pretrained(out)


def t5_tokenizer():
    """A T5 tokenizer built in-process: a Unigram model over single characters (and "▁", SentencePiece's word
    start), with T5's <pad>=0, </s>=1, <unk>=2 and a </s> appended to every prompt, as T5's own does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?&()")
    tok = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=120)


def use_random_weights(cfg, rank=0, world=1):
    """--random_weights NAME (or --tiny): build the models in output_dir/NAME (rank 0, once; the
    others wait) and point cfg at them: the model folder, the tiny CLIP reward for the default --reward (none
    stays none), tiny stand-ins of the named architectures for any other --reward or --watch_rewards
    (rewards.build_tiny), and the TAESD-shaped decoder of --reward_decoder tiny."""
    import torch
    from plumbing import writable_dir
    shapes = cfg.random_weights
    folder = os.path.join(cfg.output_dir, shapes)
    if shapes.startswith("tiny") and (cfg.device == "cpu" or cfg.device == "auto" and not torch.cuda.is_available()):
        # Tiny models are far too small for intra-op threads: on a shared CPU their OpenMP workers mostly spin (a
        # 20-step tiny run took 9-13 s on one thread, 74-75 s on two, conftest.py). As evaluate.py --tiny; it stays
        # set for the rest of the process (a notebook in tiny mode, a test session: they want it too).
        torch.set_num_threads(1)
    if rank == 0:
        writable_dir(cfg.output_dir)
        build_random(folder, shapes, cfg.seed)
    if world > 1:
        torch.distributed.barrier()  # the other ranks load what rank 0 wrote
    cfg.pretrained_model_name_or_path = os.path.join(folder, model_subfolder(shapes))
    import rewards
    trained, watched = rewards.parse(cfg.reward), rewards.parse_watch(getattr(cfg, "watch_rewards", ""))
    stand_ins = bool(trained) and [name for name, _ in trained] != ["imagereward"]
    if stand_ins or watched:  # tiny stand-ins of each named reward's own architecture (rewards.build_tiny)
        tiny = os.path.join(folder, "rewards")
        if rank == 0:
            rewards.build_tiny(tiny, os.path.join(folder, "clip"), cfg.seed)
        if world > 1:
            torch.distributed.barrier()
        paths = rewards.tiny_paths(tiny)
        cfg.reward_model_path = ",".join(f"{name}={paths[name]}" for name, _ in trained) if stand_ins else ""
        cfg.watch_rewards = ",".join(f"{name}={paths[name]}" for name, _ in watched)
    if trained and not stand_ins:  # the default ImageReward: the tiny CLIP, as --tiny always did
        weight = trained[0][1]  # (kept: --reward imagereward=2 trains on 2 × the tiny CLIP)
        cfg.reward, cfg.reward_model_path = "clip" if weight == 1 else f"clip={weight!r}", os.path.join(folder, "clip")
    cfg.reward_decoder_path = cfg.reward_decoder_path or os.path.join(folder, "taesd")
