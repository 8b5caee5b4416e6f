"""How a job fine-tunes (``method`` config group): LoRA, or full fine-tuning as its reference.

Both train the same :class:`~lora_lightning.app.models.lightning_module.CausalLMModule` with the same data,
optimizer and steps; a method only decides which Lightning callback shapes the run and what is
exported. ``lora`` adds :class:`~lora_lightning.lightning.callback.LoRACallback` (adapters train, the
adapter and the merged model are exported). ``full`` adds :class:`FullFineTune`: every weight
trains and the whole model is exported. The rest of the job reads a method through
:class:`Method`, never through the callback's own type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lora_lightning.app.errors import UsageError
from lora_lightning.config import LoRAConfig
from lora_lightning.inject import ParameterSummary, parameter_summary
from lora_lightning.io.adapters import export_merged
from lora_lightning.lightning.callback import LoRACallback

METHODS = ("lora", "full")
FULL_EXPORT = "model"  # <output_dir>/model: the fully fine-tuned model and its tokenizer


def method_name(cfg: DictConfig) -> str:
    """``cfg.method.name``, checked (``lora`` when the config has no method group).

    Full fine-tuning trains every weight, which a quantized base cannot: ``method=full`` with a
    ``quant`` method is refused.
    """
    method = cfg.get("method") or {}
    name = method.get("name", "lora")
    if name not in METHODS:
        raise UsageError(f"method.name must be one of {', '.join(METHODS)}, got {name!r}")
    quant = (cfg.get("quant") or {}).get("method")
    if name == "full" and quant:
        raise UsageError(
            f"method=full trains every weight, which a quantized base cannot; got quant.method={quant!r} "
            "(use quant=none with method=full, or method=lora for QLoRA)"
        )
    return str(name)


class FullFineTune(L.Callback):
    """Full fine-tuning in the shape of LoRACallback: every weight of ``pl_module.<module>`` trains.

    At fit end rank zero writes the whole model (``save_pretrained`` and the tokenizer, atomically)
    to ``<export_dir>/model``. The module's optimizer already covers every parameter that requires
    a gradient, so nothing else changes.

    Args:
        module: attribute of the LightningModule that holds the model.
        export_dir: where ``model/`` is written; None writes nothing.
        tokenizer: saved beside the model.
    """

    def __init__(self, module: str = "model", export_dir: str | Path | None = None, tokenizer: Any = None) -> None:
        self.module = module
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.tokenizer = tokenizer
        self.params: ParameterSummary | None = None
        self.export_paths: dict[str, Path] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            model = pl_module.get_submodule(self.module)
            model.requires_grad_(True)
            self.params = parameter_summary(model)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_dir is None:
            return
        target = self.export_dir / FULL_EXPORT
        if trainer.is_global_zero:
            export_merged(pl_module.get_submodule(self.module), target, tokenizer=self.tokenizer)
        trainer.strategy.barrier("lora_lightning_full_export")
        self.export_paths = {FULL_EXPORT: target}


@dataclass
class Method:
    """A job's fine-tuning method: its callback, and what the summary says about it."""

    name: str
    callback: L.Callback
    lora: LoRAConfig | None  # None for full fine-tuning
    targets: Any  # the ``lora.targets`` role or list; None for full fine-tuning

    def params(self) -> dict[str, Any]:
        """Trainable and total parameter counts after the fit started."""
        experts = {}
        if isinstance(self.callback, LoRACallback):
            report = self.callback.report
            counts, adapted = report.params, len(report.modules)
            if report.expert_params:
                experts = {"expert_params": report.expert_params, "adapted_expert_params": report.adapted_expert_params}
        else:
            counts, adapted = self.callback.params, 0
        return {
            "trainable": counts.trainable,
            "total": counts.total,
            "trainable_percent": round(counts.trainable_percent, 4),
            "adapted_modules": adapted,
            **experts,
        }

    def quantized_banks(self) -> dict[str, int] | None:
        """The expert banks the injection quantized to 4 bits (a 4-bit MoE base), and their bytes."""
        report = self.callback.report if isinstance(self.callback, LoRACallback) else None
        if report is None or not report.quantized_banks:
            return None
        count, before, after = report.quantized_banks
        return {"banks": count, "bytes_before": before, "bytes_after": after}

    def export_paths(self) -> dict[str, Path]:
        """What the fit exported: ``adapter`` and ``merged`` for LoRA, ``model`` for full fine-tuning."""
        return dict(self.callback.export_paths or {})

    def reload_dir(self) -> Path | None:
        """The exported directory that loads with ``AutoModelForCausalLM`` (scored after the fit)."""
        paths = self.export_paths()
        return paths.get("merged", paths.get(FULL_EXPORT))

    def merge_fidelity(self) -> dict[str, Any] | None:
        """How closely the fit-end merge kept the adapters' update (LoRA only; None for full)."""
        fidelity = getattr(self.callback, "merge_fidelity", None)
        return fidelity.summary() if fidelity else None

    def describe(self) -> dict[str, Any]:
        """The summary fields naming the method: ``method``, ``targets``, ``lora``."""
        lora = None
        if self.lora is not None:
            lora = {key: value for key, value in self.lora.to_dict().items() if value not in (None, [], {})}
        return {"method": self.name, "targets": self.targets, "lora": lora}


def build_method(cfg: DictConfig, lora_config: LoRAConfig, loaded: Any, output_dir: Path) -> Method:
    """The configured method for a loaded base (``loaded``: a LoadedModel); exports go to ``output_dir``."""
    name = method_name(cfg)
    export_dir = output_dir if cfg.export else None
    if name == "full":
        return Method(name, FullFineTune("model", export_dir, loaded.tokenizer), None, None)
    callback = LoRACallback(
        lora_config,
        module="model",
        merge_on_fit_end=True,
        export_dir=export_dir,
        lr_ratio_B=cfg.optim.get("lr_ratio_B", 1.0),
        tokenizer=loaded.tokenizer,
        base_model_name_or_path=loaded.name_or_path,
        full_report=bool(cfg.get("verbose", False)),  # verbose=true: a row per adapted module
    )
    targets = OmegaConf.to_object(cfg.lora).get("targets")  # the role, or the explicit list
    return Method(name, callback, lora_config, targets)
