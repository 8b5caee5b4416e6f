"""Where text comes from: the sources of documents, and the deterministic train/val split.

A source yields documents (strings) per split. Splits are decided per document (per file, per
topic, per record) by a hash of its name, so they are the same on every machine and every run,
and no file contributes to both. The supervised (instruction/chat) sources reuse the same rules.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from lora_lightning.app.data.records import json_lines
from lora_lightning.app.errors import UsageError

Split = Literal["train", "val"]
T = TypeVar("T")
_BUCKETS = 10_000


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(key: str, val_fraction: float) -> Split:
    """Deterministic split of a document by a hash of its key (a relative path, a topic name)."""
    return "val" if _hash(key) % _BUCKETS < round(val_fraction * _BUCKETS) else "train"


def split_of_item(path: Path | str, index: int, val_fraction: float) -> Split:
    """Split of the ``index``-th item of a file: by file name and position, not by where it lives."""
    return split_of(f"{Path(path).name}:{index}", val_fraction)


def shuffled(keys: Sequence[str]) -> list[str]:
    # A fixed pseudo-random order, so a token budget samples the whole collection, not one corner.
    return sorted(keys, key=lambda key: _hash("order:" + key))


def check_fraction(value: float, field: str) -> None:
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
        check_fraction(val_fraction, "data.source.val_fraction")
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
        return [self.root / key for key in shuffled(keys)]

    def documents(self, split: Split) -> Iterator[str]:
        for path in self.files(split):
            yield path.read_text(encoding="utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"stdlib .py files under {self.root}"


class PydocTopics:
    """The prose of ``pydoc_data.topics`` (the text of ``help()``), split by topic."""

    def __init__(self, val_fraction: float = 0.1) -> None:
        check_fraction(val_fraction, "data.source.val_fraction")
        self.val_fraction = val_fraction

    def check(self) -> None:
        from pydoc_data.topics import topics  # noqa: F401  (fails clearly on a stripped Python)

    def documents(self, split: Split) -> Iterator[str]:
        from pydoc_data.topics import topics

        for key in shuffled(list(topics)):
            if split_of(key, self.val_fraction) == split:
                yield topics[key]

    def __repr__(self) -> str:
        return "pydoc_data.topics"


def expand_patterns(patterns: Sequence[str] | str | None, field: str) -> list[Path]:
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


class LocalFiles:
    """The train and val files of a local source, and which of their items each split gets.

    Args:
        train: files or glob patterns for training.
        val: files or patterns for validation; None holds out ``val_fraction`` of the train items.
        val_fraction: share of the train files' items held out when ``val`` is None.
        kinds: the file kinds the source reads, for the message when ``train`` is empty.
    """

    def __init__(
        self, train: Sequence[str] | str, val: Sequence[str] | str | None, val_fraction: float, kinds: str
    ) -> None:
        check_fraction(val_fraction, "data.source.val_fraction")
        self.train = expand_patterns(train, "data.source.train")
        self.val = expand_patterns(val, "data.source.val")
        self.val_fraction = val_fraction
        if not self.train:
            raise UsageError(f"data.source.train is empty: give at least one {kinds} file")

    @property
    def all(self) -> list[Path]:
        return [*self.train, *self.val]

    def items(self, split: Split, read: Callable[[Path], Iterable[T]]) -> Iterator[T]:
        """The split's items (``read`` yields a file's): the val files' when there are any, else the
        train files' items held out by :func:`split_of_item`."""
        if self.val:
            for path in self.train if split == "train" else self.val:
                yield from read(path)
            return
        for path in self.train:
            for index, item in enumerate(read(path)):
                if split_of_item(path, index, self.val_fraction) == split:
                    yield item

    def __repr__(self) -> str:
        return f"{len(self.train)} train, {len(self.val)} val"


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
        self.files = LocalFiles(train, val, val_fraction, ".txt or .jsonl")
        self.text_field = text_field

    def check(self) -> None:
        """Every file exists, is readable UTF-8, and (for .jsonl) holds the text field."""
        for path in self.files.all:
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
            for number, record in json_lines(path, lines):
                try:
                    text = record[self.text_field]
                except (KeyError, TypeError) as err:
                    raise UsageError(
                        f"data file {str(path)!r} line {number}: expected a JSON object with a string "
                        f"{self.text_field!r} field ({err})"
                    ) from err
                if not isinstance(text, str):
                    raise UsageError(f"data file {str(path)!r} line {number}: {self.text_field!r} is not a string")
                yield text

    def documents(self, split: Split) -> Iterator[str]:
        return self.files.items(split, self._read)

    def __repr__(self) -> str:
        return f"text files ({self.files!r})"


def require_datasets(option: str) -> None:
    """Fail with the install line when the ``datasets`` library is missing."""
    try:
        import datasets  # noqa: F401
    except ImportError as err:
        raise UsageError(f"data={option} needs the datasets library: pip install 'lora-lightning[datasets]'") from err


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
        check_fraction(val_fraction, "data.source.val_fraction")
        self.path, self.name, self.data_files, self.revision = path, name, data_files, revision
        self.train_split, self.val_split = train_split, val_split
        self.val_fraction, self.text_field = val_fraction, text_field

    def check(self) -> None:
        require_datasets("hf_dataset")

    def load(self, split: Split) -> Any:
        """The ``datasets.Dataset`` that holds ``split`` (the train split when val is held out of it)."""
        from datasets import load_dataset

        wanted = self.train_split if split == "train" or self.val_split is None else self.val_split
        return load_dataset(self.path, self.name, data_files=self.data_files, split=wanted, revision=self.revision)

    def in_split(self, index: int, split: Split) -> bool:
        """Whether row ``index`` of :meth:`load`'s dataset belongs to ``split``."""
        return self.val_split is not None or split_of(str(index), self.val_fraction) == split

    def documents(self, split: Split) -> Iterator[str]:
        data = self.load(split)
        if self.text_field not in data.column_names:
            raise UsageError(
                f"data.source.text_field={self.text_field!r} is not a column of {self}: {data.column_names}"
            )
        for index, text in enumerate(data[self.text_field]):
            if self.in_split(index, split) and text and text.strip():
                yield text

    def __repr__(self) -> str:
        return f"datasets:{self.path}" + (f"/{self.name}" if self.name else "")
