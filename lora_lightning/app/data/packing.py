"""Packing several supervised examples into one row, and the check that they stay apart in a model.

A packed row carries position ids that restart at 0 for each example. transformers (masking_utils,
for the attention implementations that build masks: eager, sdpa, flex) reads a restart as the start
of a new sequence and masks attention across it, when the forward gets ``position_ids``, no
attention mask and no cache. Whether a model does is not a property one can read off its config, so
:func:`check_packing_isolates` asks the model itself, once, before training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_lightning.app.data.batches import model_inputs
from lora_lightning.app.data.chat import Encoded
from lora_lightning.app.errors import UsageError


@dataclass(frozen=True)
class PackedRow:
    """Examples laid end to end: their tokens, labels, and position ids restarting at each example."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    examples: int


def pack_rows(rows: Sequence[Encoded], max_length: int, seed: int) -> list[PackedRow]:
    """First-fit packing of the examples, in a seeded shuffled order, into rows of at most ``max_length`` tokens.

    Shuffled first so that a row mixes examples from across the data; each example then goes into
    the first row with room for it, else starts a new one. Every label stays where it was: the first
    token of every example is already unlabelled (:func:`lora_lightning.app.data.chat.encode`), so no
    example is asked to predict its start from the end of the one before.
    """
    order = list(rows)
    random.Random(seed).shuffle(order)
    shortest = min((len(row.input_ids) for row in order), default=0)
    members: list[list[Encoded]] = []
    free: list[int] = []
    open_rows: list[int] = []  # rows that can still take the shortest example
    for row in order:
        size = len(row.input_ids)
        target = next((index for index in open_rows if free[index] >= size), None)
        if target is None:
            target = len(members)
            members.append([])
            free.append(max_length)
            open_rows.append(target)
        members[target].append(row)
        free[target] -= size
        if free[target] < shortest:
            open_rows.remove(target)
    packed = []
    for group in members:
        ids = [token for row in group for token in row.input_ids]
        labels = [label for row in group for label in row.labels]
        positions = [position for row in group for position in range(len(row.input_ids))]
        packed.append(PackedRow(ids, labels, positions, len(group)))
    return packed


@torch.no_grad()
def check_packing_isolates(model: Any) -> None:
    """Refuse packing for a model in which packed examples would attend to each other.

    Two short random sequences are scored apart and packed in one row; their logits must agree.

    Raises:
        UsageError: the logits differ, or the model does not take ``position_ids``.
    """
    vocab = int(model.config.vocab_size)
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 6), generator=generator).to(parameter.device)
    second = torch.randint(0, vocab, (1, 5), generator=generator).to(parameter.device)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(parameter.device)
    was_training = model.training
    model.eval()
    try:
        apart = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1).float()
        packed = {"input_ids": torch.cat([first, second], dim=1), "position_ids": positions}
        together = model(**model_inputs(packed)).logits.float()
    except (TypeError, ValueError) as err:
        message = f"data.packing=true: the model does not take position_ids ({err}); set data.packing=false"
        raise UsageError(message) from err
    finally:
        model.train(was_training)
    tolerance = (1e-4 if parameter.dtype == torch.float32 else 3e-2) * float(apart.abs().max())
    if not torch.allclose(together, apart, rtol=0.0, atol=tolerance):
        worst = float((together - apart).abs().max())
        raise UsageError(
            f"data.packing=true: in this model ({type(model).__name__}, attn_implementation="
            f"{getattr(model.config, '_attn_implementation', None)!r}) packed examples attend to each other "
            f"(logits differ by {worst:.3g} from the examples scored apart); set data.packing=false"
        )
