"""Quantizing a plain model's linear layers with bitsandbytes (the callback's ``quantize=``).

:func:`quantize_model` replaces ``nn.Linear`` layers by bitsandbytes 4-/8-bit ones, layer by layer,
leaving the output head, embeddings and named modules alone; :func:`plan_quantization` checks
the same without touching the model. bitsandbytes is imported when a model is quantized.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from lora_lightning.config import QUANT_METHODS
from lora_lightning.kinds.bnb import Linear4bitKind, Linear8bitKind, bnb
from lora_lightning.kinds.bnb_experts import check_quantizable
from lora_lightning.kinds.dense import conv1d_class
from lora_lightning.kinds.experts import BANK, is_bank_4bit, is_expert_bank
from lora_lightning.nn.experts4bit import Experts4bit
from lora_lightning.targets import ROUTER_SUFFIXES, output_head_names

QuantMethod = Literal["nf4", "nf4-dq", "fp4", "int8"]


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds any bitsandbytes 4- or 8-bit layer (or a 4-bit expert bank)."""
    kinds = (Linear4bitKind(), Linear8bitKind())
    return any(kind.claims(m) or is_bank_4bit(m) for m in module.modules() for kind in kinds)


def _quantized_layer(linear: nn.Linear, method: str, compute_dtype: torch.dtype | None) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights, quantized on ``linear``'s device."""
    nn_bnb = bnb().nn
    weight, bias = linear.weight, linear.bias
    device = weight.device
    if method == "int8":
        layer = nn_bnb.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False, device="meta"
        )
        layer.weight = nn_bnb.Int8Params(weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = nn_bnb.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=method == "nf4-dq",
            quant_type="fp4" if method == "fp4" else "nf4",
            device="meta",
        )
        layer.weight = nn_bnb.Params4bit(
            weight.data,
            requires_grad=False,
            compress_statistics=method == "nf4-dq",
            quant_type="fp4" if method == "fp4" else "nf4",
            module=layer,
        )
    if bias is not None:
        layer.bias = nn.Parameter(bias.data, requires_grad=bias.requires_grad)
    return layer.to(device)  # bitsandbytes quantizes when the weight moves to a device


def plan_quantization(
    model: nn.Module, method: str, keep: Iterable[str] = (), *, allow_none: bool = False
) -> list[str]:
    """The linear layers :func:`quantize_model` would quantize, checked; the model is not touched.

    Raises:
        ValueError: an unknown method, a model already quantized, a weight on the meta device, or
            nothing to quantize.
        TypeError: a transformers Conv1D among the layers (bitsandbytes has no such layer).
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANT_METHODS))}, got {method!r}")
    if is_quantized(model):
        raise ValueError(
            f"quantize={method!r} given for a model that is already quantized (it holds bitsandbytes layers); "
            "drop quantize= (the layers are adapted as they are) or load the model unquantized"
        )
    kept = [name for name in keep if name]
    heads = output_head_names(model)

    def skipped(name: str) -> bool:
        return name in heads or any(name == k or name.startswith(k + ".") for k in kept)

    conv1d = conv1d_class()
    names, refused = [], []
    for name, module in model.named_modules():
        if not name or skipped(name):
            continue
        if isinstance(module, nn.Linear) and type(module).__name__.endswith(ROUTER_SUFFIXES):
            continue  # a MoE router that is an nn.Linear (Llama 4's): its forward returns scores and logits
        if isinstance(module, nn.Linear):
            if module.weight.is_meta:
                raise ValueError(f"quantize={method!r}: {name!r} has its weight on the meta device; load it first")
            names.append(name)
        elif conv1d is not None and isinstance(module, conv1d):
            refused.append(name)
    if refused:
        raise TypeError(
            f"quantize={method!r} cannot quantize transformers Conv1D layers ({', '.join(refused[:3])}): bitsandbytes "
            "has no such layer; load the model with from_pretrained(..., quantization_config=BitsAndBytesConfig(...)), "
            "which converts them"
        )
    if not names and not allow_none:
        raise ValueError(f"quantize={method!r}: the model has no nn.Linear layer to quantize outside its head")
    return names


def plan_bank_quantization(
    model: nn.Module,
    method: str,
    keep: Iterable[str] = (),
    *,
    context: str | None = None,
    off: str = "banks=False",
    strict: bool = True,
) -> list[str]:
    """The fused expert banks :func:`quantize_model` would quantize (4-bit methods), checked.

    Args:
        model: the model; not touched.
        method: the quantization method (int8 cannot hold banks).
        keep: module names left unquantized (``modules_to_save``).
        context: how error messages name the request (default ``quantize=<method>``).
        off: the option that leaves the banks unquantized, as messages name it.
        strict: raise on a bank that cannot be quantized or is already 4-bit; False skips it
            (with a warning naming it and why).

    Raises:
        ValueError: int8 with expert banks (bitsandbytes' int8 format is a linear layer's), a bank
            already 4-bit, or an expert width that 4-bit blocks cannot hold (named).
        TypeError: a bank whose layout is not known.
    """
    context = context or f"quantize={method!r}"
    kept = [name for name in keep if name]
    names, skipped = [], []
    for name, module in model.named_modules():
        if not name or any(name == k or name.startswith(k + ".") for k in kept) or not is_expert_bank(module):
            continue
        if is_bank_4bit(module):
            if not strict:
                continue
            raise ValueError(
                f"{context}: expert bank {name!r} is already 4-bit; drop the request or load the model unquantized"
            )
        problem = BANK.problem(module)
        if problem is None and BANK.is_meta(module):
            problem = "has its weights on the meta device; load them first"
        if problem is None:
            for p in BANK.layout(module).projections:
                in_f, out_f = BANK.features(module, p)
                problem = problem or check_quantizable((out_f, in_f), f"{name}.{p}")
        if problem is not None:
            if not strict:
                skipped.append(f"{name}: {problem}")
                continue
            error = TypeError if BANK.problem(module) is not None else ValueError
            raise error(f"{context}: module {name!r} ({type(module).__name__}) {problem}; {off} leaves the banks")
        names.append(name)
    if skipped:
        warnings.warn(f"{context}: left unquantized: {'; '.join(skipped)}", stacklevel=3)
    if names and method == "int8":
        raise ValueError(
            f"{context}: int8 cannot hold fused expert banks ({names[0]!r}, ...): bitsandbytes' int8 format is "
            f"a linear layer's; use nf4, nf4-dq or fp4, or {off} leaves the banks unquantized"
        )
    return names


def quantize_banks_like(
    model: nn.Module, *, required: bool = False, keep: Iterable[str] = ()
) -> tuple[int, int, int] | None:
    """Quantize the dense expert banks of a model whose linear layers are bitsandbytes 4-bit, in their format.

    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` quantizes
    ``nn.Linear`` layers only, so a transformers 5 MoE model keeps its experts in 16 bits. Each
    bank becomes an :class:`~lora_lightning.nn.experts4bit.Experts4bit` with the quant type and
    double quantization of the model's first quantized ``Linear4bit`` and its compute dtype.

    Args:
        model: the model; changed in place.
        required: raise when there is nothing to do (no quantized 4-bit linear layer, no dense bank)
            or a bank cannot be quantized; otherwise return None, or skip that bank with a warning.
        keep: module names left unquantized (``modules_to_save``).

    Returns:
        ``(banks, bytes before, bytes after)``, or None when nothing was quantized.
    """
    layers = (m for m in model.modules() if Linear4bitKind().claims(m))
    linear = next((m for m in layers if getattr(m.weight, "quant_state", None) is not None), None)
    context = "inject_lora(quantize_banks=True)" if required else "inject_lora (quantize_banks, on for a 4-bit model)"
    names = []
    if linear is not None:
        state = linear.weight.quant_state
        names = plan_bank_quantization(
            model, state.quant_type, keep, context=context, off="quantize_banks=False", strict=required
        )
    if linear is None or not names:
        if required:
            what = (
                "no quantized bitsandbytes 4-bit linear layer to take the format from"
                if linear is None
                else "no dense bank"
            )
            raise ValueError(f"quantize_banks=True: the model has {what}")
        return None
    before = after = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, child)
        before += sum(p.numel() * p.element_size() for p in dense.parameters(recurse=False) if p.dim() == 3)
        bank = Experts4bit(dense, state.quant_type, double_quant=state.nested, compute_dtype=linear.compute_dtype)
        after += sum(b.nbytes() for b in bank.banks_4bit.values())
        setattr(parent, child, bank)
    return len(names), before, after


def quantize_model(model: nn.Module, method: QuantMethod, keep: Iterable[str] = (), *, banks: bool = True) -> list[str]:
    """Replace the model's ``nn.Linear`` layers by bitsandbytes 4-/8-bit layers, in place, and (4-bit
    methods) its fused expert banks by :class:`~lora_lightning.nn.experts4bit.Experts4bit`.

    The output head (``get_output_embeddings()`` of a transformers model, or a top-level child
    named like one), embeddings, norms, routers and the modules named in ``keep`` (and their
    children) stay in full precision. Layers are quantized one by one on their own device (a bank
    one expert at a time), so peak memory stays near the model's.

    Args:
        model: any module; every weight to quantize must be materialised.
        method: "nf4", "nf4-dq" (nf4 with double quantization of the scales), "fp4", "int8".
        keep: module names left unquantized (e.g. ``modules_to_save``).
        banks: quantize the fused expert banks of a MoE model too (4-bit methods; int8 refuses them).

    Returns:
        The names of the quantized layers and banks.

    Raises:
        ValueError / TypeError: see :func:`plan_quantization` and :func:`plan_bank_quantization`;
            raised before any layer changes.
    """
    bank_names = plan_bank_quantization(model, method, keep) if banks else []
    names = plan_quantization(model, method, keep, allow_none=bool(bank_names))
    bnb()  # the import error, if any, before any change
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        compute = linear.weight.dtype if linear.weight.is_floating_point() else None
        setattr(parent, child, _quantized_layer(linear, method, compute))
    for name in bank_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quant_type = "fp4" if method == "fp4" else "nf4"
        setattr(parent, child, Experts4bit(getattr(parent, child), quant_type, double_quant=method == "nf4-dq"))
    return names + bank_names
