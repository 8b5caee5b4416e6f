"""LoRA layers: thin wrappers that own the adapter factors and hold the base layer unchanged.

``LoRALinear`` wraps any linear kind :mod:`lora_lightning.kinds.dense` knows (``nn.Linear``, transformers
``Conv1D``, ...); ``LoRAEmbedding`` wraps an ``nn.Embedding``. The base layer stays a child
(``base_layer``), so :func:`lora_lightning.merge.merge_and_unload` can put it back and the model's
original ``state_dict`` keys return. A layer composes two small units: its base layer's
:class:`~lora_lightning.kinds.dense.BaseKind` (sizes, dense weight, adding an update) and its
:class:`~lora_lightning.nn.variants.LoRAVariant` (extra tensors, forward, merge).

Both answer the same small protocol used by merge, save and report code: ``lora_A``, ``lora_B``,
``r``, ``alpha``, ``scale``, ``kind``, ``variant``, ``merge()``, ``unmerge()``, ``merged``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lora_lightning.kinds import BaseKind, base_kind
from lora_lightning.nn.inits import init_function
from lora_lightning.nn.variants import PLAIN, LoRAVariant
from lora_lightning.ops.lora_linear import fused_lora_linear


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The adapter's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALayer(nn.Module):
    """What every adapted layer holds: the base layer and its kind, the factors, rank, scale, variant.

    Args:
        base_layer: the frozen layer; kept as the child ``base_layer``.
        r: rank.
        alpha: scale numerator.
        use_rslora: ``scale = alpha / sqrt(r)`` instead of ``alpha / r``.
        init: "kaiming", "gaussian", "pissa", "pissa_niter_<n>", "olora" (:mod:`lora_lightning.nn.inits`);
            None leaves zero factors and the base untouched, for a caller that loads the factors.
        init_std: standard deviation for the gaussian init.
        dtype: dtype of the factors; None = the dtype the base computes in.
        variant: what this layer computes beyond plain LoRA (default: plain LoRA).
    """

    lora_A: nn.Parameter  # (r, in)
    lora_B: nn.Parameter  # (out, r)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        init: str | None = "kaiming",
        init_std: float = 0.02,
        dtype: torch.dtype | None = None,
        variant: LoRAVariant = PLAIN,
    ) -> None:
        super().__init__()
        kind = base_kind(base_layer)
        if kind is None:
            raise TypeError(f"{type(self).__name__} cannot wrap a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self._kind, self._kind_of = kind, type(base_layer)
        kind.adopt(base_layer)
        self._premerge_base: nn.Module | None = None  # a quantized base while a merge dequantized it
        self.variant = variant
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.merged = False
        self.in_features, self.out_features = kind.features(base_layer)
        factory = {"device": kind.device(base_layer), "dtype": dtype or kind.compute_dtype(base_layer)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        if init is not None:
            self.reset_lora_parameters(init, init_std)
        else:  # the caller fills the factors (loading); nothing random, and the base stays as it is
            nn.init.zeros_(self.lora_A)
            nn.init.zeros_(self.lora_B)
        variant.create(self)  # after the init: DoRA's magnitude is the norm of the weight it starts from

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming", init_std: float = 0.02) -> None:
        """Initialise the factors so that the adapted layer computes what the base layer did.

        "kaiming" and "gaussian" make ``B A = 0``; "pissa", "pissa_niter_<n>" and "olora" start
        from the base weight's principal part and rewrite the base into the residual
        (:mod:`lora_lightning.nn.inits`).
        """
        init_function(init)(self, init_std)

    @property
    def kind(self) -> BaseKind:
        """The :class:`BaseKind` of the current base layer (a plugin may swap it, a merge dequantizes it)."""
        base = self.base_layer
        if type(base) is not self._kind_of:
            kind = base_kind(base)
            if kind is None:
                raise TypeError(
                    f"{type(self).__name__}'s base layer became a {type(base).__name__}, which it cannot wrap"
                )
            kind.adopt(base)
            self._kind, self._kind_of = kind, type(base)
        return self._kind

    @property
    def weight(self) -> Tensor:
        """The base layer's stored weight (read-only convenience for code that inspects ``layer.weight``)."""
        return self.kind.stored_weight(self.base_layer)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def base_weight(self) -> Tensor:
        """The base weight as ``(out, in)``: a view for dense kinds, a dequantized copy otherwise."""
        return self.kind.dense_weight(self.base_layer)

    @torch.no_grad()
    def merge(self, measure: bool = False) -> tuple[float, float] | None:
        """Fold the update into the base weight (summed in float32, rounded once); a no-op when merged.

        A quantized base is dequantized into a plain ``nn.Linear`` first: the update is far below a
        4-bit step, so requantizing would lose most of it. The sum is formed in float32 and
        rounded once into the layer's compute dtype; the quantized layer is kept, and
        :meth:`unmerge` puts it back exactly.

        Args:
            measure: also measure how much of the update the merged weight kept (a float64 copy
                of this one layer, transient).

        Returns:
            With ``measure``: ``(||kept - update||^2, ||update||^2)``, ``kept`` being what the
            weight actually changed by and ``update`` the exact one (rounding into a bf16 or
            fp16 weight makes them differ); else None.
        """
        if self.merged:
            return None
        before = self.base_weight().double() if measure else None  # float64 holds any weight exactly
        kind = self.kind
        if kind.dense:
            self.variant.merge(self)
        else:
            quantized = self.base_layer
            self.base_layer = kind.dequantized(quantized, torch.float32)
            self.variant.merge(self)
            self.base_layer = self.base_layer.to(kind.compute_dtype(quantized))
            self._premerge_base = quantized
        self.merged = True
        if before is None:
            return None
        update = self.variant.exact_update(self, before)
        kept = self.base_weight().double().sub_(before)
        return float((kept - update).square().sum()), float(update.square().sum())

    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the rounding of W's dtype); a no-op when not merged."""
        if not self.merged:
            return
        if self._premerge_base is not None:  # the quantized layer as it was: exact
            self.base_layer, self._premerge_base = self._premerge_base, None
        else:
            self.variant.unmerge(self)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.variant.forward(self, x)

    def lora_forward(self, x: Tensor, with_bias: bool = True) -> Tensor:
        """Plain LoRA's output for ``x`` (the variant's forward builds on it), with or without the bias."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        merged = f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"
        variant = "" if self.variant is PLAIN else f", variant={self.variant.name}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {merged}{variant}"


class LoRALinear(LoRALayer):
    """``h = W x + b + scale * B A dropout(x)`` around a linear layer of any supported kind.

    Args:
        base_layer: ``nn.Linear``, transformers ``Conv1D``, or another kind :mod:`lora_lightning.kinds.dense` knows.
        r: rank.
        alpha: scale numerator.
        dropout: dropout probability on the adapter path (training mode only).
        **options: ``use_rslora``, ``init``, ``init_std``, ``dtype``, ``variant`` of :class:`LoRALayer`.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, dropout: float = 0.0, **options) -> None:
        super().__init__(base_layer, r, alpha, **options)
        if self.kind.embedding:
            raise TypeError("LoRALinear wraps linear layers; use LoRAEmbedding for an nn.Embedding")
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _dropped(self, x: Tensor) -> Tensor | None:
        """The adapter's input when dropout changes it (training with dropout), else None."""
        return self.lora_dropout(x) if self.training and isinstance(self.lora_dropout, nn.Dropout) else None

    def lora_forward(self, x: Tensor, with_bias: bool = True) -> Tensor:
        kind, base, x_lora = self.kind, self.base_layer, self._dropped(x)
        bias = self.bias if with_bias else None
        if kind.dense:
            return fused_lora_linear(x, (self.base_weight(), bias, self.lora_A, self.lora_B, self.scale), x_lora)
        dtype = kind.compute_dtype(base)
        if kind.exact_by_dequantizing:
            # 4-bit: bitsandbytes' own training forward dequantizes and runs a dense matmul in the
            # compute dtype; so does the fused kernel, with a weight dequantized again in backward
            # rather than kept (the dense weight never outlives the call).
            bias = None if bias is None else bias.to(dtype)
            terms = (lambda work: kind.transient_weight(base, dtype, work), bias, self.lora_A, self.lora_B, self.scale)
            x_lora = None if x_lora is None else x_lora.to(dtype)
            return fused_lora_linear(x.to(dtype), terms, x_lora).to(x.dtype)  # type: ignore[arg-type]
        # int8 (LLM.int8() quantizes activations too): the base's own forward, plus the adapter.
        result = self.base_layer(x)
        if not with_bias and self.bias is not None:
            result = result - self.bias.to(result.dtype)
        source = (x if x_lora is None else x_lora).to(dtype)
        update = (source @ self.lora_A.to(dtype).t()) @ self.lora_B.to(dtype).t()
        return result + (update * self.scale).to(result.dtype)


class LoRAEmbedding(LoRALayer):
    """``h = E[x] + scale * (A^T[x]) B^T`` around an ``nn.Embedding``.

    A is (r x num_embeddings) and starts at zero, B is (embedding_dim x r) and starts random
    (as loralib and PEFT do for embeddings: the lookup side is the zero one), so the product
    ``B A`` is zero at the start, like for linear layers. An index lookup has no input features
    to drop, so there is no adapter dropout.
    """

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, **options) -> None:
        super().__init__(base_layer, r, alpha, **options)
        if not self.kind.embedding:
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base_layer).__name__}")

    def lora_forward(self, x: Tensor, with_bias: bool = True) -> Tensor:
        result = self.base_layer(x)  # (an embedding has no bias)
        base = self.base_layer
        after_A = F.embedding(
            x, self.lora_A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )  # (*, r)
        return result + (after_A @ self.lora_B.t()).to(result.dtype) * self.scale

    def extra_repr(self) -> str:
        return super().extra_repr().replace("in_features", "num_embeddings").replace("out_features", "embedding_dim")


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer)


def adaptable_kind(module: nn.Module) -> BaseKind | None:
    """The base kind of a module that can carry an adapter, or of the base an adapted one wraps."""
    return module.kind if isinstance(module, LoRALayer) else base_kind(module)
