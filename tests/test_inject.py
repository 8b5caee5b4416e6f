from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, LoRALinear, inject_lora, parameter_summary
from lora_lightning.inject import lora_layers
from tests.models import BUILDERS, output_of, tiny_llama, token_ids
from tests.peft_reference import peft_config_for, peft_twin

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers Conv1D
    "bert": ["query", "value", "word_embeddings"],  # includes an embedding
}


def _randomise_B(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
            if not isinstance(layer, LoRALinear):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_outputs_equal_peft_with_same_factors(family):
    base = BUILDERS[family]()
    config = LoRAConfig(r=4, alpha=8, target_modules=TARGETS[family])
    model = copy.deepcopy(base)
    inject_lora(model, config)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(output_of(model, ids), output_of(base, ids))  # B = 0: exactly the base
    _randomise_B(model)
    twin = peft_twin(base, config, model)
    with torch.no_grad():
        ours, theirs, plain = output_of(model, ids), output_of(twin, ids), output_of(base, ids)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapters really act
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


COUNT_CASES = {
    "list": LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "all-linear": LoRAConfig(r=4, target_modules="all-linear"),
    "regex": LoRAConfig(r=4, target_modules=r".*\.(q|k)_proj"),
    "layers_to_transform": LoRAConfig(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1, 2]),
    "all-linear+layers": LoRAConfig(r=2, target_modules="all-linear", layers_to_transform=0),
    "patterns": LoRAConfig(
        r=4,
        alpha=8,
        target_modules="all-linear",
        rank_pattern={"v_proj": 16, r"layers\.0\.mlp\..*": 2},
        alpha_pattern={"o_proj": 3},
    ),
    "exclude": LoRAConfig(r=4, target_modules="all-linear", exclude_modules=["down_proj"]),
    "bias_all": LoRAConfig(r=4, target_modules=["q_proj"], bias="all"),
    "rslora": LoRAConfig(r=16, alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_counts_and_outputs_equal_peft(case):
    from peft import get_peft_model

    config = COUNT_CASES[case]
    # attention biases give the bias modes something to train
    base = tiny_llama(layers=3, attention_bias=config.bias != "none")
    model = copy.deepcopy(base)
    report = inject_lora(model, config)
    peft_model = get_peft_model(copy.deepcopy(base), peft_config_for(config, model))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (report.params.trainable, report.params.total) == (trainable, total)
    assert parameter_summary(model).trainable == trainable
    if config.bias == "all":
        assert trainable > report.adapter_params  # the biases really train too
    _randomise_B(model)
    twin = peft_twin(base, config, model)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, ids), output_of(twin, ids), rtol=1e-6, atol=1e-6)


def test_all_linear_skips_output_head_and_report_lists_modules():
    model = tiny_llama()
    report = inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    names = [m.name for m in report.modules]
    assert "lm_head" not in names and len(names) == 2 * 7
    first = report.modules[0]
    assert (first.name, first.kind, first.in_features, first.out_features, first.r) == (
        "model.layers.0.self_attn.q_proj",
        "Linear",
        64,
        64,
        4,
    )
    last_row = report.table(full=True).splitlines()[-1].split()
    assert last_row == ["model.layers.1.mlp.down_proj", "Linear", "128", "64", "4"]
    assert report.table().splitlines()[-1].split() == [
        "model.layers.*.mlp.down_proj",
        "(x2)",
        "Linear",
        "128",
        "64",
        "4",
    ]
    assert report.adapter_params == report.params.trainable


def test_all_linear_skips_the_head_of_a_wrapped_hf_model_and_conventional_heads():
    wrapper = nn.Module()
    wrapper.model = tiny_llama()
    wrapper.classifier = nn.Linear(64, 2)
    wrapper.body = nn.Sequential(nn.Linear(4, 4))
    wrapper.body.classifier = nn.Linear(4, 4)  # not a head: its parent is neither the root nor an HF model
    report = inject_lora(wrapper, LoRAConfig(r=2, target_modules="all-linear"))
    names = {m.name for m in report.modules}
    assert "model.lm_head" not in names and "classifier" not in names
    assert {"model.model.layers.0.self_attn.q_proj", "body.0", "body.classifier"} <= names


def test_all_linear_skips_a_plain_modules_head_named_by_convention():
    """Outside transformers there is no output-embeddings accessor: a child of the root named
    lm_head, head, output, score, classifier, qa_outputs or cls is the head (README documents it)."""
    for head in ("head", "output"):
        net = nn.Sequential()
        net.add_module("body", nn.Linear(8, 8))
        net.add_module(head, nn.Linear(8, 3))
        report = inject_lora(net, LoRAConfig(r=2, target_modules="all-linear"))
        assert [m.name for m in report.modules] == ["body"], head


def test_a_list_entry_that_names_no_module_is_an_error_with_the_nearest_names():
    model = tiny_llama()
    before = _state_snapshot(model)
    with pytest.raises(ValueError, match=r"entry matched no module: 'q_prj' \(nearest module names: q_proj") as err:
        inject_lora(model, LoRAConfig(target_modules=["q_prj", "v_proj"]))
    assert "allow_unmatched_targets=True" in str(err.value)
    assert _state_snapshot(model) == before
    with pytest.raises(ValueError, match=r"'self_atn.v_proj' \(nearest module names: v_proj.*self_attn.v_proj"):
        inject_lora(model, LoRAConfig(target_modules=["self_atn.v_proj", "q_proj"]))
    report = inject_lora(model, LoRAConfig(target_modules=["q_prj", "v_proj"], allow_unmatched_targets=True))
    assert {m.name.rsplit(".", 1)[-1] for m in report.modules} == {"v_proj"}


def test_reports_group_modules_by_role_across_layers():
    model = tiny_llama(layers=8)
    report = inject_lora(model, LoRAConfig(r=4, target_modules="all-linear", rank_pattern={"layers.7.mlp.up_proj": 2}))
    assert len(report.modules) == 56 and len(report.rows()) == 8  # up_proj of layer 7 has its own rank: own row
    assert report.rows()[0] == ("model.layers.*.self_attn.q_proj (x8)", "Linear", "64", "64", "4")
    assert ("model.layers.*.mlp.up_proj (x7)", "Linear", "64", "128", "4") in report.rows()
    assert ("model.layers.*.mlp.up_proj", "Linear", "64", "128", "2") in report.rows()
    assert sum(int(n.rsplit("(x", 1)[1][:-1]) if "(x" in n else 1 for n, *_ in report.rows()) == 56
    assert len(report.rows(full=True)) == 56
    assert "model.layers.*.mlp.down_proj (x8)" in report.table()


def test_summary_line_has_peft_format():
    model = tiny_llama()
    inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    line = str(parameter_summary(model))
    s = parameter_summary(model)
    assert (
        line == f"trainable params: {s.trainable:,} || all params: {s.total:,} || trainable%: {s.trainable_percent:.4f}"
    )
    assert line.startswith("trainable params: 3,584 || all params:")


def test_freezes_base_and_training_moves_only_adapters():
    torch.manual_seed(0)
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    ids = token_ids(batch=4, length=16)
    before = output_of(model, ids).detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.allclose(output_of(model, ids), before, atol=1e-4)
    state = model.state_dict()
    for key, value in base_state.items():
        adapted_key = key
        if key not in state:  # the weight now lives under the LoRA layer's base_layer
            module, _, leaf = key.rpartition(".")
            adapted_key = f"{module}.base_layer.{leaf}"
        assert torch.equal(state[adapted_key], value), key


def test_bias_modes_and_modules_to_save_train_what_they_say():
    model = BUILDERS["gpt2"]()
    inject_lora(model, LoRAConfig(r=2, target_modules=["c_attn"], bias="lora_only", modules_to_save=["ln_f"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "transformer.h.0.attn.c_proj.bias" not in trainable
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= trainable


def test_freeze_A_trains_only_B():
    model = tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], freeze_A=True))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_B"}


def test_meta_device_counts_for_llama3_8b_cost_no_memory():
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    lora = LoRAConfig(r=16, alpha=32, target_modules="all-linear")
    with torch.device("meta"):
        ours = LlamaForCausalLM(config)
        theirs = LlamaForCausalLM(config)
    report = inject_lora(ours, lora)
    assert all(p.is_meta for p in ours.parameters())
    assert report.params.trainable == 41_943_040
    assert (report.params.trainable, report.params.total) == get_peft_model(
        theirs, peft_config_for(lora)
    ).get_nb_trainable_parameters()


# -- errors: raised before the model is touched ----------------------------------------------


def _state_snapshot(model: nn.Module):
    return [(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            LoRAConfig(target_modules=["q_prj"]),
            ValueError,
            r"target_modules \['q_prj'\] matched no module; linear and embedding modules in this model end with: "
            r"embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head",
        ),
        (
            LoRAConfig(target_modules="q_proj"),
            ValueError,
            "regex 'q_proj' matched no module .a regex must match the full",
        ),
        (LoRAConfig(target_modules=["self_attn"]), TypeError, r"model.layers.0.self_attn \(LlamaAttention\)"),
        (LoRAConfig(target_modules=["input_layernorm"]), TypeError, "LlamaRMSNorm"),
        (
            LoRAConfig(target_modules=["q_proj"], layers_to_transform=[5]),
            ValueError,
            r"layers_to_transform \[5\] out of range.*0..1",
        ),
        (LoRAConfig(target_modules=["q_proj"], modules_to_save=["scor"]), ValueError, "modules_to_save entry 'scor'"),
        (
            LoRAConfig(target_modules=["embed_tokens"], freeze_A=True),
            ValueError,
            "freeze_A=True cannot adapt embedding",
        ),
    ],
)
def test_bad_targets_fail_clearly_and_leave_model_unchanged(config, error, message):
    model = tiny_llama()
    before = _state_snapshot(model)
    with pytest.raises(error, match=message):
        inject_lora(model, config)
    assert _state_snapshot(model) == before
    assert not hasattr(model, "_lora_config")


def test_double_injection_same_config_is_a_noop_and_different_config_fails():
    model = tiny_llama()
    config = LoRAConfig(r=4, target_modules=["q_proj"])
    first = inject_lora(model, config)
    factors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    again = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    assert [m.name for m in again.modules] == [m.name for m in first.modules]
    still = [p for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(factors, still, strict=True))
    before = _state_snapshot(model)
    with pytest.raises(ValueError, match="already carries LoRA adapters on 2 module.*merge_and_unload"):
        inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj"]))
    assert _state_snapshot(model) == before


def test_integer_weight_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"module '0' \(Linear\) has weight of dtype torch.int8"):
        inject_lora(model, LoRAConfig(target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)
