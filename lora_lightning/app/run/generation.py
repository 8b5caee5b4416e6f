"""The recap's sample: the base's and the fine-tuned model's continuation of the same prompt.

Greedy decoding of a small model loops (``def _in_in_in_in...``), which shows nothing about what
it learnt; a repetition penalty and a ban on repeated n-grams (``sample.repetition_penalty``,
``sample.no_repeat_ngram_size``) keep the continuation readable and still deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lora_lightning.app.errors import UsageError


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_sample(sample: Mapping[str, Any] | None) -> None:
    """The ``sample`` settings, checked before any work (None or a null prompt: no sample)."""
    if not sample or sample.get("prompt") is None:
        return
    if not isinstance(sample["prompt"], str) or not sample["prompt"]:
        raise UsageError(f"sample.prompt must be a non-empty string or null, got {sample['prompt']!r}")
    tokens = sample.get("max_new_tokens", 32)
    if not _positive_int(tokens):
        raise UsageError(f"sample.max_new_tokens must be a positive integer, got {tokens!r}")
    penalty = sample.get("repetition_penalty", 1.0)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
        raise UsageError(f"sample.repetition_penalty must be a positive number (1.0: none), got {penalty!r}")
    ngram = sample.get("no_repeat_ngram_size", 0)
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 0:
        raise UsageError(f"sample.no_repeat_ngram_size must be a non-negative integer (0: none), got {ngram!r}")


@torch.no_grad()
def continuation(model: nn.Module, tokenizer: Any, sample: Mapping[str, Any] | None) -> str | None:
    """The prompt and the model's deterministic continuation of it, or None when no sample is configured.

    Runs where the model's weights are; the model is put in eval mode for the generation and given
    back in the mode it had.
    """
    if not sample or sample.get("prompt") is None:
        return None
    prompt = tokenizer(sample["prompt"], return_tensors="pt").to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **prompt,
            max_new_tokens=int(sample.get("max_new_tokens", 32)),
            do_sample=False,
            repetition_penalty=float(sample.get("repetition_penalty", 1.0)),
            no_repeat_ngram_size=int(sample.get("no_repeat_ngram_size", 0)),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
