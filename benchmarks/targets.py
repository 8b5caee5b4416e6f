"""The issue's targets, read off one size's rows: one line each, ``ok`` or ``MISS`` with the numbers.

GPU (bf16): lora <= 1.10x the floor's step; lora_fp32 as fast as lora (within 3%); lora's peak
<= floor + the layer inputs A's gradient needs + adapter state; LoRA-FA's peak <= 1.05x the floor's. CPU: our
step <= PEFT's in the same run. PEFT's ratios are printed beside for context.
"""

from __future__ import annotations

from shapes import GIB, RANK, Shape


def lora_allowance_bytes(shape: Shape, trainable: int, bytes_per_element: int = 2) -> int:
    """What a LoRA step may keep beyond the frozen floor (the "simple fused" figure of the issue).

    Per layer, the inputs A's gradient reads: q/k/v's (one normed hidden state), gate/up's
    (another) and down_proj's (intermediate width); o_proj's input is the attention output, which
    attention's backward keeps in the floor too. Plus every layer's ``x A^T`` (tokens x r) and the
    adapters' parameters, gradients and two AdamW moments.
    """
    tokens = shape.batch * shape.seq
    inputs = shape.layers * tokens * (2 * shape.hidden + shape.intermediate)
    x_a = shape.layers * 7 * tokens * RANK
    return (inputs + x_a + 4 * trainable) * bytes_per_element


def target_lines(rows: list[dict], shape: Shape, cuda: bool) -> list[str]:
    by = {r["variant"]: r for r in rows if "ms" in r}
    lines: list[str] = []

    def check(label: str, value: float, limit: float, fmt: str = "{:.3f}") -> None:
        verdict = "ok" if value <= limit else "MISS"
        lines.append(f"  {label:<52} {fmt.format(value):>9}  (<= {fmt.format(limit)})  {verdict}")

    def ratio(a: str, b: str, field: str = "ms") -> float | None:
        return by[a][field] / by[b][field] if a in by and b in by else None

    if not cuda:
        if (r := ratio("lora", "peft")) is not None:
            check("lora step / peft step", r, 1.0)
        if (r := ratio("dora", "lora")) is not None:
            check("dora step / lora step", r, 1.10)
        if (r := ratio("dora", "peft_dora")) is not None:
            check("dora step / peft_dora step", r, 0.85)
        if (r := ratio("dora", "lora", "peak_bytes")) is not None:
            check("dora peak / lora peak", r, 1.05)
    else:
        if (r := ratio("lora", "floor")) is not None:
            check("lora step / floor step", r, 1.10)
        if (r := ratio("dora", "peft_dora")) is not None:
            check("dora step / peft_dora step (1.1B shape)", r, 0.7)
        if (r := ratio("lora_fp32", "lora")) is not None:
            check("lora_fp32 step / lora step (float32 adapters cost nothing)", r, 1.03)
        if "lora" in by and "floor" in by:
            bound = by["floor"]["peak_bytes"] + lora_allowance_bytes(shape, by["lora"].get("trainable", 0))
            check(
                "lora peak GiB <= floor + saved inputs + adapters",
                by["lora"]["peak_bytes"] / GIB,
                bound / GIB,
                "{:.2f}",
            )
        if (r := ratio("lora_fa", "floor", "peak_bytes")) is not None:
            check("lora_fa peak / floor peak", r, 1.05)
    context = [
        f"{name} {value:.2f}x"
        for name, value in (
            ("peft step / floor", ratio("peft", "floor")),
            ("peft peak / floor", ratio("peft", "floor", "peak_bytes")),
            ("lora_compile step / lora", ratio("lora_compile", "lora")),
        )
        if value is not None
    ]
    if context:
        lines.append("  for context: " + ", ".join(context))
    return [f"targets ({shape.name}):", *lines] if lines else []
