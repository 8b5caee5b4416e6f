"""The job: load a base, score it, fine-tune it (LoRA, or in full: ``method``), export, score the export, report.

Everything that can be wrong with the input (the LoRA fields, the target role, the model path, the
data files) is checked first, before anything is trained or written; such a mistake ends the job
with one line and leaves no output behind (see :mod:`lora_lightning.app.errors`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_lightning.app.errors import UsageError, job_started, user_errors
from lora_lightning.app.models.lightning_module import CausalLMModule, check_optim, evaluate_perplexity
from lora_lightning.app.models.loading import LoadedModel, check_loss_chunk_tokens, check_name_or_path, resolve_targets
from lora_lightning.app.models.quant import check_quant
from lora_lightning.app.run.answers import AnswerProbe, log_answers, print_answers
from lora_lightning.app.run.generation import check_sample, continuation
from lora_lightning.app.run.job_record import eval_key, run_recorded
from lora_lightning.app.run.memory import PeakMeter
from lora_lightning.app.run.methods import Method, build_method, method_name
from lora_lightning.app.run.summary import CONFIG_FILE, OK, SUMMARY_FILE, JobSummary, print_recap, write_summary
from lora_lightning.app.run.tracking import build_logger, check_logger, finish, log_results, log_run_config
from lora_lightning.app.trainer import check_trainer, progress_callbacks
from lora_lightning.config import LoRAConfig
from lora_lightning.io.atomic_files import write_atomic
from lora_lightning.lightning.callback import LoRACallback
from lora_lightning.targets import plan_targets

MONITORS = ("val/loss", "val/ppl")  # what the job can return; both lower-is-better


def lora_config_from(cfg: DictConfig) -> LoRAConfig:
    """The LoRAConfig of a job: ``cfg.lora`` with ``targets`` mapped through the model's roles."""
    fields = dict(OmegaConf.to_container(cfg.lora, resolve=True))  # type: ignore[arg-type]
    targets = fields.pop("targets")
    target_modules = resolve_targets(targets, cfg.model.get("target_roles"), str(cfg.model.get("name", "model")))
    try:
        return LoRAConfig(target_modules=target_modules, **fields)
    except (ValueError, TypeError) as err:
        raise UsageError(f"lora: {err}") from err


def quant_fields(cfg: DictConfig) -> dict[str, Any] | None:
    """``cfg.quant`` as a plain dict, None without a quantization method."""
    quant = cfg.get("quant")
    return dict(OmegaConf.to_container(quant, resolve=True)) if quant and quant.get("method") else None  # type: ignore[arg-type]


def _quant_record(cfg: DictConfig, method: Method) -> dict[str, Any] | None:
    """``cfg.quant`` and, on a MoE base, the expert banks quantized at injection with their bytes."""
    fields = quant_fields(cfg)
    banks = method.quantized_banks()
    return {**fields, "expert_banks": banks} if fields is not None and banks else fields


def optim_fields(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.optim`` as a plain dict (CausalLMModule's fields plus the callback's lr_ratio_B)."""
    return dict(OmegaConf.to_container(cfg.optim, resolve=True))  # type: ignore[arg-type]


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _validate(trainer: L.Trainer, module: L.LightningModule, datamodule: Any) -> dict[str, float]:
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in (results[0] if results else {}).items()}


def _check_merged(merged_dir: Path, datamodule: Any, sample: DictConfig | None) -> tuple[float, str | None]:
    """Reload the exported model as a user would, score it, and let it continue the sample prompt."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    _, ppl = evaluate_perplexity(model, datamodule.val_dataloader(), device)
    text = continuation(model, tokenizer, sample)
    del model
    return ppl, text


def _trainer(cfg: DictConfig, output_dir: Path, logger: Any, fine_tune: L.Callback) -> L.Trainer:
    """The configured Trainer with the method's callback (LoRA: adapter-only checkpoints) and the logger."""
    callbacks: list[L.Callback] = [fine_tune, *progress_callbacks(cfg.trainer)]
    if cfg.checkpoint.enabled:
        callbacks.append(
            ModelCheckpoint(
                dirpath=output_dir / "checkpoints",
                filename="step{step}",
                auto_insert_metric_name=False,
                monitor=cfg.monitor,
                mode="min",
                save_top_k=cfg.checkpoint.save_top_k,
                save_last=cfg.checkpoint.save_last,
            )
        )
    return instantiate(
        cfg.trainer,
        logger=logger or False,
        callbacks=callbacks,
        enable_checkpointing=bool(cfg.checkpoint.enabled),  # else Lightning adds its own checkpointer
        default_root_dir=str(output_dir),
    )


def _prepare(cfg: DictConfig, output_dir: Path) -> tuple[LoRAConfig, Any, LoadedModel]:
    """Every input check, then the base model and the tokenized data; raises only user errors."""
    with user_errors(output_dir):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise UsageError(f"required value not set: {', '.join(missing)} (give it on the command line, key=value)")
        if cfg.monitor not in MONITORS:
            raise UsageError(f"monitor must be one of {', '.join(MONITORS)}, got {cfg.monitor!r}")
        lora_config = lora_config_from(cfg)
        check_optim({k: v for k, v in optim_fields(cfg).items() if k != "lr_ratio_B"})
        # validates the ratio and the switch
        LoRACallback(lora_config, lr_ratio_B=optim_fields(cfg).get("lr_ratio_B", 1.0))
        check_logger(cfg.get("logger"))
        check_quant(quant_fields(cfg))
        method_name(cfg)  # an unknown method
        check_trainer(cfg.trainer)
        check_loss_chunk_tokens(cfg.model.get("loss_chunk_tokens"))
        check_sample(cfg.get("sample"))
        if cfg.model.get("name_or_path") is not None:
            check_name_or_path(cfg.model.name_or_path)
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.source.check()
    with user_errors(output_dir):
        loaded: LoadedModel = instantiate(cfg.model, quant=quant_fields(cfg), _convert_="all")
        if method_name(cfg) == "lora":
            plan_targets(loaded.model, lora_config)  # names that match nothing fail here, not mid-fit
        datamodule.tokenizer = loaded.tokenizer
        datamodule.setup("fit")
        datamodule.check_validation()
        datamodule.check_model(loaded.model)
    # After the base is loaded: building a base on a cache miss must not change the job's RNG.
    L.seed_everything(cfg.seed, verbose=False)
    return lora_config, datamodule, loaded


def run(cfg: DictConfig) -> float:
    """Run one job; returns the value of ``cfg.monitor`` after training (what a sweeper minimises).

    A job that fails after its work started leaves a ``summary.json`` saying so (see job_record).
    """
    start = time.perf_counter()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    job_started(output_dir)
    return run_recorded(lambda: _run(cfg, output_dir, start), cfg, output_dir, start)


def _run(cfg: DictConfig, output_dir: Path, start: float) -> float:
    hydra_cfg = HydraConfig.get()
    lora_config, datamodule, loaded = _prepare(cfg, output_dir)
    timings = {"prepare_s": time.perf_counter() - start}  # base (built on first use), data

    choices = hydra_cfg.runtime.choices
    with user_errors(output_dir):  # the last input checks (logger mode, optim values): still one line
        method: Method = build_method(cfg, lora_config, loaded, output_dir)
        variant = f"{choices.rank}-{choices.targets}" if method.name == "lora" else method.name
        logger = build_logger(cfg.get("logger"), output_dir, f"{choices.model}-{variant}")
        optim = optim_fields(cfg)
        optim.pop("lr_ratio_B", 1.0)  # LoRA+ belongs to the LoRA callback
        module = CausalLMModule(loaded.model, loaded.tokenizer, loss_chunk_tokens=loaded.loss_chunk_tokens, **optim)
        trainer = _trainer(cfg, output_dir, logger, method.callback)
    rank_zero_only(write_atomic)(output_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    failed = True
    try:
        log_run_config(logger, cfg)
        mark = time.perf_counter()
        before = _validate(trainer, module, datamodule) if cfg.eval_base else {}
        probe = AnswerProbe.of(datamodule) if trainer.is_global_zero else None  # supervised data only
        if probe is not None:
            probe.record("base", module.model)
        if trainer.world_size == 1:  # where fit will run it anyway; several ranks: rank zero on the CPU
            loaded.model.to(trainer.strategy.root_device)
        base_sample = rank_zero_only(continuation)(loaded.model, loaded.tokenizer, cfg.get("sample"))
        timings["base_eval_s"], mark = time.perf_counter() - mark, time.perf_counter()
        meter = PeakMeter(trainer.strategy.root_device)
        meter.start()
        trainer.fit(module, datamodule=datamodule)
        peak = meter.read()
        timings["fit_s"], mark = time.perf_counter() - mark, time.perf_counter()
        train_loss = _metric(trainer.callback_metrics, "train/loss")
        after = _validate(trainer, module, datamodule)

        summary = JobSummary(
            status=OK,
            model=loaded.name,
            base_model=loaded.name_or_path,
            data=repr(datamodule.source),
            data_stats=datamodule.summary(),
            eval_key=eval_key(loaded.name_or_path, OmegaConf.to_container(cfg.data, resolve=True)),
            **method.describe(),  # method, targets (the role or the explicit list), lora fields
            params=method.params(),
            lr=float(cfg.optim.lr),
            steps=trainer.global_step,
            world_size=trainer.world_size,
            train_loss=train_loss,
            base_val_loss=_metric(before, "val/loss"),
            base_val_ppl=_metric(before, "val/ppl"),
            val_loss=after["val/loss"],
            val_ppl=_metric(after, "val/ppl"),
            merged_val_ppl=None,
            quant=_quant_record(cfg, method),
            merge_fidelity=method.merge_fidelity(),
            sample=None,
            base_sample=base_sample,
            peak_mem_mib=peak.mib,
            peak_mem_kind=peak.kind,
            monitor={cfg.monitor: after[cfg.monitor]},
            paths={
                "output_dir": str(output_dir),
                "config": str(output_dir / CONFIG_FILE),
                "summary": str(output_dir / SUMMARY_FILE),
                # None where no checkpoint was written (a run shorter than the checkpoint interval)
                "checkpoints": str(output_dir / "checkpoints") if (output_dir / "checkpoints").is_dir() else None,
                **{key: str(path) for key, path in method.export_paths().items()},
            },
        )
        if trainer.is_global_zero:
            if cfg.verify_export and method.reload_dir() is not None:
                module.cpu()  # room for the reloaded copy on a GPU
                summary.merged_val_ppl, summary.sample = _check_merged(
                    method.reload_dir(), datamodule, cfg.get("sample")
                )
            if probe is not None:
                probe.record("tuned", module.model)  # merged in place at fit end
                summary.answers = probe.rows()
            timings["after_fit_s"] = time.perf_counter() - mark  # scoring, export check, sample
            summary.timings = {key: round(value, 1) for key, value in timings.items()}
            summary.wall_s = round(time.perf_counter() - start, 1)
            log_model = bool((cfg.get("logger") or {}).get("log_model"))
            log_answers(logger, summary.answers, summary.data_stats)
            log_results(logger, summary, method.export_paths().get("adapter"), log_model)
            write_summary(output_dir, summary)
        failed = False
    finally:
        finish(logger, failed=failed)
    if trainer.is_global_zero:  # after W&B's footer: the recap is the last thing a run prints
        print_recap(summary)
        print_answers(summary.answers, summary.data_stats)
    return float(after[cfg.monitor])
