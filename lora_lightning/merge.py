"""Merge adapters into the base weights, undo it, or unload them for a plain model (pure functions).

Each merge computes ``W + scale * B @ A`` in float32 and rounds once into W's dtype, so a bf16
model gains one rounding, not one per step of the product. Merging is idempotent: a layer that is
merged stays merged, so calling :func:`merge_lora` twice changes nothing.
"""

from __future__ import annotations

from torch import nn

from lora_lightning.inject import _set_submodule, lora_layers, remove_lora_config
from lora_lightning.layers import is_lora_layer


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


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; forward then runs the base layers only.

    Returns:
        The same model, for chaining.
    """
    _untie_adapted_weights(model)
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight (exact in float32 up to 1 ulp)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the original base modules back in place of the LoRA layers.

    The result has the original model's module tree and ``state_dict`` keys, so its weights load
    ``strict=True`` into a freshly built base model. Parameters keep their ``requires_grad``
    (base weights stay frozen; modules_to_save stay trainable).

    Returns:
        The same model object, modified in place (a LoRA layer passed as the root is replaced by
        its base layer, which is returned).
    """
    if is_lora_layer(model):
        model.merge()
        return model.base_layer
    _untie_adapted_weights(model)
    for name, layer in lora_layers(model).items():
        layer.merge()
        _set_submodule(model, name, layer.base_layer)
    remove_lora_config(model)
    return model
