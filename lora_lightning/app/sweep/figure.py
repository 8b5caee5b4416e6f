"""sweep.png: val perplexity against rank and against trainable parameters.

Left: val ppl against r (log2 axis), one line per target set, with the base and the full fine-tune
as horizontal references. Right: val ppl against trainable parameters (log axis), every finished
job a point, full fine-tuning included, so the price of each point in parameters is visible.
Drawn with matplotlib's object API on the Agg canvas: no display and no global pyplot state, so it
works the same in a sweep's launching process, a SLURM login node and a test.
"""

from __future__ import annotations

import io
from typing import Any

from lora_lightning.app.sweep.findings import base_score, best_by, finished


def _lora_lines(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per target set, its best job at each rank, ordered by rank."""
    cells = best_by(finished(rows, "lora"), lambda row: (row["targets"], row["r"]))
    lines: dict[str, list[dict[str, Any]]] = {}
    for (targets, r), row in sorted(cells.items(), key=lambda item: (str(item[0][0]), item[0][1] or 0)):
        if r is not None:
            lines.setdefault(str(targets), []).append(row)
    return lines


def plottable(rows: list[dict[str, Any]]) -> bool:
    """Whether any finished job has a val perplexity to draw."""
    return any(row["val_ppl"] is not None for row in finished(rows, "lora") + finished(rows, "full"))


def render_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """The figure as PNG bytes (written by the caller, atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    by_rank, by_params = figure.subplots(1, 2)
    base_ppl, _ = base_score(rows)
    full_rows = [row for row in finished(rows, "full") if row["val_ppl"] is not None]
    full = min(full_rows, key=lambda row: row["val_loss"]) if full_rows else None

    for targets, line in _lora_lines(rows).items():
        ranks = [row["r"] for row in line]
        ppl = [row["val_ppl"] for row in line]
        (drawn,) = by_rank.plot(ranks, ppl, marker="o", label=f"LoRA {targets}")
        points = [row for row in finished(rows, "lora") if str(row["targets"]) == targets]
        by_params.scatter(
            [row["trainable_params"] for row in points],
            [row["val_ppl"] for row in points],
            color=drawn.get_color(),
            label=f"LoRA {targets}",
        )
    for axis in (by_rank, by_params):
        if base_ppl is not None:
            axis.axhline(base_ppl, color="grey", linestyle=":", label=f"base ({base_ppl:,.1f})")
        if full is not None:
            label = f"full fine-tune ({full['val_ppl']:,.1f})"
            axis.axhline(full["val_ppl"], color="black", linestyle="--", label=label)
        axis.set_ylabel("val perplexity")
        axis.grid(True, which="both", alpha=0.3)
    if full is not None and full["trainable_params"]:
        by_params.scatter([full["trainable_params"]], [full["val_ppl"]], color="black", marker="s")
    by_rank.set_xscale("log", base=2)
    by_rank.set_xlabel("LoRA rank r")
    ranks = sorted({row["r"] for row in finished(rows, "lora") if row["r"] is not None})
    if ranks:
        by_rank.set_xticks(ranks, [str(r) for r in ranks])
    by_params.set_xscale("log")
    by_params.set_xlabel("trainable parameters")
    by_rank.legend(fontsize="small")
    by_params.legend(fontsize="small")
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
