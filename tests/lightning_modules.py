"""Plain LightningModules as a user would write them (no LoRA in sight), and data for them.

Also runnable as a script for the tests that need a process of their own (a real kill, real DDP):
``python -m tests.lightning_modules fit OUT_DIR [--kill-after-epoch N] [--resume CKPT] [--ddp]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.models import VOCAB, tiny_llama


def token_data(n: int = 32, length: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Sequences with structure (each row counts up from a random start), so a model can learn them."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    rows = (starts + torch.arange(length)) % VOCAB
    return DataLoader(TensorDataset(rows), batch_size=batch_size, shuffle=False)


class CausalLM(pl.LightningModule):
    """A tiny Llama trained on next-token loss; ``configure_optimizers`` naively takes ``self.parameters()``."""

    def __init__(self, lr: float = 1e-2, seed: int = 0, scheduler: bool = False, **model_overrides: Any) -> None:
        super().__init__()
        self.model = tiny_llama(seed=seed, **model_overrides).train()
        self.lr = lr
        self.scheduler = scheduler
        self.losses: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("val/loss", loss)
        return loss

    test_step = validation_step

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LazyCausalLM(CausalLM):
    """Builds its network in ``configure_model``, as large-model code does."""

    def __init__(self, **kwargs: Any) -> None:
        pl.LightningModule.__init__(self)
        self.kwargs = kwargs
        self.model = None
        self.lr = kwargs.pop("lr", 1e-2)
        self.scheduler = False
        self.losses = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_llama(**self.kwargs).train()


class SmallCNN(pl.LightningModule):
    """A non-transformers model: conv features and two Linear layers, with param groups and a scheduler."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc1 = nn.Linear(8 * 16, 32)
        self.classifier = nn.Linear(32, 4)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc1(self.features(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        groups = [
            {"params": self.features.parameters(), "lr": 0.05},  # all frozen: this group must go
            {"params": list(self.fc1.parameters()) + list(self.classifier.parameters())},
        ]
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]


def image_data(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.1
    x[torch.arange(n), 0, y, y] += 2.0  # the class is written on the diagonal
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


# -- script entry for subprocess tests ---------------------------------------------------------


class _KillAfterEpoch(pl.Callback):
    """SIGKILL the process right after the checkpoint of a given epoch is on disk: a real crash."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "crash.ckpt")
            os.kill(os.getpid(), signal.SIGKILL)


class _RecordAdapters(pl.Callback):
    """Each rank writes its adapters at train end (before the merge) for the DDP test."""

    def on_train_end(self, trainer, pl_module):
        from lora_lightning.inject import lora_layers

        state = {}
        for name, layer in lora_layers(pl_module.model).items():
            state[f"{name}.lora_A"] = layer.lora_A.detach().cpu()
            state[f"{name}.lora_B"] = layer.lora_B.detach().cpu()
        torch.save(state, Path(trainer.default_root_dir) / f"adapters_rank{trainer.global_rank}.pt")


def main(argv: list[str]) -> None:
    from lora_lightning import LoRACallback

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["fit"])
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-after-epoch", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = CausalLM(scheduler=True)
    callbacks: list[pl.Callback] = [
        LoRACallback(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            module="model",
            export_dir=out / "export" if args.ddp else None,
        )
    ]
    if args.kill_after_epoch is not None:
        callbacks.append(_KillAfterEpoch(args.kill_after_epoch))
    if args.ddp:
        callbacks.append(_RecordAdapters())
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=2 if args.ddp else 1,
        strategy="ddp" if args.ddp else "auto",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        deterministic=True,
    )
    trainer.fit(module, token_data(seed=1), ckpt_path=args.resume)
    name = f"losses_rank{trainer.global_rank}.json"
    (out / name).write_text(json.dumps({"losses": module.losses, "global_step": trainer.global_step}))


if __name__ == "__main__":
    main(sys.argv[1:])
