"""Swap in LoRA layers for the planned targets, freeze the base, and count parameters (pure torch).

``inject_lora`` plans everything first (which modules, which ranks, every error) and touches the
model only once the plan is complete, so a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lora_lightning.config import LoRAConfig
from lora_lightning.kinds import logical_numel
from lora_lightning.kinds.experts import is_bank_4bit, is_expert_bank
from lora_lightning.nn.experts import LoRAExperts, LoRARouter, ParameterAdapter, is_lora_bank
from lora_lightning.nn.layers import LoRAEmbedding, LoRALayer, LoRALinear, adaptable_kind, is_lora_layer
from lora_lightning.nn.variant_table import variant_for
from lora_lightning.ops.process_memory import release_mapped_weights
from lora_lightning.quantize import quantize_banks_like
from lora_lightning.summary import AdaptedModule, LoRAReport, ParameterSummary, parameter_summary
from lora_lightning.targets import BankTarget, modules_to_save, plan_adapters

_CONFIG_ATTR = "_lora_config"


def get_lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config adapters were injected with, found on the model or on the submodule that holds it."""
    for module in model.modules():
        config = getattr(module, _CONFIG_ATTR, None)
        if isinstance(config, LoRAConfig):
            return config
    return None


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer (linear, embedding) of the model by its full name (the name the original module had)."""
    return {name: module for name, module in model.named_modules() if is_lora_layer(module)}


def lora_banks(model: nn.Module) -> dict[str, ParameterAdapter]:
    """Every adapted expert bank (and router) of the model by its full name (``model.layers.0.mlp.experts``)."""
    return {name: module for name, module in model.named_modules() if is_lora_bank(module)}


def adapted_modules(model: nn.Module) -> dict[str, LoRALayer | ParameterAdapter]:
    """Every adapted module, layers and banks: what merging, unloading and "is it adapted?" go through."""
    return {name: m for name, m in model.named_modules() if is_lora_layer(m) or is_lora_bank(m)}


def bank_ranks(config: LoRAConfig, bank: BankTarget) -> dict[str, tuple[int, float]]:
    """``{projection: (r, alpha)}``: rank_pattern / alpha_pattern keys match the parameter's full name
    (``...experts.gate_up_proj``, as PEFT's target_parameters do), else the bank's module name."""
    ranks = {}
    for projection, name in zip(bank.projections, bank.parameter_names(), strict=True):
        r = config.rank_for(name) if config.has_pattern(config.rank_pattern, name) else config.rank_for(bank.name)
        alpha = (
            config.alpha_for(name) if config.has_pattern(config.alpha_pattern, name) else config.alpha_for(bank.name)
        )
        ranks[projection] = (r, alpha)
    return ranks


def _check_base(name: str, module: nn.Module) -> None:
    problem = adaptable_kind(module).problem(module)
    if problem is not None:
        raise TypeError(f"module {name!r} ({type(module).__name__}) {problem}")


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def trains_bias(key: str, config: LoRAConfig, adapted_linears: set[str]) -> bool:
    """Whether ``config.bias`` trains the tensor under this (post-injection) state_dict key.

    ``"all"``: every key containing "bias" (PEFT's rule, so counts and files agree with it);
    ``"lora_only"``: the bias of an adapted linear (``<name>.base_layer.bias``).
    """
    if config.bias == "all":
        return "bias" in key
    if config.bias == "lora_only":
        module, _, leaf = key.rpartition(".base_layer.")
        return leaf == "bias" and module in adapted_linears
    return False


def adapted_linear_names(model: nn.Module) -> set[str]:
    return {name for name, layer in lora_layers(model).items() if isinstance(layer, LoRALinear)}


def mark_trainable(model: nn.Module, config: LoRAConfig) -> None:
    """Freeze every parameter, then unfreeze adapters, biases per ``config.bias``, modules_to_save."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in lora_layers(model).values():
        for role in layer.variant.roles:
            getattr(layer, role.attr).requires_grad_(True)
        if config.freeze_A and isinstance(layer, LoRALinear):
            layer.lora_A.requires_grad_(False)
    for bank in lora_banks(model).values():
        for param in bank.lora_B.values():
            param.requires_grad_(True)
        for param in bank.lora_A.values():
            param.requires_grad_(not config.freeze_A)
    linears = adapted_linear_names(model)
    for name, param in model.named_parameters():
        if trains_bias(name, config, linears):
            param.requires_grad_(True)
    for _, module in modules_to_save(model, config):
        for param in module.parameters():
            param.requires_grad_(True)


def lora_report(model: nn.Module, config: LoRAConfig | None = None) -> LoRAReport:
    """The report for a model that already carries adapters."""
    config = config or get_lora_config(model)
    if config is None:
        raise ValueError("model carries no LoRA config: inject adapters with inject_lora first")
    modules = [
        AdaptedModule(
            name=name,
            kind=layer.kind.name,
            in_features=layer.in_features,
            out_features=layer.out_features,
            r=layer.r,
            alpha=layer.alpha,
            scale=layer.scale,
        )
        for name, layer in lora_layers(model).items()
    ]
    for name, bank in lora_banks(model).items():
        modules += [
            AdaptedModule(
                name=f"{name}.{p}",
                kind=bank.kind.name,
                in_features=bank.features[p][0],
                out_features=bank.features[p][1],
                r=bank.r[p],
                alpha=bank.alpha[p],
                scale=bank.scale[p],
                experts=bank.num_experts,
            )
            for p in bank.projections
        ]
    saved = [name for name, _ in modules_to_save(model, config)]
    experts, adapted = expert_parameter_counts(model)
    return LoRAReport(
        config=config,
        modules=modules,
        modules_to_save=saved,
        params=parameter_summary(model),
        expert_params=experts,
        adapted_expert_params=adapted,
    )


def expert_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """Base parameters in fused expert banks, and those of them in banks that carry adapters."""
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, LoRAExperts)}
    total = adapted = 0
    for module in model.modules():
        if is_bank_4bit(module):
            count = sum(bank.logical_numel() for bank in module.banks_4bit.values())
            total += count
            adapted += count if id(module) in wrapped else 0
        elif is_expert_bank(module):
            count = sum(logical_numel(p) for p in module.parameters(recurse=False))
            total += count
            adapted += count if id(module) in wrapped else 0
    return total, adapted


def inject_lora(
    model: nn.Module, config: LoRAConfig, *, initialize: bool = True, quantize_banks: bool | None = None
) -> LoRAReport:
    """Swap the selected modules for LoRA layers in place and freeze everything else.

    Works on the meta device (adapter factors are created where the base weight lives), so a
    parameter count for an 8B-parameter config costs no memory.

    Injecting into a model that already carries adapters is a no-op returning the report when
    the config is identical (so repeated setup calls are safe), and an error otherwise.

    Args:
        model: any ``nn.Module``; modified in place.
        config: what to adapt.
        initialize: run the config's init (which, for PiSSA / OLoRA, rewrites the base into the
            residual); False leaves zero factors and the base untouched, for a caller that loads
            the factors (and the base) it had.
        quantize_banks: quantize the fused expert banks of a Mixture-of-Experts model whose linear
            layers are bitsandbytes 4-bit (``load_in_4bit``, which leaves the experts in 16 bits) in
            the same format (:func:`~lora_lightning.quantize.quantize_banks_like`); None: when the
            model is 4-bit; False: never. The report says how many bytes it saved.

    Returns:
        A :class:`LoRAReport` of adapted modules and parameter counts.

    Raises:
        ValueError / TypeError: before the model is modified; see :func:`plan_targets`.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    existing = adapted_modules(model)
    if existing:
        previous = get_lora_config(model)
        if previous == config:
            return lora_report(model, config)
        described = f"r={previous.r}, target_modules={previous.target_modules!r}" if previous else "unknown config"
        raise ValueError(
            f"model already carries LoRA adapters on {len(existing)} module(s) ({described}); injecting a "
            f"different config (r={config.r}, target_modules={config.target_modules!r}) on top is not supported: "
            "call merge_and_unload(model) first, or pass the same config to make this a no-op"
        )

    targets, banks = plan_adapters(model, config)
    for name, module in targets:
        _check_base(name, module)
    quantized_banks = None
    if quantize_banks is not False:
        kept = [name for name, _ in modules_to_save(model, config)]
        quantized_banks = quantize_banks_like(model, required=quantize_banks is True, keep=kept)
        if quantized_banks is not None:  # the banks are other modules now
            targets, banks = plan_adapters(model, config)
    options = {
        "use_rslora": config.use_rslora,
        "init": config.init_lora_weights if initialize else None,
        "init_std": config.init_std,
        "dtype": getattr(torch, config.adapter_dtype) if config.adapter_dtype else None,
        "variant": variant_for(config),
    }
    for name, module in targets:
        r, alpha = config.rank_for(name), config.alpha_for(name)
        if adaptable_kind(module).embedding:
            layer: LoRALayer = LoRAEmbedding(module, r, alpha, **options)
        else:
            layer = LoRALinear(module, r, alpha, dropout=config.dropout, **options)
        replace_submodule(model, name, layer)
    for bank in banks:
        adapted = (LoRARouter if bank.router else LoRAExperts)(
            bank.module,
            bank_ranks(config, bank),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=options["init"],
            init_std=config.init_std,
            dtype=options["dtype"],
        )
        replace_submodule(model, bank.name, adapted)
    holds_quantized = False
    for module in model.modules():  # every quantized layer, adapted or not, keeps one weight layout
        kind = adaptable_kind(module)
        if kind is not None and not kind.dense and not is_lora_layer(module):
            kind.adopt(module)
            holds_quantized = True
    if holds_quantized:  # the full-precision checkpoint it was quantized from need not stay resident
        release_mapped_weights(model)
    setattr(model, _CONFIG_ATTR, config)
    mark_trainable(model, config)
    report = lora_report(model, config)
    return dataclasses.replace(report, quantized_banks=quantized_banks) if quantized_banks else report


def remove_lora_config(model: nn.Module) -> None:
    """Forget the stored config (after the adapters have been unloaded): the plain model keeps
    nothing of lora_lightning."""
    for module in model.modules():
        if _CONFIG_ATTR in vars(module):
            delattr(module, _CONFIG_ATTR)


__all__ = [
    "AdaptedModule",
    "LoRAReport",
    "ParameterSummary",
    "adapted_modules",
    "get_lora_config",
    "inject_lora",
    "lora_banks",
    "lora_layers",
    "lora_report",
    "mark_trainable",
    "parameter_summary",
]
