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

import torch
from torch import Tensor, nn

from lora_lightning.checkpoint import base_fingerprint, compare_fingerprints
from lora_lightning.config import LoRAConfig
from lora_lightning.inject import _set_submodule, inject_lora, lora_layers
from lora_lightning.layers import adaptable_kind


def _stored_weights(model: nn.Module, names: Iterable[str]) -> list[tuple[str, Tensor]] | None:
    """The stored base weight of each named module (adapted or plain), or None if one is missing."""
    found = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return None
        kind = adaptable_kind(module)
        if kind is None:
            return None
        found.append((name, kind.stored_weight(module)))
    return found


Snapshot = dict[str, tuple[Tensor, Tensor, nn.Module | None]]


def snapshot_factors(model: nn.Module) -> Snapshot:
    """Copies of every adapter's factors (small), taken before they are merged, and each quantized
    base layer itself: a merge dequantizes it, and only the original brings the exact base back."""
    snapshot: Snapshot = {}
    for name, layer in lora_layers(model).items():
        quantized = None if layer.kind.dense else layer.base_layer
        snapshot[name] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), quantized)
    return snapshot


class MergedAdapters:
    """The factors a fit merged into ``model``, and how to tell the merged module again.

    Args:
        model: the adapted module, right after the adapters were merged into its weights.
        factors: :func:`snapshot_factors` of it, taken before the merge.
    """

    def __init__(self, model: nn.Module, factors: Snapshot) -> None:
        self.factors = factors
        self._module = weakref.ref(model)
        self._merged = base_fingerprint(_stored_weights(model, factors) or [])

    def matches(self, model: nn.Module) -> bool:
        """``model`` is the module merged, and its merged weights are as the merge left them."""
        if self._module() is not model:
            return False
        weights = _stored_weights(model, self.factors)
        return weights is not None and not compare_fingerprints(self._merged, base_fingerprint(weights))

    @torch.no_grad()
    def restore(self, model: nn.Module, config: LoRAConfig, share_inputs: bool) -> set[str]:
        """Re-inject the adapters into the merged ``model`` and unmerge them: its base weights return.

        Returns:
            The names of the parameters restored by the unmerge (rounded in their own dtype).
        """
        for name, (_, _, quantized) in self.factors.items():
            if quantized is not None:
                _set_submodule(model, name, quantized)  # the quantized layer as it was before the merge
        inject_lora(model, config, share_inputs=share_inputs)
        layers = lora_layers(model)
        restored = set()
        for name, (lora_A, lora_B, quantized) in self.factors.items():
            layer = layers[name]
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
            if quantized is None:
                layer.merged = True
                layer.unmerge()
                restored |= {f"{name}.base_layer.{leaf}" for leaf, _ in layer.base_layer.named_parameters()}
        return restored
