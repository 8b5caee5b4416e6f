"""Model loading for the app: any causal LM through ``from_pretrained``, and target roles.

Every model, the tiny ones included, is loaded by :func:`pretrained` (``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained``); the tiny ones first make sure their pretrained base exists in
the cache (:mod:`lora_lightning.app.models.tiny_base`).

Targets are given as *roles* (``qv``, ``attention``, ``mlp``, ``all_linear``) because module names
differ by family (Llama ``q_proj``, GPT-2 ``c_attn``); each model config maps the roles to its
own names in ``target_roles``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_lightning.app.data.chat import ensure_chat_template
from lora_lightning.app.errors import UsageError
from lora_lightning.app.models.quant import quantization_kwargs
from lora_lightning.app.models.tiny_base import ensure_base
from lora_lightning.config import ALL_LINEAR

ROLES = ("qv", "attention", "mlp", "all_linear")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and what the app needs to know about them."""

    model: Any
    tokenizer: Any
    name: str
    name_or_path: str
    loss_chunk_tokens: int | None = None  # the training loss's head chunk (None: the model's own loss)


def resolve_targets(
    targets: str | Sequence[str], target_roles: Mapping[str, Any] | None, model_name: str
) -> list[str] | str:
    """LoRAConfig.target_modules for ``lora.targets``: a role the model maps, or an explicit list.

    Raises:
        UsageError: a role the model does not map, or a malformed value.
    """
    roles = {role: names for role, names in (target_roles or {}).items() if names is not None}
    if isinstance(targets, str):
        if targets not in roles:
            mapped = ", ".join(roles) or "none"
            raise UsageError(
                f"lora.targets={targets!r} is not a role that model {model_name!r} maps "
                f"(mapped roles: {mapped}; see model.target_roles), or give module names: lora.targets=[q_proj,v_proj]"
            )
        names = roles[targets]
        if isinstance(names, str):
            if names != ALL_LINEAR:
                raise UsageError(f"model.target_roles.{targets} must be a list of module names or {ALL_LINEAR!r}")
            return ALL_LINEAR
        return [str(name) for name in names]
    names = list(targets)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise UsageError(
            f"lora.targets must be a role ({', '.join(ROLES)}) or a non-empty list of names, got {targets!r}"
        )
    return names


def check_name_or_path(name_or_path: Any) -> None:
    """Fail early on a local path that does not exist (a hub id is checked by the download)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UsageError(f"model.name_or_path must be a local directory or a hub id, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"model.name_or_path={name_or_path!r} has no config.json: not a save_pretrained directory")
        return
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local or not _HUB_ID.match(name_or_path):
        raise UsageError(
            f"model.name_or_path={name_or_path!r} does not exist (a local directory or a hub id is expected)"
        )


def _dtype_kwargs(torch_dtype: str | None) -> dict[str, Any]:
    if torch_dtype is None:
        return {}
    if torch_dtype not in _DTYPES:
        raise UsageError(f"model.torch_dtype must be one of {', '.join(_DTYPES)}, got {torch_dtype!r}")

    value = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
    # transformers 5 renamed torch_dtype to dtype; 4.x only knows torch_dtype.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {key: value}


def pretrained(
    name_or_path: str,
    name: str = "hf",
    revision: str | None = None,
    torch_dtype: str | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    target_roles: Mapping[str, Any] | None = None,
    quant: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    loss_chunk_tokens: int | None = None,
) -> LoadedModel:
    """Load any causal LM and its tokenizer with ``from_pretrained``.

    Args:
        name_or_path: a ``save_pretrained`` directory or a hub id.
        name: short name for run names and messages.
        revision: hub branch, tag or commit.
        torch_dtype: "auto" (the checkpoint's dtype), "float32", "bfloat16", "float16".
        trust_remote_code: run code shipped with the checkpoint; off unless asked for.
        attn_implementation: "eager", "sdpa", "flash_attention_2"; None lets transformers choose.
        target_roles: role -> module names for ``lora.targets``; read from the config by the job
            (:func:`resolve_targets`, before the model loads), accepted here because the model
            group's config carries it.
        quant: the app's ``quant`` group (:mod:`lora_lightning.app.models.quant`): load the base in 4 or 8 bits.
        gradient_checkpointing: recompute activations in backward (less memory, more time).
        loss_chunk_tokens: the training loss applies the output head to this many labelled tokens
            at a time (:func:`lora_lightning.causal_lm_loss`); None: the model's own loss.
    """
    check_loss_chunk_tokens(loss_chunk_tokens)

    check_name_or_path(name_or_path)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": bool(trust_remote_code)}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    extra.update(quantization_kwargs(quant, torch_dtype))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **common, **_dtype_kwargs(torch_dtype), **extra)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tokenizer.pad_token is None:  # padding is never used for packed blocks, but generate() wants one
        tokenizer.pad_token = tokenizer.eos_token
    del target_roles
    return LoadedModel(model, tokenizer, name, str(name_or_path), loss_chunk_tokens)


def tiny_pretrained(
    name: str,
    architecture: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    pretrain: Mapping[str, Any],
    cache_dir: str,
    torch_dtype: str | None = "float32",
    target_roles: Mapping[str, Any] | None = None,
    quant: Mapping[str, Any] | None = None,
    loss_chunk_tokens: int | None = None,
) -> LoadedModel:
    """A tiny model with a base pretrained here on first use (see :mod:`lora_lightning.app.models.tiny_base`).

    The arguments describe the base (they form its cache key; ``target_roles``, ``quant`` and
    ``loss_chunk_tokens`` do not); the base is then loaded through :func:`pretrained` from its
    cache directory, exactly as a hub model would be.
    """
    check_loss_chunk_tokens(loss_chunk_tokens)

    path = ensure_base(name, _plain(architecture), _plain(tokenizer), _plain(pretrain), cache_dir)
    loaded = pretrained(
        str(path), name=name, torch_dtype=torch_dtype, target_roles=target_roles, quant=quant,
        loss_chunk_tokens=loss_chunk_tokens,
    )  # fmt: skip
    # Set here, not in the build, so the cached bases (keyed by their build recipe) stay valid; it is
    # saved with every merged/ export, so the fine-tuned model is prompted as it was trained.
    ensure_chat_template(loaded.tokenizer)
    return loaded


def check_loss_chunk_tokens(value: Any) -> None:
    """``model.loss_chunk_tokens``: a positive integer, or None (null) for the model's own loss."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"model.loss_chunk_tokens must be a positive integer or null, got {value!r}")


def _plain(node: Any) -> dict[str, Any]:
    """A plain dict from a mapping that may be an OmegaConf DictConfig (when called by Hydra)."""
    try:
        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency of the app
        pass
    return dict(node)
