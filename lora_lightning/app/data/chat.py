"""Prompt formatting: a chat rendered with the tokenizer's chat template, tokenized, responses marked.

A chat is rendered turn by turn: for each assistant message, the text up to the generation prompt
(``add_generation_prompt=True``) is prompt and what the full render adds after it is response.
Each piece is tokenized on its own, so the prompt's tokens are exactly what ``generate`` is given
at inference time, and the labels of prompt tokens can be set to -100 (no loss) without guessing
where a response starts inside a merged token.

A tokenizer without a chat template gets :data:`PLAIN_CHAT_TEMPLATE` (the tiny bases get it when
they are loaded); it is saved with the tokenizer, so the exported model is prompted the way it was
trained. Rendered, a system message, a prompt and a response read::

    You are terse.

    ### User:
    What is 2 + 2?

    ### Assistant:
    4<|endoftext|>
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from lora_lightning.app.data.records import ASSISTANT, Example, Message
from lora_lightning.app.errors import UsageError

IGNORE = -100  # the label of a token that carries no loss (PyTorch's and transformers' ignore_index)
PLAIN_ROLES = ("system", "user", "assistant")
# Turns are separated by a blank line that belongs to the next turn, so a response ends with the
# end-of-text token: the model learns to stop, and nothing after the stop is trained.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('the plain chat template knows the roles system, user, assistant, not '"
    " + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\n### Assistant:\\n' }}{%- endif -%}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the plain one; returns whether it had none."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return True


@dataclass(frozen=True)
class Encoded:
    """A tokenized chat.

    Attributes:
        input_ids: the whole chat's tokens.
        labels: the same tokens where they carry loss, :data:`IGNORE` elsewhere (prompt tokens unless
            trained on, and always the first token, which no position predicts).
        prompt_length: tokens before the first response token (a longer prompt leaves no response).
        answer_start: tokens before the last response: ``input_ids[:answer_start]`` is the prompt a
            model answers at generation time.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    answer_start: int

    def cut(self, length: int) -> Encoded:
        """The first ``length`` tokens (``answer_start`` still points into the full chat)."""
        return Encoded(self.input_ids[:length], self.labels[:length], self.prompt_length, self.answer_start)


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool, where: str) -> str:

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError) as err:
        raise UsageError(f"{where}: the chat template refused this chat ({err})") from err


def segments(tokenizer: Any, example: Example) -> list[tuple[str, bool]]:
    """The rendered chat cut into ``(text, is_response)`` pieces, in order.

    Raises:
        UsageError: a role the template does not know (it refuses it, or leaves the message out), or
            a template that does not render a chat as its prompt followed by its response.
    """
    messages, where = example.messages, example.where
    if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE:
        for message in messages:  # say it before rendering, with the allowed roles
            if message["role"] not in PLAIN_ROLES:
                raise UsageError(
                    f"{where}: role {message['role']!r} is not one the chat template knows ({', '.join(PLAIN_ROLES)})"
                )
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        prompt = _render(tokenizer, messages[:index], True, where)
        full = _render(tokenizer, messages[: index + 1], False, where)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UsageError(
                f"{where}: the chat template does not render this chat as prompt then response (a turn "
                "re-renders earlier ones), so the response tokens cannot be told apart; use a template "
                "without that behaviour (tokenizer.chat_template)"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    for message in messages:
        if message["content"].strip() not in done:
            raise UsageError(
                f"{where}: the chat template leaves out the {message['role']!r} message: it does not know "
                f"role {message['role']!r}"
            )
    return pieces


def encode(tokenizer: Any, examples: Sequence[Example], train_on_prompt: bool = False) -> list[Encoded]:
    """Tokenize chats; labels are -100 on prompt tokens unless ``train_on_prompt``.

    All pieces go through the tokenizer in one call (fast tokenizers batch in Rust).
    """
    pieces = [segments(tokenizer, example) for example in examples]
    texts = [text for chat in pieces for text, _ in chat]
    ids = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]) if texts else iter(())
    out = []
    for chat in pieces:
        input_ids: list[int] = []
        labels: list[int] = []
        prompt_length = answer_start = -1
        for _, is_response in chat:
            tokens = next(ids)
            if is_response:
                answer_start = len(input_ids)
                prompt_length = answer_start if prompt_length < 0 else prompt_length
            input_ids += tokens
            labels += tokens if is_response or train_on_prompt else [IGNORE] * len(tokens)
        if labels:
            labels[0] = IGNORE  # nothing predicts the first token (and in a packed row it follows another chat)
        out.append(Encoded(input_ids, labels, prompt_length, answer_start))
    return out
