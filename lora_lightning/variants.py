"""The variant seam: what a LoRA variant adds to plain LoRA, as one small unit a layer composes.

A variant says which tensors an adapted layer owns besides nothing (:class:`TensorRole`: the
attribute, its shape, and the key PEFT's files give it), how they start (``init``), how the layer
computes its output (``forward``), how the update folds into the base weight and back (``merge``,
``unmerge``), and whether the layer's fused kernel and input grouping compute it (``fusable``).
Plain LoRA is the base class; a variant such as DoRA subclasses it and changes only what differs.
The file format reads its tensor roles from :func:`roles_of`, so a variant's extra tensor is one
:class:`TensorRole`, not a change in the key parser and the load planner.

Initialisations of A and B (``INITS``) are separate from variants: an init such as PiSSA that also
rewrites the base weight composes with any variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.config import LoRAConfig
    from lora_lightning.layers import LoRALayer


@dataclass(frozen=True)
class FileName:
    """How PEFT names one tensor in a file: ``<module>.<stem><saved>``, or raw ``<module>.<stem>.<adapter><raw>``.

    E.g. a linear's A: ``q_proj.lora_A.weight`` / ``q_proj.lora_A.default.weight``; an embedding's A:
    ``embed.lora_embedding_A`` / ``embed.lora_embedding_A.default``.
    """

    stem: str
    saved: str = ""
    raw: str = ""


@dataclass(frozen=True)
class TensorRole:
    """One tensor an adapted layer owns: attribute name, expected shape and PEFT's key for it.

    Attributes:
        attr: the layer attribute and our state_dict leaf (``lora_A``).
        shape: ``(in_features, out_features, r) -> shape``.
        linear: PEFT's name on a linear layer.
        embedding: PEFT's name on an embedding; None when the role does not exist there.
    """

    attr: str
    shape: Callable[[int, int, int], tuple[int, ...]]
    linear: FileName
    embedding: FileName | None

    def file_name(self, embedding: bool) -> FileName | None:
        return self.embedding if embedding else self.linear


LORA_A = TensorRole(
    "lora_A", lambda i, o, r: (r, i), FileName("lora_A", ".weight", ".weight"), FileName("lora_embedding_A")
)
LORA_B = TensorRole(
    "lora_B", lambda i, o, r: (o, r), FileName("lora_B", ".weight", ".weight"), FileName("lora_embedding_B")
)


# -- initialisations of A and B ------------------------------------------------------------------


def _init_kaiming(layer: LoRALayer, std: float) -> None:
    del std
    if layer.kind.embedding:  # the lookup side starts at zero (loralib, PEFT), B is N(0, 1)
        nn.init.zeros_(layer.lora_A)
        nn.init.normal_(layer.lora_B)
    else:  # nn.Linear's default and PEFT's: bound = 1 / sqrt(in_features); B starts at zero
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B)


def _init_gaussian(layer: LoRALayer, std: float) -> None:
    if layer.kind.embedding:
        nn.init.zeros_(layer.lora_A)
        nn.init.normal_(layer.lora_B, std=std)
    else:
        nn.init.normal_(layer.lora_A, std=std)
        nn.init.zeros_(layer.lora_B)


#: init name -> function(layer, std) that sets the layer's factors so that ``B A = 0``.
INITS: dict[str, Callable[[LoRALayer, float], None]] = {"kaiming": _init_kaiming, "gaussian": _init_gaussian}


# -- variants --------------------------------------------------------------------------------------


class LoRAVariant:
    """Plain LoRA, ``h = W x + scale * B A x``; the base class every variant changes part of."""

    name = "lora"
    roles: tuple[TensorRole, ...] = (LORA_A, LORA_B)
    fusable = True  # the layer's fused kernel (and input grouping) compute exactly this variant

    def create(self, layer: LoRALayer) -> None:
        """Create the tensors this variant adds beyond A and B (none for plain LoRA)."""

    def forward(self, layer: LoRALayer, x: Tensor) -> Tensor:
        return layer.lora_forward(x)

    @torch.no_grad()
    def merge(self, layer: LoRALayer) -> None:
        """``W <- W + scale * B @ A``, summed in float32 and rounded once into W's dtype."""
        layer.kind.add_update(layer.base_layer, layer.lora_B, layer.lora_A, layer.scale)

    @torch.no_grad()
    def merged_weight(self, layer: LoRALayer, weight: Tensor) -> Tensor:
        """``weight + scale * B @ A`` for a float32 ``(out, in)`` ``weight``, summed in float32 (in place)."""
        return weight.addmm_(layer.lora_B.float(), layer.lora_A.float(), alpha=layer.scale)

    @torch.no_grad()
    def exact_update(self, layer: LoRALayer, weight: Tensor) -> Tensor:
        """What a merge should add to ``weight`` (``(out, in)``, float64), computed in float64."""
        del weight
        return layer.lora_B.double() @ layer.lora_A.double() * layer.scale

    @torch.no_grad()
    def unmerge(self, layer: LoRALayer) -> None:
        layer.kind.add_update(layer.base_layer, layer.lora_B, layer.lora_A, -layer.scale)


PLAIN = LoRAVariant()
#: every tensor role any variant defines: what a file's keys are parsed against
ALL_ROLES: tuple[TensorRole, ...] = PLAIN.roles


def variant_for(config: LoRAConfig) -> LoRAVariant:
    """The variant a config asks for."""
    del config
    return PLAIN


def roles_of(config: LoRAConfig) -> tuple[TensorRole, ...]:
    """Every tensor role an adapted layer of this config owns (what a file must hold per module)."""
    return variant_for(config).roles
