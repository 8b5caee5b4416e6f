"""The package's imports flow one way, in the order docs/ARCHITECTURE.md writes down, with no cycle.

Every import of one of the package's modules counts, at the top of a file or inside a function
(imports under ``if TYPE_CHECKING:`` are for annotations only and do not). A module may import
from its own layer and the layers listed before it; inside a layer the imports form no cycle.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_lightning"
#: what a lazy (in-function) import may load: a library a run of that code may not use
OPTIONAL = ("datasets", "bitsandbytes", "wandb", "matplotlib", "tensorboard", "mlflow")
PLATFORM = ("importlib", "resource", "pydoc_data", "torch.distributed")


def documented_layers() -> list[str]:
    """The layer names of the ``layers`` block in ARCHITECTURE.md, in order (first line first)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"<!-- layers -->\n```\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no <!-- layers --> block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    """``(module, inside a function, line)`` for every import in ``path`` (TYPE_CHECKING blocks aside)."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                continue
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "lora_lightning":  # from lora_lightning import x: x may be a module
                    found.extend((f"lora_lightning.{a.name}", inner, child.lineno) for a in child.names)
                else:
                    found.append((child.module, inner, child.lineno))
            elif isinstance(child, ast.Import):
                found.extend((a.name, inner, child.lineno) for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def internal(name: str) -> str | None:
    """The package module an imported name refers to (a module, or a name defined in one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(module: str, layers: list[str]) -> int | None:
    """Index of ``module``'s layer: the longest documented prefix; ``.`` is the package's own files."""
    rest = module.removeprefix("lora_lightning").lstrip(".")
    if rest in ("", "__main__"):
        return None  # the public API and the entry point stand above everything
    best = None
    for index, layer in enumerate(layers):
        if layer == "." and "." not in rest:
            best = best or (0, index)
        elif (rest == layer or rest.startswith(layer + ".")) and (best is None or len(layer) > best[0]):
            best = (len(layer), index)
    return None if best is None else best[1]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for imported, _, _ in imports_of(path):
            target = internal(imported) if imported.startswith("lora_lightning") else None
            if target and target != name and target != "lora_lightning":
                edges[name].add(target)
    return edges


def test_every_module_is_in_a_documented_layer():
    layers = documented_layers()
    unplaced = [
        m for m in MODULES if m not in ("lora_lightning", "lora_lightning.__main__") and layer_of(m, layers) is None
    ]
    assert unplaced == [], f"add these to the layers block of docs/ARCHITECTURE.md: {unplaced}"
    documented = {layer for layer in layers if layer != "."}
    folders = {module_name(p.parent) for p in PACKAGE.rglob("__init__.py")} - {"lora_lightning"}
    assert {f"lora_lightning.{layer}" for layer in documented} <= set(MODULES), documented
    assert all(any(f == f"lora_lightning.{layer}" for layer in documented) for f in folders), folders


def test_imports_flow_down_the_documented_order():
    layers = documented_layers()
    against = []
    for name, path in MODULES.items():
        mine = layer_of(name, layers)
        for imported, _, line in imports_of(path):
            target = internal(imported) if imported.startswith("lora_lightning") else None
            if mine is None or target is None or target == "lora_lightning":
                continue
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > mine:
                against.append(f"{path.relative_to(ROOT)}:{line} ({layers[mine]}) imports {target} ({layers[theirs]})")
    assert against == [], "imports against the order of docs/ARCHITECTURE.md:\n" + "\n".join(against)


def test_no_import_cycle_inside_the_package():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            connect(node)
    assert cycles == []


def test_a_lazy_import_is_only_for_a_library_a_run_may_not_use():
    lazy = []
    allowed = OPTIONAL + PLATFORM
    for path in MODULES.values():
        for imported, inside, line in imports_of(path):
            if not inside:
                continue
            if imported.startswith("lora_lightning") or not any(
                imported == p or imported.startswith(p + ".") for p in allowed
            ):
                lazy.append(f"{path.relative_to(ROOT)}:{line} imports {imported} inside a function")
    assert lazy == [], "\n".join(lazy)


def test_the_layering_test_sees_a_cycle_and_places_modules_by_their_longest_layer(monkeypatch):
    """The checks above can fail: a two-module cycle is found, and modules land in their layer."""
    assert layer_of("lora_lightning.ops.lora_linear", ["compat", "ops", "kinds"]) == 1
    assert layer_of("lora_lightning.config", ["ops", ".", "io"]) == 1
    assert layer_of("lora_lightning.app.sweep.rows", ["app", "app.data", "app.sweep"]) == 2
    fake = {"lora_lightning.a": {"lora_lightning.b"}, "lora_lightning.b": {"lora_lightning.a"}}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: fake)
    try:
        test_no_import_cycle_inside_the_package()
    except AssertionError:
        return
    raise AssertionError("a two-module cycle went unnoticed")
