"""Tests for rewards.py: every reward model, loaded through its record, against its official scorer on tiny random
models of the real architectures (evaluate.build_tiny, tiny_imagereward): the training path (decoded images,
torch preprocessing) against the official code's differentiable tensor path, score and gradient; the evaluation
path (PIL images) against the official PIL path; a mix against its terms; bad input as one line. CPU, offline.

Run: pytest -q test_rewards.py
"""
import functools
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the model hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

import evaluate
import plumbing
import rewards

CPU, FP32 = torch.device("cpu"), torch.float32


@functools.lru_cache(maxsize=None)
def tiny():
    """Tiny stand-ins of every reward (rewards.build_tiny: CLIP-L and PickScore stand-ins, the aesthetic head, HPS
    checkpoints, ImageReward of the package's own classes), on the tiny SD's tokenizer (random_weights)."""
    import random_weights
    root = tempfile.mkdtemp(prefix="dipp-test-rewards-")
    sd, _ = random_weights.build_random(os.path.join(root, "sd"), "tiny", 0)
    return rewards.build_tiny(os.path.join(root, "rewards"), os.path.join(sd, "tokenizer"))


def where(name):
    """{part: file or folder} of a reward's tiny stand-in."""
    return tiny()[name]


@functools.lru_cache(maxsize=None)
def reward(name):
    """The reward fn of RECORDS[name] through rewards.load_one, on its tiny stand-in."""
    fn = rewards.load_one(name, where(name), CPU, FP32, pil=True)
    if name == "aesthetic":  # its default init maps every image to nearly one number: re-drawn, norm-preserving
        g = torch.Generator().manual_seed(0)
        for p in fn.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 1))
    return fn


def images(seed, size=(64, 64), n=2):
    """Smooth random images in [-0.8, 0.8] (B, 3, H, W): bicubic resizing cannot overshoot [-1, 1], so the
    clamps of the saved image play no part and the official paths, which do not clamp, are exactly comparable."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=size, mode="bilinear",
                                        align_corners=True)
    return (x * 1.6 - 0.8).requires_grad_(True)


def official(name, x, prompts):
    """The official code's differentiable computation of each score, written from it and not from rewards.py:
    torchvision's tensor transforms (ImageReward's ReFL.py: Resize(224, BICUBIC), CenterCrop(224), Normalize; the
    tensor analogue of CLIP's processor for CLIP, PickScore and the aesthetic head; HPSv2's ResizeMaxSize: resize
    the longest side, pad with 0) and each model's own forward (score_gard; CLIPModel's logits; open_clip)."""
    import torchvision.transforms.functional as TF
    unit = (x + 1) / 2
    bicubic = TF.InterpolationMode.BICUBIC
    fn = reward(name)
    if name.startswith("hps"):
        H, W = unit.shape[-2:]
        s = 224 / max(H, W)
        y = TF.resize(unit, [round(H * s), round(W * s)], bicubic, antialias=False)  # HPSv2 2023: no antialias
        y = TF.pad(y, [(224 - y.shape[-1]) // 2, (224 - y.shape[-2]) // 2, 224 - y.shape[-1] - (224 - y.shape[-1]) // 2,
                       224 - y.shape[-2] - (224 - y.shape[-2]) // 2], fill=0)
        y = TF.normalize(y, rewards.CLIP_MEAN, rewards.CLIP_STD)
        import open_clip
        tok = open_clip.get_tokenizer(rewards.TINY_HPS_ARCH)
        img, txt = fn.model.encode_image(y), fn.model.encode_text(tok(prompts))
        return torch.nn.functional.cosine_similarity(img, txt)  # HPSv2 score(): normalised features, dot product
    y = TF.normalize(TF.center_crop(TF.resize(unit, 224, bicubic, antialias=True), 224), rewards.CLIP_MEAN,
                     rewards.CLIP_STD)
    if name == "imagereward":
        m = fn.model
        t = m.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        return m.score_gard(t.input_ids, t.attention_mask, y)[:, 0]
    clip = fn.clip if name == "aesthetic" else fn
    out = clip.model(input_ids=clip.tokenizer(prompts, padding=True, return_tensors="pt").input_ids, pixel_values=y)
    if name == "clip":
        return torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    if name == "pickscore":
        return out.logits_per_image.diagonal()  # logit_scale.exp() · cos, the model card's score
    return hand_aesthetic(fn.head.state_dict(), out.image_embeds)


def hand_aesthetic(state, e):
    """LAION aesthetic v2 head written out: five affine maps 768→1024→128→64→16→1, no activations."""
    x = e
    for i, (d_in, d_out) in zip((0, 2, 4, 6, 7), ((768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        W, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        assert W.shape == (d_out, d_in)  # the published layer sizes
        x = x @ W.T + b
    return x[:, 0]


@pytest.mark.parametrize("name", rewards.NAMES)
def test_each_reward_is_its_official_score_and_gradient(name):
    """Through the registry, each reward's training path (decoded images in [-1, 1]) equals the official code's
    differentiable path on the same tiny weights, images and prompts: the score, and its gradient in the images;
    for a square image and a non-square one (HPS pads it, the others crop it)."""
    prompts = ["a red bicycle", "a watercolor fox"]
    for size in ((64, 64), (96, 72)):
        x = images(1, size)
        ours = reward(name)(x, prompts)
        (g_ours,) = torch.autograd.grad(ours.sum(), x)
        theirs = official(name, x, prompts)
        (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), (name, size, ours, theirs)
        assert torch.allclose(g_ours, g_theirs, rtol=1e-3, atol=1e-6 * g_theirs.abs().max()), (name, size)
        assert g_theirs.abs().max() > 0 and (theirs[0] - theirs[1]).abs() > 1e-4  # not vacuous


@pytest.mark.parametrize("name", rewards.NAMES)
def test_each_reward_training_path_is_close_to_its_evaluation_path(name):
    """The decoded image scored in training vs the saved 8-bit PNG scored by score_pil (the official PIL
    preprocessing), images downsized to 224 as SD's are: within 10 % of the spread between two images (PIL rounds to
    8 bits between its two resize passes; torch's antialiased bicubic does not)."""
    from PIL import Image
    x = (images(2, (256, 256)).detach() * 127.5).round() / 127.5  # downsized to 224, as SD images are
    pil = [Image.fromarray(((im + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for im in x]
    prompts = ["a lighthouse at sunset", "a lighthouse at sunset"]
    with torch.no_grad():
        ours, theirs = reward(name)(x, prompts), reward(name).score_pil(pil, prompts)
    spread = (theirs[0] - theirs[1]).abs()
    assert spread > 1e-5 and (ours - theirs).abs().max() < 0.1 * spread + 1e-6, (name, ours, theirs)


# ----------------------------------------------------------------------------- the evaluation path (PIL images)

def pil(seed, size=(96, 96)):
    """A smooth random RGB image (what a generator outputs looks more like this than like white noise)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=size[::-1], mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    return Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy())


def test_imagereward_pil_path_is_the_package_score():
    """ImageReward's score_pil (evaluate.py's scorer) equals the package's own `score(prompt, PIL image)`, image by
    image, for an SD-sized, a tiny and a non-square image."""
    from PIL import Image
    fn = reward("imagereward")
    ims = [pil(1, (512, 512)), pil(2, (16, 16)), pil(3, (300, 200)), Image.new("RGB", (512, 512), "black")]
    prompts = ["a red bicycle", "a watercolor fox", "a lighthouse at sunset", "a red bicycle"]
    ours = evaluate.ImageRewardScorer(fn)(ims, prompts)["imagereward"]
    with torch.no_grad():
        theirs = torch.tensor([fn.model.score(p, im) for p, im in zip(prompts, ims)])
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert (theirs[0] - theirs[3]).abs() > 1e-2  # same prompt, other image: the score sees the image


def test_aesthetic_head_loads_published_keys_and_is_the_linear_mlp(tmp_path):
    """A state dict with the published file's keys loads as is, the head is the hand-written linear MLP
    on the L2-normalised CLIP image embedding (CLIPModel's own image_embeds), and a wrong file is one line."""
    from transformers import CLIPModel, CLIPProcessor
    g = torch.Generator().manual_seed(0)
    sizes = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for i, (o, n) in sizes.items():
        state[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        state[f"layers.{i}.bias"] = torch.randn(o, generator=g)
    torch.save(state, tmp_path / rewards.AESTHETIC_FILE)
    clip = tiny()["clip"]["model"]
    scorer = evaluate.load_clip_l(clip, str(tmp_path / rewards.AESTHETIC_FILE), CPU)
    ims, prompts = [pil(5), pil(6, (64, 48))], ["a fox", "a castle"]
    ours = scorer(ims, prompts)["aesthetic"]
    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    with torch.no_grad():
        embeds = model(**processor(text=prompts, images=ims, return_tensors="pt", padding=True)).image_embeds
    assert torch.allclose(ours, hand_aesthetic(state, embeds), atol=1e-4)
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "wrong.pth")
    message = error_of(lambda: rewards.load_aesthetic_head(str(tmp_path / "wrong.pth")))
    assert "10 missing: layers.0.weight" in message and "1 unexpected: fc.weight" in message
    message = error_of(lambda: rewards.load_one("aesthetic", {"head": str(tmp_path / rewards.AESTHETIC_FILE),
                                                             "model": clip}, CPU, FP32))  # not the official bytes
    assert "is not the official" in message and rewards.AESTHETIC_SHA256 in message


def test_clip_score_is_100_times_clamped_cosine():
    """evaluate's CLIP score = 100 · max(cos, 0) of CLIPModel's own (normalised) image and text embeddings."""
    from transformers import CLIPModel, CLIPProcessor
    clip = tiny()["clip"]["model"]
    scorer = evaluate.load_clip_l(clip, None, CPU)
    ims, prompts = [pil(7), pil(8), pil(9)], ["a fox", "a red bicycle", "an astronaut riding a horse"]
    ours = scorer(ims, prompts)["clip"]
    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=ims, return_tensors="pt", padding=True))
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    assert torch.allclose(ours, 100 * cos.clamp_min(0), atol=1e-4)
    published = rewards.RECORDS["clip"].published  # (the tiny model's cosines may all be > 0: the clamp, alone)
    assert published(torch.tensor([-0.25, 0.0, 0.3])).tolist() == pytest.approx([0.0, 0.0, 30.0])


@pytest.mark.parametrize("resize", ["legacy", "antialias"])
def test_hps_preprocessing_is_the_hpsv2_recipe(resize):
    """hps_preprocess = HPSv2's ResizeMaxSize on the tensor: longest side to 224 (bicubic; antialiased or, as
    torchvision < 0.17 did for HPSv2's published numbers, not), zero pad centred (odd pixel right/bottom), CLIP
    normalisation; checked on non-square and square images against plain torch interpolate + explicit padding."""
    import numpy as np
    mean, std = torch.tensor(rewards.CLIP_MEAN).view(3, 1, 1), torch.tensor(rewards.CLIP_STD).view(3, 1, 1)
    for size, resized in (((300, 201), (150, 224)), ((512, 512), (224, 224)), ((16, 16), (224, 224))):
        image = pil(10, size)  # PIL size = (W, H)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W)
        x = torch.nn.functional.interpolate(x[None], size=resized, mode="bicubic", align_corners=False,
                                            antialias=resize == "antialias")[0]  # (3, h, w), longest side 224
        top, left = (224 - resized[0]) // 2, (224 - resized[1]) // 2
        expected = torch.zeros(3, 224, 224)  # fill 0 *before* normalisation, as HPSv2 pads
        expected[:, top:top + resized[0], left:left + resized[1]] = x
        ours = rewards.hps_preprocess(image, resize)
        assert torch.allclose(ours, (expected - mean) / std, atol=1e-5), size
    other = {"legacy": "antialias", "antialias": "legacy"}[resize]  # not vacuous: the two differ when shrinking
    assert (rewards.hps_preprocess(pil(10, (512, 512)), other) - ours).abs().max() > 1e-3


def test_hps_is_100_cos_of_open_clip_encoders():
    """evaluate's HPS scorer loads the {'state_dict': ...} checkpoint strictly and scores 100 · cos of open_clip's
    own encode_image / encode_text on the same preprocessed tensors and tokens."""
    import open_clip
    t = tiny()
    scorer = evaluate.load_hps(t["hps20"]["model"], evaluate.TINY_HPS_ARCH, CPU)
    ims, prompts = [pil(11, (512, 512)), pil(12, (300, 200))], ["a bowl of ramen", "a cozy living room"]
    ours = scorer(ims, prompts)["hps"]
    model = open_clip.create_model(evaluate.TINY_HPS_ARCH)
    model.load_state_dict(torch.load(t["hps20"]["model"])["state_dict"])
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([rewards.hps_preprocess(im) for im in ims]))
        txt = model.encode_text(open_clip.get_tokenizer(evaluate.TINY_HPS_ARCH)(prompts))
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert torch.allclose(ours, 100 * cos, atol=1e-4) and (ours[0] - ours[1]).abs() > 1e-3


def test_pickscore_is_logit_scale_times_cosine():
    """PickScore = logit_scale.exp() · cos: the diagonal of CLIPModel's own logits_per_image."""
    from transformers import CLIPModel, CLIPProcessor
    t = tiny()
    scorer = evaluate.load_pickscore(t["pickscore"]["model"], t["pickscore"]["processor"], CPU)
    ims, prompts = [pil(13), pil(14)], ["a lighthouse on a cliff", "a close-up portrait"]
    ours = scorer(ims, prompts)["pickscore"]
    model = CLIPModel.from_pretrained(t["pickscore"]["model"]).eval()
    processor = CLIPProcessor.from_pretrained(t["pickscore"]["processor"])
    with torch.no_grad():
        out = model(**processor(text=prompts, images=ims, return_tensors="pt", padding=True))
    assert torch.allclose(ours, out.logits_per_image.diagonal(), atol=1e-4)
    assert abs(model.logit_scale.exp().item() - 100) < 1e-3  # not vacuous: the scale is far from 1


def test_imagereward_loads_strictly(tmp_path):
    """rewards.load_imagereward (dipp's reward, evaluate's scorer) loads ImageReward.pt strictly: the model's own
    file gives the same weights; one missing and one unknown key, which the package's strict=False loader would
    pass over (leaving a layer at random), are one line naming both."""
    folder = str(tmp_path)
    state = evaluate.tiny_imagereward(folder).state_dict()
    torch.save(state, tmp_path / "ImageReward.pt")
    with evaluate.tiny_imagereward_classes(folder):
        loaded = rewards.load_imagereward(folder, CPU).state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
        gone = next(k for k in state if k.startswith("mlp."))
        torch.save({**{k: v for k, v in state.items() if k != gone}, "mlp.extra": torch.zeros(1)},
                   tmp_path / "ImageReward.pt")
        message = error_of(lambda: rewards.load_imagereward(folder, CPU))
    assert f"1 missing: {gone}" in message and "1 unexpected: mlp.extra" in message, message

# ----------------------------------------------------------------------------- mixes


def test_a_mix_is_the_weighted_sum_of_its_terms_score_and_gradient():
    """Mix([(clip, 1), (pickscore, 0.5)]): its score and its autograd gradient in the images equal
    1 · (clip's) + 0.5 · (pickscore's), each taken alone; one backward also leaves each term's own gradient."""
    x, prompts = images(3), ["a fox", "a red bicycle"]
    mix = rewards.Mix([("clip", 1.0, reward("clip")), ("pickscore", 0.5, reward("pickscore"))])
    total = mix(x, prompts)
    (g_mix,) = torch.autograd.grad(total.sum(), x)
    parts = {name: reward(name)(x, prompts) for name in ("clip", "pickscore")}
    grads = {name: torch.autograd.grad(r.sum(), x)[0] for name, r in parts.items()}
    assert torch.allclose(total, parts["clip"] + 0.5 * parts["pickscore"], atol=1e-6)
    assert torch.allclose(g_mix, grads["clip"] + 0.5 * grads["pickscore"], rtol=1e-5, atol=1e-9)
    assert torch.allclose(mix.image_grads["pickscore"], 0.5 * grads["pickscore"], rtol=1e-5, atol=1e-9)
    assert grads["clip"].abs().max() > 0 and grads["pickscore"].abs().max() > 0


def test_term_pulls_are_each_terms_own_gradient_on_the_sample():
    """rewards.term_pulls: each term's per-sample pull on x0 through a decoder equals autograd of that term
    alone (−w_i r_i, mean over the batch, times B) and the pulls add up to the total that PullOnSample logs."""
    torch.manual_seed(0)
    decoder = torch.nn.ConvTranspose2d(4, 3, 8, stride=8)  # x0 (B, 4, 8, 8) -> images (B, 3, 64, 64)
    decode = lambda x: torch.tanh(decoder(x))
    terms = [("clip", 1.0), ("pickscore", 0.5), ("aesthetic", 0.25)]
    mix = rewards.Mix([(n, w, reward(n)) for n, w in terms])
    prompts = ["a fox", "a red bicycle"]
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    pull = plumbing.PullOnSample(x0, torch.zeros_like(x0))
    (-mix(decode(x0), prompts)).mean().backward()
    total = pull.rest(1.0)
    pulls = rewards.term_pulls(mix, decode, x0, 1.0)
    for name, w in terms:
        x = x0.detach().requires_grad_(True)
        (alone,) = torch.autograd.grad((-w * reward(name)(decode(x), prompts)).mean() * 2, x)
        assert torch.allclose(pulls[name], alone, rtol=1e-4, atol=1e-6 * alone.abs().max()), name
    assert torch.allclose(sum(pulls.values()), total, atol=1e-6 * total.abs().max())

# ----------------------------------------------------------------------------- bad input


def error_of(fn):
    with pytest.raises(SystemExit) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and message.startswith("dipp: error:"), message
    return message


def test_bad_reward_specs_are_one_line_naming_the_valid_names():
    """An unknown reward, a bad weight, a broken syntax, a repeated name; a path spec for another reward."""
    assert rewards.parse("imagereward") == [("imagereward", 1.0)] and rewards.parse("none") == []
    assert rewards.parse("hps21=0.7, clip=1.4") == [("hps21", 0.7), ("clip", 1.4)]
    for spec, expected in (("hps", "unknown reward 'hps'"), ("imagereward=x", "must be a positive number"),
                           ("imagereward=-1", "must be a positive number"), ("clip=nan", "positive number"),
                           ("clip=1,", "unknown reward ''"), ("clip,clip=2", "appears twice")):
        message = error_of(lambda: rewards.parse(spec))
        assert expected in message, message
        if "unknown" in expected or "positive" in expected:
            assert all(name in message for name in rewards.NAMES), message
    message = error_of(lambda: rewards.parse_paths("/a", ["clip", "hps21"]))
    assert "is one path but the run has 2 rewards" in message
    message = error_of(lambda: rewards.parse_paths("pickscore=/a", ["clip", "hps21"]))
    assert "names no reward of this run" in message
    assert rewards.parse_paths("/a", ["hps21"]) == {"hps21": "/a"}


def test_where_takes_each_part_from_the_folder_or_its_hub_id(tmp_path):
    """A folder holding the head alone gives the aesthetic head from it and CLIP from its hub id (both, when a CLIP
    is beside it); a file is the first part's weight file; a folder lacking the first part's files is one line."""
    t = tiny()
    head = str(tmp_path / "head" / rewards.AESTHETIC_FILE)
    os.makedirs(os.path.dirname(head))
    os.link(t["aesthetic"]["head"], head)
    assert rewards.where("aesthetic", os.path.dirname(head)) == {"head": head, "model": rewards.CLIP_L}
    assert rewards.where("aesthetic", os.path.dirname(t["aesthetic"]["head"])) == t["aesthetic"]  # CLIP-L beside it
    assert rewards.where("hps21", t["hps21"]["model"]) == {"model": t["hps21"]["model"]}
    assert rewards.where("pickscore", t["pickscore"]["model"]) == {"model": t["pickscore"]["model"],
                                                                "processor": t["pickscore"]["model"]}
    assert rewards.where("pickscore", "") == {"model": "yuvalkirstain/PickScore_v1", "processor": rewards.CLIP_H}
    message = error_of(lambda: rewards.where("hps20", str(tmp_path)))
    assert rewards.HPS_FILES["v2.0"] in message and "huggingface-cli download xswu/HPSv2" in message


def test_missing_weights_offline_are_one_line_before_any_model_loads(tmp_path, monkeypatch):
    """With the hub unreachable, a reward whose weights are not in the hub cache is one line naming the download;
    nothing is loaded (the loaders are replaced by a failure)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(rewards, "load_one", lambda *a, **k: pytest.fail("a model was loaded"))
    for spec in ("pickscore", "hps21=1,aesthetic=2"):
        message = error_of(lambda: rewards.check(rewards.parse(spec), {}))
        assert "not in the hub cache" in message and "huggingface-cli download" in message, message
    # --validation_diversity with no CLIP in the run watches CLIP ViT-L/14: its weights are checked as a watched one's
    import dipp
    import random_weights
    sd, _ = random_weights.build_random(str(tmp_path / "models"), "tiny", 0)
    monkeypatch.setattr(dipp, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    message = error_of(lambda: dipp.main(["--pretrained_model_name_or_path", sd, "--reward", "none",
                                          "--validation_diversity", "2", "--output_dir", str(tmp_path / "run")]))
    assert "clip reward" in message and "huggingface-cli download openai/clip-vit-large-patch14" in message, message
    assert rewards.watch_for_diversity("clip=2", "", 4) == "" and rewards.watch_for_diversity("none", "hps21", 0) == \
        "hps21" and rewards.watch_for_diversity("none", "hps21", 2) == "hps21,clip"

# ----------------------------------------------------------------------------- through dipp.py


def test_bad_reward_flags_are_one_line_before_anything_loads(tmp_path, monkeypatch):
    """dipp.py with a wrong --reward, --reward_model_path or --watch_rewards stops with one line naming the valid
    names before a model (or the random-weight folder of --tiny) is built."""
    import dipp
    monkeypatch.setattr(dipp, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    monkeypatch.setattr(rewards, "load_one", lambda *a, **k: pytest.fail("a reward was loaded"))
    out = tmp_path / "run"
    for flags, expected in ((["--reward", "hps"], "unknown reward 'hps'"),
                            (["--reward", "imagereward=0"], "must be a positive number"),
                            (["--reward", "clip;pickscore"], "unknown reward 'clip;pickscore'"),
                            (["--reward", "clip,hps21", "--reward_model_path", "/w"], "is one path but the run has 2"),
                            (["--reward", "clip", "--reward_model_path", "hps21=/w"], "names no reward of this run"),
                            (["--watch_rewards", "pickscore,hsp21"], "unknown reward 'hsp21'")):
        message = error_of(lambda: dipp.main(["--tiny", "--output_dir", str(out)] + flags))
        assert expected in message and "imagereward" in message or "NAME=PATH" in message, message
    assert not out.exists()


def test_a_mixed_run_logs_each_terms_pull_and_the_watched_rewards(tmp_path):
    """`dipp.py --tiny --reward "clip=1,pickscore=0.5" --watch_rewards hps21 --validation_diversity 2`, one step: the
    step logs each term's pull and score (per sample the pulls add up to the total, so the RMS of the total is at
    most their sum); each validation logs val_clip and val_pickscore (val_reward = val_clip + 0.5 val_pickscore),
    val_hps21, which equals HPS v2.1 (its tiny stand-in) recomputed by hand on the step-0 images, and val_diversity,
    which equals 1 − cos of the CLIP embeddings of each prompt's two images from the noise of seed + 1, by hand."""
    import json
    import dipp
    out, prompts = tmp_path / "run", ["a green teapot", "two cats on a sofa"]
    (tmp_path / "val.txt").write_text("\n".join(prompts) + "\n")
    nets = dipp.main(["--tiny", "--max_train_steps", "1", "--reward", "clip=1,pickscore=0.5", "--watch_rewards",
                      "hps21", "--validation_prompts", str(tmp_path / "val.txt"), "--train_batch_size", "2",
                      "--seed", "3", "--validation_diversity", "2", "--output_dir", str(out)])
    first, step = (json.loads(line) for line in open(out / "log.jsonl"))
    assert 0 < step["grad_reward"] <= step["grad_reward_clip"] + step["grad_reward_pickscore"] + 1e-9
    assert step["grad_reward_clip"] > 0 and step["grad_reward_pickscore"] > 0 and "reward_clip" in step
    for row in (first, step):
        assert abs(row["val_reward"] - (row["val_clip"] + 0.5 * row["val_pickscore"])) < 1e-5
    G0 = dipp.OneStepGenerator(nets["teacher"], nets["family"], nets["schedule"], 999)  # step 0: the teacher
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    hps = rewards.load_one("hps21", rewards.tiny_paths(str(out / "tiny" / "rewards"))["hps21"], CPU, FP32)
    with torch.no_grad():
        cond = nets["family"].encode(nets["tokenizer"], nets["text_encoder"], prompts)
        r = hps(dipp.decode(nets["vae"], G0(z, cond)), prompts)
    assert abs(first["val_hps21"] - r.mean().item()) < 1e-5 and "val_hps21" in step
    z2 = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(4))  # prompt 0 twice, then prompt 1 twice
    clip = rewards.load_one("clip", rewards.tiny_paths(str(out / "tiny" / "rewards"))["clip"], CPU, FP32)
    with torch.no_grad():
        e = clip.embed(dipp.decode(nets["vae"], G0(z2, cond.repeat_interleave(2, 0) if torch.is_tensor(cond) else
                                                   {k: v.repeat_interleave(2, 0) for k, v in cond.items()})))
    e = e.double().numpy()
    cos = [(e[i] @ e[i + 1]) / ((e[i] @ e[i]) * (e[i + 1] @ e[i + 1])) ** 0.5 for i in (0, 2)]
    assert abs(first["val_diversity"] - (2 - sum(cos)) / 2) < 1e-5 and first["val_diversity"] > 1e-4
    assert "val_diversity" in step and "val_diversity_std" in step
