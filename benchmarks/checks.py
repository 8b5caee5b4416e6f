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
from lora_lightning.inject import lora_layers, replace_submodule
from lora_lightning.nn.layers import LoRALinear

# bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3); through two decoder layers and the LM
# head the plain formula in bf16 lands 1e-2 .. 3e-2 from float32 (tiny, CPU). Ours must be as good
# as that, within RELATIVE_TOL (+ a slack for near-zero errors), and never beyond ABSOLUTE_CAP. A
# missing scale or a dropped adapter path shows up as 1e-1 or more.
RELATIVE_TOL = 1.25
ABSOLUTE_SLACK = 1e-3
ABSOLUTE_CAP = 1e-1
MERGE_MISMATCH_TOL = 1e-3


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


class PlainLoRA(nn.Module):
    """The adapted linear as plain autograd ops, ``W x + s B (A x)``: the independent reference.

    Holds the same base layer and factors as the LoRALinear it replaces (so parameter names and
    gradients line up); factors are cast to the input dtype, as any bf16 implementation would.
    """

    def __init__(self, layer: LoRALinear) -> None:
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B, self.scale = (
            layer.base_layer,
            layer.lora_A,
            layer.lora_B,
            layer.scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * (x @ self.lora_A.to(x.dtype).t()) @ self.lora_B.to(x.dtype).t()


def _plain_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    twin = copy.deepcopy(model)
    for name, layer in lora_layers(twin).items():
        replace_submodule(twin, name, PlainLoRA(layer))
    return twin.to(dtype) if dtype is not None else twin


def _errors(got: tuple, want: tuple) -> dict[str, float]:
    (logits, grads), (ref_logits, ref_grads) = got, want
    errors = {"logits": _relative_error(logits, ref_logits)}
    for factor in ("lora_A", "lora_B"):
        names = sorted(n for n in ref_grads if n.endswith(factor))
        if not names or any(n not in grads for n in names):
            raise RuntimeError(f"no gradient reached some {factor}")
        flat = [torch.cat([g[n].flatten() for n in names]) for g in (grads, ref_grads)]
        errors[factor] = _relative_error(*flat)
    return errors


def bf16_check(shape: Shape, device: torch.device) -> tuple[bool, str]:
    """lora-lightning's bf16 forward + backward and merge, against independent references.

    Reference: the plain formula (:class:`PlainLoRA`) in float32 on the same (bf16-valued) weights.
    Our relative error of logits and of the adapter gradients is set beside that of the same
    plain formula run in bf16: bf16 rounding through a network costs about 1e-2 whatever the
    implementation, so ours must stay within ``RELATIVE_TOL`` of plain bf16's (and under an
    absolute cap). B is random (not zero) and scale is 2, so the adapter path, both factors'
    gradients and the scale all show in the numbers. Checked with adapters in bf16 (default) and
    float32 (``adapter_dtype``).
    """
    header = f"== bf16 check ({shape.note}, {shape.tokens} tokens, {device.type}): rel. error vs float32 =="
    lines = [
        header,
        f"{'adapters':<9} {'':<11} {'logits':>9} {'grad A':>9} {'grad B':>9}  merge (bf16)",
    ]
    ok = True
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the reference must not run in tf32
    try:
        for adapter_dtype in (None, "float32"):
            label = adapter_dtype or "bf16"
            try:
                case_lines, passed = _bf16_case(shape, device, adapter_dtype)
            except Exception as exc:
                case_lines, passed = [f"{'':<11} FAILED: {shapes.error_text(exc)}"], False
            ok &= passed
            lines += [f"{label if i == 0 else '':<9} {line}" for i, line in enumerate(case_lines)]
            shapes.free_device_memory(device)
    finally:
        torch.set_float32_matmul_precision(previous)
    lines.append(
        f"tolerance: ours <= {RELATIVE_TOL:g} x plain bf16 + {ABSOLUTE_SLACK:g} and <= {ABSOLUTE_CAP:g};"
        f" merge vs exact sum rounded once: <= {MERGE_MISMATCH_TOL:g} of elements off, none beyond 1 bf16 ulp"
        f" + float32 error -> {'PASS' if ok else 'FAIL'}"
    )
    return ok, "\n".join(lines)


def _bf16_case(shape: Shape, device: torch.device, adapter_dtype: str | None) -> tuple[list[str], bool]:
    model = shapes.build_model(shape, device, torch.bfloat16)
    # alpha = 2r: a scale of 2, so a scale applied twice or not at all is visible
    inject_lora(model, LoRAConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS, adapter_dtype=adapter_dtype))
    generator = torch.Generator(device="cpu").manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            # Large enough that the adapter moves outputs by tens of percent: errors in it are visible.
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)
    ids = shapes.token_batch(shape, device)
    reference = _forward_backward(_plain_copy(model, torch.float32), ids)
    plain = _errors(_forward_backward(_plain_copy(model), ids), reference)
    ours = _errors(_forward_backward(model, ids), reference)
    passed = all(
        ours[k] <= min(RELATIVE_TOL * plain[k] + ABSOLUTE_SLACK, ABSOLUTE_CAP) for k in ("logits", "lora_A", "lora_B")
    )

    # Merge: the exact W + s*B@A (float64) rounded once into bf16 is what a merge should give. A sum
    # in float32 may miss it by one rounding of the result plus float32 error of the terms (which
    # counts where W and s*B@A cancel); rounding s*B@A to bf16 before adding misses it in ~30%.
    want = {name: merge_bound(layer) for name, layer in lora_layers(model).items()}
    merge_and_unload(model)
    mismatched = outside = 0
    for name, (exact, allowed) in want.items():
        got = model.get_submodule(name).weight.double()
        mismatched += int((got != exact.to(torch.bfloat16).double()).sum())
        outside += int(((got - exact).abs() > allowed).sum())
    total = sum(exact.numel() for exact, _ in want.values())
    merge_ok = mismatched <= MERGE_MISMATCH_TOL * total and outside == 0
    passed &= merge_ok

    def cells(e: dict[str, float]) -> str:
        return f"{e['logits']:9.2e} {e['lora_A']:9.2e} {e['lora_B']:9.2e}"

    return [
        f"{'ours':<11} {cells(ours)}  {mismatched}/{total} off, {outside} beyond bound  "
        f"{'ok' if passed else 'OUT OF TOLERANCE'}",
        f"{'plain bf16':<11} {cells(plain)}",
    ], passed


def merge_bound(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merged weight (float64) and how far a correct bf16 merge may land from it.

    Allowed: half a bf16 ulp of the result for its one rounding (a full ulp, for ties decided by
    the float32 sum) plus float32 rounding error of the terms, ``2^-20 (|W| + |s| |B| |A|)``.
    """
    weight, scale = layer.base_layer.weight.double(), layer.scale
    B, A = layer.lora_B.double(), layer.lora_A.double()
    exact = weight + scale * B @ A
    tiny = torch.finfo(torch.bfloat16).tiny
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(tiny)  # >= one bf16 ulp at |exact|
    terms = weight.abs() + abs(scale) * B.abs() @ A.abs()
    return exact, ulp + 2.0**-20 * terms


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
            x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
            calls = {}
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

                calls[variant] = call
            timed = shapes.time_interleaved(calls, device, warmup=3, repeats=repeats)
            results = {v: statistics.median(t) for v, t in timed.items() if not isinstance(t, str)}
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
