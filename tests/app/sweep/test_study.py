"""A shrunk rank study through the CLI: the reference runs once, and the sweep ends with its report."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from lora_lightning.app.run.tracking import sweep_group
from lora_lightning.app.sweep.cli import main as report_main
from lora_lightning.app.sweep.findings import findings
from lora_lightning.app.sweep.rows import COLUMNS, read_rows
from tests.app_support import SHORT, TINY_LLAMA, offline_runs, read_offline_run, read_summary, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """experiment=rank_study_quick (r4, r16 x qv, all_linear + full), shrunk to seconds, W&B offline."""
    work = tmp_path_factory.mktemp("study")
    sweep = work / "sweep"
    args = [
        "-m",
        "experiment=rank_study_quick",
        *TINY_LLAMA,
        *SHORT,
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
    ]
    args.append("checkpoint.enabled=false")
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], cache_dir, work, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep, proc.stdout


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def test_study_runs_the_reference_and_the_base_score_once(study: tuple[Path, str]) -> None:
    sweep, _ = study
    summaries = {job.name: read_summary(job) for job in _jobs(sweep)}
    assert len(summaries) == 5
    full = [name for name, s in summaries.items() if s["method"] == "full"]
    assert full == ["0"]  # the reference is one job, the first
    lora = {(s["lora"]["r"], s["targets"]) for s in summaries.values() if s["method"] == "lora"}
    assert lora == {(4, "qv"), (16, "qv"), (4, "all_linear"), (16, "all_linear")}
    # Only the reference scored the base; its full fine-tune trained every weight and learnt.
    reference = summaries["0"]
    assert [name for name, s in summaries.items() if s["base_val_ppl"] is not None] == ["0"]
    assert reference["params"]["trainable"] == reference["params"]["total"] and reference["lora"] is None
    assert reference["val_ppl"] < reference["base_val_ppl"]
    # Its export is the whole model, a plain transformers checkpoint that scores what training scored.
    model_dir = Path(reference["paths"]["model"])
    assert model_dir == sweep / "0" / "model" and not (sweep / "0" / "adapter").exists()
    assert (
        sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        == (reference["params"]["total"])
    )
    assert math.isclose(reference["merged_val_ppl"], reference["val_ppl"], rel_tol=2e-3)
    # Every job measured its own training peak (this process's RSS, reset per job).
    assert all(s["peak_mem_mib"] > 50 and s["peak_mem_kind"] == "process_peak_rss" for s in summaries.values())
    assert len({s["eval_key"] for s in summaries.values()}) == 1  # one base, one validation set


def test_study_report_rows_columns_and_figure(study: tuple[Path, str]) -> None:
    sweep, stdout = study
    with (sweep / "sweep.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = {row["job"]: row for row in reader}
    summaries = {job.name: read_summary(job) for job in _jobs(sweep)}
    assert set(rows) == set(summaries) and all(row["status"] == "ok" for row in rows.values())
    base = summaries["0"]["base_val_ppl"]
    for name, row in rows.items():
        summary = summaries[name]
        assert float(row["base_val_ppl"]) == pytest.approx(base)  # the reference's base score, shared
        assert float(row["val_ppl"]) == pytest.approx(summary["val_ppl"])
        assert int(row["trainable_params"]) == summary["params"]["trainable"]
        assert float(row["peak_mem_mib"]) == summary["peak_mem_mib"] and row["error"] == ""
        assert row["method"] == summary["method"] and (row["r"] == "") == (summary["method"] == "full")
    assert "method=full" in rows["0"]["overrides"] and "rank=r16" in rows["4"]["overrides"]

    markdown = (sweep / "sweep.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "| ok |" in line]
    losses = [float(summaries[line.split(" | ")[1]]["val_loss"]) for line in table]
    assert len(table) == 5 and losses == sorted(losses)  # sorted by the monitored val/loss
    best = min(summaries, key=lambda name: summaries[name]["val_loss"])
    assert table[0].startswith(f"| **best** | {best} | ok |")
    assert "## Findings" in markdown
    lines = findings(read_rows(sweep))
    assert any(line.startswith("q,v alone reach") and "r=4:" in line and "r=16:" in line for line in lines)
    assert any(line.startswith("best LoRA (job ") and "vs full fine-tuning (job 0)" in line for line in lines)
    assert all(f"- {line}" in markdown for line in lines) and all(line in stdout for line in lines)
    assert f"best       job {best} " in stdout and "sweep report (5 jobs: 5 ok)" in stdout

    png = (sweep / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width, _ = imread(sweep / "sweep.png").shape
    assert width > 2 * height > 600  # two panels side by side
    assert not list(sweep.glob(".sweep.*"))  # no staging file left behind


def test_study_report_is_a_run_in_the_sweeps_wandb_group(study: tuple[Path, str]) -> None:
    sweep, _ = study
    job_groups = {read_offline_run(offline_runs(job)[0])["run"]["group"] for job in _jobs(sweep)}
    assert job_groups == {sweep_group(sweep)}
    (run_dir,) = offline_runs(sweep)
    run = read_offline_run(run_dir)
    assert run["run"]["group"] == sweep_group(sweep) and run["run"]["name"] == "sweep-report"
    assert run["exit_code"] == 0
    summary = run["summary"]  # W&B flattens the media entries' fields into the summary
    assert summary["sweep/table/_type"] == "table-file" and summary["sweep/table/nrows"] == 5
    table = json.loads((run_dir / "files" / summary["sweep/table/path"]).read_text())
    assert table["columns"] == list(COLUMNS) and len(table["data"]) == 5
    assert summary["sweep/figure/_type"] == "image-file" and summary["sweep/figure/width"] > 600
    best = min(read_rows(sweep), key=lambda row: row["val_loss"])
    assert summary["sweep/best_job"] == best["job"] and summary["sweep/monitor"] == "val/loss"
    assert summary["sweep/best_value"] == pytest.approx(best["val_loss"])


def test_report_command_rebuilds_a_sweep_stopped_midway(
    study: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "stopped"
    shutil.copytree(study[0], copy, ignore=shutil.ignore_patterns("wandb", "sweep.*"))
    (copy / "3" / "summary.json").unlink()  # job 3 never finished
    report_main([str(copy), "--wandb"])
    out = capsys.readouterr().out
    assert "sweep report (5 jobs: 4 ok, 1 unfinished)" in out
    with (copy / "sweep.csv").open() as f:
        statuses = {row["job"]: row["status"] for row in csv.DictReader(f)}
    assert statuses == {"0": "ok", "1": "ok", "2": "ok", "3": "unfinished", "4": "ok"}
    assert (copy / "sweep.png").is_file() and "| 3 | unfinished |" in (copy / "sweep.md").read_text()
    # --wandb: the report run joins the jobs' group, as at the end of the sweep.
    (run_dir,) = offline_runs(copy)
    assert read_offline_run(run_dir)["run"]["group"] == sweep_group(study[0])


@pytest.mark.parametrize("case", ["missing", "empty", "foreign", "file", "one job's directory"])
def test_report_command_refuses_what_is_not_a_sweep(
    case: str, study: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    if case == "empty":
        target.mkdir()
    elif case == "foreign":
        (target / "photos").mkdir(parents=True)
        (target / "notes.txt").write_text("mine")
    elif case == "file":
        target.write_text("not a directory")
    elif case == "one job's directory":
        target = study[0] / "1"
    before = sorted(p.name for p in target.iterdir()) if target.is_dir() else None
    with pytest.raises(SystemExit) as exit_:
        report_main([str(target)])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-lightning-report: error: ") and str(target) in lines[0]
    if before is not None:
        assert sorted(p.name for p in target.iterdir()) == before  # nothing written
