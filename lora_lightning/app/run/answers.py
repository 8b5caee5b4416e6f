"""Answers to held-out prompts, base vs fine-tuned: for the recap, summary.json and a W&B table.

The prompts are the data module's held-out examples (their untruncated prompts, tokenized exactly
as in training); the answers are greedy, stop at the end-of-text token, and are decoded without
special tokens. The base answers are generated before training, the fine-tuned ones after the
adapters are merged, from the same model object.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from rich.markup import escape

from lora_lightning.app.console import console
from lora_lightning.app.data.batches import max_positions
from lora_lightning.app.data.records import Example

COLUMNS = ("prompt", "reference", "base", "tuned")
_LABEL = len("merged, reloaded")  # the recap's label column (report.print_recap), so the lines align


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` to tokenized prompts, one prompt at a time (no padding to get wrong)."""
    was_training = model.training
    home = next(model.parameters()).device
    model.eval().to(_device())
    positions = max_positions(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    try:
        for prompt in prompts:
            budget = max_new_tokens if positions is None else max(1, min(max_new_tokens, positions - len(prompt)))
            ids = torch.tensor([prompt], device=_device())
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=budget,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )
            answers.append(tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip())
    finally:
        model.to(home).train(was_training)
    return answers


class AnswerProbe:
    """The held-out prompts of a supervised data module and the answers given to them.

    Args:
        examples: ``(example, generation prompt ids)`` pairs (``SupervisedDataModule.answer_examples``).
        tokenizer: the model's tokenizer.
        max_new_tokens: most new tokens of an answer.
    """

    def __init__(self, examples: list[tuple[Example, list[int]]], tokenizer: Any, max_new_tokens: int) -> None:
        self.examples, self.tokenizer, self.max_new_tokens = examples, tokenizer, max_new_tokens
        self.answers: dict[str, list[str]] = {}

    @classmethod
    def of(cls, datamodule: Any) -> AnswerProbe | None:
        """The probe of a supervised data module; None for packed text or ``data.answers=0``."""
        examples = getattr(datamodule, "answer_examples", None)
        if not examples:
            return None
        return cls(examples, datamodule.tokenizer, datamodule.answer_tokens)

    def record(self, which: str, model: Any) -> None:
        """Generate the answers of ``model`` as ``which`` (``base`` or ``tuned``)."""
        prompts = [prompt for _, prompt in self.examples]
        self.answers[which] = generate_answers(model, self.tokenizer, prompts, self.max_new_tokens)

    def rows(self) -> list[dict[str, str | None]]:
        """One dict per prompt: the prompt's last user text, the reference answer, base and tuned answers."""
        rows = []
        for index, (example, _) in enumerate(self.examples):
            users = [m["content"] for m in example.messages[:-1] if m["role"] != "assistant"]
            row: dict[str, str | None] = {"prompt": users[-1] if users else "", "reference": example.reference}
            for which in ("base", "tuned"):
                row[which] = self.answers[which][index] if which in self.answers else None
            rows.append(row)
        return rows


def log_answers(logger: Logger | None, rows: list[dict[str, Any]] | None, data: dict[str, Any] | None) -> None:
    """The answers as a W&B table (``val/answers``) and the data counts in the run summary."""
    if not isinstance(logger, WandbLogger):
        return
    if rows:
        logger.log_table("val/answers", columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])
    if data and data.get("counts"):
        counts = {f"data/{split}_{key}": value for split, row in data["counts"].items() for key, value in row.items()}
        logger.experiment.summary.update(counts)


def _short(text: str | None, limit: int = 160) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def print_answers(rows: list[dict[str, Any]] | None, data: dict[str, Any] | None) -> None:
    """The data counts and the answers, after the recap (one line per field, long texts shortened)."""

    out = console()
    for split, counts in (data or {}).get("counts", {}).items():
        out.print(
            f"  [bold]{(split + ' examples').ljust(_LABEL)}[/bold]  {counts['used']} used of {counts['read']} "
            f"({counts['truncated']} truncated, {counts['dropped']} dropped, "
            f"{counts['prompt_too_long']} with a prompt over max_length={data['max_length']})",  # type: ignore[index]
            soft_wrap=True,
        )
    for number, row in enumerate(rows or [], 1):
        out.print(f"  [bold]answer {number}[/bold]", soft_wrap=True)
        for key in COLUMNS:
            out.print(f"    {key.ljust(9)}  {escape(_short(row[key]))}", soft_wrap=True)
