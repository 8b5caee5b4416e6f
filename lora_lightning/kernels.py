"""The fused LoRA linear: ``y = x W^T + b + scale * (x A^T) B^T`` with a hand-written backward.

Why a custom autograd function instead of ``linear(x, W) + scale * linear(linear(x, A), B)``:
plain autograd adds three full-size elementwise passes per layer (the scale, the add in forward,
the add of the two input gradients in backward) and, with float32 adapters on a bf16 base, PEFT
additionally casts every activation to float32. Here the scale and the adds ride in the GEMM
epilogues (``addmm_`` with ``alpha``/``beta``), adapters are cast to the activation dtype (they are
small; activations never are), and only ``x`` (shared with the base layer's input, usually no new
memory) and ``x A^T`` (N x r) are saved. With A frozen (LoRA-FA) ``x`` is not saved at all.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LoRALinearFunction(torch.autograd.Function):
    """Autograd function for the adapted linear; see :func:`lora_linear` for the contract."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scale: float,
        x_lora: Tensor | None,
    ) -> Tensor:
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)  # (N, in); a view for contiguous x
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, in_features)
        A = lora_A.to(x.dtype)  # (r, in): casting the small factors, never the activations
        B = lora_B.to(x.dtype)  # (out, r)
        xa = xl2 @ A.t()  # (N, r)
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (N, out)
        out.addmm_(xa, B.t(), alpha=scale)

        need_x = weight.requires_grad or (x_lora is None and lora_A.requires_grad)
        need_xl = x_lora is not None and lora_A.requires_grad
        ctx.save_for_backward(
            x2 if need_x else None,
            xl2 if need_xl else None,
            xa,
            weight,
            A,
            B,
        )
        ctx.scale = scale
        ctx.has_x_lora = x_lora is not None
        ctx.factor_dtypes = (lora_A.dtype, lora_B.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x2, xl2, xa, weight, A, B = ctx.saved_tensors
        scale: float = ctx.scale
        need_x, need_w, need_b, need_a, need_bb, _, need_xl = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        gB = g @ B if (need_x or need_a or need_xl) else None  # (N, r)

        dx = dw = db = dA = dB = dxl = None
        if need_x:
            dx = g @ weight  # (N, in)
            if not ctx.has_x_lora:
                dx.addmm_(gB, A, alpha=scale)  # + scale * (g B) A, fused into the epilogue
            dx = dx.view(*grad_out.shape[:-1], dx.shape[-1])
        if need_xl:
            dxl = torch.mm(gB, A).mul_(scale).view(*grad_out.shape[:-1], A.shape[-1])
        if need_w:
            dw = g.t() @ x2  # (out, in)
        if need_b:
            db = g.sum(0).to(ctx.bias_dtype)
        if need_a:
            source = xl2 if ctx.has_x_lora else x2
            dA = (gB.t() @ source).mul_(scale).to(ctx.factor_dtypes[0])  # (r, in)
        if need_bb:
            dB = (g.t() @ xa).mul_(scale).to(ctx.factor_dtypes[1])  # (out, r)
        return dx, dw, db, dA, dB, None, dxl


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """Adapted linear ``x W^T + b + scale * (x_lora A^T) B^T`` in the activation dtype.

    Args:
        x: input, shape ``(*, in)``.
        weight: base weight, shape ``(out, in)`` (a transposed view is fine), dtype of ``x``.
        bias: base bias ``(out,)`` or None.
        lora_A: ``(r, in)``, any float dtype (cast to ``x.dtype`` for the compute).
        lora_B: ``(out, r)``, any float dtype.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)``).
        x_lora: the adapter's input when it differs from ``x`` (dropout), same shape as ``x``.

    Returns:
        ``(*, out)`` in ``x.dtype``.
    """
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, x_lora)


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """The same formula in plain autograd: the reference the fused function is tested against."""
    x_lora = x if x_lora is None else x_lora
    return torch.nn.functional.linear(x, weight, bias) + scale * (x_lora @ lora_A.t()) @ lora_B.t()
