"""rewards: every reward model r(x, c) that DI++ can train against (dipp.py's reward interface) and that
evaluate.py scores with, in one place. Not needed to understand DI++: dipp.py sees a reward as a function
reward(images, prompts) -> (B,), differentiable in the images.

Each model has one RECORDS entry: where its weights come from (hub id, files, the official sha256 where one is
published), its preprocessing (labelled: which official pipeline it follows), what its score is and on which
scale papers print it. Each reward object has two paths to the same score:
  fn(images, prompts)       training: decoded images in [-1, 1] (B, 3, H, W), torch preprocessing, differentiable;
  fn.score_pil(pil, prompts) evaluation: the saved PIL images through the official code's own PIL preprocessing.
test_rewards.py checks each against its official scorer.

--reward takes one name or a weighted sum, parse("imagereward=1,pickscore=0.5"); docs/rewards.md says what each
reward measures, how it fails and how to weight a mix.
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import typing

import torch
import torch.nn.functional as F

import plumbing

die = plumbing.die

# -----------------------------------------------------------------------------
# 1. Preprocessing: from the decoded image in [-1, 1] (differentiable) and from the saved PIL image (evaluation)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's


def normalise(x):
    mean, std = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1), x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def to_unit(images):
    """[-1, 1] -> [0, 1], clipped as the saved PNG is. Clamp *first*, as ImageReward's ReFL code does: a pixel
    the user sees clipped then gets no reward gradient, so the reward cannot be raised by over-saturating what
    no one sees."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def clip_preprocess(images, size):
    """Convention "clip" (OpenAI CLIP's PIL pipeline, also ImageReward's, PickScore's and the aesthetic
    predictor's): shorter side to `size` bicubic, centre crop, CLIP mean/std. Antialiased bicubic in torch
    approximates PIL's filter so gradients flow; test_rewards.py bounds the difference."""
    x = to_unit(images)
    H, W = x.shape[-2:]
    # the longer side truncated, int(size · long / short), as torchvision's Resize(size) and CLIP's processor do
    shape = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
    x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True)  # (B, 3, ≥size, ≥size)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)  # (B, 3, size, size); bicubic overshoot, as uint8
    return normalise(x)


HPS_RESIZE = {"legacy": "no antialias, as torchvision < 0.17 resized HPSv2's 2023 tensors",
              "antialias": "antialiased, torchvision >= 0.17's default"}


def hps_pad(x, size):
    """Zero pad (B, 3, h, w) to (B, 3, size, size), centred, the odd pixel right/bottom (HPSv2's ResizeMaxSize)."""
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=0.0)


def hps_preprocess_torch(images, resize="legacy", size=224):
    """Convention "hps" (HPSv2's evaluation transform, below), on the decoded image: HPSv2 resizes the *tensor*,
    so this is the same computation as hps_preprocess up to the 8-bit rounding of the saved PNG."""
    x = to_unit(images)
    H, W = x.shape[-2:]
    scale = size / max(H, W)
    if scale != 1.0:
        x = F.interpolate(x, size=(round(H * scale), round(W * scale)), mode="bicubic", align_corners=False,
                          antialias=resize == "antialias")  # (B, 3, h, w), longest side `size`
    return normalise(hps_pad(x, size))  # (B, 3, size, size)


def hps_preprocess(image, resize="legacy", size=224):
    """HPSv2's evaluation transform (hpsv2/src/open_clip/transform.py, `light_augmentation=True`):
    ToTensor, then ResizeMaxSize on the *tensor* (longest side to `size`, bicubic), pad the short side with 0
    to a square (centred, the odd pixel right/bottom), normalise with CLIP's mean/std. No centre crop: the
    whole image is scored. torchvision < 0.17, current when HPSv2 was published, did not antialias a tensor
    resize (resize="legacy"); since 0.17 it does by default (resize="antialias"). (HPSv2 skips the pad when no
    resize is needed; we always pad, which only differs for a non-square image whose long side is exactly 224.)"""
    import torchvision.transforms.functional as TF
    x = TF.to_tensor(image.convert("RGB"))  # (3, H, W) in [0, 1]
    H, W = x.shape[-2:]
    scale = size / max(H, W)
    if scale != 1.0:
        x = TF.resize(x, [round(H * scale), round(W * scale)], TF.InterpolationMode.BICUBIC,
                      antialias=resize == "antialias")
    return normalise(hps_pad(x[None], size))[0]  # (3, size, size)

# -----------------------------------------------------------------------------
# 2. The reward models. __call__ is the training path, score_pil the evaluation path; .towers is what
#    --compile compiles; text sides are constants of a reward, computed once per prompt (PromptCache).


class ImageRewardFn:
    """ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP head), through the package's own
    `score_gard`, the differentiable path its ReFL code uses. Output is the package's normalised score."""

    def __init__(self, model):
        self.model, self.tower = model, model.blip.visual_encoder  # tower: the part --compile compiles
        self.towers, self.text = [self.tower], plumbing.PromptCache()

    def tokenize(self, prompts, device):  # as in ImageReward.score: pad to 35 tokens, truncate
        t = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                      return_tensors="pt")
        return torch.stack([t.input_ids, t.attention_mask], 1).to(device)  # (N, 2, 35)

    def __call__(self, images, prompts):
        text = self.text.batch(prompts, lambda new: self.tokenize(new, images.device))  # (B, 2, 35)
        pixels = clip_preprocess(images, 224).to(next(self.model.parameters()).dtype)  # (B, 3, 224, 224)
        return self.model.score_gard(text[:, 0], text[:, 1], pixels).float().squeeze(1)  # (B,)

    @torch.no_grad()
    def score_pil(self, images, prompts):
        """`ImageReward.score()` batched: the package's own PIL preprocess, the prompt at its 35 tokens."""
        param = next(self.model.parameters())
        pixels = torch.stack([self.model.preprocess(im) for im in images]).to(param.device, param.dtype)
        text = self.text.batch(prompts, lambda new: self.tokenize(new, param.device))  # (B, 2, 35)
        return self.model.score_gard(text[:, 0], text[:, 1], pixels).float().cpu()[:, 0]  # (B,)


class ClipRewardFn:
    """CLIP score: cosine similarity of the image and prompt embeddings, in [-1, 1] (torchmetrics' CLIPScore
    prints 100 · max(cos, 0)). processor: the slow (PIL) CLIPProcessor, for score_pil only."""

    def __init__(self, model, tokenizer, processor=None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.tower = model.vision_model
        self.towers, self.text = [self.tower], plumbing.PromptCache()

    @torch.no_grad()  # the text side is a constant of the reward
    def encode_text(self, prompts):
        ids = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        return F.normalize(self.model.get_text_features(**ids.to(self.model.device)).float(), dim=-1)  # (N, D)

    def embed(self, images):  # (B, 3, H, W) in [-1, 1] -> normalised image embedding (B, D), differentiable
        pixels = clip_preprocess(images, self.model.config.vision_config.image_size).to(self.model.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1)

    def __call__(self, images, prompts):
        return (self.embed(images) * self.text.batch(prompts, self.encode_text)).sum(-1)  # (B,)

    @torch.no_grad()
    def embed_pil(self, images):  # PIL images -> normalised embedding (B, D) on the CPU, OpenAI's preprocessing
        pixels = self.processor(images=images, return_tensors="pt").pixel_values  # (B, 3, 224, 224)
        e = self.model.get_image_features(pixel_values=pixels.to(self.model.device, self.model.dtype)).float()
        return F.normalize(e, dim=-1).cpu()

    def score_embedding(self, e, prompts):  # normalised image embeddings (B, D) -> cos (B,)
        return (e * self.text.batch(prompts, self.encode_text).to(e.device)).sum(-1)

    def score_pil(self, images, prompts):
        return self.score_embedding(self.embed_pil(images), prompts)  # (B,)


class AestheticHead(torch.nn.Module):
    """LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor, `MLP`), layer for
    layer: 768→1024→128→64→16→1 with *no* activations (the 'linear' in linearMSE: one affine map kept
    in its trained factorisation) and Dropouts at indices 1, 3, 5, so that the keys layers.0/2/4/6/7
    of sac+logos+ava1-l14-linearMSE.pth load unchanged. Input: an L2-normalised CLIP ViT-L/14 embedding."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding):
        return self.layers(embedding)  # (B, 1)


class AestheticFn:
    """LAION aesthetic v2: the head on the normalised CLIP ViT-L/14 image embedding (≈ 1–10; the prompt is
    ignored: an image-only reward)."""

    def __init__(self, clip, head):
        self.clip, self.head, self.tower, self.towers = clip, head, clip.tower, clip.towers

    def score_embedding(self, e):  # normalised CLIP ViT-L/14 image embeddings (B, 768) -> (B,)
        param = next(self.head.parameters())
        return self.head(e.to(param.device, param.dtype)).float()[:, 0].to(e.device)

    def __call__(self, images, prompts):
        return self.score_embedding(self.clip.embed(images))  # (B,)

    @torch.no_grad()
    def score_pil(self, images, prompts):
        return self.score_embedding(self.clip.embed_pil(images))  # (B,)


class HPSRewardFn:
    """HPS v2.0 / v2.1: open_clip ViT-H-14 fine-tuned on human preferences; the score is what HPSv2's `score()`
    returns, image_features @ text_features.T of normalised features (a cosine, no logit scale; published tables
    print it × 100). HPSv2 computes it under fp16 autocast on CUDA, which score_pil does too."""

    def __init__(self, model, tokenizer, resize="legacy"):
        self.model, self.tokenizer, self.resize = model, tokenizer, resize
        self.tower = model.visual
        self.towers, self.text = [self.tower], plumbing.PromptCache()

    @torch.no_grad()
    def encode_text(self, prompts):
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(prompts).to(device), normalize=True).float()  # (N, D)

    def __call__(self, images, prompts):
        pixels = hps_preprocess_torch(images, self.resize).to(next(self.model.parameters()).dtype)  # (B, 3, 224, 224)
        e = self.model.encode_image(pixels, normalize=True).float()  # (B, D)
        return (e * self.text.batch(prompts, self.encode_text)).sum(-1)  # (B,)

    @torch.no_grad()
    def score_pil(self, images, prompts):
        device = next(self.model.parameters()).device
        pixels = torch.stack([hps_preprocess(im, self.resize) for im in images]).to(device)  # (B, 3, 224, 224)
        text = self.tokenizer(prompts).to(device)  # (B, 77)
        amp = torch.autocast("cuda", torch.float16) if device.type == "cuda" else contextlib.nullcontext()
        with amp:  # HPSv2's img_score.py: torch.cuda.amp.autocast() (a no-op off CUDA)
            e = self.model.encode_image(pixels, normalize=True)  # (B, D)
            t = self.model.encode_text(text, normalize=True)  # (B, D)
            return (e @ t.T).diagonal().float().cpu()  # (B,)


class PickScoreFn:
    """PickScore v1 as its model card computes it: normalised CLIP-H embeddings, logit_scale.exp() · cos
    (≈ 21–23 for SD images; some tables print it ÷ 100). processor: the CLIP-H processor, for score_pil."""

    def __init__(self, model, tokenizer, processor=None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.tower = model.vision_model
        self.towers, self.text = [self.tower], plumbing.PromptCache()

    encode_text = ClipRewardFn.encode_text

    def __call__(self, images, prompts):
        pixels = clip_preprocess(images, self.model.config.vision_config.image_size).to(self.model.dtype)
        e = F.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1)  # (B, D)
        return self.model.logit_scale.exp().float() * (e * self.text.batch(prompts, self.encode_text)).sum(-1)

    @torch.no_grad()
    def score_pil(self, images, prompts):
        e = ClipRewardFn.embed_pil(self, images)  # the processor's (PIL) preprocessing, (B, D)
        t = self.text.batch(prompts, self.encode_text).cpu()  # (B, D)
        return self.model.logit_scale.exp().float().cpu() * (e * t).sum(-1)  # (B,)

# -----------------------------------------------------------------------------
# 3. Loading: a model's files by hub id or local path, frozen on a device in a precision


AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"  # christophschuhmann's file
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # hub repo xswu/HPSv2
HPS_ARCH = "ViT-H-14"  # open_clip's config; no pretrained tag: the HPS checkpoint holds every weight
CLIP_L, CLIP_H = "openai/clip-vit-large-patch14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_REWARD = CLIP_L  # --reward clip without --reward_model_path


def import_imagereward():
    """image-reward imports OpenAI's `clip` package but never uses it for ImageReward: an empty stand-in
    module does."""
    sys.modules.setdefault("clip", type(sys)("clip"))
    import ImageReward
    return ImageReward


def import_open_clip():
    """open_clip 2.32 calls torch.jit.script at import, which torch 2.14 deprecates with a FutureWarning on
    stderr; the warning is harmless and not the user's to act on."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import open_clip
    return open_clip


def check_imagereward_cache():
    """ImageReward by name is fetched by its own package into ~/.cache/ImageReward: when the hub cannot be
    reached, its files must already be there."""
    if plumbing.hub_unreachable():
        cache = os.path.expanduser("~/.cache/ImageReward")
        if not all(os.path.isfile(os.path.join(cache, f)) for f in ("ImageReward.pt", "med_config.json")):
            die(f"cannot load the ImageReward model: it is not in {cache} and the hub cannot be reached "
                f"({plumbing.hub_unreachable()}); on a machine with internet run `huggingface-cli download "
                "THUDM/ImageReward --local-dir DIR` and pass --reward_model_path DIR (its BLIP also needs "
                "`huggingface-cli download bert-base-uncased`)")


def load_imagereward(path, device):
    """The ImageReward model from a local folder (ImageReward.pt + med_config.json) or, with path "", by name
    through the package's own downloader (hub repo THUDM/ImageReward, into ~/.cache/ImageReward); a missing file
    is one line. Loaded strictly: the package's own ImageReward.load passes strict=False, with which a
    checkpoint that does not fit would leave part of the scorer at its random initialisation."""
    RM = import_imagereward()
    names = ("ImageReward.pt", "med_config.json")
    if path:
        files = [os.path.join(path, f) for f in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            die(f"--reward_model_path is missing {', '.join(missing)}; download both from the hub repo "
                "THUDM/ImageReward (huggingface-cli download THUDM/ImageReward --local-dir DIR)")
    else:  # what ImageReward.load("ImageReward-v1.0") fetches, where it keeps it
        root, url = os.path.expanduser("~/.cache/ImageReward"), "https://huggingface.co/THUDM/ImageReward/blob/main/"
        files = [plumbing.load_or_die(lambda f=f: RM.utils.ImageReward_download(url + f, root), "THUDM/ImageReward",
                                      f"the ImageReward model ({f})") for f in names]

    def build():  # ImageReward.load without its strict=False
        return RM.ImageReward(med_config=files[1], device="cpu"), torch.load(files[0], map_location="cpu",
                                                                             weights_only=True)
    model, weights = plumbing.load_or_die(build, path or "THUDM/ImageReward", "the ImageReward model (and its "
                                          "BERT tokenizer 'bert-base-uncased')")
    plumbing.load_strictly(model, weights, f"'{files[0]}'", "ImageReward v1.0 (BLIP ViT-L + BERT + MLP)")
    model.device = device  # score_gard builds its attention mask on model.device
    return model.eval()


def check_sha256(path, expected, what, source):
    """The bytes are the published file's, whichever mirror or folder they came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        die(f"'{path}' is not the official {what}: its sha256 is {digest.hexdigest()}, the official file's "
            f"{expected}; get it from {source} (or a mirror with the same bytes)")


def load_aesthetic_head(path):
    """The head's state dict, loaded strictly: every key of layers.0/2/4/6/7 with its shape, nothing else."""
    return plumbing.load_strictly(AestheticHead(), plumbing.read_weights(path), f"'{path}'",
                                  f"the aesthetic predictor's MLP 768→1024→128→64→16→1 ({AESTHETIC_FILE})").eval()


def load_clip_model(name, what, device, dtype, processor=False):
    """A transformers CLIPModel frozen on device in dtype, its tokenizer, and (processor=True) its slow PIL
    processor, which is OpenAI's preprocessing bit for bit (the fast one differs by up to 0.015)."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
    model = plumbing.load_or_die(lambda: CLIPModel.from_pretrained(name), name, what)
    tok = plumbing.load_or_die(lambda: CLIPTokenizer.from_pretrained(name), name, f"the tokenizer of {what}")
    proc = plumbing.load_or_die(lambda: CLIPProcessor.from_pretrained(name, use_fast=False), name,
                                f"the processor of {what}") if processor else None
    return plumbing.freeze(model, device, dtype), tok, proc


def build_imagereward(where, device, dtype, pil=False):
    return ImageRewardFn(plumbing.freeze(load_imagereward(where["model"], device), device, dtype))


def build_clip(where, device, dtype, pil=False):
    return ClipRewardFn(*load_clip_model(where["model"], "the CLIP reward model", device, dtype, pil))


def build_aesthetic(where, device, dtype, pil=False):
    clip = build_clip(where, device, dtype, pil)
    if clip.model.config.projection_dim != 768:
        die(f"the aesthetic reward's CLIP '{where['model']}' embeds in {clip.model.config.projection_dim}-d; the "
            "aesthetic head needs OpenAI CLIP ViT-L/14 (768-d), any other CLIP gives meaningless numbers")
    return AestheticFn(clip, plumbing.freeze(load_aesthetic_head(where["head"]), device, dtype))


def build_hps(where, device, dtype, pil=False, resize="legacy", arch=HPS_ARCH):
    """open_clip's own ViT-H-14 (open-clip-torch 2.x, the line that co-installs with image-reward's timm
    pin), then the HPS checkpoint's `state_dict`, strictly: every key must fit."""
    open_clip = import_open_clip()
    path = where["model"]
    checkpoint = plumbing.read_weights(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        die(f"'{path}' has no 'state_dict' entry, so it is not an HPS checkpoint; get "
            f"{' or '.join(HPS_FILES.values())} from the hub repo xswu/HPSv2")
    model = plumbing.load_strictly(open_clip.create_model(arch), checkpoint["state_dict"], f"'{path}'",
                                   f"open_clip {arch}")
    return HPSRewardFn(plumbing.freeze(model, device, dtype), open_clip.get_tokenizer(arch), resize)


def build_pickscore(where, device, dtype, pil=False):
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
    name, proc = where["model"], where["processor"]
    model = plumbing.load_or_die(lambda: CLIPModel.from_pretrained(name), name, "the PickScore v1 model")
    tok = plumbing.load_or_die(lambda: CLIPTokenizer.from_pretrained(proc), proc, "PickScore's CLIP-H tokenizer")
    processor = plumbing.load_or_die(lambda: CLIPProcessor.from_pretrained(proc, use_fast=False), proc,
                                     "PickScore's CLIP-H processor") if pil else None
    return PickScoreFn(plumbing.freeze(model, device, dtype), tok, processor)

# -----------------------------------------------------------------------------
# 4. The records


class Weights(typing.NamedTuple):
    hub: str  # hub repo id it is fetched from ("" for ImageReward: its package fetches THUDM/ImageReward itself)
    files: tuple  # the files the loader reads (a transformers folder: its config.json; its weights resolve there)
    sha256: str = ""  # the official file's sha256, checked on load; "" where none is published


class Record(typing.NamedTuple):
    title: str  # the name papers give it
    weights: dict  # part -> Weights; the first part is what a --reward_model_path NAME=PATH gives
    convention: str  # its preprocessing, and whether the training path reproduces it exactly
    score: str  # what fn(images, prompts) returns
    published: typing.Callable  # score -> the number published tables print (evaluate.py's table)
    scale: str  # the published scale, for choosing weights
    build: typing.Callable  # (where {part: path or hub id}, device, dtype, pil) -> reward fn


CLIP_CONVENTION = ("clip: shorter side to 224 bicubic, centre crop, CLIP mean/std (PIL in the official code; "
                   "antialiased torch bicubic in training, within 0.05 normalised units)")
RECORDS = {
    "imagereward": Record(
        "ImageReward v1.0 [arXiv 2304.05977]",
        {"model": Weights("THUDM/ImageReward", ("ImageReward.pt", "med_config.json"))},
        CLIP_CONVENTION + "; prompt cut to 35 tokens", "(MLP − 0.16717) / 1.03334, as `ImageReward.score()`",
        lambda s: s, "≈ −2…2, a standardised human-preference score (SD1.5 ≈ 0.2, DI++ 1.24)", build_imagereward),
    "clip": Record(
        "CLIP score, OpenAI CLIP ViT-L/14 [arXiv 2104.08718]",
        {"model": Weights(CLIP_L, ("config.json",))}, CLIP_CONVENTION, "cos(image, prompt) in [−1, 1]",
        lambda s: 100 * s.clamp_min(0), "100 · max(cos, 0) (torchmetrics' CLIPScore), ≈ 25–35", build_clip),
    "hps20": Record(
        "HPS v2.0 [arXiv 2306.09341]", {"model": Weights("xswu/HPSv2", (HPS_FILES["v2.0"],))},
        "hps: longest side to 224 bicubic (legacy: no antialias, as published), zero pad, CLIP mean/std; "
        "exactly HPSv2's tensor transform", "cos(image, prompt) as HPSv2's `score()`", lambda s: 100 * s,
        "100 · cos, ≈ 25–30 (DI++ 28.48); not comparable with v2.1", build_hps),
    "hps21": Record(
        "HPS v2.1 [arXiv 2306.09341]", {"model": Weights("xswu/HPSv2", (HPS_FILES["v2.1"],))},
        "hps (as hps20)", "cos(image, prompt) as HPSv2's `score()`", lambda s: 100 * s,
        "100 · cos, ≈ 25–35 (DI++-SDXL's table); not comparable with v2.0", build_hps),
    "pickscore": Record(
        "PickScore v1 [arXiv 2305.01569]",
        {"model": Weights("yuvalkirstain/PickScore_v1", ("config.json",)),
         "processor": Weights(CLIP_H, ("preprocessor_config.json", "tokenizer_config.json"))},
        CLIP_CONVENTION, "logit_scale · cos(image, prompt), as its model card", lambda s: s,
        "≈ 21–23 for SD-class images (some tables print ÷ 100: 0.217)", build_pickscore),
    "aesthetic": Record(
        "LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE)",
        {"head": Weights("camenduru/improved-aesthetic-predictor", (AESTHETIC_FILE,), AESTHETIC_SHA256),
         "model": Weights(CLIP_L, ("config.json",))},
        CLIP_CONVENTION + "; the prompt is not used", "linear MLP on the normalised CLIP ViT-L/14 embedding",
        lambda s: s, "≈ 1–10 (SD1.5 ≈ 5.3, DI++ 6.19)", build_aesthetic),
}
NAMES = tuple(RECORDS)

# -----------------------------------------------------------------------------
# 5. --reward: one name or a weighted sum; --reward_model_path: one path, or NAME=PATH per reward


def parse(spec, flag="--reward"):
    """'imagereward' -> [('imagereward', 1.0)]; 'imagereward=1,pickscore=0.5' -> both with their weights;
    'none' (or '') -> []. A wrong name, weight or syntax is one line naming the valid names."""
    valid = f"choose from {', '.join(NAMES)} (or none), one name or a weighted sum like \"imagereward=1,pickscore=0.5\""
    if spec.strip() in ("", "none"):
        return []
    terms = []
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in RECORDS:
            die(f"{flag} '{spec}': unknown reward '{name}'; {valid}")
        try:
            w = float(weight) if _ else 1.0
        except ValueError:
            w = float("nan")
        if not (math.isfinite(w) and w > 0):
            die(f"{flag} '{spec}': the weight of {name} must be a positive number, got '{weight.strip()}'; {valid}")
        if name in (n for n, _ in terms):
            die(f"{flag} '{spec}': {name} appears twice; give each reward once")
        terms.append((name, w))
    return terms


def parse_watch(spec, flag="--watch_rewards"):
    """--watch_rewards 'pickscore,hps21' (or NAME=PATH for weights of your own) -> [(name, path)]: the rewards
    scored on the held-out prompts at each validation and not trained on. One line for a wrong name."""
    watched = []
    for part in (p for p in (spec or "").split(",") if p.strip()):
        name, _, path = (s.strip() for s in part.partition("="))
        if name not in RECORDS:
            die(f"{flag} '{spec}': unknown reward '{name}'; choose from {', '.join(NAMES)}, comma-separated, "
                "each optionally NAME=PATH")
        if name in (n for n, _ in watched):
            die(f"{flag} '{spec}': {name} appears twice; give each reward once")
        watched.append((name, path))
    return watched


def parse_paths(spec, names, flag="--reward_model_path"):
    """--reward_model_path: one PATH (for a single reward) or NAME=PATH,... -> {name: path} ('' = the record's
    default). A name not in the run, or one path for several rewards, is one line."""
    if not spec:
        return {}
    if "=" not in spec:
        if len(names) != 1:
            die(f"{flag} '{spec}' is one path but the run has {len(names)} rewards ({', '.join(names)}); "
                f"give NAME=PATH for each, e.g. {flag} \"{names[0]}=/path/a,{names[-1]}=/path/b\"")
        return {names[0]: spec}
    paths = {}
    for part in spec.split(","):
        name, _, path = (s.strip() for s in part.partition("="))
        if name not in names or not path:
            die(f"{flag} '{spec}': '{part.strip()}' names no reward of this run ({', '.join(names)}); give NAME=PATH")
        paths[name] = path
    return paths


def where(name, path):
    """{part: local path or hub id} for reward `name` given PATH ('' = every part from its default). A file PATH
    is the first part's single weight file; a folder supplies each part whose files it holds, and must hold the
    first part's; a hub id replaces the first part's; the other parts come from their hub ids."""
    parts = RECORDS[name].weights
    first = next(iter(parts))
    out = {part: w.hub for part, w in parts.items()}
    if not path:  # ImageReward by name: its package fetches THUDM/ImageReward into ~/.cache/ImageReward
        return {"model": ""} if name == "imagereward" else out
    local = os.path.expanduser(path)
    if name == "imagereward" or not os.path.isdir(local):  # (ImageReward's loader checks its own folder)
        out[first] = local if os.path.isfile(local) else path
        return out
    for part, w in parts.items():
        files = [os.path.join(local, f) for f in w.files]
        if all(os.path.isfile(f) for f in files):
            out[part] = files[0] if w.files != ("config.json",) and len(files) == 1 else local
        elif part == first:
            die(f"--reward_model_path {name}='{path}' lacks {', '.join(w.files)} ({RECORDS[name].title}); get it "
                f"with `huggingface-cli download {w.hub} {' '.join(w.files)} --local-dir DIR` and pass DIR")
    return out


def check(terms, paths):
    """Before any model loads: every reward's weights can be found (local paths exist; hub ids are cached when
    the hub cannot be reached). One line otherwise, naming every one that is missing (plumbing.all_or_die)."""
    checks = []
    for name, _ in terms:
        for part, location in where(name, paths.get(name, "")).items():
            if name == "imagereward" and not location:
                checks.append(check_imagereward_cache)
            elif location:
                checks.append(functools.partial(plumbing.check_model_location, location,
                                                f"the {name} reward's {part} (--reward_model_path {name}=PATH)"))
    plumbing.all_or_die(*checks)


def load_one(name, path, device, dtype, gradient_checkpointing=False, pil=False, checksum=True, **options):
    """The reward fn of RECORDS[name] from PATH ('' = default weights, or {part: location}), frozen on device in
    dtype; pil=True also loads what score_pil needs. options: HPS's resize and arch. checksum=False only for the
    random stand-ins of --tiny."""
    record = RECORDS[name]
    at = path if isinstance(path, dict) else where(name, path)
    tiny = is_tiny(name, at)  # (optional) build_tiny's stand-ins: their own small configs, random (not official) bytes
    for part, w in record.weights.items():
        if w.sha256 and checksum and not tiny and os.path.isfile(at[part]):
            check_sha256(at[part], w.sha256, w.files[0], w.hub)
    if tiny and name.startswith("hps"):
        register_tiny_hps(os.path.dirname(at["model"]))
        options = {**options, "arch": TINY_HPS_ARCH}
    with tiny_imagereward_classes(at["model"]) if tiny and name == "imagereward" else contextlib.nullcontext():
        fn = record.build(at, device, dtype, pil, **options)
    if gradient_checkpointing:
        for tower in fn.towers:  # transformers' own switch is inactive in eval mode; BLIP's ViT has none
            blocks = (getattr(tower, "blocks", None) or getattr(getattr(tower, "encoder", None), "layers", None)
                      or tower.transformer.resblocks)
            plumbing.checkpoint_blocks(blocks)
    return fn


class Mix:
    """r(x, c) = Σ_i w_i r_i(x, c), (B,). Each term sees its own view of the images, so one backward pass also
    leaves each term's gradient in image space (∂(w_i r_i)/∂images, in .image_grads after backward): the
    per-term pull on the sample is then one decoder VJP per term (term_pulls), only when asked."""

    def __init__(self, terms):
        self.terms = terms  # [(name, weight, fn)]
        self.names = [name for name, _, _ in terms]
        self.towers = [tower for _, _, fn in terms for tower in getattr(fn, "towers", [])]  # (toy rewards: none)
        self.tower = self.towers[0] if self.towers else None
        self.image_grads, self.last = {}, {}

    def __call__(self, images, prompts):
        total, self.image_grads, self.last = 0, {}, {}
        for name, weight, fn in self.terms:
            view = images.view_as(images)  # (B, 3, H, W): the same values, its own node in the graph
            if view.requires_grad and len(self.terms) > 1:
                view.register_hook(lambda g, name=name: self.image_grads.__setitem__(name, g))
            r = fn(view, prompts)  # (B,)
            self.last[name] = r.detach()
            total = total + (r if weight == 1.0 else weight * r)
        return total  # (B,)


def term_pulls(mix, decode, x0, loss_scale):
    """Per-sample ∂(−w_i r_i)/∂x0 of each term (B, ...), from the image-space gradients the last backward left in
    mix.image_grads: J_decᵀ g_i, one VJP through a recomputed decoder per term (not the total minus the others:
    terms differ by orders of magnitude, and the difference would be rounding error). A single reward: {} (its
    pull is the logged grad_reward). Call it only on the steps that log it: each VJP costs a decoder backward."""
    if len(mix.terms) == 1 or not mix.image_grads:
        return {}
    with torch.enable_grad():
        x = x0.detach().requires_grad_(True)
        images = decode(x)  # (B, 3, H, W)
        out = {}
        for i, name in enumerate(mix.names):
            g = mix.image_grads[name].to(images.dtype) * (x0.shape[0] / loss_scale)  # per sample, unscaled
            out[name] = torch.autograd.grad(images, x, g, retain_graph=i < len(mix.names) - 1)[0].float()
    return out



def term_stats(mix, decode, x0, loss_scale):
    """What a run logs of a mix's terms on the steps that ask (dipp.train): {grad_reward_NAME: the per-sample RMS of
    the term's pull on x0, reward_NAME: its mean}; {} for a single reward."""
    rms = lambda g: g.flatten(1).pow(2).mean(1).sqrt().mean()  # as dipp.rms: per-sample RMS, batch mean
    pulls = term_pulls(mix, decode, x0, loss_scale)
    return {**{f"grad_reward_{name}": rms(g) for name, g in pulls.items()},
            **{f"reward_{name}": r.mean() for name, r in mix.last.items() if pulls}}


# -----------------------------------------------------------------------------
# Diversity: not a reward, never trained on, watched at validation (--validation_diversity) and scored by evaluate.py


def pairwise_diversity(embeddings):
    """Mean pairwise cosine distance between the K image embeddings of one prompt (K, D):
        div = 1/(K(K−1)) Σ_{j≠l} (1 − ⟨e_j, e_l⟩ / (‖e_j‖ ‖e_l‖))
    0 when all K seeds give the same image (mode collapse); a CLIP-space stand-in for DMD2's pairwise
    LPIPS that needs no extra network (LPIPS downloads its backbone weights at run time)."""
    e = F.normalize(embeddings.double(), dim=-1)  # (K, D), float64 so identical images give exactly ~0
    K = e.shape[0]
    distance = 1 - e @ e.T  # (K, K)
    return (distance.sum() - distance.diagonal().sum()) / (K * (K - 1))


class Diversity:
    """--validation_diversity K: at each validation, K images of every held-out prompt (each from its own fixed
    noise) and, per prompt, the pairwise_diversity of their CLIP image embeddings, as evaluate.py's diversity. A
    reward can rise while the generator collapses to one image per prompt (reward hacking's first sign, docs/
    rewards.md); this number falls when it does."""

    def __init__(self, images_per_prompt, clip):
        self.images_per_prompt, self.embed = images_per_prompt, clip.embed  # (B, 3, H, W) -> (B, D)

    def __call__(self, embeddings):  # (P·K, D), the K images of each prompt consecutive -> (P,)
        per_prompt = embeddings.view(-1, self.images_per_prompt, embeddings.shape[-1])
        return torch.stack([pairwise_diversity(e) for e in per_prompt]).float()


def watch_for_diversity(spec, watch, K):
    """--watch_rewards as a run with --validation_diversity K holds it: "clip" added where the run neither trains on
    nor watches CLIP (Diversity embeds with it, so val_clip is logged too, and its weights are checked and counted
    with the other watched rewards'); unchanged otherwise."""
    if not K or "clip" in [name for name, _ in parse(spec) + parse_watch(watch)]:
        return watch
    return ",".join([watch] * bool(watch) + ["clip"])


def load_diversity(K, held, device, dtype):
    """--validation_diversity K (0: None): a Diversity on the CLIP the run holds (held: {name: reward fn}, trained on
    or watched; watch_for_diversity sees to it), else on the record's default (OpenAI CLIP ViT-L/14, evaluate.py's)."""
    if not K:
        return None
    return Diversity(K, held["clip"] if "clip" in held else load_one("clip", "", device, dtype))


def check_flags(spec, paths, watch, weights=False):
    """--reward, --reward_model_path and --watch_rewards: a wrong name, weight or syntax is one line before anything
    is built; weights=True: every reward's weights, trained on or watched, can be found (check)."""
    terms, watched = parse(spec), parse_watch(watch)
    paths = parse_paths(paths, [name for name, _ in terms])
    if weights:  # (every one missing, trained on or watched, in one line)
        plumbing.all_or_die(lambda: check(terms, paths), lambda: check([(name, 1.0) for name, _ in watched],
                                                                        dict(watched)))

def load(spec, paths, device, dtype, gradient_checkpointing=False):
    """--reward SPEC (parse) with --reward_model_path PATHS (parse_paths) -> a Mix, or None for none."""
    terms = parse(spec) if isinstance(spec, str) else spec
    if not terms:
        return None
    paths = parse_paths(paths, [n for n, _ in terms]) if isinstance(paths, str) else paths
    return Mix([(name, weight, load_one(name, paths.get(name, ""), device, dtype, gradient_checkpointing))
                for name, weight in terms])

# -----------------------------------------------------------------------------
# 6. (optional) tiny random stand-ins of every reward's real architecture, for --tiny and the tests (CPU, seconds,
#    no download). They load through the real loaders; TINY_MARKER beside them tells load_one so.

TINY_HPS_ARCH = "tiny-ViT-H-14"  # an open_clip model config registered at run time (same CLIP class)
TINY_MARKER = "tiny_rewards.json"


def register_tiny_hps(folder):
    import_open_clip().add_model_config(os.path.join(folder, f"{TINY_HPS_ARCH}.json"))


def tiny_layout(folder):
    """{name: {part: path}} of build_tiny's files in `folder`."""
    return {"imagereward": {"model": os.path.join(folder, "imagereward")},
            "clip": {"model": os.path.join(folder, "clip-l")},
            "aesthetic": {"head": os.path.join(folder, "clip-l", AESTHETIC_FILE),  # the head beside its CLIP-L
                          "model": os.path.join(folder, "clip-l")},
            "hps20": {"model": os.path.join(folder, "hps", HPS_FILES["v2.0"])},
            "hps21": {"model": os.path.join(folder, "hps", HPS_FILES["v2.1"])},
            "pickscore": {"model": os.path.join(folder, "pickscore"), "processor": os.path.join(folder, "pickscore")}}


def build_tiny(folder, tokenizer, seed=0):
    """Writes under `folder` one stand-in per record in its real file format, and returns {name: {part: path}}:
    transformers CLIPModel + CLIPProcessor folders (CLIP-L with its 768-d projection, which the aesthetic head
    needs, and PickScore), the aesthetic state dict (beside a CLIP-L copy), open_clip CLIPs in HPS-style
    {'state_dict': ...} checkpoints, and ImageReward.pt + med_config.json of the package's own classes
    (tiny_imagereward). tokenizer: a CLIPTokenizer folder (the tiny SD's byte-level one). Kept when already built."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    open_clip = import_open_clip()
    at = tiny_layout(folder)
    marker, stamp = os.path.join(folder, TINY_MARKER), json.dumps({"seed": seed})
    if os.path.isfile(marker) and open(marker).read() == stamp:  # written by an earlier run: kept
        register_tiny_hps(os.path.join(folder, "hps"))
        return at
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(tokenizer)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224), tok)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
                max_position_embeddings=77)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=224,
                  patch_size=32)
    # logit_scale starts at ln 100, where CLIP's training clamps it, as a fine-tuned PickScore sits
    for name, dim in (("clip-l", 768), ("pickscore", 32)):
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim,
                             logit_scale_init_value=math.log(100))).save_pretrained(os.path.join(folder, name))
        processor.save_pretrained(os.path.join(folder, name))
    torch.save(AestheticHead().state_dict(), at["aesthetic"]["head"])
    # HPS: the ViT-H-14 config shrunk (open_clip's CLIP class and its real BPE tokenizer, vocab 49408)
    config = dict(embed_dim=32, vision_cfg=dict(image_size=224, layers=2, width=64, head_width=32, patch_size=32),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    os.makedirs(os.path.join(folder, "hps"), exist_ok=True)
    json.dump(config, open(os.path.join(folder, "hps", f"{TINY_HPS_ARCH}.json"), "w"))
    register_tiny_hps(os.path.join(folder, "hps"))
    for name in ("hps20", "hps21"):
        torch.save({"state_dict": open_clip.create_model(TINY_HPS_ARCH).state_dict()}, at[name]["model"])
    torch.save(tiny_imagereward(at["imagereward"]["model"], seed=seed).state_dict(),
               os.path.join(at["imagereward"]["model"], "ImageReward.pt"))
    for name in ("clip-l", "hps", "imagereward"):  # load_one reads these as tiny stand-ins
        open(os.path.join(folder, name, TINY_MARKER), "w").write(stamp)
    open(marker, "w").write(stamp)
    return at


def tiny_paths(folder):
    """{name: the PATH that --reward_model_path NAME=PATH takes} of build_tiny's stand-ins in `folder` (the
    aesthetic head's folder holds its CLIP-L too)."""
    at = tiny_layout(folder)
    return {name: os.path.dirname(parts["head"]) if name == "aesthetic" else parts["model"]
            for name, parts in at.items()}


def is_tiny(name, at):
    """Whether a reward's weights (its first part's) are build_tiny's stand-ins: its marker beside them."""
    path = at[next(iter(RECORDS[name].weights))]
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return bool(path) and os.path.isfile(os.path.join(folder, TINY_MARKER))


@contextlib.contextmanager
def tiny_imagereward_classes(folder):
    """Inside the block ImageReward's own classes build a small model: the package hard-codes BLIP's ViT-L (the
    whole model is 447M parameters, ~5 s and 2.2 GB to build), so the two names blip_pretrain imported
    (create_vit, init_tokenizer) become a 2-block ViT of the package's own VisionTransformer and a BertTokenizer
    on a letter vocabulary (every word splits into letters, so the prompt matters); restored on exit. BERT keeps
    hidden size 768, which ImageReward's MLP(768) requires. Yields the med_config.json written in `folder`."""
    import_imagereward()
    from ImageReward.models.BLIP import blip_pretrain, vit
    from transformers import BertTokenizer
    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    open(os.path.join(folder, "vocab.txt"), "w").write("\n".join(vocab) + "\n")
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
               hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02, intermediate_size=256,
               layer_norm_eps=1e-12, max_position_embeddings=512, model_type="bert", num_attention_heads=12,
               num_hidden_layers=1, pad_token_id=0, type_vocab_size=2, vocab_size=len(vocab) + 2,
               encoder_width=64, add_cross_attention=True)  # vocab + [DEC] + [ENC]
    json.dump(med, open(os.path.join(folder, "med_config.json"), "w"))

    def tiny_vit(*args, **kwargs):
        return vit.VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2), 64

    def tokenizer():  # what blip.init_tokenizer does to bert-base-uncased, on the letter vocabulary
        tok = BertTokenizer(os.path.join(folder, "vocab.txt"))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    originals = blip_pretrain.create_vit, blip_pretrain.init_tokenizer
    blip_pretrain.create_vit, blip_pretrain.init_tokenizer = tiny_vit, tokenizer
    try:
        yield os.path.join(folder, "med_config.json")
    finally:
        blip_pretrain.create_vit, blip_pretrain.init_tokenizer = originals


def tiny_imagereward(folder, device="cpu", seed=0):
    """ImageReward's own classes, small (tiny_imagereward_classes). The head (std 0.05) and BERT's cross-attention
    to the image (std 0.1) are re-drawn larger than their inits (1/769, 0.02), with which every random-model
    score is nearly the same number whatever the image."""
    RM = import_imagereward()
    with tiny_imagereward_classes(folder) as med_config:
        torch.manual_seed(seed)
        model = RM.ImageReward(med_config=med_config, device=device)
    for p in model.mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for name, p in model.blip.text_encoder.named_parameters():
        if ".crossattention." in name and name.endswith("weight") and "LayerNorm" not in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.to(device).eval().requires_grad_(False)
