"""The sweep machinery's pure parts, fast: study job lists, findings, group checks, verbosity, peak memory."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_lightning.app.console import library_noise
from lora_lightning.app.errors import UsageError
from lora_lightning.app.run.generation import check_sample
from lora_lightning.app.run.memory import RSS_KIND, PeakMeter
from lora_lightning.app.sweep.checks import check_group_choices
from lora_lightning.app.sweep.findings import findings, lora_vs_full, qv_share, rank_steps
from lora_lightning.app.sweep.report import Report, failure_line
from lora_lightning.app.sweep.rows import COLUMNS, best_row, share_base_scores, varying_overrides
from lora_lightning.app.sweep.study import check_references, override_key, study_jobs


def test_study_adds_each_reference_once_per_combination_of_the_other_sweeps() -> None:
    grid = [
        ["rank=r4", "targets=qv", "seed=0"],
        ["rank=r8", "targets=qv", "seed=0"],
        ["rank=r4", "targets=qv", "seed=1"],
        ["rank=r8", "targets=qv", "seed=1"],
    ]
    jobs = study_jobs(grid, {"rank", "targets"}, [["method=full", "eval_base=true"]])
    # One reference per seed, first; then the grid unchanged.
    assert jobs[:2] == [["seed=0", "method=full", "eval_base=true"], ["seed=1", "method=full", "eval_base=true"]]
    assert jobs[2:] == grid
    # A reference's own key wins over the same key in the rest of a job.
    assert study_jobs([["rank=r4", "eval_base=false"]], {"rank"}, [["eval_base=true"]])[0] == ["eval_base=true"]
    assert override_key("+trainer.max_steps=5") == "trainer.max_steps" and override_key("model@m=hf") == "model"


@pytest.mark.parametrize(
    ("references", "words"),
    [("method=full", ["must be a list of override lists"]), ([["method"]], ["references[0]", "key=value"])],
)
def test_bad_study_references_name_the_entry(references: Any, words: list[str]) -> None:
    with pytest.raises(UsageError) as caught:
        check_references(references)
    assert all(word in str(caught.value) for word in words)


def test_group_choices_of_a_sweep_are_checked_against_the_groups() -> None:
    groups = {"rank": ["r16", "r4", "r8"], "hydra/launcher": ["basic", "joblib"]}

    def options(group: str) -> list[str]:
        return groups.get(group, [])

    check_group_choices([("command line", "rank=r4,r8"), ("command line", "optim.lr=0.1,0.2")], options)
    check_group_choices([("hydra.sweeper.params.rank", "rank=choice(r4,r16)")], options)
    with pytest.raises(UsageError) as caught:
        check_group_choices([("hydra.sweeper.params.rank", "rank=choice(r4,r3)")], options)
    assert str(caught.value) == (
        "hydra.sweeper.params.rank: rank=r3 is not an option of group 'rank' (options: r16, r4, r8)"
    )
    with pytest.raises(UsageError, match="hydra/launcher=jobl"):
        check_group_choices([("command line", "hydra/launcher=jobl")], options)


def _row(job: str, method: str = "lora", **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(job=job, status="ok", method=method, overrides=[f"job={job}"], monitor="val/loss", **values)
    if row["val_loss"] is not None:
        row["val_ppl"], row["monitor_value"] = math.exp(row["val_loss"]), row["val_loss"]
    return row


def _study_rows() -> list[dict[str, Any]]:
    """A rank study's rows: base loss 6.0; q,v gains 0.6/0.8, all-linear 1.0/1.2 at r=4/8; full gains 1.5."""
    rows = [
        _row("0", "full", val_loss=4.5, base_val_loss=6.0, trainable_params=1000, fit_s=20.0, peak_mem_mib=900.0),
        _row("1", r=4, targets="qv", val_loss=5.4, trainable_params=10, fit_s=10.0, peak_mem_mib=500.0),
        _row("2", r=8, targets="qv", val_loss=5.2, trainable_params=20, fit_s=10.0, peak_mem_mib=500.0),
        _row("3", r=4, targets="all_linear", val_loss=5.0, trainable_params=40, fit_s=12.0, peak_mem_mib=600.0),
        _row("4", r=8, targets="all_linear", val_loss=4.8, trainable_params=80, fit_s=12.5, peak_mem_mib=650.0),
        _row("5", r=8, targets="all_linear", val_loss=4.9, trainable_params=80),  # a worse repeat: not used
        {**_row("6", r=16, targets="qv"), "status": "failed", "error": "RuntimeError: boom"},
    ]
    rows[0]["base_val_ppl"] = math.exp(6.0)
    for row in rows:
        row["eval_key"] = "same"
    share_base_scores(rows)
    return rows


def test_findings_are_computed_from_the_rows() -> None:
    rows = _study_rows()
    assert all(row["base_val_loss"] == 6.0 for row in rows)  # the reference's base score reached every job
    assert qv_share(rows) == (
        "q,v alone reach, of all-linear's improvement over the base (in val loss): "
        f"r=4: 60% (val ppl {math.exp(5.4):,.1f} vs {math.exp(5.0):,.1f}); "
        f"r=8: 67% (val ppl {math.exp(5.2):,.1f} vs {math.exp(4.8):,.1f})"
    )
    step_all = math.exp(4.8) / math.exp(5.0) - 1  # r4 -> r8 on all_linear: ppl falls by 1 - e^-0.2
    assert rank_steps(rows) == [
        f"all_linear, val ppl from each rank to the next: r4->r8 {step_all:+.1%}",
        f"qv, val ppl from each rank to the next: r4->r8 {math.exp(-0.2) - 1:+.1%}",
    ]
    versus = lora_vs_full(rows)
    assert versus is not None and versus.startswith("best LoRA (job 4: r=8, all_linear) vs full fine-tuning (job 0)")
    assert "trainable params 80 vs 1,000 (x0.08)" in versus and "training time 12.5 s vs 20.0 s (x0.62)" in versus
    assert "peak memory 650 MiB vs 900 MiB (x0.72)" in versus
    assert versus.endswith("LoRA reaches 80% of full fine-tuning's improvement over the base (in val loss)")
    assert findings(rows)[0] == f"base model: val ppl {math.exp(6.0):,.1f}" and len(findings(rows)) == 5
    assert best_row(rows)["job"] == "0" and best_row(rows, "lora")["job"] == "4"
    # Without a full fine-tune or without q,v the comparisons are left out, not guessed.
    lora_only = [row for row in rows if row["method"] == "lora" and row["targets"] != "qv"]
    assert lora_vs_full(lora_only) is None and qv_share(lora_only) is None


def test_varying_overrides_name_a_job_by_what_differs() -> None:
    rows = [_row("0"), _row("1")]
    rows[0]["overrides"] = ["experiment=x", "rank=r4"]
    rows[1]["overrides"] = ["experiment=x", "rank=r8"]
    assert varying_overrides(rows) == {"0": "rank=r4", "1": "rank=r8"}
    assert varying_overrides(rows[:1]) == {"0": "(the only job)"}


def test_library_noise_hides_exactly_the_known_noise_unless_verbose(caplog: pytest.LogCaptureFixture) -> None:
    from transformers.utils import logging as hf_logging

    tip = "💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/) to enable LitLogger"
    leafspec = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for verbose in (False, True):
        caplog.clear()
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")  # record every warning that library_noise lets through
            with library_noise(verbose):
                warnings.warn(leafspec, FutureWarning, stacklevel=1)
                warnings.warn("a real warning", UserWarning, stacklevel=1)
                rank_zero.info(tip)
                rank_zero.info("GPU available: False, used: False")
                bar = hf_logging.tqdm(range(3), desc="Loading weights")
                disabled = getattr(bar, "disable", True)
        messages = [str(w.message) for w in seen]
        assert "a real warning" in messages  # other warnings always pass
        assert (leafspec in messages) is verbose
        logged = [record.getMessage() for record in caplog.records]
        assert "GPU available: False, used: False" in logged
        assert (tip in logged) is verbose
        assert disabled is not verbose
    assert not getattr(hf_logging.tqdm(range(3), desc="Loading weights"), "disable", True)  # restored after


def test_peak_memory_on_cpu_is_the_jobs_own() -> None:
    meter = PeakMeter("cpu")
    big = torch.ones(64 * 1024 * 1024, dtype=torch.uint8)  # 64 MiB resident before the meter starts
    big.add_(1)
    del big
    meter.start()
    first = meter.read()
    block = torch.ones(128 * 1024 * 1024, dtype=torch.uint8)  # 128 MiB touched while measured
    block.add_(1)
    second = meter.read()
    del block
    assert first.kind == RSS_KIND  # Linux: the peak was reset, so it is this interval's own
    assert second.mib - first.mib > 100


def test_failure_line_names_the_first_failure_and_the_table(tmp_path: Path) -> None:
    rows = _study_rows()
    report = Report(tmp_path, rows, [])
    assert failure_line(report, count_unfinished=True) == (
        f"1 of 7 jobs did not finish (job 6: RuntimeError: boom); their rows and errors are in {tmp_path / 'sweep.md'}"
    )
    for row in rows:
        row["status"], row["error"] = "failed", row["error"] or "ValueError: bad"
    assert failure_line(report, count_unfinished=True) == (
        f"every job of the sweep failed (7 jobs; first, job 0: ValueError: bad); see {tmp_path / 'sweep.md'}"
    )
    # Unfinished jobs count at the end of a multirun (killed), not for the report command (maybe running).
    rows[0]["status"], rows[0]["error"] = "unfinished", None
    assert failure_line(Report(tmp_path, rows[:1], []), count_unfinished=False) is None
    assert "every job" in failure_line(Report(tmp_path, rows[:1], []), count_unfinished=True)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ({"prompt": "def ", "max_new_tokens": 0}, "sample.max_new_tokens must be a positive integer, got 0"),
        ({"prompt": "", "max_new_tokens": 4}, "sample.prompt must be a non-empty string or null, got ''"),
        ({"prompt": "x", "repetition_penalty": 0}, "sample.repetition_penalty must be a positive number (1.0: none)"),
        ({"prompt": "x", "no_repeat_ngram_size": -1}, "sample.no_repeat_ngram_size must be a non-negative integer"),
    ],
)
def test_bad_sample_settings_name_the_field(sample: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_sample(sample)
    assert str(caught.value).startswith(message)
    check_sample({"prompt": None, "max_new_tokens": 0})  # no prompt: no sample, nothing to check
