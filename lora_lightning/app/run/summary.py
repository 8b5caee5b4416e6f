"""What the app writes and prints at the end: summary.json (one typed record), the recap.

:class:`JobSummary` is ``summary.json``: the job writes it (finished or failed) with
:func:`write_summary`, the recap and the loggers read its fields, and the sweep report reads every
job's file back with :func:`read_summary`. No other module names its keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from lora_lightning.app.console import console
from lora_lightning.io.atomic_files import write_atomic

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


OK, FAILED = "ok", "failed"


@dataclass
class JobSummary:
    """One job's ``summary.json``: status, what was trained, the figures, the counts and the paths.

    A finished job fills every field but ``error`` and ``traceback``; a failed one (after its work
    started) only :data:`FAILED_FIELDS`: what the sweep report needs to list it.
    """

    status: str = OK
    method: str | None = None  # lora | full
    targets: Any = None  # the role (all_linear, qv, ...) or the explicit module list
    lora: dict[str, Any] | None = None  # the LoRA fields (r, alpha, ...)
    monitor: dict[str, float | None] = field(default_factory=dict)  # {monitor key: its final value}
    paths: dict[str, str | None] = field(default_factory=dict)
    wall_s: float | None = None
    error: str | None = None  # failed jobs: the one-line error and its traceback
    traceback: str | None = None
    model: str | None = None
    base_model: str | None = None
    data: str | None = None
    data_stats: dict[str, Any] | None = None
    eval_key: str | None = None  # jobs with equal keys share one base score
    params: dict[str, Any] | None = None
    lr: float | None = None
    steps: int | None = None
    world_size: int | None = None
    train_loss: float | None = None
    base_val_loss: float | None = None
    base_val_ppl: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    merged_val_ppl: float | None = None
    quant: dict[str, Any] | None = None
    merge_fidelity: dict[str, Any] | None = None
    sample: str | None = None
    base_sample: str | None = None
    peak_mem_mib: float | None = None
    peak_mem_kind: str | None = None
    timings: dict[str, float] | None = None
    answers: list[dict[str, Any]] | None = None  # supervised data only

    def to_json(self) -> dict[str, Any]:
        """The file's object: a finished job's every field (``answers`` when there are any), a
        failed job's :data:`FAILED_FIELDS`."""
        data = dataclasses.asdict(self)
        if self.status == FAILED:
            return {key: data[key] for key in FAILED_FIELDS}
        drop = {"error", "traceback"} | ({"answers"} if self.answers is None else set())
        return {key: value for key, value in data.items() if key not in drop}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSummary:
        """A record from a file's object; keys it does not know (a newer writer's) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


#: what a failed job's summary.json holds
FAILED_FIELDS = ("status", "error", "traceback", "method", "targets", "lora", "monitor", "wall_s", "paths")


def write_summary(output_dir: Path, summary: JobSummary) -> Path:
    """``summary.json``: the job's record on one line, written atomically."""
    path = output_dir / SUMMARY_FILE
    write_atomic(path, json.dumps(summary.to_json(), sort_keys=True) + "\n")
    return path


def read_summary(path: Path) -> JobSummary:
    """A job's record from its ``summary.json``.

    Raises:
        OSError: the file cannot be read. ValueError: it is not JSON, or not a JSON object.
    """
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return JobSummary.from_json(data)


_PEAK_KINDS = {  # memory.py's kinds, as the recap words them
    "cuda_max_allocated": "CUDA max allocated during fit",
    "process_peak_rss": "process peak RSS during fit",
    "process_lifetime_peak_rss": "process peak RSS so far",
}


def print_recap(summary: JobSummary) -> None:
    """The final recap a person reads: perplexity before -> after, trainable share, where things are.

    Plain aligned lines rather than a table, so long paths are never cut to the terminal width.
    """
    rows: list[tuple[str, str]] = []
    full = summary.method == "full"
    base, adapted = summary.base_val_ppl, summary.val_ppl
    tuned = "full fine-tune" if full else "LoRA"
    if base is not None and adapted is not None:
        rows.append(("val perplexity", f"{base:,.1f} (base) -> {adapted:,.1f} ({tuned}), x{adapted / base:.3f}"))
    elif adapted is not None:
        rows.append(("val perplexity", f"{adapted:,.1f}"))
    if summary.merged_val_ppl is not None:
        export = "model/" if full else "merged/"
        rows.append(("merged, reloaded", f"{summary.merged_val_ppl:,.1f} (AutoModelForCausalLM from {export})"))
    counts = summary.params or {}
    if counts:
        share = f"{counts['trainable']:,d} of {counts['total']:,d} params ({counts['trainable_percent']:.3f}%)"
        rows.append(("trainable", share))
    if counts.get("expert_params"):
        experts, adapted = counts["expert_params"], counts.get("adapted_expert_params", 0)
        rows.append(
            (
                "experts",
                f"{experts:,d} params ({100 * experts / counts['total']:.1f}% of the model) in expert banks, "
                f"{100 * adapted / experts:.0f}% of them adapted{_banks_4bit(summary.quant)}",
            )
        )
    if full:
        rows.append(("method", "full fine-tuning (every weight trains)"))
    else:
        lora = summary.lora
        quant = (summary.quant or {}).get("method")
        quantized = f" base={quant}" if quant else ""
        rows.append(("lora", f"r={lora['r']} alpha={lora['alpha']} targets={summary.targets}{quantized}"))
    fidelity = summary.merge_fidelity
    if fidelity and fidelity.get("layers"):
        kept = f"{fidelity['overall_rel_error']:.2g} (worst layer {fidelity['max_rel_error']:.2g})"
        rows.append(("merge", f"the merged weights hold the update to a relative error of {kept}"))
    if summary.peak_mem_mib is not None:
        kind = _PEAK_KINDS.get((summary.peak_mem_kind or ""), "peak")
        rows.append(("peak memory", f"{summary.peak_mem_mib:,.0f} MiB ({kind})"))
    exports = (("adapter", "adapter"), ("merged model", "merged"), ("model", "model"), ("checkpoints", "checkpoints"))
    for label, key in exports:
        if summary.paths.get(key):
            rows.append((label, summary.paths[key]))
    rows.append(("summary", summary.paths["summary"]))
    if summary.base_sample:
        rows.append(("sample, base", repr(summary.base_sample)))
    if summary.sample:
        rows.append(("sample, tuned", repr(summary.sample)))
    rows.append(("time", f"{summary.wall_s:.0f} s"))
    width = max(len(label) for label, _ in rows)
    out = console()
    out.print("[bold]lora-lightning: done[/bold]")
    for label, value in rows:
        out.print(f"  [bold]{label.ljust(width)}[/bold]  {escape(value)}", soft_wrap=True)


def _banks_4bit(quant: dict[str, Any] | None) -> str:
    banks = (quant or {}).get("expert_banks")
    if not banks:
        return ""
    return f", 4-bit ({banks['bytes_before'] / 2**20:,.1f} -> {banks['bytes_after'] / 2**20:,.1f} MiB)"
