"""Many processes through the CLI: the rank x targets multirun, joblib's parallel jobs, a 2-process DDP job."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app_support import SHORT, TINY_LLAMA, offline_runs, read_offline_run, read_summary, run_cli

pytestmark = pytest.mark.slow

# Jobs of a sweep test only need to train a little and count: no base scoring, no export check.
LEAN = [*SHORT, "trainer.max_steps=2", "trainer.val_check_interval=2", "eval_base=false", "verify_export=false"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "app-cache"  # shared with the other app test modules


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
