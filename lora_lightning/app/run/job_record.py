"""What a job leaves for the sweep report besides its results: its status, and a record of a failure.

The report reads ``summary.json`` and never re-runs anything, so a job that fails after its work
started still writes one: ``status: failed``, the error on one line, the traceback, and what the
config says about the method. Under the basic (or study) sweeper the failed job then returns NaN
instead of raising: that sweeper ends the multirun at the first failed job and Hydra skips
``on_multirun_end``, so the report would be lost; the report lists the failure instead and the
command exits non-zero. Sweepers with their own failure handling (Optuna marks the trial failed
and stops past ``max_failure_rate``) get the exception, as does a single run;
``HYDRA_FULL_ERROR=1`` always raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lora_lightning.app.errors import describe, full_error_requested
from lora_lightning.app.run.summary import FAILED, SUMMARY_FILE, JobSummary, write_summary

log = logging.getLogger(__name__)

# Data settings that change which validation tokens a base is scored on (not the seed, batch, workers).
_EVAL_DATA_KEYS_IGNORED = ("seed", "batch_size", "num_workers", "max_train_tokens")


def eval_key(base_model: str, data_cfg: Mapping[str, Any]) -> str:
    """12 hex digits naming "this base on this validation set": jobs with equal keys share a base score.

    A study scores the base once (its reference job); the report gives that score to every job
    with the same key.
    """
    data = {key: value for key, value in data_cfg.items() if key not in _EVAL_DATA_KEYS_IGNORED}
    text = json.dumps({"base": base_model, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plain(node: Any) -> Any:
    """A plain container from an OmegaConf node (interpolations resolved where they can be)."""
    if isinstance(node, DictConfig):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:  # an interpolation that cannot resolve here: keep the raw text
            return OmegaConf.to_container(node, resolve=False)
    return node


def failure_summary(cfg: DictConfig, output_dir: Path, error: BaseException, wall_s: float) -> JobSummary:
    """summary.json of a job that failed after its work started: what the report needs to list it."""
    method = (cfg.get("method") or {}).get("name", "lora")
    lora = plain(cfg.get("lora")) or {}
    return JobSummary(
        status=FAILED,
        error=describe(error),
        traceback="".join(traceback.format_exception(error)),
        method=method,
        targets=lora.get("targets") if method == "lora" else None,
        lora={key: lora.get(key) for key in ("r", "alpha")} if method == "lora" else None,
        monitor={str(cfg.get("monitor")): None},
        wall_s=round(wall_s, 1),
        paths={"output_dir": str(output_dir), "summary": str(output_dir / SUMMARY_FILE)},
    )


# Sweepers that end the whole multirun at the first failed job (the study sweeper is a basic one).
_ALL_OR_NOTHING_SWEEPERS = (
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.lora_lightning_study.study_sweeper.StudySweeper",
)


def _sweep_goes_on_after_nan() -> bool:
    """Whether this job runs in a multirun whose sweeper would end it at a raised job failure."""

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return str(HydraConfig.get().sweeper.get("_target_")) in _ALL_OR_NOTHING_SWEEPERS


def run_recorded(job: Callable[[], float], cfg: DictConfig, output_dir: Path, start: float) -> float:
    """Run ``job``; if it raises, write the failure summary first (rank zero) and log the traceback.

    Returns:
        The job's value; NaN for a failed job under the basic or study sweeper (see the module docstring).
    """
    try:
        return job()
    except Exception as error:
        summary = failure_summary(cfg, output_dir, error, time.perf_counter() - start)
        if output_dir.is_dir():
            rank_zero_only(write_summary)(output_dir, summary)
        if not _sweep_goes_on_after_nan() or full_error_requested():
            raise
        _to_log_file(f"job failed:\n{summary.traceback}")
        log.warning("job failed: %s (recorded in %s); the sweep goes on", summary.error, output_dir / SUMMARY_FILE)
        return float("nan")


def _to_log_file(message: str) -> None:
    """Write to the job's log file only (Hydra's ``<job name>.log``): a traceback is for the file, not the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
