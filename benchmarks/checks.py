"""The checks beside the step table: bf16 correctness, merge timing, one-layer timing, Lightning overhead.

Each function returns printable text (and the bf16 check a verdict) and catches its own errors, so
one failing part never stops the rest of a benchmark run.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict

import shapes
import torch
from shapes import RANK, TARGETS, Shape
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, merge_and_unload
from lora_lightning.inject import lora_layers
from lora_lightning.layers import LoRALinear

# bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3); through two decoder layers and the
# LM head the relative error of logits and adapter gradients measured 4e-3 .. 1.2e-2 (tiny, CPU).
# A missing scale, a dropped adapter path or a gradient summed in bf16 shows up as 1e-1 or more.
OUTPUT_TOL = 2e-2
GRAD_TOL = 3e-2


def combine_rounds(rows: list[dict]) -> list[dict]:
    """Several rounds of one variant -> one row: median of the round medians, spread covering them."""
    merged: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        good = [r for r in mine if "error" not in r]
        if not good:
            merged[variant] = mine[0]
            continue
        medians = [r["ms"] for r in good]
        row = dict(good[0])
        row["ms"] = statistics.median(medians)
        row["ms_spread"] = max(max(r["ms_spread"] for r in good), (max(medians) - min(medians)) / 2)
        row["peak_bytes"] = max(r["peak_bytes"] for r in good)
        if "step_bytes" in row:
            row["step_bytes"] = max(r["step_bytes"] for r in good)
        merged[variant] = row
    return list(merged.values())


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _forward_backward(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.detach().float() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), grads


def bf16_check(shape: Shape, device: torch.device) -> tuple[bool, str]:
    """Adapted bf16 model vs a float32 copy of the same weights: logits, adapter grads, merge.

    Adapter B factors are random (not zero), so the adapter path and both factors' gradients are
    exercised. Checked with adapters in bf16 (the default) and in float32 (``adapter_dtype``).
    """
    header = f"== bf16 check ({shape.note}, {shape.tokens} tokens, {device.type}): rel. error vs float32 copy =="
    lines = [header, f"{'adapters':<9} {'logits':>9} {'grad A':>9} {'grad B':>9} {'worst layer':>11}  merge"]
    ok = True
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the reference must not run in tf32
    try:
        for adapter_dtype in (None, "float32"):
            label = adapter_dtype or "bf16"
            try:
                line, passed = _bf16_case(shape, device, adapter_dtype)
            except Exception as exc:
                line, passed = f"FAILED: {shapes.error_text(exc)}", False
            ok &= passed
            lines.append(f"{label:<9} {line}")
            shapes.free_device_memory(device)
    finally:
        torch.set_float32_matmul_precision(previous)
    lines.append(
        f"tolerance: logits <= {OUTPUT_TOL:g}, adapter grads <= {GRAD_TOL:g}, merge bit-exact"
        f" -> {'PASS' if ok else 'FAIL'}"
    )
    return ok, "\n".join(lines)


def _bf16_case(shape: Shape, device: torch.device, adapter_dtype: str | None) -> tuple[str, bool]:
    model = shapes.build_model(shape, device, torch.bfloat16)
    inject_lora(model, LoRAConfig(r=RANK, alpha=RANK, target_modules=TARGETS, adapter_dtype=adapter_dtype))
    generator = torch.Generator(device="cpu").manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            # Large enough that the adapter moves outputs by tens of percent: errors in it are visible.
            b = torch.randn(layer.lora_B.shape, generator=generator) * 0.2
            layer.lora_B.copy_(b)
    reference = copy.deepcopy(model).float()
    ids = shapes.token_batch(shape, device)
    logits, grads = _forward_backward(model, ids)
    ref_logits, ref_grads = _forward_backward(reference, ids)
    del reference

    errors = {"logits": _relative_error(logits, ref_logits)}
    per_layer = []
    for factor in ("lora_A", "lora_B"):
        names = sorted(n for n in ref_grads if n.endswith(factor))
        if not names:
            raise RuntimeError(f"no gradient reached any {factor}")
        got = torch.cat([grads[n].flatten() for n in names])
        want = torch.cat([ref_grads[n].flatten() for n in names])
        errors[factor] = _relative_error(got, want)
        per_layer += [_relative_error(grads[n], ref_grads[n]) for n in names]
    worst = max(per_layer)

    # Merge: W + s*B@A summed in float32, rounded once into bf16; compare with that formula.
    want = {
        name: (layer.base_layer.weight.float() + layer.scale * layer.lora_B.float() @ layer.lora_A.float()).to(
            torch.bfloat16
        )
        for name, layer in lora_layers(model).items()
    }
    merge_and_unload(model)
    mismatched = sum(
        int((model.get_submodule(name).weight != w).sum()) for name, w in want.items()
    )  # elements not equal to the once-rounded sum
    total = sum(w.numel() for w in want.values())
    passed = errors["logits"] <= OUTPUT_TOL and max(errors["lora_A"], errors["lora_B"]) <= GRAD_TOL
    passed &= mismatched == 0
    line = (
        f"{errors['logits']:9.2e} {errors['lora_A']:9.2e} {errors['lora_B']:9.2e} {worst:11.2e}  "
        f"{mismatched}/{total} differ  {'ok' if passed else 'OUT OF TOLERANCE'}"
    )
    return line, passed


def _randomise_factors(model: nn.Module, std: float = 1e-3) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=std)
            elif hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.normal_(std=std)


def merge_timing(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int = 3) -> str:
    """merge_and_unload of the whole model: lora-lightning (bf16 / float32 adapters) vs PEFT.

    One base model is adapted, merged and unloaded again and again (the base weights drift,
    which does not change the work); the three tools alternate so drift and clocks hit all alike.
    """
    lines = [f"== merge_and_unload, {shape.note} ({shape.layers} layers, {len(TARGETS)} targets, r={RANK}), ms =="]
    try:
        from peft import LoraConfig, get_peft_model

        model = shapes.build_model(shape, device, dtype).requires_grad_(False)
        times: dict[str, list[float]] = {"lora-lightning": [], "lora-lightning fp32": [], "peft": []}
        for _ in range(repeats):
            for tool in times:
                if tool == "peft":
                    adapted = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
                    unload = adapted.merge_and_unload
                else:
                    adapter_dtype = "float32" if tool.endswith("fp32") else None
                    inject_lora(
                        model, LoRAConfig(r=RANK, alpha=RANK, target_modules=TARGETS, adapter_dtype=adapter_dtype)
                    )
                    adapted = model

                    def unload(m=model):
                        return merge_and_unload(m)

                _randomise_factors(adapted)
                shapes.synchronize(device)
                t0 = time.perf_counter()
                model = unload()
                shapes.synchronize(device)
                times[tool].append((time.perf_counter() - t0) * 1e3)
                del adapted, unload
        peft_ms = statistics.median(times["peft"])
        for tool, values in times.items():
            median = statistics.median(values)
            runs = ", ".join(f"{v:.1f}" for v in values)
            lines.append(f"{tool:<22} {median:8.1f} ms  x peft {median / peft_ms:5.2f}   (runs: {runs})")
        del model
    except Exception as exc:
        lines.append(f"FAILED: {shapes.error_text(exc)}")
    shapes.free_device_memory(device)
    return "\n".join(lines)


def _linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    head_dim = shape.hidden // shape.heads
    return {
        "q/o_proj": (shape.hidden, shape.hidden),
        "k/v_proj": (shape.hidden, shape.kv_heads * head_dim),
        "gate/up_proj": (shape.hidden, shape.intermediate),
        "down_proj": (shape.intermediate, shape.hidden),
    }


def layer_timing(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int = 20) -> str:
    """Forward + backward of one linear at the model's token count: frozen vs adapted, per shape.

    Isolates the adapter's cost from the rest of the model (attention, norms, loss): the step
    table's gap to the floor is the sum of these gaps over the adapted layers.
    """
    tokens = shape.batch * shape.seq
    lines = [
        f"== one linear, forward+backward, {tokens} tokens, {str(dtype).removeprefix('torch.')}, ms (x frozen) ==",
        f"{'layer (in->out)':<28} {'frozen':>8} {'lora':>14} {'lora_fa':>14} {'peft':>14}",
    ]
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        get_peft_model = None
    for label, (d_in, d_out) in _linear_shapes(shape).items():
        try:
            results = {}
            x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
            for variant in ("frozen", "lora", "lora_fa", "peft"):
                with torch.device(device):
                    base = nn.Linear(d_in, d_out, bias=False, dtype=dtype).requires_grad_(False)
                if variant == "frozen":
                    layer = base
                elif variant == "peft":
                    if get_peft_model is None:
                        continue
                    holder = nn.Sequential(OrderedDict(proj=base))
                    layer = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["proj"]))
                else:
                    layer = LoRALinear(base, RANK, RANK)
                    layer.lora_A.requires_grad_(variant != "lora_fa")

                def call(layer=layer, x=x, grad=grad):
                    layer(x).backward(grad)
                    x.grad = None
                    for p in layer.parameters():
                        p.grad = None

                times = shapes.time_calls(call, device, warmup=3, repeats=repeats)
                results[variant] = statistics.median(times)
            frozen = results["frozen"]
            cells = [f"{frozen:8.3f}"] + [
                f"{results[v]:8.3f} ({results[v] / frozen:4.2f})" if v in results else f"{'-':>14}"
                for v in ("lora", "lora_fa", "peft")
            ]
            lines.append(f"{f'{label} ({d_in}->{d_out})':<28} " + " ".join(cells))
        except Exception as exc:
            lines.append(f"{label:<28} FAILED: {shapes.error_text(exc)}")
        shapes.free_device_memory(device)
    return "\n".join(lines)
