"""The bitsandbytes kinds: 4-/8-bit base layers and how to dequantize one.

LoRA on a quantized base (QLoRA, Dettmers et al. 2023) keeps the frozen weight in 4 bits and
trains full-precision adapters beside it. Every read of a bitsandbytes layer goes through here, so
the rest of the package asks instead of testing layer types:

* :class:`Linear4bitKind` / :class:`Linear8bitKind`: the :class:`~lora_lightning.kinds.dense.BaseKind` of
  ``bnb.nn.Linear4bit`` (nf4 / fp4, double quant or not, any compute dtype) and
  ``bnb.nn.Linear8bitLt``: sizes, compute dtype, the dequantized ``(out, in)`` weight;
* :func:`dequantize_into`: a 4-bit weight dequantized band by band into a reused buffer;
* :func:`packed_numel`: parameters a packed 4-bit tensor stands for, counted as PEFT counts them.

bitsandbytes is imported only when a layer is asked about and bitsandbytes is already loaded (a
model holding its layers implies it is), so the core runs without it. Quantizing a plain model is
:mod:`lora_lightning.quantize`.
"""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

from lora_lightning.compat.private_names import private
from lora_lightning.kinds.dense import BaseKind
from lora_lightning.ops.lora_linear import scratch


def bnb() -> Any:
    """The bitsandbytes module, or a clear error naming the extra that installs it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:  # pragma: no cover - bitsandbytes is in the test extra
        raise ImportError(
            "quantized bases need bitsandbytes: pip install 'lora-lightning[qlora]' (or bitsandbytes>=0.45)"
        ) from err


class _QuantizedKind(BaseKind):
    """What the bitsandbytes layers share: not dense, sized by their own in/out features."""

    dense = False

    def claims(self, module: nn.Module) -> bool:
        # a bitsandbytes layer implies bitsandbytes is loaded: without it, nothing to claim (and no import)
        return "bitsandbytes" in sys.modules and isinstance(module, getattr(bnb().nn, self.name))

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features


class Linear4bitKind(_QuantizedKind):
    """``bnb.nn.Linear4bit``: weight packed two 4-bit codes a byte, dequantized per block.

    Its own forward (bitsandbytes' ``matmul_4bit`` in training) dequantizes the weight and runs a
    dense matmul, so the adapted layer computes the same ``x W^T`` through the fused kernel with a
    weight dequantized in forward and again in backward (never kept): the dense weight never
    outlives the layer's call.
    """

    name = "Linear4bit"
    exact_by_dequantizing = True

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        # None until bitsandbytes sees an input; then it computes in the input's dtype (float32 here).
        return module.compute_dtype or _original_dtype(module) or torch.float32

    def problem(self, module: nn.Module) -> str | None:
        weight = module.weight
        if weight.is_meta:
            return None  # counts on the meta device need no values
        if getattr(weight, "quant_state", None) is None:
            return "is not quantized yet (bitsandbytes quantizes a Linear4bit when it is moved to a device)"
        return None

    def adopt(self, module: nn.Module) -> None:
        # bitsandbytes' CPU inference path (AVX512-bf16 CPUs, eval mode, no grad) repacks the weight
        # in place, and only for out_features divisible by 32: an adapted layer keeps one layout,
        # so its weight, its fingerprint and its dequantization never change under eval.
        _unpack_cpu(module)
        module.support_avx512bf16_for_cpu = False

    def dense_weight(self, module: nn.Module) -> Tensor:
        _unpack_cpu(module)
        weight = module.weight
        state = weight.quant_state
        if weight.device.type != "cpu":
            return bnb().functional.dequantize_4bit(weight.data, state)
        # On the CPU, bitsandbytes' kernel is chosen by CPU and shape (and on AVX-512 misreads
        # blocks that straddle rows): the same dequantization as the kernels' keeps one answer.
        return dequantize_into(module, torch.empty(tuple(state.shape), dtype=state.dtype), state.dtype)

    def transient_weight(self, module: nn.Module, dtype: torch.dtype, work: torch.dtype) -> Tensor:
        if module.weight.device.type != "cpu":  # CUDA's caching allocator reuses the block already
            return super().transient_weight(module, dtype, work)
        _unpack_cpu(module)
        state = module.weight.quant_state
        return dequantize_into(module, scratch("dequantized", tuple(state.shape), work), dtype)


#: elements :func:`dequantize_into` dequantizes at a time (4 MiB of float32)
DEQUANT_CHUNK = 1 << 20


def dequantize_into(module: nn.Module, out: Tensor, dtype: torch.dtype) -> Tensor:
    """A ``Linear4bit``'s weight dequantized into ``out`` ``(out, in)``, a band of rows at a time (CPU).

    Every element is ``code[q] * absmax[block]`` formed in float32 (exact: a product of two
    float32 values), rounded to the dtype the layer was quantized from, then to ``dtype`` and
    written into ``out`` (any float dtype): the values bitsandbytes' reference dequantization
    gives, whatever this CPU is, without a whole-weight temporary (on the CPU, a block of 23 MiB
    per MLP projection at the 1.1B shape, allocated and freed at every call).

    Where each row holds whole blocks (every real model's widths), a band is bitsandbytes' own
    ``dequantize_4bit`` op asked for float32, which computes that product; where blocks straddle
    rows, bitsandbytes' AVX-512 CPU kernel indexes the scales by row and is wrong (measured: 2%
    relative error at 96 columns), so such a weight is computed here in plain torch.
    """
    weight = module.weight
    state = weight.quant_state
    rows, cols = state.shape
    size = state.blocksize
    absmax = state.absmax
    if state.nested:  # double quantization: the block scales are themselves 8-bit
        absmax = bnb().functional.dequantize_blockwise(state.absmax, state.state2).add_(state.offset)
    absmax = absmax.float()
    packed = weight.data.view(torch.uint8).view(-1)  # two 4-bit codes a byte, blocks of ``size`` elements
    band = size // math.gcd(cols, size)  # bands start on a block boundary
    band = max(band, DEQUANT_CHUNK // cols // band * band)
    whole_blocks = cols % size == 0
    pairs = None if whole_blocks else _code_pairs(state.quant_type, weight.device)
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    for start in range(0, rows, band):
        stop = min(rows, start + band)
        first, last = start * cols, stop * cols  # elements; ``first`` is a multiple of ``size``
        scales = absmax[first // size : -(-last // size)]
        bytes_ = packed[first // 2 : (last + 1) // 2]
        if whole_blocks:
            part = op(bytes_.view(-1, 1), scales, size, state.quant_type, [stop - start, cols], torch.float32)
        else:
            part = _dequantize_blocks(bytes_, scales, size, pairs, last - first)
        if state.dtype != torch.float32:
            part = part.to(state.dtype)
        if dtype != part.dtype:  # the dtype the layer computes in, then out's (the GEMM dtype)
            part = part.to(dtype)
        out[start:stop].copy_(part.view(stop - start, cols))
    return out


def _code_pairs(quant_type: str, device: torch.device) -> Tensor:
    """``(256, 2)`` float32: for each byte, the 4-bit code values of its high and low halves."""
    code = bnb().functional.get_4bit_type(quant_type, device=device).float()
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def _dequantize_blocks(bytes_: Tensor, scales: Tensor, size: int, pairs: Tensor, n: int) -> Tensor:
    """``n`` elements (from a block boundary) of packed 4-bit codes times their block's scale, float32."""
    values = pairs[bytes_.long()].view(-1)[:n]
    full = n // size * size
    values[:full].view(-1, size).mul_(scales[: full // size, None])
    if full < n:  # the tensor's last, partial block
        values[full:].mul_(scales[full // size])
    return values


class Linear8bitKind(_QuantizedKind):
    """``bnb.nn.Linear8bitLt`` (LLM.int8()): int8 rows with a float scale each.

    Its forward quantizes activations too (with fp16 outlier columns), so ``x dequant(W)^T`` is not
    what it computes: the adapted layer runs the base layer's own forward and adds the adapter.
    """

    name = "Linear8bitLt"
    exact_by_dequantizing = False

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        bias = getattr(module, "bias", None)
        return bias.dtype if bias is not None else torch.float32

    def problem(self, module: nn.Module) -> str | None:
        weight = module.weight
        if weight.is_meta or weight.dtype == torch.int8:
            return None
        return "is not quantized yet (bitsandbytes quantizes a Linear8bitLt when it is moved to a device)"

    def dense_weight(self, module: nn.Module) -> Tensor:
        weight = module.weight
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        return bnb().functional.int8_vectorwise_dequant(weight.data, scales)


def _original_dtype(module: nn.Module) -> torch.dtype | None:
    state = getattr(module.weight, "quant_state", None)
    return getattr(state, "dtype", None)


def _unpack_cpu(module: nn.Module) -> None:
    """Undo bitsandbytes' in-place CPU repacking (a layer that ran its CPU inference path)."""
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        inverse = private("unpack_cpu_4bit")
        data, state = inverse(weight.data, weight.quant_state)
        if state.absmax.dim() == 2:
            # The repacking stores the scales (blocks per row, rows) in bf16; bitsandbytes 0.50's
            # inverse lays them back out row by row only under double quantization.
            state.absmax = state.absmax.t().reshape(-1).float()
        weight.data, weight.quant_state = data, state
        module.quant_state = state


def packed_numel(param: Tensor) -> int | None:
    """PEFT's count for a packed 4-bit tensor: ``numel * 2 * bytes per storage element``; None otherwise."""
    if type(param).__name__ != "Params4bit":
        return None
    return param.numel() * 2 * param.element_size()
