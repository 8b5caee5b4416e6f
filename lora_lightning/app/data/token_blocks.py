"""The packed-text data module: documents of a source, tokenized and cut into fixed-length blocks.

:class:`TokenBlockDataModule` tokenizes a source's documents (:mod:`lora_lightning.app.data.text_sources`),
appends an end-of-text token to each, concatenates, and cuts the stream into ``block_size``
blocks. Supervised (instruction/chat) records have their own module, :mod:`lora_lightning.app.data.sft_datamodule`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lora_lightning.app.data.batches import check_fits_positions

# The sources lived here first; configs and user code name them as lora_lightning.app.data.token_blocks.<Source>.
from lora_lightning.app.data.text_sources import HFDataset, PydocTopics, StdlibCode, TextFiles, split_of
from lora_lightning.app.errors import UsageError

__all__ = ["HFDataset", "PydocTopics", "StdlibCode", "TextFiles", "TokenBlockDataModule", "pack", "split_of", "spread"]


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

    def summary(self) -> dict[str, Any]:
        """What summary.json records about the data: the block size and how many blocks each split has."""
        return {
            "block_size": self.block_size,
            "train_blocks": None if self.train_blocks is None else len(self.train_blocks),
            "val_blocks": None if self.val_blocks is None else len(self.val_blocks),
        }

    def check_model(self, model: Any) -> None:
        """Blocks must fit the model's positions, or the first step would fail mid-job."""
        check_fits_positions(model, self.block_size, "data.block_size")

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
