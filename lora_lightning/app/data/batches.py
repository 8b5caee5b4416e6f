"""What a batch and a model must agree on: the forward arguments of a batch, the model's positions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lora_lightning.app.errors import UsageError


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """The forward arguments of a batch: ``input_ids`` and its ``attention_mask`` or packed ``position_ids``.

    Packed rows (position ids restarting at each example) go without an attention mask and without
    a cache: only then does transformers derive the mask that keeps a row's examples apart.
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch:
        inputs.update(position_ids=batch["position_ids"], use_cache=False)
    return inputs


def max_positions(model: Any) -> int | None:
    """The longest sequence a model takes (``max_position_embeddings``, GPT-2's ``n_positions``), if it says."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions if isinstance(positions, int) else None


def check_fits_positions(model: Any, length: int, field: str) -> None:
    """Refuse sequences longer than the model's positions."""
    positions = max_positions(model)
    if positions is not None and length > positions:
        raise UsageError(f"{field}={length} exceeds the model's {positions} positions; use at most {positions}")
