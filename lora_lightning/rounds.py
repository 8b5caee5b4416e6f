"""Rounds: the calls of a module whose adapted children may be computed together, and the autograd
state grouping must respect (:mod:`lora_lightning.sharing` uses them).

A round is one call of a parent module, opened and closed by its forward hooks. It knows which
thread is inside it, how deeply nested the call is, whether it returned, and which saved-tensor
hooks (activation checkpointing, offload) were in effect when it began, so that a group never
computes across threads, outside the parent's call, or inside a checkpoint region of its own.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.sharing import InputGroup


def during_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes forwards).

    A recomputed forward must save exactly what the original forward saved, so groups are cut
    (and what a forward served is recorded) only in forwards that run outside backward; the
    recomputation then repeats what its original forward did.
    """
    return torch._C._current_graph_task_id() != -1


def can_run_backward(node: Any) -> bool:
    """The autograd node still holds its saved tensors (read raw: nothing is unpacked or recomputed)."""
    try:
        saved = node._raw_saved_tensors
    except RuntimeError:  # freed by a backward that did not retain the graph
        return False
    return saved is not None


def saved_tensors_hooks() -> Any:
    """The innermost ``saved_tensors_hooks`` in effect (activation checkpointing, CPU offload), or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(True) if top is not None else None


class Round:
    """One call of a parent module: which thread is inside it, how deep, and its groups."""

    def __init__(self) -> None:
        self.groups: list[InputGroup] = []
        self.owner: int | None = None  # the thread inside the parent's call
        self.depth = 0
        self.frame: Any = None  # the outermost call's frame, while it runs
        self.completed = False  # the outermost call returned (rather than raised)
        self.hooks: Any = None  # the saved-tensor hooks in effect when it began
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Copies start outside any call (a lock is not copied; each copy gets its own).
        return {**self.__dict__, "owner": None, "depth": 0, "frame": None, "hooks": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def inside(self) -> bool:
        return self.depth > 0 and self.owner == threading.get_ident()

    def enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        with self._lock:
            me = threading.get_ident()
            if self.owner not in (None, me):
                return  # another thread is inside: this call's layers run alone
            if self.depth and not self._outermost_running():
                self.depth = 0  # the last call never ended (KeyboardInterrupt skips forward hooks)
            self.owner = me
            self.depth += 1
            first = self.depth == 1
        if first:
            self.frame, self.completed, self.hooks = sys._getframe(1), False, saved_tensors_hooks()
            in_backward = during_backward()
            for group in list(self.groups):
                group.begin(in_backward)

    def _outermost_running(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame is self.frame:
                return True
            frame = frame.f_back
        return False

    def returned(self, module: nn.Module, args: Any, output: Any) -> None:
        """A plain forward hook: runs only when the call returns (before :meth:`exit`)."""
        if self.depth == 1 and self.owner == threading.get_ident():
            self.completed = True

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        with self._lock:
            if self.owner != threading.get_ident():
                return
            self.depth -= 1
            if self.depth:
                return
            self.owner, self.frame = None, None
        for group in self.groups:
            group.end(self.completed)
