"""What a frozen base layer is, and how to read and update it: one :class:`BaseKind` per kind.

A LoRA layer never reads its base layer's ``weight`` itself. It asks the layer's :class:`BaseKind`
for the sizes, the dtype and device the adapter factors should match, the dense ``(out, in)``
weight (a view, or a dequantized copy for a quantized kind), and to add an update ``alpha * left @
right`` into the stored weight. Injection, load planning and merging ask the same
object, so a new kind of base layer (bitsandbytes 4-/8-bit, :mod:`lora_lightning.kinds.bnb`) is one
new class, not a change in every module that touches weights.

This package owns the registry: :mod:`~lora_lightning.kinds.dense` (``nn.Linear``, Conv1D,
Embedding) and :mod:`~lora_lightning.kinds.bnb` (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``,
which import bitsandbytes only once a model holding such layers has loaded it).
"""

from __future__ import annotations

from torch import Tensor, nn

from lora_lightning.kinds.bnb import Linear4bitKind, Linear8bitKind, packed_numel
from lora_lightning.kinds.dense import BaseKind, Conv1DKind, EmbeddingKind

# Tried in order: kinds registered later first, then the bitsandbytes kinds (their layers subclass
# nn.Linear), then the dense ones.
_KINDS: list[BaseKind] = [Linear8bitKind(), Linear4bitKind(), BaseKind(), Conv1DKind(), EmbeddingKind()]


def register_kind(kind: BaseKind) -> None:
    """Make a new kind of base layer adaptable (tried before the built-in ones); idempotent per class."""
    if not any(type(k) is type(kind) for k in _KINDS):
        _KINDS.insert(0, kind)


def logical_numel(param: Tensor) -> int:
    """The number of parameters ``param`` stands for: its numel, unpacked for a packed 4-bit tensor."""
    packed = packed_numel(param)
    return param.numel() if packed is None else packed


def base_kind(module: nn.Module) -> BaseKind | None:
    """The kind of ``module`` if an adapter can wrap it, else None."""
    return next((kind for kind in _KINDS if kind.claims(module)), None)


def is_linear_like(module: nn.Module) -> bool:
    """A linear layer of any supported kind (not an embedding)."""
    kind = base_kind(module)
    return kind is not None and not kind.embedding


__all__ = ["BaseKind", "base_kind", "is_linear_like", "logical_numel", "register_kind"]
