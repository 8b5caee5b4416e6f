"""Quantizing a plain model's linear layers with bitsandbytes (the callback's ``quantize=``).

:func:`quantize_model` replaces ``nn.Linear`` layers by bitsandbytes 4-/8-bit ones, layer by layer,
leaving the output head, embeddings and named modules alone; :func:`plan_quantization` checks
the same without touching the model. bitsandbytes is imported when a model is quantized.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from lora_lightning.config import QUANT_METHODS
from lora_lightning.kinds.bnb import Linear4bitKind, Linear8bitKind, bnb
from lora_lightning.kinds.dense import conv1d_class
from lora_lightning.targets import output_head_names

QuantMethod = Literal["nf4", "nf4-dq", "fp4", "int8"]


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds any bitsandbytes 4- or 8-bit layer."""
    kinds = (Linear4bitKind(), Linear8bitKind())
    return any(kind.claims(m) for m in module.modules() for kind in kinds)


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


def plan_quantization(model: nn.Module, method: str, keep: Iterable[str] = ()) -> list[str]:
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
    if not names:
        raise ValueError(f"quantize={method!r}: the model has no nn.Linear layer to quantize outside its head")
    return names


def quantize_model(model: nn.Module, method: QuantMethod, keep: Iterable[str] = ()) -> list[str]:
    """Replace the model's ``nn.Linear`` layers by bitsandbytes 4-/8-bit layers, in place.

    The output head (``get_output_embeddings()`` of a transformers model, or a top-level child
    named like one), embeddings, norms and the modules named in ``keep`` (and their children) stay
    in full precision. Layers are quantized one by one on their own device, so peak memory stays
    near the model's.

    Args:
        model: any module; every weight to quantize must be materialised.
        method: "nf4", "nf4-dq" (nf4 with double quantization of the scales), "fp4", "int8".
        keep: module names left unquantized (e.g. ``modules_to_save``).

    Returns:
        The names of the quantized layers.

    Raises:
        ValueError / TypeError: see :func:`plan_quantization`; raised before any layer changes.
    """
    names = plan_quantization(model, method, keep)
    bnb()  # the import error, if any, before any change
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        compute = linear.weight.dtype if linear.weight.is_floating_point() else None
        setattr(parent, child, _quantized_layer(linear, method, compute))
    return names
