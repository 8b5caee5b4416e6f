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
    """The parameters of ``model`` that are not part of the adapter, by ``state_dict``-style name."""
    adapter = set(adapter_keys)
    return [(name, p) for name, p in model.named_parameters() if name not in adapter]


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


def config_differences(saved: Mapping[str, Any], config: LoRAConfig) -> list[str]:
    """Fields where the checkpoint's LoRA config differs from ``config``, as readable messages."""
    current = config.to_dict()
    return [
        f"{field}={saved.get(field)!r} in the checkpoint, {current[field]!r} here"
        for field in current
        if saved.get(field) != current[field]
    ]


def checkpoint_metadata(config: LoRAConfig, fingerprint: Mapping[str, Any], adapter_keys: Iterable[str]) -> dict:
    """The plain-data record stored under ``checkpoint["lora_lightning"]`` (safe for weights_only loads)."""
    return {
        "format": FORMAT_VERSION,
        "config": config.to_dict(),
        "fingerprint": dict(fingerprint),
        "adapter_keys": sorted(adapter_keys),
    }
