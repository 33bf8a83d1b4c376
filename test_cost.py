"""Tests for cost.py: the FLOP counter against hand counts, and iteration_flops against the parts that Alg. 1 is
made of, each counted on its own. CPU, offline, no weights (the meta device).

Run: pytest -q test_cost.py
"""
import contextlib
import functools
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the model hub

import pytest
import torch
import torch.nn.functional as F

import cost
import dipp
import plumbing

META, CPU = torch.device("meta"), torch.device("cpu")  # counts agree on both (the first tests); CPU is ~3× faster


def test_counter_matches_a_hand_count():
    """Conv2d → Linear, forward and backward, against the textbook counts: a conv is 2·Cin·Cout·k²·Hout·Wout·B,
    a matmul 2·m·n·k, a backward pass 2× its forward (input and weight gradients) and 1× where the input needs no
    gradient. Attention is 4·B·h·Lq·Lk·d forward and twice that backward, on the meta device and on the CPU alike
    (torch's own table gives the CPU's attention kernel 0)."""
    B, Cin, Cout, k, H, out = 2, 3, 5, 3, 8, 7
    conv, lin = torch.nn.Conv2d(Cin, Cout, k, padding=1), torch.nn.Linear(Cout * H * H, out)
    x = torch.randn(B, Cin, H, H)
    conv_fwd, lin_fwd = 2 * Cin * Cout * k * k * H * H * B, 2 * B * (Cout * H * H) * out  # Hout = Wout = H
    net = lambda x: lin(conv(x).flatten(1))
    assert cost.count_flops(lambda: net(x)) == conv_fwd + lin_fwd
    assert cost.count_flops(lambda: net(x).sum().backward()) == 3 * lin_fwd + 2 * conv_fwd  # x needs no gradient
    x.requires_grad_(True)
    assert cost.count_flops(lambda: net(x).sum().backward()) == 3 * (conv_fwd + lin_fwd)
    h, Lq, Lk, d = 4, 6, 10, 8  # cross-attention: Lq ≠ Lk
    for device in ("meta", "cpu"):
        q = torch.randn(B, h, Lq, d, device=device, requires_grad=True)
        kv = torch.randn(B, h, Lk, d, device=device, requires_grad=True)
        assert cost.count_flops(lambda: F.scaled_dot_product_attention(q, kv, kv)) == 4 * B * h * Lq * Lk * d
        assert cost.count_flops(lambda: F.scaled_dot_product_attention(q, kv, kv).sum().backward()) == \
            3 * 4 * B * h * Lq * Lk * d, device


@functools.lru_cache(maxsize=None)
def iteration(**switches):
    return cost.iteration_flops("tiny", batch=2, device=CPU, **switches)


@functools.lru_cache(maxsize=None)
def parts(**switches):
    """The passes one DI++ iteration is made of, each counted alone on the tiny shapes at batch 2, by calling the
    networks directly (not through dipp's losses or dipp_step)."""
    cfg = dipp.Config(reward="none", **switches)
    m = cost.meta_models("tiny", cfg, CPU)
    cond, z = m["text"](["a", "b"]), torch.zeros(2, 4, 8, 8)
    t = torch.full((2,), 500)
    unet = lambda net, x: net(x, t, encoder_hidden_states=cond).sample
    no_grad = lambda fn: (lambda: torch.no_grad()(fn)())
    count = cost.count_flops
    return dict(text=count(lambda: m["text"](["a", "b"])),
                G_forward=count(no_grad(lambda: m["G"](z, cond))),
                G_forward_backward=count(lambda: m["G"](z, cond).sum().backward()),
                teacher=count(no_grad(lambda: unet(m["teacher"], z))),  # at batch B
                fake_forward=count(no_grad(lambda: unet(m["fake"], z))),
                fake_update=count(lambda: unet(m["fake"], z).sum().backward()))  # x_t needs no gradient


def test_iteration_is_alg1_made_of_its_parts():
    """On the meta device and the CPU one iteration counts the same. One iteration (no reward) = the text
    encoding + K_TA × (a generator forward without gradient + a fake-score forward and backward) + the generator
    update: generator forward and backward, the teacher on cond and uncond (2× batch under CFG), a fake-score
    forward. --fake_steps_per_G 2 adds exactly one fake update; --reuse_generator_sample saves exactly one
    generator forward; ω = 1 saves exactly one teacher pass."""
    p = parts()
    assert cost.iteration_flops("tiny", batch=2, reward="none") == iteration(reward="none", guidance_scale=1.75)
    assert iteration(reward="none", guidance_scale=1.75) == (
        p["text"] + (p["G_forward"] + p["fake_update"]) + p["G_forward_backward"] + 2 * p["teacher"]
        + p["fake_forward"])
    assert iteration(reward="none", guidance_scale=1.0, fake_steps_per_G=2, reuse_generator_sample=True) == (
        p["text"] + (p["G_forward"] + 2 * p["fake_update"]) + p["G_forward_backward"] + p["teacher"]
        + p["fake_forward"])


def test_lora_and_checkpointing_change_what_they_should():
    """LoRA computes no weight gradients of the frozen base (fewer FLOPs than full fine-tuning, more than the
    forward passes alone); gradient checkpointing adds exactly what it recomputes in the generator's and the fake
    score's backward, which is more than 0 and at most one forward each."""
    full, p = iteration(reward="none", guidance_scale=1.75), parts()
    lora = iteration(reward="none", guidance_scale=1.75, lora_rank=4)
    forwards = p["text"] + 2 * p["G_forward"] + 3 * p["fake_forward"] + 2 * p["teacher"]  # no backward at all
    assert forwards < lora < full
    checkpointed, q = iteration(reward="none", guidance_scale=1.75, gradient_checkpointing=True), \
        parts(gradient_checkpointing=True)
    recomputed = [q[k] - p[k] for k in ("G_forward_backward", "fake_update")]
    assert checkpointed - full == sum(recomputed)
    assert 0 < recomputed[0] <= p["G_forward"] and 0 < recomputed[1] <= p["fake_forward"]


def test_reward_path_costs_a_decode_and_a_reward_forward_and_backward():
    """--reward clip adds the decoder and the reward model, forward and backward, to the generator update, and
    nothing else (the prompt's CLIP text features are cached per run); --reward_decoder tiny decodes with TAESD
    instead, which is cheaper than the VAE's decoder."""
    base = iteration(reward="none", guidance_scale=1.75)
    m = cost.meta_models("tiny", dipp.Config(reward="clip"), CPU)
    cost.warm_text_caches(m["reward"], ["a", "b"])
    x0 = torch.zeros(2, 4, 8, 8, requires_grad=True)
    path = cost.count_flops(lambda: m["reward"](dipp.decode(m["vae"], x0), ["a", "b"]).sum().backward())
    assert iteration(reward="clip", guidance_scale=1.75) - base == path > 0
    assert base < iteration(reward="clip", guidance_scale=1.75, reward_decoder="tiny") < base + path


def test_a_mix_costs_each_reward_once_and_one_decode():
    """--reward "clip=1,aesthetic=0.5" costs what --reward clip costs plus the aesthetic predictor (its real CLIP
    ViT-L/14 and head) forward and backward on the decoded images, counted alone: the decoder runs once for both."""
    meta = lambda **s: cost.iteration_flops("tiny", batch=2, guidance_scale=1.75, **s)
    head = cost.meta_reward("aesthetic", None)
    x = torch.zeros(2, 3, 16, 16, device=cost.META, requires_grad=True)  # the tiny VAE's decoded images
    alone = cost.count_flops(lambda: head(x, ["a", "b"]).sum().backward())
    assert meta(reward="clip=1,aesthetic=0.5") - meta(reward="clip") == alone > 0


def test_sampling_is_text_steps_and_a_decode():
    """Sampling one image: with CFG the prompt and the empty prompt are encoded and every step runs the teacher on
    both (the parts above, counted at batch 2); a one-step generator encodes one prompt and runs once; both decode
    once."""
    p, m = parts(), cost.meta_models("tiny", dipp.Config(reward="none"), CPU)
    decode = cost.count_flops(lambda: torch.no_grad()(dipp.decode)(m["vae"], torch.zeros(1, 4, 8, 8)))
    assert cost.sample_flops("tiny", 3, guidance_scale=7.5) == p["text"] + 3 * p["teacher"] + decode
    assert cost.sample_flops("tiny", 1) == p["text"] // 2 + p["teacher"] // 2 + decode


def test_peak_table_and_estimate():
    """peak_tflops matches torch.cuda.get_device_name strings (the PCIe H100 is not the SXM one); the estimate is
    FLOPs ÷ (peak × utilisation); an unknown card or a CPU has no estimate."""
    assert plumbing.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert plumbing.peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert plumbing.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert plumbing.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert plumbing.peak_tflops("NVIDIA L40S") == 362.05 and plumbing.peak_tflops("NVIDIA L40") == 181.05
    assert plumbing.peak_tflops("NVIDIA L4") == 121.0
    assert plumbing.peak_tflops("cpu") is None and cost.estimate_seconds(1e15, "cpu") is None
    assert cost.estimate_seconds(989.4e12, "NVIDIA H100 80GB HBM3", utilisation=0.5) == pytest.approx(2.0)
    assert cost.UTILISATION == pytest.approx(8 * 13.5 / 0.78 / 989.4, abs=0.005)  # ECOSYSTEM.md's H100 figures


def test_bad_input_is_one_line():
    """An unknown architecture, a batch below 1, a utilisation of 0 (once silently replaced by the default), a
    negative step count, a misspelt flag, an unknown switch and a switch value dipp rejects are each one line
    naming the problem, before anything is built."""
    for call, words in ((lambda: cost.main(["--family", "sd14"]), ["unknown shapes 'sd14'", "sd15"]),
                        (lambda: cost.main(["--family", "tiny", "--batch", "0"]), ["--batch", "positive"]),
                        (lambda: cost.main(["--utilisation", "0"]), ["--utilisation 0.0", "0 < F <= 1"]),
                        (lambda: cost.main(["--sample_steps", "-1"]), ["--sample_steps -1", ">= 0"]),
                        (lambda: cost.main(["--familly", "sd15"]), ["unknown flag --familly", "--family"]),
                        (lambda: cost.iteration_flops("tiny", lora=4), ["unknown switch", "lora_rank"]),
                        (lambda: cost.iteration_flops("tiny", fake_steps_per_G=0), ["--fake_steps_per_G", "positive"])):
        with pytest.raises(SystemExit) as e:
            call()
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_prompts_encoded_at_start_up_cost_an_iteration_nothing(monkeypatch):
    """SDXL pre-encodes its prompts (its two CLIPs run once, at start-up), so its iteration holds no text encoding:
    encoding every step, as it did before, costs exactly one batch's encoding more."""
    import dataclasses
    import dipp
    import families
    once = cost.iteration_flops("tiny_sdxl", batch=1, reward="none")
    sdxl = families.FAMILIES["sdxl"]
    assert sdxl.pre_encode
    monkeypatch.setitem(families.FAMILIES, "sdxl", dataclasses.replace(sdxl, pre_encode=False))
    every_step = cost.iteration_flops("tiny_sdxl", batch=1, reward="none")
    m = cost.meta_models("tiny_sdxl", dipp.Config(reward="none"))
    text = cost.count_flops(lambda: m["text"](["prompt 0"]))
    assert text > 0 and every_step - once == text

# ----------------------------------------------------------------------------- memory: will it fit?

MiB_BLOCK = 512  # the CUDA caching allocator's rounding, which the counts follow


def on_card(numel, size):
    """Bytes the caching allocator gives a tensor of numel elements of `size` bytes: rounded up to 512."""
    return -(-numel * size // MiB_BLOCK) * MiB_BLOCK


def memory(shapes="tiny", **switches):
    """cost.iteration_memory of the tiny shapes without a reward, counted once per process for equal switches."""
    return counted_memory(shapes, tuple(sorted({"reward": "none", "guidance_scale": 1.75, **switches}.items())))


@functools.lru_cache(maxsize=None)
def counted_memory(shapes, switches, count=cost.iteration_memory):  # (count: the real one, whatever a test patches)
    return count(shapes, **dict(switches))


def test_tracker_holds_what_autograd_saves_and_sees_it_freed():
    """On meta tensors, by hand: a matmul's output that only autograd still holds (sin saves its input) stays
    counted; views are no new memory; the backward pass frees what it saved and leaves the weight's gradient."""
    n = 64
    b = n * n * 4
    x, w = torch.empty(n, n, device=META), torch.empty(n, n, device=META, requires_grad=True)
    with cost.MemoryTracker() as m:
        h = x @ w
        y = h.sin()
        del h  # SinBackward still holds it
        assert m.totals["activations"] == 2 * b
        v = y.t(), y.view(-1), y[:3]
        assert m.totals["activations"] == 2 * b
        y.sum().backward()
        assert w.grad is not None and m.totals["activations"] == 2 * b + on_card(1, 4) * 0  # y and w.grad: h freed
        assert m.peak >= 4 * b  # in the backward: h, y, cos(h) · grad, and the gradient being made
        del y, v
        assert m.totals["activations"] == b  # w.grad


def test_attention_is_counted_as_flash_keeps_it_and_autocast_as_cuda_does():
    """counting_memory: SDPA keeps its output and log-sum-exp, no L×L matrix (the meta device's math path, outside,
    keeps B·heads·L² probabilities). MetaAutocast: a linear computes in bf16, a layer norm in fp32, and each
    trainable fp32 weight is cast once per autocast block, however often it is used."""
    B, heads, L, d = 2, 4, 512, 16
    q = torch.empty(B, heads, L, d, device=META, requires_grad=True)
    with cost.counting_memory(None), cost.MemoryTracker() as m:
        out = F.scaled_dot_product_attention(q, q, q)
    assert m.totals["activations"] == on_card(B * heads * L * d, 4) + on_card(B * heads * L, 4)  # out + lse
    with cost.MemoryTracker() as m:
        out = F.scaled_dot_product_attention(q, q, q)
    assert m.totals["activations"] >= B * heads * L * L * 4
    lin, x = torch.nn.Linear(32, 32, device=META), torch.empty(8, 32, device=META)
    autocast = cost.MetaAutocast(torch.bfloat16)
    with autocast:
        y = lin(lin(x))
        assert y.dtype == torch.bfloat16 and F.layer_norm(y, (32,)).dtype == torch.float32
        assert len(autocast.cache) == 2  # weight and bias, cast once for both calls
        with autocast.off():
            assert lin(x).dtype == torch.float32
    assert not autocast.cache  # freed when the block ends, as torch.autocast frees its casts


def hand_count(shapes, dtype, lora_rank=0):
    """{"weights", "trainable"} bytes from the configs alone: the frozen teacher, VAE (fp32 under fp16) and SD's text
    encoder in `dtype`, and two trainable fp32 copies of the denoiser (or two rank-R adapters on its LoRA targets:
    A is R×in(×k×k), B is out×R), each tensor rounded as the allocator rounds it; the copies' buffers (position
    embeddings) are their own."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    arch, fam = cost.architecture(shapes)
    with torch.device(META):
        teacher = (PixArtTransformer2DModel(in_channels=4, out_channels=8, **arch["transformer"])
                   if fam.name == "pixart" else SD3Transformer2DModel(**arch["sd3"]) if fam.name == "sd3"
                   else UNet2DConditionModel(**arch["unet"]))
        vae = AutoencoderKL(**arch["vae"])
        text = CLIPTextModel(CLIPTextConfig(**arch["text"])) if fam.name == "sd" else None
    size = torch.empty(0, dtype=dtype).element_size()
    tensors = lambda net: [*net.parameters(), *net.buffers()]
    weights = sum(on_card(t.numel(), size if t.is_floating_point() else t.element_size())
                  for net in (teacher, text) if net is not None for t in tensors(net))
    weights += sum(on_card(t.numel(), 4 if dtype == torch.float16 else size) for t in tensors(vae))
    if not lora_rank:
        return dict(weights=weights + 2 * sum(on_card(t.numel(), 4) for t in teacher.buffers()),
                    trainable=2 * sum(on_card(p.numel(), 4) for p in teacher.parameters()))
    adapters = 0
    for name, layer in teacher.named_modules():
        if any(name == t or name.endswith("." + t) for t in fam.lora_targets):
            k = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, torch.nn.Conv2d) else 1
            fan_in, fan_out = (layer.in_channels, layer.out_channels) if k > 1 or isinstance(
                layer, torch.nn.Conv2d) else (layer.in_features, layer.out_features)
            adapters += on_card(lora_rank * fan_in * k, 4) + on_card(fan_out * lora_rank, 4)
    copies = 2 * sum(on_card(t.numel(), size) for t in teacher.buffers())  # (LoRA's copies share only parameters)
    return dict(weights=weights + copies, trainable=2 * adapters)


@pytest.mark.parametrize("shapes, switches, ranks", [
    ("tiny", dict(mixed_precision="bf16"), 1), ("tiny_pixart", dict(lora_rank=4, mixed_precision="bf16",
                                                                     ema_decay=0.999), 1),
    ("tiny_sdxl", dict(mixed_precision="fp16"), 2), ("tiny_sd3", dict(lora_rank=4, mixed_precision="bf16"), 1)])
def test_weights_gradients_and_adam_states_match_a_hand_count(shapes, switches, ranks):
    """What the count can know exactly, for every family: the frozen weights in their dtype, the trainable fp32
    masters, AdamW's two fp32 moments per trainable weight, the EMA's fp32 copy of the generator's, each FSDP2 rank
    holding 1/N of the trainable ones, and autocast's bf16 copies of the trainable weights that run in bf16 (the
    readout computes in fp32, norms take fp32); the gradients at the peak are at most one per trainable weight (none
    when the peak falls in a forward pass: SafeOptimizer frees each network's gradients after its step)."""
    dtype = cost.PRECISION[switches.get("mixed_precision", "no")]
    hand = hand_count(shapes, dtype, switches.get("lora_rank", 0))
    m = cost.iteration_memory(shapes, ranks=ranks, reward="none", **switches)
    shard = lambda n: -(-n // ranks)
    assert m["weights"] == hand["weights"]
    assert m["trainable"] == shard(hand["trainable"]) and m["optimizer"] == shard(2 * hand["trainable"])
    assert m["ema"] == (hand["trainable"] // 2 if switches.get("ema_decay") else 0)
    assert 0 <= m["gradients"] <= shard(hand["trainable"]) and m["activations"] > 0
    assert not cost.step_keeps_gradients()  # SafeOptimizer's step frees them, as the count (and docs/cost.md) assume
    assert m["total"] == sum(m[k] for k in cost.PARTS)
    if shapes == "tiny":  # at the peak (the generator update's forward) autocast holds a bf16 copy of every Linear and
        nets = cost.meta_models(shapes, dipp.Config(reward="none"), dtype=dtype)  # Conv2d of G and ψ but the readout
        copies = sum(on_card(p.numel(), 2) for net in (nets["G"].net, nets["fake"])
                     for name, layer in net.named_modules()
                     if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and name != "conv_out"
                     for p in layer.parameters(recurse=False))
        assert m["autocast_copies"] == copies


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing():
    """Saved activations are per sample: the batch-8 count is twice the batch-4 count (within 5 %: a few tensors do
    not grow with the batch) and batch 16 adds what batch 8 added, twice over (within 1 %); checkpointing the
    generator, the fake score and the VAE decoder keeps less than half of them. (From batch 4 up the tiny shapes'
    peak is in a forward pass; below it, in a backward pass, where the gradients outweigh the activations.)"""
    act = {b: memory(batch=b)["activations"] for b in (4, 8, 16)}
    assert act[8] == pytest.approx(2 * act[4], rel=0.05)
    assert act[16] - act[8] == pytest.approx(2 * (act[8] - act[4]), rel=0.01)
    checkpointed = memory(batch=8, gradient_checkpointing=True)
    assert checkpointed["activations"] < act[8] / 2
    static = ("weights", "trainable", "optimizer", "ema")  # (the gradients held depend on where the peak falls)
    assert {k: checkpointed[k] for k in static} == {k: memory(batch=8)[k] for k in static}


def test_fit_names_the_first_switches_that_fit_from_cached_counts(tmp_path, monkeypatch):
    """cost.fit: a run whose count (+ headroom) is over the free memory gets the first of FIT_STEPS, taken in
    order, that fits (tiny shapes at batch 2: --gradient_checkpointing); where nothing fits, no switches. Each count
    is cached on disk: asked again, fit counts nothing."""
    monkeypatch.setenv("DIPP_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(cost, "iteration_memory", lambda shapes, batch, ranks, **sw: calls.append(sw) or memory(
        shapes, batch=batch, **sw))
    base, checkpointed = memory(batch=2)["total"], memory(batch=2, gradient_checkpointing=True)["total"]
    free = checkpointed * (1 + cost.HEADROOM[0]) + cost.HEADROOM[1]
    assert not cost.fits(base, free) and cost.fits(checkpointed, free)
    verdict = cost.fit("tiny", 2, free, reward="none", guidance_scale=1.75)
    assert verdict == dict(need=base, fits=False, flags=["--gradient_checkpointing"], then=checkpointed)
    assert len(calls) == 2
    monkeypatch.setattr(cost, "iteration_memory", None)  # from the cache alone now
    assert cost.fit("tiny", 2, free, reward="none", guidance_scale=1.75) == verdict
    assert cost.fit("tiny", 2, 2 ** 40, reward="none", guidance_scale=1.75)["fits"]


def test_dipp_stops_in_one_line_before_loading_where_the_card_is_too_small(tmp_path, monkeypatch):
    """plumbing.check_memory (dipp.main, before anything is loaded): on a CPU it does nothing (no count, no family
    look-up); on a CUDA card with too little free memory it asks `python cost.py --fit` (a process: cost.py imports
    dipp) and stops with one line naming the need, the card and the switches that fit; --ignore_memory_check
    skips it. The counts here are stand-ins, written to the cache that the cost.py process reads."""
    import subprocess
    cfg = dipp.Config(random_weights="sd15", train_batch_size=2, reward="none")
    monkeypatch.setattr(subprocess, "run", None)
    assert plumbing.check_memory(cfg, CPU, family=None) is None
    monkeypatch.undo()
    monkeypatch.setenv("DIPP_CACHE", str(tmp_path))
    GiB = 2 ** 30
    fake = lambda shapes, batch, ranks, **sw: dict({k: 0 for k in cost.PARTS}, activations=(
        20 if sw.get("gradient_checkpointing") else 40) * GiB)
    monkeypatch.setattr(cost, "iteration_memory", fake)
    free = 30 * GiB
    with contextlib.redirect_stdout(io.StringIO()):
        cost.main(plumbing.fit_flags(cfg, "sd15", free))  # fills the cache that the process below reads
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")
    with pytest.raises(SystemExit) as e:
        plumbing.check_memory(cfg, torch.device("cuda"), family=lambda: "sd")
    message = str(e.value)
    assert "\n" not in message and "needs ~40.0 GiB" in message and "Test GPU has 30.0 GiB free" in message
    assert "fits with --gradient_checkpointing (~20.0 GiB)" in message and "--ignore_memory_check" in message
    cfg.ignore_memory_check = True
    assert plumbing.check_memory(cfg, torch.device("cuda"), family=lambda: "sd") is None


def test_memory_column_and_what_adds_no_memory(tmp_path, monkeypatch, capsys):
    """`python cost.py` prints each setup's peak beside its FLOPs (the counts above, cached on disk); a second
    fake-score update per iteration (K_TA = 2) adds FLOPs and, to the peak, only its noise draw (each update frees its
    graph before the next), so the which-card table counts K_TA = 1. Its recipes are reproduce.py's."""
    import reproduce
    monkeypatch.setenv("DIPP_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "iteration_memory", lambda shapes, batch, ranks, **sw: memory(shapes, batch=batch, **sw))
    cost.main(["--family", "tiny", "--batch", "2", "--setups", "full", "--reward", "none"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    m = memory(batch=2)
    assert row.endswith(f" {m['total'] / cost.GiB:.1f} | {m['weights'] / cost.GiB:.1f} + {m['trainable'] / cost.GiB:.1f}"
                        f" + {m['gradients'] / cost.GiB:.1f} + {m['optimizer'] / cost.GiB:.1f} + 0.0 = "
                        f"{(m['total'] - m['activations']) / cost.GiB:.1f} / {m['activations'] / cost.GiB:.1f} |"), row
    one_draw = 2 * on_card(2 * 4 * 8 * 8, 4) + on_card(2, 8)  # z and ε (B, 4, 8, 8) fp32, t (B,) int64
    assert memory(batch=2, fake_steps_per_G=2)["total"] == m["total"] + one_draw  # dipp draws every update's up front
    for recipe in reproduce.RECIPES.values():
        assert cost.RECIPE_RUNS[recipe.shapes] == (int(reproduce.flag(recipe.train, "--train_batch_size")),
                                                   float(reproduce.flag(recipe.train, "--guidance_scale")))
        assert reproduce.flag(recipe.train, "--mixed_precision") == "bf16"


def test_watched_rewards_add_their_weights():
    """--watch_rewards models are held for validation: their weights (the aesthetic predictor: CLIP ViT-L/14 and
    its head, fp32 here) add to the weights, every tensor rounded as the allocator rounds it, and nothing else."""
    base, watched = memory(batch=1), memory(batch=1, watch_rewards="aesthetic")
    fn = cost.meta_reward("aesthetic", cost.architecture("tiny")[0])
    tensors = [t for net in (fn.clip.model, fn.head) for t in [*net.parameters(), *net.buffers()]]
    assert watched["weights"] - base["weights"] == sum(on_card(t.numel(), t.element_size()) for t in tensors) > 1e9
    assert {k: v for k, v in watched.items() if k not in ("weights", "total")} == \
        {k: v for k, v in base.items() if k not in ("weights", "total")}
