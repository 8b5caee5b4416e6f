"""Adapters in and out: PEFT-format save / load, adapter-only state, and merged checkpoints.

* :func:`save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as HF
  PEFT does, so PEFT, vLLM's LoRA serving and the Hub read it (mapping in :mod:`.peft_format`).
* :func:`load_adapter` reads ours or PEFT's, checks every tensor against the injection plan *before*
  touching the model (every tensor finds its module, every adapted module gets its tensors, shapes
  and ranks agree), then injects and copies. Pickle files are never read.
* :func:`export_merged` writes a plain checkpoint (``save_pretrained`` for transformers models,
  ``model.safetensors`` with the original keys otherwise).

Every write goes to a temporary sibling directory that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from lora_lightning.config import LoRAConfig
from lora_lightning.inject import (
    _CONFIG_ATTR,
    LoRAReport,
    adapted_linear_names,
    adapted_modules,
    bank_ranks,
    inject_lora,
    lora_banks,
    lora_layers,
    lora_report,
    remove_lora_config,
    replace_submodule,
    trains_bias,
)
from lora_lightning.io import peft_format as pf
from lora_lightning.io.atomic_files import atomic_directory, check_destination, tensors_for_file
from lora_lightning.io.export import export_merged
from lora_lightning.io.load_plan import choose_config, plan_load, saved_modules, with_file_dtype
from lora_lightning.kinds.bnb_experts import projection_order
from lora_lightning.nn.experts import LoRAExperts
from lora_lightning.nn.inits import rewrites_base
from lora_lightning.nn.layers import LoRALinear, adaptable_kind
from lora_lightning.targets import plan_adapters, plan_targets

# How save_adapter writes adapted expert banks (see its docstring).
EXPERT_FILE_LAYOUTS = ("fused", "per_expert")

# -- what belongs to the adapter ---------------------------------------------------------------------


def _adapted_root(model: nn.Module) -> tuple[str, nn.Module, LoRAConfig]:
    """The submodule ``inject_lora`` was called on (it holds the config), its name, and the config."""
    for name, module in model.named_modules():
        config = vars(module).get(_CONFIG_ATTR)
        if isinstance(config, LoRAConfig) and adapted_modules(module):
            return name, module, config
    raise ValueError("model carries no LoRA adapters: inject them with inject_lora or load_adapter first")


def _own_adapter_state(root: nn.Module, config: LoRAConfig) -> dict[str, Tensor]:
    """Adapter tensors under ``root``'s own state_dict keys: factors, trained biases, modules_to_save."""
    state = root.state_dict(keep_vars=True)
    out: dict[str, Tensor] = {}
    for name, layer in lora_layers(root).items():
        out.update({f"{name}.{role.attr}": getattr(layer, role.attr) for role in layer.variant.roles})
    for name, bank in lora_banks(root).items():
        for p in bank.projections:
            out[f"{name}.lora_A.{p}"], out[f"{name}.lora_B.{p}"] = bank.lora_A[p], bank.lora_B[p]
    linears = adapted_linear_names(root)
    out.update({k: v for k, v in state.items() if isinstance(v, nn.Parameter) and trains_bias(k, config, linears)})
    for module in saved_modules(root, config):
        out.update({k: v for k, v in state.items() if k.startswith(module + ".")})
    return {key: tensor.detach() for key, tensor in out.items()}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable adapter state under ``model``'s own state_dict keys.

    Holds every ``lora_A`` (r x in) and ``lora_B`` (out x r), the biases ``config.bias`` trains and
    the state of ``modules_to_save``, so ``model.load_state_dict(sd, strict=False)`` restores an
    adapter-only checkpoint. Tensors are detached and share storage with the model.

    Raises:
        ValueError: the model carries no adapters.
    """
    prefix, root, config = _adapted_root(model)
    dot = prefix + "." if prefix else ""
    return {dot + key: tensor for key, tensor in _own_adapter_state(root, config).items()}


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(value) if value else None


def _bank_parameters(root: nn.Module) -> dict[str, tuple[int, float]]:
    """Full parameter name -> (r, alpha) of every adapted bank / router parameter."""
    return {
        f"{name}.{p}": (bank.r[p], bank.alpha[p]) for name, bank in lora_banks(root).items() for p in bank.projections
    }


def _check_round_trip(root: nn.Module, data: dict[str, Any], ranks: Mapping[str, tuple[int, float]]) -> None:
    """The written config must select exactly the adapted modules and parameters with their ranks and alphas."""
    config = pf.config_from_peft(data)
    targets, banks = plan_adapters(root, config)
    selected = {name: (config.rank_for(name), config.alpha_for(name)) for name, _ in targets}
    for bank in banks:
        selected.update({f"{bank.name}.{p}": value for p, value in bank_ranks(config, bank).items()})
    wrong = sorted(name for name in set(selected) | set(ranks) if selected.get(name) != ranks.get(name))
    if wrong:
        raise ValueError(f"adapter layers disagree with their config at {wrong[:5]}; were layers replaced by hand?")


def _for_original_base(tensors: dict[str, Tensor], layers: Mapping[str, Any]) -> dict[str, Tensor]:
    """PiSSA / OLoRA factors as an update of the original base: ``[A; A0]`` and ``[B, -B0]`` (rank 2r)."""
    out = dict(tensors)
    for name, layer in layers.items():
        A0, B0 = layer.lora_A_init, layer.lora_B_init
        out[f"{name}.lora_A"] = torch.cat([tensors[f"{name}.lora_A"], A0.to(layer.lora_A.dtype)], dim=0)
        out[f"{name}.lora_B"] = torch.cat([tensors[f"{name}.lora_B"], -B0.to(layer.lora_B.dtype)], dim=1)
    return out


def _bank_file_tensors(root: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """PEFT's file tensors of every adapted bank / router; their keys leave ``state``."""
    tensors = {}
    for name, bank in lora_banks(root).items():
        order = projection_order(bank.base_layer, bank.projections)
        for p, path in pf.bank_wrapper_paths(name, order).items():
            A, B = pf.bank_to_file(state.pop(f"{name}.lora_A.{p}"), state.pop(f"{name}.lora_B.{p}"))
            tensors[f"{pf.PEFT_PREFIX}{path}.lora_A.weight"] = A
            tensors[f"{pf.PEFT_PREFIX}{path}.lora_B.weight"] = B
    return tensors


def _per_expert_file_tensors(
    root: nn.Module, state: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, tuple[int, float]]]:
    """Every adapted bank as per-expert linear adapters (and a router as the linear layer it was),
    with their (r, alpha) by module name; their keys leave ``state``."""
    tensors, ranks = {}, {}
    for name, bank in lora_banks(root).items():
        for p in bank.projections:
            A, B = state.pop(f"{name}.lora_A.{p}"), state.pop(f"{name}.lora_B.{p}")
            if isinstance(bank, LoRAExperts):
                linears = pf.bank_per_expert(name, bank.layout, p, A, B)
            else:  # the router's weight: the (E x H) linear layer of models with per-expert layers
                linears = {name: (A[0], B[0])}
            for linear, (A_e, B_e) in linears.items():
                tensors[f"{pf.PEFT_PREFIX}{linear}.lora_A.weight"] = A_e
                tensors[f"{pf.PEFT_PREFIX}{linear}.lora_B.weight"] = B_e
                ranks[linear] = (bank.r[p], bank.alpha[p])
    return tensors, ranks


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    *,
    experts: str = "fused",
) -> Path:
    """Write the model's adapter in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Keys are relative to the module the adapters were injected into (it holds the config), so an
    adapter injected into ``lit_module.model`` loads into the bare transformers model. An existing
    ``directory`` is replaced as a whole, and only once the new one is complete.

    Args:
        model: a model carrying adapters (or a module containing the adapted one).
        directory: destination directory.
        base_model_name_or_path: written to the config; default ``model.name_or_path`` when set.
        task_type: PEFT task type; default detected from the transformers class (``CAUSAL_LM``
            for ``*ForCausalLM``), None for other models.
        experts: how adapted expert banks are written. "fused": PEFT's ``target_parameters``
            layout, which PEFT and this package load (and vLLM for models that set
            ``is_3d_moe_weight``). "per_expert": one linear LoRA per expert,
            ``<bank>.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` (a router as its linear
            layer), the layout of checkpoints with per-expert layers, which vLLM's other MoE models
            (Qwen3-MoE, ...) read; rank r each, the same update. Neither PEFT on transformers 5 nor
            :func:`load_adapter` reads it back.

    Returns:
        The directory.
    """
    if experts not in EXPERT_FILE_LAYOUTS:
        raise ValueError(f"experts must be one of {', '.join(EXPERT_FILE_LAYOUTS)}, got {experts!r}")
    target = Path(directory)
    check_destination(target, (pf.CONFIG_NAME,))
    _, root, config = _adapted_root(model)
    if experts == "per_expert" and not lora_banks(root):
        raise ValueError("experts='per_expert' writes adapted expert banks per expert; this model has none adapted")
    layers = lora_layers(root)
    state = _own_adapter_state(root, config)
    ranks = {name: (layer.r, layer.alpha) for name, layer in layers.items()}
    parameters = _bank_parameters(root)
    written = config
    if rewrites_base(config.init_lora_weights):  # the base was rewritten: write for the original one
        written, factor = pf.for_original_base(config), pf.alpha_factor(config)
        state = _for_original_base(state, layers)
        ranks = {name: (2 * r, alpha * factor) for name, (r, alpha) in ranks.items()}
    if experts == "per_expert":
        tensors, per_expert = _per_expert_file_tensors(root, state)
        ranks, parameters = {**ranks, **per_expert}, {}
    else:
        tensors = _bank_file_tensors(root, state)
    for key, tensor in state.items():
        layer = layers.get(key.rpartition(".")[0])
        roles = layer.variant.roles if layer is not None else ()
        tensors[pf.to_peft_key(key, roles, layer is not None and layer.kind.embedding)] = tensor
    saved = saved_modules(root, config)
    linear = [layer for layer in layers.values() if isinstance(layer, LoRALinear)]
    if task_type is None:
        task_type = pf.detect_task_type(root, saved, (name for name, _ in root.named_modules()))
    data = pf.peft_config_dict(
        written,
        ranks,
        saved,
        fan_in_fan_out=bool(linear) and all(layer.kind.transposed for layer in linear),
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path or _name_or_path(root),
        parameters=parameters,
    )
    if experts == "fused":  # per expert is for per-expert models: it does not plan on this one
        _check_round_trip(root, data, {**ranks, **parameters})
    # adapter_config.json holds PEFT's fields only (PEFT warns "upgrade the PEFT version" at any other).
    # Our own record is in the weights file's metadata, which PEFT does not read: our config, to restore
    # fields PEFT lacks (freeze_A, ...), and for PiSSA / OLoRA the init the adapter was trained from (it
    # loads as the plain rank-2r LoRA B A - B0 A0 on the original base).
    metadata = {"format": "pt", pf.METADATA_CONFIG_KEY: json.dumps(written.to_dict(), sort_keys=True)}
    if written is not config:
        metadata[pf.METADATA_TRAINED_FROM_KEY] = config.init_lora_weights
    if experts != "fused":
        metadata[pf.METADATA_EXPERTS_KEY] = experts
    with atomic_directory(target) as tmp:
        (tmp / pf.CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        safetensors.torch.save_file(tensors_for_file(tensors), tmp / pf.WEIGHTS_NAME, metadata=metadata)
    return target


# -- load ---------------------------------------------------------------------------------------------


def _read_adapter_files(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    config_path, weights_path = path / pf.CONFIG_NAME, path / pf.WEIGHTS_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} not found: {str(path)!r} is not a PEFT adapter directory")
    if not weights_path.is_file():
        if (path / pf.PICKLE_WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{str(path)!r} holds only {pf.PICKLE_WEIGHTS_NAME!r}, a pickle, which lora-lightning never loads "
                "(unpickling can run arbitrary code); re-save it with PEFT to get adapter_model.safetensors"
            )
        raise FileNotFoundError(f"{str(weights_path)!r} not found")
    try:
        data = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    try:
        with safetensors.safe_open(str(weights_path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises its own error type (and others) for damaged files
        raise ValueError(f"{str(weights_path)!r} is not a valid safetensors file: {err}") from err
    if metadata.get(pf.METADATA_EXPERTS_KEY, "fused") != "fused":
        raise ValueError(
            f"{str(path)!r} holds expert banks written {metadata[pf.METADATA_EXPERTS_KEY]} (save_adapter(experts="
            f"{metadata[pf.METADATA_EXPERTS_KEY]!r}), for servers of per-expert models); load_adapter reads the "
            "fused layout: save the adapter again with experts='fused'"
        )
    return data, tensors, metadata


def _rollback(model: nn.Module, flags: list[tuple[Tensor, bool]], backups: dict[Tensor, Tensor]) -> None:
    """Put the model back as it was before a failed load: base modules, values, requires_grad."""
    for name, layer in adapted_modules(model).items():
        replace_submodule(model, name, layer.base_layer)
    remove_lora_config(model)
    with torch.no_grad():
        for tensor, value in backups.items():
            tensor.copy_(value)
    for param, flag in flags:
        param.requires_grad_(flag)


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = False) -> LoRAReport:
    """Inject an adapter saved by :func:`save_adapter` or by HF PEFT and load its weights.

    Strict: every tensor must find its module and every adapted module must get its tensors; all
    problems (missing / unexpected key, shape or rank mismatch, targets the model lacks, a damaged
    file, unsupported PEFT options) are reported in one error naming keys and modules, raised before
    the model is touched. Accepts PEFT's raw ``.default.`` key form, ``rank_pattern`` /
    ``alpha_pattern``, rsLoRA, ``bias``, ``modules_to_save`` and embeddings. Never unpickles.

    Args:
        model: the base model the adapter was trained on, without adapters; modified in place.
        directory: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        trainable: True leaves adapters (and biases / modules_to_save per the config) trainable
            for continued training; False freezes every parameter (inference).

    Returns:
        The :class:`LoRAReport` of the injection.
    """
    path = Path(directory)
    existing = adapted_modules(model)
    if existing:
        raise ValueError(
            f"model already carries LoRA adapters on {len(existing)} module(s); load {str(path)!r} into a model "
            "without adapters (call merge_and_unload(model) first to keep the current ones merged)"
        )
    data, tensors, metadata = _read_adapter_files(path)
    source = str(path / pf.CONFIG_NAME)
    config = choose_config(model, data, metadata, source)
    plan = plan_load(model, config, tensors, str(path / pf.WEIGHTS_NAME))
    config = with_file_dtype(config, plan, model)

    flags = [(param, param.requires_grad) for param in model.parameters()]
    state = model.state_dict(keep_vars=True)
    # Values we overwrite (biases, modules_to_save, a base embedding), kept on the CPU to spare device memory.
    backups = {state[key]: state[key].detach().to("cpu", copy=True) for key in plan.state}
    if rewrites_base(config.init_lora_weights):  # PiSSA / OLoRA: the init rewrites each target's weight
        for _, module in plan_targets(model, config):
            weight = adaptable_kind(module).stored_weight(module)
            backups[weight] = weight.detach().to("cpu", copy=True)
    try:
        inject_lora(model, config)
        layers = lora_layers(model)
        with torch.no_grad():
            for (name, attr), tensor in plan.lora.items():
                getattr(layers[name], attr).copy_(tensor)
            banks = lora_banks(model)
            for (name, attr, p), tensor in plan.banks.items():
                getattr(banks[name], attr)[p].copy_(tensor)
            for key, tensor in plan.state.items():
                state[key].copy_(tensor)  # the same tensor objects live on under .base_layer
        if not trainable:
            for param in model.parameters():
                param.requires_grad_(False)
    except BaseException:
        _rollback(model, flags, backups)
        raise
    return lora_report(model, config)


__all__ = ["adapter_state_dict", "export_merged", "load_adapter", "save_adapter"]
