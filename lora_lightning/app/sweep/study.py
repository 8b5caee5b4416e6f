"""Studies: a grid of jobs plus reference jobs that run once, not once per grid point.

A rank study crosses ranks with target sets, but its reference (full fine-tuning, which also
scores the base) does not depend on either: running it once per grid point would repeat the same
job ten times. :func:`study_jobs` adds each reference once per combination of the *other* swept
keys (a ``seed=0,1`` sweep on the command line still gets one reference per seed). Hydra runs it
through ``hydra/sweeper=study`` (``hydra_plugins/lora_lightning_study``), a basic sweeper whose
job list this function extends; launchers (basic, joblib, submitit) are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lora_lightning.app.errors import UsageError


def override_key(override: str) -> str:
    """The key an override string sets: ``"+trainer.max_steps=5"`` -> ``"trainer.max_steps"``."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]  # a group's package (``model@x=...``) is still that group


def check_references(references: object) -> list[list[str]]:
    """``hydra.sweeper.references`` as lists of ``key=value`` strings, or a one-line error naming the bad entry."""
    if references is None:
        return []
    if isinstance(references, (str, bytes)) or not isinstance(references, Iterable):
        raise UsageError(f"hydra.sweeper.references must be a list of override lists, got {references!r}")
    checked: list[list[str]] = []
    for index, reference in enumerate(references):
        if isinstance(reference, (str, bytes)) or not isinstance(reference, Iterable):
            raise UsageError(
                f"hydra.sweeper.references[{index}] must be a list of overrides like [method=full], got {reference!r}"
            )
        overrides = [str(item) for item in reference]
        bad = [item for item in overrides if "=" not in item]
        if bad or not overrides:
            raise UsageError(
                f"hydra.sweeper.references[{index}] must hold key=value overrides, got {list(reference)!r}"
            )
        checked.append(overrides)
    return checked


def study_jobs(
    grid: Sequence[Sequence[str]], grid_keys: Iterable[str], references: Sequence[Sequence[str]]
) -> list[list[str]]:
    """The jobs of a study: the references first, then the grid.

    Args:
        grid: the basic sweeper's jobs, each a list of ``key=value`` overrides.
        grid_keys: the keys the references do not vary over (the study's own grid: rank, targets).
        references: override lists; each becomes one job per distinct combination of the grid
            jobs' other overrides, with the reference's own overrides taking precedence.

    Returns:
        Every job's overrides, references first (so a study's base score comes early).
    """
    keys = set(grid_keys)
    extra: list[list[str]] = []
    for job in grid:
        rest = [item for item in job if override_key(item) not in keys]
        for reference in references:
            own = {override_key(item) for item in reference}
            candidate = [item for item in rest if override_key(item) not in own] + list(reference)
            if candidate not in extra:
                extra.append(candidate)
    return extra + [list(job) for job in grid]
