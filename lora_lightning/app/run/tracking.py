"""Experiment tracking: the logger of a job, its group and run name, and closing the run.

A multirun gets one group (named after its sweep directory) and one run per job named by the
job's overrides (``rank=r8,targets=qv``), so a tracker groups a sweep the way Hydra ran it:
W&B's ``group``; TensorBoard's run directories ``<sweep_dir>/tensorboard/<group>/<run>``; an
MLflow tag ``group`` on runs that share the sweep's store. Each job finishes its run, so the next
job in the same process (the basic launcher) starts a fresh one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lora_lightning.app.errors import UsageError
from lora_lightning.app.run.summary import JobSummary

WANDB_MODES = ("offline", "online", "disabled")
MLFLOW_DB = "mlflow.db"  # logger=mlflow's local store, in the job's output dir (a multirun: the sweep dir)


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a multirun: named after its sweep directory's last two parts (date, time)."""
    return "sweep-" + "_".join(Path(str(sweep_dir)).parts[-2:])


def job_identity(default_name: str) -> tuple[str | None, str]:
    """``(group, name)`` for the current Hydra job: the sweep's group (None for a single run), the overrides."""

    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.job.override_dirname or default_name
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # The sweep dir is resolved once for the whole sweep (timestamps included), so every
        # job, in this process or a joblib / SLURM worker, derives the same group from it.
        group = sweep_group(hydra_cfg.sweep.dir)
    return group, name


# The package each logger needs, and the extra that installs it.
_NEEDS = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
}


def _kind(logger_cfg: Any) -> str:
    """The logger class's name (``WandbLogger``, ``TensorBoardLogger``, ...), "" for none."""
    return str(logger_cfg.get("_target_") or "").rpartition(".")[2] if logger_cfg else ""


def swept_name(name: str) -> str:
    """A short run name for directories: in a multirun, only the overrides this job does not share
    with the whole sweep (``logger=tensorboard,rank=r4``); ``name`` otherwise. At most 150 characters."""

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        recorded = Path(hydra_cfg.sweep.dir) / "multirun.yaml"  # Hydra's record of the sweep's command line
        if recorded.is_file():
            # keys the command line set to one value for every job (not a sweep: no list, no range(...))
            shared = {
                _override_key(o)
                for o in OmegaConf.load(recorded).hydra.overrides.task
                if not re.search(r",|\w\(", o.split("=", 1)[-1])
            }
            own = [o for o in hydra_cfg.overrides.task if _override_key(o) not in shared]
            name = ",".join(own) or name
    if len(name) > 150:  # a file name is at most 255 bytes
        name = f"{name[:140]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_logger(logger_cfg: DictConfig | None) -> None:
    """The logger settings a user can get wrong, checked before any work starts."""
    kind = _kind(logger_cfg)
    if kind == "WandbLogger":
        mode = logger_cfg.get("mode", "offline")
        if mode not in WANDB_MODES:
            raise UsageError(f"logger.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    if kind in _NEEDS:
        modules, extra = _NEEDS[kind]
        if not any(importlib.util.find_spec(module) for module in modules):
            raise UsageError(
                f"logger={extra} needs {' or '.join(modules)}, which is not installed: "
                f"pip install 'lora-lightning[{extra}]'"
            )


def _tracking_root(output_dir: Path) -> Path:
    """Where a job's local tracking files go: the sweep dir for a multirun (one store for the
    sweep), else the job's output dir."""

    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else output_dir


def build_logger(logger_cfg: DictConfig | None, output_dir: Path, default_name: str) -> Logger | None:
    """Instantiate the configured logger (None for ``logger=none``), with W&B group and name filled in."""

    if not logger_cfg or logger_cfg.get("_target_") is None:
        return None
    check_logger(logger_cfg)
    group, name = job_identity(default_name)
    if str(logger_cfg["_target_"]).endswith("WandbLogger"):
        save_dir = Path(logger_cfg.get("save_dir") or output_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        # log_model here would upload Lightning checkpoints; the app logs the exported PEFT adapter
        # itself (see log_adapter_artifact), which is what a user wants to download.
        logger = instantiate(
            logger_cfg,
            name=logger_cfg.get("name") or name,
            group=logger_cfg.get("group") or group,
            save_dir=str(save_dir),
            log_model=False,
        )
        _drop_dead_wandb_settings(logger)
        return logger
    if _kind(logger_cfg) == "TensorBoardLogger":
        save_dir = Path(logger_cfg.get("save_dir") or _tracking_root(output_dir)) / "tensorboard"
        keys = [key for key in logger_cfg if key != "log_model"]  # no artifacts in TensorBoard
        return instantiate(
            OmegaConf.masked_copy(logger_cfg, keys),
            save_dir=str(save_dir),
            name=logger_cfg.get("name") or group or "",
            version=logger_cfg.get("version") or swept_name(name),
        )
    if _kind(logger_cfg) == "MLFlowLogger":
        store: dict[str, Any] = {"tracking_uri": logger_cfg.get("tracking_uri")}
        if store["tracking_uri"] is None:  # a local SQLite store (MLflow 3 retired the plain file store)
            root = _tracking_root(output_dir)
            root.mkdir(parents=True, exist_ok=True)
            store = {"tracking_uri": f"sqlite:///{root / MLFLOW_DB}", "artifact_location": str(root / "mlartifacts")}
        tags = {**(logger_cfg.get("tags") or {}), **({"group": group} if group else {})}
        # log_model here would log Lightning checkpoints; the app logs the exported adapter itself.
        return instantiate(logger_cfg, run_name=logger_cfg.get("run_name") or name, tags=tags, log_model=False, **store)
    return instantiate(logger_cfg)


def _drop_dead_wandb_settings(logger: WandbLogger) -> None:
    # Lightning always passes anonymous=None to wandb.init, which recent wandb answers with a warning
    # that the setting has no effect; left out, the run is the same and the warning goes.
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", False) is None:
        del init["anonymous"]


def log_run_config(logger: Logger | None, cfg: DictConfig) -> None:
    """The resolved job config as the run's hyperparameters (W&B run config, CSV hparams.yaml)."""
    if logger is None:
        return
    container = dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    config = {key: value for key, value in container.items() if key != "hydra"}
    if _kind_of(logger) == "MLFlowLogger":
        # MLflow flattens nested params with "/" and never lets a param change: the job's lora.targets
        # (a role) would be lora/targets, which the callback logs resolved. The job config goes under config/.
        config = {"config": config}
    logger.log_hyperparams(config)


def log_results(logger: Logger | None, summary: JobSummary, adapter_dir: Path | None, log_model: bool) -> None:
    """Put the final figures in the run (config and summary) and optionally the adapter as an artifact."""
    if logger is None:
        return
    counts = summary.params or {}
    logger.log_hyperparams(
        {
            "lora/trainable_params": counts.get("trainable"),
            "lora/total_params": counts.get("total"),
            "lora/trainable_percent": counts.get("trainable_percent"),
            "lora/quant": (summary.quant or {}).get("method") or "none",
        }
    )
    keys = ("base_val_ppl", "val_ppl", "val_loss", "merged_val_ppl", "peak_mem_mib")
    finals = {f"final/{key}": getattr(summary, key) for key in keys}
    fidelity = summary.merge_fidelity or {}
    finals["final/merge_overall_rel_error"] = fidelity.get("overall_rel_error")
    logger.log_metrics({key: value for key, value in finals.items() if value is not None})
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        run.summary.update({key: value for key, value in finals.items() if value is not None})
        if log_model and adapter_dir is not None and adapter_dir.is_dir():
            import wandb

            artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata={"lora": summary.lora})
            artifact.add_dir(str(adapter_dir))
            run.log_artifact(artifact, aliases=["latest"])
    elif _kind_of(logger) == "MLFlowLogger" and log_model and adapter_dir is not None and adapter_dir.is_dir():
        logger.experiment.log_artifacts(logger.run_id, str(adapter_dir), artifact_path="adapter")
    logger.save()


def _kind_of(logger: Logger) -> str:
    return type(logger).__name__


def finish(logger: Logger | None, failed: bool = False) -> None:
    """Close the job's W&B run (``wandb.finish``), so the next job in this process starts a new one."""
    if isinstance(logger, WandbLogger):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    elif logger is not None:
        logger.finalize("failed" if failed else "success")


def wandb_settings(logger_cfg: Any) -> dict[str, Any] | None:
    """The W&B fields of a logger config (project, entity, mode, group, tags), or None if it is not W&B or is off.

    Reads only those keys, so a config whose other keys interpolate job-time values works here too.
    """
    if not logger_cfg or not str(logger_cfg.get("_target_") or "").endswith("WandbLogger"):
        return None
    if logger_cfg.get("mode", "offline") == "disabled":
        return None
    settings = {key: logger_cfg.get(key) for key in ("project", "entity", "mode", "group")}
    settings["tags"] = [str(tag) for tag in logger_cfg.get("tags") or []]
    return settings


def log_sweep_report(settings: dict[str, Any], sweep_dir: Path, table: dict[str, Any], figure: Path | None) -> str:
    """One more run in the sweep's W&B group holding the report table and figure; returns its directory.

    Args:
        settings: from :func:`wandb_settings`.
        sweep_dir: the sweep directory; the run is written under ``<sweep_dir>/wandb``.
        table: ``columns`` and ``data`` (rows of plain values), and ``summary`` (best job, findings).
        figure: sweep.png, or None when there was nothing to plot.
    """
    import wandb

    run = wandb.init(
        project=settings.get("project") or "lora-lightning",
        entity=settings.get("entity"),
        mode=settings.get("mode") or "offline",
        group=settings.get("group") or sweep_group(sweep_dir),
        name="sweep-report",
        job_type="sweep-report",
        tags=[*(settings.get("tags") or []), "sweep-report"],
        dir=str(sweep_dir),
        config={"sweep_dir": str(sweep_dir), "jobs": len(table["data"])},
    )
    try:
        logged: dict[str, Any] = {"sweep/table": wandb.Table(columns=list(table["columns"]), data=table["data"])}
        if figure is not None:
            logged["sweep/figure"] = wandb.Image(str(figure))
        run.log(logged)
        run.summary.update(table["summary"])
        return str(Path(run.dir).parent)
    finally:
        run.finish()
