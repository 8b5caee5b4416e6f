"""The rows of a sweep report: one per job directory, read from what the jobs wrote.

A job directory is one that Hydra made for a job (``.hydra/overrides.yaml``) or that holds a
``summary.json``. A finished job's ``summary.json`` says ``status: ok`` and carries the figures; a
job that failed after its work started wrote ``status: failed`` and its error; a job with no
summary yet (running, killed, a SLURM job still queued) is ``unfinished``. Nothing here runs a
model: a row is what is on disk, and an unreadable file is a row with an error, never a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_lightning.app.errors import UsageError, one_line
from lora_lightning.app.run.summary import FAILED, OK, SUMMARY_FILE, JobSummary, read_summary

UNFINISHED = "unfinished"  # a job dir with no summary.json yet
COLUMNS = (
    "job",
    "status",
    "overrides",
    "method",
    "r",
    "alpha",
    "targets",
    "lr",
    "trainable_params",
    "trainable_percent",
    "base_val_ppl",
    "val_ppl",
    "merged_val_ppl",
    "base_val_loss",
    "val_loss",
    "monitor",
    "monitor_value",
    "steps",
    "fit_s",
    "wall_s",
    "peak_mem_mib",
    "peak_mem_kind",
    "error",
)
_MAX_DEPTH = 4  # job dirs are <sweep>/<subdir>; custom subdirs may nest a little


def _is_job_dir(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() or (path / SUMMARY_FILE).is_file()


def find_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories under ``sweep_dir``, in job order (numbers numerically, then by name).

    Raises:
        UsageError: ``sweep_dir`` is missing, not a directory, or holds no job directory.
    """
    if not sweep_dir.exists():
        raise UsageError(f"sweep directory {str(sweep_dir)!r} does not exist")
    if not sweep_dir.is_dir():
        raise UsageError(f"{str(sweep_dir)!r} is not a directory (give the sweep directory of lora-lightning -m)")
    if _is_job_dir(sweep_dir):
        raise UsageError(f"{str(sweep_dir)!r} is the output directory of one job; give the sweep directory above it")
    jobs: list[Path] = []
    level = [sweep_dir]
    for _ in range(_MAX_DEPTH):
        deeper = []
        for parent in level:
            for child in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
                (jobs if _is_job_dir(child) else deeper).append(child)
        level = deeper
    if not jobs:
        raise UsageError(
            f"no jobs in {str(sweep_dir)!r}: expected the job directories of a lora-lightning -m sweep "
            "(each with .hydra/overrides.yaml or summary.json)"
        )

    def order(path: Path) -> tuple[int, int, str]:
        name = str(path.relative_to(sweep_dir))
        return (0, int(name), name) if name.isdigit() else (1, 0, name)

    return sorted(jobs, key=order)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _read_summary(path: Path) -> tuple[JobSummary | None, str | None]:
    """(summary, None), (None, None) when there is none yet, or (None, error) when it cannot be read."""
    if not path.is_file():
        return None, None
    try:
        return read_summary(path), None
    except (OSError, ValueError, TypeError) as error:
        return None, f"unreadable {SUMMARY_FILE}: {one_line(str(error))}"


def _from_config(config: Any) -> dict[str, Any]:
    """What the job's composed config (.hydra/config.yaml) says, for jobs without results."""
    config = config if isinstance(config, dict) else {}
    method = (config.get("method") or {}).get("name", "lora")
    lora = config.get("lora") or {}
    lora_job = method == "lora"
    return {
        "method": method,
        "r": lora.get("r") if lora_job else None,
        "alpha": lora.get("alpha") if lora_job else None,
        "targets": lora.get("targets") if lora_job else None,
        "lr": (config.get("optim") or {}).get("lr"),
        "monitor": config.get("monitor"),
    }


def _targets_text(targets: Any) -> str | None:
    if targets is None:
        return None
    return targets if isinstance(targets, str) else ",".join(str(name) for name in targets)


def read_row(sweep_dir: Path, job_dir: Path) -> dict[str, Any]:
    """One job's row: every column of :data:`COLUMNS` (None where unknown)."""
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["job"] = str(job_dir.relative_to(sweep_dir))
    row["overrides"] = [str(o) for o in overrides] if isinstance(overrides, list) else []  # joined when written
    row.update(_from_config(_read_yaml(job_dir / ".hydra" / "config.yaml")))
    summary, problem = _read_summary(job_dir / SUMMARY_FILE)
    if summary is None:
        row["status"] = FAILED if problem else UNFINISHED
        row["error"] = problem
        return row
    row["status"] = OK if summary.status == OK else FAILED
    lora = summary.lora or {}
    params = summary.params or {}
    monitor = summary.monitor or {}

    def known(value: Any, fallback: Any) -> Any:  # the job's record, else what its config says
        return fallback if value is None else value

    row.update(
        method=known(summary.method, row["method"] or "lora"),
        r=lora.get("r", row["r"]),
        alpha=lora.get("alpha", row["alpha"]),
        targets=known(summary.targets, row["targets"]),
        lr=known(summary.lr, row["lr"]),
        trainable_params=params.get("trainable"),
        trainable_percent=params.get("trainable_percent"),
        error=summary.error,
        eval_key=summary.eval_key,
    )
    for key in ("base_val_ppl", "val_ppl", "merged_val_ppl", "base_val_loss", "val_loss", "steps", "wall_s"):
        row[key] = getattr(summary, key)
    row["fit_s"] = (summary.timings or {}).get("fit_s")  # training alone: what methods differ in
    row["peak_mem_mib"], row["peak_mem_kind"] = summary.peak_mem_mib, summary.peak_mem_kind
    if monitor:
        ((row["monitor"], row["monitor_value"]),) = list(monitor.items())[:1]
    if row["method"] == "full":
        row["r"] = row["alpha"] = row["targets"] = None
    return row


def share_base_scores(rows: list[dict[str, Any]]) -> None:
    """Give the base's score to jobs that skipped it, from a job on the same base and validation set.

    A study scores the base once; each job's ``eval_key`` names its base and validation data.
    """
    measured = {row.get("eval_key"): row for row in rows if row.get("base_val_ppl") is not None}
    for row in rows:
        source = measured.get(row.get("eval_key"))
        if row.get("base_val_ppl") is None and source is not None and row.get("eval_key") is not None:
            row["base_val_ppl"], row["base_val_loss"] = source["base_val_ppl"], source["base_val_loss"]


def read_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's row, in job order, targets as text and the base score shared (see :func:`share_base_scores`)."""
    rows = [read_row(sweep_dir, job) for job in find_jobs(sweep_dir)]
    share_base_scores(rows)
    for row in rows:
        row["targets"] = _targets_text(row["targets"])
        row.pop("eval_key", None)
    return rows


def best_row(rows: list[dict[str, Any]], method: str | None = None) -> dict[str, Any] | None:
    """The finished job with the lowest monitored value (both monitors are lower-is-better)."""
    done = [
        row
        for row in rows
        if row["status"] == OK and row["monitor_value"] is not None and method in (None, row["method"])
    ]
    return min(done, key=lambda row: row["monitor_value"]) if done else None


def varying_overrides(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per job, only the overrides that differ between jobs: what tells a job apart (``rank=r4 targets=qv``)."""
    if len(rows) == 1:
        return {rows[0]["job"]: "(the only job)"}
    common = set.intersection(*(set(row["overrides"]) for row in rows)) if rows else set()
    return {row["job"]: " ".join(o for o in row["overrides"] if o not in common) or "(none)" for row in rows}
