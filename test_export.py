"""Tests for what a training run ships (issue 34): the LoRA adapter file that stock diffusers pipelines load, the
model card, and dipp.json's record of the teacher that `--generate` reads (issue 31). Each check compares dipp
with diffusers' own pipelines and loaders on tiny random weights. CPU, offline.

Run: pytest -q test_export.py
"""
import functools
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the model hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

import dipp
import families
import plumbing

TMP = tempfile.gettempdir()
PROMPTS = ["a red bicycle", "a fox in the snow"]


@functools.lru_cache(maxsize=None)
def lora_run(shapes):
    """One LoRA training step (rank 4, lr 1e-2 so the adapter's B leaves 0) on tiny random weights of `shapes`
    (random_weights.py), as a user runs it: --random_weights builds the teacher in the run folder. Shared by this
    file's tests. Returns the run folder."""
    out = os.path.join(TMP, f"dipp-test-lora-{shapes}")
    dipp.main(["--random_weights", shapes, "--lora_rank", "4", "--max_train_steps", "1", "--learning_rate", "1e-2",
               "--fake_learning_rate", "1e-2", "--reward_scale", "10", "--output_dir", out, "--overwrite_output_dir"])
    return out


def stock_pipeline(folder):
    """The family's stock diffusers pipeline assembled from the teacher folder's own components (text encoders
    included: the pipeline encodes the prompts itself), with DDPMScheduler (clip_sample=False): one step at t*
    from pure noise then returns the denoiser's x̂0 = (z − σ ε̂)/α, which is dipp's one-step generator."""
    import diffusers
    import transformers
    fam = families.find_family(folder)
    get = lambda cls, sub, **kw: cls.from_pretrained(folder, subfolder=sub, **kw)
    parts = dict(vae=get(diffusers.AutoencoderKL, "vae"), unet=get(diffusers.UNet2DConditionModel, "unet"),
                 text_encoder=get(transformers.CLIPTextModel, "text_encoder"),
                 tokenizer=get(transformers.CLIPTokenizer, "tokenizer"),
                 scheduler=get(diffusers.DDPMScheduler, "scheduler", clip_sample=False))
    if fam.name == "sdxl":
        parts.update(text_encoder_2=get(transformers.CLIPTextModelWithProjection, "text_encoder_2"),
                     tokenizer_2=get(transformers.CLIPTokenizer, "tokenizer_2"), add_watermarker=False)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, fam.pipeline)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_layers(net):
    """{layer name: its LoRA scale α/r} of a PEFT-carrying network."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return {n: next(iter(m.scaling.values())) for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("shapes", ["tiny", "tiny_sdxl"])
def test_lora_adapter_in_a_stock_pipeline_reproduces_generate(shapes, tmp_path):
    """A LoRA run (SD1.5 / SDXL shapes) writes pytorch_lora_weights.safetensors beside the merged generator. A stock
    pipeline built from the *teacher* folder with `load_lora_weights(<run>/generator)` gets an adapter on every layer
    dipp trained, at dipp's scale α/r; one step at t* with guidance off, from the latents `dipp.py --generate` draws,
    gives --generate's images, unfused and after fuse_lora(). Tolerance 1e-4 on images in [0, 1], not 0: the
    unfused pipeline computes W x + B(A x) where the merged generator computes (W + BA) x (float rounding,
    ~1e-6 in ε̂, then × σ/α = 15 at SD's t* in x̂0), and SDXL's --generate pre-encodes its prompts in a batch of
    another size. --generate given the adapter file alone (the teacher + it, merged in memory) gives the same."""
    out = lora_run(shapes)
    generator = os.path.join(out, "generator")
    record = json.load(open(os.path.join(generator, "dipp.json")))
    assert record["lora"] == {"file": plumbing.LORA_FILE, "rank": 4, "alpha": 4, "layers": record["lora"]["layers"]}
    t_star, teacher = record["generator_timestep"], record["teacher"]
    assert t_star == {"tiny": 999, "tiny_sdxl": 399}[shapes] and os.path.isdir(teacher)
    # --generate with only --generator_init: the teacher comes from dipp.json (the default is SD1.5's hub id)
    ours = dipp.main(["--generate", "|".join(PROMPTS), "--generator_init", generator,
                      "--output_dir", str(tmp_path / "a")])
    from_file = dipp.main(["--generate", "|".join(PROMPTS), "--generator_init",
                           os.path.join(generator, plumbing.LORA_FILE), "--output_dir", str(tmp_path / "b")])
    assert torch.allclose(ours, from_file, atol=1e-5)
    pipe = stock_pipeline(teacher)
    pipe.load_lora_weights(generator, weight_name=plumbing.LORA_FILE)  # (offline, diffusers needs weight_name)
    loaded = lora_layers(pipe.unet)
    assert len(loaded) == record["lora"]["layers"] and set(loaded.values()) == {1.0}  # α/r = 4/4, as trained
    z = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))  # dipp.generate's z, --seed 0
    run = lambda: pipe(PROMPTS, num_inference_steps=1, timesteps=[t_star], guidance_scale=1.0, latents=z,
                       output_type="pt").images
    unfused = run()
    pipe.fuse_lora()
    fused = run()
    images = (ours.clamp(-1, 1) + 1) / 2
    assert torch.allclose(images, unfused, atol=1e-4), (images - unfused).abs().max()
    assert torch.allclose(images, fused, atol=1e-4), (images - fused).abs().max()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()  # the teacher alone draws other images: the adapter is what made them equal
    assert (run() - unfused).abs().max() > 1e-3


def test_lora_file_keeps_alpha_and_every_layer(tmp_path):
    """save_lora_adapter on a UNet with adapters on attention, conv and time layers and α ≠ r (α/r = 2): diffusers'
    own loader (load_lora_adapter, what load_lora_weights calls) rebuilds every layer at scale 2, and the loaded UNet
    predicts what the trained one does. (Through convert_state_dict_to_diffusers, as diffusers' training scripts
    save, the loader would drop every attention adapter: the key formats get mixed.)"""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    import random_weights
    folder = random_weights.build_random(os.path.join(TMP, "dipp-test-tiny"), "tiny")[0]
    fam = families.FAMILIES["sd"]
    net = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(fam.lora_targets)), net,
                            adapter_name="generator")
    torch.manual_seed(0)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data = 0.05 * torch.randn_like(p)
    saved = plumbing.save_lora_adapter(net, str(tmp_path), fam)
    assert saved["rank"] == 4 and saved["alpha"] == 8 and saved["layers"] == len(lora_layers(net))
    fresh = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    fresh.load_lora_adapter(str(tmp_path), weight_name=plumbing.LORA_FILE, prefix="unet")
    assert lora_layers(fresh).keys() == lora_layers(net).keys() and set(lora_layers(fresh).values()) == {2.0}
    assert {"to_q", "conv1", "time_emb_proj"} <= {n.rsplit(".", 1)[-1] for n in lora_layers(fresh)}
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, encoder_hidden_states=c).sample, net(x, t, encoder_hidden_states=c).sample)


def test_model_card_names_the_teacher_and_the_runs_settings():
    """README.md in the exported generator folder: YAML front matter that parses (library_name diffusers, the LoRA
    tag), and a body naming the teacher folder, the method and paper, the run's real settings (reward, α_rew = 10,
    ω, t*, steps, batch, rank), the commands that sample it, and the validation grid copied beside it."""
    import yaml
    generator = os.path.join(lora_run("tiny"), "generator")
    text = open(os.path.join(generator, "README.md")).read()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "diffusers" and "lora" in meta["tags"] and meta["license"] == "other"
    assert "base_model" not in meta  # a local folder is no hub id
    record = json.load(open(os.path.join(generator, "dipp.json")))
    run = record["training"]
    assert run["reward_scale"] == 10 and run["lora_rank"] == 4 and run["max_train_steps"] == 1
    for needle in (f"`{run['pretrained_model_name_or_path']}`", "arXiv [2410.18881]", "| clip, 10 |", "| 1.75 |",
                   "| 999 |", "| 1, 1 × 1 process(es) |", "| LoRA rank | 4 |", "load_lora_weights",
                   f"--generator_init {generator}", "timesteps=[999]", "![validation grid](samples_0001.png)"):
        assert needle in body, needle
    assert os.path.isfile(os.path.join(generator, "samples_0001.png"))


def test_model_card_of_a_hub_teacher_carries_its_id_and_licence(tmp_path):
    """A generator of a hub teacher: base_model is the hub id and the licence that base model's card states."""
    from huggingface_hub import ModelCard
    record = dict(generator_timestep=399, teacher="stabilityai/stable-diffusion-xl-base-1.0")
    plumbing.write_model_card(str(tmp_path), record, families.FAMILIES["sdxl"])
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert card.data.base_model == record["teacher"] and card.data.license == "openrail++"
    assert "stable-diffusion-xl" in card.data.tags and "StableDiffusionXLPipeline.from_pretrained" in card.text


def test_generate_finds_the_teacher_or_says_where_it_went(tmp_path, capsys):
    """--generate without --pretrained_model_name_or_path reads the teacher from dipp.json: a random-weight teacher
    whose folder is gone is rebuilt from its recipe (same weights, same images); a recorded folder that is gone is
    one line saying how to pass it; an explicit flag wins over the record."""
    generator = os.path.join(lora_run("tiny"), "generator")
    want = dipp.main(["--generate", PROMPTS[0], "--generator_init", generator, "--output_dir", str(tmp_path / "a")])
    moved = tmp_path / "moved"
    shutil.copytree(generator, moved)
    record = json.load(open(moved / "dipp.json"))
    gone = dict(record, teacher=str(tmp_path / "gone" / "sd"), teacher_relative="../gone/sd")
    plumbing.write_generator_record(str(moved), **gone)
    rebuilt = dipp.main(["--generate", PROMPTS[0], "--generator_init", str(moved), "--output_dir", str(tmp_path / "b")])
    assert "rebuilding its random weights" in capsys.readouterr().out and torch.equal(rebuilt, want)
    plumbing.write_generator_record(str(moved), **{k: v for k, v in gone.items() if k != "random_weights"})
    with pytest.raises(SystemExit) as e:
        dipp.main(["--generate", PROMPTS[0], "--generator_init", str(moved)])
    assert "no longer exists" in str(e.value) and "--pretrained_model_name_or_path" in str(e.value)
    with pytest.raises(SystemExit) as e:
        dipp.main(["--generate", PROMPTS[0], "--generator_init", generator, "--pretrained_model_name_or_path",
                   str(tmp_path / "elsewhere")])
    assert "elsewhere" in str(e.value) and "does not exist" in str(e.value)


def test_evaluate_takes_the_adapter_file_or_a_folder_of_only_it_as_a_generator(tmp_path):
    """evaluate.py --generator given the adapter file, or a folder holding only it (the teacher + the adapter,
    merged in memory), draws the images the exported (merged) generator draws, within one 8-bit level."""
    import evaluate
    import numpy
    from PIL import Image
    from transformers import CLIPImageProcessor
    out = lora_run("tiny")
    generator, only = os.path.join(out, "generator"), tmp_path / "adapter_only"
    only.mkdir()
    shutil.copy(os.path.join(generator, plumbing.LORA_FILE), only)
    clip = shutil.copytree(os.path.join(out, "tiny", "clip"), tmp_path / "clip")  # + a processor: the CLIP scorer's
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16).save_pretrained(clip)
    result = evaluate.main(["--pretrained_model_name_or_path", os.path.join(out, "tiny", "sd"),
                            "--generator", generator, "--generator", os.path.join(generator, plumbing.LORA_FILE),
                            "--generator", str(only),
                            "--max_prompts", "2", "--images_per_prompt", "1", "--metrics", "clip", "--clip_model",
                            str(clip), "--output_dir", str(tmp_path / "eval")])
    png = lambda r: torch.from_numpy(numpy.array(Image.open(tmp_path / "eval" / r["image"]))).int()
    merged, *adapters = result["models"]
    assert len(adapters) == 2 and {m["generator_timestep"] for m in result["models"]} == {999}
    for model in adapters:
        for r, mine in zip(model["records"], merged["records"]):
            assert (png(r) - png(mine)).abs().max() <= 1, model["source"]
