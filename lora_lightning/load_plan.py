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

from lora_lightning import peft_format as pf
from lora_lightning.config import ADAPTER_DTYPES, LoRAConfig
from lora_lightning.inject import _modules_to_save, plan_targets
from lora_lightning.layers import is_conv1d

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
    return outermost(name for name, _ in _modules_to_save(root, config))


def resolution(model: nn.Module, config: LoRAConfig) -> tuple:
    """What a config does to a model: modules with rank and alpha, and everything else that trains."""
    targets = tuple((name, config.rank_for(name), config.alpha_for(name)) for name, _ in plan_targets(model, config))
    return targets, config.use_rslora, config.bias, config.dropout, tuple(saved_modules(model, config))


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
    """Where each file tensor goes: LoRA factors by module, everything else by (pre-injection) state_dict key."""

    config: LoRAConfig
    lora: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (module, "A" / "B") -> tensor
    state: dict[str, Tensor] = field(default_factory=dict)  # model state_dict key -> tensor
    problems: list[str] = field(default_factory=list)


def _target_shapes(targets: list[tuple[str, nn.Module]], config: LoRAConfig) -> dict[str, tuple[str, int, int, int]]:
    """module -> (kind, in, out, r): A must be (r, in) and B (out, r)."""
    shapes = {}
    for name, module in targets:
        if getattr(module, "weight", None) is not None and module.weight.is_meta:
            raise ValueError(f"module {name!r} has its weight on the meta device; load the base weights first")
        if isinstance(module, nn.Embedding):
            shapes[name] = ("embedding", *module.weight.shape, config.rank_for(name))
        else:
            out_f, in_f = module.weight.shape[::-1] if is_conv1d(module) else module.weight.shape
            shapes[name] = ("linear", in_f, out_f, config.rank_for(name))
    return shapes


def _check_lora_tensor(plan: LoadPlan, key: pf.FileKey, tensor: Tensor, shapes: dict) -> None:
    info = shapes.get(key.module)
    if info is None:
        plan.problems.append(f"unexpected key {key.file_key!r}: module {key.module!r} is not adapted by this config")
        return
    kind, in_f, out_f, r = info
    if (kind == "embedding") != key.role.startswith("embedding"):
        named = "lora_embedding_A/B" if kind == "embedding" else "lora_A/B.weight"
        plan.problems.append(f"key {key.file_key!r}: {key.module!r} is a {kind} module, PEFT stores it as {named}")
        return
    which = key.role[-1]
    expected = (r, in_f) if which == "A" else (out_f, r)
    shape = tuple(tensor.shape)
    if shape != expected:
        rank_axis = 0 if which == "A" else 1
        if len(shape) == 2 and shape[1 - rank_axis] == expected[1 - rank_axis]:
            plan.problems.append(
                f"rank mismatch at {key.file_key!r}: the tensor has rank {shape[rank_axis]}, the config gives "
                f"{key.module!r} r={r} (r={plan.config.r}, rank_pattern={plan.config.rank_pattern})"
            )
        else:
            plan.problems.append(
                f"shape mismatch at {key.file_key!r}: got {shape}, {key.module!r} ({kind}, in={in_f}, out={out_f}, "
                f"r={r}) needs lora_{which} of shape {expected}"
            )
    elif not tensor.is_floating_point():
        plan.problems.append(f"key {key.file_key!r} has dtype {tensor.dtype}; LoRA factors must be floating point")
    else:
        _provide(plan, plan.lora, (key.module, which), key.file_key, tensor)


def _provide(plan: LoadPlan, slots: dict, slot: Any, file_key: str, tensor: Tensor) -> None:
    """Record a tensor for a slot; two keys for one slot must agree (PEFT writes some twice)."""
    previous = slots.get(slot)
    if previous is not None and not torch.equal(previous, tensor):
        plan.problems.append(f"key {file_key!r} disagrees with another key naming the same tensor {slot!r}")
    slots[slot] = tensor


def plan_load(model: nn.Module, config: LoRAConfig, tensors: dict[str, Tensor], source: str) -> LoadPlan:
    """Match every file tensor to its place in the adapted model, without touching the model."""
    plan = LoadPlan(config)
    targets = plan_targets(model, config)
    shapes = _target_shapes(targets, config)
    state = model.state_dict(keep_vars=True)
    # state_dict keys as they read after injection: a target's own tensors move under ".base_layer".
    pre_key = {}
    for key in state:
        module, _, leaf = key.rpartition(".")
        pre_key[f"{module}.base_layer.{leaf}" if module in shapes else key] = key
    saved = saved_modules(model, config)
    in_saved = {k for k in pre_key if any(k.startswith(m + ".") for m in saved)}
    required, allowed = set(in_saved), set(in_saved)
    if config.bias == "all":
        allowed |= {k for k in pre_key if "bias" in k}
        params = {k for k in pre_key if isinstance(state[pre_key[k]], nn.Parameter)}
        required |= {k for k in params if k == "bias" or k.endswith(".bias")}
    elif config.bias == "lora_only":
        own = {f"{n}.base_layer.bias" for n, info in shapes.items() if info[0] == "linear"} & set(pre_key)
        required |= own
        allowed |= own
    # PEFT also saves the full base weight of an adapted embedding / lm_head (save_embedding_layers).
    allowed |= {k for k in pre_key if k.partition(".base_layer.")[0] in shapes and ".base_layer." in k}

    adapters = set()
    for file_key, tensor in tensors.items():
        key = pf.parse_file_key(file_key)
        if key.adapter is not None and key.role != "state":
            adapters.add(key.adapter)
        if key.role in ("lora_A", "lora_B", "embedding_A", "embedding_B"):
            _check_lora_tensor(plan, key, tensor, shapes)
            continue
        if key.role == "original" and any(key.module == m or key.module.startswith(m + ".") for m in saved):
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
        _provide(plan, plan.state, pre_key[slot], file_key, tensor)
    if len(adapters) > 1:
        plan.problems.append(
            f"the file mixes tensors of several adapters {sorted(adapters)}; save one adapter per file"
        )
    for name, (kind, *_rest) in shapes.items():
        for which in "AB":
            if (name, which) not in plan.lora:
                peft_key = pf.to_peft_key(f"{name}.lora_{which}", kind == "embedding")
                plan.problems.append(f"missing key {peft_key!r}: adapted module {name!r} gets no lora_{which}")
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
    dtypes = {tensor.dtype for tensor in plan.lora.values()}
    bases = {model.get_submodule(name).weight.dtype for name, _ in plan.lora}
    names = {getattr(torch, name): name for name in ADAPTER_DTYPES}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) in names and bases != {dtype}:
        return LoRAConfig.from_dict({**config.to_dict(), "adapter_dtype": names[dtype]})
    return config
