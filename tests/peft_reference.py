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


def peft_bank_twin(base: nn.Module, adapted: nn.Module, **options) -> nn.Module:
    """A PEFT model of a copy of ``base`` adapting what ``adapted`` adapts (linear layers by full
    name, bank and router parameters by ``target_parameters``), carrying ``adapted``'s factors."""
    from lora_lightning.inject import lora_banks

    banks = lora_banks(adapted)
    parameters = sorted(f"{name}.{p}" for name, bank in banks.items() for p in bank.projections)
    config = LoraConfig(
        r=options.pop("r", 8),
        lora_alpha=options.pop("lora_alpha", 8),
        target_modules=sorted(lora_layers(adapted)),
        target_parameters=parameters,
        **options,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    inner = peft_model.base_model.model
    copy_factors(lora_layers(adapted), {n: inner.get_submodule(n) for n in lora_layers(adapted)})
    with torch.no_grad():
        for name, bank in banks.items():
            for p, wrapper in peft_wrappers(inner, name).items():
                A, B = bank_factors_as_peft(bank, p)
                wrapper.lora_A["default"].weight.copy_(A)
                wrapper.lora_B["default"].weight.copy_(B)
    return peft_model


def peft_wrappers(inner: nn.Module, name: str) -> dict[str, nn.Module]:
    """PEFT's nested ParamWrappers at ``name``, by the parameter each adapts."""
    found, module = {}, inner.get_submodule(name)
    while hasattr(module, "parameter_name"):
        found[module.parameter_name] = module
        module = module.base_layer
    return found


def bank_factors_as_peft(bank: nn.Module, p: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (E, r, in), (E, out, r) as PEFT's (r*E, in) expert-major rows and (out, r*E), expert e in
    columns e::E, written from PEFT's get_delta_weight reshapes (not from our file code)."""
    A, B = bank.lora_A[p].detach(), bank.lora_B[p].detach()
    experts, rank, _ = A.shape
    peft_A = torch.empty(experts * rank, A.shape[2], dtype=A.dtype)
    peft_B = torch.empty(B.shape[1], rank * experts, dtype=B.dtype)
    for e in range(experts):
        for i in range(rank):
            peft_A[e * rank + i] = A[e, i]
            peft_B[:, i * experts + e] = B[e, :, i]
    return peft_A, peft_B
