"""``hydra/sweeper=study``: Hydra's basic sweeper plus reference jobs that run once.

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace, so the class lives here;
what it computes lives in :mod:`lora_lightning.app.sweep.study`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hydra.core.override_parser.types import Override

from lora_lightning.app.sweep.study import check_references, study_jobs
from lora_lightning.compat.private_names import private

BasicSweeper = private("basic_sweeper")  # Hydra's, in hydra._internal: no public sweeper does the grid


class StudySweeper(BasicSweeper):
    """The basic sweeper's grid (``params`` and command-line sweeps) plus ``references``.

    Args:
        max_batch_size: jobs handed to the launcher at once (None: all).
        params: the grid, ``{key: "a,b"}`` as for the basic sweeper.
        references: override lists run once each beside the grid, e.g. ``[["method=full"]]``.
    """

    def __init__(
        self,
        max_batch_size: int | None = None,
        params: Mapping[str, str] | None = None,
        references: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=dict(params or {}))
        self.references = check_references(references)

    def split_arguments(  # type: ignore[override]  # the basic sweeper's is static; this one reads self
        self, overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        (grid,) = BasicSweeper.split_arguments(overrides, None)
        jobs = study_jobs(grid, self.params.keys(), self.references)
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))


__all__ = ["StudySweeper"]
