"""A fused experts module with its projections in 4 bits: the frozen base of QLoRA on a MoE model.

:class:`Experts4bit` takes the place of a transformers experts module (``Qwen3MoeExperts``, ...):
it keeps that module as ``inner`` (its activation, ``_apply_gate``, biases, post-expert norm and
layout flags) with the 3-D projection parameters removed, and holds each projection as a
:class:`~lora_lightning.kinds.bnb_experts.Bank4bit` in buffers. Its forward is the experts forward
of :class:`~lora_lightning.nn.experts.LoRAExperts` without adapters; each projection's GEMM
dequantizes one expert's weight at a time into a reused buffer, in the forward and again in the
backward (:class:`_Bank4bitGEMM`: nothing weight-sized is kept for backward), so the transient is
one expert's weight, never the bank.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lora_lightning.kinds.bnb_experts import Bank4bit, bank_bias, quantize_bank
from lora_lightning.kinds.experts import BANK, Layout
from lora_lightning.nn.experts import ExpertsForward
from lora_lightning.ops.grouped import grouped_mm
from lora_lightning.ops.lora_linear import scratch


class _Packed(nn.Module):
    """One projection's :class:`Bank4bit` as buffers, so ``.to(device)`` and ``state_dict`` follow.

    The float32 scales are kept as their bytes (uint8 views): ``model.to(torch.bfloat16)`` or a
    Lightning ``bf16-true`` precision casts every floating-point tensor of a module, which would
    round bitsandbytes' block scales (its own ``Linear4bit`` keeps them float32 the same way).
    """

    def __init__(self, bank: Bank4bit) -> None:
        super().__init__()
        self.dtypes = {}
        for field, tensor in bank.tensors().items():
            self.dtypes[field] = tensor.dtype
            self.register_buffer(field, tensor.view(torch.uint8) if tensor.is_floating_point() else tensor)
        self.quant_type, self.shape, self.dtype = bank.quant_type, bank.shape, bank.dtype

    def bank(self) -> Bank4bit:
        present = {field: getattr(self, field).view(dtype) for field, dtype in self.dtypes.items()}
        return Bank4bit(quant_type=self.quant_type, shape=self.shape, dtype=self.dtype, **present)


class _Bank4bitGEMM(torch.autograd.Function):
    """``x[rows of e] @ dequant(W_e)^T`` per expert; backward ``grad[rows of e] @ dequant(W_e)``."""

    @staticmethod
    def forward(ctx, x: Tensor, bank: Bank4bit, counts: list[int]) -> Tensor:
        ctx.bank, ctx.counts = bank, counts
        return _per_expert(x, bank, counts, transpose=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _per_expert(grad.contiguous(), ctx.bank, ctx.counts, transpose=False), None, None


def _per_expert(x: Tensor, bank: Bank4bit, counts: list[int], transpose: bool) -> Tensor:
    out_f, in_f = bank.shape
    out = x.new_empty(x.shape[0], out_f if transpose else in_f)
    if x.device.type == "cpu":
        weight = scratch("expert-4bit", bank.shape, x.dtype)
    else:  # the caching allocator reuses the block
        weight = torch.empty(bank.shape, dtype=x.dtype, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            bank.dequantize(expert, weight)
            rows = slice(start, start + count)
            torch.mm(x[rows], weight.T if transpose else weight, out=out[rows])
            start += count
    return out


def _moved(dense: Tensor, codes: Tensor) -> Tensor:
    """A merged bank where the codes went: to their device (``to_empty`` out of meta: uninitialised, as
    everything else), shared when they were shared."""
    if dense.is_meta and not codes.is_meta:
        moved = torch.empty_like(dense, device=codes.device)
    else:
        moved = dense.to(codes.device)
    if codes.is_shared() and not moved.is_shared():
        moved.share_memory_()
    return moved


def _key(projection: str) -> str:
    """The child holding a projection's codes: not named like the projection, which target names match."""
    return f"{projection}_4bit"


class Experts4bit(ExpertsForward, nn.Module):
    """A fused experts module whose projections are 4-bit banks (quantized expert by expert).

    Args:
        experts: the transformers experts module; its projection parameters are quantized and removed
            (one expert's dense copy at a time), everything else stays on it.
        quant_type: "nf4" or "fp4".
        double_quant: quantize the block scales too (nf4-dq).
        compute_dtype: the dtype the GEMMs run in; None = the dtype the weights had.
    """

    def __init__(
        self, experts: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        layout = BANK.layout(experts)
        self.layout: Layout = layout
        self.num_experts = BANK.num_experts(experts)
        self.quantized = nn.ModuleDict()
        dtype = BANK.compute_dtype(experts)
        for p in layout.projections:  # BANK reads the module only while its bank is whole: views first
            stored = getattr(experts, p)
            views = [stored[e].t() if layout.is_transposed else stored[e] for e in range(self.num_experts)]
            self.quantized[_key(p)] = _Packed(quantize_bank(views, quant_type, double_quant))
            delattr(experts, p)  # the dense bank goes; biases, norms and functions stay
        self.inner = experts
        self.compute_dtype = compute_dtype or dtype
        # merged projections, dequantized with the update added (a plain dict, moved by _apply with the codes)
        self.dense: dict[str, Tensor] = {}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``.to()`` / ``.cuda()`` move a merged bank with the codes; it keeps the compute dtype (a cast of
        the module leaves the 4-bit bank's compute dtype, and so its dequantized weights, as they were)."""
        super()._apply(fn, recurse)
        if self.dense:
            codes = next(iter(self.quantized.values())).codes
            self.dense = {p: _moved(dense, codes) for p, dense in self.dense.items()}
        return self

    @property
    def banks_4bit(self) -> dict[str, Bank4bit]:
        return {p: self.quantized[_key(p)].bank() for p in self.layout.projections}

    def dense_bank(self, p: str) -> Tensor:
        """Projection ``p`` of every expert dequantized, ``(E, out, in)`` in the compute dtype (merging
        writes into it; the forward uses it while it exists)."""
        if p not in self.dense:
            bank = self.quantized[_key(p)].bank()
            dense = torch.empty(bank.num_experts, *bank.shape, dtype=self.compute_dtype, device=bank.codes.device)
            for expert in range(bank.num_experts):
                bank.dequantize(expert, dense[expert])
            self.dense[p] = dense
        return self.dense[p]

    def drop_dense(self, p: str) -> None:
        self.dense.pop(p, None)

    def project(self, x: Tensor, p: str, offsets: Tensor, counts: list[int]) -> Tensor:
        """One projection over tokens sorted by expert (``counts`` per expert), without its bias."""
        x = x.to(self.compute_dtype)
        if p in self.dense:  # merged: the dense bank, as the unquantized model computes
            return grouped_mm(x, self.dense[p].transpose(-2, -1), offsets, counts)
        return _Bank4bitGEMM.apply(x, self.quantized[_key(p)].bank(), counts)

    def dequantized(self) -> nn.Module:
        """The transformers experts module back, holding each projection dequantized (merged, if merged)
        as the parameter it had: what an unquantized export writes."""
        experts = copy.deepcopy(self.inner)  # the functions and biases; this 4-bit bank stays as it is
        for p in self.layout.projections:
            dense = self.dense_bank(p)
            stored = dense.transpose(-2, -1) if self.layout.is_transposed else dense
            setattr(experts, p, nn.Parameter(stored.contiguous(), requires_grad=False))
        self.dense.clear()
        return experts

    # -- the experts forward (ExpertsForward) without adapters --------------------------------------

    @property
    def functions(self) -> nn.Module:
        return self.inner

    def _project(self, x: Tensor, p: str, offsets: Tensor, counts: list[int], bias_rows: Tensor | None) -> Tensor:
        out = self.project(x, p, offsets, counts)
        bias = bank_bias(self, p)
        if bias is not None and bias_rows is not None:
            out.add_(bias[bias_rows])
        return out

    def forward(self, hidden_states: Tensor, *routing: Tensor) -> Tensor:
        return self._experts_forward(hidden_states, *routing)

    def extra_repr(self) -> str:
        bank = next(iter(self.banks_4bit.values()))
        kind = bank.quant_type + ("-dq" if bank.nested else "")
        return f"experts={self.num_experts}, {kind}, compute_dtype={self.compute_dtype}"
