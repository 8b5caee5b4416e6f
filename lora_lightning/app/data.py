"""Text sources and the data module that packs them into fixed-length token blocks.

A source yields documents (strings) per split; :class:`TokenBlockDataModule` tokenizes them,
appends an end-of-text token to each, concatenates, and cuts the stream into ``block_size``
blocks. Splits are decided per document (per file) by a hash of its name, so they are the same on
every machine and every run, and no file contributes to both.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lora_lightning.app.errors import UsageError

Split = Literal["train", "val"]
_BUCKETS = 10_000


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(key: str, val_fraction: float) -> Split:
    """Deterministic split of a document by a hash of its key (a relative path, a topic name)."""
    return "val" if _hash(key) % _BUCKETS < round(val_fraction * _BUCKETS) else "train"


def _shuffled(keys: Sequence[str]) -> list[str]:
    # A fixed pseudo-random order, so a token budget samples the whole collection, not one corner.
    return sorted(keys, key=lambda key: _hash("order:" + key))


def _check_fraction(value: float, field: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UsageError(f"{field} must be a number in [0, 1), got {value!r}")


class StdlibCode:
    """The ``.py`` files of the running interpreter's standard library (split by file).

    Args:
        root: directory to read; None means this interpreter's stdlib (``sysconfig`` "stdlib").
        val_fraction: share of files held out for validation.
        exclude_dirs: directory names skipped anywhere in the tree: installed packages, the test
            suites, and ``pydoc_data`` (the tiny bases' pretraining prose must not be scored as code).
    """

    def __init__(
        self,
        root: str | None = None,
        val_fraction: float = 0.05,
        exclude_dirs: Sequence[str] = (
            "site-packages",
            "dist-packages",
            "test",
            "tests",
            "idle_test",
            "pydoc_data",
            "encodings",
        ),
    ) -> None:
        _check_fraction(val_fraction, "data.source.val_fraction")
        self.root = Path(root).expanduser() if root else Path(sysconfig.get_paths()["stdlib"])
        self.val_fraction = val_fraction
        self.exclude_dirs = frozenset(exclude_dirs)

    def check(self) -> None:
        if not self.root.is_dir():
            raise UsageError(f"data.source.root={str(self.root)!r} is not a directory")

    def files(self, split: Split) -> list[Path]:
        """The split's files, in the fixed shuffled order the data module reads them."""
        keys = []
        for folder, dirs, names in os.walk(self.root):
            dirs[:] = sorted(
                d for d in dirs if d not in self.exclude_dirs and d != "__pycache__"
            )  # prune, don't filter
            rel = Path(folder).relative_to(self.root)
            for name in names:
                key = (rel / name).as_posix()
                if name.endswith(".py") and split_of(key, self.val_fraction) == split:
                    keys.append(key)
        return [self.root / key for key in _shuffled(keys)]

    def documents(self, split: Split) -> Iterator[str]:
        for path in self.files(split):
            yield path.read_text(encoding="utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"stdlib .py files under {self.root}"


class PydocTopics:
    """The prose of ``pydoc_data.topics`` (the text of ``help()``), split by topic."""

    def __init__(self, val_fraction: float = 0.1) -> None:
        _check_fraction(val_fraction, "data.source.val_fraction")
        self.val_fraction = val_fraction

    def check(self) -> None:
        from pydoc_data.topics import topics  # noqa: F401  (fails clearly on a stripped Python)

    def documents(self, split: Split) -> Iterator[str]:
        from pydoc_data.topics import topics

        for key in _shuffled(list(topics)):
            if split_of(key, self.val_fraction) == split:
                yield topics[key]

    def __repr__(self) -> str:
        return "pydoc_data.topics"


def _expand(patterns: Sequence[str] | str | None, field: str) -> list[Path]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if any(ch in pattern for ch in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path()
            matches = sorted(anchor.glob(str(path.relative_to(anchor))))
            if not matches:
                raise UsageError(f"{field}: pattern {pattern!r} matched no file")
            files.extend(matches)
        else:
            files.append(path)
    return files


class TextFiles:
    """Local ``.txt`` files (one document each) and ``.jsonl`` files (one document per line).

    Args:
        train: files or glob patterns for training.
        val: files or patterns for validation; None splits ``val_fraction`` of the train documents.
        val_fraction: share held out when ``val`` is None.
        text_field: the key holding the text in each ``.jsonl`` record.
    """

    def __init__(
        self,
        train: Sequence[str] | str,
        val: Sequence[str] | str | None = None,
        val_fraction: float = 0.1,
        text_field: str = "text",
    ) -> None:
        _check_fraction(val_fraction, "data.source.val_fraction")
        self.train = _expand(train, "data.source.train")
        self.val = _expand(val, "data.source.val")
        self.val_fraction = val_fraction
        self.text_field = text_field
        if not self.train:
            raise UsageError("data.source.train is empty: give at least one .txt or .jsonl file")

    def check(self) -> None:
        """Every file exists, is readable UTF-8, and (for .jsonl) holds the text field."""
        for path in [*self.train, *self.val]:
            if path.suffix not in {".txt", ".jsonl"}:
                raise UsageError(f"data file {str(path)!r}: only .txt and .jsonl are supported")
            try:
                for _ in self._read(path):
                    pass
            except (OSError, UnicodeDecodeError) as err:
                raise UsageError(f"cannot read data file {str(path)!r}: {err}") from err

    def _read(self, path: Path) -> Iterator[str]:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            return
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[self.text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise UsageError(
                        f"data file {str(path)!r} line {number}: expected a JSON object with a string "
                        f"{self.text_field!r} field ({err})"
                    ) from err
                if not isinstance(text, str):
                    raise UsageError(f"data file {str(path)!r} line {number}: {self.text_field!r} is not a string")
                yield text

    def documents(self, split: Split) -> Iterator[str]:
        if self.val:
            for path in self.train if split == "train" else self.val:
                yield from self._read(path)
            return
        for path in self.train:
            for index, text in enumerate(self._read(path)):
                # by file name and position, so the split is the same wherever the corpus lives
                if split_of(f"{Path(path).name}:{index}", self.val_fraction) == split:
                    yield text

    def __repr__(self) -> str:
        return f"text files ({len(self.train)} train, {len(self.val)} val)"


class HFDataset:
    """A dataset loaded with the ``datasets`` library (the ``datasets`` extra), by name or builder.

    Args:
        path: dataset name or builder (``"wikitext"``, ``"text"``, ``"json"``).
        name: dataset configuration (``"wikitext-2-raw-v1"``).
        data_files: local files for the builders ``text`` / ``json``.
        train_split, val_split: split names; val_split None holds out ``val_fraction`` of train.
        text_field: column holding the text.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: Any = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        val_fraction: float = 0.05,
        text_field: str = "text",
        revision: str | None = None,
    ) -> None:
        _check_fraction(val_fraction, "data.source.val_fraction")
        self.path, self.name, self.data_files, self.revision = path, name, data_files, revision
        self.train_split, self.val_split = train_split, val_split
        self.val_fraction, self.text_field = val_fraction, text_field

    def check(self) -> None:
        try:
            import datasets  # noqa: F401
        except ImportError as err:
            raise UsageError(
                "data=hf_dataset needs the datasets library: pip install 'lora-lightning[datasets]'"
            ) from err

    def documents(self, split: Split) -> Iterator[str]:
        from datasets import load_dataset

        wanted = self.train_split if split == "train" or self.val_split is None else self.val_split
        data = load_dataset(self.path, self.name, data_files=self.data_files, split=wanted, revision=self.revision)
        if self.text_field not in data.column_names:
            raise UsageError(
                f"data.source.text_field={self.text_field!r} is not a column of {self}: {data.column_names}"
            )
        for index, text in enumerate(data[self.text_field]):
            if self.val_split is None and split_of(str(index), self.val_fraction) != split:
                continue
            if text and text.strip():
                yield text

    def __repr__(self) -> str:
        return f"datasets:{self.path}" + (f"/{self.name}" if self.name else "")


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (N, block_size) int64

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids}  # the model shifts labels itself


def pack(tokenizer: Any, documents: Iterator[str], block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with end-of-text tokens, and cut into blocks.

    Returns:
        (N, block_size) int64; the tail shorter than a block is dropped.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        batch.clear()

    for text in documents:
        batch.append(text)
        if len(batch) == 32:
            flush()
            if max_tokens is not None and len(stream) >= max_tokens:
                break
    if batch:
        flush()
    if max_tokens is not None:
        del stream[max_tokens:]
    count = len(stream) // block_size
    return torch.tensor(stream[: count * block_size], dtype=torch.long).view(count, block_size)


# Validation reads up to this many times its token budget and keeps evenly spaced blocks, so the
# score covers many held-out files instead of the first few.
_VAL_READ = 16


def spread(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced rows of ``blocks`` (all of them if there are fewer)."""
    if count <= 0:
        raise UsageError(f"data.max_val_tokens must hold at least one block, got {count} blocks")
    if len(blocks) <= count:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, count).round().long()]


class TokenBlockDataModule(L.LightningDataModule):
    """Fixed-length token blocks of a source's train and val documents.

    Args:
        source: a StdlibCode / PydocTopics / TextFiles / HFDataset (anything with ``documents(split)``).
        tokenizer: the model's tokenizer (set by the app after the model is loaded).
        block_size: tokens per example.
        batch_size: examples per batch.
        max_train_tokens: cap on training tokens (None: everything); bounds tokenizing time.
        max_val_tokens: cap on validation tokens.
        num_workers: DataLoader worker processes.
        seed: seed of the training shuffle.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any = None,
        block_size: int = 256,
        batch_size: int = 8,
        max_train_tokens: int | None = None,
        max_val_tokens: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for field, value in (("block_size", block_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"data.{field} must be a positive integer, got {value!r}")
        self.source, self.tokenizer = source, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.max_train_tokens, self.max_val_tokens = max_train_tokens, max_val_tokens
        self.num_workers, self.seed = num_workers, seed
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return  # the app sets up before fit (to score the base); Lightning calls again
        if self.tokenizer is None:
            raise ValueError("TokenBlockDataModule needs a tokenizer before setup")
        self.train_blocks = pack(self.tokenizer, self.source.documents("train"), self.block_size, self.max_train_tokens)
        self.val_blocks = self._val_blocks()
        if len(self.train_blocks) < self.batch_size:
            raise UsageError(
                f"data: {self.source!r} gives {len(self.train_blocks)} training blocks of {self.block_size} tokens, "
                f"fewer than one batch of {self.batch_size}"
            )

    def check_validation(self) -> None:
        """A job needs validation blocks (it scores and checkpoints by them): say so before training."""
        if self.val_blocks is not None and len(self.val_blocks) == 0:
            raise UsageError(
                f"data: {self.source!r} gives no validation block of {self.block_size} tokens; hold out more "
                "data (data.source.val=[...] for text files, or a larger data.source.val_fraction; a single "
                "file falls wholly on one side of the split)"
            )

    def _val_blocks(self) -> torch.Tensor:
        if self.max_val_tokens is None:
            return pack(self.tokenizer, self.source.documents("val"), self.block_size)
        read = pack(self.tokenizer, self.source.documents("val"), self.block_size, _VAL_READ * self.max_val_tokens)
        return spread(read, self.max_val_tokens // self.block_size)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            _Blocks(self.train_blocks),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Blocks(self.val_blocks), batch_size=self.batch_size, num_workers=self.num_workers)
