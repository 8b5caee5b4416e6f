"""LoRA from a LightningCLI config: list LoRACallback among the trainer's callbacks, nothing else.

    python examples/lora_with_lightning_cli.py fit --config examples/lora_with_lightning_cli.yaml
    python examples/lora_with_lightning_cli.py fit --config examples/lora_with_lightning_cli.yaml --print_config
    python examples/lora_with_lightning_cli.py fit --trainer.max_steps=20 \\
        --trainer.callbacks+=lora_lightning.LoRACallback --trainer.callbacks.r=8 \\
        --trainer.callbacks.target_modules='[q_proj,v_proj]' --trainer.callbacks.module=model

The module and the data are ordinary: a tiny random Llama (no download) learning the bytes of some
Python source. ``model.name_or_path`` loads any causal LM with ``from_pretrained`` instead.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


class CausalLM(L.LightningModule):
    """A causal LM under ``self.model`` with a plain AdamW over all its parameters.

    Args:
        name_or_path: a hub id or directory to load; None builds a tiny random Llama (bytes as tokens).
        lr: AdamW learning rate.
    """

    def __init__(self, name_or_path: str | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        if name_or_path:
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path)
        else:
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
            )
            self.model = LlamaForCausalLM(config)
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss  # batch: (B, T) token ids
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # LoRACallback keeps only the adapters


class SourceBytes(L.LightningDataModule):
    """Blocks of ``block_size`` bytes of the standard library's json and inspect modules.

    Args:
        block_size: tokens per example.
        batch_size: examples per step.
    """

    def __init__(self, block_size: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.block_size, self.batch_size = block_size, batch_size

    def train_dataloader(self) -> DataLoader:
        ids = list((inspect.getsource(json) + inspect.getsource(inspect)).encode())
        n = len(ids) // self.block_size * self.block_size
        blocks = torch.tensor(ids[:n]).view(-1, self.block_size)  # (N, block_size)
        return DataLoader(blocks, batch_size=self.batch_size, shuffle=True)


def main() -> None:
    try:
        # The run's files (LightningCLI's config.yaml, any checkpoint) go under lora-cli-out/, not the cwd.
        LightningCLI(
            CausalLM,
            SourceBytes,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": "lora-cli-out/run"},
        )
    except (ValueError, TypeError) as error:  # a wrong value: jsonargparse wraps the class's own message
        while error.__cause__ is not None:
            error = error.__cause__
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")


if __name__ == "__main__":
    main()
