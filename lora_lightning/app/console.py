"""The terminal: the app's one rich console, and what the libraries print kept out of a user's way.

:func:`console` is the console every recap and report prints through.

A first run printed, besides the app's own lines: Lightning's litlogger tip (once per Trainer),
deprecation warnings from Lightning's ``_pytree`` helpers about torch's ``LeafSpec``, and
transformers' "Loading weights" / "Writing model shards" bars for a 4 MB model. None of it tells
the user anything about their run. :func:`library_noise` hides exactly those for the duration of a
job, and nothing else: real warnings, the hub's download bars and Lightning's other messages stay.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from functools import cache
from typing import Any

from rich.console import Console
from transformers.utils import logging as hf_logging


@cache
def console() -> Console:
    """The console the app's own lines go through (no syntax highlighting of numbers and paths)."""
    return Console(highlight=False)


# Lightning routes rank_zero_info through these loggers (the pytorch and the fabric flavour).
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_TIP_MARK = "litlogger"  # the promotional tip printed when no LitLogger is configured
# torch >= 2.10 deprecates `isinstance(x, LeafSpec)`, which Lightning's _pytree helper still does.
_LEAFSPEC_WARNING = r".*isinstance\(treespec, LeafSpec\)"


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TIP_MARK not in record.getMessage()


def _silent_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook: its own bars (weights loading, shard writing) are created disabled."""
    return factory(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def library_noise(verbose: bool) -> Iterator[None]:
    """Hide the libraries' tips, known deprecation warnings and loading bars inside the block.

    Args:
        verbose: True leaves everything as the libraries print it.
    """
    if verbose:
        yield
        return
    tip = _DropTip()
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(tip)
    restore_bars = _hide_transformers_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING)
            yield
    finally:
        restore_bars()
        for logger in loggers:
            logger.removeFilter(tip)


def _hide_transformers_bars():
    """Disable transformers' own progress bars; returns the function that restores them."""

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:  # transformers >= 5: a hook that touches only transformers' bars
        set_hook(_silent_bar)
        return lambda: set_hook(None)
    # Older releases: the global switch (it also hides the hub's download bars).
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar if was_enabled else (lambda: None)
