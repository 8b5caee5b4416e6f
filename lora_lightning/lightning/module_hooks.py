"""How :class:`~lora_lightning.lightning.callback.LoRACallback` reaches into a user's LightningModule and Trainer.

Lightning calls a few hooks of the module itself (not of callbacks) at the moments the callback
needs: ``configure_optimizers`` (the only place the optimizer is built), ``on_save_checkpoint``
(called for ``save_weights_only=True`` too, which skips callback hooks), ``on_load_checkpoint``
(before weights load) and ``configure_model`` (where large models build their layers). The
callback wraps those as instance attributes, leaving the user's class untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from rich.console import Console
from rich.table import Table
from torch import nn

from lora_lightning.summary import LoRAReport

_WRAPPED = "_lora_lightning_wrapped"


def install_wrappers(
    pl_module: pl.LightningModule,
    owner: object,
    *,
    restrict: Callable[[Any], Any],
    on_save: Callable[[dict[str, Any]], None],
    on_load: Callable[[dict[str, Any]], None],
    after_configure_model: Callable[[], None],
) -> None:
    """Wrap the module's hooks once per ``owner`` (a second setup by the same callback is a no-op).

    Args:
        pl_module: the user's module.
        owner: the callback (marks the module as wrapped by it).
        restrict: edits what ``configure_optimizers`` returned (None when it has none of its own).
        on_save: called after the module's own ``on_save_checkpoint``.
        on_load: called after the module's own ``on_load_checkpoint``.
        after_configure_model: called after a ``configure_model`` the module overrides.
    """
    if getattr(pl_module, _WRAPPED, None) is owner:
        return
    had_configure_optimizers = is_overridden("configure_optimizers", pl_module)
    original_configure_optimizers = pl_module.configure_optimizers
    original_save = pl_module.on_save_checkpoint
    original_load = pl_module.on_load_checkpoint

    def configure_optimizers() -> Any:
        return restrict(original_configure_optimizers() if had_configure_optimizers else None)

    def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
        original_save(checkpoint)
        on_save(checkpoint)

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        original_load(checkpoint)
        on_load(checkpoint)

    # Plain functions (no functools.wraps: Lightning's is_overridden follows __wrapped__).
    pl_module.configure_optimizers = configure_optimizers
    pl_module.on_save_checkpoint = on_save_checkpoint
    pl_module.on_load_checkpoint = on_load_checkpoint
    if is_overridden("configure_model", pl_module):
        original_configure_model = pl_module.configure_model

        def configure_model() -> None:
            original_configure_model()
            after_configure_model()

        pl_module.configure_model = configure_model
    object.__setattr__(pl_module, _WRAPPED, owner)


def enable_input_grads_for_checkpointing(target: nn.Module) -> list[nn.Module]:
    """Make reentrant gradient checkpointing see a block input that requires grad.

    Reentrant checkpointing drops gradients when no block input requires grad, and with a frozen
    embedding none does: have the (outermost) HF model's embedding output require it, unless the
    model already does (recent transformers do it in ``gradient_checkpointing_enable``).

    Returns:
        The models changed (to undo with ``disable_input_require_grads`` at fit end).
    """
    for module in target.modules():
        if not hasattr(module, "enable_input_require_grads"):
            continue
        checkpointing = getattr(module, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(module, "is_gradient_checkpointing", False)
        already = getattr(module, "_require_grads_hooks", None) or getattr(module, "_require_grads_hook", None)
        if checkpointing and not already:
            module.enable_input_require_grads()
            return [module]
        return []  # the outermost model covers its submodels
    return []


def fsdp_root(trainer: pl.Trainer) -> nn.Module | None:
    """The FSDP-wrapped model under Lightning's FSDPStrategy, else None."""

    return trainer.strategy.model if isinstance(trainer.strategy, FSDPStrategy) else None


def print_report(report: LoRAReport, full: bool = False) -> None:
    """The adapted-module table (a row per role across layers; per module with ``full``) and
    PEFT's counts line, as a rich table."""

    table = Table(title="LoRA adapters", title_justify="left")
    for column, justify in (("module", "left"), ("type", "left"), ("in", "right"), ("out", "right"), ("r", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in report.rows(full):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(str(report.params))
