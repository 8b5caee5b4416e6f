"""4-bit dequantization on this CPU: ours and bitsandbytes' against the float64 formula, and ours timed.

bitsandbytes picks its CPU ``dequantize_4bit`` kernel by CPU capability and shape. For each width
this prints how many elements each side gets wrong against ``code[q] * absmax`` in float64 (rounded
to the weight's dtype), then the time ours takes to dequantize a 1.1B-shape MLP projection.

    python benchmarks/dequant.py                 # bf16 weights, 1 and 2 threads
    python benchmarks/dequant.py --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lora_lightning.kinds.bnb import Linear4bitKind, dequantize_into
from lora_lightning.quantize import quantize_model


def formula(layer: nn.Module) -> torch.Tensor:
    """The weight from its definition, float64: code[q] * absmax of q's block."""
    import bitsandbytes as bnb

    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = bnb.functional.get_4bit_type(state.quant_type, device="cpu").double()
    data = layer.weight.data.view(torch.uint8).reshape(-1).long()
    q = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)
    n = state.shape[0] * state.shape[1]
    return (codes[q[:n]] * absmax.double().repeat_interleave(state.blocksize)[:n]).reshape(state.shape)


def main() -> None:
    import bitsandbytes as bnb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, bitsandbytes {bnb.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print("== elements off the float64 formula (bf16 weight, nf4), out of all ==")
    print(f"{'in x out':<12} {'bitsandbytes':>14} {'ours':>8}")
    torch.manual_seed(0)
    for cols in (64, 96, 128, 200, 2048):
        net = nn.Sequential(nn.Linear(cols, 64, dtype=torch.bfloat16))
        quantize_model(net, "nf4")
        layer = net[0]
        want = formula(layer).float().to(torch.bfloat16)
        theirs = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        ours = Linear4bitKind().dense_weight(layer)
        print(
            f"{f'{cols} x 64':<12} {int((theirs != want).sum()):>8} / {want.numel():<5} {int((ours != want).sum()):>3}"
        )
    print("== dequantize_into, 5632 x 2048 nf4 (the 1.1B shape's down projection) into bf16, ms ==")
    net = nn.Sequential(nn.Linear(5632, 2048, dtype=torch.bfloat16))
    quantize_model(net, "nf4")
    out = torch.empty(2048, 5632, dtype=torch.bfloat16)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(3):
            dequantize_into(net[0], out, torch.bfloat16)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            dequantize_into(net[0], out, torch.bfloat16)
            times.append((time.perf_counter() - start) * 1e3)
        print(f"threads {threads}: median {statistics.median(times):.2f} ms (min {min(times):.2f})")


if __name__ == "__main__":
    main()
