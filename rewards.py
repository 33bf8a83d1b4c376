"""rewards: the reward models r(x, c) that DI++ can train against (dipp.py's reward interface) and evaluate.py scores
with. Each maps images in [-1, 1] (B, 3, H, W) and their prompts to a score (B,), differentiable in the images.

Not needed to understand DI++: dipp.py sees a reward as a function reward(images, prompts) -> (B,). This module
holds what each model needs for that: where its weights come from, its differentiable preprocessing (as the
official code's PIL pipeline does it), and its score.
"""
import torch
import torch.nn.functional as F

import plumbing

CLIP_REWARD = "openai/clip-vit-large-patch14"  # --reward clip without --reward_model_path
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size):
    """Torch version of CLIP's PIL pipeline (resize shorter side bicubic, centre crop, normalise), so
    gradients flow. Antialiased bicubic approximates PIL's filter; test_dipp.py bounds the difference.
    Clamp *first*, as the saved PNG and ImageReward's ReFL code do: a pixel the user sees clipped then
    gets no reward gradient, so the reward cannot be raised by over-saturating what no one sees."""
    x = ((images.float() + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1], clipped as the saved image is
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    x = F.interpolate(x, size=(max(size, round(H * scale)), max(size, round(W * scale))),
                      mode="bicubic", align_corners=False, antialias=True)  # (B, 3, ≥size, ≥size)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # (B, 3, size, size); bicubic overshoot, as uint8
    mean, std = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1), x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageRewardFn:
    """ImageReward (BLIP ViT-L + BERT cross-attention + MLP head), through the package's own
    `score_gard`, the differentiable path its ReFL code uses. Output is the package's normalised score."""

    def __init__(self, model):
        self.model, self.tower = model, model.blip.visual_encoder  # tower: the part --compile compiles
        self.text = plumbing.PromptCache()

    def tokenize(self, prompts, device):  # as in ImageReward.score: pad to 35 tokens, truncate
        t = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                      return_tensors="pt")
        return torch.stack([t.input_ids, t.attention_mask], 1).to(device)  # (N, 2, 35)

    def __call__(self, images, prompts):
        text = self.text.batch(prompts, lambda new: self.tokenize(new, images.device))  # (B, 2, 35)
        pixels = clip_preprocess(images, 224).to(next(self.model.parameters()).dtype)  # (B, 3, 224, 224)
        return self.model.score_gard(text[:, 0], text[:, 1], pixels).float().squeeze(1)  # (B,)


class ClipRewardFn:
    """CLIP score: cosine similarity of image and prompt embeddings (in [-1, 1]; ×100 is 'CLIPScore')."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.tower = model, tokenizer, model.vision_model
        self.text = plumbing.PromptCache()

    @torch.no_grad()  # the text side is a constant of the reward
    def encode_text(self, prompts):
        ids = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        return F.normalize(self.model.get_text_features(**ids).float(), dim=-1)  # (N, D)

    def __call__(self, images, prompts):
        size = self.model.config.vision_config.image_size
        pixels = clip_preprocess(images, size).to(self.model.dtype)  # (B, 3, size, size)
        text = self.text.batch(prompts, self.encode_text)  # (B, D)
        image = F.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1)
        return (image * text).sum(-1)  # (B,)



def load(name, path, device, dtype, gradient_checkpointing=False):
    """reward(images, prompts) -> (B,) for --reward NAME (imagereward | clip), from a local folder or hub id `path`
    ("" = the model's default), frozen on device in dtype; None for --reward none."""
    if name == "none":
        return None
    if name == "clip":
        from transformers import CLIPModel, CLIPTokenizer
        name = path or CLIP_REWARD
        model = plumbing.load_or_die(lambda: CLIPModel.from_pretrained(name), name, "the CLIP reward model")
        tok = plumbing.load_or_die(lambda: CLIPTokenizer.from_pretrained(name), name, "the CLIP tokenizer")
        if gradient_checkpointing:  # transformers' own switch is inactive in eval mode
            plumbing.checkpoint_blocks(model.vision_model.encoder.layers)
        return ClipRewardFn(plumbing.freeze(model, device, dtype), tok)
    model = plumbing.load_imagereward(path, device)  # by name from the hub cache, or a local folder
    if gradient_checkpointing:
        plumbing.checkpoint_blocks(model.blip.visual_encoder.blocks)
    return ImageRewardFn(plumbing.freeze(model, device, dtype))
