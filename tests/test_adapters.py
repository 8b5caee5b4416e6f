"""Adapters in and out, checked through the real libraries: PEFT loads ours, we load PEFT's, and
transformers' Auto classes load the merged export."""

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

from lora_lightning import LoRAConfig, LoRAEmbedding, LoRALinear, inject_lora, merge_and_unload
from lora_lightning.adapters import adapter_state_dict, export_merged, load_adapter, save_adapter
from lora_lightning.inject import lora_layers
from tests.models import VOCAB, output_of, tiny_gpt2, tiny_llama, token_ids
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


# -- merged export ------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adds a low rank update to a frozen weight matrix.",
    "A merged model is an ordinary checkpoint that plain transformers loads.",
    "Adapters are small, so they are cheap to store and to share.",
]


def _tokenizer():
    """A real byte-level BPE tokenizer, trained offline on a few sentences, with at most VOCAB ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"]))
    assert tokenizer.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_merged_loads_with_auto_classes(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]()
    targets = {"llama": ["q_proj", "v_proj", "gate_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "wte"]}[family]
    model = _adapted(base, LoRAConfig(r=4, alpha=8, target_modules=targets))
    tokenizer = _tokenizer()
    ids = torch.tensor([tokenizer(SENTENCES[1])["input_ids"]])
    expected = _logits(model, ids)

    directory = export_merged(model, tmp_path / "merged", tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(directory)
    assert reloaded_tokenizer(SENTENCES[1])["input_ids"] == ids[0].tolist()
    assert type(loaded) is type(base) and not lora_layers(loaded)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=ATOL)
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-3)
    keys = safetensors.torch.load_file(directory / "model.safetensors")
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    # a copy was merged: the model keeps its adapters and its outputs
    assert len(lora_layers(model)) > 0 and torch.equal(_logits(model, ids), expected)


def test_export_merged_in_place_leaves_a_plain_model(tmp_path):
    model = _adapted(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    expected = _logits(model)
    export_merged(model, tmp_path / "m", in_place=True)
    assert not lora_layers(model) and not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=ATOL)


class TinyNet(nn.Module):
    """Not a transformers model: an embedding, an MLP, and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(ids)))


def test_export_merged_plain_module_loads_strict_into_a_fresh_one(tmp_path):
    torch.manual_seed(0)
    base = TinyNet()
    model = _adapted(base, LoRAConfig(r=4, target_modules=["mlp.0", "mlp.2"]))
    ids = torch.randint(0, 32, (3, 5))
    with torch.no_grad():
        expected = model(ids)
    directory = export_merged(model, tmp_path / "merged")
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors"]
    fresh = TinyNet()
    fresh.load_state_dict(safetensors.torch.load_file(directory / "model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=ATOL)
        assert not torch.allclose(base(ids), expected, atol=1e-3)


# -- errors: named, raised before anything changes ----------------------------------------------------


def _snapshot(model: nn.Module) -> tuple:
    return (
        {name: type(module) for name, module in model.named_modules()},
        {name: param.requires_grad for name, param in model.named_parameters()},
        {key: value.clone() for key, value in model.state_dict().items()},
    )


def _assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    types, flags, state = snapshot
    assert {name: type(module) for name, module in model.named_modules()} == types
    assert {name: param.requires_grad for name, param in model.named_parameters()} == flags
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert not lora_layers(model) and "_lora_config" not in vars(model)


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
    "pissa": ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported"),
    "dora": ({"use_dora": True}, r"use_dora=True is not supported"),
    "layer-replication": ({"layer_replication": [[0, 2]]}, r"layer_replication=\[\[0, 2\]\] is not supported"),
    "target-parameters": ({"target_parameters": ["mlp.experts"]}, r"target_parameters=\['mlp.experts'\]"),
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
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*pickle"):
        load_adapter(base, directory)


def test_loading_onto_adapters_is_refused(saved):
    base, directory = saved
    load_adapter(base, directory)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        load_adapter(base, directory)


def test_failure_after_injection_rolls_the_model_back(saved, monkeypatch):
    base, directory = saved
    before = _snapshot(base)
    import lora_lightning.adapters as adapters

    def inject_then_fail(model, config):
        inject_lora(model, config)  # the model now carries adapters and is frozen
        raise RuntimeError("device lost")

    monkeypatch.setattr(adapters, "inject_lora", inject_then_fail)
    with pytest.raises(RuntimeError, match="device lost"):
        load_adapter(base, directory, trainable=True)
    _assert_unchanged(base, before)


def test_merging_a_tied_embedding_leaves_the_head_alone():
    """GPT-2's lm_head *is* wte: merging wte's delta into the shared tensor would change the head too."""
    model = _adapted(tiny_gpt2(), LoRAConfig(r=4, target_modules=["wte"]))
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight
    expected = _logits(model)
    merged = merge_and_unload(model)
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert merged.config.tie_word_embeddings is False  # so from_pretrained does not tie them again
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)


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


# -- atomic writes --------------------------------------------------------------------------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _crash_after_partial_write(path, *args, **kwargs):
    Path(path).write_bytes(b"half a file")
    raise OSError("disk full")


@pytest.mark.parametrize("existing", [True, False])
def test_crash_mid_save_leaves_no_half_adapter(existing, tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    if existing:
        save_adapter(_adapted(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"])), target)
        previous = _files(target)
    model = _adapted(tiny_llama(seed=1), LoRAConfig(r=4, target_modules=["v_proj"]))
    monkeypatch.setattr(
        safetensors.torch, "save_file", lambda tensors, path, metadata=None: _crash_after_partial_write(path)
    )
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target)
    assert [p.name for p in tmp_path.iterdir()] == (["adapter"] if existing else [])
    if existing:
        assert _files(target) == previous
        monkeypatch.undo()
        save_adapter(model, target)  # and a later save replaces it whole
        assert json.loads((target / CONFIG).read_text())["target_modules"][0].endswith("v_proj")


def test_crash_mid_export_leaves_the_previous_export(tmp_path, monkeypatch):
    model = _adapted(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    tokenizer = _tokenizer()
    target = export_merged(model, tmp_path / "merged", tokenizer)
    previous = _files(target)
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda path: _crash_after_partial_write(Path(path) / "x"))
    with pytest.raises(OSError, match="disk full"):
        export_merged(_adapted(tiny_llama(seed=2), LoRAConfig(r=2, target_modules=["v_proj"])), target, tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and _files(target) == previous

    plain = _adapted(TinyNet(), LoRAConfig(r=2, target_modules=["mlp.0"]))
    monkeypatch.setattr(
        safetensors.torch, "save_file", lambda tensors, path, metadata=None: _crash_after_partial_write(path)
    )
    with pytest.raises(OSError, match="disk full"):
        export_merged(plain, target)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and _files(target) == previous
