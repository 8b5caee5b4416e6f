"""Match an adapter file against a model: which tensor goes where, checked before anything changes.

:func:`plan_load` resolves the config on the model (``plan_targets``), then gives every tensor of
the file its place: a LoRA factor of an adapted module (shape ``(r, in)`` / ``(out, r)``), a
trained bias, a ``modules_to_save`` tensor, or the base weight PEFT saves beside an adapted
embedding. Every problem is collected and raised in one ``ValueError`` naming keys and modules;
the model is only read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lora_lightning.config import ADAPTER_DTYPES, LoRAConfig
from lora_lightning.inject import bank_ranks, trains_bias
from lora_lightning.io import peft_format as pf
from lora_lightning.kinds.bnb_experts import bank_kind, projection_order
from lora_lightning.kinds.experts import ROUTER
from lora_lightning.nn.inits import rewrites_base
from lora_lightning.nn.layers import adaptable_kind
from lora_lightning.nn.variant_table import roles_of
from lora_lightning.nn.variants import TensorRole
from lora_lightning.targets import BankTarget, modules_to_save, plan_adapters

_MAX_LISTED = 12  # problems listed in one error before "... and N more"


def outermost(names: Iterable[str]) -> list[str]:
    """Drop names nested inside another listed name (their parameters are covered by the outer one)."""
    kept: list[str] = []
    for name in sorted(set(names)):
        if not any(name.startswith(outer + ".") for outer in kept):
            kept.append(name)
    return kept


def saved_modules(root: nn.Module, config: LoRAConfig) -> list[str]:
    """Full names of the outermost modules ``config.modules_to_save`` selects in ``root``."""
    return outermost(name for name, _ in modules_to_save(root, config))


def resolution(model: nn.Module, config: LoRAConfig) -> tuple:
    """What a config does to a model: modules with rank and alpha, and everything else that trains."""
    modules, banks = plan_adapters(model, config)
    targets = tuple((name, config.rank_for(name), config.alpha_for(name)) for name, _ in modules)
    targets += tuple((f"{b.name}.{p}", *value) for b in banks for p, value in bank_ranks(config, b).items())
    variant = (config.use_dora, config.init_lora_weights if rewrites_base(config.init_lora_weights) else None)
    return targets, config.use_rslora, config.bias, config.dropout, tuple(saved_modules(model, config)), variant


def choose_config(model: nn.Module, data: dict[str, Any], metadata: dict[str, str], source: str) -> LoRAConfig:
    """The JSON's config, or our original one from the file metadata when it does exactly the same."""
    config = pf.config_from_peft(data, source)
    config = pf.drop_absent_task_heads(config, data.get("task_type"), (n for n, _ in model.named_modules()))
    try:
        resolved = resolution(model, config)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{source}: the adapter's config does not fit this model: {err}") from err
    try:
        original = LoRAConfig.from_dict(json.loads(metadata[pf.METADATA_CONFIG_KEY]))
        return original if resolution(model, original) == resolved else config
    except (KeyError, TypeError, ValueError):  # no metadata (a PEFT file), or stale after an edit
        return config


@dataclass
class LoadPlan:
    """Where each file tensor goes: adapter tensors by (module, role attr), everything else by
    (pre-injection) state_dict key."""

    config: LoRAConfig
    lora: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (module, "lora_A", ...) -> tensor
    banks: dict[tuple[str, str, str], Tensor] = field(default_factory=dict)  # (bank, "lora_A", parameter) -> (E, r, in)
    state: dict[str, Tensor] = field(default_factory=dict)  # model state_dict key -> tensor
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Target:
    """What a target module's adapter tensors must look like."""

    embedding: bool
    in_features: int
    out_features: int
    r: int

    @property
    def kind(self) -> str:
        return "embedding" if self.embedding else "linear"


def _targets(targets: list[tuple[str, nn.Module]], config: LoRAConfig) -> dict[str, _Target]:
    found = {}
    for name, module in targets:
        kind = adaptable_kind(module)
        if kind.is_meta(module):
            raise ValueError(f"module {name!r} has its weight on the meta device; load the base weights first")
        found[name] = _Target(kind.embedding, *kind.features(module), config.rank_for(name))
    return found


@dataclass(frozen=True)
class _BankSlot:
    """One adapted bank / router parameter as PEFT's file holds it (under ``path``)."""

    bank: str
    parameter: str
    experts: int
    in_features: int
    out_features: int
    r: int


def _bank_slots(banks: list[BankTarget], config: LoRAConfig) -> dict[str, _BankSlot]:
    """PEFT's wrapper path of each adapted parameter -> what its factors must be."""
    kinds = {}
    for bank in banks:
        kind = ROUTER if bank.router else bank_kind(bank.module)
        if kind.is_meta(bank.module):
            raise ValueError(f"module {bank.name!r} has its weights on the meta device; load the base weights first")
        ranks = bank_ranks(config, bank)
        order = projection_order(bank.module, bank.projections)
        for p, path in pf.bank_wrapper_paths(bank.name, order).items():
            features = kind.features(bank.module, p)
            kinds[path] = _BankSlot(bank.name, p, kind.num_experts(bank.module), *features, ranks[p][0])
    return kinds


def _check_bank_tensor(plan: LoadPlan, key: pf.FileKey, tensor: Tensor, slot: _BankSlot) -> None:
    """A bank factor in PEFT's layout: A ``(r*E, in)``, B ``(out, r*E)``; stored converted to ours."""
    rows = slot.r * slot.experts
    expected = (rows, slot.in_features) if key.role.attr == "lora_A" else (slot.out_features, rows)
    shape = tuple(tensor.shape)
    if key.role.attr not in ("lora_A", "lora_B") or key.embedding:
        plan.problems.append(f"unexpected key {key.file_key!r}: {slot.bank}.{slot.parameter} takes lora_A / lora_B")
    elif shape != expected:
        plan.problems.append(
            f"shape mismatch at {key.file_key!r}: got {shape}, {slot.bank}.{slot.parameter} ({slot.experts} "
            f"expert(s), in={slot.in_features}, out={slot.out_features}, r={slot.r}) needs {expected} "
            "(PEFT's target_parameters layout, r x experts rows)"
        )
    elif not tensor.is_floating_point():
        plan.problems.append(f"key {key.file_key!r} has dtype {tensor.dtype}; LoRA tensors must be floating point")
    elif not _non_finite(plan, key.file_key, tensor):
        _provide(plan, plan.banks, (slot.bank, key.role.attr, slot.parameter), key.file_key, tensor)


def _bank_factors(plan: LoadPlan, slots: dict[str, _BankSlot]) -> None:
    """Convert the paired file factors into ours (``(E, r, in)``, ``(E, out, r)``); report missing ones."""
    for path, slot in slots.items():
        names = [(slot.bank, attr, slot.parameter) for attr in ("lora_A", "lora_B")]
        missing = [n for n in names if n not in plan.banks]
        for _, attr, _ in missing:
            plan.problems.append(
                f"missing key {pf.PEFT_PREFIX + path + '.' + attr + '.weight'!r}: adapted parameter "
                f"{slot.bank}.{slot.parameter} gets no {attr}"
            )
        if not missing:
            A, B = pf.bank_from_file(plan.banks[names[0]], plan.banks[names[1]], slot.experts)
            plan.banks[names[0]], plan.banks[names[1]] = A, B


def _check_lora_tensor(plan: LoadPlan, key: pf.FileKey, tensor: Tensor, targets: dict[str, _Target]) -> None:
    target = targets.get(key.module)
    role: TensorRole = key.role  # type: ignore[assignment]
    if target is None:
        plan.problems.append(f"unexpected key {key.file_key!r}: module {key.module!r} is not adapted by this config")
        return
    if role.file_name(target.embedding) != role.file_name(key.embedding):
        named = role.file_name(target.embedding)
        stored = named.stem if named is not None else f"no {role.attr}"
        plan.problems.append(
            f"key {key.file_key!r}: {key.module!r} is a {target.kind} module, PEFT stores it as {stored}"
        )
        return
    if role not in roles_of(plan.config):
        plan.problems.append(f"unexpected key {key.file_key!r}: this adapter's config has no {role.attr}")
        return
    expected = role.shape(target.in_features, target.out_features, target.r)
    shape = tuple(tensor.shape)
    if shape != expected:
        rank_axes = [i for i, size in enumerate(role.shape(-1, -2, -3)) if size == -3]
        others_match = len(shape) == len(expected) and all(
            a == b for i, (a, b) in enumerate(zip(shape, expected, strict=True)) if i not in rank_axes
        )
        if rank_axes and others_match:
            plan.problems.append(
                f"rank mismatch at {key.file_key!r}: the tensor has rank {shape[rank_axes[0]]}, the config gives "
                f"{key.module!r} r={target.r} (r={plan.config.r}, rank_pattern={plan.config.rank_pattern})"
            )
        else:
            plan.problems.append(
                f"shape mismatch at {key.file_key!r}: got {shape}, {key.module!r} ({target.kind}, "
                f"in={target.in_features}, out={target.out_features}, r={target.r}) needs {role.attr} of shape "
                f"{expected}"
            )
    elif not tensor.is_floating_point():
        plan.problems.append(f"key {key.file_key!r} has dtype {tensor.dtype}; LoRA tensors must be floating point")
    elif _non_finite(plan, key.file_key, tensor):
        return
    else:
        _provide(plan, plan.lora, (key.module, role.attr), key.file_key, tensor)


def _non_finite(plan: LoadPlan, file_key: str, tensor: Tensor) -> bool:
    """Record a tensor holding NaN or inf (a diverged run saved as is): it would silently poison the model."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        count = int((~torch.isfinite(tensor)).sum())
        plan.problems.append(f"key {file_key!r} holds {count} NaN or inf value(s); a damaged adapter is never loaded")
        return True
    return False


def _provide(plan: LoadPlan, slots: dict, slot: Any, file_key: str, tensor: Tensor) -> None:
    """Record a tensor for a slot; two keys for one slot must agree (PEFT writes some twice)."""
    previous = slots.get(slot)
    if previous is not None and not torch.equal(previous, tensor):
        plan.problems.append(f"key {file_key!r} disagrees with another key naming the same tensor {slot!r}")
    slots[slot] = tensor


def plan_load(model: nn.Module, config: LoRAConfig, tensors: dict[str, Tensor], source: str) -> LoadPlan:
    """Match every file tensor to its place in the adapted model, without touching the model."""
    plan = LoadPlan(config)
    modules, banks = plan_adapters(model, config)
    targets = _targets(modules, config)
    slots = _bank_slots(banks, config)
    wrapped = set(targets) | {bank.name for bank in banks}
    state = model.state_dict(keep_vars=True)
    # state_dict keys as they read after injection: a target's own tensors move under ".base_layer".
    pre_key = {}
    for key in state:
        module, _, leaf = key.rpartition(".")
        pre_key[f"{module}.base_layer.{leaf}" if module in wrapped else key] = key
    saved = saved_modules(model, config)
    in_saved = {k for k in pre_key if any(k.startswith(m + ".") for m in saved)}
    linears = {name for name, target in targets.items() if not target.embedding}
    biases = {k for k in pre_key if trains_bias(k, config, linears)}
    # What our save writes (and PEFT's): trained bias parameters; PEFT's bias="all" also writes buffers.
    required = in_saved | {k for k in biases if isinstance(state[pre_key[k]], nn.Parameter)}
    allowed = in_saved | biases
    # PEFT also saves the full base weight of an adapted embedding / lm_head (save_embedding_layers).
    allowed |= {k for k in pre_key if k.partition(".base_layer.")[0] in targets and ".base_layer." in k}

    adapters = set()
    for file_key, tensor in tensors.items():
        key = pf.parse_file_key(file_key)
        if key.role is not None and key.adapter is not None:
            adapters.add(key.adapter)
        if key.role is not None and key.module in slots:
            _check_bank_tensor(plan, key, tensor, slots[key.module])
            continue
        if key.role is not None:
            _check_lora_tensor(plan, key, tensor, targets)
            continue
        if key.original and any(key.module == m or key.module.startswith(m + ".") for m in saved):
            continue  # PEFT's frozen copy of a modules_to_save module: the forward never uses it
        slot = next((k for k in key.own_keys if k in allowed), None)
        if slot is None:
            known = next((k for k in key.own_keys if k in pre_key), None)
            why = (
                f"{known!r} is not trained by this adapter (bias={config.bias!r}, "
                f"modules_to_save={config.modules_to_save})"
                if known
                else "it names no tensor of this model (keys are relative to the model the adapter was saved from)"
            )
            plan.problems.append(f"unexpected key {file_key!r}: {why}")
            continue
        current = state[pre_key[slot]]
        if tuple(tensor.shape) != tuple(current.shape) or tensor.is_floating_point() != current.is_floating_point():
            plan.problems.append(
                f"shape mismatch at {file_key!r}: got {tuple(tensor.shape)} {tensor.dtype}, the model's {slot!r} "
                f"is {tuple(current.shape)} {current.dtype}"
            )
            continue
        if current.is_meta:
            plan.problems.append(f"{slot!r} is on the meta device; load the base weights first")
            continue
        if _non_finite(plan, file_key, tensor):
            continue
        _provide(plan, plan.state, pre_key[slot], file_key, tensor)
    if len(adapters) > 1:
        plan.problems.append(
            f"the file mixes tensors of several adapters {sorted(adapters)}; save one adapter per file"
        )
    for name, target in targets.items():
        for role in roles_of(config):
            if (name, role.attr) not in plan.lora:
                peft_key = pf.lora_file_key(name, role, target.embedding)
                plan.problems.append(f"missing key {peft_key!r}: adapted module {name!r} gets no {role.attr}")
    _bank_factors(plan, slots)
    provided = {k for k in pre_key if pre_key[k] in plan.state}
    for slot in sorted(required - provided):
        owner = next((m for m in saved if slot.startswith(m + ".")), None)
        why = f"modules_to_save module {owner!r}" if owner else f"bias={config.bias!r}"
        plan.problems.append(f"missing key {pf.PEFT_PREFIX + slot!r}: the config trains it ({why})")
    if plan.problems:
        listed = plan.problems[:_MAX_LISTED]
        more = len(plan.problems) - len(listed)
        tail = f"\n  ... and {more} more" if more else ""
        raise ValueError(f"{source}: the adapter does not match this model:\n  - " + "\n  - ".join(listed) + tail)
    return plan


def with_file_dtype(config: LoRAConfig, plan: LoadPlan, model: nn.Module) -> LoRAConfig:
    """Keep the file's factor dtype when it differs from the base weights (PEFT keeps fp32 factors)."""
    if config.adapter_dtype is not None:
        return config
    dtypes = {tensor.dtype for tensor in [*plan.lora.values(), *plan.banks.values()]}
    modules = {name: model.get_submodule(name) for name, _ in plan.lora}
    bases = {adaptable_kind(module).compute_dtype(module) for module in modules.values()}
    for name, _, p in plan.banks:
        bases.add(model.get_submodule(name).get_parameter(p).dtype)
    names = {getattr(torch, name): name for name in ADAPTER_DTYPES}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) in names and bases != {dtype}:
        return LoRAConfig.from_dict({**config.to_dict(), "adapter_dtype": names[dtype]})
    return config
