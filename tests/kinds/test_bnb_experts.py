"""4-bit expert banks: bitsandbytes' blocks per expert, the adapted 4-bit bank against float64 maths,
merge / unmerge, and quantize_model on a MoE model."""

from __future__ import annotations

import copy

import bitsandbytes.functional as F
import pytest
import torch

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.inject import lora_banks
from lora_lightning.kinds import bnb_experts
from lora_lightning.kinds.bnb_experts import quantize_bank
from lora_lightning.kinds.experts import BANK
from lora_lightning.nn.experts import LoRAExperts
from lora_lightning.nn.experts4bit import Experts4bit
from lora_lightning.quantize import quantize_model
from tests.models import token_ids
from tests.moe_models import bank_reference, routing, tiny_mixtral, tiny_qwen3_moe
from tests.reference import assert_near

METHODS = [("nf4", False), ("nf4", True), ("fp4", False)]


def _bank(layers: int = 1) -> torch.nn.Module:
    model = tiny_qwen3_moe(layers=layers)
    return next(m for n, m in model.named_modules() if n.endswith(".experts"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("quant_type", "double"), METHODS, ids=["nf4", "nf4-dq", "fp4"])
def test_each_expert_dequantizes_bit_for_bit_to_bitsandbytes_own_blocks(
    quant_type: str, double: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expert e's weight equals bitsandbytes' dequantize_4bit(quantize_4bit(W_e)), the Linear4bit of that
    expert, whole and written band by band into a buffer of another dtype."""
    monkeypatch.setattr(bnb_experts, "BAND", 24 * 64)  # 24 rows a band: 6 bands, the last one short
    bank = _bank().to(dtype)
    weights = [BANK.expert_weight(bank, "gate_up_proj", e) for e in range(BANK.num_experts(bank))]
    quantized = quantize_bank(weights, quant_type, double)
    assert quantized.codes.dtype == torch.uint8 and quantized.codes.shape == (8, 128 * 64 // 2)
    for e, weight in enumerate(weights):
        packed, state = F.quantize_4bit(
            weight.contiguous(), blocksize=64, quant_type=quant_type, compress_statistics=double
        )
        assert torch.equal(quantized.codes[e], packed.view(-1))
        expected = F.dequantize_4bit(packed, state)
        assert expected.dtype == dtype and torch.equal(quantized.dequantize(e), expected)
        buffer = torch.empty(expected.shape, dtype=torch.float64)
        assert torch.equal(quantized.dequantize(e, buffer), expected.double())
        assert not torch.equal(expected, weight)  # 4 bits: a different weight than the original


def _quantized_adapter(seed: int = 3) -> tuple[LoRAExperts, Experts4bit]:
    bank4 = Experts4bit(_bank(), "nf4", double_quant=True)
    adapter = LoRAExperts(bank4, {"gate_up_proj": (4, 8.0), "down_proj": (4, 8.0)})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for B in adapter.lora_B.values():
            B.copy_(torch.randn(B.shape, generator=generator) * 0.1)
    return adapter, bank4


def test_the_4bit_bank_drops_the_dense_weights_and_holds_a_quarter_of_the_bytes() -> None:
    dense = _bank()
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    bank4 = Experts4bit(copy.deepcopy(dense), "nf4", double_quant=True)
    held = sum(b.nbytes() for b in bank4.banks_4bit.values())
    assert not any(p.dim() == 3 for p in bank4.parameters()), "no dense bank left"
    assert held < 0.15 * dense_bytes  # 4 bits of 32, plus block scales


def test_the_adapted_4bit_bank_computes_the_float64_maths_on_the_dequantized_weights() -> None:
    adapter, bank4 = _quantized_adapter()
    index, weights = routing(12, 8, 2)
    x = torch.randn(12, 64, requires_grad=True)
    out = adapter(x, index, weights)
    # the reference on float64 copies of x and the factors, differentiated through all three
    x64 = x.detach().double().requires_grad_()
    A64 = {p: adapter.lora_A[p].detach().double().requires_grad_() for p in adapter.projections}
    B64 = {p: adapter.lora_B[p].detach().double().requires_grad_() for p in adapter.projections}
    expected = bank_reference(_Factors64(adapter, A64, B64), x64, index, weights)
    assert_near(out, expected)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(grad)
    expected.backward(grad.double())
    assert_near(x.grad, x64.grad)
    for p in adapter.projections:
        assert_near(adapter.lora_A[p].grad, A64[p].grad)
        assert_near(adapter.lora_B[p].grad, B64[p].grad)
    assert not bank4.dense, "training never forms a dense bank"


class _Factors64:
    """``adapter`` with float64 factors (what bank_reference reads), for the reference's gradients."""

    def __init__(self, adapter: LoRAExperts, A: dict, B: dict) -> None:
        self.base_layer, self.kind, self.layout = adapter.base_layer, adapter.kind, adapter.layout
        self.functions, self.num_experts, self.scale = adapter.functions, adapter.num_experts, adapter.scale
        self.lora_A, self.lora_B = A, B


def test_zero_start_is_the_4bit_banks_own_forward_and_merge_unmerge_round_trips() -> None:
    adapter, bank4 = _quantized_adapter()
    codes = {p: b.codes.clone() for p, b in bank4.banks_4bit.items()}
    index, weights = routing(12, 8, 2)
    x = torch.randn(12, 64)
    with torch.no_grad():
        adapted = adapter(x, index, weights)
        fidelity = adapter.merge(measure=True)
        merged = adapter(x, index, weights)  # the dense bank with the update in it
        assert bank4.dense and adapter.merged
        adapter.unmerge()
        again = adapter(x, index, weights)
        for B in adapter.lora_B.values():
            B.zero_()
        zero = adapter(x, index, weights)
        plain = bank4(x, index, weights)
    error_sq, update_sq = fidelity
    assert error_sq <= 1e-10 * update_sq
    assert_near(merged, adapted)
    assert not bank4.dense and torch.equal(again, adapted)
    assert all(torch.equal(b.codes, codes[p]) for p, b in bank4.banks_4bit.items()), "codes unchanged"
    assert torch.equal(zero, plain)


def test_a_merged_4bit_bank_moves_with_the_module_and_keeps_its_compute_dtype() -> None:
    """``.to(device)`` takes the dense merged bank along with the codes (a plain dict, not a buffer); a
    dtype cast of the module leaves it, and the 4-bit bank's compute dtype, as they were."""
    adapter, bank4 = _quantized_adapter()
    with torch.no_grad():
        adapter.merge()
    merged = {p: d.clone() for p, d in bank4.dense.items()}
    adapter.to(torch.bfloat16)
    assert all(d.dtype == torch.float32 and torch.equal(d, merged[p]) for p, d in bank4.dense.items())
    adapter.to("meta")
    assert bank4.dense.keys() == merged.keys()
    assert all(d.device.type == "meta" for d in bank4.dense.values())
    assert all(b.codes.device.type == "meta" for b in bank4.banks_4bit.values())
    adapter.to_empty(device="cpu")  # out of meta: storage again, contents undefined as every tensor's
    assert all(d.device.type == "cpu" and d.shape == merged[p].shape for p, d in bank4.dense.items())


def test_quantize_model_makes_the_banks_4bit_and_all_linear_trains_them() -> None:
    model = tiny_qwen3_moe()
    routers = {n: m.weight.clone() for n, m in model.named_modules() if n.endswith("mlp.gate")}
    names = quantize_model(model, "nf4")
    banks = [n for n in names if n.endswith(".experts")]
    assert banks == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(isinstance(model.get_submodule(n), Experts4bit) for n in banks)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in routers.items()), "routers stay"
    ids = token_ids(2, 12)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject_lora(model, LoRAConfig(r=4))
    assert sorted(lora_banks(model)) == banks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(
        B.grad is not None and B.grad.abs().sum() > 0 for b in lora_banks(model).values() for B in b.lora_B.values()
    )


def test_a_width_4bit_blocks_cannot_hold_and_int8_banks_are_refused_before_any_change() -> None:
    model = tiny_mixtral()  # intermediate 96: the down projection's rows are not whole 64-element blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"experts.down_proj has experts of 96 input features, not a multiple of"):
        quantize_model(model, "nf4")
    qwen = tiny_qwen3_moe()
    with pytest.raises(ValueError, match="quantize='int8': int8 cannot hold fused expert banks .* banks=False leaves"):
        quantize_model(qwen, "int8")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, Experts4bit) for m in qwen.modules())
    assert quantize_model(qwen, "int8", banks=False)  # the linear layers only, when asked
    four_bit = tiny_qwen3_moe()
    quantize_model(four_bit, "nf4")
    with pytest.raises(ValueError, match="expert bank 'model.layers.0.mlp.experts' is already 4-bit"):
        quantize_model(four_bit, "nf4")


def _trained_4bit(method: str, config: LoRAConfig):
    """A tiny Qwen3-MoE quantized with ``method``, adapted, B random: the model, ids, and its logits."""
    model = tiny_qwen3_moe()
    quantize_model(model, method)
    inject_lora(model, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        ids = token_ids(2, 12)
        return model, ids, model(input_ids=ids).logits


def test_merge_and_unload_gives_the_plain_architecture_back_holding_the_merged_weights() -> None:
    """The unloaded model's state_dict loads strict into a freshly built base and computes the adapted logits."""
    from lora_lightning.merge import merge_and_unload

    # every quantized layer adapted, so every one comes back plain
    model, ids, expected = _trained_4bit("nf4", LoRAConfig(r=4))
    merge_and_unload(model)
    plain = tiny_qwen3_moe(seed=1)
    plain.load_state_dict(model.state_dict(), strict=True)
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    with torch.no_grad():
        assert_near(plain(input_ids=ids).logits, expected)


def test_export_merged_of_a_4bit_moe_model_loads_in_plain_transformers(tmp_path) -> None:
    """Written tensor by tensor (each bank dequantized with its update added), no bitsandbytes needed to load."""
    from transformers import AutoModelForCausalLM

    from lora_lightning import export_merged

    # k, v, o stay 4-bit, unadapted
    model, ids, expected = _trained_4bit("nf4-dq", LoRAConfig(r=4, target_modules=["experts", "q_proj"]))
    directory = export_merged(model, tmp_path / "merged")
    assert "quantization_config" not in (directory / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    with torch.no_grad():
        assert_near(plain(input_ids=ids).logits, expected)


def _loaded_in_4bit(tmp_path, double_quant: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_qwen3_moe().save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map={"": "cpu"})


def test_a_model_loaded_in_4bit_gets_its_banks_quantized_at_injection_in_its_format(tmp_path) -> None:
    model = _loaded_in_4bit(tmp_path, double_quant=True)
    experts = model.model.layers[0].mlp.experts
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert experts.gate_up_proj.dtype == torch.float32, "transformers leaves the fused experts unquantized"
    dense = experts.gate_up_proj.detach().clone()
    report = inject_lora(model, LoRAConfig(r=4))
    count, before, after = report.quantized_banks
    assert count == 2 and after < 0.15 * before
    assert "expert banks: 2 quantized to 4 bits like the model's linear layers" in str(report)
    banks = lora_banks(model)
    bank4 = banks["model.layers.0.mlp.experts"].base_layer
    assert isinstance(bank4, Experts4bit) and bank4.banks_4bit["gate_up_proj"].nested
    packed, state = F.quantize_4bit(dense[3].contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(bank4.banks_4bit["gate_up_proj"].dequantize(3), F.dequantize_4bit(packed, state))
    ids = token_ids(2, 12)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(B.grad is not None for b in banks.values() for B in b.lora_B.values())


def test_quantize_banks_false_leaves_them_and_true_needs_a_4bit_model(tmp_path) -> None:
    model = _loaded_in_4bit(tmp_path, double_quant=False)
    report = inject_lora(model, LoRAConfig(r=4), quantize_banks=False)
    assert report.quantized_banks is None
    assert not any(isinstance(m, Experts4bit) for m in model.modules())
    plain = tiny_qwen3_moe()
    with pytest.raises(
        ValueError, match="quantize_banks=True: the model has no quantized bitsandbytes 4-bit linear layer"
    ):
        inject_lora(plain, LoRAConfig(r=4), quantize_banks=True)
    assert not lora_banks(plain)


def test_an_adapter_trained_over_4bit_banks_is_the_bf16_models_adapter(tmp_path) -> None:
    """The same PEFT target_parameters file: it loads onto the unquantized base, factor for factor."""
    from lora_lightning import load_adapter, save_adapter

    model, _, _ = _trained_4bit("nf4-dq", LoRAConfig(r=4, alpha=8))
    directory = save_adapter(model, tmp_path / "adapter")
    dense = tiny_qwen3_moe()
    load_adapter(dense, directory)
    ours, theirs = lora_banks(model), lora_banks(dense)
    assert sorted(ours) == sorted(theirs)
    for name, bank in ours.items():
        assert not isinstance(theirs[name].base_layer, Experts4bit)
        for p in bank.projections:
            assert torch.equal(bank.lora_A[p], theirs[name].lora_A[p])
            assert torch.equal(bank.lora_B[p], theirs[name].lora_B[p])


def test_the_export_leaves_the_live_weights_alone_and_twice_gives_the_same_file(tmp_path) -> None:
    """A float32 dense bank under a model with 4-bit linear layers: the export adds into copies."""
    import safetensors.torch

    from lora_lightning import export_merged

    model = tiny_qwen3_moe()
    quantize_model(model, "nf4", banks=False)
    inject_lora(model, LoRAConfig(r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items() if "experts.base_layer" in k}
    first = export_merged(model, tmp_path / "one")
    second = export_merged(model, tmp_path / "two")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
    one = safetensors.torch.load_file(first / "model.safetensors")
    two = safetensors.torch.load_file(second / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_4bit_bank_children_are_not_named_like_projections_and_keep_float32_scales() -> None:
    """target_modules=["down_proj"] must not find the buffers' holder; a bf16 cast keeps the block scales."""
    model = tiny_qwen3_moe()
    quantize_model(model, "nf4-dq")
    bank = model.model.layers[0].mlp.experts
    expected = bank.banks_4bit["down_proj"].dequantize(2)
    # a list meant for several families: "down_proj" names linear layers elsewhere, here nothing
    inject_lora(model, LoRAConfig(r=4, target_modules=["down_proj", "experts"], allow_unmatched_targets=True))
    assert "model.layers.0.mlp.experts" in lora_banks(model)
    bank.to(torch.bfloat16)
    quantized = bank.banks_4bit["down_proj"]
    assert quantized.absmax2.dtype == torch.float32 and quantized.code2.dtype == torch.float32
    assert torch.equal(quantized.dequantize(2), expected)


def test_the_base_fingerprint_covers_4bit_banks() -> None:
    from lora_lightning.lightning.checkpoint_record import base_tensors

    model = tiny_qwen3_moe()
    quantize_model(model, "nf4")
    names = {name for name, _ in base_tensors(model, ())}
    assert "model.layers.0.mlp.experts.quantized.gate_up_proj_4bit.codes" in names
    assert "model.layers.1.mlp.experts.quantized.down_proj_4bit.absmax" in names


def test_llama4s_linear_router_stays_a_router_under_quantize_model() -> None:
    from tests.moe_models import tiny_llama4

    model = tiny_llama4()
    names = quantize_model(model, "nf4")
    router = model.model.layers[0].feed_forward.router
    assert type(router).__name__ == "Llama4Router" and "model.layers.0.feed_forward.router" not in names
    assert isinstance(model.model.layers[0].feed_forward.experts, Experts4bit)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=token_ids(2, 12)).logits).all()


def test_auto_mode_leaves_a_bank_4bit_blocks_cannot_hold_with_a_warning(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_mixtral().save_pretrained(tmp_path / "base")  # intermediate 96: not whole 64-element blocks
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map={"": "cpu"})
    with pytest.warns(UserWarning, match=r"left unquantized: model.layers.0.mlp.experts: .*96 input features"):
        report = inject_lora(model, LoRAConfig(r=4))
    assert report.quantized_banks is None and lora_banks(model)
    assert not any(isinstance(m, Experts4bit) for m in model.modules())
