"""LoRA layers: thin wrappers that own the adapter factors and hold the base layer unchanged.

``LoRALinear`` wraps an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's linear, weight stored
transposed as (in, out)); ``LoRAEmbedding`` wraps an ``nn.Embedding``. The base layer stays a child
(``base_layer``), so :func:`lora_lightning.merge.merge_and_unload` can put it back and the model's
original ``state_dict`` keys return.

Both answer the same small protocol used by merge, save and report code: ``lora_A``, ``lora_B``,
``r``, ``alpha``, ``scale``, ``delta_weight()``, ``merge()``, ``unmerge()``, ``merged``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lora_lightning.kernels import autocast_dtype, lora_linear


def conv1d_class() -> type | None:
    """transformers' Conv1D if transformers is already imported (a model using it implies it is)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers Conv1D, or an already adapted linear."""
    return isinstance(module, (nn.Linear, LoRALinear)) or is_conv1d(module)


def lora_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """The weight update ``scale * B @ A`` in float32, shape ``(out, in)``.

    Args:
        lora_A: ``(r, in)``.
        lora_B: ``(out, r)``.
        scale: ``alpha / r`` or ``alpha / sqrt(r)``.
    """
    return (lora_B.float() @ lora_A.float()).mul_(scale)


def _scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class _LoRABase(nn.Module):
    """Shared state and merge logic; subclasses define shapes, init and forward."""

    base_layer: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = _scale(r, alpha, use_rslora)
        self.merged = False

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (read-only convenience for code that inspects ``layer.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def _delta_factors(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ``left @ right`` = ``B @ A`` laid out like ``base_layer.weight``."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` in float32, laid out like ``base_layer.weight``."""
        left, right = self._delta_factors()
        return (left.float() @ right.float()).mul_(self.scale)

    def _add_delta(self, alpha: float) -> None:
        """``W <- W + alpha * B @ A``, the sum in float32 and rounded once into W's dtype.

        One GEMM whose epilogue does the add (``addmm_``) into a float32 W (or a float32 copy of a
        half-precision W, written back once). The product is never formed in half precision:
        cuBLAS's bf16 ``addmm_`` does not round the sum once (measured on an H200: 5.6% of the
        elements of an 8B-shaped model more than one ulp off), so half-precision W goes through
        float32 on every device.
        """
        weight = self.base_layer.weight
        left, right = self._delta_factors()
        if weight.dtype == torch.float32:
            weight.addmm_(left.float(), right.float(), alpha=alpha)
        else:
            merged = weight.float()
            merged.addmm_(left.float(), right.float(), alpha=alpha)
            weight.copy_(merged)

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W + scale * B @ A``, summed in float32 and rounded once; a no-op when merged."""
        if self.merged:
            return
        self._add_delta(self.scale)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the rounding of W's dtype); a no-op when not merged."""
        if not self.merged:
            return
        self._add_delta(-self.scale)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


class LoRALinear(_LoRABase):
    """``h = W x + b + scale * B A dropout(x)`` around an ``nn.Linear`` or transformers ``Conv1D``.

    Args:
        base_layer: the frozen layer; kept as the child ``base_layer``.
        r: rank.
        alpha: scale numerator.
        dropout: dropout probability on the adapter path (training mode only).
        use_rslora: ``scale = alpha / sqrt(r)`` instead of ``alpha / r``.
        init: "kaiming" (uniform, as nn.Linear and PEFT) or "gaussian" (normal with ``init_std``).
        init_std: standard deviation for the gaussian init.
        dtype: dtype of A and B; None = the base weight's dtype.
    """

    #: the group of layers reading the same input this layer is computed with (lora_lightning.sharing)
    _shared_input: Callable[[LoRALinear, Tensor], Tensor | None] | None = None

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        init_std: float = 0.02,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base_layer, r, alpha, use_rslora)
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight = base_layer.weight
        # nn.Linear stores (out, in); Conv1D stores (in, out).
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))  # (out, r)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters(init, init_std)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming", init_std: float = 0.02) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=init_std)
        else:
            # Same as nn.Linear's default and PEFT's: bound = 1 / sqrt(in_features).
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def base_weight(self) -> Tensor:
        """The base weight as ``(out, in)`` (a transposed view for Conv1D)."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def _delta_factors(self) -> tuple[Tensor, Tensor]:
        # nn.Linear: (out, r) @ (r, in); Conv1D stores W as (in, out): (in, r) @ (r, out)
        return (self.lora_A.t(), self.lora_B.t()) if self.fan_in_fan_out else (self.lora_B, self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._shared_input is not None and not torch.compiler.is_compiling():  # lora_lightning.sharing
            out = self._shared_input(self, x)
            if out is not None:
                return out
        weight, bias = self.base_weight(), self.base_layer.bias
        x_lora = self.lora_dropout(x) if self.training and isinstance(self.lora_dropout, nn.Dropout) else None
        device_type = x.device.type
        dtype = autocast_dtype(device_type)
        if dtype is not None:
            # Do what autocast does for F.linear (cast input, weight, bias to the autocast dtype),
            # then run the fused function with autocast off so every GEMM sees one dtype.
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            x_lora = x_lora.to(dtype) if x_lora is not None else None
            with torch.autocast(device_type, enabled=False):
                return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scale, x_lora)
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scale, x_lora)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class LoRAEmbedding(_LoRABase):
    """``h = E[x] + scale * (A^T[x]) B^T`` around an ``nn.Embedding``.

    A is (r x num_embeddings) and starts at zero, B is (embedding_dim x r) and starts random
    (as loralib and PEFT do for embeddings: the lookup side is the zero one), so the product
    ``B A`` is zero at the start, like for linear layers.
    """

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        init_std: float = 0.02,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base_layer, r, alpha, use_rslora)
        del dropout  # an index lookup has no input features to drop; kept for a uniform signature
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape  # (num_embeddings, embedding_dim)
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **factory))  # (r, num_embeddings)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # (dim, r)
        self.reset_lora_parameters(init, init_std)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming", init_std: float = 0.02) -> None:
        nn.init.zeros_(self.lora_A)
        if init == "gaussian":
            nn.init.normal_(self.lora_B, std=init_std)
        else:
            nn.init.normal_(self.lora_B)

    def _delta_factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A.t(), self.lora_B.t()  # (num_embeddings, r) @ (r, dim)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        after_A = F.embedding(
            x, self.lora_A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )  # (*, r)
        return result + (after_A @ self.lora_B.t()).to(result.dtype) * self.scale

    def extra_repr(self) -> str:
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, " + super().extra_repr()


LORA_LAYER_TYPES: tuple[type[nn.Module], ...] = (LoRALinear, LoRAEmbedding)


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LORA_LAYER_TYPES)
