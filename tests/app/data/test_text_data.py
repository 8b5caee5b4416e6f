"""Data sources and packing: deterministic file splits, token blocks, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_lightning.app.data.token_blocks import (
    PydocTopics,
    StdlibCode,
    TextFiles,
    TokenBlockDataModule,
    pack,
    split_of,
    spread,
)
from lora_lightning.app.errors import UsageError
from lora_lightning.app.models.tiny_base import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n", "the quick brown fox " * 50], vocab_size=300)


def test_stdlib_split_is_deterministic_disjoint_and_skips_excluded_dirs() -> None:
    source = StdlibCode(val_fraction=0.05)
    train, val = source.files("train"), source.files("val")
    assert train == StdlibCode(val_fraction=0.05).files("train")  # same split every time
    assert not set(train) & set(val) and len(val) > 10
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    for path in train + val:
        parts = path.relative_to(source.root).parts[:-1]
        assert not {"site-packages", "test", "tests", "pydoc_data", "encodings"} & set(parts)
        assert path.suffix == ".py"
    # The split of a file depends on its path only, not on what else is in the tree.
    for path in val[:5]:
        assert split_of(path.relative_to(source.root).as_posix(), 0.05) == "val"


def test_pydoc_topics_split_by_topic() -> None:
    train, val = list(PydocTopics(0.1).documents("train")), list(PydocTopics(0.1).documents("val"))
    assert val and train and not set(train) & set(val)
    assert list(PydocTopics(0.0).documents("val")) == []


def test_pack_joins_documents_with_eos_and_cuts_blocks(tokenizer) -> None:
    docs = ["def f(x):\n", "    return x\n"] * 20
    blocks = pack(tokenizer, iter(docs), block_size=8)
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.shape == (len(stream) // 8, 8) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert pack(tokenizer, iter(docs), block_size=8, max_tokens=20).shape == (2, 8)


def test_spread_takes_evenly_spaced_blocks() -> None:
    blocks = torch.arange(100).view(100, 1)
    assert spread(blocks, 5).flatten().tolist() == [0, 25, 50, 74, 99]
    assert spread(blocks[:3], 5).shape == (3, 1)
    with pytest.raises(UsageError, match="max_val_tokens"):
        spread(blocks, 0)


def test_text_files_txt_jsonl_and_errors(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "a.txt").write_text("alpha " * 300)
    (tmp_path / "b.jsonl").write_text('{"text": "beta beta"}\n\n{"text": "gamma"}\n')
    source = TextFiles(train=[str(tmp_path / "*.txt")], val=[str(tmp_path / "b.jsonl")])
    source.check()
    assert list(source.documents("val")) == ["beta beta", "gamma"]
    data = TokenBlockDataModule(source, tokenizer=tokenizer, block_size=16, batch_size=2)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16)

    with pytest.raises(UsageError, match="matched no file"):
        TextFiles(train=[str(tmp_path / "*.md")])
    with pytest.raises(UsageError, match="cannot read data file .*missing.txt"):
        TextFiles(train=[str(tmp_path / "missing.txt")]).check()
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(UsageError, match="line 2: expected a JSON object"):
        TextFiles(train=[str(tmp_path / "c.jsonl")]).check()
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(UsageError, match="only .txt and .jsonl"):
        TextFiles(train=[str(tmp_path / "d.csv")]).check()
    with pytest.raises(UsageError, match="val_fraction"):
        TextFiles(train=[str(tmp_path / "a.txt")], val_fraction=1.5)


def test_too_little_data_is_a_clear_error(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "tiny.txt").write_text("x")
    data = TokenBlockDataModule(TextFiles(train=[str(tmp_path / "tiny.txt")]), tokenizer=tokenizer, block_size=64)
    with pytest.raises(UsageError, match="fewer than one batch"):
        data.setup()


def test_hf_dataset_through_the_datasets_library_on_local_files(tmp_path: Path, tokenizer, monkeypatch) -> None:
    """data=hf_dataset for real: datasets.load_dataset with the json builder over local files, offline."""
    pytest.importorskip("datasets", reason="the datasets extra is installed by the test extra in CI")
    from lora_lightning.app.data.token_blocks import HFDataset

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(f'{{"body": "train doc {i} " , "n": {i}}}\n' for i in range(40)))
    val.write_text('{"body": "held out one", "n": 0}\n{"body": "  ", "n": 1}\n{"body": "held out two", "n": 2}\n')
    files = {"train": str(train), "validation": str(val)}

    source = HFDataset(path="json", data_files=files, text_field="body")
    source.check()
    assert list(source.documents("val")) == ["held out one", "held out two"]  # blank rows skipped
    assert len(list(source.documents("train"))) == 40

    # no validation split: a deterministic share of train is held out, disjoint from the rest
    held = HFDataset(
        path="json", data_files={"train": str(train)}, val_split=None, val_fraction=0.25, text_field="body"
    )
    first, again = list(held.documents("val")), list(held.documents("val"))
    rest = list(held.documents("train"))
    assert first == again and first and not set(first) & set(rest) and len(first) + len(rest) == 40

    data = TokenBlockDataModule(source, tokenizer=tokenizer, block_size=8, batch_size=2)
    data.setup()
    assert next(iter(data.val_dataloader()))["input_ids"].shape[1] == 8

    with pytest.raises(UsageError, match=r"data.source.text_field='text' is not a column of datasets:json.*body"):
        list(HFDataset(path="json", data_files=files).documents("train"))


def test_a_single_file_with_no_held_out_part_is_refused_before_training(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "book.txt").write_text("the quick brown fox " * 400)
    data = TokenBlockDataModule(
        TextFiles(train=[str(tmp_path / "book.txt")], val_fraction=0.0),
        tokenizer=tokenizer,
        block_size=16,
        batch_size=2,
    )
    data.setup()
    with pytest.raises(UsageError, match=r"gives no validation block of 16 tokens; hold out more data"):
        data.check_validation()


def test_text_file_split_does_not_depend_on_where_the_corpus_lives(tmp_path: Path) -> None:
    lines = "".join(f'{{"text": "document {i}"}}\n' for i in range(60))
    for folder in ("here", "there/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "corpus.jsonl").write_text(lines)
    here = TextFiles(train=[str(tmp_path / "here" / "corpus.jsonl")], val_fraction=0.2)
    there = TextFiles(train=[str(tmp_path / "there" / "deeper" / "corpus.jsonl")], val_fraction=0.2)
    assert list(here.documents("val")) == list(there.documents("val"))
    assert 0 < len(list(here.documents("val"))) < 60


def test_building_a_base_leaves_the_callers_random_state_alone(tmp_path: Path) -> None:
    """A cache miss must not reseed the job: the same seed gives the same numbers with or without a build."""
    from lora_lightning.app.models.tiny_base import ensure_base

    spec = {
        "architecture": {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
        },
        "tokenizer": {"vocab_size": 300},
        "pretrain": {
            "steps": 2,
            "batch_size": 2,
            "block_size": 32,
            "lr": 1e-3,
            "warmup_steps": 1,
            "weight_decay": 0.0,
            "seed": 0,
        },
    }
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ensure_base("seedcheck", cache_dir=tmp_path, **spec)
    assert torch.equal(torch.rand(3), expected)
