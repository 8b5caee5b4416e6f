"""Expert-bank adapters on disk: PEFT's target_parameters layout both ways, and the merged export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lora_lightning import LoRAConfig, export_merged, inject_lora, load_adapter, save_adapter
from lora_lightning.inject import lora_banks
from tests.models import token_ids
from tests.moe_models import tiny_deepseek_v3, tiny_gpt_oss, tiny_mixtral, tiny_qwen3_moe
from tests.peft_reference import bank_factors_as_peft

ATOL = 1e-5


def _adapted(base: torch.nn.Module, config: LoRAConfig, seed: int = 11) -> torch.nn.Module:
    model = copy.deepcopy(base)
    inject_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_ids(2, 12)).logits


@pytest.mark.parametrize(
    ("build", "config"),
    [
        (tiny_mixtral, LoRAConfig(r=4, alpha=8, target_parameters=["gate.weight"])),  # + the routers
        (tiny_qwen3_moe, LoRAConfig(r=4, alpha=8, rank_pattern={"down_proj": 8})),
        (tiny_gpt_oss, LoRAConfig(r=4, alpha=8, use_rslora=True)),
    ],
    ids=["mixtral+router", "qwen3_moe+rank_pattern", "gpt_oss+rslora"],
)
def test_peft_loads_our_bank_adapter_and_computes_our_logits(build, config: LoRAConfig, tmp_path: Path) -> None:
    base = build()
    ours = _adapted(base, config)
    expected = _logits(ours)
    directory = save_adapter(ours, tmp_path / "adapter")
    data = json.loads((directory / "adapter_config.json").read_text())
    assert data["target_parameters"] and all(
        ".experts." in p or p.endswith(".weight") for p in data["target_parameters"]
    )
    tensors = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    bank = lora_banks(ours)["model.layers.0.mlp.experts"]
    # PEFT's layout: the first declared parameter's wrapper is the inner one (.base_layer)
    inner = "base_model.model.model.layers.0.mlp.experts.base_layer"
    A, B = bank_factors_as_peft(bank, "gate_up_proj")
    torch.testing.assert_close(tensors[f"{inner}.lora_A.weight"], A, rtol=0, atol=0)
    torch.testing.assert_close(tensors[f"{inner}.lora_B.weight"], B, rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=0, atol=ATOL)


def _peft_adapter(base: torch.nn.Module, config: LoraConfig, directory: Path) -> torch.Tensor:
    """A PEFT adapter of ``config`` on ``base`` with random B, saved by PEFT; returns PEFT's logits."""
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.eval()
    peft_model.save_pretrained(directory)
    return _logits(peft_model)


def test_we_load_peft_all_linear_on_mixtral_with_its_rank_conversion_and_router(tmp_path: Path) -> None:
    """PEFT's all-linear on a transformers 5 Mixtral adapts the router and gives gate_up_proj rank 2r
    (its v4 w1 + w3 fused): the file says so in target_parameters and rank_pattern, and we follow it."""
    base = tiny_mixtral()
    expected = _peft_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), tmp_path / "peft")
    model = copy.deepcopy(base)
    report = load_adapter(model, tmp_path / "peft")
    ranks = {m.name: m.r for m in report.modules}
    assert ranks["model.layers.0.mlp.experts.gate_up_proj"] == 8 and ranks["model.layers.0.mlp.gate.weight"] == 4
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=ATOL)


def test_we_load_a_peft_target_parameters_adapter_on_gpt_oss(tmp_path: Path) -> None:
    base = tiny_gpt_oss()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], target_parameters=["experts.down_proj"])
    expected = _peft_adapter(base, config, tmp_path / "peft")
    model = copy.deepcopy(base)
    report = load_adapter(model, tmp_path / "peft")
    assert {m.name.rsplit(".", 1)[-1] for m in report.modules} == {"q_proj", "down_proj"}
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=ATOL)


def test_our_round_trip_on_deepseek_v3_dense_shared_and_routed(tmp_path: Path) -> None:
    base = tiny_deepseek_v3()
    ours = _adapted(base, LoRAConfig(r=4, alpha=8))
    expected = _logits(ours)
    directory = save_adapter(ours, tmp_path / "adapter")
    model = copy.deepcopy(base)
    report = load_adapter(model, directory, trainable=True)
    assert "model.layers.0.mlp.gate_proj" in {m.name for m in report.modules}
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    assert all(B.requires_grad for bank in lora_banks(model).values() for B in bank.lora_B.values())


def test_a_bank_factor_of_the_wrong_rank_is_refused_naming_the_key(tmp_path: Path) -> None:
    base = tiny_qwen3_moe()
    directory = save_adapter(_adapted(base, LoRAConfig(r=4, target_modules=["experts"])), tmp_path / "adapter")
    data = json.loads((directory / "adapter_config.json").read_text())
    data["r"] = 8
    (directory / "adapter_config.json").write_text(json.dumps(data))
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    with pytest.raises(ValueError, match=rf"shape mismatch at '{key}': got \(32, 64\).*needs \(64, 64\)"):
        load_adapter(model, directory)
    assert not lora_banks(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_export_merged_loads_in_plain_transformers(tmp_path: Path) -> None:
    base = tiny_qwen3_moe()
    ours = _adapted(base, LoRAConfig(r=4, alpha=8))
    expected = _logits(ours)
    directory = export_merged(ours, tmp_path / "merged")
    assert lora_banks(ours), "the export merged a copy; the adapted model stays adapted"
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=ATOL)


def _per_expert_linear(x: torch.Tensor, weight, bias, tensors: dict, key: str, scale: float) -> torch.Tensor:
    """A per-expert nn.Linear with PEFT's LoRA, from the file: ``W x + b + scale * B A x`` (float64)."""
    A = tensors[f"base_model.model.{key}.lora_A.weight"].double()
    B = tensors[f"base_model.model.{key}.lora_B.weight"].double()
    out = x @ weight.T + scale * (x @ A.T) @ B.T
    return out if bias is None else out + bias


@pytest.mark.parametrize("build", [tiny_qwen3_moe, tiny_gpt_oss], ids=["qwen3_moe", "gpt_oss"])
def test_the_per_expert_file_computes_each_experts_adapted_mlp(build, tmp_path: Path) -> None:
    """Each expert rebuilt from the per-expert file as gate / up / down linear layers (halves for Qwen3-MoE,
    even / odd rows for gpt-oss, its biases), in float64, gives what the adapted bank gives that expert."""
    ours = _adapted(build(layers=1), LoRAConfig(r=4, alpha=8, use_rslora=build is tiny_gpt_oss)).double()
    directory = save_adapter(ours, tmp_path / "adapter", experts="per_expert")
    tensors = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    data = json.loads((directory / "adapter_config.json").read_text())
    name, bank = next(iter(lora_banks(ours).items()))
    experts, base = bank.num_experts, bank.base_layer
    assert data["target_parameters"] is None and f"{name}.{experts - 1}.up_proj" in data["target_modules"]
    assert not any("base_layer" in key for key in tensors), "no fused-bank keys"
    up, down = bank.projections
    scale = bank.scale[up]
    stored = {p: getattr(base, p) for p in (up, down)}  # (E, out, in), or (E, in, out) transposed
    weights = {p: w.transpose(-2, -1) if base.is_transposed else w for p, w in stored.items()}
    biases = {p: getattr(base, f"{p}_bias", None) for p in (up, down)}
    width = weights[up].shape[1] // 2
    gate_rows, up_rows = (
        (slice(0, None, 2), slice(1, None, 2)) if build is tiny_gpt_oss else (slice(0, width), slice(width, None))
    )
    x = torch.randn(5, weights[up].shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for e in range(experts):
        fused = x.new_empty(5, 2 * width)
        for linear, rows in (("gate_proj", gate_rows), ("up_proj", up_rows)):
            bias = None if biases[up] is None else biases[up][e, rows]
            fused[:, rows] = _per_expert_linear(x, weights[up][e, rows], bias, tensors, f"{name}.{e}.{linear}", scale)
        hidden = base._apply_gate(fused)
        bias = None if biases[down] is None else biases[down][e]
        expected = _per_expert_linear(hidden, weights[down][e], bias, tensors, f"{name}.{e}.down_proj", scale)
        index, weight = torch.full((5, 1), e), torch.ones(5, 1, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(bank(x, index, weight), expected, rtol=1e-12, atol=1e-12)


def test_the_per_expert_file_writes_a_router_as_its_linear_layer_and_refuses_a_model_without_banks(
    tmp_path: Path,
) -> None:
    ours = _adapted(tiny_mixtral(layers=1), LoRAConfig(r=4, alpha=8, target_parameters=["gate.weight"]))
    directory = save_adapter(ours, tmp_path / "adapter", experts="per_expert")
    tensors = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    router = next(bank for name, bank in lora_banks(ours).items() if name.endswith(".gate"))
    A, B = (
        tensors["base_model.model.model.layers.0.mlp.gate.lora_A.weight"],
        tensors["base_model.model.model.layers.0.mlp.gate.lora_B.weight"],
    )
    assert torch.equal(A, router.lora_A["weight"][0]) and torch.equal(B, router.lora_B["weight"][0])
    with pytest.raises(ValueError, match="holds expert banks written per_expert .* experts='fused'"):
        load_adapter(tiny_mixtral(layers=1), directory)
    with pytest.raises(ValueError, match="experts must be one of fused, per_expert, got 'split'"):
        save_adapter(ours, tmp_path / "other", experts="split")
    assert not (tmp_path / "other").exists()
    plain = tiny_qwen3_moe(layers=1)
    inject_lora(plain, LoRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="this model has none adapted"):
        save_adapter(plain, tmp_path / "third", experts="per_expert")
