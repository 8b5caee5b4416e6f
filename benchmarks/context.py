"""How long a sequence fits: the longest 1 x T training step under a GPU memory budget, per variant.

For each variant, in a process of its own, the 8B shape is loaded in 4 bits (nf4, double quant,
bf16 compute, gradient checkpointing, r=16 on q/k/v/o and the MLP) and capped at ``--budget-gib``
with ``torch.cuda.set_per_process_memory_fraction``; then the sequence length doubles from
``--start`` until a step runs out of memory, and bisection (in steps of ``--multiple`` tokens)
finds the longest that fits.

    python benchmarks/context.py --size 8b --budget-gib 24      # qlora_chunked, qlora, peft_qlora

Target (issue 25): ours with the chunked loss fits at least 3x the tokens PEFT + bitsandbytes does.
CUDA only: on a CPU there is no allocator budget to hold a step to.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora
import shapes

VARIANTS = ("qlora_chunked", "qlora", "peft_qlora")
GIB = 2**30


def longest_fitting(fits: Callable[[int], bool], start: int, limit: int, multiple: int) -> int:
    """The largest ``n`` (a multiple of ``multiple``, at most ``limit``) with ``fits(n)``, 0 if none.

    Doubles from ``start`` until a length fails (or passes ``limit``), then bisects between the
    longest that fitted and the shortest that did not. Assumes ``fits`` is monotone.
    """
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:
        trial = min(good * 2, limit)
        if trial == good:
            return good  # the limit itself fits
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > multiple:
        middle = (good + bad) // 2 // multiple * multiple
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def child(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * GIB / total), device)
    model = qlora._adapt(qlora._load(Path(args.dir), args.variant, device, checkpointing=True), args.variant)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    tried: dict[int, bool] = {}

    def fits(tokens: int) -> bool:
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        try:
            qlora.train_step(model, optimizer, ids, args.variant)
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        tried[tokens] = ok
        print(f"# {args.variant}: {tokens} tokens {'fit' if ok else 'out of memory'}", file=sys.stderr, flush=True)
        return ok

    best = longest_fitting(fits, args.start, args.limit, args.multiple)
    print("RESULT " + json.dumps({"variant": args.variant, "tokens": best, "tried": tried}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(qlora.SIZES), default="8b")
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--start", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=131072)
    parser.add_argument("--multiple", type=int, default=256)
    parser.add_argument("--cache", default=os.environ.get("QLORA_BENCH_CACHE", "/tmp"))
    parser.add_argument("--child", dest="variant", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the budget is torch.cuda.set_per_process_memory_fraction")
    if args.variant:
        child(args)
        return
    directory = qlora._base_dir(qlora.SIZES[args.size], Path(args.cache))
    print(f"# benchmarks/context.py --size {args.size} --budget-gib {args.budget_gib:g}; {shapes.versions()}")
    results = {}
    for variant in args.variants.split(","):
        command = [sys.executable, "-W", "ignore", __file__, "--child", variant, "--dir", str(directory)]
        for flag in ("size", "budget_gib", "start", "limit", "multiple"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        proc = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant:<14} FAILED: {' | '.join(proc.stderr.strip().splitlines()[-3:])}", flush=True)
            continue
        results[variant] = json.loads(line.removeprefix("RESULT "))
    print(f"== longest 1 x T training step within {args.budget_gib:g} GiB, {qlora.SIZES[args.size].note} ==")
    for variant, row in results.items():
        print(f"{variant:<14} {row['tokens']:>8} tokens")
    if "qlora_chunked" in results and results.get("peft_qlora", {}).get("tokens"):
        ratio = results["qlora_chunked"]["tokens"] / results["peft_qlora"]["tokens"]
        print(f"  qlora_chunked / peft_qlora  {ratio:.2f}x  (target >= 3: {'met' if ratio >= 3 else 'MISSED'})")


if __name__ == "__main__":
    main()
