#!/usr/bin/env bash
# The one GPU call: 1b and 8b step tables (all variants, compiled one included), merge timing at 8b,
# one-linear timing, the Lightning row, and the bf16 correctness check. About 4-5 minutes on one
# H200 (PyTorch 2.11, transformers 5.17, peft, lightning; no hydra/omegaconf/wandb needed).
#
#   bash benchmarks/gpu_all.sh            # results also land in $OUT/bench.txt and $OUT/bench.jsonl
#
# Exit status: 1 when the bf16 check fails, otherwise 0 (a variant that fails, e.g. out of memory,
# prints its error in its row and the rest still run). Anything still to start after BUDGET_S
# seconds is skipped and marked so, to keep the call inside the device lease.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv || true
python3 -W ignore benchmarks/step.py --size all-gpu --budget-s "${BUDGET_S:-270}" "$@"
