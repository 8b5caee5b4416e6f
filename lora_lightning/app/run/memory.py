"""Peak memory of a job's training: what a rank study compares besides perplexity and time.

On a CUDA device it is ``torch.cuda.max_memory_allocated`` (tensors only: weights, gradients,
optimizer state, activations). On the CPU it is the process's peak resident set size. Sweep jobs of
the basic launcher share one process, whose lifetime peak would carry one job's peak into the next;
Linux lets a process reset its peak (``/proc/self/clear_refs``), so each job's figure is its own.
Before the reset, what earlier jobs left for the garbage collector is collected and glibc is asked
to hand freed pages back (``malloc_trim``), so a later job does not start from an earlier one's
leftovers. Where the reset is not possible the lifetime peak (``getrusage``) is reported, and
``kind`` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MIB = 1024 * 1024

CUDA_KIND = "cuda_max_allocated"
RSS_KIND = "process_peak_rss"
LIFETIME_RSS_KIND = "process_lifetime_peak_rss"  # the peak could not be reset: includes earlier work


@dataclass(frozen=True)
class PeakMemory:
    """A peak in MiB and how it was measured (one of the ``*_KIND`` names)."""

    mib: float
    kind: str


def _hwm_kib() -> int | None:
    """VmHWM (peak RSS since the last reset) of this process in KiB, where /proc has it."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_freed_memory() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            ctypes.CDLL(libc_name).malloc_trim(0)  # glibc: return freed heap pages to the system


class PeakMeter:
    """Measures the peak between :meth:`start` and :meth:`read` on one device.

    Args:
        device: the device training runs on ("cuda", "cuda:1", "cpu", ...).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._reset_done = False

    def start(self) -> None:
        """Forget earlier peaks, as far as the platform allows."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_freed_memory()
        try:
            _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            self._reset_done = _hwm_kib() is not None
        except OSError:
            self._reset_done = False

    def read(self) -> PeakMemory:
        """The peak since :meth:`start`."""
        if self.device.type == "cuda":
            return PeakMemory(round(torch.cuda.max_memory_allocated(self.device) / _MIB, 1), CUDA_KIND)
        hwm = _hwm_kib() if self._reset_done else None
        if hwm is not None:
            return PeakMemory(round(hwm / 1024, 1), RSS_KIND)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        mib = peak / _MIB if sys.platform == "darwin" else peak / 1024
        return PeakMemory(round(mib, 1), LIFETIME_RSS_KIND)
