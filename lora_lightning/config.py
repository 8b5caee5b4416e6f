"""LoRAConfig: the validated description of which modules get adapters, and how.

Target selection follows HF PEFT's rules so that an adapter trained here and one trained with PEFT
select the same modules from the same config:

* a list of names matches a module whose full name equals an entry or ends with ``"." + entry``;
* a single string is a regular expression that must match the *full* module name;
* ``"all-linear"`` selects every Linear / transformers Conv1D except the output head (resolved
  against a model in :mod:`lora_lightning.inject`, since it depends on module types);
* ``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched against the end of the
  module name (``(.*\\.)?key$``), first key that matches wins.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_lightning.nn.inits import INIT_NAMES, is_init_name, rewrites_base

ALL_LINEAR = "all-linear"
BiasMode = Literal["none", "all", "lora_only"]
BIAS_MODES: tuple[str, ...] = ("none", "all", "lora_only")
ADAPTER_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# Quantizations of a base (lora_lightning.quantize): nf4, nf4 with double-quantized scales, fp4, LLM.int8().
QUANT_METHODS: tuple[str, ...] = ("nf4", "nf4-dq", "fp4", "int8")

# The first numbered path segment is the index of the repeated block: ``model.layers.3.mlp`` -> 3.
# Lazy ``.*?`` so that nested indices (``layers.1.experts.0``) yield the block, not the expert.
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


class _Problems:
    """Collects every problem with a config so the user sees them all in one error."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.only_types = True

    def type_error(self, message: str) -> None:
        self.messages.append(message)

    def value_error(self, message: str) -> None:
        self.messages.append(message)
        self.only_types = False

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        text = (
            self.messages[0] if len(self.messages) == 1 else "invalid LoRAConfig:\n  - " + "\n  - ".join(self.messages)
        )
        raise (TypeError if self.only_types else ValueError)(text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _str_list(value: Any) -> list[str] | None:
    """A list of strings from any non-string sequence of strings (tuples, Hydra ListConfig), else None."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    items = list(value)
    return items if all(isinstance(item, str) for item in items) else None


def _check_regex(problems: _Problems, field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        problems.value_error(f"{field_name} {pattern!r} is not a valid regular expression: {err}")


def name_matches(name: str, rule: str | list[str]) -> bool:
    """Whether a full module name matches a target rule (a regex string or a list of name suffixes)."""
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in rule)


def layer_index(name: str, layers_pattern: list[str] | None = None) -> int | None:
    """Index of the repeated block a module sits in (``model.layers.3.self_attn.q_proj`` -> 3).

    Args:
        name: full module name.
        layers_pattern: names of the block containers (``["layers", "h"]``); None accepts any.

    Returns:
        The first index that follows a block container in the name, or None outside any block.
    """
    if not layers_pattern:
        match = _LAYER_INDEX.match(name)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Any | None:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


@dataclass
class LoRAConfig:
    """Which modules get LoRA adapters and with what rank, scale, init and trainable extras.

    The adapted layer computes ``h = W x + scale * B A x`` with ``scale = alpha / r`` (``alpha /
    sqrt(r)`` with ``use_rslora``); ``B`` starts at zero so the adapted model starts exactly at
    the base model.

    Every field is validated at construction; all problems are reported in one error that names
    the field, the bad value and what is allowed.
    """

    r: int = 8
    """Rank of the update: A is (r x in_features), B is (out_features x r)."""
    alpha: float | None = None
    """Scale numerator; None means ``alpha = r`` (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input, active only in training mode; in [0, 1)."""
    use_rslora: bool = False
    """Rank-stabilised scale ``alpha / sqrt(r)`` (Kalajdzievski 2023) instead of ``alpha / r``."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): a trained magnitude per output over the direction of ``W + scale * B A``."""
    bias: BiasMode = "none"
    """Which biases train: none, all biases of the model, or the biases of adapted layers only."""
    target_modules: list[str] | str = ALL_LINEAR
    """Name suffixes, one regex for the full name, or "all-linear" (every linear and expert bank but the
    head). An entry naming a Mixture-of-Experts experts module (``"experts"``) adapts its fused bank."""
    target_parameters: list[str] | None = None
    """Fused expert parameters to adapt, by name suffix as PEFT's ``target_parameters``
    (``["experts.gate_up_proj", "experts.down_proj"]``); ``target_modules`` may then be ``[]``."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, same rules as target_modules."""
    layers_to_transform: list[int] | int | None = None
    """Adapt only modules inside these repeated blocks (the N in ``model.layers.N``)."""
    layers_pattern: list[str] | str | None = None
    """Names of the block container (``layers``, ``h``) when the default detection is ambiguous."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: regex key (matched on the end of the name) -> r."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: regex key -> alpha."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapters (e.g. a new classification head)."""
    init_lora_weights: str = "kaiming"
    """Init: kaiming-uniform A (as nn.Linear and PEFT) or gaussian N(0, init_std) A, B zero; or "pissa"
    (exact SVD), "pissa_niter_<n>" (randomised SVD, n subspace iterations), "olora" (QR): A and B
    start from the base weight's principal part and the base becomes the residual."""
    init_std: float = 0.02
    """Standard deviation of A for ``init_lora_weights="gaussian"``."""
    freeze_A: bool = False
    """LoRA-FA (Zhang et al. 2023): A stays at its init, only B trains, no layer input is saved."""
    adapter_dtype: str | None = None
    """dtype of A and B ("float32", "bfloat16", "float16"); None = the base weight's dtype."""
    allow_unmatched_targets: bool = False
    """A target_modules entry that names no module is an error (usually a typo); True lets it pass."""

    def __post_init__(self) -> None:
        p = _Problems()
        self._normalise_sequences(p)
        if not _is_int(self.r):
            p.type_error(f"r must be a positive integer, got {self.r!r} ({type(self.r).__name__})")
        elif self.r <= 0:
            p.value_error(f"r must be a positive integer, got {self.r}")
        if self.alpha is None:
            if _is_int(self.r):  # (a bad r is reported above; alpha then has no default to take)
                self.alpha = self.r
        elif not _is_number(self.alpha):
            p.type_error(f"alpha must be a positive number, got {self.alpha!r}")
        elif not math.isfinite(self.alpha) or self.alpha <= 0:
            p.value_error(f"alpha must be a positive number, got {self.alpha}")
        if not _is_number(self.dropout):
            p.type_error(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        elif not 0.0 <= self.dropout < 1.0:
            p.value_error(f"dropout must be in [0, 1), got {self.dropout}")
        for flag in ("use_rslora", "use_dora", "freeze_A", "allow_unmatched_targets"):
            if not isinstance(getattr(self, flag), bool):
                p.type_error(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.bias not in BIAS_MODES:
            p.value_error(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {self.bias!r}")
        if not is_init_name(self.init_lora_weights):
            p.value_error(f"init_lora_weights must be one of {INIT_NAMES}, got {self.init_lora_weights!r}")
        elif self.use_dora is True and rewrites_base(self.init_lora_weights):
            p.value_error(
                f"use_dora=True with init_lora_weights={self.init_lora_weights!r} is not supported: the adapter "
                "saved for the original base (rank 2r, B A - B0 A0) has no DoRA form; pick one of the two"
            )
        if self.use_dora is True and _is_number(self.dropout) and self.dropout > 0:
            p.value_error(
                f"use_dora=True with dropout={self.dropout} is not supported: DoRA would rescale a second base "
                "matmul over the dropped input in every layer; set dropout=0"
            )
        if not _is_number(self.init_std) or not self.init_std > 0:
            p.value_error(f"init_std must be a positive number, got {self.init_std!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            p.value_error(
                f"adapter_dtype must be None or one of {', '.join(map(repr, ADAPTER_DTYPES))}, "
                f"got {self.adapter_dtype!r}"
            )
        self._check_targets(p)
        self._check_patterns(p)
        p.raise_if_any()

    # -- validation helpers ------------------------------------------------------------------

    def _normalise_sequences(self, p: _Problems) -> None:
        """Turn tuples / Hydra ListConfig / DictConfig into plain lists and dicts (so eq and to_dict work)."""
        for name in ("target_modules", "target_parameters", "exclude_modules", "layers_pattern", "modules_to_save"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            items = _str_list(value)
            if items is None:
                p.type_error(f"{name} must be a string or a list of strings, got {value!r}")
            else:
                setattr(self, name, items)
        if isinstance(self.layers_to_transform, Sequence) and not isinstance(self.layers_to_transform, str):
            self.layers_to_transform = list(self.layers_to_transform)
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif isinstance(value, Mapping):
                setattr(self, name, dict(value))
            else:
                p.type_error(f"{name} must be a mapping of module-name regex to value, got {value!r}")

    def _check_targets(self, p: _Problems) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            if targets.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR
            elif not targets:
                p.value_error("target_modules must be a non-empty list, a regex, or \"all-linear\", got ''")
            else:
                _check_regex(p, "target_modules", targets)
        elif isinstance(targets, list) and not targets and not self.target_parameters:
            p.value_error(
                'target_modules must be a non-empty list, a regex, or "all-linear", got [] '
                "(an empty list is allowed when target_parameters names expert parameters)"
            )
        if isinstance(self.target_parameters, str):
            p.type_error(
                f"target_parameters must be a list of parameter names (['experts.gate_up_proj']), "
                f"got the string {self.target_parameters!r}"
            )
        elif self.target_parameters is not None and not all(self.target_parameters):
            p.value_error(f"target_parameters entries must be non-empty names, got {self.target_parameters!r}")
        if isinstance(self.exclude_modules, str):
            _check_regex(p, "exclude_modules", self.exclude_modules)
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if not isinstance(layers, list) else layers
            if not indices or not all(_is_int(i) and i >= 0 for i in indices):
                p.value_error(f"layers_to_transform must be a non-negative integer or a list of them, got {layers!r}")
            is_regex = isinstance(targets, str) and targets != ALL_LINEAR
            if is_regex:
                p.value_error(
                    "layers_to_transform cannot be combined with a regex target_modules "
                    f"({targets!r}): put the layer indices into the regex, or give target_modules as a list"
                )
        elif self.layers_pattern:
            p.value_error("layers_pattern needs layers_to_transform: it only says where layer indices are")

    def _check_patterns(self, p: _Problems) -> None:
        for key, value in self.rank_pattern.items():
            _check_regex(p, "rank_pattern key", key)
            if not _is_int(value) or value <= 0:
                p.value_error(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            _check_regex(p, "alpha_pattern key", key)
            if not _is_number(value) or value <= 0:
                p.value_error(f"alpha_pattern[{key!r}] must be a positive number, got {value!r}")

    # -- target selection --------------------------------------------------------------------

    @property
    def is_all_linear(self) -> bool:
        return self.target_modules == ALL_LINEAR

    def layer_indices(self) -> list[int] | None:
        if self.layers_to_transform is None:
            return None
        layers = self.layers_to_transform
        return [layers] if isinstance(layers, int) else list(layers)

    def is_excluded(self, name: str) -> bool:
        """Excluded by ``exclude_modules``, or inside / equal to a ``modules_to_save`` module."""
        if self.exclude_modules and name_matches(name, self.exclude_modules):
            return True
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in self.modules_to_save or ())

    def matches_name(self, name: str) -> bool:
        """The name rule alone (list suffix or regex); "all-linear" is resolved by the injector."""
        return not self.is_all_linear and name_matches(name, self.target_modules)

    def matches_parameter(self, name: str) -> bool:
        """A parameter's full name (``model.layers.0.mlp.experts.down_proj``) matches ``target_parameters``."""
        return bool(self.target_parameters) and name_matches(name, self.target_parameters)  # type: ignore[arg-type]

    def in_selected_layers(self, name: str) -> bool:
        indices = self.layer_indices()
        if indices is None:
            return True
        index = layer_index(name, self.layers_pattern)  # type: ignore[arg-type]
        return index is not None and index in indices

    @staticmethod
    def has_pattern(patterns: Mapping[str, Any], name: str) -> bool:
        """Whether a rank_pattern / alpha_pattern key matches ``name``."""
        return _pattern_value(patterns, name) is not None

    def rank_for(self, name: str) -> int:
        value = _pattern_value(self.rank_pattern, name)
        return self.r if value is None else int(value)

    def alpha_for(self, name: str) -> float:
        value = _pattern_value(self.alpha_pattern, name)
        return self.alpha if value is None else value  # type: ignore[return-value]

    # -- plain-dict round trip (Hydra, checkpoints) ------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of builtins (lists, dicts, numbers, strings) that ``from_dict`` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        """Build a config from a plain mapping; unknown keys are an error (they are usually typos)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"LoRAConfig.from_dict needs a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s) {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**dict(data))
