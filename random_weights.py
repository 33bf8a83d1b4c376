"""Random-weight Stable-Diffusion-1.x folders for `dipp.py --tiny` / `--random_sd15` and the tests.

Not needed to understand DI++. The components are written with save_pretrained, so dipp loads them
through exactly the same code as the real SD1.5 weights; nothing is downloaded.
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


def build_random(folder, shapes="tiny", seed=0):
    """An SD-1.x folder (UNet, VAE, CLIP text encoder + tokenizer, scheduler) and a CLIP reward model with
    random weights, written with save_pretrained so that --tiny runs the very same loading code as SD1.5."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    arch, sd, clip = SHAPES[shapes], os.path.join(folder, "sd"), os.path.join(folder, "clip")
    stamp, marker = json.dumps({"shapes": arch, "seed": seed}), os.path.join(folder, "random_weights.json")
    if os.path.isfile(marker) and open(marker).read() == stamp:  # already written (SD1.5 shapes: ~6 GB)
        return sd, clip
    torch.manual_seed(seed)
    UNet2DConditionModel(**arch["unet"]).save_pretrained(os.path.join(sd, "unet"))
    AutoencoderKL(**arch["vae"]).save_pretrained(os.path.join(sd, "vae"))
    AutoencoderTiny(**arch["taesd"]).save_pretrained(os.path.join(folder, "taesd"))  # for --reward_decoder tiny
    CLIPTextModel(CLIPTextConfig(**arch["text"])).save_pretrained(os.path.join(sd, "text_encoder"))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  prediction_type="epsilon").save_pretrained(os.path.join(sd, "scheduler"))
    CLIPModel(CLIPConfig(text_config=arch["text"], vision_config=arch["vision"],
                         projection_dim=arch["text"]["projection_dim"])).save_pretrained(clip)
    # A byte-level BPE tokenizer with no merges: every character is a token (vocabulary of 514).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]  # GPT-2's bytes_to_unicode
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    for out in (os.path.join(sd, "tokenizer"), clip):
        os.makedirs(out, exist_ok=True)
        json.dump(vocab, open(os.path.join(out, "vocab.json"), "w"))
        open(os.path.join(out, "merges.txt"), "w").write("#version: 0.2\n")
        CLIPTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"),
                      model_max_length=77).save_pretrained(out)
    open(marker, "w").write(stamp)
    return sd, clip
