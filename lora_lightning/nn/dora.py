"""DoRA (Liu et al. 2024): weight-decomposed LoRA, as one variant a layer composes.

``W' = m * (W + s B A) / ||W + s B A||_row``: the adapted weight's direction comes from ``W + s B A``,
its per-output length from a trained magnitude ``m`` (initialised to ``||W + s B A||_row``, so the
layer starts as the base). The norm is treated as a constant in backward (the paper's section 4.3,
as PEFT does), so the output is

    y = c * (x W^T + s (x A^T) B^T) + b,   c = m / ||W + s B A||_row (no gradient through the norm)

The row norms never form ``W + s B A`` (PEFT forms it, in full, for every layer at every step):

    ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

with ``||W||^2`` per row cached while the stored weight is unchanged, ``W A^T`` (out x r) one GEMM
and ``A A^T`` (r x r): O(out * in * r) work and no full-size temporary. Embeddings follow PEFT:
the same formula in the adapter's ``(out, in) = (dim, num_embeddings)`` layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lora_lightning.nn.variants import LORA_A, LORA_B, MAGNITUDE, LoRAVariant

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.nn.layers import LoRALayer


class _ScaleOutputs(torch.autograd.Function):
    """``y = h * c + b`` over the last dimension, saving ``y`` (often saved by the next op anyway).

    Backward needs ``sum_n g h`` for ``dc``; with ``h = (y - b) / c`` that is
    ``(sum_n g y - b sum_n g) / c``, so ``h`` is neither kept nor rebuilt: DoRA adds at most one
    output-sized activation per layer to LoRA's (none where the consumer keeps ``y``, as SiLU and
    the gate product do) and two output-sized passes to its backward.
    """

    @staticmethod
    def forward(ctx, h: Tensor, c: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        y = h * c if b is None else torch.addcmul(b, h, c)
        recoverable = bool((c != 0).all())
        ctx.save_for_backward(y if recoverable else h, c, b)
        ctx.recoverable = recoverable
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        kept, c, b = ctx.saved_tensors
        need_h, need_c, need_b = ctx.needs_input_grad
        dh = dc = db = None
        if need_h:
            dh = g * c
        rows = g.reshape(-1, g.shape[-1])
        g_sum = rows.sum(0) if need_b or (need_c and ctx.recoverable and b is not None) else None
        if need_c:
            dc = (rows * kept.reshape(rows.shape)).sum(0)  # sum g y (or sum g h when h was kept)
            if ctx.recoverable:
                dc = (dc if b is None else dc - b * g_sum) / c
        if need_b:
            db = g_sum
        return dh, dc, db


def _weight_row_sq(layer: LoRALayer) -> Tensor:
    """``||W_i||^2`` per output row in float32, cached while the stored weight is unchanged."""
    stored = layer.weight
    key = (stored.data_ptr(), stored._version, tuple(stored.shape), stored.dtype)
    cache = getattr(layer, "_dora_weight_sq", None)
    if cache is None or cache[0] != key:
        weight = layer.base_weight()
        squares = torch.cat([rows.float().square().sum(1) for rows in weight.split(4096)])  # chunked: no full copy
        cache = (key, squares)
        object.__setattr__(layer, "_dora_weight_sq", cache)
    return cache[1]


@torch.no_grad()
def weight_norm(layer: LoRALayer) -> Tensor:
    """``||W + s B A||`` per output row, float32 ``(out,)``, without forming ``W + s B A``."""
    weight = layer.base_weight()  # (out, in): a view, or a dequantized (transient) copy
    A, B = layer.lora_A.float(), layer.lora_B.float()  # (r, in), (out, r)
    wa = (weight @ layer.lora_A.to(weight.dtype).t()).float()  # W A^T, (out, r)
    s = layer.scale
    # ||W_i||^2 + B_i . (2 s (W A^T)_i + s^2 (B (A A^T))_i): one addmm, one row-wise dot
    terms = torch.addmm(wa, B, A @ A.t(), beta=2 * s, alpha=s * s)  # (out, r)
    return (_weight_row_sq(layer) + torch.linalg.vecdot(B, terms)).clamp_min_(0).sqrt_()


class DoRAVariant(LoRAVariant):
    """DoRA on a linear (any kind, quantized included), a Conv1D or an embedding."""

    name = "dora"
    roles = (LORA_A, LORA_B, MAGNITUDE)

    @torch.no_grad()
    def create(self, layer: LoRALayer) -> None:
        magnitude = weight_norm(layer).to(layer.lora_A.dtype)  # the layer starts as its base
        layer.lora_magnitude_vector = nn.Parameter(magnitude)

    def forward(self, layer: LoRALayer, x: Tensor) -> Tensor:
        scale = layer.lora_magnitude_vector / weight_norm(layer)  # (out,): the norm carries no gradient
        h = layer.lora_forward(x, with_bias=False)
        bias = layer.bias
        return _ScaleOutputs.apply(h, scale.to(h.dtype), None if bias is None else bias.to(h.dtype))

    @torch.no_grad()
    def merged_weight(self, layer: LoRALayer, weight: Tensor) -> Tensor:
        norm = weight_norm(layer)
        weight = super().merged_weight(layer, weight)  # W + s B A, float32
        return weight.mul_((layer.lora_magnitude_vector.float() / norm)[:, None])

    @torch.no_grad()
    def exact_update(self, layer: LoRALayer, weight: Tensor) -> Tensor:
        direction = weight + super().exact_update(layer, weight)
        scale = layer.lora_magnitude_vector.double() / direction.norm(dim=1)
        return direction * scale[:, None] - weight

    @torch.no_grad()
    def merge(self, layer: LoRALayer) -> None:
        norm = weight_norm(layer)
        layer.register_buffer("_dora_merge_norm", norm, persistent=False)  # unmerge needs the unmerged norm
        merged = super().merged_weight(layer, layer.base_weight().to(torch.float32, copy=True))
        layer.kind.write_dense(layer.base_layer, merged.mul_((layer.lora_magnitude_vector.float() / norm)[:, None]))

    @torch.no_grad()
    def unmerge(self, layer: LoRALayer) -> None:
        norm = layer._dora_merge_norm
        merged = layer.base_weight().to(torch.float32, copy=True)
        weight = merged.div_((layer.lora_magnitude_vector.float() / norm)[:, None])
        weight.addmm_(layer.lora_B.float(), layer.lora_A.float(), alpha=-layer.scale)
        layer.kind.write_dense(layer.base_layer, weight)
        del layer._dora_merge_norm


DORA = DoRAVariant()
