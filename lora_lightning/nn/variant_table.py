"""Which variant a config asks for: the one table above plain LoRA and DoRA.

A new variant is a :class:`~lora_lightning.nn.variants.LoRAVariant` subclass in its own module
and one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_lightning.nn.dora import DORA
from lora_lightning.nn.variants import PLAIN, LoRAVariant, TensorRole

if TYPE_CHECKING:
    from lora_lightning.config import LoRAConfig


def variant_for(config: LoRAConfig) -> LoRAVariant:
    """The variant a config asks for: DoRA with ``use_dora``, else plain LoRA."""
    return DORA if config.use_dora else PLAIN


def roles_of(config: LoRAConfig) -> tuple[TensorRole, ...]:
    """Every tensor role an adapted layer of this config owns (what a file must hold per module)."""
    return variant_for(config).roles
