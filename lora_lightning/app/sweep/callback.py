"""The Hydra callback that ends every multirun with the sweep report (see :mod:`sweep_report`).

Hydra calls ``on_multirun_start`` and ``on_multirun_end`` in the launching process, whatever the
launcher (basic, joblib, submitit) or sweeper (basic, study, Optuna): the end comes once the
sweeper has every result. Jobs that fail record the failure and let the sweep go on (see
:mod:`job_record`), so the report is written and the command then exits with one line naming the
failure. Should the sweeper itself stop with an error (Optuna when no trial finished, a launcher
whose worker died), :func:`report_after_error` lets the entry point write the report all the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lora_lightning.app.errors import UsageError, UsageExit, describe
from lora_lightning.app.run.tracking import log_sweep_report, wandb_settings
from lora_lightning.app.sweep.checks import check_sweep
from lora_lightning.app.sweep.report import PNG_FILE, Report, failure_line, print_report, write_report
from lora_lightning.app.sweep.rows import COLUMNS, find_jobs

# The sweep directory of the multirun running in this process (set at its start), for the entry
# point to report on when the sweeper raises instead of returning.
_ACTIVE: dict[str, Any] = {}


def wandb_table(report: Report) -> dict[str, Any]:
    """The report as W&B wants it: columns, rows of plain values, and summary fields."""
    data = [[" ".join(row[c]) if c == "overrides" else row[c] for c in COLUMNS] for row in report.rows]
    best = report.best
    summary = {"sweep/jobs": len(report.rows), "sweep/findings": "\n".join(report.findings)}
    if best is not None:
        summary.update(
            {"sweep/best_job": best["job"], "sweep/monitor": best["monitor"], "sweep/best_value": best["monitor_value"]}
        )
    return {"columns": list(COLUMNS), "data": data, "summary": summary}


def finish_report(
    sweep_dir: Path, wandb: dict[str, Any] | None, *, count_unfinished: bool
) -> tuple[Report, str | None]:
    """Write and print the report, and log it to W&B when ``wandb`` (see ``wandb_settings``) says so.

    Returns:
        The report and its failure line (see ``failure_line``).
    """
    report = write_report(sweep_dir)
    if wandb is not None:
        run_dir = log_sweep_report(wandb, sweep_dir, wandb_table(report), report.files.get(PNG_FILE))
        report.files["wandb run"] = Path(run_dir)
    print_report(report)
    return report, failure_line(report, count_unfinished=count_unfinished)


class SweepReportCallback(Callback):
    """Checks a multirun's group choices at its start and writes its report at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(config)
        except UsageError as error:
            raise UsageExit(str(error)) from error
        _ACTIVE["sweep_dir"] = Path(str(config.hydra.sweep.dir))
        _ACTIVE["wandb"] = wandb_settings(config.get("logger"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _ACTIVE.pop("sweep_dir", Path(str(config.hydra.sweep.dir)))
        _, problem = finish_report(sweep_dir, _ACTIVE.pop("wandb", None), count_unfinished=True)
        if problem is not None:
            raise UsageExit(problem)


def report_after_error(error: BaseException) -> str | None:
    """After a multirun stopped with an error: write its report if any job ran; returns its failure line.

    Returns None when no multirun was running in this process, or none of its jobs started (then
    the sweep directory, holding at most Hydra's multirun.yaml, is removed: nothing half-made stays).
    """
    sweep_dir = _ACTIVE.pop("sweep_dir", None)
    wandb = _ACTIVE.pop("wandb", None)
    if sweep_dir is None:
        return None
    if not _has_jobs(sweep_dir):
        (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
        if sweep_dir.is_dir() and not any(sweep_dir.iterdir()):
            sweep_dir.rmdir()
        return None
    report, problem = finish_report(sweep_dir, wandb, count_unfinished=True)
    cause = describe(error)
    if problem and cause in problem:  # the sweeper stopped on that job's failure (Optuna past max_failure_rate)
        return f"{problem}; the sweeper stopped there"
    stopped = f"the sweep stopped: {cause} (HYDRA_FULL_ERROR=1 shows the traceback)"
    if problem:
        return f"{problem}; {stopped}"
    return f"{stopped}; the report of its {len(report.rows)} jobs is in {sweep_dir}"


def _has_jobs(sweep_dir: Path) -> bool:
    try:
        find_jobs(sweep_dir)
    except UsageError:
        return False
    return True
