"""LoRA in a Fabric loop, as litgpt users write one: the core API, no callback.

    python examples/lora_with_fabric.py                       # offline: a tiny random Llama
    python examples/lora_with_fabric.py --model HuggingFaceTB/SmolLM2-135M --steps 100

``inject_lora`` adapts the model and freezes the rest; the optimizer takes what trains;
``fabric.save`` keeps a small adapter-only checkpoint (``adapter_state_dict``); at the end
``save_adapter`` writes the adapter in PEFT's format and ``merge_and_unload`` gives a plain model.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch
from lightning.fabric import Fabric
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_lightning import (
    LoRAConfig,
    adapter_state_dict,
    causal_lm_loss,
    export_merged,
    inject_lora,
    merge_and_unload,
    save_adapter,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or local directory of a causal LM (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--out", default="lora-fabric-out", help="where checkpoint, adapter/ and merged/ go")
    parser.add_argument("--accelerator", default="auto", help="Fabric accelerator (cpu, cuda, auto)")
    args = parser.parse_args()
    out = Path(args.out)

    fabric = Fabric(accelerator=args.accelerator, devices=1)
    fabric.seed_everything(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:  # no download: bytes as tokens, a 2-layer Llama
        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        model = LlamaForCausalLM(config)
    report = inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    print(report.params)  # trainable params: ... || all params: ... || trainable%: ...

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    lm = model  # the model itself; fabric.setup returns a wrapper around it
    model, optimizer = fabric.setup(lm, optimizer)
    ids = list((inspect.getsource(json) + inspect.getsource(argparse)).encode())  # Python source as bytes
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)  # (N, 128)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(blocks, batch_size=8, shuffle=True))

    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            with fabric.autocast():  # the model's own loss, its logits formed a chunk of tokens at a time
                loss = causal_lm_loss(lm, batch, batch)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0 or step == args.steps:
                fabric.print(f"step {step}: loss {loss.item():.3f}")
            if step == args.steps:
                break

    # An adapter-only checkpoint: the LoRA factors and their optimizer state, a small file.
    fabric.save(out / "checkpoint.pt", {"adapter": adapter_state_dict(lm), "optimizer": optimizer, "step": step})
    save_adapter(lm, out / "adapter", base_model_name_or_path=args.model)  # PEFT's format
    merge_and_unload(lm)  # the adapters folded into the weights: zero inference overhead
    export_merged(lm, out / "merged")  # loads with AutoModelForCausalLM.from_pretrained
    fabric.print(f"adapter: {out / 'adapter'}  merged model: {out / 'merged'}  checkpoint: {out / 'checkpoint.pt'}")


if __name__ == "__main__":
    main()
