from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lightning.nn.layers import LoRAEmbedding, LoRALinear
from lora_lightning.ops import lora_linear as kernels
from lora_lightning.ops.lora_linear import lora_linear
from tests.reference import lora_delta, lora_linear_reference


def _f64(*shape, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_fused_backward_gradcheck_float64(with_bias, weight_trains):
    x = _f64(2, 3, 5, seed=1)
    w = _f64(4, 5, requires_grad=weight_trains, seed=2)
    b = _f64(4, seed=3) if with_bias else None
    a = _f64(3, 5, seed=4)
    bb = _f64(4, 3, seed=5)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 0.7), (x, w, b, a, bb))


def test_fused_backward_gradcheck_with_separate_adapter_input():
    x, xl = _f64(6, 5, seed=1), _f64(6, 5, seed=9)
    w, a, bb = _f64(4, 5, seed=2), _f64(3, 5, seed=4), _f64(4, 3, seed=5)
    assert torch.autograd.gradcheck(lambda x, w, a, bb, xl: lora_linear(x, w, None, a, bb, 1.3, xl), (x, w, a, bb, xl))


def test_fused_equals_plain_formula_forward_and_grads():
    x = _f64(3, 7, 16, seed=1)
    w, b = _f64(8, 16, requires_grad=False, seed=2), _f64(8, seed=3)
    a, bb = _f64(4, 16, seed=4), _f64(8, 4, seed=5)
    grad = _f64(3, 7, 8, requires_grad=False, seed=6)
    outs, grads = [], []
    for fn in (lora_linear, lora_linear_reference):
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b, a, bb)]
        out = fn(*inputs, 0.5)
        out.backward(grad)
        outs.append(out)
        grads.append([t.grad for t in inputs])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads[0], grads[1], strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _adapted_linear(base: nn.Module, r=4, alpha=8.0, **kw) -> LoRALinear:
    layer = LoRALinear(base, r=r, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_linear_starts_at_base_output_and_follows_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B is zero: exactly the base model
    with torch.no_grad():
        layer.lora_B.normal_()
    want = x.double() @ base.weight.double().t() + base.bias.double()
    want += 2.0 * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_conv1d_weight_is_handled_transposed():
    torch.manual_seed(0)
    base = Conv1D(nf=8, nx=16)  # weight (in=16, out=8)
    nn.init.normal_(base.weight)
    layer = _adapted_linear(base)
    assert (layer.in_features, layer.out_features) == (16, 8)
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)
    x = torch.randn(2, 3, 16)
    want = base(x) + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), want)
    before = base.weight.detach().clone()
    layer.merge()  # Conv1D stores (in, out): the update lands transposed
    torch.testing.assert_close(base.weight, before + lora_delta(layer.lora_A, layer.lora_B, layer.scale).t())


def test_kaiming_and_gaussian_init():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 8), r=64, alpha=64)
    bound = 1 / 256**0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    gauss = LoRALinear(nn.Linear(256, 8), r=64, alpha=64, init="gaussian", init_std=0.05)
    assert gauss.lora_A.std().item() == pytest.approx(0.05, rel=0.1)
    assert torch.count_nonzero(gauss.lora_B) == 0


def test_bf16_base_with_float32_adapters_computes_in_activation_dtype():
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = _adapted_linear(base, dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16
    # float32 reference of the same math: bf16 tolerance
    ref = lora_linear_reference(
        x.detach().float(), base.weight.float(), base.bias.float(), layer.lora_A, layer.lora_B, 2
    )
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("upcast", [False, True], ids=["native-bf16", "cpu-without-bf16"])
def test_bf16_on_a_cpu_without_native_bf16_multiplies_in_float32_and_rounds_once(monkeypatch, upcast):
    # which CPU this is decides the path; both are forced here so each is checked on any CPU
    monkeypatch.setattr(kernels, "_CPU_UPCAST", frozenset({torch.bfloat16}) if upcast else frozenset())
    torch.manual_seed(0)
    n, d_in, d_out, r, scale = 32, 96, 80, 4, 0.5
    x = torch.randn(n, d_in, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = torch.randn(d_out, d_in, dtype=torch.bfloat16), torch.randn(d_out, dtype=torch.bfloat16)
    A = torch.randn(r, d_in, requires_grad=True)
    B = torch.randn(d_out, r, requires_grad=True)
    g = torch.randn(n, d_out, dtype=torch.bfloat16)
    out = lora_linear(x, weight, bias, A, B, scale)
    out.backward(g)
    assert out.dtype == x.grad.dtype == torch.bfloat16 and A.grad.dtype == B.grad.dtype == torch.float32

    d = [t.detach().double() for t in (x, weight, bias, A, B, g)]
    x64, w64, b64, A64, B64, g64 = d
    ref = x64 @ w64.t() + b64 + scale * (x64 @ A64.t()) @ B64.t()
    ref_dx = g64 @ w64 + scale * (g64 @ B64) @ A64
    ref_dA, ref_dB = scale * (g64 @ B64).t() @ x64, scale * g64.t() @ (x64 @ A64.t())
    if upcast:
        # float32 GEMMs on the bf16 values, one rounding to bf16: within half a bf16 ulp (2^-8 relative)
        for got, want in ((out, ref), (x.grad, ref_dx)):
            assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-4).all()
        torch.testing.assert_close(A.grad.double(), ref_dA, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(B.grad.double(), ref_dB, rtol=1e-5, atol=1e-4)
    else:  # nothing cast: the bf16 GEMMs, bit for bit
        Ab, Bb = A.detach().bfloat16(), B.detach().bfloat16()
        assert torch.equal(
            out, torch.addmm(bias, x.detach(), weight.t()).addmm_(x.detach() @ Ab.t(), Bb.t(), alpha=scale)
        )
        assert torch.equal(x.grad, (g @ weight).addmm_(g @ Bb, Ab, alpha=scale))


def test_autocast_bf16_runs_lora_in_bf16_and_keeps_factor_dtypes():
    torch.manual_seed(0)
    layer = _adapted_linear(nn.Linear(32, 16))
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), layer.eval()(x).detach(), rtol=3e-2, atol=3e-2)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = _adapted_linear(nn.Linear(64, 64), dropout=0.5)
    x = torch.randn(8, 64)
    layer.eval()
    no_dropout = lora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, 2)
    torch.testing.assert_close(layer(x), no_dropout)
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), no_dropout)
    # the base path is never dropped: the difference to the base output is the adapter path alone
    out = layer(x)
    assert out.requires_grad


def _saved_activation_bytes(fn, params: set[int]) -> int:
    """Bytes of tensors autograd saves for backward, leaving out parameters (they are stored anyway)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    seen, total = set(), 0
    for t in saved:
        if t.untyped_storage().data_ptr() in params:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


@pytest.mark.parametrize("freeze_A", [False, True])
def test_saves_only_the_input_and_x_at_a_transposed(freeze_A):
    torch.manual_seed(0)
    n, d_in, d_out, r = 64, 128, 96, 8
    layer = _adapted_linear(nn.Linear(d_in, d_out), r=r)
    layer.base_layer.requires_grad_(False)
    layer.lora_A.requires_grad_(not freeze_A)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    x = torch.randn(n, d_in, requires_grad=True)
    saved = _saved_activation_bytes(lambda: layer(x), params)
    x_bytes, xa_bytes = n * d_in * 4, n * r * 4
    # default: x (needed for dA, shared with whatever else saves it) + x A^T; LoRA-FA: x A^T only
    assert saved == (xa_bytes if freeze_A else x_bytes + xa_bytes)


def test_merge_is_idempotent_and_unmerge_restores():
    torch.manual_seed(0)
    layer = _adapted_linear(nn.Linear(16, 8))
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 16)
    adapted = layer(x)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(once, original + lora_delta(layer.lora_A, layer.lora_B, layer.scale))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)


def test_merge_in_bf16_rounds_once_from_float32():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = _adapted_linear(base, dtype=torch.float32)
    want = (base.weight.float() + lora_delta(layer.lora_A, layer.lora_B, layer.scale)).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, want)


def test_embedding_adapter():
    torch.manual_seed(0)
    base = nn.Embedding(20, 12, padding_idx=0)
    layer = LoRAEmbedding(base, r=4, alpha=8)
    ids = torch.tensor([[0, 3, 7], [19, 2, 2]])
    assert torch.equal(layer(ids), base(ids))  # A is zero: exactly the base
    with torch.no_grad():
        layer.lora_A.normal_()
    want = base.weight[ids] + 2.0 * layer.lora_A.t()[ids] @ layer.lora_B.t()
    torch.testing.assert_close(layer(ids), want)
    adapted = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), adapted)


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
def test_merge_in_bf16_is_the_once_rounded_exact_sum(factor_dtype):
    # The exact W + s*B@A (float64) rounded once into bf16; a merge that rounds the product to bf16
    # first and then adds misses it in about a third of the elements here.
    torch.manual_seed(0)
    base = nn.Linear(96, 64).to(torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=4.0, dtype=factor_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    B, A = layer.lora_B.double(), layer.lora_A.double()
    exact = base.weight.double() + layer.scale * B @ A
    want = exact.to(torch.bfloat16)
    layer.merge()
    got = layer.base_layer.weight
    # one bf16 rounding of the result, plus float32 error of the terms (matters where they cancel)
    allowed = torch.finfo(torch.bfloat16).eps * exact.abs() + 2.0**-20 * (
        base.weight.double().abs() + layer.scale * B.abs() @ A.abs()
    )
    assert ((got.double() - exact).abs() <= allowed).all()
    assert (got != want).float().mean() <= 1e-3  # and almost always exactly the once-rounded sum
    double_rounded = base.weight + (layer.scale * layer.lora_B.float() @ layer.lora_A.float()).to(torch.bfloat16)
    assert (double_rounded != want).float().mean() > 0.05  # the check can tell the difference


def test_adapted_model_runs_forward_and_backward_on_the_meta_device():
    """Autocast does not know the meta device; the layers must not ask it (benchmarks/traffic.py relies on this)."""
    from lora_lightning import LoRAConfig, inject_lora
    from tests.models import tiny_llama

    with torch.device("meta"):
        model = tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]))
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    for _ in range(2):  # the second forward runs the settled groups of layers reading one input
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.logits.shape == (2, 8, model.config.vocab_size) and out.logits.device.type == "meta"
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.grad.shape == layer.lora_A.shape and layer.lora_A.grad.device.type == "meta"
