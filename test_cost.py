"""Tests for cost.py: the FLOP counter against hand counts, and iteration_flops against the parts that Alg. 1 is
made of, each counted on its own. CPU, offline, no weights (the meta device).

Run: pytest -q test_cost.py
"""
import functools
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
