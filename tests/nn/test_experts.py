"""LoRAExperts: the adapted expert bank against the model's own forward and the float64 per-expert maths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.inject import lora_banks
from lora_lightning.nn.experts import LoRAExperts
from lora_lightning.ops.grouped import can_group
from tests.models import token_ids
from tests.moe_models import (
    MODELS,
    NormedExperts,
    UngatedExperts,
    bank_reference,
    own_bank,
    routing,
    tiny_gpt_oss,
    tiny_llama4,
    tiny_mixtral,
    tiny_qwen3_moe,
)
from tests.reference import assert_near


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_start_gives_the_models_own_logits_bit_for_bit(name: str) -> None:
    model = MODELS[name]()
    ids = token_ids(2, 12)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        report = inject_lora(model, LoRAConfig(r=4))
        after = model(input_ids=ids).logits
    assert lora_banks(model), "all-linear adapts the experts"
    assert any(m.kind == "Experts" for m in report.modules)
    assert torch.equal(before, after)


def _bank_of(source: str) -> nn.Module:
    """One experts module of each layout: decorated (concatenated / interleaved + transposed + biased),
    ungated, post-normed, and Llama 4's undecorated one."""
    if source == "ungated":
        return own_bank(UngatedExperts)
    if source == "post_norm":
        return own_bank(NormedExperts)
    builders = {"mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss, "qwen3_moe": tiny_qwen3_moe, "llama4": tiny_llama4}
    model = builders[source](layers=1)
    return next(m for n, m in model.named_modules() if n.endswith(".experts"))


def _randomise_B(adapter: LoRAExperts, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for B in adapter.lora_B.values():
            B.copy_(torch.randn(B.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("source", ["mixtral", "gpt_oss", "qwen3_moe", "llama4", "ungated", "post_norm"])
def test_the_bank_computes_the_float64_per_expert_formula_and_its_gradients(source: str) -> None:
    bank = _bank_of(source).requires_grad_(False)
    torch.manual_seed(0)
    adapter = LoRAExperts(bank, {p: (4, 8.0) for p in LoRAExperts.kind.layout(bank).projections})
    _randomise_B(adapter)
    hidden = adapter.kind.features(bank, adapter.projections[0])[0]
    tokens = 10
    if adapter.layout.routed:
        index, weights = routing(tokens, adapter.num_experts, 2)
        args: tuple = (index, weights)
        x = torch.randn(tokens, hidden)
    else:
        index = weights = None
        args = ()
        x = torch.randn(adapter.num_experts * tokens, hidden)
    x.requires_grad_(True)
    out = adapter(x, *args)
    grad = torch.randn_like(out)
    out.backward(grad)

    # the reference: float64 leaves for the factors and the input, the formula per token and expert
    x64 = x.detach().double().requires_grad_(True)
    with torch.no_grad():
        twin = LoRAExperts(bank.double(), {p: (adapter.r[p], adapter.alpha[p]) for p in adapter.projections}, init=None)
        for p in adapter.projections:
            twin.lora_A[p].copy_(adapter.lora_A[p])
            twin.lora_B[p].copy_(adapter.lora_B[p])
    expected = bank_reference(twin, x64, index, weights)
    expected.backward(grad.double())
    bank.float()

    assert_near(out, expected)
    assert_near(x.grad, x64.grad)
    for p in adapter.projections:
        assert_near(adapter.lora_A[p].grad, twin.lora_A[p].grad)
        assert_near(adapter.lora_B[p].grad, twin.lora_B[p].grad)
        assert adapter.lora_B[p].grad.abs().sum() > 0


class _FixedMask(nn.Dropout):
    """A dropout whose mask the test knows: the adapter must feed its output to the LoRA GEMMs only."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(0.5)
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask[: x.shape[0], : x.shape[1]]


def test_dropout_drops_the_adapter_input_only() -> None:
    bank = _bank_of("mixtral")
    adapter = LoRAExperts(bank, {"gate_up_proj": (4, 4.0)}, dropout=0.5)
    _randomise_B(adapter)
    assert isinstance(adapter.lora_dropout, nn.Dropout)
    index, weights = routing(8, adapter.num_experts, 2)
    x = torch.randn(8, 64)
    mask = (torch.rand(16, 64, generator=torch.Generator().manual_seed(5)) > 0.5).float() * 2
    adapter.lora_dropout = _FixedMask(mask)
    adapter.train()
    dropped = adapter(x, index, weights)
    adapter.eval()
    plain = adapter(x, index, weights)
    assert not torch.allclose(dropped, plain)
    # by hand: the sorted rows' adapter input is mask * x_sorted; the base sees x itself
    order = torch.sort(index.reshape(-1))[1]
    rows = x[order // 2]
    base_up = torch.stack([rows[i] @ bank.gate_up_proj[e].t() for i, e in enumerate(index.reshape(-1)[order])])
    A, B = adapter.lora_A["gate_up_proj"], adapter.lora_B["gate_up_proj"]
    lora_up = torch.stack(
        [
            (mask[i] * rows[i]) @ A[e].t() @ B[e].t() * adapter.scale["gate_up_proj"]
            for i, e in enumerate(index.reshape(-1)[order])
        ]
    )
    hidden = bank._apply_gate(base_up + lora_up)
    down = torch.stack([hidden[i] @ bank.down_proj[e].t() for i, e in enumerate(index.reshape(-1)[order])])
    weighted = down * weights.reshape(-1)[order].unsqueeze(-1)
    expected = torch.zeros_like(x).index_add_(0, order // 2, weighted)
    torch.testing.assert_close(dropped, expected, rtol=1e-5, atol=1e-6)


def test_grouped_mm_takes_contiguous_rows_and_transposed_banks() -> None:
    """The alignment rule is about strides other than the contiguous one: (S, in) rows and a bank
    stored (E, out, in) read as (E, in, out) are what the experts forward hands it."""
    rows, bank = torch.randn(24, 64), torch.randn(4, 48, 64)
    assert can_group(rows, bank.transpose(-2, -1))
    assert can_group(rows[:, :16], torch.randn(4, 16, 48))  # a column slice: rows still 16-byte strided
    assert not can_group(torch.randn(24, 2), torch.randn(4, 2, 48))  # 8-byte rows
    assert not can_group(rows.double(), bank.double().transpose(-2, -1))  # no float64 kernel
    assert not can_group(rows[:, 1:17], torch.randn(4, 16, 48))  # a base address off 16 bytes


def test_the_bank_runs_every_gemm_as_one_grouped_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Base and adapter GEMMs go through F.grouped_mm (one call per projection and factor), not a loop."""
    calls = []
    grouped = torch.nn.functional.grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return grouped(*args, **kwargs)

    bank = _bank_of("qwen3_moe")
    adapter = LoRAExperts(bank, {"gate_up_proj": (4, 4.0), "down_proj": (4, 4.0)})
    _randomise_B(adapter)
    index, weights = routing(12, adapter.num_experts, 2)
    x = torch.randn(12, 64, requires_grad=True)
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting)
    out = adapter(x, index, weights)
    out.square().sum().backward()
    assert len(calls) == 6, calls  # gate_up and down: the base, x A^T and (x A^T) B^T
    assert_near(out, bank_reference(adapter, x.detach(), index, weights))


def test_a_rank_grouped_mm_cannot_take_runs_the_per_expert_loop_and_agrees() -> None:
    """r=2 float32 rows are 8 bytes, below grouped_mm's 16-byte strides: the loop runs, same maths."""
    bank = _bank_of("qwen3_moe")
    adapter = LoRAExperts(bank, {"gate_up_proj": (2, 2.0), "down_proj": (2, 2.0)})
    _randomise_B(adapter)
    index, weights = routing(12, adapter.num_experts, 2)
    x = torch.randn(12, 64)
    out = adapter(x, index, weights)
    assert_near(out, bank_reference(adapter, x, index, weights))


def test_merge_then_unmerge_restores_the_bank_and_merged_forward_matches() -> None:
    bank = _bank_of("gpt_oss")
    original = {k: v.clone() for k, v in bank.state_dict().items()}
    adapter = LoRAExperts(bank, {"gate_up_proj": (4, 8.0), "down_proj": (4, 8.0)})
    _randomise_B(adapter)
    index, weights = routing(6, adapter.num_experts, 2)
    x = torch.randn(6, 64)
    with torch.no_grad():
        adapted = adapter(x, index, weights)
        error_sq, update_sq = adapter.merge(measure=True)
        merged = adapter(x, index, weights)  # the model's own forward over W + s B A
    assert adapter.merged and update_sq > 0 and error_sq / update_sq < 1e-12
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-6)
    # every expert's weight is the float64 formula rounded once
    for p in adapter.projections:
        for e in range(adapter.num_experts):
            exact = (
                original[p][e].double()
                + (adapter.lora_B[p][e].double() @ adapter.lora_A[p][e].double() * adapter.scale[p]).t()
            )
            torch.testing.assert_close(bank.get_parameter(p)[e].double(), exact, rtol=0, atol=1e-7)
    adapter.unmerge()
    for key, value in bank.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-7)
