"""Where supervised examples come from: record files, a ``datasets`` dataset, stdlib docstrings.

Each source yields :class:`~lora_lightning.app.data.records.Example` per split and splits the way the
text sources do (:mod:`lora_lightning.app.data.text_sources`): by file, or by a hash of a record's file name
and position, so the split is the same on every machine. ``check()`` runs before any model loads.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lora_lightning.app.data.records import (
    AUTO,
    READERS,
    Example,
    Reader,
    detect_format,
    field_names,
    make_reader,
    read_file,
)
from lora_lightning.app.data.text_sources import (
    HFDataset,
    LocalFiles,
    Split,
    StdlibCode,
    require_datasets,
)
from lora_lightning.app.errors import UsageError

log = logging.getLogger(__name__)


class RecordFiles:
    """Local ``.jsonl`` (one record per line) and ``.json`` (a list of records) files (``data=sft_jsonl``).

    Args:
        train: files or glob patterns for training.
        val: files or patterns for validation; None holds out ``val_fraction`` of the train records.
        val_fraction: share of records held out when ``val`` is None.
        format: the record shape: ``auto`` (detected from the records), ``prompt_response``,
            ``alpaca`` or ``messages``.
        fields: field names that differ from the format's (``{prompt: question, response: answer}``);
            under ``auto`` they tell the format (each field belongs to one).
    """

    def __init__(
        self,
        train: Sequence[str] | str,
        val: Sequence[str] | str | None = None,
        val_fraction: float = 0.1,
        format: str = AUTO,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        self.files = LocalFiles(train, val, val_fraction, ".jsonl or .json")
        self.format = _format_of_fields(format, fields)
        self.detected = self.format == AUTO
        self._reader = None if self.detected else make_reader(self.format, fields)

    @property
    def reader(self) -> Reader:
        """The reader of the format, detected from every record of every file on first use."""
        if self._reader is None:
            self.format = detect_format(record for path in self.files.all for record in read_file(path))
            log.info("data.source.format: detected %s from the records", self.format)
            self._reader = make_reader(self.format)
        return self._reader

    def check(self) -> None:
        """Every record of every file has what the format needs (the first problem, with its line)."""
        for path in self.files.all:
            for _ in self._examples(path):
                pass

    def _examples(self, path: Path) -> Iterator[Example]:
        reader = self.reader
        for where, record in read_file(path):
            yield Example(where, reader(record, where))

    def examples(self, split: Split) -> Iterator[Example]:
        return self.files.items(split, self._examples)

    def __repr__(self) -> str:
        return f"{_format_note(self.format, self.detected)} records ({self.files!r} files)"


class HFRecords:
    """Records from a ``datasets`` dataset (``data=hf_sft``); ``fields`` maps the format's fields to columns.

    Args:
        format: the record shape: ``auto`` (detected from the dataset's columns),
            ``prompt_response``, ``alpaca`` or ``messages``.
        fields: column names that differ from the format's field names (under ``auto`` they tell the format).
        **dataset: which dataset and splits: ``path``, ``name``, ``data_files``, ``train_split``,
            ``val_split``, ``val_fraction``, ``revision``, as for ``data=hf_dataset``
            (:class:`~lora_lightning.app.data.text_sources.HFDataset`, which loads the rows).
    """

    def __init__(self, format: str = AUTO, fields: Mapping[str, Any] | None = None, **dataset: Any) -> None:
        self.data = HFDataset(**dataset)
        self.format = _format_of_fields(format, fields)
        self.detected = self.format == AUTO
        self._reader = None if self.detected else make_reader(self.format, fields)

    def check(self) -> None:
        require_datasets("hf_sft")

    def examples(self, split: Split) -> Iterator[Example]:
        rows = self.data.load(split)
        if self._reader is None:  # a dataset's rows all have its columns: detect from those
            columns = dict.fromkeys(rows.column_names)
            self.format = detect_format([(f"{self.data!r} (columns)", columns)])
            log.info("data.source.format: detected %s from the dataset's columns", self.format)
            self._reader = make_reader(self.format)
        for index, row in enumerate(rows):
            if self.data.in_split(index, split):
                where = f"{self.data!r} split {rows.split} row {index}"
                yield Example(where, self._reader(row, where))

    def __repr__(self) -> str:
        return f"{_format_note(self.format, self.detected)} records from {self.data!r}"


def _format_of_fields(format: str, fields: Mapping[str, Any] | None) -> str:
    """``format``; under ``auto`` with ``fields`` given, the one format those field names belong to."""
    if format != AUTO or not fields:
        return format
    owners = [fmt for fmt in READERS if set(fields) <= set(field_names(fmt))]
    if len(owners) != 1:
        raise UsageError(
            f"data.source.fields names {', '.join(map(repr, fields))}, "
            f"fields of {' and '.join(owners) or 'no format'}: "
            f"set data.source.format to one of {', '.join(READERS)}"
        )
    return owners[0]


def _format_note(format: str, detected: bool) -> str:
    return f"{format} (detected)" if detected and format != AUTO else format


Direction = Literal["code_to_doc", "doc_to_code"]
DIRECTIONS = ("code_to_doc", "doc_to_code")
DOC_PARTS = ("first_paragraph", "whole")


def functions_with_docstrings(source: str) -> Iterator[tuple[str, str, str]]:
    """``(name, code without its docstring, cleaned docstring)`` for each documented function of a module.

    Functions whose docstring is their whole body are skipped: without code there is nothing to pair.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        first = node.body[0]  # the docstring statement: cut its lines out of the function
        code = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        yield node.name, textwrap.dedent("\n".join(code)), inspect.cleandoc(doc)


class StdlibDocstrings:
    """Function/docstring pairs from the standard library's ``.py`` files, split by file (no download).

    Args:
        root, val_fraction, exclude_dirs: which files, as for ``data=stdlib_code``
            (:class:`~lora_lightning.app.data.text_sources.StdlibCode`).
        direction: ``code_to_doc`` (the function's code is the prompt, its docstring the response)
            or ``doc_to_code`` (the reverse).
        docstring: ``first_paragraph`` (the summary, as code-summarisation sets such as CodeSearchNet
            take it) or the ``whole`` docstring.
        min_doc_chars: shorter docstrings are skipped (one-word docstrings teach little).
        max_code_chars: longer functions are skipped (they would mostly be cut by ``max_length``).
    """

    def __init__(
        self,
        root: str | None = None,
        val_fraction: float = 0.05,
        exclude_dirs: Sequence[str] | None = None,
        direction: str = "code_to_doc",
        docstring: str = "first_paragraph",
        min_doc_chars: int = 20,
        max_code_chars: int = 800,
    ) -> None:
        extra = {} if exclude_dirs is None else {"exclude_dirs": exclude_dirs}
        self.code = StdlibCode(root, val_fraction, **extra)
        if direction not in DIRECTIONS:
            raise UsageError(f"data.source.direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if docstring not in DOC_PARTS:
            raise UsageError(f"data.source.docstring must be one of {', '.join(DOC_PARTS)}, got {docstring!r}")
        self.docstring = docstring
        for field, value in (("min_doc_chars", min_doc_chars), ("max_code_chars", max_code_chars)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"data.source.{field} must be a non-negative integer, got {value!r}")
        self.direction: Direction = direction  # type: ignore[assignment]
        self.min_doc_chars, self.max_code_chars = min_doc_chars, max_code_chars

    def check(self) -> None:
        self.code.check()

    def examples(self, split: Split) -> Iterator[Example]:
        """Pairs in the fixed shuffled file order of ``stdlib_code``, so a cap samples many files."""
        for path in self.code.files(split):
            text = path.read_text(encoding="utf-8", errors="replace")
            for name, code, doc in functions_with_docstrings(text):
                if self.docstring == "first_paragraph":
                    doc = doc.split("\n\n", 1)[0]
                if len(doc) < self.min_doc_chars or len(code) > self.max_code_chars:
                    continue
                where = f"{path.relative_to(self.code.root)}:{name}"
                if self.direction == "code_to_doc":
                    what = "docstring summary" if self.docstring == "first_paragraph" else "docstring"
                    prompt, response = f"Write the {what} of this Python function.\n\n{code}", doc
                else:
                    prompt, response = f"Write a Python function `{name}` that does this:\n\n{doc}", code
                yield Example(where, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])

    def __repr__(self) -> str:
        return f"stdlib function/docstring pairs ({self.direction}, {self.docstring}) under {self.code.root}"
