"""One training step, side by side: full fine-tune, HF PEFT, lora-lightning variants, frozen floor.

Each variant builds the same Llama (random init) and times the median step (forward + backward +
AdamW) after warm-up, and records peak memory: ``torch.cuda.max_memory_allocated`` on GPU (all
variants in this process, memory released between them), peak RSS on CPU (one subprocess per
variant, so one variant's allocations never count against the next).

    python benchmarks/step.py --size tiny                 # CPU: fp32, 2 threads (+ shrunk checks)
    python benchmarks/step.py --size all-gpu              # CUDA: 1b + 8b in bf16, merge timing, bf16 check
    python benchmarks/step.py --size 1b --variants lora,floor --no-checks

Variants (r=16, alpha=16 on q,k,v,o,gate,up,down):
    full          every weight trains (AdamW over all parameters; bf16 weights and optimizer state
                  on GPU, no float32 master copy: with one the 8b shape does not fit on one card)
    peft          HF PEFT get_peft_model at its defaults (adapters float32 on a bf16 base)
    lora          lora-lightning at its defaults, adapters in the base dtype
    lora_fp32     lora-lightning, adapter_dtype="float32"
    lora_fa       lora-lightning, freeze_A=True (LoRA-FA)
    lora_compile  lora-lightning with each decoder layer torch.compile'd (regional compilation)
    dora          lora-lightning with use_dora=True (row norms from W A^T and A A^T, W + s B A never formed)
    peft_dora     HF PEFT with use_dora=True at its defaults
    floor         every weight frozen, input embeddings require grad: backward through every layer,
                  no weight gradient, no optimizer. No LoRA step can be faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes
from shapes import GIB, MIB, RANK, SIZES, TARGETS, Shape

VARIANTS = (
    "full",
    "peft",
    "lora",
    "lora_fp32",
    "lora_fa",
    "lora_compile",
    "dora",
    "peft_dora",
    "floor",
)
# The floor first (every ratio divides by it), the slow-to-compile variant last.
RUN_ORDER = (
    "floor",
    "full",
    "peft",
    "lora",
    "lora_fp32",
    "lora_fa",
    "dora",
    "peft_dora",
    "lora_compile",
)


def prepare(variant: str, model: nn.Module) -> nn.Module:
    """Turn a freshly built model into ``variant``; returns the module to call."""
    if variant == "full":
        return model.requires_grad_(True)
    if variant == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # embedding output requires grad: backward runs through all layers
        return model
    if variant in ("peft", "peft_dora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, use_dora=variant == "peft_dora")
        return get_peft_model(model, config)
    from lora_lightning import LoRAConfig, inject_lora

    config = LoRAConfig(
        r=RANK,
        alpha=RANK,
        target_modules=TARGETS,
        adapter_dtype="float32" if variant == "lora_fp32" else None,
        freeze_A=variant == "lora_fa",
        use_dora=variant == "dora",
    )
    inject_lora(model, config)
    if variant == "lora_compile":
        torch._dynamo.reset()  # a fresh cache per size: no recompiles against another shape's guards
        # Regional compilation: every decoder layer runs the same compiled code, so the compile
        # cost is one layer's, not the whole stack's.
        for layer in model.model.layers:
            layer.compile()
    return model


def measure(variant: str, shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    """Build, prepare, time. Returns a row dict; never raises (an error goes in the row)."""
    row: dict = {"size": shape.name, "variant": variant}
    try:
        row.update(_measure(variant, shape, device, dtype, warmup, steps))
    except Exception as exc:  # one variant failing (OOM, missing package) must not stop the others
        row["error"] = shapes.error_text(exc)
    shapes.free_device_memory(device)  # outside the except block: the traceback no longer pins tensors
    return row


def make_step(variant: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    """Build the model for ``variant`` and return one training step over a fixed batch, and its trainable count."""
    model = prepare(variant, shapes.build_model(shape, device, dtype))
    ids = shapes.token_batch(shape, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda") if params else None

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def _measure(variant: str, shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    t_build = time.perf_counter()
    step, trainable = make_step(variant, shape, device, dtype)
    shapes.synchronize(device)
    build_s = time.perf_counter() - t_build
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = shapes.rss_bytes()
    t0 = time.perf_counter()
    for _ in range(warmup):  # optimizer state is allocated here; the compiled variant compiles here
        step()
    shapes.synchronize(device)
    warmup_s = time.perf_counter() - t0
    median, spread = shapes.summarise(shapes.time_calls(step, device, 0, steps))
    row = {
        "ms": median,
        "ms_spread": spread,
        "trainable": trainable,
        "build_s": build_s,
        "warmup_s": warmup_s,
    }
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        row["peak_bytes"] = shapes.peak_rss_bytes()
        row["step_bytes"] = row["peak_bytes"] - rss_before  # growth during training on top of the built model
    return row  # the model and optimizer die with this frame; the caller then empties the cache


def interleaved_times(variants: list[str], shape: Shape, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    """CPU timing: every variant built in this process, stepping in turns (see shapes.time_interleaved).

    Returns ``{variant: {"ms", "ms_spread"} or {"error"}}``.
    """
    device, steppers, results = torch.device("cpu"), {}, {}
    for variant in variants:
        try:
            steppers[variant] = make_step(variant, shape, device, dtype)[0]
        except Exception as exc:
            results[variant] = {"error": shapes.error_text(exc)}
    for variant, times in shapes.time_interleaved(steppers, device, warmup, steps).items():
        if isinstance(times, str):
            results[variant] = {"error": times}
        else:
            median, spread = shapes.summarise(times)
            results[variant] = {"ms": median, "ms_spread": spread}
    return results


def measure_in_subprocess(variant: str, size: str, threads: int, warmup: int, steps: int) -> dict:
    """CPU: one process per variant, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--worker", variant, "--size", size, "--device", "cpu"]
    cmd += ["--threads", str(threads), "--warmup", str(warmup), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"size": size, "variant": variant, "error": f"worker exited {proc.returncode}: {tail}"}


def table(rows: list[dict], shape: Shape, device: torch.device, dtype: torch.dtype) -> str:
    """One table per size: median step and peak memory, each with ratios to full and to floor."""
    by = {r["variant"]: r for r in rows}
    ref = {k: by.get(k, {}) for k in ("full", "floor")}
    unit, scale = ("GiB", GIB) if device.type == "cuda" else ("MiB", MIB)
    dtype_name = str(dtype).removeprefix("torch.")
    lines = [
        f"== {shape.name}: {shape.note}, {shape.layers} layers, hidden {shape.hidden}, "
        f"{shape.tokens} tokens/step, {dtype_name}, {device.type}, r={RANK} ==",
        f"{'variant':<13} {'step ms':>15} {'x full':>7} {'x floor':>7} {'peak ' + unit:>10}"
        f" {'x full':>7} {'x floor':>7}" + ("  step-growth MiB" if device.type == "cpu" else ""),
    ]

    def ratio(value: float | None, key: str, field: str) -> str:
        base = ref[key].get(field)
        return f"{value / base:7.2f}" if value is not None and base else f"{'-':>7}"

    for variant in VARIANTS:
        row = by.get(variant)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"{variant:<13} FAILED: {row['error']}")
            continue
        ms, mem = row["ms"], row["peak_bytes"]
        line = (
            f"{variant:<13} {ms:9.1f} ±{row['ms_spread']:4.1f} {ratio(ms, 'full', 'ms')} {ratio(ms, 'floor', 'ms')}"
            f" {mem / scale:10.1f} {ratio(mem, 'full', 'peak_bytes')} {ratio(mem, 'floor', 'peak_bytes')}"
        )
        if "step_bytes" in row:
            line += f"  {row['step_bytes'] / MIB:15.1f}"
        lines.append(line)
    return "\n".join(lines)


class Log:
    """Print, and append to $OUT/bench.txt (plus one JSON line per result to bench.jsonl) if OUT is set."""

    def __init__(self) -> None:
        out = os.environ.get("OUT")
        self.dir = Path(out) if out else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        if self.dir:
            with open(self.dir / "bench.txt", "a") as f:
                f.write(text + "\n")

    def record(self, row: dict) -> None:
        if self.dir:
            with open(self.dir / "bench.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=[*SIZES, "all-gpu"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 GPU, 2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8 GPU, 20 CPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (tiny is specified at 2)")
    parser.add_argument("--no-checks", action="store_true", help="skip the bf16 check, merge, layer, Lightning rows")
    parser.add_argument("--budget-s", type=float, default=None, help="skip what is left after this many seconds")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the GPU code path (all-gpu plan, bf16, variants one after another in this process) on the "
        "CPU at the tiny size with 1+2 steps: catches a broken GPU run before it costs device time",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants got {unknown}; allowed: {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3 if cuda else 2)
    steps = args.steps or (2 if args.dry_run else 8 if cuda else 20)
    dtype = torch.bfloat16 if cuda or args.dry_run else torch.float32

    if args.worker:  # CPU subprocess: one variant, one JSON line
        print(json.dumps(measure(args.worker, SIZES[args.size], device, dtype, warmup, steps)), flush=True)
        return 0
    if args.size == "all-gpu" and not (cuda or args.dry_run):
        print("--size all-gpu needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    import checks  # after sys.path is set up; imports peft lazily
    import lightning_row
    import targets

    log, start = Log(), time.perf_counter()

    def over_budget(what: str) -> bool:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            log(f"{what}: skipped, time budget of {args.budget_s:.0f} s spent")
            return True
        return False

    def progress(text: str) -> None:
        log(f"  [{time.perf_counter() - start:6.1f}s] {text}")

    all_gpu = args.size == "all-gpu"
    sizes = ["tiny"] if args.dry_run else ["1b", "8b"] if all_gpu else [args.size]
    chosen = [v for v in RUN_ORDER if v in args.variants.split(",")]
    sequential = cuda or args.dry_run  # the GPU path: one variant after another in this process
    log(f"# benchmarks/step.py {' '.join(sys.argv[1:])}")
    log(f"# {time.strftime('%Y-%m-%d %H:%M')} | {shapes.versions()} | threads {torch.get_num_threads()}")
    if not cuda:
        log(f"# load average before: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    failed = False

    # Correctness first: quick, and the one result that fails the run.
    if not args.no_checks:
        check_shape = SIZES["1b"].shrunk(2, 2, 512) if cuda else SIZES[sizes[0]].shrunk(2, 2, 64)
        ok, text = checks.bf16_check(check_shape, device)
        log(text)
        failed |= not ok

    rows: dict[str, list[dict]] = {size: [] for size in sizes}

    def run_sequential(size: str, variant: str) -> None:
        if over_budget(f"{size} {variant}"):
            row = {"size": size, "variant": variant, "error": "skipped: time budget spent"}
        else:
            row = measure(variant, SIZES[size], device, dtype, warmup, steps)
        log.record(row)
        if "ms" in row:
            shown = f"{row['ms']:.1f} ms, {row['peak_bytes'] / GIB:.2f} GiB"
            shown += f" (build {row['build_s']:.0f} s, warm-up {row['warmup_s']:.0f} s)"
        else:
            shown = row["error"]
        progress(f"{size} {variant}: {shown}")
        rows[size].append(row)

    # Every size's eager variants first, the compiled one (minutes of compiling) after everything else.
    eager = [v for v in chosen if v != "lora_compile"]
    for size in sizes:
        if sequential:
            for variant in eager:
                run_sequential(size, variant)
        else:
            rows[size] = cpu_rows(size, chosen, args.threads, warmup, steps, dtype, log, progress)

    if not args.no_checks:
        if not over_budget("merge timing"):
            log(checks.merge_timing(SIZES[sizes[-1]], device, dtype, repeats=3))
        if not over_budget("layer timing"):
            log(checks.layer_timing(SIZES[sizes[-1]], device, dtype))

    if not args.no_checks and not over_budget("Lightning overhead"):
        steps_l = 2 if args.dry_run else 10
        log(lightning_row.lightning_overhead(SIZES[sizes[0]], device, dtype, warmup=warmup, steps=steps_l))

    # Last: compiling takes minutes, and the budget may run out here.
    if sequential and "lora_compile" in chosen:
        for size in sizes:
            run_sequential(size, "lora_compile")

    log("\n# SUMMARY")
    for size in sizes:
        log(table(rows[size], SIZES[size], device, dtype))
        log("\n".join(targets.target_lines(rows[size], SIZES[size], cuda)))
    if not cuda:
        log(f"# load average after: {os.getloadavg()[0]:.2f}")
    log(f"# total wall {time.perf_counter() - start:.0f} s")
    if failed:
        log("bf16 check FAILED")
        return 1
    return 0


def cpu_rows(size, chosen, threads, warmup, steps, dtype, log, progress) -> list[dict]:
    """CPU: peak RSS from a short run per variant in its own process (RSS is per process); step
    time from all variants in this process taking turns (see ``interleaved_times``)."""
    progress(f"{size}: peak RSS, one subprocess per variant")
    memory = {v: measure_in_subprocess(v, size, threads, warmup=1, steps=2) for v in chosen}
    progress(f"{size}: timing {warmup}+{steps} steps, variants taking turns")
    timing = interleaved_times(chosen, SIZES[size], dtype, warmup, steps)
    rows = []
    for variant in chosen:
        row = {"size": size, "variant": variant, **timing[variant]}
        if "error" in memory[variant]:
            row.setdefault("error", memory[variant]["error"])
        else:
            row.update({k: memory[variant][k] for k in ("peak_bytes", "step_bytes", "trainable")})
        rows.append(row)
        log.record(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
