"""Merged exports that plain transformers / torch load, and writes that are never left half done."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from lora_lightning import LoRAConfig, LoRAEmbedding, LoRALinear, merge_and_unload
from lora_lightning.inject import lora_layers
from lora_lightning.io.adapters import export_merged, save_adapter
from tests.io.test_adapters import ATOL, CONFIG, _adapted, _logits
from tests.models import VOCAB, tiny_gpt2, tiny_llama

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


def test_export_merged_in_place_leaves_a_plain_model(tmp_path, monkeypatch):
    model = _adapted(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    expected = _logits(model)
    export_merged(model, tmp_path / "m", in_place=True)
    assert not lora_layers(model) and not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=ATOL)
    # exporting an already plain model (the callback merges first) makes no copy of it
    import lora_lightning.io.export as export_module

    real_deepcopy = copy.deepcopy

    def deepcopy(obj, *args, **kwargs):
        assert not isinstance(obj, nn.Module), "a plain model was copied"
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(export_module.copy, "deepcopy", deepcopy)
    export_merged(model, tmp_path / "again")
    assert _files(tmp_path / "again") == _files(tmp_path / "m")


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


def test_merging_a_tied_embedding_leaves_the_head_alone():
    """GPT-2's lm_head *is* wte: merging wte's delta into the shared tensor would change the head too."""
    model = _adapted(tiny_gpt2(), LoRAConfig(r=4, target_modules=["wte"]))
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight
    expected = _logits(model)
    merged = merge_and_unload(model)
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert merged.config.tie_word_embeddings is False  # so from_pretrained does not tie them again
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=ATOL)


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


def test_failed_swap_puts_the_previous_adapter_back(tmp_path, monkeypatch):
    target = save_adapter(_adapted(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path / "adapter")
    previous = _files(target)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):  # the new directory cannot take the old one's place
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(_adapted(tiny_llama(), LoRAConfig(r=4, target_modules=["v_proj"])), target)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and _files(target) == previous


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


def test_a_directory_that_is_not_ours_is_never_replaced(tmp_path):
    """save_adapter / export_merged replace a previous adapter or export, never a user's directory."""
    model = _adapted(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    mine = tmp_path / "experiment"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(
        ValueError, match=r"'.*experiment' is not empty and holds no adapter_config.json \(\['notes.txt'\]\)"
    ):
        save_adapter(model, mine)
    with pytest.raises(ValueError, match="holds no config.json or model.safetensors"):
        export_merged(model, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # an empty directory, or one holding a previous adapter, is fine
    save_adapter(model, tmp_path / "empty_ok")
    save_adapter(model, tmp_path / "empty_ok")
    assert (tmp_path / "empty_ok" / "adapter_config.json").is_file()
