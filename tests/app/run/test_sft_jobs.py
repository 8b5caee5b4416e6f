"""The supervised task end to end through the CLI, shrunk: experiment=sft_docstrings swept over packing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.app_support import TINY_LLAMA, offline_runs, read_offline_run, read_summary, run_cli

pytestmark = pytest.mark.slow

# The default task on the test-sized tiny Llama, with 256 positions so that several examples fit
# a packed row (its 512-token vocabulary spends many tokens on code): short functions, a few steps.
SFT_BASE = [*TINY_LLAMA, "model.architecture.max_position_embeddings=256"]
SFT_SHORT = [
    "experiment=sft_docstrings",
    *SFT_BASE,
    "data.max_length=256",
    "data.source.max_code_chars=120",
    "data.max_train_examples=300",
    "data.max_val_examples=12",
    "data.batch_size=8",
    "data.answers=2",
    "data.answer_tokens=6",
    "trainer.accelerator=cpu",
    "trainer.max_steps=30",
    "trainer.val_check_interval=15",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "optim.lr=1e-2",
    "optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def sweep(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lora-lightning -m experiment=sft_docstrings data.packing=false,true``, W&B offline."""
    work = tmp_path_factory.mktemp("sft")
    out = work / "sweep"
    proc = run_cli(
        ["-m", *SFT_SHORT, "data.packing=false,true", f"hydra.sweep.dir={out}"], cache_dir, cwd=work, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize(("job", "packing"), [("0", False), ("1", True)])
def test_default_task_learns_the_responses(sweep: Path, job: str, packing: bool) -> None:
    summary = read_summary(sweep / job)
    stats = summary["data_stats"]
    assert stats["packing"] is packing and stats["max_length"] == 256 and stats["train_on_prompt"] is False
    train = stats["counts"]["train"]
    assert train["read"] == 300 and train["used"] == 300 - train["dropped"] - train["prompt_too_long"]
    assert stats["val_examples"] == 12
    if packing:  # several examples a row
        assert stats["train_rows"] < train["used"]
    else:
        assert stats["train_rows"] == train["used"]
    # Response-only perplexity on held-out files fell, and the reloaded merged model agrees with it.
    assert summary["val_ppl"] < 0.97 * summary["base_val_ppl"]  # about x0.95 (the full task: x0.4)
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]), rel_tol=1e-4)
    assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    # Answers to held-out prompts, base vs fine-tuned.
    assert len(summary["answers"]) == 2
    for row in summary["answers"]:
        assert row["prompt"].startswith("Write the docstring summary of this Python function.") and row["reference"]
        assert isinstance(row["base"], str) and isinstance(row["tuned"], str)
    assert summary["sample"] is None  # the recipe turns the text continuation off
    log = (sweep / job / "main.log").read_text()
    assert f"data train: 300 examples read, {train['used']} used" in log


def test_sweep_runs_and_wandb_hold_the_answers_and_counts(sweep: Path) -> None:
    groups = set()
    for job in ("0", "1"):
        summary = read_summary(sweep / job)
        (run_dir,) = offline_runs(sweep / job)
        run = read_offline_run(run_dir)
        assert run["exit_code"] == 0 and f"data.packing={job == '1'}" in run["run"]["name"]
        groups.add(run["run"]["group"])
        assert run["config"]["data"]["packing"] is (job == "1")
        counts = summary["data_stats"]["counts"]
        assert run["summary"]["data/train_read"] == counts["train"]["read"] == 300
        assert run["summary"]["data/val_used"] == counts["val"]["used"]
        assert run["summary"]["final/val_ppl"] == pytest.approx(summary["val_ppl"])
        (row,) = [row for row in run["history"] if "val/answers/_type" in row]  # the table, logged once
        assert row["val/answers/_type"] == "table-file" and row["val/answers/nrows"] == 2
        table_file = run_dir / "files" / row["val/answers/path"]
        table = json.loads(table_file.read_text())
        assert table["columns"] == ["prompt", "reference", "base", "tuned"]
        assert table["data"] == [[a["prompt"], a["reference"], a["base"], a["tuned"]] for a in summary["answers"]]
    (group,) = groups
    assert group.startswith("sweep-")


def test_a_chat_role_the_template_does_not_know_stops_the_job(cache_dir: Path, sweep: Path, tmp_path: Path) -> None:
    """Found once the tokenizer is loaded, still before training: one line naming file and line."""
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "critic", "content": "meh"},
        {"role": "assistant", "content": "ok"},
    ]
    records = tmp_path / "chats.jsonl"
    records.write_text(json.dumps({"messages": chat[::2]}) + "\n" + json.dumps({"messages": chat}) + "\n")
    run_dir = tmp_path / "run"
    args = ["data=sft_jsonl", f"data.source.train=[{records}]", "data.source.format=messages", *SFT_BASE]
    proc = run_cli([*args, "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}"], cache_dir, cwd=tmp_path)
    # (transformers draws its "Loading weights" bar before; the app's own output is the one line)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lora-lightning") or "Traceback" in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == (
        f"lora-lightning: error: data file {str(records)!r} line 2: role 'critic' is not one the chat template "
        "knows (system, user, assistant)"
    )
    assert not run_dir.exists()
