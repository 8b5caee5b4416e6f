"""torch.compile traces the adapter as one graph (no break inside it) and computes what eager does.

The "aot_eager" backend runs Dynamo and AOTAutograd (the parts that would break the graph or
trace the custom backward) without Inductor's code generation, so these checks stay fast on CPU.
The Inductor-compiled model is timed in benchmarks/step.py (variant ``lora_compile``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.inject import lora_layers
from lora_lightning.nn.layers import LoRALinear
from tests.models import tiny_llama, token_ids

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(module: nn.Module, *extra: torch.Tensor) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters() if p.requires_grad] + [t.grad for t in extra]


@pytest.mark.parametrize("freeze_A", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_linear_forward_backward_is_one_graph_equal_to_eager(freeze_A, with_bias):
    torch.manual_seed(0)
    eager = LoRALinear(nn.Linear(24, 16, bias=with_bias), r=4, alpha=8)
    with torch.no_grad():
        eager.lora_B.normal_()  # nonzero, so both factors get gradients
    eager.base_layer.requires_grad_(False)
    eager.lora_A.requires_grad_(not freeze_A)
    twin = copy.deepcopy(eager)
    x = torch.randn(2, 5, 24, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 5, 16)

    # fullgraph=True raises on any graph break, so passing means the adapter traces as one graph
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    out, out_compiled = eager(x), compiled(x_twin)
    out.backward(grad)
    out_compiled.backward(grad)

    torch.testing.assert_close(out_compiled, out, rtol=1e-6, atol=1e-6)
    got, want = _grads(twin, x_twin), _grads(eager, x)
    assert len(got) == (2 if freeze_A else 3)  # lora_B (+ lora_A) + the input
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_lora_linear_under_autocast_compiles_fullgraph():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = layer(x), compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same bf16 ops in the same order


def test_adapted_llama_traces_as_one_graph():
    model = tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=TARGETS))
    model.train()
    explanation = torch._dynamo.explain(model)(input_ids=token_ids(), labels=token_ids())
    reasons = [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_compiled_adapted_llama_matches_eager_forward_and_adapter_grads():
    torch.manual_seed(0)
    eager = tiny_llama()
    inject_lora(eager, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for layer in lora_layers(eager).values():
            layer.lora_B.normal_(std=0.1)
    eager.train()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    ids = token_ids()

    out = eager(input_ids=ids, labels=ids)
    out_compiled = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    out_compiled.loss.backward()

    torch.testing.assert_close(out_compiled.logits, out.logits, rtol=1e-5, atol=1e-5)
    twin_layers = lora_layers(twin)
    assert twin_layers.keys() == lora_layers(eager).keys() and len(twin_layers) == 2 * 7
    for name, layer in lora_layers(eager).items():
        for factor in ("lora_A", "lora_B"):
            want = getattr(layer, factor).grad
            got = getattr(twin_layers[name], factor).grad
            assert want is not None and want.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
