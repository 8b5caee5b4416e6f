"""Adapters in and out, checked through the real PEFT: it loads ours with our logits, we load its
adapters with its logits; plus our own round trip and adapter-only state."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from torch import nn

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.inject import lora_layers
from lora_lightning.io.adapters import adapter_state_dict, load_adapter, save_adapter
from tests.models import output_of, tiny_gpt2, tiny_llama, token_ids
from tests.test_inject import _randomise_B

ATOL = 1e-5
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _perturb_trained(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable non-LoRA tensor (biases, modules_to_save) so a lost one shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


def _adapted(base: nn.Module, config: LoRAConfig) -> nn.Module:
    model = copy.deepcopy(base)
    inject_lora(model, config)
    _randomise_B(model)
    _perturb_trained(model)
    return model


def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model, token_ids() if ids is None else ids)


# -- our adapter, read by PEFT ------------------------------------------------------------------------

OURS = {
    "llama-qv": (tiny_llama, {}, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])),
    "llama-rich": (
        tiny_llama,
        {"attention_bias": True},
        LoRAConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
            use_rslora=True,
            bias="all",
            modules_to_save=["lm_head"],
        ),
    ),
    "gpt2": (tiny_gpt2, {}, LoRAConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc", "wte"], bias="lora_only")),
    # 21 full names: PEFT compresses lists of 20 or more to suffixes on load; layer 2 must stay plain.
    "llama-many-targets": (tiny_llama, {"layers": 4}, LoRAConfig(r=2, layers_to_transform=[0, 1, 3])),
}


@pytest.mark.parametrize("case", list(OURS))
def test_peft_loads_our_adapter_with_our_logits(case, tmp_path):
    build, overrides, config = OURS[case]
    base = build(**overrides)
    model = _adapted(base, config)
    directory = save_adapter(model, tmp_path / "adapter")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m or "Unexpected keyword" in m], messages
    # PEFT's own loading of the same files once more: no adapter tensor missing, nothing left over.
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(directory), device="cpu"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    # What PEFT itself would save for this adapter is exactly what we wrote.
    ours = safetensors.torch.load_file(directory / WEIGHTS)
    assert set(ours) == set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    for key, tensor in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items():
        assert torch.equal(ours[key], tensor), key

    expected = _logits(model)
    assert not torch.allclose(expected, _logits(base), atol=1e-3)  # the adapter really acts
    torch.testing.assert_close(_logits(peft_model), expected, rtol=0, atol=ATOL)


def test_written_config_names_exactly_the_adapted_modules(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base").eval()  # now it has a name_or_path
    config = LoRAConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={"h.1.mlp.c_fc": 2})
    model = _adapted(base, config)
    data = json.loads((save_adapter(model, tmp_path / "a") / CONFIG).read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["base_model_name_or_path"] == str(tmp_path / "base")
    assert data["target_modules"] == sorted(lora_layers(model))
    assert (data["r"], data["lora_alpha"], data["fan_in_fan_out"]) == (4, 8, True)
    assert data["rank_pattern"] == {"transformer.h.1.mlp.c_fc": 2} and data["alpha_pattern"] == {}
    assert data["init_lora_weights"] is True and data["bias"] == "none" and data["modules_to_save"] is None
    tensors = safetensors.torch.load_file(tmp_path / "a" / WEIGHTS)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)  # (r, in)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)  # (out, r)
    assert tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"].shape == (2, 64)

    gaussian = _adapted(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    written = save_adapter(gaussian, tmp_path / "g", "my/base", task_type="SEQ_2_SEQ_LM")
    data = json.loads((written / CONFIG).read_text())
    assert data["init_lora_weights"] == "gaussian" and data["task_type"] == "SEQ_2_SEQ_LM"
    assert data["base_model_name_or_path"] == "my/base"
    assert data["fan_in_fan_out"] is False


# -- PEFT's adapter, read by us -----------------------------------------------------------------------

PEFT_CASES = {
    "llama-qv": (tiny_llama, {}, {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "llama-rslora-patterns": (
        tiny_llama,
        {},
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": "all-linear",
            "use_rslora": True,
            "rank_pattern": {"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            "alpha_pattern": {"o_proj": 3},
        },
    ),
    "llama-embedding-bias-all-modules-to-save": (
        tiny_llama,
        {"attention_bias": True},
        {
            "r": 4,
            "lora_alpha": 4,
            "target_modules": ["embed_tokens", "o_proj"],
            "bias": "all",
            "modules_to_save": ["lm_head"],
        },
    ),
    "llama-regex-saved-module-with-bias": (
        tiny_llama,
        {"attention_bias": True},
        {"r": 2, "lora_alpha": 5, "target_modules": r".*\.(k|v)_proj", "bias": "all", "modules_to_save": ["o_proj"]},
    ),
    "gpt2-conv1d-lora-only-bias": (
        tiny_gpt2,
        {},
        {
            "r": 2,
            "lora_alpha": 4,
            "target_modules": ["c_attn", "c_fc"],
            "fan_in_fan_out": True,
            "bias": "lora_only",
            "task_type": "CAUSAL_LM",
        },
    ),
}


def _peft_trained(base: nn.Module, fields: dict, directory: Path, steps: int = 3) -> nn.Module:
    """get_peft_model + a few AdamW steps on the LM loss + save_pretrained, as a PEFT user would."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**fields))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(seed=5)
    peft_model.train()
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(directory)
    return peft_model


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_trained_adapter_loads_with_peft_logits(case, tmp_path):
    build, overrides, fields = PEFT_CASES[case]
    base = build(**overrides)
    peft_model = _peft_trained(base, fields, tmp_path / "peft")
    expected = _logits(peft_model)
    assert not torch.allclose(expected, _logits(base), atol=1e-3)

    model = copy.deepcopy(base)
    report = load_adapter(model, tmp_path / "peft", trainable=True)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=ATOL)
    adapted_by_peft = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and ("default" in module.lora_A or "default" in module.lora_embedding_A)
    }
    assert {m.name for m in report.modules} == adapted_by_peft
    for name, layer in lora_layers(model).items():
        twin = peft_model.base_model.model.get_submodule(name)
        assert (layer.r, layer.scale) == (twin.r["default"], twin.scaling["default"]), name
    # Continued training trains what PEFT trained (PEFT's frozen original_module copies aside).
    peft_trainable = sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".original_module." not in n
    )
    assert report.params.trainable == peft_trainable

    frozen = copy.deepcopy(base)
    load_adapter(frozen, tmp_path / "peft")
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(_logits(frozen), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_raw_peft_state_dict_with_adapter_name_loads(prefix, tmp_path):
    """The ``.default.`` form: a PEFT model's own state_dict entries, saved as they are."""
    base = tiny_llama(attention_bias=True)
    fields = PEFT_CASES["llama-regex-saved-module-with-bias"][2] | {"target_modules": ["embed_tokens", "q_proj"]}
    peft_model = _peft_trained(base, fields, tmp_path / "peft")
    raw = {
        prefix + key.removeprefix("base_model.model."): value.contiguous()
        for key, value in peft_model.state_dict().items()
        if ".default" in key or key.endswith(".bias")
    }
    assert any(".lora_A.default.weight" in k for k in raw) and any(".lora_embedding_A.default" in k for k in raw)
    assert any(".modules_to_save.default." in k for k in raw)
    safetensors.torch.save_file(raw, tmp_path / "peft" / WEIGHTS)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_logits(model), _logits(peft_model), rtol=0, atol=ATOL)


def test_sequence_classification_head_both_ways(tmp_path):
    """PEFT's SEQ_CLS adds ["classifier", "score"] to modules_to_save; a Llama classifier has only score."""
    from transformers import LlamaForSequenceClassification

    config = tiny_llama().config
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(config).eval()
    ids, labels = token_ids(), torch.tensor([0, 2])
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert sorted(peft_model.peft_config["default"].modules_to_save) == ["classifier", "score"]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval().save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    report = load_adapter(model, tmp_path / "peft")
    assert report.modules_to_save == ["score"]
    torch.testing.assert_close(_logits(model), _logits(peft_model), rtol=0, atol=ATOL)
    # and back: our save says SEQ_CLS (the head is saved), so PEFT wraps and loads the same head
    save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG).read_text())["task_type"] == "SEQ_CLS"
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again), _logits(peft_model), rtol=0, atol=ATOL)


def test_peft_fp32_factors_on_bf16_base_stay_fp32(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    peft_model = _peft_trained(base, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, tmp_path / "peft")
    assert (
        safetensors.torch.load_file(tmp_path / "peft" / WEIGHTS)[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ].dtype
        == torch.float32
    )
    model = copy.deepcopy(base)
    report = load_adapter(model, tmp_path / "peft")
    assert report.config.adapter_dtype == "float32"
    assert all(layer.lora_A.dtype == torch.float32 for layer in lora_layers(model).values())
    torch.testing.assert_close(_logits(model).float(), _logits(peft_model).float(), rtol=0.02, atol=0.02)


# -- our round trip, and adapter-only state -----------------------------------------------------------


def test_round_trip_restores_config_weights_and_trainable_flags(tmp_path):
    base = tiny_llama(attention_bias=True)
    config = LoRAConfig(r=4, target_modules=["q_proj", "up_proj"], bias="lora_only", freeze_A=True, init_std=0.05)
    model = _adapted(base, config)
    save_adapter(model, tmp_path / "a")
    loaded = copy.deepcopy(base)
    report = load_adapter(loaded, tmp_path / "a", trainable=True)
    assert report.config == config  # our own fields (freeze_A, init_std) travel in the file metadata
    assert torch.equal(_logits(loaded), _logits(model))
    flags = {n: p.requires_grad for n, p in loaded.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(layer.lora_A.requires_grad for layer in lora_layers(loaded).values())  # freeze_A kept
    # A later inject_lora with the same config (a Lightning setup) is a no-op.
    assert inject_lora(loaded, config).config == config


def test_json_edit_wins_over_stale_metadata(tmp_path):
    model = _adapted(tiny_llama(), LoRAConfig(r=4, alpha=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    data = json.loads((tmp_path / "a" / CONFIG).read_text())
    data["lora_alpha"] = 12  # edited by hand after saving
    (tmp_path / "a" / CONFIG).write_text(json.dumps(data))
    loaded = tiny_llama()
    report = load_adapter(loaded, tmp_path / "a")
    assert report.config.alpha == 12 and all(m.scale == 3 for m in report.modules)


def test_adapter_state_dict_holds_exactly_what_trains(tmp_path):
    class Wrapper(nn.Module):  # the shape of a LightningModule holding a transformers model
        def __init__(self, model):
            super().__init__()
            self.model = model

    base = tiny_llama(attention_bias=True)
    config = LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"], bias="all", modules_to_save=["lm_head"])
    wrapper = Wrapper(copy.deepcopy(base))
    inject_lora(wrapper.model, config)
    _randomise_B(wrapper)
    _perturb_trained(wrapper)
    state = adapter_state_dict(wrapper)
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all(k.startswith("model.") for k in state)
    # adapter-only checkpoint: loads non-strictly into another adapted copy and restores the outputs
    other = Wrapper(copy.deepcopy(base))
    inject_lora(other.model, config)
    result = other.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and not set(result.missing_keys) & trainable
    torch.testing.assert_close(_logits(other.model), _logits(wrapper.model), rtol=0, atol=0)
    # save_adapter names keys relative to the adapted transformers model, so PEFT loads it into the bare base
    save_adapter(wrapper, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(peft_model), _logits(wrapper.model), rtol=0, atol=ATOL)
