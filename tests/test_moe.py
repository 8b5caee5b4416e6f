"""Mixture-of-Experts models: what gets adapted, counts, PEFT as the reference, bad input, merge."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_lightning import LoRAConfig, inject_lora, merge_and_unload
from lora_lightning.inject import lora_banks, lora_layers
from lora_lightning.merge import MergeFidelity, merge_lora, unmerge_lora
from lora_lightning.nn.experts import LoRAExperts, LoRARouter
from tests.models import tiny_llama, token_ids
from tests.moe_models import tiny_deepseek_v3, tiny_gpt_oss, tiny_mixtral, tiny_qwen3_moe
from tests.peft_reference import peft_bank_twin, peft_wrappers
from tests.reference import assert_near


def _random_B(model: torch.nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen3_moe, tiny_gpt_oss], ids=lambda b: b.__name__)
def test_all_linear_matches_peft_target_parameters_outputs_gradients_and_counts(build) -> None:
    base = build()
    ours = copy.deepcopy(base)
    report = inject_lora(ours, LoRAConfig(r=4, alpha=8))
    _random_B(ours)
    theirs = peft_bank_twin(base, ours, r=4, lora_alpha=8)
    assert report.params.trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert report.params.total == sum(p.numel() for p in theirs.parameters())
    # the experts hold most of the parameters, and they are adapted
    banks = lora_banks(ours)
    expert_params = sum(b.base_layer.get_parameter(p).numel() for b in banks.values() for p in b.projections)
    assert expert_params > 0.4 * report.params.total
    ids = token_ids(2, 12)
    out, ref = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    inner = theirs.base_model.model
    for name, bank in banks.items():
        wrappers = peft_wrappers(inner, name)
        for p in bank.projections:
            experts, rank = bank.num_experts, bank.r[p]
            gA = wrappers[p].lora_A["default"].weight.grad.reshape(experts, rank, -1)
            gB = wrappers[p].lora_B["default"].weight.grad.reshape(-1, rank, experts).permute(2, 0, 1)
            assert_near(bank.lora_A[p].grad, gA)
            assert_near(bank.lora_B[p].grad, gB)
    for name, layer in lora_layers(ours).items():
        assert_near(layer.lora_B.grad, inner.get_submodule(name).lora_B["default"].weight.grad)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)


def test_deepseek_v3_keeps_dense_and_shared_expert_adapters_beside_the_routed_bank() -> None:
    model = tiny_deepseek_v3()
    report = inject_lora(model, LoRAConfig(r=4))
    names = {m.name for m in report.modules}
    assert "model.layers.0.mlp.gate_proj" in names  # the dense first layer
    assert "model.layers.1.mlp.shared_experts.down_proj" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.2.mlp.experts.down_proj" in names
    assert not any(name.endswith("mlp.gate") or ".gate." in name for name in names), "all-linear leaves routers"
    assert isinstance(model.model.layers[1].mlp.experts, LoRAExperts)
    rows = report.rows()
    assert ("model.layers.*.mlp.experts.down_proj (x2)", "Experts(8)", "32", "64", "4") in rows


def test_explicit_forms_select_the_bank_or_one_projection() -> None:
    model = tiny_qwen3_moe()
    whole = inject_lora(copy.deepcopy(model), LoRAConfig(r=4, target_modules=["experts"]))
    assert {m.name.rsplit(".", 1)[-1] for m in whole.modules} == {"gate_up_proj", "down_proj"}
    only_down = inject_lora(
        copy.deepcopy(model), LoRAConfig(r=4, target_modules=[], target_parameters=["experts.down_proj"])
    )
    assert [m.name for m in only_down.modules] == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]
    patterned = inject_lora(
        copy.deepcopy(model),
        LoRAConfig(r=4, rank_pattern={"gate_up_proj": 8}, alpha_pattern={"layers.1.mlp.experts": 2.0}),
    )
    ranks = {m.name: (m.r, m.alpha) for m in patterned.modules}
    assert ranks["model.layers.0.mlp.experts.gate_up_proj"] == (8, 4)
    assert ranks["model.layers.1.mlp.experts.down_proj"] == (4, 2.0)
    frozen_A = copy.deepcopy(model)
    inject_lora(frozen_A, LoRAConfig(r=4, target_modules=["experts"], freeze_A=True))
    bank = lora_banks(frozen_A)["model.layers.0.mlp.experts"]
    assert not any(A.requires_grad for A in bank.lora_A.values()) and all(B.requires_grad for B in bank.lora_B.values())


def test_a_router_adapts_only_when_named_and_matches_peft() -> None:
    base = tiny_mixtral()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_parameters=["gate.weight"]))
    routers = {n: b for n, b in lora_banks(ours).items() if isinstance(b, LoRARouter)}
    assert sorted(routers) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    _random_B(ours)
    theirs = peft_bank_twin(base, ours, r=4, lora_alpha=8)
    ids = token_ids(2, 12)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


class _Unflagged(torch.nn.Module):
    """Fused experts without transformers' layout flags: a layout nobody can read off the module."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 16, 8))
        self.down_proj = torch.nn.Parameter(torch.randn(4, 8, 8))


@pytest.mark.parametrize(
    "case",
    ["unknown-layout", "experts-in-a-dense-model", "dora-on-a-bank", "pissa-on-a-bank", "router-with-dropout"],
)
def test_bad_input_fails_naming_the_module_before_any_change(case: str) -> None:
    if case == "unknown-layout":
        model = tiny_mixtral()
        model.model.layers[1].mlp.experts = _Unflagged()
        config, error, message = LoRAConfig(r=4), TypeError, r"'model.layers.1.mlp.experts' \(_Unflagged\).*layout"
    elif case == "experts-in-a-dense-model":
        model = tiny_llama()
        config = LoRAConfig(r=4, target_modules=[], target_parameters=["experts.gate_up_proj"])
        error, message = ValueError, r"\['experts.gate_up_proj'\] matched no fused expert parameter; this model has no"
    elif case == "dora-on-a-bank":
        model = tiny_qwen3_moe()
        config, error, message = LoRAConfig(r=4, use_dora=True), ValueError, r"use_dora=True cannot adapt expert bank"
    elif case == "pissa-on-a-bank":
        model = tiny_qwen3_moe()
        config = LoRAConfig(r=4, init_lora_weights="pissa", target_modules=["experts"])
        error, message = ValueError, r"init_lora_weights='pissa' cannot start expert bank 'model.layers.0.mlp.experts'"
    else:
        model = tiny_mixtral()
        config = LoRAConfig(r=4, dropout=0.1, target_parameters=["gate.weight"])
        error, message = ValueError, r"dropout=0.1 cannot apply to router 'model.layers.0.mlp.gate'"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        inject_lora(model, config)
    assert _unchanged(model, before) and not lora_layers(model) and not lora_banks(model)


def test_merge_unmerge_and_unload_on_a_moe_model() -> None:
    base = tiny_gpt_oss()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_parameters=["router.weight"]))
    _random_B(model)
    ids = token_ids(2, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        fidelity = MergeFidelity()
        merge_lora(model, fidelity)
        merged = model(input_ids=ids).logits
        torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
        assert len(fidelity.per_layer) == 8 + 2 + 2 and fidelity.worst < 1e-6
        unmerge_lora(model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=1e-7)
        merge_and_unload(model)
    assert not lora_banks(model) and type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    assert model.state_dict().keys() == base.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
