"""Merged exports: the model with its adapters folded in, as an ordinary checkpoint.

A dense model is merged (in place or as a copy) and written with ``save_pretrained`` (transformers)
or as ``model.safetensors`` with its original keys. A model holding quantized layers is written
*unquantized*, one tensor at a time, without merging it: each adapted layer as its dequantized
weight plus ``scale * B A``, summed in float32 and rounded once into the export dtype; each other
quantized layer dequantized; everything else as it is. Peak memory stays near the quantized model
plus one dequantized layer (and one shard on the host), and the result loads in plain
transformers without bitsandbytes: its ``config.json`` holds no ``quantization_config``, and a
layer transformers keeps as ``Conv1D`` (GPT-2) gets that layout back.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from lora_lightning.inject import adapted_modules, lora_layers
from lora_lightning.io.atomic_files import (
    MERGED_INDEX_NAME,
    MERGED_MARKERS,
    MERGED_WEIGHTS_NAME,
    atomic_directory,
    check_destination,
    tensors_for_file,
)
from lora_lightning.kinds.bnb_experts import bank_kind, dense_expert
from lora_lightning.kinds.experts import BANK, ROUTER, ROUTER_PARAMETER, is_bank_4bit
from lora_lightning.merge import merge_and_unload
from lora_lightning.nn.experts import is_lora_bank
from lora_lightning.nn.layers import adaptable_kind, is_lora_layer

SHARD_BYTES = 512 * 2**20  # the host memory one shard of a dequantized export holds at most
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_pretrained_model(model: nn.Module) -> bool:
    module = sys.modules.get("transformers.modeling_utils")
    cls = getattr(module, "PreTrainedModel", None) if module is not None else None
    return cls is not None and isinstance(model, cls)


def holds_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` (adapted or not) is of a kind whose weight is not a plain tensor
    (a bitsandbytes layer, a 4-bit expert bank)."""
    return any(((kind := adaptable_kind(m)) is not None and not kind.dense) or is_bank_4bit(m) for m in model.modules())


def export_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any | None = None,
    *,
    in_place: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write the model with adapters merged in, as an ordinary checkpoint.

    A transformers ``PreTrainedModel`` is written like ``save_pretrained`` (safetensors) and the
    tokenizer with its ``save_pretrained``, so ``AutoModel*.from_pretrained(directory)`` loads it;
    any other module becomes ``model.safetensors`` holding its original state_dict keys (tied
    tensors stored under each key), which ``load_state_dict(strict=True)`` accepts. A model with
    quantized layers is written unquantized, tensor by tensor (see the module docstring). An
    existing ``directory`` is replaced as a whole, once the new one is complete.

    Args:
        model: a model carrying adapters (or a plain model, written as is).
        directory: destination directory.
        tokenizer: anything with ``save_pretrained(directory)``, or None.
        in_place: merge and unload ``model`` itself instead of a deep copy (saves the memory of
            the copy; the model is left plain and merged). A model without adapters is never
            copied, and a quantized one never needs a copy: it is merged only with ``in_place``.
        dtype: "float32", "bfloat16" or "float16" for the written weights; None keeps a dense
            model's dtypes, and writes a quantized one in its layers' compute dtype.

    Returns:
        The directory.
    """
    target = Path(directory)
    check_destination(target, MERGED_MARKERS)
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must have a save_pretrained(directory) method, got {type(tokenizer).__name__}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be None or one of {', '.join(map(repr, _DTYPES))}, got {dtype!r}")
    if holds_quantized(model):
        with atomic_directory(target) as tmp:
            _write_dequantized(model, tmp, None if dtype is None else _DTYPES[dtype])
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if in_place:
            merge_and_unload(model)
        return target
    # A model without LoRA layers (merged and unloaded already) is written as it is: no copy needed.
    merged = merge_and_unload(model if in_place or not adapted_modules(model) else copy.deepcopy(model))
    if dtype is not None:
        merged.to(_DTYPES[dtype])
    with atomic_directory(target) as tmp:
        if _is_pretrained_model(merged):
            merged.save_pretrained(tmp)
        else:
            tensors = tensors_for_file(merged.state_dict())
            safetensors.torch.save_file(tensors, tmp / MERGED_WEIGHTS_NAME, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


# -- the dequantized export ----------------------------------------------------------------------------

Producer = Callable[[], Tensor]


def _tensors(model: nn.Module) -> Iterator[tuple[str, Producer, Any, str | None]]:
    """``(key, produce, source, layer)`` for every tensor an unquantized copy of ``model`` holds.

    ``source`` identifies the stored tensor behind the key (tied weights share it); ``layer`` is
    the module name when ``produce`` gives a layer's weight in the adapter's ``(out, in)`` layout
    (an adapted or quantized layer), None when it gives a tensor as the module stores it.
    """
    skip: list[str] = []  # modules whose tensors were produced by an enclosing layer
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        dot = f"{name}." if name else ""
        if is_lora_bank(module) or is_bank_4bit(module):
            skip.append(dot)
            yield from _bank_tensors(dot, module)
            continue
        kind = adaptable_kind(module)
        if is_lora_layer(module) or (kind is not None and not kind.dense):
            skip.append(dot)
            if is_lora_layer(module):
                base = module.base_layer
                produce = lambda m=module: m.variant.merged_weight(m, m.base_weight().to(torch.float32, copy=True))  # noqa: E731
            else:
                base = module
                produce = lambda m=module, k=kind: k.dense_weight(m)  # noqa: E731
            yield f"{dot}weight", produce, module.weight, name
            bias = getattr(base, "bias", None)
            if bias is not None:
                yield f"{dot}bias", (lambda b=bias: b.detach()), bias, None
            continue
        for leaf, tensor in module.named_parameters(recurse=False, remove_duplicate=False):
            yield f"{dot}{leaf}", (lambda t=tensor: t.detach()), tensor, None
        # what state_dict() saves: no public API tells a buffer's persistence (private_names lists this)
        transient = module._non_persistent_buffers_set
        for leaf, tensor in module.named_buffers(recurse=False, remove_duplicate=False):
            if leaf not in transient:
                yield f"{dot}{leaf}", (lambda t=tensor: t.detach()), tensor, None


def _bank_tensors(dot: str, module: nn.Module) -> Iterator[tuple[str, Producer, Any, str | None]]:
    """An expert bank's (or router's) tensors as the plain experts module stores them: each adapted
    projection as every expert's float32 ``W_e + s B_e A_e`` (dequantized first from 4 bits), in the
    module's storage layout, one projection at a time; the rest (biases, norms) as they are."""
    adapter = module if is_lora_bank(module) else None
    base = adapter.base_layer if adapter is not None else module
    if adapter is not None and adapter.kind is ROUTER:
        p = ROUTER_PARAMETER
        weight = ROUTER.stored(base, p)
        yield f"{dot}{p}", (lambda: _merged_router(adapter)), weight, None
        held = {p}
    else:
        quantized = is_bank_4bit(base)
        layout = bank_kind(base).layout(base)
        for p in layout.projections:
            source = base.banks_4bit[p].codes if quantized else BANK.stored(base, p)
            yield f"{dot}{p}", (lambda p=p, b=base: _merged_bank(b, adapter, p)), source, None
        held = set(layout.projections)
        base = base.inner if quantized else base  # the rest of the experts module's tensors
    for leaf, tensor in base.named_parameters(remove_duplicate=False):
        if leaf not in held:
            yield f"{dot}{leaf}", (lambda t=tensor: t.detach()), tensor, None
    for leaf, tensor in base.named_buffers(remove_duplicate=False):
        owner, _, last = leaf.rpartition(".")
        # what state_dict() saves: no public API tells a buffer's persistence (private_names lists this)
        if last not in base.get_submodule(owner)._non_persistent_buffers_set:
            yield f"{dot}{leaf}", (lambda t=tensor: t.detach()), tensor, None


@torch.no_grad()
def _merged_bank(base: nn.Module, adapter: nn.Module | None, p: str) -> Tensor:
    kind = bank_kind(base)
    layout, experts = kind.layout(base), []
    for e in range(kind.num_experts(base)):
        weight = dense_expert(base, p, e)
        if adapter is not None and p in adapter.lora_A:
            weight.addmm_(adapter.lora_B[p][e].float(), adapter.lora_A[p][e].float(), alpha=adapter.scale[p])
        experts.append(weight.t() if layout.is_transposed else weight)
    return torch.stack(experts)


@torch.no_grad()
def _merged_router(adapter: nn.Module) -> Tensor:
    p = ROUTER_PARAMETER
    weight = ROUTER.stored(adapter.base_layer, p).float()
    return weight.addmm(adapter.lora_B[p][0].float(), adapter.lora_A[p][0].float(), alpha=adapter.scale[p])


def _plain_config(model: nn.Module, dtype: torch.dtype) -> Any:
    """The transformers config of ``model`` without its quantization, for the export's dtype."""
    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    name = str(dtype).removeprefix("torch.")
    if hasattr(config, "dtype"):  # transformers 5 (torch_dtype is its deprecated alias)
        config.dtype = name
    else:
        config.torch_dtype = name
    return config


def _plan(model: nn.Module, config: Any) -> list[tuple[str, Producer, bool]]:
    """Every tensor to write, checked against the unquantized architecture before anything is computed.

    Returns ``(key, produce, transpose)``: a layer's ``(out, in)`` weight is transposed where the
    unquantized architecture stores it ``(in, out)`` (transformers Conv1D, embeddings), which an
    instance of the model's class built on the meta device tells (no memory).
    """
    skeleton = None
    if config is not None:
        with torch.device("meta"):
            skeleton = type(model)(config)
    expected = dict(skeleton.state_dict()) if skeleton is not None else None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    adapted = {id(layer.weight) for layer in lora_layers(model).values()}
    plan, seen = [], set()
    for key, produce, source, layer in _tensors(model):
        if id(source) in seen:
            if id(source) in adapted:  # the adapted side now differs from its tied twin: untie
                config.tie_word_embeddings = tied = False
            elif tied:
                continue  # a tied copy (lm_head of embed_tokens): the loader ties it again
        seen.add(id(source))
        transpose = False
        if layer is not None:
            original = skeleton.get_submodule(layer) if skeleton is not None else model.get_submodule(layer)
            kind = adaptable_kind(original)
            transpose = kind is not None and kind.transposed
        plan.append((key, produce, transpose))
    if expected is not None:
        unexpected = sorted({key for key, _, _ in plan} - set(expected))
        if unexpected:
            raise ValueError(
                f"cannot write {type(model).__name__} unquantized: {unexpected[:3]} are not tensors of its "
                "unquantized architecture"
            )
    return plan


def _write_dequantized(model: nn.Module, directory: Path, dtype: torch.dtype | None) -> None:
    """Write ``model`` unquantized into ``directory``, a shard of at most :data:`SHARD_BYTES` at a time."""
    if dtype is None:  # the compute dtype of the (first) quantized layer
        bases = [m.base_layer if is_lora_layer(m) else m for m in model.modules()]
        dtypes = [kind.compute_dtype(b) for b in bases if (kind := adaptable_kind(b)) is not None and not kind.dense]
        dtypes += [b.compute_dtype for b in model.modules() if is_bank_4bit(b)]
        dtype = dtypes[0] if dtypes else torch.float32
    config = _plain_config(model, dtype) if _is_pretrained_model(model) else None
    plan = _plan(model, config)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    files: list[Path] = []

    def flush() -> None:
        nonlocal size
        path = directory / f".shard-{len(files):05d}.safetensors"
        safetensors.torch.save_file(shards[-1], path, metadata={"format": "pt"})
        files.append(path)
        shards[-1], size = {}, 0

    weight_map: dict[str, int] = {}
    total = 0
    with torch.no_grad():
        for key, produce, transpose in plan:
            tensor = produce()
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if transpose:
                tensor = tensor.t()
            tensor = tensor.to("cpu").contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > SHARD_BYTES:
                flush()
            shards[-1][key] = tensor
            weight_map[key] = len(files)
            size += nbytes
            total += nbytes
    flush()
    _name_shards(directory, files, weight_map, total)
    if config is not None:
        config.save_pretrained(directory)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(directory)


def _name_shards(directory: Path, files: list[Path], weight_map: dict[str, int], total: int) -> None:
    """One shard becomes ``model.safetensors``; several get transformers' names and an index."""
    if len(files) == 1:
        files[0].rename(directory / MERGED_WEIGHTS_NAME)
        return
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for path, name in zip(files, names, strict=True):
        path.rename(directory / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
    (directory / MERGED_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
