"""User errors of the app: one clear line on stderr, a non-zero exit, nothing half-written.

Hydra prints a stripped traceback for every exception raised in a job. For a user's mistake (an
unknown group choice, ``r=0``, a missing file) that is noise: the app prints one line naming the
problem instead, and keeps the full trace for ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

PROG = "lora-lightning"
# Set by main() before Hydra starts, so the choice survives main() setting HYDRA_FULL_ERROR itself.
USER_FULL_ERROR_ENV = "LORA_LIGHTNING_FULL_ERROR"


class UsageError(ValueError):
    """A mistake in the user's config or inputs, raised before any work starts."""


class UsageExit(SystemExit):
    """Ends the process with one line on stderr.

    A ``SystemExit`` rather than an ``Exception`` so that Hydra's job runner, which catches
    ``Exception`` and prints a traceback, lets it through unchanged. The message is the exit code,
    as in ``sys.exit("...")``: uncaught, Python prints it and exits with status 1; and it survives
    pickling, so a joblib or SLURM worker hands it back to the launcher intact.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def full_error_requested() -> bool:
    """Whether the user asked for full tracebacks (``HYDRA_FULL_ERROR=1``)."""
    value = os.environ.get(USER_FULL_ERROR_ENV, os.environ.get("HYDRA_FULL_ERROR", ""))
    return value.strip().lower() in {"1", "true", "yes"}


def one_line(text: str) -> str:
    """Fold a multi-line message into one line: indented lines become a comma-separated list.

    ``"Could not find 'rank/r3'\\n\\nAvailable options in 'rank':\\n\\tr16\\n\\tr4"`` becomes
    ``"Could not find 'rank/r3'; Available options in 'rank': r16, r4"``.
    """
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if raw[:1] in {"\t", " "} and parts:
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
        else:
            parts.append(line)
    return "; ".join(parts)


def describe(error: BaseException) -> str:
    """The one line shown for a user error: the message, prefixed by the type where it helps."""
    message = one_line(str(error)) or type(error).__name__
    if isinstance(error, (UsageError, ValueError, TypeError)):
        return message
    return f"{type(error).__name__}: {message}"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the input is wrong", when raised before the work starts."""

    return (ValueError, TypeError, OSError, ImportError, KeyError, OmegaConfBaseException)


def remove_job_bookkeeping(output_dir: Path) -> None:
    """Undo what Hydra wrote into a job's output dir, leaving nothing behind for a failed job.

    Only Hydra's own files (``.hydra/`` and the job log) are removed, and the directory itself only
    when that leaves it empty, so a dir the user pointed ``hydra.run.dir`` at keeps its contents.
    """
    if not output_dir.is_dir():
        return
    shutil.rmtree(output_dir / ".hydra", ignore_errors=True)
    log = output_dir / f"{_job_name()}.log"  # Hydra's log only, never the user's other files
    before = _LOG_BYTES_AT_START.get(output_dir, 0)
    if before and log.is_file():
        os.truncate(log, before)  # Hydra appends: an earlier run's log in this directory stays
    else:
        log.unlink(missing_ok=True)
    try:
        output_dir.rmdir()  # only succeeds when empty
    except OSError:
        return
    _remove_empty_parents(output_dir)


def _remove_empty_parents(directory: Path) -> None:
    """Take back the parents Hydra made for a run dir (``outputs/<date>/``) that are left empty.

    Stops at the first parent that holds anything else, and never removes the directory the
    command was started in, any directory above it, or the home directory.
    """
    launched = _launch_dir()
    stops = {launched, *launched.parents, Path.home().resolve()}
    for parent in directory.resolve().parents:
        if parent in stops:
            return
        try:
            parent.rmdir()
        except OSError:  # not empty (or not ours to remove)
            return


def _launch_dir() -> Path:
    """The directory the command was started in (Hydra's ``runtime.cwd``)."""

    cwd = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()
    return Path(cwd).resolve()


# Size of the job log when the job started, by output dir: a job rerun into an existing run
# directory appends to that run's log, and a failed input check takes back only its own lines.
_LOG_BYTES_AT_START: dict[Path, int] = {}


def job_started(output_dir: Path) -> None:
    """Remember how much of the job log was there before this job (call first thing in a job)."""
    log = output_dir / f"{_job_name()}.log"
    _LOG_BYTES_AT_START[output_dir] = log.stat().st_size if log.is_file() else 0


def _job_name() -> str:
    """Hydra's job name, which names the job's log file (``<name>.log``)."""

    return str(HydraConfig.get().job.name) if HydraConfig.initialized() else "main"


def _cause_of_instantiation(error: BaseException) -> BaseException:
    """What a config target's constructor raised: Hydra wraps it in an InstantiationException."""

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


@contextlib.contextmanager
def user_errors(output_dir: Path | None) -> Iterator[None]:
    """Turn input errors raised inside the block into a one-line exit (unless HYDRA_FULL_ERROR=1)."""
    try:
        yield
    except Exception as raised:
        error = _cause_of_instantiation(raised)
        if not isinstance(error, _user_errors()):
            raise
        if output_dir is not None:
            remove_job_bookkeeping(output_dir)
        if full_error_requested():
            raise
        raise UsageExit(describe(error)) from error


_EXPECTED = {
    "Unterminated string starting at": "a string opened here is never closed: expected a closing '\"' on this line",
    "Invalid control character at": "a raw control character (a newline or tab) inside a string: expected it escaped",
    "Extra data": "more after the end of the JSON value: expected one record per line",
    "Expecting value": "expected a JSON value (an object, string, number, true, false or null)",
}


def json_problem(err: json.JSONDecodeError, line: int | None = None) -> str:
    """``line L column C: not valid JSON: <what was expected> (near '...')`` for a decoding error.

    ``line`` is the file's line number when ``err`` comes from decoding that one line (.jsonl).
    """
    expected = _EXPECTED.get(err.msg)
    if expected is None:
        expected = "expected " + err.msg.removeprefix("Expecting ") if err.msg.startswith("Expecting ") else err.msg
    text = err.doc.splitlines()[err.lineno - 1] if err.doc.splitlines() else ""
    near = text[max(0, err.colno - 16) : err.colno + 15]
    return f"line {line or err.lineno} column {err.colno}: not valid JSON: {expected} (near {near!r})"
