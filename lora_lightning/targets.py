"""Target selection: which modules of a model a :class:`~lora_lightning.LoRAConfig` adapts.

:func:`plan_targets` resolves the config's name rules (a list of suffixes, a regex, "all-linear",
layer indices, exclusions) on a model and checks every problem before anything changes;
:func:`output_head_names` is what "all-linear" and quantization leave alone.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from lora_lightning.config import LoRAConfig, layer_index, name_matches
from lora_lightning.kinds.bnb_experts import bank_kind
from lora_lightning.kinds.experts import (
    DOWN,
    GATED_UP,
    PLAIN_UP,
    ROUTER_PARAMETER,
    is_expert_bank,
    is_router,
    layout_of,
)
from lora_lightning.nn.experts import BANK_INITS, is_lora_bank
from lora_lightning.nn.inits import rewrites_base
from lora_lightning.nn.layers import adaptable_kind, is_lora_layer

# Top-level children that are output heads by convention; "all-linear" leaves them alone.
# For any module: a child of the root (or of a transformers model inside it) with one of these names.
# For transformers models also whatever get_output_embeddings() returns, whatever its name.
HEAD_NAMES = frozenset({"lm_head", "head", "output", "score", "classifier", "qa_outputs", "cls"})


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that could be targets: everything but the root and LoRA layers' internals."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if is_lora_layer(module) or is_lora_bank(module):
            inside.append(name + ".")
        found.append((name, module))
    return found


@dataclass(frozen=True)
class BankTarget:
    """An expert bank (or a router) a config adapts: its module name, the module, the parameters adapted."""

    name: str
    module: nn.Module
    projections: tuple[str, ...]
    router: bool = False

    def parameter_names(self) -> list[str]:
        """Full names of the adapted parameters (``...mlp.experts.down_proj``): what rank_pattern keys match."""
        return [f"{self.name}.{p}" for p in self.projections]


# class-name endings of MoE routers (``*TopKRouter`` bare weights, Llama 4's ``Llama4Router`` linear layer)
ROUTER_SUFFIXES = ("Router", "TopKRouter", "TopkRouter")


def _is_linear_router(module: nn.Module) -> bool:
    """A router that is an ``nn.Linear`` (Llama 4's ``Llama4Router``): all-linear leaves it, as the bare ones."""
    base = module.base_layer if is_lora_layer(module) else module
    return type(base).__name__.endswith(ROUTER_SUFFIXES)


def _is_router(module: nn.Module) -> bool:
    return adaptable_kind(module) is None and is_router(module)


def _bank_module(module: nn.Module) -> nn.Module:
    return module.base_layer if is_lora_bank(module) else module


def _bank_projections(module: nn.Module) -> tuple[str, ...]:
    layout = layout_of(module)
    if layout is not None:
        return layout.projections
    params = dict(module.named_parameters(recurse=False))
    return tuple(p for p in (GATED_UP, PLAIN_UP, DOWN) if p in params)


def _bank_targets(candidates: list[tuple[str, nn.Module]], config: LoRAConfig) -> list[BankTarget]:
    """The expert banks (and which of their projections) ``config`` selects, before the layer filter."""
    found = []
    for name, module in candidates:
        module = _bank_module(module)
        if config.is_excluded(name):
            continue
        if _is_router(module):  # only when named: all-linear leaves routers alone (README: "Routers")
            parameter = f"{name}.{ROUTER_PARAMETER}"
            if config.matches_name(name) or config.matches_parameter(parameter):
                found.append(BankTarget(name, module, (ROUTER_PARAMETER,), router=True))
            continue
        if not is_expert_bank(module):
            continue
        projections = _bank_projections(module)
        if not (config.is_all_linear or config.matches_name(name)):
            projections = tuple(p for p in projections if config.matches_parameter(f"{name}.{p}"))
        projections = tuple(p for p in projections if not config.is_excluded(f"{name}.{p}"))
        if projections:
            found.append(BankTarget(name, module, projections))
    return found


def _check_banks(config: LoRAConfig, banks: list[BankTarget], candidates: list[tuple[str, nn.Module]]) -> None:
    """Every bank selected can be adapted as asked; every target_parameters entry names a bank parameter."""
    for bank in banks:
        if bank.router:
            if config.dropout:
                raise ValueError(
                    f"dropout={config.dropout} cannot apply to router {bank.name!r}: its update goes into the "
                    "weight, there is no adapter input to drop; set dropout=0 or leave routers out of "
                    "target_parameters"
                )
            continue
        problem = bank_kind(bank.module).problem(bank.module)
        if problem is not None:
            raise TypeError(
                f"module {bank.name!r} ({type(bank.module).__name__}) {problem}; exclude it with exclude_modules"
            )
        if config.use_dora:
            raise ValueError(
                f"use_dora=True cannot adapt expert bank {bank.name!r}: DoRA's per-output norm of W + s B A would "
                "form every expert's merged weight; exclude the experts (exclude_modules=['experts']) or set "
                "use_dora=False"
            )
        if config.init_lora_weights not in BANK_INITS:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} cannot start expert bank {bank.name!r}; banks take "
                f"{' or '.join(map(repr, BANK_INITS))}: exclude the experts or pick one of those"
            )
    if not config.target_parameters:
        return
    parameters = [
        f"{name}.{p}"
        for name, module in candidates
        if is_expert_bank(bank := _bank_module(module))
        for p in _bank_projections(bank)
    ]
    parameters += [f"{name}.{ROUTER_PARAMETER}" for name, module in candidates if _is_router(_bank_module(module))]
    unmatched = [entry for entry in config.target_parameters if not any(name_matches(n, [entry]) for n in parameters)]
    if config.allow_unmatched_targets and len(unmatched) < len(config.target_parameters):
        return  # (as PEFT: entries for other model families may pass, but something must match)
    if unmatched:
        have = sorted({n.split(".", 1)[-1] if "." not in n else ".".join(n.rsplit(".", 2)[-2:]) for n in parameters})
        raise ValueError(
            f"target_parameters entr{'y' if len(unmatched) == 1 else 'ies'} {unmatched} matched no fused expert "
            f"parameter; {'this model has: ' + ', '.join(have) if have else 'this model has no fused experts'}"
        )


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


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output heads "all-linear" (and quantization) leave alone; see :data:`HEAD_NAMES`."""
    return _output_head_names(model, _candidate_modules(model))


def _is_linear(module: nn.Module) -> bool:
    kind = adaptable_kind(module)
    return kind is not None and not kind.embedding


def _leaf_names(candidates: list[tuple[str, nn.Module]]) -> list[str]:
    seen: dict[str, None] = {}
    for name, module in candidates:
        if adaptable_kind(module) is not None or is_expert_bank(_bank_module(module)):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def _check_every_entry_matches(entries: list[str], candidates: list[tuple[str, nn.Module]]) -> None:
    """A list entry that names no module is almost always a typo that would silently train less."""
    names = [name for name, _ in candidates]
    unmatched = [entry for entry in entries if not any(name_matches(name, [entry]) for name in names)]
    if not unmatched:
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    hints = []
    for entry in unmatched:
        close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
        close += [n for n in difflib.get_close_matches(entry, names, n=3, cutoff=0.6) if n not in close]
        hints.append(f"{entry!r} (nearest module names: {', '.join(close[:4]) or 'none close'})")
    raise ValueError(
        f"target_modules entr{'y' if len(unmatched) == 1 else 'ies'} matched no module: {'; '.join(hints)}; "
        "fix the name, or set allow_unmatched_targets=True when the list covers several model families"
    )


def _check_base_rewrite(init: str, targets: list[tuple[str, nn.Module]]) -> None:
    """PiSSA / OLoRA rewrite each target's weight: it must be a materialised, dense linear weight."""
    for name, module in targets:
        kind = adaptable_kind(module)
        if kind.embedding:
            problem = "is an embedding; these inits start a linear layer's factors from its weight (as PEFT's)"
        elif not kind.dense:
            problem = f"is quantized ({kind.name}); rewriting its weight into the residual would requantize it"
        elif kind.is_meta(module):
            problem = "has its weight on the meta device; load the base weights first"
        else:
            continue
        raise ValueError(
            f"init_lora_weights={init!r} cannot start module {name!r}: it {problem}; exclude it from "
            "target_modules or use init_lora_weights='kaiming'"
        )


def plan_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """The linear and embedding modules ``config`` selects in ``model``, validated (banks included in
    the checks; :func:`plan_banks` lists them); the model is not touched."""
    return plan_adapters(model, config)[0]


def plan_banks(model: nn.Module, config: LoRAConfig) -> list[BankTarget]:
    """The expert banks ``config`` selects in ``model``, validated; the model is not touched."""
    return plan_adapters(model, config)[1]


def plan_adapters(model: nn.Module, config: LoRAConfig) -> tuple[list[tuple[str, nn.Module]], list[BankTarget]]:
    """The modules ``config`` selects in ``model``: linear / embedding layers, and expert banks.

    Raises:
        ValueError: nothing matched, ``layers_to_transform`` out of range, ``modules_to_save``
            naming no module, a variant or init a bank cannot take.
        TypeError: a target of a type that cannot be adapted, a bank of an unknown layout.
    """
    candidates = _candidate_modules(model)
    banks = _bank_targets(candidates, config)
    if config.is_all_linear:
        heads = _output_head_names(model, candidates)
        by_name = [(n, m) for n, m in candidates if _is_linear(m) and n not in heads and not _is_linear_router(m)]
    else:
        claimed = {b.name for b in banks}
        by_name = [(n, m) for n, m in candidates if config.matches_name(n) and n not in claimed]
    by_name = [(n, m) for n, m in by_name if not config.is_excluded(n)]

    if isinstance(config.target_modules, list) and (by_name or banks) and not config.allow_unmatched_targets:
        _check_every_entry_matches(config.target_modules, candidates)
    _check_layers(config, by_name + [(b.name, b.module) for b in banks])
    banks = [b for b in banks if config.in_selected_layers(b.name)]
    _check_banks(config, banks, candidates)
    if not by_name and banks:
        _check_saved(model, config, candidates)
        return [], banks
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

    by_name = [(n, m) for n, m in by_name if config.in_selected_layers(n)]

    unsupported = [(n, m) for n, m in by_name if adaptable_kind(m) is None]
    if unsupported:
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in unsupported[:5])
        raise TypeError(
            f"target_modules selected module(s) that cannot be adapted: {listed}; "
            "LoRA adapts nn.Linear, transformers Conv1D and nn.Embedding: name the linear layers inside instead"
        )
    if config.freeze_A:
        embeddings = [n for n, m in by_name if adaptable_kind(m).embedding]
        if embeddings:
            raise ValueError(
                f"freeze_A=True cannot adapt embedding {embeddings[0]!r}: its A starts at zero, so with A "
                "frozen the adapter could never move; exclude embeddings or set freeze_A=False"
            )

    if rewrites_base(config.init_lora_weights):
        _check_base_rewrite(config.init_lora_weights, by_name)
    _check_saved(model, config, candidates)
    return by_name, banks


def _check_layers(config: LoRAConfig, selected: list[tuple[str, nn.Module]]) -> None:
    wanted_layers = config.layer_indices()
    if wanted_layers is None:
        return
    present = sorted({i for n, _ in selected if (i := layer_index(n, config.layers_pattern)) is not None})
    missing = sorted(set(wanted_layers) - set(present))
    if missing:
        have = f"{present[0]}..{present[-1]}" if present else "none (no numbered blocks found)"
        raise ValueError(f"layers_to_transform {missing} out of range: the targeted modules sit in layers {have}")


def _check_saved(model: nn.Module, config: LoRAConfig, candidates: list[tuple[str, nn.Module]]) -> None:
    names = {n for n, _ in candidates}
    for entry in config.modules_to_save or ():
        if not any(name_matches(n, [entry]) for n in names):
            raise ValueError(f"modules_to_save entry {entry!r} matched no module in this model")
    for name, module in modules_to_save(model, config):
        kind = adaptable_kind(module)
        if kind is not None and not kind.dense:
            raise ValueError(
                f"modules_to_save includes {name!r} ({type(module).__name__}), a quantized layer; modules trained in "
                "full must stay in full precision: keep it out of the quantization (llm_int8_skip_modules in "
                "BitsAndBytesConfig) or drop it from modules_to_save"
            )


def modules_to_save(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config.modules_to_save`` selects (and their submodules), trained in full."""
    entries = config.modules_to_save or []
    return [(n, m) for n, m in model.named_modules() if n and name_matches(n, entries)]


def modules_to_save_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Full names of the modules ``config.modules_to_save`` selects (and their submodules)."""
    return [name for name, _ in modules_to_save(model, config)]
