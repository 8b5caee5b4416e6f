"""Findings of a rank study, computed from the report's rows when they allow it.

The rules of thumb people choose a rank by (q,v alone reach most of all-linear LoRA; returns
diminish with rank; high rank comes near full fine-tuning) become three measured statements:

- the share of all-linear's improvement over the base that q,v alone reach, per rank (in val loss,
  the log of perplexity, so the shares add up the way the losses do);
- the change of val perplexity from each rank to the next, per target set;
- the best LoRA job against full fine-tuning: val perplexity, trainable parameters, time, memory.

Where several finished jobs share a (targets, rank), the one with the lowest val loss stands for
it (a sweep over learning rates or seeds). A finding whose jobs are missing is left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from typing import Any

from lora_lightning.app.sweep.rows import OK, best_row

QV, ALL_LINEAR = "qv", "all_linear"  # the target roles the first finding compares


def finished(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """Finished jobs of one method that have a val loss."""
    return [row for row in rows if row["status"] == OK and row["method"] == method and row["val_loss"] is not None]


def best_by(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable]) -> dict[Hashable, dict[str, Any]]:
    """The row with the lowest val loss for each value of ``key``."""
    best: dict[Hashable, dict[str, Any]] = {}
    for row in rows:
        k = key(row)
        if k not in best or row["val_loss"] < best[k]["val_loss"]:
            best[k] = row
    return best


def base_score(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(val ppl, val loss) of the base, from the first job that has it."""
    for row in rows:
        if row.get("base_val_ppl") is not None and row.get("base_val_loss") is not None:
            return row["base_val_ppl"], row["base_val_loss"]
    return None, None


def _pct(value: float) -> str:
    return f"{value:+.1%}".replace("+-", "-")


def qv_share(rows: list[dict[str, Any]]) -> str | None:
    """q,v's share of all-linear's improvement over the base, per rank."""
    _, base_loss = base_score(rows)
    cells = best_by(finished(rows, "lora"), lambda row: (row["targets"], row["r"]))
    ranks = sorted({r for targets, r in cells if targets == QV} & {r for targets, r in cells if targets == ALL_LINEAR})
    if base_loss is None or not ranks:
        return None
    parts = []
    for r in ranks:
        qv, every = cells[(QV, r)], cells[(ALL_LINEAR, r)]
        gain = base_loss - every["val_loss"]
        share = f"{(base_loss - qv['val_loss']) / gain:.0%}" if gain > 0 else "n/a (all-linear did not improve)"
        parts.append(f"r={r}: {share} (val ppl {qv['val_ppl']:,.1f} vs {every['val_ppl']:,.1f})")
    return "q,v alone reach, of all-linear's improvement over the base (in val loss): " + "; ".join(parts)


def rank_steps(rows: list[dict[str, Any]]) -> list[str]:
    """The change of val perplexity from each rank to the next, one line per target set."""
    cells = best_by(finished(rows, "lora"), lambda row: (row["targets"], row["r"]))
    lines = []
    for targets in sorted({t for t, _ in cells if t is not None}):
        ranks = sorted(r for t, r in cells if t == targets and r is not None)
        steps = [
            f"r{a}->r{b} {_pct(cells[(targets, b)]['val_ppl'] / cells[(targets, a)]['val_ppl'] - 1)}"
            for a, b in itertools.pairwise(ranks)
            if cells[(targets, a)]["val_ppl"] and cells[(targets, b)]["val_ppl"] is not None
        ]
        if steps:
            lines.append(f"{targets}, val ppl from each rank to the next: " + ", ".join(steps))
    return lines


def _ratio(a: float | None, b: float | None, fmt: str, unit: str = "") -> str:
    if a is None or b is None:
        return "n/a"
    return f"{format(a, fmt)}{unit} vs {format(b, fmt)}{unit}" + (f" (x{a / b:.2f})" if b else "")


def lora_vs_full(rows: list[dict[str, Any]]) -> str | None:
    """The best LoRA job (lowest monitored value) against the best full fine-tune."""
    full_rows = finished(rows, "full")
    lora = best_row(finished(rows, "lora"))
    if lora is None or not full_rows:
        return None
    full = best_row(full_rows) or full_rows[0]
    _, base_loss = base_score(rows)
    reach = ""
    if base_loss is not None and base_loss - full["val_loss"] > 0:
        share = (base_loss - lora["val_loss"]) / (base_loss - full["val_loss"])
        reach = f"; LoRA reaches {share:.0%} of full fine-tuning's improvement over the base (in val loss)"
    return (
        f"best LoRA (job {lora['job']}: r={lora['r']}, {lora['targets']}) vs full fine-tuning (job {full['job']}): "
        f"val ppl {_ratio(lora['val_ppl'], full['val_ppl'], ',.1f')}, "
        f"trainable params {_ratio(lora['trainable_params'], full['trainable_params'], ',d')}, "
        f"training time {_ratio(lora['fit_s'], full['fit_s'], '.1f', ' s')}, "
        f"peak memory {_ratio(lora['peak_mem_mib'], full['peak_mem_mib'], ',.0f', ' MiB')}" + reach
    )


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """Every finding the rows allow, one line each."""
    lines = [line for line in (qv_share(rows), *rank_steps(rows), lora_vs_full(rows)) if line]
    base_ppl, _ = base_score(rows)
    if base_ppl is not None:
        lines.insert(0, f"base model: val ppl {base_ppl:,.1f}")
    return lines
