"""A sweep's group choices, checked before the sweep starts.

The basic sweeper composes every job before launching any, but only after it has created the sweep
directory; the Optuna sweeper composes a trial only when it runs it, so an unknown option in its
search space (``hydra.sweeper.params.rank=choice(r4,r3)``) fails mid-sweep. Checking every value
a sweep names for a config group against the group's options, when the multirun starts, makes both
fail in one line before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from lora_lightning.app.errors import UsageError


def sweep_overrides(hydra_cfg: Any) -> list[tuple[str, str]]:
    """(where, override) for every override a multirun can vary: the sweeper's params, the command line."""
    params = hydra_cfg.sweeper.get("params") or {}
    found = [(f"hydra.sweeper.params.{key}", f"{key}={value}") for key, value in params.items()]
    found += [("command line", str(item)) for item in hydra_cfg.overrides.task]
    return found


def _values(override: Any) -> Iterable[str]:
    """The option names an override selects: every value of a discrete sweep, or its single value."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []
    value = override.value()
    return [str(value)] if value is not None else []


def check_group_choices(overrides: list[tuple[str, str]], group_options: Callable[[str], list[str]]) -> None:
    """Every value a sweep gives a config group must be one of the group's options.

    Args:
        overrides: (where it came from, ``key=value`` text) pairs, see :func:`sweep_overrides`.
        group_options: a function ``group -> options`` (empty for keys that are not groups).

    Raises:
        UsageError: naming the key, the unknown value, where it was given, and the options.
    """

    parser = OverridesParser.create()
    for where, text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except Exception:  # Hydra reports a syntax error itself, with its own message
            continue
        if override.is_delete():
            continue
        group = override.key_or_group
        options = group_options(group)
        if not options:
            continue  # not a config group (optim.lr, trainer.max_steps, ...)
        for value in _values(override):
            if value not in options:
                raise UsageError(
                    f"{where}: {group}={value} is not an option of group '{group}' (options: {', '.join(options)})"
                )


def check_sweep(config: Any) -> None:
    """Check the group choices of the multirun described by ``config`` (Hydra's composed sweep config)."""

    if not GlobalHydra.instance().is_initialized():
        return
    loader = GlobalHydra.instance().config_loader()

    def options(group: str) -> list[str]:
        try:
            return sorted(loader.get_group_options(group))
        except Exception:  # not a group: nothing to check
            return []

    check_group_choices(sweep_overrides(config.hydra), options)
