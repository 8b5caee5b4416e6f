"""4-bit expert banks: a fused experts module's 3-D projections held in bitsandbytes' 4-bit format.

bitsandbytes (and transformers' ``load_in_4bit``) quantizes ``nn.Linear`` layers only, so a
transformers 5 MoE model "in 4 bits" keeps its experts, most of its weights, in 16 bits. Here each
expert's ``(out, in)`` weight is quantized on its own with bitsandbytes' ``quantize_4bit``
(nf4 / fp4, blocks of 64 along the flattened weight, double quantization of the block scales or
not), so every expert holds exactly what a ``Linear4bit`` of that expert would hold, and
bitsandbytes' ``dequantize_4bit`` op turns it back into values. The codes of a bank are one
``(E, out * in / 2)`` uint8 tensor; the scales one ``(E, blocks)`` tensor (float32, or uint8 with
per-expert second-level scales under double quantization).

:class:`Bank4bit` holds one projection's quantized bank and dequantizes one expert at a time into
a caller's buffer; :data:`BANK_4BIT` is the kind of :class:`~lora_lightning.nn.experts4bit.Experts4bit`
(the module that replaces a quantized experts module). bitsandbytes is imported only when a bank
is quantized or read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lightning.kinds.bnb import bnb
from lora_lightning.kinds.experts import BANK, ExpertBank, Layout, is_bank_4bit

BLOCKSIZE = 64  # bitsandbytes' default 4-bit block (what Linear4bit uses)
# elements dequantized at a time into a caller's buffer: a 1-2 MiB temporary (measured on the CPU at
# 1536 x 2048: 0.8 ms an expert, against 1.0 ms whole and 1.4 ms in 128K bands)
BAND = 1 << 19
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class Bank4bit:
    """One projection of an expert bank, every expert's ``(out, in)`` weight quantized on its own.

    Attributes:
        codes: uint8 ``(E, out * in // 2)``, two 4-bit codes a byte (bitsandbytes' packing).
        absmax: ``(E, out * in // BLOCKSIZE)``: float32 block scales, or under double quantization
            their uint8 codes, with ``absmax2`` ``(E, blocks2)`` float32, ``code2`` ``(256,)`` and
            ``offset`` ``(E,)`` (one second-level state per expert).
        shape: ``(out, in)`` of one expert's weight (its linear orientation, whatever the bank's storage).
        dtype: the dtype the weights were quantized from (what dequantization rounds to).
    """

    codes: Tensor
    absmax: Tensor
    quant_type: str
    shape: tuple[int, int]
    dtype: torch.dtype
    absmax2: Tensor | None = None
    code2: Tensor | None = None
    offset: Tensor | None = None
    blocksize2: int = 256

    @property
    def num_experts(self) -> int:
        return self.codes.shape[0]

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def tensors(self) -> dict[str, Tensor]:
        """The tensors to keep as buffers (state_dict, ``.to``), by field name."""
        fields = {"codes": self.codes, "absmax": self.absmax}
        if self.nested:
            fields.update(absmax2=self.absmax2, code2=self.code2, offset=self.offset)
        return fields

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def logical_numel(self) -> int:
        """The parameters the bank stands for (every expert's ``out x in``), as a dense bank counts them."""
        return self.num_experts * self.shape[0] * self.shape[1]

    def scales(self, expert: int) -> Tensor:
        """Expert ``expert``'s float32 block scales (second-level dequantized under double quantization)."""
        if not self.nested:
            return self.absmax[expert]
        F = bnb().functional
        state2 = F.QuantState(
            absmax=self.absmax2[expert], code=self.code2, blocksize=self.blocksize2, dtype=torch.float32
        )
        return F.dequantize_blockwise(self.absmax[expert], state2).add_(self.offset[expert])

    def dequantize(self, expert: int, out: Tensor | None = None) -> Tensor:
        """Expert ``expert``'s ``(out, in)`` weight: bitsandbytes' ``dequantize_4bit`` of its blocks, in
        the dtype it was quantized from, written into ``out`` (any float dtype, reused) when given.

        Into ``out`` it goes a band of rows at a time (blocks never straddle rows: ``in`` is a multiple
        of the block), so no weight-sized float32 temporary is made per call: freed and reallocated
        thousands of times a step, those land in the heap and the resident set grows
        (:func:`~lora_lightning.ops.lora_linear.scratch`).
        """
        bnb()  # its ops are registered on import (a bank unpickled in a fresh process has not loaded it)
        op = torch.ops.bitsandbytes.dequantize_4bit.default
        rows, cols = self.shape
        codes, scales = self.codes[expert], self.scales(expert).float()
        if out is None:  # what bitsandbytes' dequantize_4bit asks its op for: the original dtype
            return op(codes.view(-1, 1), scales, BLOCKSIZE, self.quant_type, [rows, cols], self.dtype)
        band = max(1, BAND // cols)
        for start in range(0, rows, band):
            stop = min(rows, start + band)
            part = op(
                codes[start * cols // 2 : stop * cols // 2].view(-1, 1),
                scales[start * cols // BLOCKSIZE : stop * cols // BLOCKSIZE],
                BLOCKSIZE,
                self.quant_type,
                [stop - start, cols],
                self.dtype,
            )
            out[start:stop].copy_(part)
        return out


def check_quantizable(weight_shape: tuple[int, int], name: str) -> str | None:
    """Why an expert weight of this ``(out, in)`` shape cannot be held in 4-bit blocks, or None."""
    _, in_f = weight_shape
    if in_f % BLOCKSIZE:
        return (
            f"{name} has experts of {in_f} input features, not a multiple of bitsandbytes' {BLOCKSIZE}-element "
            "4-bit block: the blocks would straddle rows"
        )
    return None


@torch.no_grad()
def quantize_bank(weights: Sequence[Tensor], quant_type: str, double_quant: bool) -> Bank4bit:
    """``weights``: each expert's ``(out, in)`` linear weight (views of the bank: one expert's dense copy
    at a time), quantized expert by expert."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    F = bnb().functional
    first = weights[0]
    experts, (out_f, in_f) = len(weights), first.shape
    codes = absmax = absmax2 = offsets = code2 = None
    for e, expert in enumerate(weights):  # into tensors made once: no per-expert pieces left in the heap
        packed, state = F.quantize_4bit(
            expert.contiguous(), blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=double_quant
        )
        if codes is None:
            codes = packed.new_empty(experts, packed.numel())
            absmax = state.absmax.new_empty(experts, state.absmax.numel())
            if double_quant:
                absmax2 = state.state2.absmax.new_empty(experts, state.state2.absmax.numel())
                offsets = torch.empty(experts, dtype=torch.float32, device=expert.device)
                code2 = state.state2.code
        codes[e] = packed.view(-1)
        absmax[e] = state.absmax
        if double_quant:
            absmax2[e] = state.state2.absmax
            offsets[e] = torch.as_tensor(state.offset, dtype=torch.float32)
        del packed, state
    return Bank4bit(
        codes=codes,
        absmax=absmax,
        quant_type=quant_type,
        shape=(out_f, in_f),
        dtype=first.dtype,
        absmax2=absmax2,
        code2=code2,
        offset=offsets,
    )


def bank_bias(module: nn.Module, projection: str) -> Tensor | None:
    """A 4-bit bank's per-expert bias of ``projection`` (kept on its ``inner`` child), or None."""
    return getattr(module.inner, f"{projection}_bias", None) if module.layout.has_bias else None


class Bank4bitKind:
    """How the bank adapter reads and updates an :class:`~lora_lightning.nn.experts4bit.Experts4bit`.

    The same questions as :class:`~lora_lightning.kinds.experts.ExpertBank`; the functions (gate,
    activation, biases, norm) are on its ``inner`` child. Merging dequantizes every expert of a
    projection into ``dense`` (compute dtype) and adds the update there; unmerging drops it, so the
    4-bit codes, never rewritten, come back exactly.
    """

    name = "Experts4bit"
    dense = False

    def problem(self, module: nn.Module) -> str | None:
        return None

    def layout(self, module: nn.Module) -> Layout:
        return module.layout

    def functions(self, module: nn.Module) -> nn.Module:
        return module.inner

    def bias(self, module: nn.Module, projection: str) -> Tensor | None:
        return bank_bias(module, projection)

    def num_experts(self, module: nn.Module) -> int:
        return module.num_experts

    def features(self, module: nn.Module, projection: str) -> tuple[int, int]:
        out_f, in_f = module.banks_4bit[projection].shape
        return in_f, out_f

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype

    def device(self, module: nn.Module) -> torch.device:
        return next(iter(module.banks_4bit.values())).codes.device

    def is_meta(self, module: nn.Module) -> bool:
        return False

    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> Tensor:
        """One expert's ``(out, in)`` weight in the merged dense bank (made on first use)."""
        return module.dense_bank(projection)[expert]

    @torch.no_grad()
    def add_update(self, module: nn.Module, projection: str, B: Tensor, A: Tensor, alpha: float) -> None:
        dense = module.dense_bank(projection)
        for expert in range(module.num_experts):
            merged = dense[expert].float().addmm_(B[expert].float(), A[expert].float(), alpha=alpha)
            dense[expert].copy_(merged)

    def restore(self, module: nn.Module, projection: str) -> bool:
        """Undo a merge by dropping the dense bank: the codes were never changed."""
        module.drop_dense(projection)
        return True


BANK_4BIT = Bank4bitKind()


def bank_kind(module: nn.Module) -> ExpertBank | Bank4bitKind:
    """The kind that reads this experts module: 4-bit banks, or dense 3-D parameters."""
    return BANK_4BIT if is_bank_4bit(module) else BANK


def projection_order(module: nn.Module, projections: Sequence[str]) -> list[str]:
    """``projections`` in the order the experts module declares them (PEFT's wrappers nest in that order;
    a 4-bit bank keeps its layout's order, which is the transformers classes' declaration order)."""
    if is_bank_4bit(module):
        return [p for p in module.layout.projections if p in projections]
    return [n for n, _ in module.named_parameters(recurse=False) if n in projections]


def dense_expert(module: nn.Module, projection: str, expert: int) -> Tensor:
    """A float32 copy of one expert's ``(out, in)`` weight, dense or dequantized from 4 bits (never a view:
    the caller adds into it)."""
    if is_bank_4bit(module):
        return module.banks_4bit[projection].dequantize(expert).to(torch.float32, copy=True)
    return BANK.expert_weight(module, projection, expert).to(torch.float32, copy=True)
