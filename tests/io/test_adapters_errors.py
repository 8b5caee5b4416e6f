"""Every load error names its key, module or field, and leaves the model exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.inject import lora_layers
from lora_lightning.io.adapters import export_merged, load_adapter, save_adapter
from tests.io.test_adapters import CONFIG, WEIGHTS, _adapted
from tests.models import tiny_llama

# -- errors: named, raised before anything changes ----------------------------------------------------


def _snapshot(model: nn.Module) -> tuple:
    return (
        {name: type(module) for name, module in model.named_modules()},
        {name: param.requires_grad for name, param in model.named_parameters()},
        {key: value.clone() for key, value in model.state_dict().items()},
    )


def _assert_unchanged(model: nn.Module, snapshot: tuple, plain: bool = True) -> None:
    types, flags, state = snapshot
    assert {name: type(module) for name, module in model.named_modules()} == types
    assert {name: param.requires_grad for name, param in model.named_parameters()} == flags
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert not plain or (not lora_layers(model) and "_lora_config" not in vars(model))


LAYER0_Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(tmp_path):
    """A base model with some frozen parameters (so restored flags are visible) and an adapter for it."""
    base = tiny_llama(attention_bias=True)
    config = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only", modules_to_save=["lm_head"])
    save_adapter(_adapted(base, config), tmp_path / "a")
    base.model.embed_tokens.weight.requires_grad_(False)
    return base, tmp_path / "a"


def _edit_tensors(directory: Path, edit) -> None:
    tensors = safetensors.torch.load_file(directory / WEIGHTS)
    edit(tensors)
    safetensors.torch.save_file(tensors, directory / WEIGHTS)


def _edit_config(directory: Path, **fields) -> None:
    data = json.loads((directory / CONFIG).read_text()) | fields
    (directory / CONFIG).write_text(json.dumps(data))


def _bad_shape(t):
    t[f"{LAYER0_Q}.lora_A.weight"] = torch.zeros(4, 63)


def _bad_rank(t):
    t[f"{LAYER0_Q}.lora_A.weight"], t[f"{LAYER0_Q}.lora_B.weight"] = torch.zeros(2, 64), torch.zeros(64, 2)


TENSOR_ERRORS = {
    "missing": (lambda t: t.pop(f"{LAYER0_Q}.lora_B.weight"), r"missing key .*layers\.0\.self_attn\.q_proj\.lora_B"),
    "missing-bias": (lambda t: t.pop(f"{LAYER0_Q}.base_layer.bias"), r"missing key .*q_proj\.base_layer\.bias"),
    "missing-saved-module": (lambda t: t.pop("base_model.model.lm_head.weight"), r"missing key .*lm_head\.weight"),
    "unexpected-module": (
        lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}),
        r"unexpected key .*up_proj.* is not adapted",
    ),
    "unexpected-tensor": (
        lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}),
        r"unexpected key .*model\.norm\.weight.* not trained by this adapter",
    ),
    "unknown-name": (
        lambda t: t.update({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 64)}),
        r"transformer\.h\.0\.attn\.c_attn",
    ),
    "shape": (_bad_shape, r"shape mismatch at .*q_proj\.lora_A.*\(4, 63\)"),
    "rank": (_bad_rank, r"rank mismatch at .*layers\.0\.self_attn\.q_proj\.lora_A.* rank 2.* r=4"),
    "embedding-form-on-linear": (
        lambda t: t.update({f"{LAYER0_Q}.lora_embedding_A": t.pop(f"{LAYER0_Q}.lora_A.weight")}),
        r"q_proj.* is a linear module",
    ),
    "two-adapters": (
        lambda t: t.update(
            {
                f"{LAYER0_Q}.lora_A.default.weight": t.pop(f"{LAYER0_Q}.lora_A.weight"),
                f"{LAYER0_Q}.lora_B.other.weight": t.pop(f"{LAYER0_Q}.lora_B.weight"),
            }
        ),
        r"several adapters \['default', 'other'\]",
    ),
    "nan-factor": (
        lambda t: t[f"{LAYER0_Q}.lora_B.weight"].fill_(float("nan")),
        r"key .*layers\.0\.self_attn\.q_proj\.lora_B\.weight' holds 256 NaN or inf value",
    ),
    "inf-in-saved-module": (
        lambda t: t["base_model.model.lm_head.weight"].view(-1)[7:9].fill_(float("inf")),
        r"key 'base_model\.model\.lm_head\.weight' holds 2 NaN or inf value",
    ),
    "duplicates-disagree": (
        lambda t: t.update({f"{LAYER0_Q}.lora_A.default.weight": t[f"{LAYER0_Q}.lora_A.weight"] + 1}),
        r"disagrees with another key",
    ),
}


@pytest.mark.parametrize("case", list(TENSOR_ERRORS))
def test_mismatched_tensors_fail_naming_the_key_and_leave_the_model_as_it_was(case, saved):
    base, directory = saved
    edit, message = TENSOR_ERRORS[case]
    _edit_tensors(directory, edit)
    before = _snapshot(base)
    with pytest.raises(ValueError, match=message):
        load_adapter(base, directory)
    _assert_unchanged(base, before)


def test_all_problems_are_reported_at_once(saved):
    base, directory = saved
    _edit_tensors(directory, lambda t: (t.pop(f"{LAYER0_Q}.lora_B.weight"), _bad_shape(t)))
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*missing key"):
        load_adapter(base, directory)


CONFIG_ERRORS = {
    "absent-target": ({"target_modules": ["model.layers.0.self_attn.q_prj"]}, r"q_prj.*matched no module"),
    "rank-pattern": ({"rank_pattern": {"model.layers.1.self_attn.v_proj": 8}}, r"rank mismatch at .*layers\.1.*v_proj"),
    "peft-type": ({"peft_type": "PREFIX_TUNING"}, r"peft_type must be 'LORA', got 'PREFIX_TUNING'"),
    "corda": ({"init_lora_weights": "corda"}, r"init_lora_weights='corda' is not supported"),
    "dora-without-magnitudes": ({"use_dora": True}, r"missing key .*q_proj\.lora_magnitude_vector'"),
    "layer-replication": ({"layer_replication": [[0, 2]]}, r"layer_replication=\[\[0, 2\]\] is not supported"),
    "target-parameters-without-experts": (
        {"target_parameters": ["mlp.experts"]},
        r"target_parameters entry \['mlp.experts'\] matched no fused expert parameter; this model has no fused experts",
    ),
    "lora-bias": ({"lora_bias": True}, r"lora_bias=True is not supported"),
    "trainable-tokens": ({"trainable_token_indices": [1, 2]}, r"trainable_token_indices=\[1, 2\]"),
    "unknown-field": ({"use_future_trick": "yes"}, r"unknown field use_future_trick='yes'"),
    "bad-value": ({"r": 0}, r"r must be a positive integer, got 0"),
    "null-targets": ({"target_modules": None}, r"target_modules is null"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_or_unsupported_configs_fail_naming_the_field(case, saved):
    base, directory = saved
    fields, message = CONFIG_ERRORS[case]
    _edit_config(directory, **fields)
    before = _snapshot(base)
    with pytest.raises(ValueError, match=message):
        load_adapter(base, directory)
    _assert_unchanged(base, before)


def test_harmless_fields_are_ignored(saved):
    base, directory = saved
    _edit_config(directory, megatron_core="x", inference_mode=False, qalora_group_size=64, future_flag=None)
    load_adapter(base, directory)
    assert lora_layers(base)


def test_damaged_files_fail_naming_the_file(saved, tmp_path):
    base, directory = saved
    before = _snapshot(base)
    data = (directory / WEIGHTS).read_bytes()
    for damaged in (data[: len(data) // 2], b"\x00" * 64, b"not safetensors at all"):
        (directory / WEIGHTS).write_bytes(damaged)
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors.* is not a valid safetensors file"):
            load_adapter(base, directory)
    (directory / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json.* is not valid JSON"):
        load_adapter(base, directory)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(base, tmp_path / "nowhere")
    (directory / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(base, directory)
    _assert_unchanged(base, before)


def test_pickle_adapters_are_refused_without_being_read(saved, monkeypatch):
    base, directory = saved
    (directory / WEIGHTS).rename(directory / "adapter_model.bin")

    def forbidden(*args, **kwargs):
        raise AssertionError("an adapter file was unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*pickle"):
        load_adapter(base, directory)
    _assert_unchanged(base, before)


def test_loading_onto_adapters_is_refused(saved):
    base, directory = saved
    load_adapter(base, directory)
    before = _snapshot(base)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        load_adapter(base, directory)
    _assert_unchanged(base, before, plain=False)


def test_failure_after_injection_rolls_the_model_back(saved, monkeypatch):
    base, directory = saved
    before = _snapshot(base)
    import lora_lightning.io.adapters as adapters

    def inject_then_fail(model, config):
        inject_lora(model, config)  # the model now carries adapters and is frozen
        raise RuntimeError("device lost")

    monkeypatch.setattr(adapters, "inject_lora", inject_then_fail)
    with pytest.raises(RuntimeError, match="device lost"):
        load_adapter(base, directory, trainable=True)
    _assert_unchanged(base, before)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="carries no LoRA adapters"):
        save_adapter(tiny_llama(), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    model = _adapted(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_adapter(model, tmp_path / "file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export_merged(model, tmp_path / "file")
    with pytest.raises(TypeError, match="tokenizer must have a save_pretrained"):
        export_merged(model, tmp_path / "m", tokenizer="gpt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
