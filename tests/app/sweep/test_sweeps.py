"""Many processes through the CLI: the rank x targets multirun, joblib, submitit and Optuna, failed jobs, DDP."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.app_support import SHORT, TINY_LLAMA, offline_runs, read_offline_run, read_summary, run_cli

pytestmark = pytest.mark.slow

# Jobs of a sweep test only need to train a little and count: no base scoring, no export check.
LEAN = [*SHORT, "trainer.max_steps=2", "trainer.val_check_interval=2", "eval_base=false", "verify_export=false"]


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def test_rank_by_targets_grid(cache_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "rank=r4,r8,r16", "targets=qv,all_linear", *TINY_LLAMA, *LEAN, "export=false"]
    proc = run_cli([*args, "checkpoint.enabled=false", f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    jobs = _jobs(sweep)
    assert len(jobs) == 6  # one output dir per job
    trainable: dict[tuple[int, str], int] = {}
    groups, names = set(), set()
    for job in jobs:
        summary = read_summary(job)
        trainable[(summary["lora"]["r"], summary["targets"])] = summary["params"]["trainable"]
        (run_dir,) = offline_runs(job)  # one W&B run per job, inside its own output dir
        run = read_offline_run(run_dir)
        assert run["exit_code"] == 0  # each job finished its run
        groups.add(run["run"]["group"])
        names.add(run["run"]["name"])
        assert run["config"]["lora/trainable_params"] == summary["params"]["trainable"]
    assert len(trainable) == 6
    (group,) = groups  # one group for the whole sweep
    assert group.startswith("sweep-") and group.endswith(sweep.name)
    # Runs are named by their overrides; the swept ones tell the jobs apart.
    assert len(names) == 6 and all("trainer.max_steps=2" in n for n in names)
    assert sum("rank=r16" in n and "targets=all_linear" in n for n in names) == 1
    # Counts grow with the rank (linearly) and with the targets.
    for targets in ("qv", "all_linear"):
        assert trainable[(4, targets)] * 2 == trainable[(8, targets)]
        assert trainable[(8, targets)] * 2 == trainable[(16, targets)]
    for r in (4, 8, 16):
        assert trainable[(r, "qv")] < trainable[(r, "all_linear")]


def test_joblib_launcher_runs_jobs_in_parallel_processes(cache_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "rank=r4,r8", *TINY_LLAMA, *LEAN]
    proc = run_cli([*args, "logger=csv", f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    jobs = _jobs(sweep)
    assert len(jobs) == 2
    summaries = [read_summary(job) for job in jobs]
    assert sorted(s["lora"]["r"] for s in summaries) == [4, 8]
    for job, summary in zip(jobs, summaries, strict=True):
        assert (job / "adapter" / "adapter_config.json").is_file()
        assert (job / "csv" / "version_0" / "metrics.csv").is_file()
        assert summary["paths"]["output_dir"] == str(job)


def test_ddp_job_on_two_cpu_processes(cache_dir: Path, tmp_path: Path) -> None:
    """trainer=ddp: Lightning re-launches the Hydra command for rank 1; rank 0 alone writes the results."""
    out = tmp_path / "run"
    args = [
        "trainer=ddp",
        "trainer.devices=2",
        *TINY_LLAMA,
        *SHORT,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
    ]
    proc = run_cli([*args, f"hydra.run.dir={out}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["val_ppl"] < summary["base_val_ppl"]
    # Both ranks held the same adapters: the merged model rank 0 exported scores what DDP validated.
    assert abs(summary["merged_val_ppl"] - summary["val_ppl"]) / summary["val_ppl"] < 2e-3
    assert len(offline_runs(out)) == 1  # one W&B run, from rank 0


def _report_statuses(sweep: Path) -> dict[str, str]:
    with (sweep / "sweep.csv").open() as f:
        return {row["job"]: row["status"] for row in csv.DictReader(f)}


def test_optuna_sweeper_three_trials_end_with_the_report_naming_the_best(cache_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    search = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0"]
    search += ["optim.lr=tag(log,interval(1e-3,3e-2))", "rank=choice(r4,r8)"]
    lean = [item for item in LEAN if not item.startswith("optim.lr=")]  # a fixed lr would replace the search
    args = ["-m", *search, *TINY_LLAMA, *lean, "logger=none", "checkpoint.enabled=false"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = _jobs(sweep)
    summaries = {job.name: read_summary(job) for job in jobs}
    assert len(jobs) == 3 and len({s["lr"] for s in summaries.values()}) == 3  # three sampled learning rates
    assert {s["lora"]["r"] for s in summaries.values()} <= {4, 8}
    # Optuna's own verdict and the report's agree on the best trial.
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = min(summaries, key=lambda name: summaries[name]["val_loss"])
    assert optuna["best_value"] == pytest.approx(summaries[best]["val_loss"])
    assert optuna["best_params"]["optim.lr"] == pytest.approx(summaries[best]["lr"])
    assert f"rank={optuna['best_params']['rank']}" in (sweep / best / ".hydra" / "overrides.yaml").read_text()
    assert re.search(rf"best +job {best} \(optim\.lr=[0-9.e-]+ rank=r[48]\): val/loss", proc.stdout)
    assert _report_statuses(sweep) == dict.fromkeys(summaries, "ok")
    assert f"**best** | {best} | ok" in (sweep / "sweep.md").read_text()


def test_submitit_local_launcher_runs_two_jobs(cache_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    args = ["-m", *launcher, "rank=r4,r8", *TINY_LLAMA, *LEAN, "logger=csv", "checkpoint.enabled=false"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert sorted(read_summary(job)["lora"]["r"] for job in jobs) == [4, 8]
    # submitit ran each job as its own process and kept its logs beside the sweep.
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, sorted(p.name for p in (sweep / ".submitit").rglob("*"))
    assert _report_statuses(sweep) == {"0": "ok", "1": "ok"} and (sweep / "sweep.png").is_file()


def test_a_failed_job_is_a_row_and_the_sweep_goes_on(cache_dir: Path, tmp_path: Path) -> None:
    """Job 1 cannot export (its merged/ holds a user's file): it fails after training, job 0 is unaffected."""
    sweep = tmp_path / "sweep"
    (sweep / "1" / "merged").mkdir(parents=True)
    (sweep / "1" / "merged" / "notes.txt").write_text("mine")
    args = ["-m", "rank=r4,r8", *TINY_LLAMA, *LEAN, "logger=csv", "checkpoint.enabled=false"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lora-lightning: error: ")]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]  # one line, the last
    assert errors[0].startswith("lora-lightning: error: 1 of 2 jobs did not finish (job 1: directory ")
    assert "notes.txt" in errors[0] and errors[0].endswith(f"their rows and errors are in {sweep / 'sweep.md'}")
    assert "Error executing job" not in proc.stderr
    ok, failed = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert ok["status"] == "ok" and failed["status"] == "failed" and failed["lora"] == {"r": 8, "alpha": 16}
    assert "notes.txt" in failed["error"] and failed["traceback"].startswith("Traceback (most recent call last)")
    assert "Traceback" in (sweep / "1" / "main.log").read_text()  # the trace is in the job's log, not the console
    assert (sweep / "1" / "merged" / "notes.txt").read_text() == "mine"
    assert _report_statuses(sweep) == {"0": "ok", "1": "failed"}
    assert "| 1 | failed |" in (sweep / "sweep.md").read_text()

    # Without job 0, every job failed: the report command says so in one line, after writing the table.
    shutil.rmtree(sweep / "0")
    again = subprocess.run(
        [sys.executable, "-m", "lora_lightning.app.sweep.cli", str(sweep)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
    assert again.stderr.startswith("lora-lightning-report: error: every job of the sweep failed (the only job; first")
    assert _report_statuses(sweep) == {"1": "failed"} and not (sweep / "sweep.png").exists()  # nothing to plot
