"""``lora-lightning-report <sweep dir>``: rebuild a sweep's report from its job directories.

For SLURM jobs that finish after the launcher returned, a sweep stopped midway, or a report to
redo: it writes sweep.csv, sweep.md and sweep.png exactly as the end of a multirun does. Jobs
without results yet are rows marked ``unfinished``; a directory without jobs, or a sweep whose
every job failed, is a one-line error and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from lora_lightning.app.errors import UsageError
from lora_lightning.app.run.tracking import sweep_group, wandb_settings
from lora_lightning.app.sweep.callback import finish_report
from lora_lightning.app.sweep.report import failure_line
from lora_lightning.app.sweep.rows import OK, UNFINISHED, find_jobs

PROG = "lora-lightning-report"


def _jobs_group(hydra_yaml: Path) -> str | None:
    """The W&B group a job derived from its sweep directory, which may since have been moved or copied."""

    if not hydra_yaml.is_file():
        return None
    hydra = (yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra") or {}
    output_dir = (hydra.get("runtime") or {}).get("output_dir")
    return sweep_group(Path(output_dir).parent) if output_dir else None


def _wandb_from_jobs(sweep_dir: Path) -> dict[str, Any] | None:
    """The W&B settings the sweep's jobs used (from the first job's .hydra/config.yaml)."""

    for job in find_jobs(sweep_dir):
        path = job / ".hydra" / "config.yaml"
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            settings = wandb_settings(config.get("logger"))
            if settings is None:
                raise UsageError(f"--wandb: the jobs of {str(sweep_dir)!r} did not log to W&B (see {path})")
            if not settings.get("group"):  # the jobs' group came from the sweep dir they ran in
                settings["group"] = _jobs_group(path.with_name("hydra.yaml")) or sweep_group(sweep_dir)
            return settings
    raise UsageError(f"--wandb: no job of {str(sweep_dir)!r} has a .hydra/config.yaml to read its W&B settings from")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write sweep.csv, sweep.md and sweep.png into a lora-lightning sweep directory from its jobs.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (multirun/<date>/<time>)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the report as a run in the sweep's W&B group (as the jobs did)"
    )
    args = parser.parse_args(argv)

    try:
        find_jobs(args.sweep_dir)  # a missing, empty or foreign directory fails before anything is written
        settings = _wandb_from_jobs(args.sweep_dir) if args.wandb else None
        report, _ = finish_report(args.sweep_dir, settings, count_unfinished=False)
        if report.count(OK) == 0 and report.count(UNFINISHED) == 0:
            raise UsageError(failure_line(report, count_unfinished=False))
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
