"""The sweep report: sweep.csv, sweep.md and sweep.png in a sweep directory, from its jobs' files.

One function, :func:`write_report`, reads every job's ``summary.json`` (:mod:`sweep_rows`), computes
the findings (:mod:`sweep_findings`), draws the figure (:mod:`sweep_figure`) and writes the three
files, each through a temporary sibling and a rename. Two callers share it: the Hydra callback
:class:`SweepReportCallback` at the end of every multirun (basic, joblib and submitit launchers,
Optuna sweeper: it runs in the launching process once the sweeper returns), and the console
command ``lora-lightning-report <sweep dir>`` (:mod:`sweep_cli`), for SLURM jobs that finish after
the launcher returned or a sweep stopped midway. Nothing here runs a model.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from lora_lightning.app.console import console
from lora_lightning.app.sweep.figure import plottable, render_png
from lora_lightning.app.sweep.findings import findings
from lora_lightning.app.sweep.rows import COLUMNS, OK, best_row, read_rows, varying_overrides
from lora_lightning.io.atomic_files import write_atomic

CSV_FILE, MD_FILE, PNG_FILE = "sweep.csv", "sweep.md", "sweep.png"


@dataclass
class Report:
    """What :func:`write_report` wrote and found."""

    sweep_dir: Path
    rows: list[dict[str, Any]]
    findings: list[str]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Any] | None:
        return best_row(self.rows)

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    def not_ok(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != OK]

    def tally(self) -> str:
        """``5 jobs: 4 ok, 1 unfinished``."""
        counts = ", ".join(f"{self.count(s)} {s}" for s in (OK, "failed", "unfinished") if self.count(s))
        return f"{len(self.rows)} job{'s' if len(self.rows) != 1 else ''}: {counts}"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,d}"
    return str(value)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Every column of every row, full precision; overrides joined by spaces as on a command line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "overrides": " ".join(row["overrides"])})
    return buffer.getvalue()


def _sorted_for_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Finished jobs by the monitored value (lower is better), then failed and unfinished ones in job order.
    done = [row for row in rows if row["status"] == OK and row["monitor_value"] is not None]
    done.sort(key=lambda row: row["monitor_value"])
    return done + [row for row in rows if row not in done]


def markdown_text(report: Report, figure: bool) -> str:
    """The table sorted by the monitored metric, the best job marked, then the findings and the figure."""
    rows = report.rows
    monitor = next((row["monitor"] for row in rows if row["monitor"]), "val/loss")
    labels = varying_overrides(rows)
    best = report.best
    lines = [
        f"# Sweep report: {report.sweep_dir}",
        "",
        f"{report.tally()}. Sorted by {monitor} (lower is better); **best** marks the best job.",
        "",
        "| | job | status | overrides | method | r | alpha | targets | trainable params | trainable % | base val ppl "
        f"| val ppl | merged val ppl | {monitor} | fit (s) | job (s) | peak mem (MiB) | error |",
        "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in _sorted_for_table(rows):
        mark = "**best**" if best is not None and row["job"] == best["job"] else ""
        cells = [mark, row["job"], row["status"], f"`{labels[row['job']]}`"]
        cells += [_cell(row[key]) for key in ("method", "r", "alpha", "targets", "trainable_params")]
        cells += [_cell(row[key]) for key in ("trainable_percent", "base_val_ppl", "val_ppl", "merged_val_ppl")]
        cells += [_cell(row[key]) for key in ("monitor_value", "fit_s", "wall_s", "peak_mem_mib")]
        cells.append((row["error"] or "").replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best job: {best['job']} (`{labels[best['job']]}`), {monitor} {_cell(best['monitor_value'])}."]
    if report.findings:
        lines += ["", "## Findings", "", *(f"- {line}" for line in report.findings)]
    if figure:
        lines += ["", f"![val perplexity against rank and trainable parameters]({PNG_FILE})"]
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str | Path) -> Report:
    """Read the jobs of ``sweep_dir`` and write sweep.csv, sweep.md and sweep.png into it.

    Everything is computed before the first file is written, and each file is replaced whole. With
    no finished job there is nothing to plot: sweep.png is not written (an older one is removed, so
    it cannot contradict the table).

    Raises:
        UsageError: ``sweep_dir`` is missing or holds no job directory.
    """
    directory = Path(sweep_dir)
    rows = read_rows(directory)
    report = Report(directory, rows, findings(rows))
    title = f"val perplexity of the sweep {directory.resolve().parent.name}/{directory.name}"
    png = render_png(rows, title) if plottable(rows) else None
    texts = {CSV_FILE: csv_text(rows), MD_FILE: markdown_text(report, figure=png is not None)}
    for name, text in texts.items():
        write_atomic(directory / name, text)
        report.files[name] = directory / name
    if png is not None:
        write_atomic(directory / PNG_FILE, png)
        report.files[PNG_FILE] = directory / PNG_FILE
    else:
        (directory / PNG_FILE).unlink(missing_ok=True)
    return report


def failure_line(report: Report, *, count_unfinished: bool) -> str | None:
    """One line about the jobs that did not finish well (None if there are none), naming the first one.

    Args:
        count_unfinished: whether a job without results counts (at the end of a multirun it was
            killed; for the console command it may still be running).
    """
    bad = [row for row in report.not_ok() if count_unfinished or row["status"] != "unfinished"]
    if not bad:
        return None
    first = bad[0]
    what = f"job {first['job']}: {first['error'] or first['status']}"
    table = report.files.get(MD_FILE, report.sweep_dir / MD_FILE)
    if len(bad) == len(report.rows):
        jobs = "the only job" if len(bad) == 1 else f"{len(bad)} jobs"
        return f"every job of the sweep failed ({jobs}; first, {what}); see {table}"
    return f"{len(bad)} of {len(report.rows)} jobs did not finish ({what}); their rows and errors are in {table}"


def print_report(report: Report) -> None:
    """Where the report is, and the best job: the lines a sweep ends with."""

    out = console()
    out.print(f"[bold]lora-lightning: sweep report[/bold] ({report.tally()})")
    for name, path in report.files.items():
        out.print(f"  {name.ljust(9)}  {escape(str(path))}", soft_wrap=True)
    best = report.best
    if best is not None:
        label = varying_overrides(report.rows)[best["job"]]
        figures = f"{best['monitor']} {_cell(best['monitor_value'])}, val ppl {_cell(best['val_ppl'])}"
        out.print(f"  best       job {best['job']} ({escape(label)}): {figures}", soft_wrap=True)
    for line in report.findings:
        out.print(f"  - {escape(line)}", soft_wrap=True)
