"""The private names of third-party packages this package relies on, each resolved in one place.

A private name is a promise nobody made: it can move or vanish in any release. Each one used here
has no public equivalent (docs/ARCHITECTURE.md lists them and why), is resolved through
:func:`private` so that a missing one fails with a message naming the package version and the
name, and is checked by ``tests/compat/test_private_names.py``, which fails as soon as a release moves it.

Attribute names read off third-party objects (``nn.Module._non_persistent_buffers_set`` and the
like) are listed in :data:`PRIVATE_ATTRIBUTES` and checked by the same test on real objects.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any


@dataclass(frozen=True)
class PrivateName:
    """One private name: where it lives (tried in order, newest first) and who uses it for what."""

    name: str
    modules: tuple[str, ...]
    package: str  # the distribution, for the error message
    used_for: str


#: Every private name imported from a third-party package, by the name used to ask for it.
PRIVATE_NAMES: dict[str, PrivateName] = {
    "unpack_cpu_4bit": PrivateName(
        "_convert_weight_packed_for_cpu_inverse",
        # 0.50 defines it in functional (its nn.modules imports it from there)
        ("bitsandbytes.functional", "bitsandbytes.backends.cpu.ops"),
        "bitsandbytes",
        "undo the in-place repacking of a Linear4bit that ran bitsandbytes' AVX512-BF16 CPU inference path",
    ),
    "pack_cpu_4bit": PrivateName(
        "_convert_weight_packed_for_cpu",
        ("bitsandbytes.functional", "bitsandbytes.backends.cpu.ops"),
        "bitsandbytes",
        "(tests only) put a Linear4bit into that repacked state on any CPU",
    ),
    "basic_sweeper": PrivateName(
        "BasicSweeper",
        ("hydra._internal.core_plugins.basic_sweeper",),
        "hydra-core",
        "the study sweeper extends Hydra's basic sweeper (no public base class does the grid)",
    ),
}

#: Private attributes read or written on third-party objects: (owner, attribute, why).
PRIVATE_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("torch.nn.Module", "_non_persistent_buffers_set", "export skips non-persistent buffers as state_dict does"),
    ("torch.Tensor", "_version", "DoRA's cached row norms are invalid once the stored weight is written in place"),
    ("torch.optim.lr_scheduler.SequentialLR", "_schedulers", "remap the nested schedulers' per-group lists"),
    ("transformers.PreTrainedModel", "_require_grads_hook", "enable_input_require_grads was already called"),
    ("lightning.pytorch.loggers.WandbLogger", "_wandb_init", "drop the anonymous=None setting wandb warns about"),
)


def private(key: str) -> Any:
    """The object a private third-party name stands for.

    Raises:
        ImportError: the package is missing, or none of the known modules defines the name
            (the message names the installed version and where the name was looked for).
    """
    entry = PRIVATE_NAMES[key]
    for module_name in entry.modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, entry.name):
            return getattr(module, entry.name)
    try:
        version = metadata.version(entry.package)
    except metadata.PackageNotFoundError:
        version = "not installed"
    raise ImportError(
        f"{entry.package} {version} does not define {entry.name} in {' or '.join(entry.modules)} "
        f"(lora-lightning uses it to {entry.used_for}); install a version lora-lightning supports "
        "or report this at lora-lightning's issue tracker"
    )
