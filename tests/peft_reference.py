"""HF PEFT as the independent reference: same config, same factors, compare outputs and counts."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_lightning import LoRAConfig
from lora_lightning.inject import lora_layers


def peft_config_for(config: LoRAConfig, adapted: nn.Module | None = None) -> LoraConfig:
    """The PEFT LoraConfig that selects and scales exactly as ``config`` does.

    PEFT refuses "all-linear" together with ``layers_to_transform`` (we allow it); for that case
    pass the adapted model and the leaf names it adapted stand in for "all-linear".
    """
    targets = config.target_modules
    if config.is_all_linear and config.layers_to_transform is not None:
        assert adapted is not None, "pass the adapted model to translate all-linear + layers_to_transform"
        targets = sorted({name.rsplit(".", 1)[-1] for name in lora_layers(adapted)})
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias=config.bias,
        target_modules=targets,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        modules_to_save=config.modules_to_save,
    )


def peft_twin(base: nn.Module, config: LoRAConfig, adapted: nn.Module) -> nn.Module:
    """A PEFT model of a copy of ``base`` carrying ``adapted``'s LoRA factors."""
    peft_model = get_peft_model(copy.deepcopy(base), peft_config_for(config, adapted))
    inner = peft_model.base_model.model
    ours = lora_layers(adapted)
    theirs = {
        n: m
        for n, m in inner.named_modules()
        if hasattr(m, "lora_A") and ("default" in m.lora_A or "default" in m.lora_embedding_A)
    }
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs)))[:10]
    copy_factors(ours, theirs)
    return peft_model


@torch.no_grad()
def copy_factors(ours: dict[str, nn.Module], theirs: dict[str, nn.Module]) -> None:
    """Copy each of our layers' A, B (and DoRA magnitude) into the PEFT layer of the same name."""
    for name, layer in ours.items():
        twin = theirs[name]
        if "default" in twin.lora_A:
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
        else:
            twin.lora_embedding_A["default"].copy_(layer.lora_A)
            twin.lora_embedding_B["default"].copy_(layer.lora_B)
        if getattr(layer, "lora_magnitude_vector", None) is not None:
            twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
