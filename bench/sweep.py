"""Every benchmark configuration in one process: {full, checkpointing, LoRA r=64 + checkpointing}
× batch {1, 4, 8}, on SD1.5-shaped random weights (no download), bf16 autocast. Prints one line per
configuration and writes results.jsonl and table.md to --out.

    python bench/sweep.py --out bench_out            # on a GPU (the numbers README reports)
    python bench/sweep.py --tiny --out /tmp/bench    # the same sweep on tiny models (CPU smoke test)
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dipp  # noqa: E402

SETUPS = {"full": [], "checkpointing": ["--gradient_checkpointing"],
          "lora64+checkpointing": ["--lora_rank", "64", "--gradient_checkpointing"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of SD1.5 shapes")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=6, help="iterations per configuration (the first 2 are warm-up)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    shapes = ["--tiny"] if args.tiny else ["--random_sd15", "--mixed_precision", "bf16"]
    rows = []
    for name, flags in SETUPS.items():
        for batch in args.batches:
            argv = shapes + flags + ["--benchmark", "--max_train_steps", str(args.steps), "--train_batch_size",
                                     str(batch), "--output_dir", os.path.join(args.out, "models")]
            try:
                result = dipp.main(argv)["benchmark"]
            except torch.cuda.OutOfMemoryError:
                result = {"images_per_s": None, "peak_memory_gib": "OOM", "batch": batch}
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            result.update(setup=name, command="python dipp.py " + " ".join(argv))
            rows.append(result)
            print(json.dumps(result), flush=True)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("| setup | batch | images/s | s/generator update | s/fake update | peak GiB | device |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['setup']} | {r['batch']} | {r.get('images_per_s')} | {r.get('s_per_generator_update')} | "
                    f"{r.get('s_per_fake_update')} | {r['peak_memory_gib']} | {r.get('device')} |\n")
    print(open(os.path.join(args.out, "table.md")).read())
    return rows


if __name__ == "__main__":
    main()
