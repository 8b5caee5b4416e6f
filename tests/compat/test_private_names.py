"""Private names of third-party packages: each one listed, resolved in one place, and still there.

These tests fail the day a release of torch, bitsandbytes, transformers, lightning or hydra moves a
private name the package relies on, instead of a user finding out through an ImportError.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

from lora_lightning.compat import private_names
from lora_lightning.compat.private_names import PRIVATE_ATTRIBUTES, PRIVATE_NAMES, PrivateName, private

ROOT = Path(__file__).resolve().parents[2]
THIRD_PARTY = ("torch", "bitsandbytes", "transformers", "lightning", "peft", "hydra", "omegaconf", "wandb")


def _installed(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("key", sorted(PRIVATE_NAMES))
def test_every_listed_private_name_still_resolves(key):
    entry = PRIVATE_NAMES[key]
    top = entry.modules[0].split(".")[0]
    if not _installed(top):
        pytest.skip(f"{top} is not installed")
    assert callable(private(key))


def test_a_moved_private_name_fails_naming_the_package_version_and_the_name(monkeypatch):
    moved = PrivateName("_gone", ("torch.nn.functional",), "torch", "show the message")
    monkeypatch.setitem(PRIVATE_NAMES, "gone", moved)
    with pytest.raises(ImportError, match=rf"torch {torch.__version__.split('+')[0]}.* does not define _gone in"):
        private("gone")


def _owner(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _instance(path: str) -> object:
    """A real object of the owner class, to read the private attribute off."""
    if path == "torch.nn.Module":
        return torch.nn.Linear(2, 2)
    if path == "torch.Tensor":
        return torch.zeros(1)
    if path == "torch.optim.lr_scheduler.SequentialLR":
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        parts = [torch.optim.lr_scheduler.ConstantLR(opt), torch.optim.lr_scheduler.ConstantLR(opt)]
        return torch.optim.lr_scheduler.SequentialLR(opt, parts, milestones=[1])
    if path == "transformers.PreTrainedModel":
        from tests.models import tiny_llama

        model = tiny_llama()
        model.enable_input_require_grads()
        return model
    if path == "lightning.pytorch.loggers.WandbLogger":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(mode="disabled", anonymous=None)
    raise AssertionError(f"no instance recipe for {path}: add one beside the new PRIVATE_ATTRIBUTES entry")


@pytest.mark.parametrize(("owner", "attribute"), [(o, a) for o, a, _ in PRIVATE_ATTRIBUTES])
def test_every_listed_private_attribute_is_still_there(owner, attribute):
    if not _installed(owner.split(".")[0]):
        pytest.skip(f"{owner.split('.')[0]} is not installed")
    instance = _instance(owner)
    assert isinstance(instance, _owner(owner))
    assert hasattr(instance, attribute), f"{owner} no longer has {attribute}"


def _private_imports(path: Path) -> list[str]:
    """``module.name`` for every import of a private third-party name in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
            parts = node.module.split(".")
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if any(p.startswith("_") for p in parts):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [
                a.name
                for a in node.names
                if a.name.split(".")[0] in THIRD_PARTY and any(p.startswith("_") for p in a.name.split("."))
            ]
    return found


def test_no_module_imports_a_private_third_party_name_except_through_the_list():
    files = [*sorted((ROOT / "lora_lightning").rglob("*.py")), *sorted((ROOT / "hydra_plugins").rglob("*.py"))]
    offenders = {str(f.relative_to(ROOT)): names for f in files if (names := _private_imports(f))}
    assert offenders == {}, f"import private names through lora_lightning.compat.private_names: {offenders}"
    assert Path(private_names.__file__).name == "private_names.py"


def test_architecture_lists_every_private_name():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [e.name for e in PRIVATE_NAMES.values() if e.name not in text]
    missing += [a for _, a, _ in PRIVATE_ATTRIBUTES if a not in text]
    assert missing == []
