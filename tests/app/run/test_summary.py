"""summary.json is one typed record: what the job writes is what the report reads back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lora_lightning.app.run.summary import FAILED, FAILED_FIELDS, OK, JobSummary, read_summary, write_summary
from lora_lightning.app.sweep.rows import read_row


def _finished(tmp_path: Path) -> JobSummary:
    return JobSummary(
        status=OK,
        method="lora",
        targets="all_linear",
        lora={"r": 8, "alpha": 16},
        monitor={"val/loss": 1.5},
        paths={"output_dir": str(tmp_path), "summary": str(tmp_path / "summary.json"), "checkpoints": None},
        wall_s=12.0,
        lr=1e-3,
        steps=8,
        val_loss=1.5,
        val_ppl=4.48,
        base_val_ppl=9.0,
        params={"trainable": 10, "total": 100, "trainable_percent": 10.0},
        timings={"fit_s": 3.0},
    )


def test_a_finished_job_round_trips_with_every_field_but_the_failure_ones(tmp_path):
    summary = _finished(tmp_path)
    path = write_summary(tmp_path, summary)
    data = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(JobSummary)}
    assert set(data) == fields - {"error", "traceback", "answers"}  # answers only for supervised data
    assert read_summary(path) == summary
    summary.answers = [{"prompt": "p", "base": "a", "tuned": "b"}]
    assert "answers" in json.loads(write_summary(tmp_path, summary).read_text())


def test_a_failed_job_writes_what_the_report_needs_and_the_report_reads_it(tmp_path):
    job = tmp_path / "0"
    job.mkdir()
    failed = JobSummary(status=FAILED, error="ValueError: boom", traceback="...", method="lora", targets="qv",
                        lora={"r": 4, "alpha": 8}, monitor={"val/loss": None}, wall_s=1.0,
                        paths={"output_dir": str(job), "summary": str(job / "summary.json")})  # fmt: skip
    write_summary(job, failed)
    assert tuple(sorted(json.loads((job / "summary.json").read_text()))) == tuple(sorted(FAILED_FIELDS))
    row = read_row(tmp_path, job)
    assert (row["status"], row["error"], row["r"], row["targets"]) == ("failed", "ValueError: boom", 4, "qv")


def test_a_record_from_a_newer_writer_reads_and_a_broken_file_is_one_reason(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({**_finished(tmp_path).to_json(), "a_future_field": 1}))
    assert read_summary(path).val_ppl == pytest.approx(4.48)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_summary(path)
    row = read_row(tmp_path, tmp_path)
    assert row["status"] == "failed" and row["error"] == "unreadable summary.json: not a JSON object"
