"""The fused LoRA linear: ``y = x W^T + b + scale * (x A^T) B^T`` with a hand-written backward.

Why a custom autograd function instead of ``linear(x, W) + scale * linear(linear(x, A), B)``:
plain autograd adds three full-size elementwise passes per layer (the scale, the add in forward,
the add of the two input gradients in backward) and, with float32 adapters on a bf16 base, PEFT
additionally casts every activation to float32. Here the scale and the adds ride in the GEMM
epilogues (``addmm_`` with ``alpha``/``beta``), adapters are cast to the activation dtype (they are
small; activations never are), and only ``x`` (shared with the base layer's input, usually no new
memory) and ``x A^T`` (N x r) are saved. With A frozen (LoRA-FA) ``x`` is not saved at all.

On a CPU without native bf16/fp16 GEMMs (no AVX512-BF16, AMX or Arm BF16), PyTorch multiplies
reduced-precision matrices in a scalar fallback: a (256 x 5632) @ (5632 x 2048) bf16 product, the
input gradient of an MLP projection, takes 21 s on a 2-core AVX2 EPYC against 64 ms in float32.
There the kernels run their GEMMs in float32 on the upcast operands and round each result once to
the activation dtype: the numbers a native bf16 GEMM (float32 accumulation) gives, up to the order
of accumulation (see :func:`gemm_dtype`). Everywhere else nothing is cast.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor

#: a quantized base's weight, given to the kernels as a function: called with the GEMM dtype, it
#: returns the dense ``(out, in)`` weight in it, possibly in a buffer the next call reuses
WeightFn = Callable[[torch.dtype], Tensor]
#: one adapted linear's operands: ``(W (out, in), b (out,) or None, A (r, in), B (out, r), scale)``
Terms = tuple[Tensor | WeightFn, Tensor | None, Tensor, Tensor, float]


def _scaled(t: Tensor, scale: float) -> Tensor:
    """``t * scale`` in place; no kernel for the common ``scale == 1`` (multiplying by 1 is exact)."""
    return t if scale == 1.0 else t.mul_(scale)


def _native_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (oneDNN's own check)."""
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    probe = getattr(torch.ops.mkldnn, name, None)
    try:
        return True if probe is None else bool(probe())
    except RuntimeError:  # pragma: no cover - a build without oneDNN: assume native, cast nothing
        return True


#: the CPU's reduced-precision dtypes it has no native GEMM for (asked once: torch.compile traces a constant)
_CPU_UPCAST = frozenset(d for d in (torch.bfloat16, torch.float16) if not _native_gemm(d))


def gemm_dtype(t: Tensor) -> torch.dtype:
    """The dtype the kernels multiply ``t``'s matrices in: float32 for bf16/fp16 on a CPU without
    native GEMMs for them (PyTorch's fallback there is 100-300x slower), else ``t.dtype``."""
    return torch.float32 if t.dtype in _CPU_UPCAST and t.device.type == "cpu" else t.dtype


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}


_SCRATCH = _Scratch()


def scratch(slot: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
    """A CPU buffer of ``shape`` for a weight-sized operand that lives for one GEMM, reused call after call.

    A dequantized (or upcast) weight per layer call is a large block allocated and freed over and
    over. glibc returns a freed block to the system only above its mmap threshold, which it raises
    to the largest block freed so far (up to 32 MiB): these blocks then land in the heap, freed
    holes fill with activations, and the resident set of a QLoRA step grows layer after layer.
    One buffer per thread and ``slot``, grown to the largest weight asked for, takes their place.
    Its contents are valid until the next call for the same slot on the same thread.
    """
    numel = math.prod(shape)
    key = (slot, dtype)
    buffer = _SCRATCH.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        _SCRATCH.buffers.pop(key, None)
        buffer = None  # the old buffer is released before the larger one is allocated
        with torch.inference_mode(False):  # made during validation, it still takes training's writes
            buffer = _SCRATCH.buffers[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def weight_in(weight: Tensor, work: torch.dtype) -> Tensor:
    """``weight`` in the GEMM dtype: itself, or (CPU upcast) a copy in the reused ``upcast`` buffer."""
    if weight.dtype == work:
        return weight
    if weight.device.type != "cpu":
        return weight.to(work)
    return scratch("upcast", weight.shape, work).copy_(weight)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes linears in on ``device_type``, or None when autocast is off there.

    Device types autocast does not know (``meta``) have it off, rather than raising as
    ``torch.is_autocast_enabled`` does for them.
    """
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device_type`` (a backward called under autocast casts GEMMs otherwise)."""
    return torch.autocast(device_type, enabled=False) if autocast_dtype(device_type) else contextlib.nullcontext()


def _adapted_linear(
    x2: Tensor, xl2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``(x2 W^T + b + scale (xl2 A^T) B^T, xl2 A^T)`` for 2-D inputs, the factors already cast.

    The one forward both autograd functions run, so a layer computed in a group and alone get
    the same bits.
    """
    xa = xl2 @ A.t()  # (N, r)
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (N, out)
    out.addmm_(xa, B.t(), alpha=scale)
    return out, xa


class LoRALinearFunction(torch.autograd.Function):
    """Autograd function for the adapted linear; see :func:`lora_linear` for the contract."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, x_lora):  # type: ignore[override]  # (lora_linear's)
        in_features = x.shape[-1]
        work = gemm_dtype(x)  # x.dtype, or float32 on a CPU without native bf16/fp16 GEMMs
        x2 = x.reshape(-1, in_features)  # (N, in); a view for contiguous x
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, in_features)
        A = lora_A.to(work)  # (r, in): casting the small factors, never the activations
        B = lora_B.to(work)  # (out, r)
        # A quantized base passes a function that dequantizes its weight: called here and again
        # in backward, so the dense weight is never kept between the two.
        deferred = not isinstance(weight, Tensor)
        dense = weight(work) if deferred else weight_in(weight, work)
        x2w = x2.to(work)
        xl2w = x2w if x_lora is None else xl2.to(work)
        out, xa = _adapted_linear(x2w, xl2w, dense, None if bias is None else bias.to(work), A, B, scale)
        del dense, x2w, xl2w

        need_x = (not deferred and weight.requires_grad) or (x_lora is None and lora_A.requires_grad)
        need_xl = x_lora is not None and lora_A.requires_grad
        ctx.save_for_backward(
            x2 if need_x else None,
            xl2 if need_xl else None,
            xa,
            None if deferred else weight,
            A,
            B,
        )
        ctx.weight_fn = weight if deferred else None
        ctx.scale = scale
        ctx.has_x_lora = x_lora is not None
        ctx.factor_dtypes = (lora_A.dtype, lora_B.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        ctx.lead_shape = x.shape[:-1]
        # (N, out), not a view: a caller may modify the output in place (Llama 4's MoE adds into its
        # shared expert's output), which autograd forbids on a view made inside a Function.
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        with _autocast_off(grad_out.device.type):
            return LoRALinearFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        x2, xl2, xa, weight, A, B = ctx.saved_tensors
        work, x_dtype = xa.dtype, ctx.x_dtype  # what forward multiplied in, and the activations' dtype
        scale: float = ctx.scale
        need_x, need_w, need_b, need_a, need_bb, _, need_xl = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(work)  # (N, out)
        gB = g @ B if (need_x or need_a or need_xl) else None  # (N, r)

        dx = dw = db = dA = dB = dxl = None
        if need_x:
            dense = ctx.weight_fn(work) if ctx.weight_fn is not None else weight_in(weight, work)
            dx = g @ dense  # (N, in)
            del dense
            if not ctx.has_x_lora:
                dx.addmm_(gB, A, alpha=scale)  # + scale * (g B) A, fused into the epilogue
            dx = dx.to(x_dtype).view(*ctx.lead_shape, dx.shape[-1])
        if need_xl:
            dxl = _scaled(torch.mm(gB, A), scale).to(x_dtype).view(*ctx.lead_shape, A.shape[-1])
        if need_w:
            dw = (g.t() @ x2.to(work)).to(weight.dtype)  # (out, in)
        if need_b:
            db = g.sum(0).to(ctx.bias_dtype)
        if need_a:
            source = xl2 if ctx.has_x_lora else x2
            dA = _scaled(gB.t() @ source.to(work), scale).to(ctx.factor_dtypes[0])  # (r, in)
        if need_bb:
            dB = _scaled(g.t() @ xa, scale).to(ctx.factor_dtypes[1])  # (out, r)
        return dx, dw, db, dA, dB, None, dxl


def lora_linear(
    x: Tensor,
    weight: Tensor | WeightFn,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """Adapted linear ``x W^T + b + scale * (x_lora A^T) B^T`` in the activation dtype.

    Args:
        x: input, shape ``(*, in)``.
        weight: base weight, shape ``(out, in)`` (a transposed view is fine), dtype of ``x``; or a
            function returning it in the dtype it is asked for (a quantized base dequantizing its
            weight, in forward and again in backward, never kept: see :data:`WeightFn`).
        bias: base bias ``(out,)`` or None.
        lora_A: ``(r, in)``, any float dtype (cast to ``x.dtype`` for the compute).
        lora_B: ``(out, r)``, any float dtype.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)``).
        x_lora: the adapter's input when it differs from ``x`` (dropout), same shape as ``x``.

    Returns:
        ``(*, out)`` in ``x.dtype``.
    """
    out = LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, x_lora)
    return out.view(*x.shape[:-1], out.shape[-1])


def fused_lora_linear(x: Tensor, terms: Terms, x_lora: Tensor | None = None) -> Tensor:
    """One adapted linear through :func:`lora_linear`, as autocast would run ``F.linear``.

    Under autocast, ``F.linear`` casts input, weight and bias to the autocast dtype; do exactly that
    (never the factors: the kernel casts them), then run with autocast off so every GEMM sees one
    dtype. Without autocast the operands pass unchanged.
    """
    weight, bias, lora_A, lora_B, scale = terms
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return lora_linear(x, weight, bias, lora_A, lora_B, scale, x_lora)
    weight, bias = _cast_weight(weight, dtype), None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return lora_linear(
            x.to(dtype), weight, bias, lora_A, lora_B, scale, None if x_lora is None else x_lora.to(dtype)
        )


def _cast_weight(weight: Tensor | WeightFn, dtype: torch.dtype) -> Tensor | WeightFn:
    if isinstance(weight, Tensor):
        return weight.to(dtype)
    return lambda work: weight_in(weight(dtype), work)  # a deferred (dequantizing) weight stays deferred
