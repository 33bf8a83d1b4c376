"""Benchmark configurations in one process, on SD1.5- or PixArt-α-512-shaped random weights (no download), bf16
autocast. Each configuration is `python dipp.py --random_weights sd15|pixart512|sdxl --benchmark ...` with the setup's flags; one line
per configuration is printed and appended to results.jsonl, and table.md is rewritten after each, so a
run cut short by a time limit still leaves every finished figure behind.

    python bench/sweep.py --out bench_out                       # the memory table: 3 setups × batch 1/4/8
    python bench/sweep.py --out bench_out --setups speed --batches 8   # eager vs the speed switches
    python bench/sweep.py --tiny --out /tmp/bench               # the same on tiny models (CPU smoke test)
    python bench/sweep.py --family pixart --out bench_pixart    # PixArt-α 512 px (T5 encodes once, then is freed)
    python bench/sweep.py --family sdxl --out bench_sdxl --setups lora64+checkpointing   # SDXL 1024 px
"""
import argparse
import json
import os
import sys
import time

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dipp  # noqa: E402

SETUPS = {  # name -> dipp flags. "table" and "speed" below name the groups docs/training.md reports.
    "full": [],
    "checkpointing": ["--gradient_checkpointing"],
    "lora64+checkpointing": ["--lora_rank", "64", "--gradient_checkpointing"],
    "full+reuse": ["--reuse_generator_sample"],
    "full+compile": ["--compile", "default"],
    "full+compile+reuse": ["--compile", "default", "--reuse_generator_sample"],
    "full+compile-cudagraphs+reuse": ["--compile", "reduce-overhead", "--reuse_generator_sample"],
    "full+tinydecoder": ["--reward_decoder", "tiny"],
    "full+compile+reuse+tinydecoder": ["--compile", "default", "--reuse_generator_sample", "--reward_decoder", "tiny"],
}
GROUPS = {"table": ["full", "checkpointing", "lora64+checkpointing"],
          "speed": ["full", "full+reuse", "full+tinydecoder", "full+compile", "full+compile+reuse",
                    "full+compile+reuse+tinydecoder", "full+compile-cudagraphs+reuse"]}


def write_table(rows, out):
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("| setup | batch | images/s | s/generator update | s/fake update | peak GiB | estimated GiB | warm-up s | "
                "TFLOP/s | of peak | device |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['setup']} | {r['batch']} | {r.get('images_per_s')} | {r.get('s_per_generator_update')} | "
                    f"{r.get('s_per_fake_update')} | {r.get('peak_memory_gib') or str(r.get('error'))[:80].replace('|', '/')} | "
                    f"{r.get('estimated_peak_gib', '—')} | {r.get('warmup_s')} | "
                    f"{r.get('achieved_tflop_per_s')} | {r.get('fraction_of_peak')} | {r.get('device')} |\n")


def estimated(argv):
    """cost.py's count of the same run's peak memory (what dipp.py checks before it starts), beside the measurement."""
    import cost
    cfg = dipp.parse_config(argv)
    switches = {k: getattr(cfg, k) for k in cost.SWITCHES + cost.MEMORY_SWITCHES}
    m = cost.memory(cfg.random_weights, cfg.train_batch_size, **switches)
    return {"estimated_peak_gib": round(m["total"] / 2 ** 30, 2),
            "estimated_parts_gib": {k: round(m[k] / 2 ** 30, 2) for k in cost.PARTS}}


def profiled(argv, path):
    """dipp.main under torch.profiler: which kernels the iterations spend their time in (loading the
    weights shows up as CPU time only). The table is sorted by device time on a GPU."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        result = dipp.main(argv)["benchmark"]
    with open(path, "w") as f:
        f.write("python dipp.py " + " ".join(argv) + "\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="results.jsonl and table.md go here")
    p.add_argument("--models", default="", help="where the random weights are written once (default: OUT/models)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of full-size shapes")
    p.add_argument("--family", choices=("sd", "pixart", "sdxl"), default="sd",
                   help="SD1.5 (UNet), PixArt-α 512 px (DiT) or SDXL 1024 px (UNet) shapes")
    p.add_argument("--setups", nargs="+", default=["table"], help=f"setup names or groups: {list(SETUPS)}, {list(GROUPS)}")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=6, help="iterations per configuration (the first 2 are warm-up)")
    p.add_argument("--budget_s", type=float, default=0, help="start no new configuration after this many seconds (0 = no limit)")
    p.add_argument("--estimate", action="store_true", help="after the runs, count each one's peak memory on the meta "
                   "device (cost.memory: up to a minute of CPU each, cached) beside the measured "
                   "torch.cuda.max_memory_allocated (OUT/estimates.jsonl, table.md)")
    p.add_argument("--profile", action="store_true", help="also write OUT/profile_SETUP_bBATCH.txt: torch.profiler's "
                   "top 30 kernels by device time over the run (by CPU time without a GPU)")
    args = p.parse_args(argv)
    names = [n for s in args.setups for n in GROUPS.get(s, [s])]
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        p.error(f"unknown setup(s) {unknown}; choose from {list(SETUPS)} or {list(GROUPS)}")
    os.makedirs(args.out, exist_ok=True)
    shapes = ["--random_weights", {("sd", True): "tiny", ("sd", False): "sd15", ("pixart", True): "tiny_pixart",
                                   ("pixart", False): "pixart512", ("sdxl", True): "tiny_sdxl",
                                   ("sdxl", False): "sdxl"}[args.family, args.tiny]]
    shapes += [] if args.tiny else ["--mixed_precision", "bf16"]
    rows, start = [], time.time()
    for name in names:
        for batch in args.batches:
            if args.budget_s and time.time() - start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: skipping {name} at batch {batch}", flush=True)
                continue
            argv = shapes + SETUPS[name] + ["--benchmark", "--max_train_steps", str(args.steps), "--train_batch_size",
                                            str(batch), "--output_dir", args.models or os.path.join(args.out, "models"),
                                            "--ignore_memory_check"]  # (the estimate, if asked, is recorded instead)
            t0 = time.time()
            try:
                if args.profile:
                    result = profiled(argv, os.path.join(args.out, f"profile_{name}_b{batch}.txt"))
                else:
                    result = dipp.main(argv)["benchmark"]
            except torch.cuda.OutOfMemoryError:
                result = {"peak_memory_gib": "OOM"}
            except Exception as e:  # one failing switch (say, CUDA graphs) must not lose the other figures
                result = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            torch._dynamo.reset()  # compiled graphs of one configuration must not count towards the next
            result.update(setup=name, batch=batch, wall_s=round(time.time() - t0, 1), argv=argv,
                          command="python dipp.py " + " ".join(argv))
            rows.append(result)
            print(json.dumps(result), flush=True)
            with open(os.path.join(args.out, "results.jsonl"), "a") as f:
                f.write(json.dumps(result) + "\n")
            write_table(rows, args.out)
    if args.estimate:  # after every measurement (a count is CPU time: it must not eat the GPU's budget first)
        for r in rows:
            r.update(estimated(r["argv"]))
            with open(os.path.join(args.out, "estimates.jsonl"), "a") as f:
                f.write(json.dumps({k: r[k] for k in ("setup", "batch", "peak_memory_gib", "estimated_peak_gib",
                                                      "estimated_parts_gib") if k in r}) + "\n")
            write_table(rows, args.out)
    print(open(os.path.join(args.out, "table.md")).read())
    return rows


if __name__ == "__main__":
    main()
