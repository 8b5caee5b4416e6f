"""The variant seam: what a LoRA variant adds to plain LoRA, as one small unit a layer composes.

A variant says which tensors an adapted layer owns besides nothing (:class:`TensorRole`: the
attribute, its shape, and the key PEFT's files give it), how they start (``init``), how the layer
computes its output (``forward``), how the update folds into the base weight and back (``merge``,
``unmerge``). Plain LoRA is the base class; a variant such as DoRA subclasses it and changes only what differs.
The file format reads its tensor roles from :func:`roles_of`, so a variant's extra tensor is one
:class:`TensorRole`, not a change in the key parser and the load planner.

Initialisations of A and B (:mod:`lora_lightning.nn.inits`) are separate from variants: an init such
as PiSSA that also rewrites the base weight is a function, not a variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.nn.layers import LoRALayer


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
# DoRA's magnitude, one per output: PEFT saves "<m>.lora_magnitude_vector" (raw: ".default.weight").
MAGNITUDE = TensorRole(
    "lora_magnitude_vector",
    lambda i, o, r: (o,),
    FileName("lora_magnitude_vector", "", ".weight"),
    FileName("lora_magnitude_vector", "", ".weight"),
)


# -- variants --------------------------------------------------------------------------------------


class LoRAVariant:
    """Plain LoRA, ``h = W x + scale * B A x``; the base class every variant changes part of."""

    name = "lora"
    roles: tuple[TensorRole, ...] = (LORA_A, LORA_B)

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
ALL_ROLES: tuple[TensorRole, ...] = (LORA_A, LORA_B, MAGNITUDE)
