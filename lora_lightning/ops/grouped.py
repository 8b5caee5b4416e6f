"""Grouped GEMMs over tokens sorted by expert: ``torch.nn.functional.grouped_mm`` where it runs, a loop otherwise.

Rows ``offsets[e-1]:offsets[e]`` of ``x`` belong to expert ``e`` and are multiplied by ``w[e]``
(``(E, in, out)``, any strides). ``grouped_mm`` needs operands whose strides and addresses are
multiples of 16 bytes and a dtype its kernels take (float32 / bfloat16 / float16 on the CPU,
bfloat16 on CUDA devices of compute capability 8.0 and newer); anything else, including a rank
``r`` whose rows are not 16-byte multiples, runs one ``mm`` per expert with tokens, which computes
the same products.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: Tensor) -> bool:
    """One of the last two dims contiguous; every other stride (of a dim longer than 1) a multiple of 16 bytes."""
    size = t.element_size()
    strides_ok = all(
        stride * size % 16 == 0 for stride, dim in zip(t.stride(), t.shape, strict=True) if dim > 1 and stride != 1
    )
    return strides_ok and t.data_ptr() % 16 == 0 and any(stride == 1 for stride in t.stride()[-2:])


def can_group(x: Tensor, w: Tensor) -> bool:
    """Whether ``grouped_mm`` takes these operands on this device."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or x.device != w.device:
        return False
    if x.device.type == "cpu":
        dtype_ok = x.dtype in _CPU_DTYPES
    elif x.device.type == "cuda":
        dtype_ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        dtype_ok = False
    return dtype_ok and _aligned(x) and _aligned(w) and x.shape[0] > 0


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, counts: list[int]) -> Tensor:
    """``x[rows of e] @ w[e]`` for every expert ``e``, as one ``(S, out)`` tensor.

    Args:
        x: ``(S, in)``, sorted by expert.
        w: ``(E, in, out)``.
        offsets: int32 ``(E,)`` cumulative token counts (what ``grouped_mm`` reads).
        counts: the same counts on the host (the loop reads them; one sync per forward, taken by the caller).
    """
    if can_group(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    # split, not slices: the backward of S slices would write S zero-filled (S, in) gradients
    pieces = [rows @ w[expert] for expert, rows in enumerate(x.split(counts)) if rows.shape[0]]
    if not pieces:
        return x.new_zeros(x.shape[0], w.shape[-1])
    return torch.cat(pieces)
