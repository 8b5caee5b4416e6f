"""The loss over a 128k vocabulary: the model's own loss against the chunked one, peak RSS and step time.

Each variant runs in a process of its own: a Llama with Llama-3's vocabulary (128,256), hidden 512,
2 layers, float32, LoRA r=16 on every linear layer, AdamW over the adapters, 1 x 2048 tokens. It
times ``--steps`` training steps after one warm-up step, and records what the steps add to the
resident set (``VmHWM`` reset after the warm-up, minus the resident set then).

    python benchmarks/loss_memory.py                     # model_loss, chunked (1024), chunked_256
    python benchmarks/loss_memory.py --tokens 4096 --steps 2

Targets (issue 25): the chunked step's added peak <= 0.5x the model-loss step's; its step time
<= 1.1x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes

VARIANTS = {"model_loss": None, "chunked": 1024, "chunked_256": 256}


def run_variant(variant: str, tokens: int, steps: int, threads: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_lightning import LoRAConfig, causal_lm_loss, inject_lora

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=tokens,
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    chunk = VARIANTS[variant]

    def step() -> float:
        if chunk is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = causal_lm_loss(model, ids, ids, chunk_tokens=chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first = step()  # warm-up: optimizer state, allocator
    before = shapes.rss_bytes()
    shapes.reset_peak_rss()
    times = [ms / 1e3 for ms in shapes.time_calls(step, torch.device("cpu"), warmup=0, repeats=steps)]
    return {
        "variant": variant,
        "added_peak_mib": (shapes.peak_rss_bytes() - before) / 2**20,
        "step_s": statistics.median(times),
        "first_loss": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.tokens, args.steps, args.threads)))
        return
    print(f"# benchmarks/loss_memory.py --tokens {args.tokens} --steps {args.steps} --threads {args.threads}")
    print(f"# {shapes.versions()} | load average before: {os.getloadavg()[0]:.2f}")
    rows = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(args.tokens),
               "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{variant}: FAILED\n{proc.stderr[-2000:]}")
            continue
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"== Llama, vocabulary 128,256, hidden 512, 2 layers, 1x{args.tokens} tokens, float32, r=16 all-linear ==")
    print(f"{'variant':<14} {'added peak MiB':>15} {'x model':>8} {'step s':>8} {'x model':>8} {'first loss':>11}")
    base = rows.get("model_loss")
    for name, row in rows.items():
        peak_x = row["added_peak_mib"] / base["added_peak_mib"] if base else float("nan")
        time_x = row["step_s"] / base["step_s"] if base else float("nan")
        print(f"{name:<14} {row['added_peak_mib']:>15.0f} {peak_x:>8.2f} {row['step_s']:>8.2f} {time_x:>8.2f} "
              f"{row['first_loss']:>11.5f}")  # fmt: skip
    if base and "chunked" in rows:
        peak_x = rows["chunked"]["added_peak_mib"] / base["added_peak_mib"]
        time_x = rows["chunked"]["step_s"] / base["step_s"]
        print("targets:")
        print(f"  chunked peak / model-loss peak   {peak_x:.3f}  (<= 0.500)  {'ok' if peak_x <= 0.5 else 'MISS'}")
        print(f"  chunked step / model-loss step   {time_x:.3f}  (<= 1.100)  {'ok' if time_x <= 1.1 else 'MISS'}")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
