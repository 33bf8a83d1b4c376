"""plumbing: what keeps a dipp run alive, and none of what DI++ is.

`dipp.py` holds the method (generator, teacher with CFG, fake score, reward, IKL loss, Alg. 1); this
module holds the machinery around it: one-line errors, devices and processes (torchrun), the optimiser
step with its numerical guards, trainable-parameter bookkeeping and EMA, LoRA adapters on a shared base,
gradient checkpointing of reward towers, torch.compile, checkpoints (save, list, keep-last-K, resume),
the exported generator folder, sample-grid PNGs and the benchmark report.

It never imports dipp (dipp imports it): everything it needs is passed in, e.g. the config, the
generator module (anything with `.unet` and `.t_star`), the optimisers.
"""
import contextlib
import json
import os
import re
import shutil

import torch

# -----------------------------------------------------------------------------
# 1. One-line errors and loading


def die(message):
    """One clear line instead of a traceback: what is wrong and how to fix it."""
    raise SystemExit(f"dipp: error: {message}")


def load_or_die(fn, name, what):
    """Call a from_pretrained-style loader; turn 'not found / offline / wrong path' into one line."""
    if name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        die(f"cannot load {what}: the path '{name}' does not exist")
    try:
        return fn()
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        die(f"cannot load {what} from '{name}' ({first[:200]}). On a machine with internet run "
            f"`huggingface-cli download {name}` (then it loads from the cache), or pass a local folder")

# -----------------------------------------------------------------------------
# 2. Devices and processes


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def init_distributed(cfg):
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: one process per GPU (NCCL), or per CPU process
    (gloo). Returns (rank, world_size, device). A plain `python dipp.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, pick_device(cfg.device)
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, device

# -----------------------------------------------------------------------------
# 3. The optimiser step, trainable parameters, EMA


def optimizer_step(loss, params, opt, scaler, max_grad_norm):
    """backward + clip + step. A non-finite loss stops training before it can poison the weights."""
    bad = (~torch.isfinite(loss.detach())).float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)  # every rank stops together, or the others hang in backward
    if bad.item():
        raise FloatingPointError(f"loss became {loss.item()} (on at least one rank)")
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradient, not the fp16-scaled one
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(opt)
    scaler.update()


def trainable_named(module):
    """{name: parameter} of what training changes: the whole UNet, or only its LoRA adapter."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def trainable(module):
    return list(trainable_named(module).values())


def ema_update(ema, params, decay):
    """(optional) θ_ema ← d·θ_ema + (1 − d)·θ, for every trainable tensor."""
    for e, p in zip(ema, params):
        e.lerp_(p.detach(), 1 - decay)


@contextlib.contextmanager
def ema_weights(params, ema):
    """(optional) Inside the block the generator holds its EMA weights (a pointer swap, no copy), which
    sample grids and the export use when --ema_decay > 0. ema=None leaves the weights alone."""
    def swap():
        for p, e in zip(params, ema or []):
            p.data, e.data = e.data, p.data
    swap()
    try:
        yield
    finally:
        swap()

# -----------------------------------------------------------------------------
# 4. Memory and speed switches: LoRA on one shared base, checkpointed reward towers, torch.compile


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # DMD2's list


def lora_copy(base, rank, name):
    """(optional, --lora_rank) A UNet that *shares* base's frozen weights (deepcopy with a memo mapping every
    base parameter to itself) plus one trainable rank-R LoRA adapter. Teacher, generator and fake score then
    cost one base UNet; the teacher is the base itself. LoRA's B starts at 0, so the copy starts = teacher."""
    import copy
    from peft import LoraConfig
    unet = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name=name)
    for p in unet.parameters():
        if p.requires_grad:  # PEFT gives the adapter the base's (low) dtype; train it in fp32
            p.data = p.data.float()
    return unet


def checkpoint_blocks(blocks):
    """Gradient checkpointing for a frozen reward tower: each block's activations are recomputed in the
    backward pass instead of stored (BLIP's ViT has no switch; transformers' only acts in train mode)."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)


COMPILE_BACKEND = "inductor"  # the tests swap in "aot_eager": the same graph capture without the C++ build


def compile_nets(cfg, nets, device):
    """(optional, --compile MODE) torch.compile each network in place. Module.compile() keeps parameter
    names, so checkpoints, EMA, resume and export are unaffected, and the math is the same ops, fused.
    The first iterations compile (each net once per grad mode and batch shape; minutes for SD1.5)."""
    import torch._dynamo
    compilers = [os.environ.get("CXX"), "g++", "clang++"]  # what inductor's CPU code generation calls
    if device.type == "cpu" and COMPILE_BACKEND == "inductor" and not any(c and shutil.which(c) for c in compilers):
        die("--compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); install one or drop --compile")
    # teacher, generator and fake score share one UNet forward; give its graphs room before eager fallback
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for net in nets:
        net.compile(backend=COMPILE_BACKEND, mode=cfg.compile)

# -----------------------------------------------------------------------------
# 5. Checkpoints: checkpoint-N/{generator,fake_score[,generator_ema]}.safetensors + state.pt + dipp.json


def save_checkpoint(cfg, step, G, fake, opt_G, opt_fake, ema=None):
    """Write checkpoint-N atomically (to a .tmp folder, then rename): a kill mid-save never leaves a
    half-written checkpoint-N behind. Keeps the newest cfg.checkpoints_total_limit."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from safetensors.torch import save_file
    os.makedirs(tmp)
    weights = {"generator": trainable_named(G.unet), "fake_score": trainable_named(fake)}
    if ema is not None:
        weights["generator_ema"] = dict(zip(weights["generator"], ema))
    for name, tensors in weights.items():  # full UNets, or only their LoRA adapters
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(tmp, f"{name}.safetensors"))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"step": step, "opt_G": opt_G.state_dict(), "opt_fake": opt_fake.state_dict(), "rng": rng},
               os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "dipp.json"), "w") as f:
        json.dump({"generator_timestep": G.t_star}, f)
    if os.path.isdir(final):  # re-running into the same output_dir: swap the old one out, then drop it
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    if cfg.checkpoints_total_limit > 0:
        for old in list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit]:
            shutil.rmtree(old)


def list_checkpoints(output_dir):
    found = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(output_dir) else []
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def load_checkpoint(cfg, G, fake, opt_G, opt_fake, ema=None):
    """Restore weights, optimiser state, RNG and step from --resume_from_checkpoint. Returns the step.
    state.pt loads with weights_only=True: a checkpoint someone sends you cannot run code on load."""
    from safetensors.torch import load_file
    path = cfg.resume_from_checkpoint
    if path == "latest":
        found = list_checkpoints(cfg.output_dir)
        if not found:
            die(f"--resume_from_checkpoint latest: no checkpoint-N folder in {cfg.output_dir}")
        path = found[-1]
    if not os.path.isfile(os.path.join(path, "state.pt")):
        die(f"--resume_from_checkpoint '{path}' is not a dipp checkpoint folder (no state.pt)")
    for name, net in (("generator", G.unet), ("fake_score", fake)):
        weights = load_file(os.path.join(path, f"{name}.safetensors"))
        expected = set(trainable_named(net))
        if set(weights) != expected:
            die(f"checkpoint '{path}' does not match this model ({name}: {len(weights)} tensors saved, "
                f"{len(expected)} trainable here); resume with the --lora_rank it was trained with")
        net.load_state_dict(weights, strict=False)
    if ema is not None:
        ema_file = os.path.join(path, "generator_ema.safetensors")
        if not os.path.isfile(ema_file):
            die(f"checkpoint '{path}' has no EMA weights; resume without --ema_decay or from an EMA run")
        saved = load_file(ema_file)
        for k, e in zip(trainable_named(G.unet), ema):
            e.copy_(saved[k])
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    opt_G.load_state_dict(state["opt_G"])
    opt_fake.load_state_dict(state["opt_fake"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    print(f"resumed from {path} at step {state['step']}")
    return state["step"]

# -----------------------------------------------------------------------------
# 6. What a run leaves behind: the exported generator, sample grids, the benchmark line


def export_generator(G, folder):
    """The trained generator as a plain diffusers UNet folder (+ dipp.json with t*); a LoRA generator is
    merged into (a copy of) its base first, so any diffusers pipeline loads it without PEFT."""
    unet = G.unet
    if getattr(unet, "peft_config", None):  # set by add_adapter: this generator is a LoRA adapter
        import copy
        unet = copy.deepcopy(unet).to(torch.float32)  # a copy: fusing writes into the (shared) base weights
        unet.fuse_lora()
        unet.unload_lora()
    unet.save_pretrained(folder)
    with open(os.path.join(folder, "dipp.json"), "w") as f:
        json.dump({"generator_timestep": G.t_star}, f)
    print(f"generator saved to {folder}")


def save_grid(images, prompts, path):
    """Images in [-1, 1] side by side, each with its prompt underneath, as one PNG."""
    from PIL import Image, ImageDraw
    pics = [Image.fromarray(((im.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
            for im in images]
    w, h = max(256, pics[0].width), max(256, pics[0].height)
    grid = Image.new("RGB", (w * len(pics), h + 40), "white")
    for i, (pic, prompt) in enumerate(zip(pics, prompts)):
        grid.paste(pic.resize((w, h), Image.NEAREST), (i * w, 0))
        ImageDraw.Draw(grid).text((i * w + 4, h + 4), prompt[:40] + "\n" + prompt[40:80], fill="black")
    grid.save(path)


def print_benchmark(cfg, timings, world, device):
    """One machine-readable line: the mean over the iterations after the first two (warm-up, which is
    also when --compile compiles: warmup_s). With --reuse_generator_sample the shared generator forward
    counts in the fake-score update's time."""
    import resource
    warm = timings[2:] or timings
    fake_s, gen_s = (sum(t[i] for t in warm) / len(warm) for i in (0, 1))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
    result = {
        "images_per_s": round(world * cfg.train_batch_size / (fake_s + gen_s), 4),
        "warmup_s": round(sum(map(sum, timings[:2])), 2),
        "s_per_generator_update": round(gen_s, 5), "s_per_fake_update": round(fake_s / cfg.fake_steps_per_G, 5),
        "peak_memory_gib": round(peak / 2 ** 30, 3), "memory_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
        "batch": cfg.train_batch_size, "world": world, "iterations": len(warm), "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": cfg.gradient_checkpointing, "lora_rank": cfg.lora_rank, "compile": cfg.compile,
        "reuse_generator_sample": cfg.reuse_generator_sample,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print("BENCHMARK " + json.dumps(result))
    return result
