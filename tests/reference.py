"""Independent references the tests hold the package to: the plain formulas, in any dtype.

These are deliberately written from the paper's formulas with plain autograd, not from the
package's code, so a test comparing against them checks the package's arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    x_lora: Tensor | None = None,
) -> Tensor:
    """``x W^T + b + scale (x_lora A^T) B^T`` in plain autograd (``x_lora`` defaults to ``x``)."""
    x_lora = x if x_lora is None else x_lora
    return torch.nn.functional.linear(x, weight, bias) + scale * (x_lora @ lora_A.t()) @ lora_B.t()


def lora_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """The weight update ``scale * B @ A`` in float32, shape ``(out, in)``."""
    return (lora_B.float() @ lora_A.float()).mul_(scale)


def scale_of(config, name: str) -> float:
    """The scale the package gives the module of this name (its rank and alpha rules and
    ``lora_scale``): what tests compare with numbers worked out by hand."""
    from lora_lightning.nn.layers import lora_scale

    return lora_scale(config.rank_for(name), config.alpha_for(name), config.use_rslora)


def assert_near(actual: Tensor, expected: Tensor, rel: float = 1e-5) -> None:
    """Every element within ``rel`` of the reference's largest magnitude (float32 sums against
    float64 or against another library's float32 order: elementwise rtol fails on near-zero entries)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} over a largest magnitude of {scale:.3g} (rel {rel})"
