"""What a fit merged, kept so that the base can come back: the callback's memory across fits.

At fit end the callback merges the final adapters into the weights. A later ``fit``, or a
``validate/test(ckpt_path=...)`` whose checkpoint holds adapters, needs the *base* weights again:
re-injecting the remembered factors and unmerging them restores them. That is only right for the
very module that was merged, with its merged weights untouched since; on any other module (a
fresh model given to a reused callback, or the same one trained further) an unmerge would
subtract an update that was never added. :class:`MergedAdapters` remembers the module (weakly) and
a fingerprint of the merged weights, and says whether a module is that one.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lightning.config import LoRAConfig
from lora_lightning.inject import adapted_modules, inject_lora, replace_submodule
from lora_lightning.kinds.experts import (
    DOWN,
    GATED_UP,
    PLAIN_UP,
    ROUTER_PARAMETER,
    is_bank_4bit,
    is_expert_bank,
    is_router,
)
from lora_lightning.lightning.checkpoint_record import base_fingerprint, compare_fingerprints
from lora_lightning.nn.experts import is_lora_bank
from lora_lightning.nn.layers import adaptable_kind


def _stored_weights(model: nn.Module, names: Iterable[str]) -> list[tuple[str, Tensor]] | None:
    """The stored base weight of each named module (adapted or plain), or None if one is missing."""
    found = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return None
        if is_lora_bank(module):
            module = module.base_layer
        kind = adaptable_kind(module)
        if kind is not None:
            found.append((name, kind.stored_weight(module)))
        elif is_bank_4bit(module):  # merged: the dense bank; else its codes
            found += [(f"{name}.{p}", module.dense.get(p, b.codes)) for p, b in module.banks_4bit.items()]
        elif is_expert_bank(module) or is_router(module):
            own = dict(module.named_parameters(recurse=False))
            found += [(f"{name}.{p}", own[p]) for p in (GATED_UP, PLAIN_UP, DOWN, ROUTER_PARAMETER) if p in own]
        else:
            return None
    return found


@dataclass
class _Layer:
    """What unmerging one merged layer needs: its adapter tensors, the buffers its merge or init
    left (PiSSA's starting factors, DoRA's unmerged norm), and a quantized base the merge replaced."""

    tensors: dict[str, Tensor]
    buffers: dict[str, Tensor]
    quantized: nn.Module | None


def snapshot_merged(model: nn.Module) -> dict[str, _Layer]:
    """Copies of every merged adapter layer's own tensors (small), taken after the merge, before the unload."""
    snapshot = {}
    for name, layer in adapted_modules(model).items():
        if is_lora_bank(layer):
            tensors = {
                key: value.detach().clone() for key, value in layer.named_parameters() if key.startswith("lora_")
            }
            # a 4-bit bank comes back as it was (its codes never changed), as a quantized layer does
            snapshot[name] = _Layer(tensors, {}, layer.base_layer if is_bank_4bit(layer.base_layer) else None)
            continue
        tensors = {role.attr: getattr(layer, role.attr).detach().clone() for role in layer.variant.roles}
        buffers = {key: value.detach().clone() for key, value in layer.named_buffers(recurse=False)}
        snapshot[name] = _Layer(tensors, buffers, layer._premerge_base)
    return snapshot


class MergedAdapters:
    """The adapters a fit merged into ``model``, and how to tell the merged module again.

    Args:
        model: the adapted module, right after the adapters were merged into its weights.
        layers: :func:`snapshot_merged` of it.
    """

    def __init__(self, model: nn.Module, layers: dict[str, _Layer]) -> None:
        self.layers = layers
        self._module = weakref.ref(model)
        self._merged = base_fingerprint(_stored_weights(model, layers) or [])

    def matches(self, model: nn.Module) -> bool:
        """``model`` is the module merged, and its merged weights are as the merge left them."""
        if self._module() is not model:
            return False
        weights = _stored_weights(model, self.layers)
        return weights is not None and not compare_fingerprints(self._merged, base_fingerprint(weights))

    @torch.no_grad()
    def restore(self, model: nn.Module, config: LoRAConfig) -> set[str]:
        """Re-inject the adapters into the merged ``model`` and unmerge them: its base weights return.

        The layers are created without their init (which, for PiSSA, would rewrite the merged
        weights) and given the remembered tensors.

        Returns:
            The names of the parameters restored by the unmerge (rounded in their own dtype).
        """
        for name, saved in self.layers.items():
            if saved.quantized is not None:
                replace_submodule(model, name, saved.quantized)  # the quantized layer as it was before the merge
        # quantize_banks=False: a bank merged dense must be unmerged, not quantized with the update in it
        inject_lora(model, config, initialize=False, quantize_banks=False)
        layers = adapted_modules(model)
        restored = set()
        for name, saved in self.layers.items():
            layer = layers[name]
            for attr, tensor in saved.tensors.items():
                layer.get_parameter(attr).copy_(tensor)
            for key, tensor in saved.buffers.items():
                layer.register_buffer(key, tensor, persistent=False)
            if saved.quantized is None:
                layer.merged = True
                layer.unmerge()
                restored |= {f"{name}.base_layer.{leaf}" for leaf, _ in layer.base_layer.named_parameters()}
        return restored
