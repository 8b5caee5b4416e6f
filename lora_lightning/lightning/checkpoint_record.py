"""What an adapter-only checkpoint carries besides the weights, and the checks made before loading.

An adapter checkpoint is only meaningful on top of the exact base it was trained on, with the same
adapter layout. So a checkpoint carries the LoRA config (rank, targets, ...) and a fingerprint of
the frozen base weights; loading compares both and refuses with a message saying what differs.

The fingerprint is cheap on any device: per frozen tensor its shape, dtype, float64 sum and sum of
squares, and a few sampled values. Identical weights give identical numbers (compared with a
relative tolerance of 1e-6 to allow for reduction order across devices); a different base model
differs at the scale of the weights themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lora_lightning.config import LoRAConfig
from lora_lightning.kinds.experts import is_bank_4bit

FORMAT_VERSION = 1
_SAMPLES = 8
_STRICT_RTOL = 1e-6


def _entry(tensor: torch.Tensor) -> dict[str, Any]:
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    k = min(_SAMPLES, n)
    # Evenly spaced positions in exact integer arithmetic (a float32 linspace rounds n - 1 up to n
    # once n passes 2**24, e.g. a 32000 x 2048 embedding).
    index = torch.tensor([i * (n - 1) // max(k - 1, 1) for i in range(k)], dtype=torch.long, device=flat.device)
    stats = torch.stack([flat.sum(dtype=torch.float64), flat.double().square().sum()]) if n else torch.zeros(2)
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "sum": float(stats[0]),
        "sumsq": float(stats[1]),
        "samples": flat[index].double().tolist(),
    }


def base_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """Fingerprint of the frozen base tensors, by name (meta tensors are skipped: they hold no values)."""
    return {name: _entry(t) for name, t in named_tensors if not t.is_meta}


def base_tensors(model: nn.Module, adapter_keys: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    """The parameters of ``model`` that are not part of the adapter, by ``state_dict``-style name, and the
    buffers of its 4-bit expert banks (their weights: codes and scales)."""
    adapter = set(adapter_keys)
    found = [(name, p) for name, p in model.named_parameters() if name not in adapter]
    for name, module in model.named_modules():
        if is_bank_4bit(module):
            dot = f"{name}." if name else ""
            found += [(f"{dot}{key}", buffer) for key, buffer in module.named_buffers()]
    return found


def _eps(dtype: str) -> float:
    return float(torch.finfo(getattr(torch, dtype)).eps) if hasattr(torch, dtype) else 0.0


def compare_fingerprints(
    saved: Mapping[str, Mapping[str, Any]],
    current: Mapping[str, Mapping[str, Any]],
    loose: Iterable[str] = (),
) -> list[str]:
    """Differences between two fingerprints, as messages; empty when they describe the same base.

    Args:
        saved: fingerprint stored in the checkpoint.
        current: fingerprint of the model about to be loaded into.
        loose: names whose values were restored by unmerging (rounded in their own dtype), and
            tensors whose dtype changed (e.g. bf16-true precision), compared at that dtype's rounding.
    """
    loose = set(loose)
    problems: list[str] = []
    missing = sorted(set(saved) - set(current))
    extra = sorted(set(current) - set(saved))
    if missing:
        problems.append(f"base weights {missing[:3]} of the checkpoint's base are not in this model")
    if extra:
        problems.append(f"this model has base weights {extra[:3]} that the checkpoint's base did not have")
    for name in sorted(set(saved) & set(current)):
        a, b = saved[name], current[name]
        if a["shape"] != b["shape"]:
            problems.append(f"base weight {name!r} has shape {b['shape']} here, {a['shape']} in the checkpoint's base")
            continue
        rtol = _STRICT_RTOL
        if name in loose or a["dtype"] != b["dtype"]:
            rtol = max(rtol, 4 * max(_eps(a["dtype"]), _eps(b["dtype"])))
        numel = max(1, math.prod(a["shape"]))
        rms = math.sqrt(max(a["sumsq"], 0.0) / numel)
        close = abs(a["sumsq"] - b["sumsq"]) <= rtol * abs(a["sumsq"]) + 1e-12 and all(
            abs(x - y) <= rtol * (abs(x) + rms) for x, y in zip(a["samples"], b["samples"], strict=False)
        )
        if not close:
            problems.append(f"base weight {name!r} holds different values than the checkpoint's base")
    return problems


# Fields that say how a config is checked, not what the adapter is: a checkpoint may differ in them.
_CHECK_ONLY_FIELDS = frozenset({"allow_unmatched_targets"})


def config_differences(saved: Mapping[str, Any], config: LoRAConfig) -> list[str]:
    """Fields where the checkpoint's LoRA config differs from ``config``, as readable messages.

    A field the checkpoint lacks (written before the field existed) counts as its default.
    """
    current, defaults = config.to_dict(), LoRAConfig().to_dict()
    return [
        f"{field}={saved.get(field, defaults[field])!r} in the checkpoint, {current[field]!r} here"
        for field in current
        if field not in _CHECK_ONLY_FIELDS and saved.get(field, defaults[field]) != current[field]
    ]


def checkpoint_metadata(config: LoRAConfig, fingerprint: Mapping[str, Any], adapter_keys: Iterable[str]) -> dict:
    """The plain-data record stored under ``checkpoint["lora_lightning"]`` (safe for weights_only loads)."""
    return {
        "format": FORMAT_VERSION,
        "config": config.to_dict(),
        "fingerprint": dict(fingerprint),
        "adapter_keys": sorted(adapter_keys),
    }


def check_adapter_checkpoint(
    meta: Mapping[str, Any] | None,
    config: LoRAConfig,
    fingerprint: Mapping[str, Any],
    adapter_keys: Iterable[str],
    state_dict: Mapping[str, Any],
    loose: Iterable[str] = (),
) -> None:
    """Refuse an adapter checkpoint that does not belong to this model, with the reason.

    Args:
        meta: the checkpoint's ``lora_lightning`` record (None: not written by the callback).
        config: the LoRA config of the model about to be loaded into.
        fingerprint: the fingerprint of that model's base tensors.
        adapter_keys: state_dict keys the checkpoint must hold (adapter tensors).
        state_dict: the checkpoint's ``state_dict``.
        loose: fingerprint names compared at their dtype's rounding (see :func:`compare_fingerprints`).

    Raises:
        ValueError: another config, another base, missing or non-finite adapter tensors.
    """
    if meta is None:
        raise ValueError(
            "LoRACallback: this checkpoint was not written with LoRACallback (it has no 'lora_lightning' record), "
            "so its adapters cannot be checked against this model; refusing to load"
        )
    differences = config_differences(meta["config"], config)
    if differences:
        raise ValueError(
            "LoRACallback: the checkpoint's adapters were trained with a different LoRA config: "
            + "; ".join(differences)
        )
    problems = compare_fingerprints(meta["fingerprint"], fingerprint, loose)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            "LoRACallback: the checkpoint's adapters were trained on a different base model: "
            + "; ".join(problems[:3])
            + more
        )
    keys = list(adapter_keys)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(
            f"LoRACallback: the checkpoint lacks {len(missing)} adapter tensor(s) this model needs, "
            f"e.g. {missing[:3]}; refusing to load a partial adapter"
        )
    damaged = non_finite(state_dict, keys)
    if damaged:
        raise ValueError(
            f"LoRACallback: the checkpoint's adapter tensor(s) {damaged[:3]} hold NaN or inf "
            f"({len(damaged)} in all; a diverged run?); refusing to load them"
        )


def non_finite(tensors: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` whose floating-point tensor holds a NaN or an infinity."""
    return [
        key
        for key in keys
        if isinstance(t := tensors.get(key), torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
    ]
