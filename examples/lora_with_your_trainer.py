"""Add LoRA to the Lightning Trainer you already have: one callback, nothing else changes.

    python examples/lora_with_your_trainer.py --model HuggingFaceTB/SmolLM2-135M   # any causal LM
    python examples/lora_with_your_trainer.py                                       # offline: a tiny random Llama

The LightningModule below is an ordinary one, with its own ``configure_optimizers`` over all its
parameters. ``LoRACallback`` injects adapters into ``module.model`` at setup, freezes the rest,
hands only the adapters to the optimizer, keeps checkpoints adapter-only, and at the end merges
the adapters and writes ``<out>/adapter`` (PEFT format) and ``<out>/merged`` (a plain model).
"""

from __future__ import annotations

import argparse
import inspect
import json

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lora_lightning import LoRACallback, LoRAConfig, causal_lm_loss


class CausalLM(L.LightningModule):
    """Your module, unchanged: a transformers model under ``self.model`` and a plain AdamW."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # batch: (B, T) token ids. The model's own loss (self.model(input_ids=batch, labels=batch).loss),
        # its logits formed 1024 tokens at a time: the loss over the vocabulary is no longer the peak.
        loss = causal_lm_loss(self.model, batch, batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # the callback keeps only the adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or local directory of a causal LM (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--out", default="lora-out", help="where adapter/ and merged/ are written")
    args = parser.parse_args()

    text = inspect.getsource(json) + inspect.getsource(argparse)  # some Python source to adapt to
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        ids = tokenizer(text)["input_ids"]
    else:  # no download: bytes as tokens, a 2-layer Llama
        tokenizer = None
        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        model = LlamaForCausalLM(config)
        ids = list(text.encode())
    block = 128
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)  # (N, 128)

    lora = LoRACallback(
        LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        module="model",  # adapt CausalLM.model, the transformers model
        export_dir=args.out,
        tokenizer=tokenizer,
        base_model_name_or_path=args.model,
    )
    trainer = L.Trainer(max_steps=args.steps, callbacks=[lora], logger=False, enable_checkpointing=False)
    trainer.fit(CausalLM(model), DataLoader(blocks, batch_size=8, shuffle=True))

    print(lora.report.params)  # trainable params: ... || all params: ... || trainable%: ...
    merged = AutoModelForCausalLM.from_pretrained(lora.export_paths["merged"])  # a plain transformers model
    print(f"merged model: {type(merged).__name__} from {lora.export_paths['merged']}")
    print(f"adapter (PEFT format): {lora.export_paths['adapter']}")


if __name__ == "__main__":
    main()
