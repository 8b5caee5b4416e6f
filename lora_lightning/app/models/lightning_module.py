"""The LightningModule for causal language modelling, and a plain perplexity evaluation."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lora_lightning.app.data.batches import model_inputs
from lora_lightning.loss import causal_lm_loss

OPTIM_KEYS = ("name", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio")
# AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits), paged to host memory under pressure.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def check_optim(optim: Mapping[str, Any]) -> None:
    """Validate the ``optim`` fields CausalLMModule takes, naming the field, the value and what is allowed."""
    unknown = sorted(set(optim) - set(OPTIM_KEYS))
    if unknown:
        raise ValueError(f"optim.{unknown[0]} is not an option; optim takes {', '.join(OPTIM_KEYS)} and lr_ratio_B")
    name = optim.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"optim.name={name} needs bitsandbytes: pip install 'lora-lightning[qlora]'")
    lr = optim.get("lr", 2e-3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"optim.lr must be a positive number, got {lr!r}")
    ratio = optim.get("min_lr_ratio", 0.1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {ratio!r}")
    warmup = optim.get("warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"optim.warmup_steps must be a non-negative integer, got {warmup!r}")


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    # Position t predicts token t+1: logits (B, T-1, V) against labels (B, T-1).
    return logits[:, :-1].float(), labels[:, 1:]


class CausalLMModule(L.LightningModule):
    """Trains a transformers causal LM: ``train/loss``, ``val/loss``, ``val/ppl``; AdamW, warmup + cosine.

    The module is the same for full pretraining and for LoRA: the LoRACallback adapts
    ``self.model`` and narrows the optimizer to the adapters, this module does not know about it.

    Args:
        model: a ``transformers`` causal LM (``model(input_ids, labels).loss`` works).
        tokenizer: its tokenizer; the LoRA callback saves it beside the merged model.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        name: "adamw", or bitsandbytes' "adamw_8bit" / "paged_adamw_8bit" (8-bit optimizer state).
        loss_chunk_tokens: the training loss applies the output head to this many labelled tokens at
            a time (:func:`lora_lightning.causal_lm_loss`: the whole logits are never held); None:
            the model's own loss.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        betas: Iterable[float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        name: str = "adamw",
        loss_chunk_tokens: int | None = None,
    ) -> None:
        super().__init__()
        check_optim({"name": name, "lr": lr, "min_lr_ratio": min_lr_ratio, "warmup_steps": warmup_steps})
        self.optimizer_name = name
        self.loss_chunk_tokens = loss_chunk_tokens
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        self.tokenizer = tokenizer
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.val_ppl = Perplexity(ignore_index=-100)
        self.val_loss = MeanMetric()  # weighted by labelled tokens, so val/ppl = exp(val/loss) whatever the padding

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **batch: Tensor):
        """input_ids, labels: (B, T) int64; batch: ``attention_mask`` or ``position_ids`` (B, T).

        Returns:
            The transformers output (loss over labels that are not -100, logits (B, T, V)).
        """
        return self.model(**model_inputs({"input_ids": input_ids, **batch}), labels=labels)

    def on_fit_start(self) -> None:
        # A trainer.validate() before fit (the app scores the base) runs under inference mode,
        # which leaves the metric's state as inference tensors that fit's validation cannot update.
        self.val_ppl.reset()
        self.val_loss.reset()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.loss_chunk_tokens is None:
            loss = self(**batch).loss
        else:  # the same loss, the head applied a chunk of labelled tokens at a time
            inputs = model_inputs(batch)
            ids = inputs.pop("input_ids")
            loss = causal_lm_loss(self.model, ids, batch["labels"], chunk_tokens=self.loss_chunk_tokens, **inputs)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits, target = _shifted(self(**inputs).logits, batch["labels"])
        count = (target != -100).sum()
        total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        self.val_loss.update(total / count.clamp(min=1), weight=count)
        self.val_ppl.update(logits, target)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=size)
        self.log("val/ppl", self.val_ppl, prog_bar=True, batch_size=size)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw":
            optimizer_class: Any = torch.optim.AdamW
        else:
            import bitsandbytes as bnb

            optimizer_class = (
                bnb.optim.PagedAdamW8bit if self.optimizer_name.startswith("paged") else bnb.optim.AdamW8bit
            )
        optimizer = optimizer_class(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = LambdaLR(optimizer, warmup_cosine(self.warmup_steps, total, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device | str = "cpu"):
    """Token-averaged loss and perplexity of a causal LM over batches (no Lightning involved).

    Scores the tokens a batch labels (``labels``, -100 for none), or every token when it has none.

    Returns:
        ``(loss, ppl)`` as floats, ``ppl = exp(loss)``.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        labels = batch.pop("labels", batch["input_ids"])
        logits, target = _shifted(model(**model_inputs(batch)).logits, labels)
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation tokens to evaluate")
    loss = total / count
    return loss, math.exp(loss)
