"""How an adapter's factors start: zero update (kaiming, gaussian), or the base's principal part (PiSSA, OLoRA).

Every init leaves the adapted layer computing exactly what the base computed. The plain inits make
``B A = 0``. PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) start A and B from the top of the
base weight instead (its top-r singular triplets; its thin QR) and *rewrite the base* into the
residual ``W - scale * B A``, summed in float32 and rounded once, so training moves the principal
directions. The starting factors are kept on the layer (``lora_A_init``, ``lora_B_init``, not in
the state_dict) so that :func:`lora_lightning.save_adapter` can write an adapter for the original
base: the rank-2r update ``B A - B0 A0``, which is what PEFT's conversion writes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.nn.layers import LoRALayer

_PISSA_NITER = re.compile(r"^pissa_niter_(?P<n>[1-9]\d*)$")


def _init_kaiming(layer: LoRALayer, std: float) -> None:
    del std
    if layer.kind.embedding:  # the lookup side starts at zero (loralib, PEFT), B is N(0, 1)
        nn.init.zeros_(layer.lora_A)
        nn.init.normal_(layer.lora_B)
    else:  # nn.Linear's default and PEFT's: bound = 1 / sqrt(in_features); B starts at zero
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        nn.init.zeros_(layer.lora_B)


def _init_gaussian(layer: LoRALayer, std: float) -> None:
    if layer.kind.embedding:
        nn.init.zeros_(layer.lora_A)
        nn.init.normal_(layer.lora_B, std=std)
    else:
        nn.init.normal_(layer.lora_A, std=std)
        nn.init.zeros_(layer.lora_B)


def _start_from(layer: LoRALayer, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Set the factors (float32 ``(r, in)``, ``(out, r)``), keep them, and make the base the residual."""
    layer.lora_A.copy_(lora_A)
    layer.lora_B.copy_(lora_B)
    layer.register_buffer("lora_A_init", layer.lora_A.detach().clone(), persistent=False)
    layer.register_buffer("lora_B_init", layer.lora_B.detach().clone(), persistent=False)
    # The residual from the factors as stored (their dtype's rounding included), so that the
    # adapted layer equals the original one up to the base dtype's single rounding.
    layer.kind.add_update(layer.base_layer, layer.lora_B, layer.lora_A, -layer.scale)


def _init_pissa(layer: LoRALayer, niter: int | None) -> None:
    weight = layer.base_weight().to(torch.float32)  # (out, in)
    r = layer.r
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # W = U diag(S) Vh
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:  # randomised SVD with niter subspace iterations (Halko et al.)
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / layer.scale)  # scale * B A = U diag(S) Vh: the top-r part of W
    _start_from(layer, root[:, None] * Vh, U * root[None, :])


def _init_olora(layer: LoRALayer, std: float) -> None:
    del std
    Q, R = torch.linalg.qr(layer.base_weight().to(torch.float32))  # W = Q R, Q orthonormal columns
    _start_from(layer, R[: layer.r], Q[:, : layer.r])


def rewrites_base(name: str) -> bool:
    """Whether the init rewrites the base weight (PiSSA, OLoRA)."""
    return name in ("pissa", "olora") or _PISSA_NITER.match(name) is not None


def is_init_name(name: object) -> bool:
    return isinstance(name, str) and (name in ("kaiming", "gaussian") or rewrites_base(name))


INIT_NAMES = "'kaiming', 'gaussian', 'pissa', 'pissa_niter_<n>' (n >= 1) or 'olora'"


def init_function(name: str) -> Callable[[LoRALayer, float], None]:
    """The function that initialises a layer's factors for an ``init_lora_weights`` name."""
    if name == "kaiming":
        return _init_kaiming
    if name == "gaussian":
        return _init_gaussian
    if name == "olora":
        return _init_olora
    if name == "pissa":
        return lambda layer, std: _init_pissa(layer, None)
    match = _PISSA_NITER.match(name)
    if match:
        return lambda layer, std: _init_pissa(layer, int(match["n"]))
    raise ValueError(f"init_lora_weights must be one of {INIT_NAMES}, got {name!r}")
