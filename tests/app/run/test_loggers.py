"""logger=tensorboard and logger=mlflow, for real: one multirun, read back with each tracker's own reader.

Each job's run must hold what a W&B run holds (the job config and lora/* as hyperparameters,
train/val and final/* metrics), named by the job's overrides and grouped by the sweep.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lightning.app.run.tracking import MLFLOW_DB, sweep_group
from tests.app_support import SHORT, TINY_LLAMA, read_summary, run_cli

pytestmark = pytest.mark.slow

LEAN = [*SHORT, "trainer.max_steps=2", "trainer.val_check_interval=2", "eval_base=false", "verify_export=false"]


@pytest.fixture(scope="module")
def sweep(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four jobs: {tensorboard, mlflow} x {r4, r8}; the MLflow jobs store the adapter as artifacts."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    work = tmp_path_factory.mktemp("loggers")
    sweep_dir = work / "sweep"
    args = ["-m", "logger=tensorboard,mlflow", "rank=r4,r8", "logger.log_model=true", *TINY_LLAMA, *LEAN]
    proc = run_cli([*args, "checkpoint.enabled=false", f"hydra.sweep.dir={sweep_dir}"], cache_dir, work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (work / "mlruns").exists() and not (work / "lightning_logs").exists()  # nothing in the cwd
    return sweep_dir


def _summaries(sweep_dir: Path, logger: str) -> dict[str, dict]:
    """The summaries of the sweep's jobs that used ``logger``, by job dir name."""
    out = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        if f"logger={logger}" in (job / ".hydra" / "overrides.yaml").read_text():
            out[job.name] = read_summary(job)
    assert len(out) == 2
    return out


def test_tensorboard_runs_hold_the_metrics_and_hyperparameters_grouped_by_sweep(sweep: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    group = sweep / "tensorboard" / sweep_group(sweep)
    runs = sorted(p for p in group.iterdir() if p.is_dir())
    # named by the overrides that tell the sweep's jobs apart
    assert sorted(p.name for p in runs) == ["logger=tensorboard,rank=r4", "logger=tensorboard,rank=r8"]
    summaries = {s["lora"]["r"]: s for s in _summaries(sweep, "tensorboard").values()}
    for run in runs:
        events = EventAccumulator(str(run))
        events.Reload()
        scalars = set(events.Tags()["scalars"])
        assert {"train/loss", "val/loss", "val/ppl", "final/val_ppl", "lora/trainable_params"} <= scalars, scalars
        rank = 4 if "rank=r4" in run.name else 8
        (final,) = events.Scalars("final/val_ppl")
        assert final.value == pytest.approx(summaries[rank]["val_ppl"], rel=1e-5)
        (trainable,) = {e.value for e in events.Scalars("lora/trainable_params")}
        assert trainable == summaries[rank]["params"]["trainable"]
        hparams = (run / "hparams.yaml").read_text()  # Lightning's record of log_hyperparams
        assert f"lora/r: {rank}" in hparams and "optim:" in hparams and "lora/targets" in hparams


def test_mlflow_runs_hold_the_metrics_hyperparameters_tags_and_adapter(sweep: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = sweep / MLFLOW_DB
    assert store.is_file()  # one local store for the sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("lora-lightning")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    summaries = {s["lora"]["r"]: s for s in _summaries(sweep, "mlflow").values()}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["group"] == sweep_group(sweep) and run.data.tags["lora"] == "true"
        assert "logger=mlflow" in run.info.run_name
        rank = int(run.data.params["lora/r"])
        assert f"rank=r{rank}" in run.info.run_name and run.data.params["lora/targets"] == "all-linear"
        assert run.data.metrics["final/val_ppl"] == pytest.approx(summaries[rank]["val_ppl"], rel=1e-6)
        assert run.data.metrics["lora/trainable_params"] == summaries[rank]["params"]["trainable"]
        assert {"train/loss", "val/loss", "val/ppl"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
        files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
        assert files == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
