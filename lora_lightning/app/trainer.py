"""The app's part of the Lightning Trainer: its settings checked up front, and a progress bar in steps.

Lightning checks ``max_steps``, ``precision``, the accelerator and unknown keys when the Trainer is
built, which in a job happens after the base is loaded. :func:`check_trainer` builds a throwaway
Trainer from the same settings first (milliseconds, nothing written), so such a mistake fails with
one line before any work, like every other bad input.

Runs are bounded by steps (``max_steps``, ``max_epochs=-1``), so Lightning's bar, which counts
batches of an epoch and shows ``Epoch 0/-2``, says nothing useful; :class:`StepProgressBar`
counts optimizer steps over the whole fit: ``step 120/250``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar

from lora_lightning.app.console import LIGHTNING_INFO_LOGGERS
from lora_lightning.app.errors import UsageError


def check_max_steps(value: Any, key: str = "trainer.max_steps") -> None:
    """Jobs are bounded by steps (the LR schedule ends at the last one): a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{key} must be a positive integer (optimizer steps), got {value!r}")


@contextlib.contextmanager
def _quiet_rank_zero():
    # The throwaway Trainer must not print "GPU available: ..." a second time.
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_trainer(trainer_cfg: Mapping[str, Any]) -> None:
    """Every ``trainer.*`` setting Lightning would refuse, refused now with the key and the value.

    Raises:
        UsageError: a non-positive ``max_steps``, an unknown precision or accelerator, a key the
            Trainer does not take, ...
    """

    check_max_steps(trainer_cfg.get("max_steps"))
    try:
        with _quiet_rank_zero():
            instantiate(trainer_cfg, logger=False, callbacks=[], enable_checkpointing=False)
    except Exception as error:  # Lightning raises ValueError, TypeError or MisconfigurationException
        cause = error.__cause__ if error.__cause__ is not None else error  # Hydra wraps what __init__ raised
        text = " ".join(str(cause).split())
        raise UsageError(f"trainer: {text}") from error


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps of the whole fit (``step 120/250``) instead of batches."""

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        # description, count, bar, ...: the count reads right after "step" ("step 120/250 ━━━━").
        return [columns[0], columns[2], columns[1], *columns[3:]]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else float("inf")
        if self.train_progress_bar_id is None:  # one bar for the whole fit, not one per epoch
            self.train_progress_bar_id = self._add_task(total, "step")
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
        self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.train_progress_bar_id is None:
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def progress_callbacks(trainer_cfg: Mapping[str, Any]) -> list[L.Callback]:
    """The step bar when the Trainer shows a progress bar (Lightning refuses one when it is off)."""
    return [StepProgressBar()] if trainer_cfg.get("enable_progress_bar", True) else []
