"""lora-lightning: LoRA adapters for PyTorch Lightning, in HF PEFT's on-disk format.

The core (config, layers, inject, merge, adapters) needs only torch and safetensors; the callback
adds Lightning. Names are imported lazily so ``import lora_lightning`` works without Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_lightning.config import LoRAConfig
from lora_lightning.inject import LoRAReport, ParameterSummary, get_lora_config, inject_lora, parameter_summary
from lora_lightning.loss import causal_lm_loss, chunked_cross_entropy
from lora_lightning.merge import merge_and_unload, merge_lora, unmerge_lora
from lora_lightning.nn.layers import LoRAEmbedding, LoRALinear

__version__ = "0.1.0"

_LAZY = {
    "LoRACallback": "lora_lightning.lightning.callback",
    "save_adapter": "lora_lightning.io.adapters",
    "load_adapter": "lora_lightning.io.adapters",
    "export_merged": "lora_lightning.io.adapters",
    "adapter_state_dict": "lora_lightning.io.adapters",
}

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.io.adapters import adapter_state_dict, export_merged, load_adapter, save_adapter
    from lora_lightning.lightning.callback import LoRACallback


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_lightning' has no attribute {name!r}")


__all__ = [
    "LoRACallback",
    "LoRAConfig",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAReport",
    "ParameterSummary",
    "adapter_state_dict",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "export_merged",
    "get_lora_config",
    "inject_lora",
    "load_adapter",
    "merge_and_unload",
    "merge_lora",
    "parameter_summary",
    "save_adapter",
    "unmerge_lora",
]
