"""Merge adapters into the base weights, undo it, or unload them for a plain model (pure functions).

Each merge computes ``W + scale * B @ A`` in float32 and rounds once into W's dtype, so a bf16
model gains one rounding, not one per step of the product. Merging is idempotent: a layer that is
merged stays merged, so calling :func:`merge_lora` twice changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from lora_lightning.inject import adapted_modules, lora_layers, remove_lora_config, replace_submodule
from lora_lightning.kinds.experts import is_bank_4bit
from lora_lightning.nn.experts import is_lora_bank
from lora_lightning.nn.layers import is_lora_layer


def _untie_adapted_weights(model: nn.Module) -> None:
    """Give every other holder of an adapted weight its own copy before the delta is merged in.

    With tied weights (GPT-2's ``lm_head`` is ``wte``), merging an embedding adapter into the shared
    tensor would also change the head, which the adapted model never did. A transformers config that
    would re-tie them on load gets ``tie_word_embeddings = False``.
    """
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((module_name, module, param_name))
    untied: list[str] = []
    for layer in lora_layers(model).values():
        weight = layer.weight
        for module_name, module, param_name in holders.get(id(weight), []):
            if module is not layer.base_layer and getattr(module, param_name) is weight:
                setattr(module, param_name, nn.Parameter(weight.detach().clone(), weight.requires_grad))
                untied.append(module_name)
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        inside = any(not name or u == name or u.startswith(name + ".") for u in untied)
        if inside and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


@dataclass
class MergeFidelity:
    """How much of each adapter's update a merge kept, filled in by :func:`merge_lora` /
    :func:`merge_and_unload` when passed one.

    Per layer the relative error ``||kept - s B A||_F / ||s B A||_F``, where ``kept`` is what the
    stored weight actually changed by: rounding ``W + s B A`` into a bf16 or fp16 weight loses
    part of a small update (a float32 weight, next to nothing). Layers whose update is zero are
    not counted.
    """

    per_layer: dict[str, float] = field(default_factory=dict)
    _error_sq: float = 0.0
    _update_sq: float = 0.0

    def add(self, name: str, figures: tuple[float, float] | None) -> None:
        if figures is None or figures[1] == 0.0:
            return
        error_sq, update_sq = figures
        self.per_layer[name] = math.sqrt(error_sq / update_sq)
        self._error_sq += error_sq
        self._update_sq += update_sq

    @property
    def overall(self) -> float:
        """The relative error of all updates together (layers weighted by their update's size)."""
        return math.sqrt(self._error_sq / self._update_sq) if self._update_sq else 0.0

    @property
    def worst(self) -> float:
        return max(self.per_layer.values(), default=0.0)

    def summary(self) -> dict[str, float | int]:
        """``{"layers", "overall_rel_error", "max_rel_error", "mean_rel_error"}`` for logs and summaries."""
        values = list(self.per_layer.values())
        return {
            "layers": len(values),
            "overall_rel_error": self.overall,
            "max_rel_error": self.worst,
            "mean_rel_error": sum(values) / len(values) if values else 0.0,
        }

    def __str__(self) -> str:
        return (
            f"the merged weights hold the adapters' update to a relative error of {self.overall:.3g} "
            f"({len(self.per_layer)} layers, worst {self.worst:.3g})"
        )


def merge_lora(model: nn.Module, fidelity: MergeFidelity | None = None) -> nn.Module:
    """Fold every adapter into its base weight; forward then runs the base layers only.

    A quantized base layer is dequantized into a plain ``nn.Linear`` first (in its compute dtype),
    and :func:`unmerge_lora` puts the quantized layer back exactly.

    Args:
        model: a model carrying adapters.
        fidelity: filled with how much of each update the merged weights kept (costs a float64
            copy of one layer at a time); None skips the measurement.

    Returns:
        The same model, for chaining.
    """
    _untie_adapted_weights(model)
    for name, layer in adapted_modules(model).items():
        figures = layer.merge(measure=fidelity is not None)
        if fidelity is not None:
            fidelity.add(name, figures)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight (exact in float32 up to 1 ulp)."""
    for layer in adapted_modules(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, fidelity: MergeFidelity | None = None) -> nn.Module:
    """Merge, then put the original base modules back in place of the LoRA layers.

    The result has the original model's module tree and ``state_dict`` keys, so its weights load
    ``strict=True`` into a freshly built base model. Parameters keep their ``requires_grad``
    (base weights stay frozen; modules_to_save stay trainable). An adapted quantized layer comes
    back as a plain ``nn.Linear`` in its compute dtype holding ``W + s B A``; an adapted expert bank
    comes back as the model's experts module holding every ``W_e + s B_e A_e``.

    Args:
        model: a model carrying adapters.
        fidelity: see :func:`merge_lora`.

    Returns:
        The same model object, modified in place (a LoRA layer passed as the root is replaced by
        its base layer, which is returned).
    """
    if is_lora_layer(model) or is_lora_bank(model):
        figures = model.merge(measure=fidelity is not None)
        if fidelity is not None:
            fidelity.add("", figures)
        return _unquantized_bank(model.base_layer)
    merge_lora(model, fidelity)
    for name, layer in adapted_modules(model).items():
        replace_submodule(model, name, _unquantized_bank(layer.base_layer))
    remove_lora_config(model)
    return model


def _unquantized_bank(base: nn.Module) -> nn.Module:
    """A merged 4-bit expert bank as the model's own experts module, holding the merged dense weights."""
    return base.dequantized() if is_bank_4bit(base) else base
