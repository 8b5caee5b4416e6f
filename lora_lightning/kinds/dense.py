"""The dense kinds: ``nn.Linear`` (:class:`BaseKind`, which every kind extends), Conv1D, Embedding.

``nn.Linear`` stores its weight ``(out, in)``; transformers ``Conv1D`` (GPT-2's linear) stores it
``(in, out)``; ``nn.Embedding`` stores ``(num_embeddings, dim)``, which in the adapter's ``(out,
in)`` terms is ``(in, out)``: the lookup side is the input. transformers is never imported here:
Conv1D is recognised only when transformers is already loaded, which a model containing one implies.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from lora_lightning.ops.lora_linear import weight_in


class BaseKind:
    """How to read and update one kind of frozen base layer.

    Attributes:
        name: the layer type as reports show it.
        transposed: the stored weight is laid out ``(in, out)`` (Conv1D, Embedding).
        dense: the stored weight is a plain floating-point tensor the fused kernel can read as a
            view; quantized kinds are not dense and run their own forward.
        embedding: the layer is a lookup table (the adapter's A side is the index side).
    """

    name = "Linear"
    transposed = False
    dense = True
    embedding = False
    exact_by_dequantizing = True  # (quantized kinds) x @ dense_weight().T is what the layer computes

    def claims(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind."""
        return isinstance(module, nn.Linear)

    def stored_weight(self, module: nn.Module) -> Tensor:
        """The parameter that holds the base weight, in whatever layout and dtype the layer keeps it."""
        return module.weight

    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the adapter: A is ``(r, in)``, B is ``(out, r)``."""
        rows, cols = self.stored_weight(module).shape
        return (rows, cols) if self.transposed else (cols, rows)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype adapter factors take by default (the dtype the base computes in)."""
        return self.stored_weight(module).dtype

    def device(self, module: nn.Module) -> torch.device:
        return self.stored_weight(module).device

    def problem(self, module: nn.Module) -> str | None:
        """Why this layer cannot carry an adapter, or None."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            kind = "no weight" if weight is None else f"weight of dtype {weight.dtype}"
            return f"has {kind}; LoRA needs a floating-point weight"
        return None

    def adopt(self, module: nn.Module) -> None:
        """Called when an adapter starts to wrap ``module`` (quantized kinds fix their layout)."""

    def is_meta(self, module: nn.Module) -> bool:
        return self.stored_weight(module).is_meta

    def dense_weight(self, module: nn.Module) -> Tensor:
        """The base weight as ``(out, in)``: a view of the stored tensor for dense kinds."""
        weight = self.stored_weight(module)
        return weight.t() if self.transposed else weight

    def transient_weight(self, module: nn.Module, dtype: torch.dtype, work: torch.dtype) -> Tensor:
        """:meth:`dense_weight` in ``dtype`` (what the layer computes in), handed over in ``work`` (the
        GEMM dtype), for one immediate use: it may sit in a buffer the next call overwrites
        (:func:`lora_lightning.ops.lora_linear.scratch`); never keep it."""
        return weight_in(self.dense_weight(module).to(dtype), work)

    def dequantized(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A plain ``nn.Linear`` holding this layer's weight in ``dtype`` (what a merge into a
        quantized layer writes into: the update is far below the quantization step)."""
        in_f, out_f = self.features(module)
        bias = getattr(module, "bias", None)
        weight = self.dense_weight(module)
        linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
        return linear

    @torch.no_grad()
    def add_update(self, module: nn.Module, left: Tensor, right: Tensor, alpha: float) -> None:
        """``W <- W + alpha * left @ right``, with ``left @ right`` laid out ``(out, in)``.

        The sum is formed in float32 and rounded once into W's dtype: one GEMM whose epilogue
        does the add (``addmm_``) into a float32 W, or into a float32 copy of a half-precision W
        written back once. The product is never formed in half precision: cuBLAS's bf16
        ``addmm_`` does not round the sum once (measured on an H200: 5.6% of the elements of an
        8B-shaped model more than one ulp off).

        Args:
            module: the base layer.
            left: ``(out, r)``.
            right: ``(r, in)``.
            alpha: the factor (``scale`` to merge, ``-scale`` to unmerge).
        """
        weight = self.stored_weight(module)
        if self.transposed:  # stored (in, out): add (left @ right)^T = right^T @ left^T
            left, right = right.t(), left.t()
        if weight.dtype == torch.float32:
            weight.addmm_(left.float(), right.float(), alpha=alpha)
        else:
            merged = weight.float()
            merged.addmm_(left.float(), right.float(), alpha=alpha)
            weight.copy_(merged)

    @torch.no_grad()
    def write_dense(self, module: nn.Module, weight: Tensor) -> None:
        """Store an ``(out, in)`` weight (float32) into the layer, rounded once into its dtype."""
        stored = self.stored_weight(module)
        stored.copy_(weight.t() if self.transposed else weight)


class Conv1DKind(BaseKind):
    """transformers' ``Conv1D`` (GPT-2): a linear whose weight is stored ``(in, out)``."""

    name = "Conv1D"
    transposed = True

    def claims(self, module: nn.Module) -> bool:
        cls = conv1d_class()
        return cls is not None and isinstance(module, cls)


class EmbeddingKind(BaseKind):
    """``nn.Embedding``: weight ``(num_embeddings, dim)``, i.e. ``(in, out)`` for the adapter."""

    name = "Embedding"
    transposed = True
    embedding = True

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)


def conv1d_class() -> type | None:
    """transformers' Conv1D if transformers is already imported (a model using it implies it is)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None
