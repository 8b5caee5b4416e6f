"""Writing directories safely: a destination is checked before any work, and written whole or not at all.

Every write goes to a temporary sibling directory that is fsynced and renamed into place; an
existing destination is renamed aside and deleted only once the new one is in place. A destination
may be new, or a directory this kind of write made before (it holds a marker file); any other
non-empty directory is refused, since replacing it would delete files that are not ours.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import Tensor

from lora_lightning.io.peft_format import CONFIG_NAME

MERGED_WEIGHTS_NAME = "model.safetensors"
MERGED_INDEX_NAME = "model.safetensors.index.json"
MERGED_MARKERS = ("config.json", MERGED_WEIGHTS_NAME, MERGED_INDEX_NAME)  # what marks a merged export
ADAPTER_DIR, MERGED_DIR = "adapter", "merged"  # the callback's exports inside its export_dir


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file (text or bytes) through a temporary sibling and a rename, so no reader sees half of it."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, bytes):
        staging.write_bytes(data)
    else:
        staging.write_text(data)
    os.replace(staging, path)


def check_destination(target: Path, marker: tuple[str, ...] = ()) -> None:
    """A destination may be new, or a directory this kind of write made before (it holds a marker file).

    Any other non-empty directory is refused: replacing it would delete files that are not ours.
    """
    if target.exists() and not target.is_dir():
        raise ValueError(f"directory {str(target)!r} exists and is not a directory; pick another path")
    if marker and target.is_dir() and any(target.iterdir()) and not any((target / m).is_file() for m in marker):
        entries = sorted(p.name for p in target.iterdir())[:5]
        raise ValueError(
            f"directory {str(target)!r} is not empty and holds no {' or '.join(marker)} ({entries}); "
            "writing here would replace it as a whole: pick a new or empty directory"
        )


def check_export_destination(export_dir: str | os.PathLike) -> None:
    """The checks the exports into ``export_dir`` (``adapter/``, ``merged/``) make, made up front.

    The callback calls this at setup, so a destination that would be refused at fit end (a file
    in the way, a directory holding someone else's files) fails before any compute is spent.
    """
    root = Path(export_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"export_dir {str(root)!r} exists and is not a directory; pick another path")
    check_destination(root / ADAPTER_DIR, (CONFIG_NAME,))
    check_destination(root / MERGED_DIR, MERGED_MARKERS)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh sibling directory; on success it replaces ``target``, on error it is removed.

    A directory cannot be renamed over a non-empty one, so an existing ``target`` is first renamed
    aside and deleted only after the new one is in place (and renamed back if that fails).
    """
    check_destination(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # mode from the umask, unlike mkdtemp's 0700, so other readers (servers) can open it
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tensors_for_file(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, and no two tensors sharing memory (safetensors refuses tied weights)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


# -- save ---------------------------------------------------------------------------------------------
