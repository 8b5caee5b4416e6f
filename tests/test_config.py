from __future__ import annotations

import math

import pytest

from lora_lightning import LoRAConfig
from lora_lightning.config import layer_index, name_matches
from tests.reference import scale_of


def test_defaults_scale_one_and_plain_lists():
    config = LoRAConfig(r=16, target_modules=("q_proj", "v_proj"))
    assert config.alpha == 16
    assert scale_of(config, "model.layers.0.self_attn.q_proj") == 1.0
    assert config.target_modules == ["q_proj", "v_proj"]  # tuples normalised for equality and dicts


def test_rslora_scale():
    config = LoRAConfig(r=16, alpha=32, use_rslora=True)
    assert scale_of(config, "x.q_proj") == pytest.approx(32 / math.sqrt(16))
    assert scale_of(LoRAConfig(r=16, alpha=32), "x.q_proj") == pytest.approx(2.0)


def test_dict_round_trip_is_lossless():
    config = LoRAConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        bias="lora_only",
        target_modules=r".*\.(q|v)_proj",
        exclude_modules=["lm_head"],
        rank_pattern={"v_proj": 8},
        alpha_pattern={r"layers\.1\..*": 3.0},
        modules_to_save=["score"],
        init_lora_weights="gaussian",
        init_std=0.01,
        freeze_A=True,
        adapter_dtype="float32",
    )
    data = config.to_dict()
    assert all(type(v) in (int, float, str, bool, list, dict, type(None)) for v in data.values())
    assert LoRAConfig.from_dict(data) == config


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown LoRAConfig field\(s\) \['rank'\]"):
        LoRAConfig.from_dict({"rank": 8})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"r": 0}, ValueError, "r must be a positive integer, got 0"),
        ({"r": -3}, ValueError, "r must be a positive integer, got -3"),
        ({"r": 2.5}, TypeError, "r must be a positive integer, got 2.5"),
        ({"r": "8"}, TypeError, "r must be a positive integer, got '8'"),
        ({"r": True}, TypeError, "r must be a positive integer, got True"),
        ({"alpha": 0}, ValueError, "alpha must be a positive number, got 0"),
        ({"alpha": -1.0}, ValueError, "alpha must be a positive number, got -1.0"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        ({"bias": "some"}, ValueError, "bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        ({"init_lora_weights": "orthogonal"}, ValueError, "init_lora_weights must be one of"),
        ({"target_modules": []}, ValueError, "target_modules must be a non-empty list"),
        ({"target_modules": "q_proj("}, ValueError, "target_modules 'q_proj\\(' is not a valid regular expression"),
        ({"target_modules": [1, 2]}, TypeError, "target_modules must be a string or a list of strings"),
        ({"layers_to_transform": [-1]}, ValueError, "layers_to_transform must be a non-negative integer"),
        ({"layers_to_transform": [0], "target_modules": ".*q_proj"}, ValueError, "cannot be combined with a regex"),
        ({"rank_pattern": {"q_proj": 0}}, ValueError, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"adapter_dtype": "fp8"}, ValueError, "adapter_dtype must be None or one of"),
        ({"use_rslora": "yes"}, TypeError, "use_rslora must be True or False"),
    ],
)
def test_bad_values_name_field_value_and_allowed(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoRAConfig(**kwargs)


def test_every_problem_reported_at_once():
    with pytest.raises(ValueError) as info:
        LoRAConfig(r=0, dropout=2.0, bias="x")
    text = str(info.value)
    assert "r must be" in text and "dropout must be" in text and "bias must be" in text


def test_name_rules_follow_peft():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert name_matches("q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.qq_proj", ["q_proj"])
    # a regex must match the full name
    assert name_matches("model.layers.0.self_attn.q_proj", r".*\.q_proj")
    assert not name_matches("model.layers.0.self_attn.q_proj", "q_proj")


def test_layer_index_takes_the_block_not_a_nested_index():
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("model.layers.1.experts.7.w1") == 1
    assert layer_index("transformer.h.2.attn.c_attn", ["h"]) == 2
    assert layer_index("lm_head") is None


def test_patterns_override_rank_and_alpha():
    config = LoRAConfig(r=4, alpha=8, rank_pattern={"v_proj": 16}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 16
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 2
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 8
    assert scale_of(config, "model.layers.0.self_attn.v_proj") == pytest.approx(8 / 16)


def test_a_bad_r_is_the_only_problem_reported_when_alpha_was_not_given():
    with pytest.raises(TypeError) as err:
        LoRAConfig(r=4.0)
    assert str(err.value) == "r must be a positive integer, got 4.0 (float)"
    with pytest.raises(ValueError) as err:
        LoRAConfig(r=0)
    assert str(err.value) == "r must be a positive integer, got 0"
