#!/usr/bin/env bash
# The prepared GPU measurement: every figure README's memory-and-time table needs (docs/training.md), for a
# GPU machine that has python3 + torch + CUDA but perhaps not the other pinned packages and no internet.
#
#   bash bench/gpu.sh fetch          # on a machine with internet: wheels of the pinned packages -> .whl/
#   bash bench/gpu.sh speed OUT      # on the GPU: batch 8, eager vs --reuse_generator_sample, --reward_decoder tiny, --compile
#   bash bench/gpu.sh profile OUT    # on the GPU: one eager batch-8 run under torch.profiler -> OUT/profile_full_b8.txt
#   bash bench/gpu.sh table OUT      # on the GPU: full / checkpointing / LoRA-64 × batch 1, 4, 8: the measured peak
#                                    # (torch.cuda.max_memory_allocated) beside cost.py's count of it (estimated GiB,
#                                    # counted on the CPU after all runs: ~20-60 s each, OUT/estimates.jsonl)
#   bash bench/gpu.sh table OUT --tiny --batches 1   # extra arguments go to bench/sweep.py (a CPU dry run)
#   bash bench/gpu.sh table OUT --family pixart       # the same on PixArt-α-512-shaped random weights
#
# Both GPU modes install .whl/ (if present) into /tmp/site first, write SD1.5-shaped random weights once
# (~6 GB, no download) to $MODELS (default /tmp/dipp_models, kept apart from OUT so only results come
# back) and append each figure to OUT/results.jsonl as soon as it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: bash bench/gpu.sh fetch|speed|table|profile [OUT]}
out=${2:-bench_out}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-python3}
case "$mode" in fetch|speed|table|profile) ;; *) echo "unknown mode '$mode': use fetch, speed, table or profile" >&2; exit 2 ;; esac

if [ "$mode" = fetch ]; then  # the versions requirements.txt pins, for CPython 3.12 on x86-64 Linux
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.39.0 transformers==4.55.4 "tokenizers>=0.21,<0.22" "huggingface-hub>=0.34,<1.0" \
    peft==0.21.2 importlib-metadata
  exit 0
fi

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/card.txt" || true
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee -a "$out/card.txt"
case "$mode" in
  speed) $PY bench/sweep.py --out "$out" --models "${MODELS:-/tmp/dipp_models}" --setups speed --batches 8 --budget_s "${BUDGET_S:-480}" "$@" ;;
  profile) $PY bench/sweep.py --out "$out" --models "${MODELS:-/tmp/dipp_models}" --setups full --batches 8 --steps 4 --profile "$@" ;;
  table) $PY bench/sweep.py --out "$out" --models "${MODELS:-/tmp/dipp_models}" --setups table --batches 1 4 8 --budget_s "${BUDGET_S:-480}" --estimate "$@" ;;
esac
