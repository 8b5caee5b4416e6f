#!/usr/bin/env bash
# The one GPU call: 1b and 8b step tables (LoRA and DoRA against the floor and PEFT), the bf16
# check, merge/layer timing, the Lightning row; then, when the bitsandbytes wheel is carried,
# Lightning's BitsandbytesPrecision test, every QLoRA test on the device's own CPU (bitsandbytes
# picks CPU kernels by CPU features: the 16-core host is another CPU than CI's), and QLoRA at the
# Llama-3-8B shape against PEFT + bitsandbytes (the model's own loss and the chunked one), and the
# longest sequence each fits in a 24 GiB budget. About 8-9 minutes on one H200 (PyTorch 2.11, transformers, peft,
# lightning; no hydra/omegaconf/wandb needed).
#
#   bash benchmarks/gpu_all.sh            # everything also lands in $OUT/gpu_all.log and $OUT/bench.jsonl
#
# Exit status: 1 when the bf16 check or the GPU test fails, otherwise 0 (a variant that fails, e.g.
# out of memory, prints its error in its row and the rest still run). Step variants still to start
# after BUDGET_S seconds are skipped and marked so, to keep the call inside the device lease.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv || true
python3 -W ignore benchmarks/step.py --size all-gpu --budget-s "${BUDGET_S:-200}" \
  --variants "${VARIANTS:-floor,peft,lora,dora,peft_dora}" "$@"
status=$?
# MoE expert banks (issue 22): 8 of Qwen3-30B-A3B's 48 layers, bf16, 4x2048 tokens: floor, ours, PEFT.
python3 -W ignore benchmarks/moe.py --sizes gpu-30b-a3b --variants floor,ours,peft --steps 3 --no-check
# The device has no bitsandbytes: carry its wheel (benchmarks/README.md: pip download into .whl/,
# run with carry [".whl"]).
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1 \
  && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
  export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}"
  # Lightning's BitsandbytesPrecision (CUDA-only) with LoRACallback, in either order of setup.
  python3 -m pytest -q -m cuda -p no:cacheprovider tests/kinds/test_bnb.py || status=1
  # The same file on the host CPU (its features first): the AVX512-BF16 / AMX paths of bitsandbytes.
  echo "host CPU features: $(grep -o -w 'avx2\|avx512f\|avx512_bf16\|amx_bf16\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  CUDA_VISIBLE_DEVICES= python3 -m pytest -q -p no:cacheprovider tests/kinds/test_bnb.py || status=1
  # QLoRA at the Llama-3-8B shape (1x2048 tokens, nf4 double quant, bf16 compute, gradient
  # checkpointing): ours against PEFT + bitsandbytes.
  python3 -W ignore benchmarks/qlora.py --size 8b --variants qlora,qlora_chunked,peft_qlora,lora_bf16 --steps 5 --cache /tmp
  # QLoRA on the MoE (issue 23): the whole Qwen3-30B-A3B shape, nf4 double quant, bf16, checkpointing, 1x2048.
  python3 -W ignore benchmarks/moe.py --sizes gpu-30b-a3b-4bit --variants qlora,peft_qlora --steps 3 --no-check
  # The longest sequence one step fits in 24 GiB: ours with the chunked loss, without, PEFT + bitsandbytes.
  python3 -W ignore benchmarks/context.py --size 8b --budget-gib 24 --cache /tmp
else
  echo "QLoRA rows skipped: no .whl/bitsandbytes-*.whl carried"
fi
exit $status
