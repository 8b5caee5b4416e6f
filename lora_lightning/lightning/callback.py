"""LoRACallback: add LoRA to an existing LightningModule and Trainer, and nothing else changes.

Glue only; the work is done by the core:

* ``setup``: quantize the base when asked (``quantize="nf4"``), inject (idempotent) and freeze;
  wrap the module's ``configure_optimizers`` so only trainable parameters reach the optimizer;
  wrap ``configure_model`` for modules that build their network there; set
  ``strict_loading = False`` so adapter-only checkpoints load (:mod:`lora_lightning.lightning.module_hooks`).
* checkpoints: the module's ``on_save_checkpoint`` (the one hook Lightning calls also for
  ``save_weights_only=True``) drops the frozen base weights and records config + base fingerprint;
  its ``on_load_checkpoint`` refuses a checkpoint made for another rank, targets or base.
* ``on_fit_start``: print the adapted-module table, log config and counts to every logger.
* fit end (``on_train_end`` under FSDP, where full parameters are still reachable): export the
  adapter, merge (measuring how much of each update the merged weights keep), export the merged
  model; rank zero writes, the others wait.

After a merge the callback remembers the final adapters (they are small), the merged module and a
fingerprint of its merged weights (:mod:`lora_lightning.lightning.fit_merge`). If a later call needs adapters
again on that very module, unchanged since (a second ``fit``, or ``validate/test(ckpt_path=...)``),
it re-injects them and unmerges, which restores the base weights the checkpoints were trained on.
Any other module (a fresh model given to a reused callback) is adapted from scratch: the callback
never changes weights it did not merge itself.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lora_lightning.config import QUANT_METHODS, LoRAConfig
from lora_lightning.inject import LoRAReport, adapted_modules, inject_lora, lora_banks, lora_layers
from lora_lightning.io.adapters import adapter_state_dict, export_merged, save_adapter
from lora_lightning.io.atomic_files import ADAPTER_DIR, MERGED_DIR, check_export_destination
from lora_lightning.io.export import holds_quantized
from lora_lightning.lightning.checkpoint_record import (
    base_fingerprint,
    base_tensors,
    check_adapter_checkpoint,
    checkpoint_metadata,
)
from lora_lightning.lightning.fit_merge import MergedAdapters, snapshot_merged
from lora_lightning.lightning.fit_state import AdapterKeys, FitState
from lora_lightning.lightning.module_hooks import (
    enable_input_grads_for_checkpointing,
    fsdp_root,
    install_wrappers,
    print_report,
)
from lora_lightning.lightning.optimizers import restrict_optimizers
from lora_lightning.merge import MergeFidelity, merge_and_unload, merge_lora
from lora_lightning.quantize import quantize_model
from lora_lightning.targets import modules_to_save_names, plan_targets

CHECKPOINT_KEY = "lora_lightning"


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW at lr 2e-4, no weight decay: the usual LoRA starting point."""
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


class LoRACallback(pl.Callback):
    """Inject LoRA adapters at setup, train only them, checkpoint only them, merge at fit end.

    Args:
        config: the LoRA config; or give its fields instead (``r=16, alpha=32, ...``: every
            :class:`~lora_lightning.LoRAConfig` field is a keyword here, None meaning "its default").
        module: dotted path of the submodule to adapt (e.g. ``"model"``); None adapts the whole
            LightningModule.
        merge_on_fit_end: merge adapters into the weights and put plain layers back at fit end.
            A quantized layer is dequantized for the merge (into its compute dtype).
        export_dir: if set, write ``export_dir/adapter`` (PEFT format) and ``export_dir/merged``
            (merged model, plus tokenizer; unquantized) at fit end. Checked at setup.
        lr_ratio_B: LoRA+: B's learning rate is this times A's (separate param groups).
        optimizer: factory ``params -> Optimizer`` used when ``configure_optimizers`` returns None.
        tokenizer: saved with the merged model; defaults to ``pl_module.tokenizer`` if present.
        base_model_name_or_path: recorded in the exported adapter's config.
        allow_empty_optimizers: let an optimizer of ``configure_optimizers`` that holds only
            frozen parameters be emptied; by default that is an error naming it.
        quantize: "nf4", "nf4-dq", "fp4" or "int8": quantize the base's linear layers with
            bitsandbytes at setup, before the adapters are created (QLoRA for any module); the
            output head, embeddings and ``modules_to_save`` stay in full precision.
        full_report: the table printed at fit start has one row per adapted module; by default
            one per role across layers (``model.layers.*.mlp.up_proj (x32)``).
    """

    def __init__(
        self,
        config: LoRAConfig | None = None,
        *,
        r: int | None = None,
        alpha: float | None = None,
        dropout: float | None = None,
        use_rslora: bool | None = None,
        use_dora: bool | None = None,
        bias: Literal["none", "all", "lora_only"] | None = None,
        target_modules: list[str] | str | None = None,
        target_parameters: list[str] | None = None,
        exclude_modules: list[str] | str | None = None,
        layers_to_transform: list[int] | int | None = None,
        layers_pattern: list[str] | str | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        modules_to_save: list[str] | None = None,
        init_lora_weights: str | None = None,
        init_std: float | None = None,
        freeze_A: bool | None = None,
        adapter_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        allow_unmatched_targets: bool | None = None,
        module: str | None = None,
        merge_on_fit_end: bool = True,
        export_dir: str | os.PathLike | None = None,
        lr_ratio_B: float = 1.0,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        tokenizer: Any | None = None,
        base_model_name_or_path: str | None = None,
        allow_empty_optimizers: bool = False,
        quantize: Literal["nf4", "nf4-dq", "fp4", "int8"] | None = None,
        full_report: bool = False,
    ) -> None:
        arguments = locals()
        fields = {f.name: arguments[f.name] for f in dataclasses.fields(LoRAConfig) if arguments[f.name] is not None}
        if config is not None and fields:
            raise TypeError(f"give either config or LoRAConfig fields, not both (got config and {sorted(fields)})")
        if config is not None and not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
        if isinstance(lr_ratio_B, bool) or not isinstance(lr_ratio_B, (int, float)) or not lr_ratio_B > 0:
            raise ValueError(f"lr_ratio_B must be a positive number, got {lr_ratio_B!r}")
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError(f"module must be a dotted submodule path such as 'model', or None, got {module!r}")
        for flag in ("merge_on_fit_end", "allow_empty_optimizers", "full_report"):
            if not isinstance(arguments[flag], bool):
                raise TypeError(f"{flag} must be True or False, got {arguments[flag]!r}")
        if quantize is not None and quantize not in QUANT_METHODS:
            raise ValueError(f"quantize must be None or one of {', '.join(map(repr, QUANT_METHODS))}, got {quantize!r}")
        self.config = config if config is not None else LoRAConfig(**fields)
        self.module = module
        self.merge_on_fit_end = merge_on_fit_end
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.lr_ratio_B = float(lr_ratio_B)
        self.optimizer_factory = optimizer or default_optimizer
        self.tokenizer = tokenizer
        self.base_model_name_or_path = base_model_name_or_path
        self.allow_empty_optimizers = allow_empty_optimizers
        self.quantize = quantize
        self.full_report = full_report

        self.report: LoRAReport | None = None
        self.merge_fidelity: MergeFidelity | None = None  # how much of the update the fit-end merge kept
        self.export_paths: dict[str, Path] = {}
        self.state = FitState()  # the fit / merge / resume state: phases and what each needs (fit_state.py)

    @property
    def state_key(self) -> str:
        return "LoRACallback"

    # -- setup ---------------------------------------------------------------------------------

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = ", ".join(name for name, _ in pl_module.named_children()) or "(none)"
            raise ValueError(
                f"LoRACallback(module={self.module!r}): the LightningModule has no such submodule; "
                f"its children are: {children}"
            ) from None

    def _prefix(self) -> str:
        return f"{self.module}." if self.module else ""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.state.stage = stage
        if stage == "fit" and self.export_dir is not None:  # the fit-end writes, checked before any step
            check_export_destination(self.export_dir)
        pl_module.strict_loading = False
        install_wrappers(
            pl_module,
            self,
            restrict=lambda result: self._restrict_optimizers(pl_module, result),
            on_save=self._filter_checkpoint,
            on_load=lambda checkpoint: self._check_checkpoint(pl_module, checkpoint),
            after_configure_model=lambda: self._prepare(pl_module, self.state.stage),
        )
        if is_overridden("configure_model", pl_module):
            return  # the wrapped configure_model injects once the network exists
        self._prepare(pl_module, stage)

    def _prepare(self, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        if not adapted_modules(target):
            if self.state.merged_into(target):
                if stage != "fit":
                    return  # evaluate the merged model as it is; a checkpoint load re-adapts it
                self.state.readapt(self.state.merged.restore(target, self.config), stage)
            else:
                self._start_afresh(target)
        if self.quantize is not None and not adapted_modules(target):
            self._quantize(target)
        report = inject_lora(target, self.config)
        if report.quantized_banks is None and self.report is not None and self.report.quantized_banks:
            # a later stage's injection is a no-op: what the first one quantized stays on record
            report = dataclasses.replace(report, quantized_banks=self.report.quantized_banks)
        self.report = report
        prefix = self._prefix()
        # What belongs to the adapter (factors, trained biases, modules_to_save; lora_A too under
        # LoRA-FA, where it is frozen but still part of the adapter) is what checkpoints keep;
        # everything else in the target is the base the fingerprint describes.
        own = set(adapter_state_dict(target))
        keys = AdapterKeys(
            own=own,
            checkpointed=sorted(prefix + key for key in own),
            frozen={prefix + key for key in target.state_dict() if key not in own},
        )
        known = self.state.fingerprint
        self.state.adapted(keys, known if known is not None else base_fingerprint(base_tensors(target, own)))

    def _quantize(self, target: nn.Module) -> None:
        """Quantize the base once; a second setup (validate after fit) finds it done."""
        quantized = self.state.quantized
        if quantized is not None and quantized() is target and holds_quantized(target):
            return
        plan_targets(target, self.config)  # a config that cannot adapt this model fails before any change
        quantize_model(target, self.quantize, keep=modules_to_save_names(target, self.config))  # type: ignore[arg-type]
        self.state.quantized = weakref.ref(target)

    def _start_afresh(self, target: nn.Module) -> None:
        """Forget an earlier fit's merge: ``target`` is not that merged module (or changed since)."""
        if self.state.merged is not None:
            rank_zero_info(
                f"LoRACallback: adapting {type(target).__name__} from scratch: it is not the module this callback "
                "merged at its last fit end (or its weights changed since), so that merge is not undone"
            )
        self.state.start_afresh()

    # -- optimizer -----------------------------------------------------------------------------

    def _restrict_optimizers(self, pl_module: pl.LightningModule, result: Any) -> Any:
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                "LoRACallback: no parameter of the LightningModule is trainable after injection; "
                "check target_modules and that the module's own parameters are not all frozen"
            )
        if result is None:
            result = self.optimizer_factory(trainable)
        restrict_optimizers(
            result,
            trainable,
            {id(p): name for name, p in pl_module.named_parameters()},
            lora_B=[layer.lora_B for layer in lora_layers(self._target(pl_module)).values()]
            + [B for bank in lora_banks(self._target(pl_module)).values() for B in bank.lora_B.values()],
            lr_ratio_B=self.lr_ratio_B,
            allow_empty=self.allow_empty_optimizers,
        )
        return result

    # -- checkpoints ---------------------------------------------------------------------------

    def _filter_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the adapter's tensors only, and the record a load checks (written once, here)."""
        state, frozen = checkpoint.get("state_dict"), self.state.keys.frozen
        if state is not None and frozen:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
        checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(
            self.config, self.state.fingerprint or {}, self.state.keys.checkpointed
        )

    def _check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        target = self._target(pl_module)
        if CHECKPOINT_KEY in checkpoint and not adapted_modules(target):
            self._prepare(pl_module, "fit")  # merged at fit end: brings the base back (when it is ours)
        check_adapter_checkpoint(
            checkpoint.get(CHECKPOINT_KEY),
            self.config,
            base_fingerprint(base_tensors(target, self.state.keys.own)),
            self.state.keys.checkpointed,
            checkpoint.get("state_dict", {}),
            self.state.restored_by_unmerge,
        )

    # -- fit start: report and logging ---------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state.input_grads = enable_input_grads_for_checkpointing(self._target(pl_module))
        if self.report is None:
            return
        if trainer.is_global_zero:
            print_report(self.report, full=self.full_report)
        for logger in trainer.loggers:
            extra = {"lora/lr_ratio_B": self.lr_ratio_B, "lora/quantize": self.quantize or "none"}
            logger.log_hyperparams({**self.report.hparams(), **extra})
            logger.log_metrics(self.report.metrics(), step=trainer.global_step)

    # -- fit end: export and merge -------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fsdp_model = fsdp_root(trainer)
        if fsdp_model is None:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(fsdp_model, writeback=True):
            self._export_and_merge(trainer, pl_module, unload=False)
        self.state.done_at_train_end = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state.done_at_train_end:
            if self.merge_on_fit_end:
                merge_and_unload(self._target(pl_module))  # already merged: puts plain layers back
        else:
            self._export_and_merge(trainer, pl_module, unload=True)
        self.state.finished_fit()
        for module in self.state.input_grads:
            module.disable_input_require_grads()
        self.state.input_grads = []

    def _export_and_merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, unload: bool) -> None:
        """Write the adapter, merge (and unload), write the merged model; rank zero writes."""
        target = self._target(pl_module)
        if not adapted_modules(target):
            return
        writes = self.export_dir is not None and trainer.is_global_zero
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        merged_dir = self.export_dir / MERGED_DIR if self.export_dir is not None else None
        if writes:
            self.export_paths["adapter"] = save_adapter(
                target, self.export_dir / ADAPTER_DIR, base_model_name_or_path=self.base_model_name_or_path
            )
        # A quantized model is written before the merge, from float32 sums, tensor by tensor; a
        # dense one after it, as it is (no copy).
        export_first = holds_quantized(target)
        if writes and export_first:
            self.export_paths["merged"] = export_merged(target, merged_dir, tokenizer=tokenizer)
        if self.merge_on_fit_end:
            self.merge_fidelity = MergeFidelity()
            merge_lora(target, self.merge_fidelity)
            layers = snapshot_merged(target)
            if unload:  # (under FSDP the plain layers go back at fit end)
                merge_and_unload(target)
            self.state.merged_at_fit_end(MergedAdapters(target, layers), in_place=not unload)
            self._report_merge(trainer)
        if writes and not export_first:
            self.export_paths["merged"] = export_merged(target, merged_dir, tokenizer=tokenizer)
        if self.export_dir is not None:
            trainer.strategy.barrier("lora_lightning_export")
            self.export_paths = {"adapter": self.export_dir / ADAPTER_DIR, "merged": merged_dir}
            rank_zero_info(f"LoRA: adapter written to {self.export_paths['adapter']}, merged model to {merged_dir}")

    def _report_merge(self, trainer: pl.Trainer) -> None:
        fidelity = self.merge_fidelity
        if fidelity is None or not fidelity.per_layer:
            return
        rank_zero_info(f"LoRA: merged the adapters; {fidelity}")
        metrics = {f"lora/merge_{key}": float(value) for key, value in fidelity.summary().items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A validate/test that re-adapted a merged model to load a checkpoint leaves it merged again.
        merged_again = None
        if self.state.readapted_stage is not None and stage != "fit" and self.merge_on_fit_end:
            target = self._target(pl_module)
            layers = snapshot_merged(merge_lora(target))
            merge_and_unload(target)
            merged_again = MergedAdapters(target, layers)
        self.state.torn_down(merged_again)


__all__ = ["LoRACallback", "default_optimizer"]
