"""Restrict an already built optimizer to the adapter parameters, and split B out for LoRA+.

The user's ``configure_optimizers`` builds an optimizer (and maybe schedulers) over whatever it
likes, often ``self.parameters()``. We cannot rebuild arbitrary optimizers and schedulers, so we
edit them in place: frozen parameters leave their groups, empty groups are dropped, and with
``lr_ratio_B != 1`` each group's ``lora_B`` parameters move to a sibling group whose learning
rates are ``ratio`` times larger (LoRA+, Hayou et al. 2024). Schedulers keep one entry per group;
the per-group lists of the schedulers bound to the optimizer are remapped to match.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Per-group lists that torch schedulers keep; learning-rate values among them scale with the ratio.
_PER_GROUP_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
_PER_GROUP_OTHER_LISTS = ("lr_lambdas",)


def find_optimizers_and_schedulers(result: Any) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """Every optimizer and scheduler object inside whatever ``configure_optimizers`` returned."""
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, torch.optim.Optimizer):
            if all(item is not o for o in optimizers):
                optimizers.append(item)
        elif hasattr(item, "optimizer") and isinstance(item.optimizer, torch.optim.Optimizer):
            schedulers.append(item)  # LRScheduler, ReduceLROnPlateau, and look-alikes
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)

    visit(result)
    return optimizers, schedulers


def _scale_lrs(group: dict[str, Any], ratio: float) -> dict[str, Any]:
    return {k: (v * ratio if k.endswith("lr") and isinstance(v, (int, float)) else v) for k, v in group.items()}


def _remap_scheduler(scheduler: Any, plan: list[tuple[int, bool]], n_old: int, ratio: float) -> None:
    for nested in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _remap_scheduler(nested, plan, n_old, ratio)
    for name in (*_PER_GROUP_LR_LISTS, *_PER_GROUP_OTHER_LISTS):
        values = getattr(scheduler, name, None)
        if not isinstance(values, list) or len(values) != n_old:
            continue
        scale = name in _PER_GROUP_LR_LISTS
        setattr(scheduler, name, [values[i] * ratio if (is_b and scale) else values[i] for i, is_b in plan])


def restrict_optimizer(
    optimizer: torch.optim.Optimizer,
    trainable: Iterable[torch.Tensor],
    schedulers: Iterable[Any] = (),
    lora_B: Iterable[torch.Tensor] = (),
    lr_ratio_B: float = 1.0,
) -> int:
    """Keep only ``trainable`` parameters in ``optimizer``; with a ratio, give ``lora_B`` its own groups.

    Args:
        optimizer: modified in place.
        trainable: the parameters that may stay.
        schedulers: schedulers of any optimizer; those bound to this one are remapped.
        lora_B: the B factors (they get ``lr * lr_ratio_B`` when the ratio is not 1).
        lr_ratio_B: LoRA+ ratio of B's learning rate to A's.

    Returns:
        The number of parameters left in the optimizer (0 means nothing would train).
    """
    keep = {id(p) for p in trainable}
    is_b = {id(p) for p in lora_B} if lr_ratio_B != 1.0 else set()
    old_groups = optimizer.param_groups
    new_groups: list[dict[str, Any]] = []
    plan: list[tuple[int, bool]] = []  # (old group index, is the B split)
    for index, group in enumerate(old_groups):
        params = [p for p in group["params"] if id(p) in keep]
        rest = [p for p in params if id(p) not in is_b]
        b_part = [p for p in params if id(p) in is_b]
        if rest:
            new_groups.append({**group, "params": rest})
            plan.append((index, False))
        if b_part:
            new_groups.append({**_scale_lrs(group, lr_ratio_B), "params": b_part})
            plan.append((index, True))

    kept = {id(p) for g in new_groups for p in g["params"]}
    for param in list(optimizer.state):
        if id(param) not in kept:
            del optimizer.state[param]
    optimizer.param_groups = new_groups
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is optimizer:
            _remap_scheduler(scheduler, plan, len(old_groups), lr_ratio_B)
    return len(kept)


def restrict_optimizers(
    result: Any,
    trainable: list[torch.Tensor],
    names: dict[int, str],
    *,
    lora_B: Iterable[torch.Tensor] = (),
    lr_ratio_B: float = 1.0,
    allow_empty: bool = False,
) -> None:
    """Restrict every optimizer ``configure_optimizers`` returned to the trainable parameters.

    Checked first, before any optimizer changes: an optimizer that held parameters but none that
    train would be emptied without a word, and the user would meet PyTorch's "element 0 of tensors
    does not require grad" in their own ``training_step``.

    Args:
        result: what ``configure_optimizers`` returned (optimizers, schedulers, dicts, lists).
        trainable: the parameters that train.
        names: ``id(param) -> name``, for messages.
        lora_B: the B factors (LoRA+ moves them to groups of their own).
        lr_ratio_B: LoRA+ ratio of B's learning rate to A's.
        allow_empty: let an optimizer over frozen parameters only be emptied (a user's choice).

    Raises:
        ValueError: every optimizer would be empty; or one would be and ``allow_empty`` is False.
    """
    optimizers, schedulers = find_optimizers_and_schedulers(result)
    keep = {id(p) for p in trainable}
    held = [[p for group in opt.param_groups for p in group["params"]] for opt in optimizers]
    emptied = [(i, params) for i, params in enumerate(held) if params and not any(id(p) in keep for p in params)]
    if optimizers and len(emptied) == len(optimizers):
        raise ValueError(
            "LoRACallback: configure_optimizers returned optimizers over frozen parameters only; "
            f"none of the {len(trainable)} trainable (adapter) parameters is in them"
        )
    if emptied and not allow_empty:
        index, params = emptied[0]
        listed = [names.get(id(p), "?") for p in params]
        shown = ", ".join(listed[:4]) + (f", ... ({len(listed)} in all)" if len(listed) > 4 else "")
        raise ValueError(
            f"LoRACallback: optimizer {index} of configure_optimizers ({type(optimizers[index]).__name__}) holds only "
            f"parameters the callback froze ({shown}), so nothing in it would train; add those modules to "
            "modules_to_save, put target_modules inside them, or pass allow_empty_optimizers=True to keep it empty"
        )
    for optimizer in optimizers:
        restrict_optimizer(optimizer, trainable, schedulers, lora_B, lr_ratio_B)
