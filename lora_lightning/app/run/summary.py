"""What the app writes and prints at the end: the JSON summary, the resolved config, a readable recap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape

from lora_lightning.app.console import console
from lora_lightning.io.atomic_files import write_atomic

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    """``summary.json``: the run's metrics, counts and paths on one line."""
    path = output_dir / SUMMARY_FILE
    write_atomic(path, json.dumps(summary, sort_keys=True) + "\n")
    return path


_PEAK_KINDS = {  # memory.py's kinds, as the recap words them
    "cuda_max_allocated": "CUDA max allocated during fit",
    "process_peak_rss": "process peak RSS during fit",
    "process_lifetime_peak_rss": "process peak RSS so far",
}


def print_recap(summary: dict[str, Any]) -> None:
    """The final recap a person reads: perplexity before -> after, trainable share, where things are.

    Plain aligned lines rather than a table, so long paths are never cut to the terminal width.
    """
    rows: list[tuple[str, str]] = []
    full = summary.get("method") == "full"
    base, adapted = summary.get("base_val_ppl"), summary.get("val_ppl")
    tuned = "full fine-tune" if full else "LoRA"
    if base is not None and adapted is not None:
        rows.append(("val perplexity", f"{base:,.1f} (base) -> {adapted:,.1f} ({tuned}), x{adapted / base:.3f}"))
    elif adapted is not None:
        rows.append(("val perplexity", f"{adapted:,.1f}"))
    if summary.get("merged_val_ppl") is not None:
        export = "model/" if full else "merged/"
        rows.append(("merged, reloaded", f"{summary['merged_val_ppl']:,.1f} (AutoModelForCausalLM from {export})"))
    counts = summary.get("params", {})
    if counts:
        share = f"{counts['trainable']:,d} of {counts['total']:,d} params ({counts['trainable_percent']:.3f}%)"
        rows.append(("trainable", share))
    if full:
        rows.append(("method", "full fine-tuning (every weight trains)"))
    else:
        lora = summary["lora"]
        quant = (summary.get("quant") or {}).get("method")
        quantized = f" base={quant}" if quant else ""
        rows.append(("lora", f"r={lora['r']} alpha={lora['alpha']} targets={summary['targets']}{quantized}"))
    fidelity = summary.get("merge_fidelity")
    if fidelity and fidelity.get("layers"):
        kept = f"{fidelity['overall_rel_error']:.2g} (worst layer {fidelity['max_rel_error']:.2g})"
        rows.append(("merge", f"the merged weights hold the update to a relative error of {kept}"))
    if summary.get("peak_mem_mib") is not None:
        kind = _PEAK_KINDS.get(summary.get("peak_mem_kind", ""), "peak")
        rows.append(("peak memory", f"{summary['peak_mem_mib']:,.0f} MiB ({kind})"))
    exports = (("adapter", "adapter"), ("merged model", "merged"), ("model", "model"), ("checkpoints", "checkpoints"))
    for label, key in exports:
        if summary["paths"].get(key):
            rows.append((label, summary["paths"][key]))
    rows.append(("summary", summary["paths"]["summary"]))
    if summary.get("base_sample"):
        rows.append(("sample, base", repr(summary["base_sample"])))
    if summary.get("sample"):
        rows.append(("sample, tuned", repr(summary["sample"])))
    rows.append(("time", f"{summary['wall_s']:.0f} s"))
    width = max(len(label) for label, _ in rows)
    out = console()
    out.print("[bold]lora-lightning: done[/bold]")
    for label, value in rows:
        out.print(f"  [bold]{label.ljust(width)}[/bold]  {escape(value)}", soft_wrap=True)
