"""The app's ``quant`` group: a bitsandbytes quantization of the base, as transformers loads it.

``quant.method`` (nf4, nf4-dq, fp4, int8) becomes a ``BitsAndBytesConfig`` for
``from_pretrained``, so every model option, the tiny ones included, loads its frozen base in 4 or 8
bits the way a user loads a hub model for QLoRA. The LoRA callback then adapts the quantized
layers; the merged export is written unquantized.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from lora_lightning.app.errors import UsageError
from lora_lightning.config import QUANT_METHODS

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_quant(quant: Mapping[str, Any] | None) -> None:
    """Fail before the base loads: an unknown method or dtype, or bitsandbytes missing."""
    method = (quant or {}).get("method")
    if method is None:
        return
    if method not in QUANT_METHODS:
        raise UsageError(f"quant.method must be null or one of {', '.join(QUANT_METHODS)}, got {method!r}")
    dtype = quant.get("compute_dtype", "auto")
    if dtype not in COMPUTE_DTYPES:
        raise UsageError(f"quant.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"quant.method={method} needs bitsandbytes: pip install 'lora-lightning[qlora]'")


def quantization_kwargs(quant: Mapping[str, Any] | None, torch_dtype: str | None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``quant`` (empty without a method)."""
    method = (quant or {}).get("method")
    if method is None:
        return {}
    check_quant(quant)

    if method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        name = quant.get("compute_dtype", "auto")
        if name == "auto":
            name = torch_dtype if torch_dtype not in (None, "auto") else "float32"
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if method == "fp4" else "nf4",
            bnb_4bit_use_double_quant=method == "nf4-dq",
            bnb_4bit_compute_dtype=getattr(torch, name),
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"  # bitsandbytes quantizes where the weights land
    return {"quantization_config": config, "device_map": {"": device}}
