"""What one training step asks of the GPU, counted op by op on the meta device (no GPU, no memory).

Every ATen op of one forward + backward is intercepted (a ``TorchDispatchMode``) and charged its
floating-point operations (PyTorch's own ``flop_counter`` formulas) and the bytes it reads and
writes (its input and output tensors; views are free). From those a roofline estimate of the step:
each op takes ``max(flops / F, bytes / BW)`` plus a launch cost, with ``F`` and ``BW`` the H200's
bf16 dense peak and HBM bandwidth times the efficiencies given on the command line.

The rank-r GEMMs (a side of at most 64) get their own bandwidth efficiency: fitted to the one
measured H200 run (RESULTS.md), 0.65 reproduces LoRA's measured ratio to the floor at both
shapes with the one parameter. It is a model, not a measurement: it tells which variant moves
how many more bytes than the frozen floor and where (by op), and what a change should buy before
a GPU measures it. It runs on CPU in seconds:

    python benchmarks/traffic.py --size 1b
    python benchmarks/traffic.py --size 8b --variants floor,lora --by-op
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes
from shapes import RANK, SIZES, TARGETS

H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak
H200_BANDWIDTH = 4.8e12  # HBM3e, bytes/s
VARIANTS = ("floor", "lora", "lora_fa", "peft")
_FREE = {"aten.view", "aten._unsafe_view", "aten.detach", "aten.alias", "aten.t", "aten.expand", "aten.as_strided"}


@dataclass
class Tally:
    """Per-op totals of one counted region."""

    flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def total(self, what: str) -> float:
        return sum(getattr(self, what).values())


class Counter(TorchDispatchMode):
    """Charges every op its flops and the bytes of the tensors it reads and writes."""

    def __init__(self, flops_per_s: float, bytes_per_s: float, launch_s: float, thin_bytes_per_s: float) -> None:
        super().__init__()
        self.tally = Tally()
        self.flops_per_s, self.bytes_per_s, self.launch_s = flops_per_s, bytes_per_s, launch_s
        self.thin_bytes_per_s = thin_bytes_per_s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        if func.is_view or name in _FREE or name.startswith("aten.empty") or name == "aten.new_empty":
            return out
        flops = 0.0
        packet = torch.ops.aten.addmm if name == "aten.addmm_" else func.overloadpacket  # (same GEMM, in place)
        counter = flop_registry.get(packet)
        if counter is not None:
            flops = float(counter(*args, **kwargs, out_val=out))
        moved = 0
        for t in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > 1:  # (0-d and 1-element tensors: scalars)
                moved += t.numel() * t.element_size()
        self.tally.flops[name] += flops
        self.tally.bytes[name] += moved
        self.tally.calls[name] += 1
        bandwidth = self.thin_bytes_per_s if _thin_gemm(name, args) else self.bytes_per_s
        self.tally.seconds[name] += max(flops / self.flops_per_s, moved / bandwidth) + self.launch_s
        return out


def _thin_gemm(name: str, args: tuple) -> bool:
    """A matrix product with a side of at most 64 (the rank-r GEMMs): memory-bound, and cuBLAS
    reaches less of the bandwidth on them than on elementwise passes."""
    if name in ("aten.mm", "aten.bmm"):
        a, b = args[0], args[1]
    elif name in ("aten.addmm", "aten.addmm_"):
        a, b = args[1], args[2]
    else:
        return False
    return min(a.shape[-2], a.shape[-1], b.shape[-1]) <= 64


def flash_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Causal attention as one flash kernel, as SDPA runs it on the GPU.

    On the meta device SDPA would pick its math fallback, which materialises every attention
    matrix and would dwarf everything else counted here.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # (SDPA's enable_gqa reads the shared heads in place; the copy here is small)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def prepare(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    if variant == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
    from lora_lightning import LoRAConfig, inject_lora

    config = LoRAConfig(r=RANK, alpha=RANK, target_modules=TARGETS, freeze_A=variant == "lora_fa")
    inject_lora(model, config)
    return model


def count(
    variant: str, size: str, flops_per_s: float, bytes_per_s: float, launch_s: float, thin_bytes_per_s: float
) -> Tally:
    """One forward + backward of ``variant`` at ``size`` in bf16 on the meta device (after one uncounted one)."""
    from transformers import AttentionInterface, masking_utils

    # The one data-dependent check of a training forward (are position ids packed sequences?)
    # cannot read meta tensors; on real batches of one sequence per row its answer is "no".
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    AttentionInterface.register("traffic_flash", flash_attention)
    shape = SIZES[size]
    base = shapes.build_model(shape, torch.device("meta"), torch.bfloat16)
    base.config._attn_implementation = "traffic_flash"
    model = prepare(variant, base)
    ids = torch.zeros(shape.batch, shape.seq, dtype=torch.long, device="meta")

    def step() -> None:
        model.zero_grad(set_to_none=True)  # as a training loop does: gradients are written, not added
        model(input_ids=ids, labels=ids).loss.backward()

    step()  # warm-up: first-call allocations and lazy initialisation stay out of the counts
    counter = Counter(flops_per_s, bytes_per_s, launch_s, thin_bytes_per_s)
    with counter:
        step()
    return counter.tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", choices=["1b", "8b", "tiny"])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--gemm-efficiency", type=float, default=0.65, help="fraction of the bf16 peak GEMMs reach")
    parser.add_argument("--bandwidth-efficiency", type=float, default=0.80, help="fraction of HBM bandwidth reached")
    parser.add_argument("--launch-us", type=float, default=2.0, help="fixed cost per kernel, microseconds")
    parser.add_argument(
        "--thin-gemm-efficiency",
        type=float,
        default=0.65,
        help="fraction of HBM bandwidth GEMMs with a side <= 64 reach (fitted: with 0.65 the model gives "
        "the H200's measured one-by-one LoRA ratios at both shapes, see RESULTS.md)",
    )
    parser.add_argument("--by-op", action="store_true", help="also print each variant's ops beyond the floor's")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants got {unknown}; allowed: {', '.join(VARIANTS)}")

    flops_per_s = H200_BF16_FLOPS * args.gemm_efficiency
    bytes_per_s = H200_BANDWIDTH * args.bandwidth_efficiency
    thin = H200_BANDWIDTH * args.thin_gemm_efficiency
    tallies = {v: count(v, args.size, flops_per_s, bytes_per_s, args.launch_us * 1e-6, thin) for v in variants}
    shape = SIZES[args.size]
    print(f"== {args.size}: {shape.note}, {shape.tokens} tokens, bf16, forward + backward, counted on meta ==")
    print(
        f"model: H200 {H200_BF16_FLOPS / 1e12:.0f} TFLOP/s x {args.gemm_efficiency}, "
        f"{H200_BANDWIDTH / 1e12:.1f} TB/s x {args.bandwidth_efficiency} "
        f"(GEMMs with a side <= 64: x {args.thin_gemm_efficiency}), "
        f"{args.launch_us} us per kernel"
    )
    print(f"{'variant':<15} {'TFLOP':>8} {'GB moved':>9} {'kernels':>8} {'model ms':>9} {'x floor':>8}")
    floor = tallies.get("floor")
    for v, t in tallies.items():
        ratio = f"{t.total('seconds') / floor.total('seconds'):.3f}" if floor else "-"
        print(
            f"{v:<15} {t.total('flops') / 1e12:8.2f} {t.total('bytes') / 1e9:9.1f} {t.total('calls'):8d} "
            f"{t.total('seconds') * 1e3:9.1f} {ratio:>8}"
        )
    if args.by_op and floor:
        for v, t in tallies.items():
            if v == "floor":
                continue
            print(f"-- {v} minus floor, by op (GB moved, kernels, model ms) --")
            rows = []
            for name in set(t.bytes) | set(floor.bytes):
                extra = (
                    t.bytes.get(name, 0) - floor.bytes.get(name, 0),
                    t.calls.get(name, 0) - floor.calls.get(name, 0),
                    t.seconds.get(name, 0) - floor.seconds.get(name, 0),
                )
                if any(abs(e) > 0 for e in extra):
                    rows.append((name, *extra))
            for name, gb, calls, secs in sorted(rows, key=lambda r: -abs(r[3]))[:12]:
                print(f"   {name:<32} {gb / 1e9:+8.1f} {calls:+7d} {secs * 1e3:+8.2f}")


if __name__ == "__main__":
    main()
