"""Record shapes of supervised data: each reader turns one raw record into a chat.

A chat is a list of ``{"role", "content"}`` messages; the assistant messages are the responses
(what the model learns), everything else is prompt. A new record shape is one reader here: a
function ``(record, where, **field_names) -> list[Message]`` added to :data:`READERS`, whose keyword
arguments are the field names a user can remap with ``data.source.fields``.

Every problem names where the record came from (``data file 'train.jsonl' line 3``), so the job
stops before training with one line that points at it.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_lightning.app.errors import UsageError, json_problem

Message = dict[str, str]
Reader = Callable[[Any, str], list[Message]]
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Example:
    """One supervised example: its chat and where it came from (for error messages)."""

    where: str
    messages: list[Message]

    @property
    def reference(self) -> str:
        """The last response: what a generated answer to this example's prompt is compared with."""
        return self.messages[-1]["content"]


def _field(record: Mapping[str, Any], name: str, where: str, *, optional: bool = False) -> str | None:
    value = record.get(name)
    if value is None and optional:
        return None
    if name not in record:
        raise UsageError(f"{where}: no {name!r} field (fields found: {', '.join(map(repr, record)) or 'none'})")
    if not isinstance(value, str):
        raise UsageError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _object(record: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _response(text: str, name: str, where: str) -> str:
    if not text.strip():
        raise UsageError(f"{where}: empty response in field {name!r}")
    return text


def prompt_response(
    record: Any, where: str, prompt: str = "prompt", response: str = "response", system: str | None = None
) -> list[Message]:
    """``{"prompt": ..., "response": ...}`` (optionally a system message field) -> user, assistant."""
    record = _object(record, where)
    messages = []
    if system is not None and (text := _field(record, system, where, optional=True)):
        messages.append({"role": "system", "content": text})
    messages.append({"role": "user", "content": _field(record, prompt, where)})
    messages.append({"role": ASSISTANT, "content": _response(_field(record, response, where), response, where)})
    return messages


def alpaca(
    record: Any, where: str, instruction: str = "instruction", input: str = "input", output: str = "output"
) -> list[Message]:
    """Alpaca's ``instruction`` / optional ``input`` / ``output``: the input follows the instruction."""
    record = _object(record, where)
    prompt = _field(record, instruction, where)
    extra = _field(record, input, where, optional=True)
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return [
        {"role": "user", "content": prompt},
        {"role": ASSISTANT, "content": _response(_field(record, output, where), output, where)},
    ]


def messages(record: Any, where: str, messages: str = "messages") -> list[Message]:
    """``{"messages": [{"role": ..., "content": ...}, ...]}``, ending with an assistant message."""
    chat = _object(record, where).get(messages)
    if not isinstance(chat, list) or not chat:
        raise UsageError(f"{where}: field {messages!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for number, message in enumerate(chat, 1):
        at = f"{where} message {number}"
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise UsageError(f"{at}: expected an object with string 'role' and 'content' fields")
        content = _field(message, "content", at)
        if message["role"] == ASSISTANT:
            _response(content, "content", at)
        out.append({"role": message["role"], "content": content})
    if out[0]["role"] == ASSISTANT:
        raise UsageError(f"{where}: the first message is the assistant's; a response needs a prompt before it")
    if out[-1]["role"] != ASSISTANT:
        raise UsageError(f"{where}: the last message must be the assistant's (the response), got {out[-1]['role']!r}")
    return out


READERS: dict[str, Callable[..., list[Message]]] = {
    "prompt_response": prompt_response,
    "alpaca": alpaca,
    "messages": messages,
}


#: ``data.source.format``'s default: the record shape is read off the records themselves
AUTO = "auto"
#: the fields that tell each format apart, in the order a message lists them
SIGNATURES: dict[str, tuple[str, ...]] = {
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
}


def _formats_text() -> str:
    return "; ".join(f"{fmt} ({', '.join(fields)})" for fmt, fields in SIGNATURES.items())


def formats_of(record: Any) -> list[str]:
    """The formats whose distinguishing fields ``record`` has (one, for a well-formed record)."""
    if not isinstance(record, Mapping):
        return []
    return [fmt for fmt, fields in SIGNATURES.items() if all(field in record for field in fields)]


def detect_format(records: Iterable[tuple[str, Any]], option: str = "data.source") -> str:
    """The one format every record has the fields of (``records``: ``(where, record)`` pairs).

    Raises:
        UsageError: a record matching no format or several, records of different formats, or none.
    """
    first: tuple[str, str] | None = None
    for where, record in records:
        found = formats_of(record)
        if len(found) != 1:
            fields = ", ".join(map(repr, record)) if isinstance(record, Mapping) else type(record).__name__
            what = f"has the fields of {' and '.join(found)}" if found else f"matches no record format ({fields})"
            raise UsageError(
                f"{where}: the record {what}; the formats are {_formats_text()}: "
                f"set {option}.format to one of {', '.join(SIGNATURES)} (and {option}.fields for other field names)"
            )
        if first is None:
            first = (where, found[0])
        elif found[0] != first[1]:
            raise UsageError(
                f"{where} is a {found[0]} record but {first[0]} is a {first[1]} record: the records mix formats; "
                f"use one of {', '.join(SIGNATURES)} throughout, or set {option}.format to read them all as one"
            )
    if first is None:
        raise UsageError(f"{option}.format={AUTO}: there are no records to detect the format from")
    return first[1]


def field_names(format: str) -> dict[str, str | None]:
    """The remappable field names of a format and their defaults (the reader's keyword arguments)."""
    parameters = list(inspect.signature(READERS[format]).parameters.values())[2:]
    return {parameter.name: parameter.default for parameter in parameters}


def make_reader(format: str, fields: Mapping[str, Any] | None = None, option: str = "data.source") -> Reader:
    """The reader of ``format`` with its field names remapped by ``fields`` (checked here).

    Raises:
        UsageError: an unknown format, a field the format does not have, a name that is not a string.
    """
    if format not in READERS:
        raise UsageError(f"{option}.format must be one of {AUTO}, {', '.join(READERS)}, got {format!r}")
    known = field_names(format)
    for key, value in (fields or {}).items():
        if key not in known:
            raise UsageError(f"{option}.fields.{key} is not a field of format {format!r}; it has {', '.join(known)}")
        if not (isinstance(value, str) and value) and not (value is None and known[key] is None):
            raise UsageError(f"{option}.fields.{key} must be a field name, got {value!r}")
    return functools.partial(READERS[format], **dict(fields or {}))


def read_file(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each record of a ``.jsonl`` (one per line) or ``.json`` (a list) file.

    Raises:
        UsageError: an unreadable file, a line that is not JSON, a ``.json`` file that is not a list.
    """
    name = repr(str(path))
    if path.suffix not in {".jsonl", ".json"}:
        raise UsageError(f"data file {name}: only .jsonl and .json record files are supported")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read data file {name}: {err}") from err
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"data file {name} {json_problem(err)}") from err
        if not isinstance(records, list):
            raise UsageError(f"data file {name}: a .json record file must hold a list of objects")
        for index, record in enumerate(records):
            yield f"data file {name} record {index + 1}", record
        return
    for number, record in json_lines(path, text.splitlines()):
        yield f"data file {name} line {number}", record


def json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON-lines file.

    Raises:
        UsageError: a line that is not JSON, with its line, column and what was expected there.
    """
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"data file {str(path)!r} {json_problem(err, number)}") from err
