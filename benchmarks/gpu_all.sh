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
status=$?
# QLoRA at the Llama-3-8B shape (1x2048 tokens, nf4 double quant, bf16 compute, gradient
# checkpointing): ours against PEFT + bitsandbytes. The device has no bitsandbytes: carry its wheel
# (see benchmarks/README.md: pip download into .whl/, run with carry [".whl"]).
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && PYTHONPATH="/tmp/site:${PYTHONPATH:-}" python3 -W ignore benchmarks/qlora.py --size 8b --variants qlora,peft_qlora --steps 5
else
  echo "QLoRA rows skipped: no .whl/bitsandbytes-*.whl carried"
fi
exit $status
