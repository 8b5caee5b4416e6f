"""HF PEFT's on-disk LoRA format: ``adapter_config.json`` fields and ``adapter_model.safetensors`` key names.

Pure mapping, no model mutation and no I/O; :mod:`lora_lightning.io.adapters` does the reading, checking
and writing. The rules follow PEFT's installed source (``peft/utils/save_and_load.py``,
``peft/tuners/tuners_utils.py``, ``peft/tuners/lora/config.py``):

* every key starts with ``base_model.model.`` followed by the module path in the base model;
* linear factors are ``<module>.lora_A.weight`` (r x in) and ``<module>.lora_B.weight`` (out x r),
  embedding factors ``<module>.lora_embedding_A`` (r x num_embeddings) and ``..._B`` (dim x r);
* trained biases and ``modules_to_save`` parameters keep the model's own key (``<module>.bias``,
  ``<adapted>.base_layer.bias``), exactly as our state_dict names them;
* a raw PEFT state_dict carries the adapter name (``lora_A.default.weight``,
  ``lm_head.modules_to_save.default.weight``); loading accepts that form too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lora_lightning.config import LoRAConfig, name_matches
from lora_lightning.nn.inits import rewrites_base
from lora_lightning.nn.variants import ALL_ROLES, TensorRole

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
METADATA_CONFIG_KEY = "lora_lightning.config"
METADATA_TRAINED_FROM_KEY = "lora_lightning.trained_from_init"  # PiSSA / OLoRA, written converted
METADATA_EXPERTS_KEY = "lora_lightning.experts"  # expert banks written per expert (save_adapter)

# PEFT fields we implement, with the default PEFT assumes when a (older) file lacks them.
SUPPORTED_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "bias": "none",
    "target_modules": None,
    "target_parameters": None,
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "init_lora_weights": True,
    "use_dora": False,
}
# Fields that change the forward pass or the weight layout in ways we do not implement: any value
# other than the default is refused, naming the field.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "use_qalora": False,
    "lora_bias": False,
    "layer_replication": None,
    "megatron_config": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# Fields that never change what a loaded adapter computes: bookkeeping, runtime switches, options of
# an init we either reject (loftq, pissa, ...) or do not need (the weights come from the file), and
# fan_in_fan_out, which we read off the module type (transformers Conv1D) instead.
IGNORED_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "runtime_config",
        "fan_in_fan_out",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "lora_lightning",  # our record in adapters written before 0.1.0 moved it into the weights' metadata
    }
)
# init_lora_weights values that only shape the *initial* factors: irrelevant once weights are loaded.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Those that also rewrite the base into a residual: loading runs them on the base (as PEFT does).
# Heads PEFT adds to modules_to_save on its own for these task types.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _unset(value: Any, default: Any) -> bool:
    """Whether a field is at its default (null, false, an empty list / dict all stand for "unset")."""
    if value is None:
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default or (value is False and default is None)
    return value == default or (default is None and value in ({}, [], ""))


def config_from_peft(data: Mapping[str, Any], source: str = CONFIG_NAME) -> LoRAConfig:
    """Translate a PEFT ``adapter_config.json`` dict into a :class:`LoRAConfig`.

    Args:
        data: the parsed JSON.
        source: file name for error messages.

    Raises:
        ValueError: not a LoRA adapter, an unsupported field set to a non-default value, an unknown
            field with a value, or values LoRAConfig rejects; every problem in one message.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type must be 'LORA', got {data.get('peft_type')!r}; only LoRA is supported")
    problems = []
    for name, default in UNSUPPORTED_DEFAULTS.items():
        if name in data and not _unset(data[name], default):
            problems.append(f"{name}={data[name]!r} is not supported (only {default!r})")
    init = data.get("init_lora_weights", True)
    if init not in _PLAIN_INITS and not (isinstance(init, str) and rewrites_base(init)):
        problems.append(
            f"init_lora_weights={init!r} is not supported: it changes the base weights (CorDA, LoftQ, LoRA-GA) or "
            "the layer (MiCA); convert the adapter with PEFT's path_initial_model_for_weight_conversion"
        )
    known = set(SUPPORTED_DEFAULTS) | set(UNSUPPORTED_DEFAULTS) | IGNORED_FIELDS
    for name in sorted(set(data) - known):
        if not _unset(data[name], None):
            problems.append(f"unknown field {name}={data[name]!r} (a newer PEFT feature lora-lightning does not know)")
    if data.get("target_modules") is None and not data.get("target_parameters"):
        problems.append("target_modules is null: the adapter names no modules")
    if problems:
        raise ValueError(f"{source}: cannot load this LoRA adapter:\n  - " + "\n  - ".join(problems))

    value = {name: data.get(name, default) for name, default in SUPPORTED_DEFAULTS.items()}
    plain_init = "gaussian" if init == "gaussian" else "kaiming"
    targets = value["target_modules"]
    parameters = value["target_parameters"]
    if targets is None or (isinstance(targets, (list, tuple)) and not targets):
        targets = []  # only target_parameters (PEFT allows that)
    layers = value["layers_to_transform"]
    if isinstance(targets, str) or layers in ([], None):
        # PEFT applies layers_to_transform to list targets only; with a regex it is ignored.
        layers, pattern = None, None
    else:
        pattern = value["layers_pattern"] or None
    try:
        return LoRAConfig(
            r=value["r"],
            alpha=value["lora_alpha"],
            dropout=value["lora_dropout"],
            use_rslora=value["use_rslora"],
            bias=value["bias"],
            target_modules=sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
            target_parameters=sorted(parameters) if parameters else None,
            exclude_modules=value["exclude_modules"] or None,
            layers_to_transform=layers,
            layers_pattern=pattern,
            rank_pattern=value["rank_pattern"] or {},
            alpha_pattern=value["alpha_pattern"] or {},
            modules_to_save=value["modules_to_save"] or None,
            init_lora_weights=init if isinstance(init, str) and rewrites_base(init) else plain_init,
            use_dora=value["use_dora"],
            # PEFT lets entries that name no module pass; the file's tensors are checked one by one.
            allow_unmatched_targets=True,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{source}: invalid LoRA config ({err}); PEFT's lora_alpha / lora_dropout are alpha / dropout here"
        ) from err


def drop_absent_task_heads(config: LoRAConfig, task_type: str | None, module_names: Iterable[str]) -> LoRAConfig:
    """Remove the heads PEFT adds to ``modules_to_save`` for its task type when this model has none of that name.

    PEFT writes ``["classifier", "score"]`` for every sequence-classification adapter although a model
    has one of them; our target planning would (rightly) refuse the absent one.
    """
    heads = TASK_HEADS.get(task_type or "", ())
    if not heads or not config.modules_to_save:
        return config
    names = list(module_names)
    kept = [m for m in config.modules_to_save if m not in heads or any(name_matches(n, [m]) for n in names)]
    if kept == config.modules_to_save:
        return config
    return LoRAConfig.from_dict({**config.to_dict(), "modules_to_save": kept or None})


def peft_config_dict(
    config: LoRAConfig,
    ranks: Mapping[str, tuple[int, float]],
    modules_to_save: list[str],
    *,
    fan_in_fan_out: bool,
    task_type: str | None,
    base_model_name_or_path: str | None,
    parameters: Mapping[str, tuple[int, float]] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for adapted modules (full name -> (r, alpha)) and adapted
    expert / router parameters (full parameter name -> (r, alpha)).

    ``target_modules`` lists the full names of the adapted modules, so PEFT adapts exactly these (an
    entry equal to a module's full name matches it and only it), ``target_parameters`` the full names
    of the adapted bare parameters; ranks and alphas that differ from ``r`` / ``lora_alpha`` go to
    ``rank_pattern`` / ``alpha_pattern`` under the full name (per expert: PEFT's file holds ``r x E``
    rows for a bank of ``E`` experts at rank ``r``).
    """
    parameters = dict(parameters or {})
    everything = {**ranks, **parameters}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": config.bias,
        "target_modules": sorted(ranks),
        "target_parameters": sorted(parameters) or None,
        "rank_pattern": {name: r for name, (r, _) in sorted(everything.items()) if r != config.r},
        "alpha_pattern": {name: alpha for name, (_, alpha) in sorted(everything.items()) if alpha != config.alpha},
        "modules_to_save": modules_to_save or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": "gaussian" if config.init_lora_weights == "gaussian" else True,
    }


def alpha_factor(config: LoRAConfig) -> float:
    """How alpha grows when the rank doubles and the scale must stay (``alpha / r``; rsLoRA ``alpha / sqrt(r)``)."""
    return 2**0.5 if config.use_rslora else 2.0


def for_original_base(config: LoRAConfig) -> LoRAConfig:
    """The config of the adapter a base-rewriting init (PiSSA, OLoRA) is written as: rank ``2r``,
    the update ``B A - B0 A0`` on the *original* base, a plain init (PEFT's conversion)."""
    factor = alpha_factor(config)
    return LoRAConfig.from_dict(
        {
            **config.to_dict(),
            "r": 2 * config.r,
            "alpha": config.alpha * factor,
            "rank_pattern": {key: 2 * value for key, value in config.rank_pattern.items()},
            "alpha_pattern": {key: value * factor for key, value in config.alpha_pattern.items()},
            "init_lora_weights": "kaiming",
        }
    )


# -- tensor key names ------------------------------------------------------------------------------

_WRAPPED_FILE_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>modules_to_save|original_module)\.(?P<rest>.+)$")


def _role_patterns(roles: Iterable[TensorRole]) -> list[tuple[re.Pattern[str], TensorRole, bool]]:
    """One regex per (role, layer kind): ``<module>.<stem><saved>`` or raw ``<module>.<stem>.<adapter><raw>``."""
    patterns = []
    for role in roles:
        for embedding in (False, True):
            name = role.file_name(embedding)
            if name is None:
                continue
            saved, raw = re.escape(name.saved), re.escape(name.raw)
            regex = rf"^(?P<module>.+)\.{re.escape(name.stem)}(?:{saved}|\.(?P<adapter>[^.]+){raw})$"
            patterns.append((re.compile(regex), role, embedding))
    return patterns


_PATTERNS = _role_patterns(ALL_ROLES)


def lora_file_key(module: str, role: TensorRole, embedding: bool) -> str:
    """PEFT's file key of one adapter tensor: ``base_model.model.q_proj.lora_A.weight``."""
    name = role.file_name(embedding)
    if name is None:
        raise ValueError(f"{role.attr} has no PEFT key on {'an embedding' if embedding else 'a linear layer'}")
    return f"{PEFT_PREFIX}{module}.{name.stem}{name.saved}"


def to_peft_key(own_key: str, roles: Iterable[TensorRole], embedding: bool = False) -> str:
    """Our state_dict key (relative to the adapted root) -> PEFT's file key.

    ``q_proj.lora_A`` -> ``base_model.model.q_proj.lora_A.weight``; for an embedding
    ``embed.lora_A`` -> ``base_model.model.embed.lora_embedding_A``; any other key keeps its name.
    """
    module, _, leaf = own_key.rpartition(".")
    role = next((role for role in roles if role.attr == leaf), None)
    return lora_file_key(module, role, embedding) if role is not None else PEFT_PREFIX + own_key


@dataclass(frozen=True)
class FileKey:
    """One tensor of an adapter file, parsed.

    ``role`` is the adapter tensor's :class:`TensorRole` (``lora_A``, ``lora_B``, ...) with
    ``embedding`` telling which of PEFT's names it had, or None for any other tensor: ``original``
    is then True for PEFT's untouched copy inside a modules_to_save wrapper, and ``own_keys`` are
    the model state_dict keys it may stand for (bias, modules_to_save parameter, base weight), most
    likely first.
    """

    file_key: str
    module: str
    role: TensorRole | None
    embedding: bool
    adapter: str | None
    own_keys: tuple[str, ...] = ()
    original: bool = False


def parse_file_key(file_key: str) -> FileKey:
    """Parse a PEFT file key; the ``base_model.model.`` prefix is optional, the adapter name too."""
    key = file_key.removeprefix(PEFT_PREFIX)
    for pattern, role, embedding in _PATTERNS:
        match = pattern.match(key)
        if match:
            return FileKey(file_key, match["module"], role, embedding, match["adapter"])
    match = _WRAPPED_FILE_KEY.match(key)
    if match:
        module, rest = match["module"], match["rest"]
        if match["role"] == "original_module":
            return FileKey(file_key, module, None, False, None, (f"{module}.{rest}",), original=True)
        # "<m>.modules_to_save.<adapter>.<param>" (raw state_dict) or "<m>.modules_to_save.<param>"
        # (PEFT's bias="all" rule saves it so): the caller picks whichever names a real key.
        head, _, tail = rest.partition(".")
        candidates = (f"{module}.{tail}", f"{module}.{rest}") if tail else (f"{module}.{rest}",)
        return FileKey(file_key, module, None, False, head if tail else None, candidates)
    return FileKey(file_key, key.rpartition(".")[0], None, False, None, (key,))


# -- expert banks and routers (PEFT's target_parameters) -------------------------------------------
#
# PEFT wraps each targeted parameter of a module in a ParamWrapper, nesting them in the order the
# module declares its parameters: the first is innermost. The outermost wrapper's factors are
# ``<module>.lora_A.weight``; each one further in adds ``.base_layer``. For E experts at rank r, A is
# ``(r*E, in)`` with expert e in rows ``e*r:(e+1)*r`` and B is ``(out, r*E)`` with expert e in columns
# ``e::E`` (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight); a router (E = 1) is a linear's A, B.


def bank_wrapper_paths(module: str, parameters: list[str]) -> dict[str, str]:
    """The module path PEFT's wrapper of each adapted parameter has (``parameters`` in declaration order)."""
    last = len(parameters) - 1
    return {p: module + ".base_layer" * (last - i) for i, p in enumerate(parameters)}


def bank_to_file(A: Any, B: Any) -> tuple[Any, Any]:
    """Our ``A (E, r, in)``, ``B (E, out, r)`` -> PEFT's ``(r*E, in)``, ``(out, r*E)``."""
    experts, rank, _ = A.shape
    return A.reshape(experts * rank, -1), B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)


def bank_per_expert(name: str, layout: Any, projection: str, A: Any, B: Any) -> dict[str, tuple[Any, Any]]:
    """One bank projection's factors as per-expert linear LoRA factors, by module name.

    Our ``A (E, r, in)``, ``B (E, out, r)`` become ``{name}.{e}.{linear}`` -> ``(A_e (r, in), B_e rows
    (out', r))`` for each linear layer the projection holds (``layout.unfused``: ``gate_up_proj`` is
    ``gate_proj`` and ``up_proj``, sharing ``A_e``; ``down_proj`` itself). ``B_e A_e`` restricted to a
    layer's rows is exactly that layer's part of the expert's update, so the rank stays ``r``.
    """
    out = {}
    for linear, rows in layout.unfused(projection, B.shape[1]).items():
        for expert in range(A.shape[0]):
            out[f"{name}.{expert}.{linear}"] = (A[expert], B[expert, rows])
    return out


def bank_from_file(A: Any, B: Any, experts: int) -> tuple[Any, Any]:
    """PEFT's ``(r*E, in)``, ``(out, r*E)`` -> our ``A (E, r, in)``, ``B (E, out, r)``."""
    rank = A.shape[0] // experts
    return A.reshape(experts, rank, A.shape[1]), B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)


# -- task type -------------------------------------------------------------------------------------


def detect_task_type(model: Any, modules_to_save: list[str], module_names: Iterable[str]) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class name; None when unknown.

    Head task types make PEFT wrap its own list of heads as modules_to_save and then require their
    weights in the file, so they are written only when the adapter saves every such head.
    """
    cls = type(model)
    if not cls.__module__.startswith("transformers."):
        return None
    name = cls.__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and getattr(
        getattr(model, "config", None), "is_encoder_decoder", False
    ):
        return "SEQ_2_SEQ_LM"
    suffixes = {
        "ForSequenceClassification": "SEQ_CLS",
        "ForTokenClassification": "TOKEN_CLS",
        "ForQuestionAnswering": "QUESTION_ANS",
    }
    for suffix, task in suffixes.items():
        if name.endswith(suffix):
            # PEFT matches these heads by plain suffix (no dot boundary), so check the same way.
            heads = [n for n in module_names if n and n.endswith(TASK_HEADS[task])]
            saved = set(modules_to_save)
            covered = all(any(n == m or n.startswith(m + ".") for m in saved) for n in heads)
            return task if heads and covered else None
    if name.endswith("Model"):
        return "FEATURE_EXTRACTION"
    return None
