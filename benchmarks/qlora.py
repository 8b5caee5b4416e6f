"""QLoRA side by side: the memory and step time of LoRA on a bf16 base, our QLoRA, PEFT + bitsandbytes.

Each variant runs in a process of its own. It loads the same base the way a user does
(``from_pretrained``: in bf16, or through a ``BitsAndBytesConfig``), adapts it (r=16 on every linear
layer, float32 adapters, AdamW), and times training steps (forward + backward + optimizer step).

    python benchmarks/qlora.py --size 1b        # CPU: TinyLlama-1.1B shape, 1x256 tokens, bf16 compute
    python benchmarks/qlora.py --size 1b --warmup 0 --steps 1   # a 2-core CPU without native bf16
    python benchmarks/qlora.py --size 8b        # CUDA: Llama-3-8B shape, 1x2048 tokens, gradient checkpointing

Memory, CPU: what the variant adds to its process while it trains: the peak resident set during
the steps (``VmHWM``, reset once the model is loaded) minus the resident set before the model
loads. Loading maps the safetensors file, whose pages count as resident while mapped; the load
peak is printed too, apart. On CUDA: ``torch.cuda.max_memory_allocated`` over the steps.

Variants:
    lora_bf16    lora-lightning on the bf16 base
    qlora        lora-lightning on the base loaded in nf4 with double quantization, bf16 compute
    peft_qlora   HF PEFT get_peft_model on the same 4-bit base (its defaults: float32 adapters)
    peft_bf16    HF PEFT on the bf16 base (for context)
    qlora_chunked  qlora with the loss computed by lora_lightning.causal_lm_loss (the head 1024 tokens at a time)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes
from shapes import GIB, MIB, RANK, TARGETS, Shape

SIZES = {
    "tiny": Shape("tiny", 2, 256, 688, 8, 4, 2048, 1, 64, "tiny Llama (a dry run of the plan)"),
    "1b": Shape("1b", 22, 2048, 5632, 32, 4, 32000, 1, 256, "TinyLlama-1.1B shape"),
    # The 1.1B shape's widths at 4 of its 22 layers (about 305M parameters), for quick looks: on a
    # CPU without native bf16, PyTorch's bf16 GEMMs (the frozen head's, PEFT's) take minutes a step.
    "1b-4l": Shape("1b-4l", 4, 2048, 5632, 32, 4, 32000, 1, 256, "TinyLlama-1.1B widths, 4 of 22 layers"),
    "8b": Shape("8b", 32, 4096, 14336, 32, 8, 128256, 1, 2048, "Llama-3-8B shape"),
}
VARIANTS = ("lora_bf16", "qlora", "peft_qlora", "peft_bf16", "qlora_chunked")


def _load(directory: Path, variant: str, device: torch.device, checkpointing: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.bfloat16, "device_map": {"": str(device)}}
    if variant.startswith("qlora") or variant == "peft_qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model.train()


def _adapt(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
    from lora_lightning import LoRAConfig, inject_lora

    inject_lora(model, LoRAConfig(r=RANK, alpha=RANK, target_modules=TARGETS, adapter_dtype="float32"))
    return model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, variant: str) -> None:
    """One step on ``ids`` as labels too: the model's own loss, or ``causal_lm_loss`` for ``*_chunked``."""
    from lora_lightning import causal_lm_loss

    loss = causal_lm_loss(model, ids, ids) if variant.endswith("_chunked") else model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def child(args: argparse.Namespace) -> None:
    """One variant in this process: load, adapt, train ``--steps`` steps, print one JSON line."""
    shape = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads) if device.type == "cpu" else None
    import peft  # noqa: F401  (every import before the baseline, so it measures only the model)
    import transformers  # noqa: F401

    import lora_lightning  # noqa: F401

    before = shapes.rss_bytes()
    t0 = time.perf_counter()
    model = _adapt(_load(Path(args.dir), args.variant, device, checkpointing=device.type == "cuda"), args.variant)
    load_s = time.perf_counter() - t0
    load_peak = shapes.peak_rss_bytes() - before
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = shapes.token_batch(shape, device)

    def step() -> None:
        train_step(model, optimizer, ids, args.variant)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        shapes.reset_peak_rss()
    times = shapes.time_calls(step, device, warmup=args.warmup, repeats=args.steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else shapes.peak_rss_bytes() - before
    median, spread = shapes.summarise(times)
    record = {
        "variant": args.variant,
        "step_ms": median,
        "spread_ms": spread,
        "tokens_per_s": shape.batch * shape.seq / (median / 1e3),
        "peak_bytes": peak,
        "load_peak_bytes": load_peak,
        "load_s": load_s,
        "trainable": sum(p.numel() for p in params),
    }
    print("RESULT " + json.dumps(record), flush=True)


def _base_dir(shape: Shape, root: Path) -> Path:
    """A random-weight bf16 model of ``shape`` saved once (the checkpoint every variant loads)."""
    directory = root / f"llama-{shape.name}-bf16"
    if not (directory / "config.json").is_file():
        # Random init is far quicker on a GPU; the saved file is the same either way.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        model = shapes.build_model(shape, device, torch.bfloat16)
        model.save_pretrained(directory)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
        print(f"# base saved to {directory} in {time.perf_counter() - t0:.0f} s", flush=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--variants", default=",".join(VARIANTS[:3]))
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after --warmup untimed ones")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=os.environ.get("QLORA_BENCH_CACHE", tempfile.gettempdir()))
    parser.add_argument("--child", dest="variant", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    shape = SIZES[args.size]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    directory = _base_dir(shape, Path(args.cache))
    print(f"# {shape.note}, {shape.batch}x{shape.seq} tokens, r={RANK} on {','.join(TARGETS)}; {shapes.versions()}")
    results = {}
    for variant in variants:
        command = [sys.executable, "-W", "ignore", __file__, "--size", args.size, "--child", variant, "--dir"]
        command += [str(directory), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--threads", str(args.threads)]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            last = proc.stderr.strip().splitlines()[-3:] if proc.stderr.strip() else [f"exit {proc.returncode}"]
            print(f"{variant:<11} FAILED: {' | '.join(last)}", flush=True)
            continue
        results[variant] = json.loads(line.removeprefix("RESULT "))
        print(f"# {variant}: {results[variant]}", flush=True)
    unit, scale = ("GiB", GIB) if torch.cuda.is_available() else ("MiB", MIB)
    print(f"{'variant':<11} {'step ms':>10} {'tokens/s':>9} {'peak ' + unit:>10} {'load peak':>10}")
    for variant, r in results.items():
        print(
            f"{variant:<11} {r['step_ms']:>10.0f} {r['tokens_per_s']:>9.1f} {r['peak_bytes'] / scale:>10.2f} "
            f"{r['load_peak_bytes'] / scale:>10.2f}"
        )
    _targets(results, unit, scale)


def _targets(results: dict, unit: str, scale: float) -> None:
    def ratio(a: str, b: str, key: str) -> float | None:
        return results[a][key] / results[b][key] if a in results and b in results else None

    checks = [
        ("qlora peak / lora_bf16 peak", ratio("qlora", "lora_bf16", "peak_bytes"), 0.6),
        ("qlora peak / peft_qlora peak", ratio("qlora", "peft_qlora", "peak_bytes"), 1.0),
        ("qlora step / peft_qlora step", ratio("qlora", "peft_qlora", "step_ms"), 1.0),
        ("qlora_chunked tokens/s / qlora tokens/s (>= 1)", ratio("qlora", "qlora_chunked", "step_ms"), None),
    ]
    if "qlora" in results and torch.cuda.is_available():
        checks.append(("qlora peak GiB (8b target 10, stretch 8)", results["qlora"]["peak_bytes"] / GIB, 10.0))
    if "qlora_chunked" in results and torch.cuda.is_available():
        checks.append(("qlora_chunked peak GiB (8b target 7)", results["qlora_chunked"]["peak_bytes"] / GIB, 7.0))
    for name, value, bound in checks:
        if value is None:
            continue
        if bound is None:  # a ratio that must be at least 1
            print(f"  {name:<42} {value:6.3f}  ({'met' if value >= 1 else 'MISSED'})")
        else:
            print(f"  {name:<42} {value:6.3f}  (target <= {bound:g}: {'met' if value <= bound else 'MISSED'})")


if __name__ == "__main__":
    main()
