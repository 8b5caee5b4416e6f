"""The base-layer seam: everything that depends on what kind of layer an adapter wraps.

A LoRA layer never reads its base layer's ``weight`` itself. It asks the layer's :class:`BaseKind`
for the sizes, the dtype and device the adapter factors should match, the dense ``(out, in)``
weight (a view, or a dequantized copy for a quantized kind), and to add an update ``alpha * left @
right`` into the stored weight. Injection, load planning, merging and input grouping ask the same
object, so a new kind of base layer (bitsandbytes 4-/8-bit, :mod:`lora_lightning.kinds.bnb`) is one
new class here, not a change in every module that touches weights.

Kinds known here: ``nn.Linear`` (weight ``(out, in)``), transformers ``Conv1D`` (GPT-2's linear,
weight stored ``(in, out)``) and ``nn.Embedding`` (weight ``(num_embeddings, dim)``, which in the
adapter's ``(out, in)`` terms is ``(in, out)``: the lookup side is the input). transformers is
never imported here: Conv1D is recognised only when transformers is already loaded, which a model
containing one implies.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

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


# Tried in order; quantized kinds (registered by lora_lightning.kinds.bnb) come first, since some
# of them subclass nn.Linear.
_KINDS: list[BaseKind] = [BaseKind(), Conv1DKind(), EmbeddingKind()]
# Counters of packed tensors (4-bit weights hold two parameters a byte), registered with the kinds.
_PACKED: list[Callable[[Tensor], int | None]] = []


def register_kind(kind: BaseKind) -> None:
    """Make a new kind of base layer adaptable (tried before the built-in ones); idempotent per class."""
    if not any(type(k) is type(kind) for k in _KINDS):
        _KINDS.insert(0, kind)


def register_packed_numel(count: Callable[[Tensor], int | None]) -> None:
    """Register how many parameters a packed tensor stands for (None: not a tensor it knows)."""
    if count not in _PACKED:
        _PACKED.append(count)


def _load_quantized_kinds() -> None:
    if "bitsandbytes" in sys.modules:  # its layers imply it is loaded; the module registers their kinds
        import lora_lightning.kinds.bnb  # noqa: F401


def logical_numel(param: Tensor) -> int:
    """The number of parameters ``param`` stands for: its numel, unpacked for a packed 4-bit tensor."""
    _load_quantized_kinds()
    for count in _PACKED:
        n = count(param)
        if n is not None:
            return n
    return param.numel()


def base_kind(module: nn.Module) -> BaseKind | None:
    """The kind of ``module`` if an adapter can wrap it, else None."""
    _load_quantized_kinds()
    return next((kind for kind in _KINDS if kind.claims(module)), None)


def is_linear_like(module: nn.Module) -> bool:
    """A linear layer of any supported kind (not an embedding)."""
    kind = base_kind(module)
    return kind is not None and not kind.embedding
