"""The supervised data module: prompt/response and chat examples, loss on the responses only.

Beside the packed-text module (:mod:`lora_lightning.app.data.token_blocks`) and with the same interface to the
LightningModule: batches of ``input_ids``, ``labels`` (-100 where nothing is learnt: prompts,
padding) and ``attention_mask`` (or ``position_ids`` for packed rows). A source yields examples
(:mod:`lora_lightning.app.data.record_sources`), :mod:`lora_lightning.app.data.chat` renders and tokenizes them.

Examples longer than ``max_length`` are never cut silently: one whose prompt alone reaches
``max_length`` is skipped (no response token would remain), a longer one is dropped or truncated
(``truncation``); the counts go to the job log and to ``summary.json``.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lora_lightning.app.data.batches import check_fits_positions
from lora_lightning.app.data.chat import IGNORE, Encoded, encode, ensure_chat_template
from lora_lightning.app.data.packing import PackedRow, check_packing_isolates, pack_rows
from lora_lightning.app.data.records import Example
from lora_lightning.app.data.token_blocks import spread
from lora_lightning.app.errors import UsageError

log = logging.getLogger(__name__)
TRUNCATION = ("drop", "truncate")
_ENCODE_CHUNK = 512  # examples per tokenizer call: batched, without holding every rendered chat at once


def fit_length(encoded: Encoded, max_length: int, truncation: str) -> tuple[Encoded | None, str]:
    """Apply ``max_length``: ``(example or None, outcome)``.

    The outcome is ``used``, ``truncated`` (kept, cut to ``max_length``), ``dropped`` (longer, and
    ``truncation="drop"``) or ``prompt_too_long`` (no response token would fit).
    """
    if encoded.prompt_length >= max_length:
        return None, "prompt_too_long"
    if len(encoded.input_ids) <= max_length:
        return encoded, "used"
    if truncation == "drop":
        return None, "dropped"
    return encoded.cut(max_length), "truncated"


def collate(rows: Sequence[Encoded] | Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad rows to the longest of the batch (on the right).

    Returns:
        ``input_ids`` and ``labels`` (B, T) int64, padding labelled -100; examples add
        ``attention_mask`` (B, T), packed rows ``position_ids`` (B, T) restarting at 0 for each
        example (the padding is one more "example"), from which transformers builds a mask that
        keeps the examples of a row apart. (Packed rows carry no attention mask: given one,
        transformers would let every token see the whole row.)
    """
    packed = isinstance(rows[0], PackedRow)
    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    extra = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        size = len(row.input_ids)
        input_ids[index, :size] = torch.tensor(row.input_ids)
        labels[index, :size] = torch.tensor(row.labels)
        if isinstance(row, PackedRow):
            extra[index, :size] = torch.tensor(row.position_ids)
            extra[index, size:] = torch.arange(length - size)
        else:
            extra[index, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "position_ids" if packed else "attention_mask": extra}


class SupervisedDataModule(L.LightningDataModule):
    """Tokenized supervised examples of a source's train and val splits.

    Args:
        source: a RecordFiles / HFRecords / StdlibDocstrings (anything with ``examples(split)`` and ``check()``).
        tokenizer: the model's tokenizer (set by the app after the model is loaded).
        max_length: most tokens per example (and per packed row).
        truncation: ``drop`` an example longer than ``max_length``, or ``truncate`` its end.
        train_on_prompt: training labels on prompt tokens too (loss on everything but padding);
            validation always scores the responses only, so the figures compare across the switch.
        packing: several training examples per row, kept apart by position ids (validation is never packed).
        batch_size: rows per batch.
        max_train_examples: training examples read (None: all).
        max_val_examples: validation examples kept, evenly spaced over the split (None: all).
        answers: held-out prompts answered by the base and the fine-tuned model for the recap.
        answer_tokens: most new tokens of each answer.
        num_workers: DataLoader worker processes.
        seed: seed of the packing order and of the training shuffle.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any = None,
        max_length: int = 512,
        truncation: str = "drop",
        train_on_prompt: bool = False,
        packing: bool = False,
        batch_size: int = 8,
        max_train_examples: int | None = None,
        max_val_examples: int | None = 256,
        answers: int = 4,
        answer_tokens: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for field, value, least in (
            ("max_length", max_length, 2),
            ("batch_size", batch_size, 1),
            ("max_train_examples", max_train_examples, 1),
            ("max_val_examples", max_val_examples, 1),
            ("answers", answers, 0),
            ("answer_tokens", answer_tokens, 1),
        ):
            if value is None and field.startswith("max_"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UsageError(f"data.{field} must be an integer >= {least}, got {value!r}")
        if truncation not in TRUNCATION:
            raise UsageError(f"data.truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
        self.source, self.tokenizer = source, tokenizer
        self.max_length, self.truncation = max_length, truncation
        self.train_on_prompt, self.packing = bool(train_on_prompt), bool(packing)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.max_train_examples, self.max_val_examples = max_train_examples, max_val_examples
        self.answers, self.answer_tokens = answers, answer_tokens
        self.train_rows: list[Encoded] | list[PackedRow] | None = None
        self.val_rows: list[Encoded] = []
        self.answer_examples: list[tuple[Example, list[int]]] = []
        self.counts: dict[str, dict[str, int]] = {}

    def _read(self, split: str, limit: int | None) -> tuple[list[Example], list[Encoded]]:
        """Examples of a split that fit ``max_length``, encoded, with the split's counts."""
        counts = dict.fromkeys(("read", "used", "truncated", "dropped", "prompt_too_long"), 0)
        examples = itertools.islice(self.source.examples(split), limit)
        kept: list[tuple[Example, Encoded]] = []
        while chunk := list(itertools.islice(examples, _ENCODE_CHUNK)):
            learn_prompt = self.train_on_prompt and split == "train"
            for example, encoded in zip(chunk, encode(self.tokenizer, chunk, learn_prompt), strict=True):
                fitted, outcome = fit_length(encoded, self.max_length, self.truncation)
                counts["read"] += 1
                counts[outcome] += 1
                counts["used"] += outcome == "truncated"
                if fitted is not None:
                    kept.append((example, fitted))
        self.counts[split] = counts
        log.info(
            "data %s: %d examples read, %d used (%d truncated to max_length=%d), %d dropped as longer, "
            "%d skipped: prompt alone reaches max_length",
            split, counts["read"], counts["used"], counts["truncated"], self.max_length, counts["dropped"],
            counts["prompt_too_long"],
        )  # fmt: skip
        if counts["read"] and not kept:
            raise UsageError(
                f"data.max_length={self.max_length}: no {split} example fits ({counts['prompt_too_long']} prompts "
                f"alone reach it, {counts['dropped']} examples are longer and data.truncation=drop); "
                "raise data.max_length or set data.truncation=truncate"
            )
        return [example for example, _ in kept], [encoded for _, encoded in kept]

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return  # the app sets up before fit (to score the base); Lightning calls again
        if self.tokenizer is None:
            raise ValueError("SupervisedDataModule needs a tokenizer before setup")
        if ensure_chat_template(self.tokenizer):
            log.info("the tokenizer has no chat template: using the plain one (saved with the tokenizer)")
        _, train = self._read("train", self.max_train_examples)
        examples, val = self._read("val", None)
        if self.max_val_examples is not None and len(val) > self.max_val_examples:
            keep = spread(torch.arange(len(val)), self.max_val_examples).tolist()
            examples, val = [examples[i] for i in keep], [val[i] for i in keep]
        if self.answers and val:
            for i in spread(torch.arange(len(val)), self.answers).tolist():
                self.answer_examples.append((examples[i], self._prompt_of(examples[i])))
        self.val_rows = sorted(val, key=lambda row: len(row.input_ids))  # similar lengths share a batch: less padding
        self.train_rows = pack_rows(train, self.max_length, self.seed) if self.packing else train
        if len(self.train_rows) < self.batch_size:
            raise UsageError(
                f"data: {self.source!r} gives {len(self.train_rows)} training "
                f"{'rows' if self.packing else 'examples'} within max_length={self.max_length}, "
                f"fewer than one batch of {self.batch_size}"
            )

    def _prompt_of(self, example: Example) -> list[int]:
        """The untruncated generation prompt of an example (everything before its last response)."""
        (encoded,) = encode(self.tokenizer, [example])
        return encoded.input_ids[: encoded.answer_start]

    def check_validation(self) -> None:
        """A job needs held-out examples (it scores and checkpoints by them): say so before training."""
        if self.train_rows is not None and not self.val_rows:
            raise UsageError(
                f"data: {self.source!r} gives no validation example; hold out more data (data.source.val=[...] "
                "for record files, or a larger data.source.val_fraction)"
            )

    def check_model(self, model: Any) -> None:
        """``max_length`` fits the model, and packed examples cannot see each other in it."""
        check_fits_positions(model, self.max_length, "data.max_length")
        if self.packing:
            check_packing_isolates(model)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_rows,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=functools.partial(collate, pad_id=self._pad_id()),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_rows,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            collate_fn=functools.partial(collate, pad_id=self._pad_id()),
            num_workers=self.num_workers,
        )

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def summary(self) -> dict[str, Any]:
        """What summary.json records about the data: the length policy and the counts per split."""
        return {
            "format": getattr(self.source, "format", "messages"),  # record shape (built chats: messages)
            "format_detected": bool(getattr(self.source, "detected", False)),
            "max_length": self.max_length,
            "truncation": self.truncation,
            "train_on_prompt": self.train_on_prompt,
            "packing": self.packing,
            "counts": self.counts,
            "train_rows": len(self.train_rows or []),
            "val_examples": len(self.val_rows),
        }
