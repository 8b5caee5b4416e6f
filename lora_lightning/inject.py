"""Find targets, swap in LoRA layers, freeze the base, and count parameters (pure torch).

``inject_lora`` plans everything first (which modules, which ranks, every error) and touches the
model only once the plan is complete, so a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lora_lightning.config import LoRAConfig, layer_index
from lora_lightning.layers import LoRAEmbedding, LoRALinear, is_conv1d, is_linear_like, is_lora_layer
from lora_lightning.sharing import share_inputs

# Top-level children that are output heads by convention; "all-linear" leaves them alone.
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "qa_outputs", "cls"})
_CONFIG_ATTR = "_lora_config"


@dataclass(frozen=True)
class AdaptedModule:
    """One adapted module as the report shows it."""

    name: str
    kind: str  # base layer type: Linear, Conv1D, Embedding
    in_features: int
    out_features: int
    r: int
    alpha: float
    scale: float

    @property
    def num_params(self) -> int:
        return self.r * (self.in_features + self.out_features)


@dataclass(frozen=True)
class ParameterSummary:
    """Trainable and total parameter counts (total includes adapters, as in PEFT)."""

    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )


@dataclass(frozen=True)
class LoRAReport:
    """What :func:`inject_lora` adapted: modules, ranks, extras trained in full, and counts."""

    config: LoRAConfig
    modules: list[AdaptedModule]
    modules_to_save: list[str]
    params: ParameterSummary

    @property
    def adapter_params(self) -> int:
        return sum(m.num_params for m in self.modules)

    def rows(self, max_rows: int = 40) -> list[tuple[str, str, str, str, str]]:
        """(module, type, in, out, r) per adapted module; past ``max_rows`` modules that differ
        only in block index collapse into one row (``model.layers.*.mlp.up_proj (x32)``)."""
        if len(self.modules) <= max_rows:
            return [(m.name, m.kind, str(m.in_features), str(m.out_features), str(m.r)) for m in self.modules]
        groups: dict[tuple[str, str, int, int, int], int] = {}
        for m in self.modules:
            key = (re.sub(r"\.\d+(?=\.)", ".*", m.name), m.kind, m.in_features, m.out_features, m.r)
            groups[key] = groups.get(key, 0) + 1
        return [
            (f"{name} (x{count})" if count > 1 else name, kind, str(i), str(o), str(r))
            for (name, kind, i, o, r), count in groups.items()
        ]

    def table(self, max_rows: int = 40) -> str:
        """A plain-text table of adapted modules (name, type, in, out, r); see :meth:`rows`."""
        rows = self.rows(max_rows)
        header = ("module", "type", "in", "out", "r")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.params}"


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Trainable / total parameter counts; ``str()`` of it is PEFT's familiar line.

    Tied parameters count once (``nn.Module.parameters`` deduplicates them), as in PEFT.
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterSummary(trainable=trainable, total=total)


def get_lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config adapters were injected with, found on the model or on the submodule that holds it."""
    for module in model.modules():
        config = getattr(module, _CONFIG_ATTR, None)
        if isinstance(config, LoRAConfig):
            return config
    return None


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    """Every LoRA layer of the model by its full name (the name the original module had)."""
    return {name: module for name, module in model.named_modules() if is_lora_layer(module)}


def _kind(module: nn.Module) -> str:
    return type(module.base_layer if is_lora_layer(module) else module).__name__


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that could be targets: everything but the root and LoRA layers' internals."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if is_lora_layer(module):
            inside.append(name + ".")
        found.append((name, module))
    return found


def _output_head_names(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> set[str]:
    """Names "all-linear" must skip: output embeddings of every HF model inside ``model`` (it may be
    wrapped, e.g. by a LightningModule), and conventional head names (``lm_head``, ``classifier``,
    ...) directly under the root or under an HF model."""
    heads: set[int] = set()
    containers = {id(model)}
    for _, module in [("", model), *candidates]:
        get_output = getattr(module, "get_output_embeddings", None)
        if callable(get_output) and not is_lora_layer(module):
            containers.add(id(module))
            head = get_output()
            if isinstance(head, nn.Module):
                heads.add(id(head))
    by_name = dict(candidates)
    names = set()
    for name, module in candidates:
        parent_name, _, leaf = name.rpartition(".")
        parent = by_name.get(parent_name, model) if parent_name else model
        if id(module) in heads or (leaf in HEAD_NAMES and id(parent) in containers):
            names.add(name)
    return names


def _leaf_names(candidates: list[tuple[str, nn.Module]]) -> list[str]:
    seen: dict[str, None] = {}
    for name, module in candidates:
        if is_linear_like(module) or isinstance(module, (nn.Embedding, LoRAEmbedding)):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def plan_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` selects in ``model``, validated; the model is not touched.

    Raises:
        ValueError: nothing matched, ``layers_to_transform`` out of range, ``modules_to_save``
            naming no module.
        TypeError: a target of a type that cannot be adapted.
    """
    candidates = _candidate_modules(model)
    if config.is_all_linear:
        heads = _output_head_names(model, candidates)
        by_name = [(n, m) for n, m in candidates if is_linear_like(m) and n not in heads]
    else:
        by_name = [(n, m) for n, m in candidates if config.matches_name(n)]
    by_name = [(n, m) for n, m in by_name if not config.is_excluded(n)]

    if not by_name:
        leaves = ", ".join(_leaf_names(candidates)) or "(none)"
        what = (
            f"regex {config.target_modules!r}"
            if isinstance(config.target_modules, str)
            else (f"{config.target_modules!r}")
        )
        hint = " (a regex must match the full module name)" if isinstance(config.target_modules, str) else ""
        raise ValueError(
            f"target_modules {what} matched no module{hint}; "
            f"linear and embedding modules in this model end with: {leaves}"
        )

    wanted_layers = config.layer_indices()
    if wanted_layers is not None:
        present = sorted({i for n, _ in by_name if (i := layer_index(n, config.layers_pattern)) is not None})
        missing = sorted(set(wanted_layers) - set(present))
        if missing:
            have = f"{present[0]}..{present[-1]}" if present else "none (no numbered blocks found)"
            raise ValueError(f"layers_to_transform {missing} out of range: the targeted modules sit in layers {have}")
        by_name = [(n, m) for n, m in by_name if config.in_selected_layers(n)]

    unsupported = [
        (n, m) for n, m in by_name if not (is_linear_like(m) or isinstance(m, (nn.Embedding, LoRAEmbedding)))
    ]
    if unsupported:
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in unsupported[:5])
        raise TypeError(
            f"target_modules selected module(s) that cannot be adapted: {listed}; "
            "LoRA adapts nn.Linear, transformers Conv1D and nn.Embedding: name the linear layers inside instead"
        )
    if config.freeze_A:
        embeddings = [n for n, m in by_name if isinstance(m, (nn.Embedding, LoRAEmbedding))]
        if embeddings:
            raise ValueError(
                f"freeze_A=True cannot adapt embedding {embeddings[0]!r}: its A starts at zero, so with A "
                "frozen the adapter could never move; exclude embeddings or set freeze_A=False"
            )

    names = {n for n, _ in candidates}
    for entry in config.modules_to_save or ():
        if not any(n == entry or n.endswith("." + entry) for n in names):
            raise ValueError(f"modules_to_save entry {entry!r} matched no module in this model")
    return by_name


def _check_weight_dtype(name: str, module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = "no weight" if weight is None else f"weight of dtype {weight.dtype}"
        raise TypeError(f"module {name!r} ({type(module).__name__}) has {kind}; LoRA needs a floating-point weight")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _modules_to_save(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    entries = config.modules_to_save or ()
    return [(n, m) for n, m in model.named_modules() if n and any(n == e or n.endswith("." + e) for e in entries)]


def mark_trainable(model: nn.Module, config: LoRAConfig) -> None:
    """Freeze every parameter, then unfreeze adapters, biases per ``config.bias``, modules_to_save."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(not (config.freeze_A and isinstance(layer, LoRALinear)))
        layer.lora_B.requires_grad_(True)
        if config.bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:  # PEFT's rule, so counts agree with it
                param.requires_grad_(True)
    for _, module in _modules_to_save(model, config):
        for param in module.parameters():
            param.requires_grad_(True)


def lora_report(model: nn.Module, config: LoRAConfig | None = None) -> LoRAReport:
    """The report for a model that already carries adapters."""
    config = config or get_lora_config(model)
    if config is None:
        raise ValueError("model carries no LoRA config: inject adapters with inject_lora first")
    modules = [
        AdaptedModule(
            name=name,
            kind=_kind(layer),
            in_features=layer.in_features,
            out_features=layer.out_features,
            r=layer.r,
            alpha=layer.alpha,
            scale=layer.scale,
        )
        for name, layer in lora_layers(model).items()
    ]
    saved = [name for name, _ in _modules_to_save(model, config)]
    return LoRAReport(config=config, modules=modules, modules_to_save=saved, params=parameter_summary(model))


def inject_lora(model: nn.Module, config: LoRAConfig) -> LoRAReport:
    """Swap the selected modules for LoRA layers in place and freeze everything else.

    Works on the meta device (adapter factors are created where the base weight lives), so a
    parameter count for an 8B-parameter config costs no memory.

    Injecting into a model that already carries adapters is a no-op returning the report when
    the config is identical (so repeated setup calls are safe), and an error otherwise.

    Args:
        model: any ``nn.Module``; modified in place.
        config: what to adapt.

    Returns:
        A :class:`LoRAReport` of adapted modules and parameter counts.

    Raises:
        ValueError / TypeError: before the model is modified; see :func:`plan_targets`.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    existing = lora_layers(model)
    if existing:
        previous = get_lora_config(model)
        if previous == config:
            return lora_report(model, config)
        described = f"r={previous.r}, target_modules={previous.target_modules!r}" if previous else "unknown config"
        raise ValueError(
            f"model already carries LoRA adapters on {len(existing)} module(s) ({described}); injecting a "
            f"different config (r={config.r}, target_modules={config.target_modules!r}) on top is not supported: "
            "call merge_and_unload(model) first, or pass the same config to make this a no-op"
        )

    targets = plan_targets(model, config)
    for name, module in targets:
        _check_weight_dtype(name, module)
    dtype = getattr(torch, config.adapter_dtype) if config.adapter_dtype else None

    for name, module in targets:
        layer_cls = LoRAEmbedding if isinstance(module, nn.Embedding) else LoRALinear
        _set_submodule(
            model,
            name,
            layer_cls(
                module,
                r=config.rank_for(name),
                alpha=config.alpha_for(name),
                dropout=config.dropout,
                use_rslora=config.use_rslora,
                init=config.init_lora_weights,
                init_std=config.init_std,
                dtype=dtype,
            ),
        )
    setattr(model, _CONFIG_ATTR, config)
    mark_trainable(model, config)
    share_inputs(model)
    return lora_report(model, config)


def remove_lora_config(model: nn.Module) -> None:
    """Forget the stored config and the grouping hooks (after the adapters have been unloaded).

    The plain model keeps nothing of lora_lightning: no attribute, no hook holding the removed
    layers alive.
    """
    share_inputs(model, enabled=False)
    for module in model.modules():
        if _CONFIG_ATTR in vars(module):
            delattr(module, _CONFIG_ATTR)


__all__ = [
    "AdaptedModule",
    "LoRAReport",
    "ParameterSummary",
    "get_lora_config",
    "inject_lora",
    "is_conv1d",
    "lora_layers",
    "lora_report",
    "mark_trainable",
    "parameter_summary",
    "plan_targets",
]
