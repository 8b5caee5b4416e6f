"""Tensors that still live in a memory-mapped checkpoint file, moved into process memory.

``from_pretrained`` maps the safetensors file and leaves every tensor it does not convert (the
embeddings, the output head, the norms) as a view into that mapping. Loading a 4-bit model reads
every other weight through the same mapping to quantize it, so the pages of the whole
full-precision checkpoint stay in the process's resident set for as long as one view lives:
at the TinyLlama-1.1B shape, 1.9 GiB of bf16 pages beside a 0.5 GiB 4-bit model
(``benchmarks/RESULTS.md``). Once the remaining views own their memory, the mapping closes and
those pages leave the process. Only a model holding quantized layers is worth it: for a plain
model the mapping *is* its weights.

Linux only (``/proc/self/maps``); elsewhere nothing is moved.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import torch
from torch import nn

_MAPS = Path("/proc/self/maps")


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of regular files (not anonymous, not the heap)."""
    ranges = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and "x" not in fields[1]:  # data, not code
            start, _, stop = fields[0].partition("-")
            ranges.append((int(start, 16), int(stop, 16)))
    return ranges


def release_mapped_weights(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer of ``model`` that lies in a mapped file into process memory.

    Tied tensors stay tied (a parameter is copied once, wherever it appears). Returns the bytes
    copied; 0 where nothing is mapped or ``/proc/self/maps`` does not exist.
    """
    if not _MAPS.exists():
        return 0
    ranges = _file_mappings()
    if not ranges:
        return 0
    moved, seen = 0, set()
    with torch.no_grad():
        for module in model.modules():
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for name, tensor in tensors:
                if id(tensor) in seen or tensor.device.type != "cpu" or tensor.is_meta:
                    continue
                seen.add(id(tensor))
                address = tensor.untyped_storage().data_ptr()
                if not any(start <= address < stop for start, stop in ranges):
                    continue
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.clone()
                else:
                    setattr(module, name, tensor.clone())  # a registered buffer stays registered
                moved += tensor.numel() * tensor.element_size()
    if moved:
        _trim_heap()
    return moved


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Quantizing at load allocates and frees a full-precision copy of every weight; glibc keeps
    most of that freed memory (a quarter of a GiB at the 1.1B shape) in the process.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
