"""Expert banks: a Mixture-of-Experts block's experts stored as fused 3-D parameters.

transformers 5 keeps a MoE block's experts in one module holding ``gate_up_proj`` ``(E, 2I, H)``
(or ``up_proj`` without a gate) and ``down_proj`` ``(E, H, I)`` as bare parameters, with flags
from ``transformers.integrations.moe.use_experts_implementation`` saying how they are laid out:

* ``has_gate``: a gated MLP (``gate_up_proj`` and the module's ``_apply_gate``) or not
  (``up_proj`` and ``act_fn``);
* ``is_transposed``: stored ``(E, in, out)`` instead of ``(E, out, in)`` (gpt-oss);
* ``has_bias``: ``<projection>_bias`` ``(E, out)`` parameters (gpt-oss);
* ``is_concatenated``: gate and up halves ``[gate; up]``, or interleaved (gpt-oss); the module's
  own ``_apply_gate`` reads them in the forward; the per-expert adapter files split by it;
* ``has_post_expert_norm``: a ``post_expert_norm`` after each expert.

Llama 4's ``Llama4TextExperts`` is fused but not decorated: every expert sees every token
(``(E * T, H)`` inputs, the router's scores already applied), stored transposed.

:class:`ExpertBank` reads one such module: which projections it has, their sizes, one expert's
weight, and adding an update to every expert's weight. transformers is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The flags use_experts_implementation sets on an instance; a bank must carry all of them.
LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
KNOWN_UNDECORATED = ("Llama4TextExperts",)
# What a bank's projections are called: the up side (gated or not), then the down side.
GATED_UP, PLAIN_UP, DOWN = "gate_up_proj", "up_proj", "down_proj"


@dataclass(frozen=True)
class Layout:
    """How one experts module stores and runs its experts.

    Attributes:
        has_gate: gated (``gate_up_proj`` + ``_apply_gate``) or plain (``up_proj`` + ``act_fn``).
        has_bias: per-expert biases ``<projection>_bias``.
        is_transposed: weights stored ``(E, in, out)``.
        has_post_expert_norm: ``post_expert_norm`` after each expert.
        routed: each token goes to its top-k experts (decorated classes); False for Llama 4, where
            every expert sees every token.
        is_concatenated: a gated up projection's output rows are ``[gate; up]`` halves; False:
            interleaved, gate rows ``0::2`` and up rows ``1::2`` (gpt-oss).
    """

    has_gate: bool
    has_bias: bool
    is_transposed: bool
    has_post_expert_norm: bool
    routed: bool = True
    is_concatenated: bool = True

    @property
    def projections(self) -> tuple[str, str]:
        return (GATED_UP if self.has_gate else PLAIN_UP, DOWN)

    def unfused(self, projection: str, out_features: int) -> dict[str, slice]:
        """The per-expert linear layers one projection holds, as output-row slices of an expert's weight:
        ``gate_up_proj`` -> ``gate_proj`` and ``up_proj`` (halves or interleaved), others themselves."""
        if projection != GATED_UP:
            return {projection: slice(None)}
        if self.is_concatenated:
            half = out_features // 2
            return {"gate_proj": slice(0, half), "up_proj": slice(half, out_features)}
        return {"gate_proj": slice(0, out_features, 2), "up_proj": slice(1, out_features, 2)}


def _looks_like_bank(module: nn.Module) -> bool:
    """A module holding a 3-D ``down_proj`` parameter beside a 3-D up projection: fused experts
    (not an adapter's own ``ParameterDict`` of factors, which is keyed the same way)."""
    if isinstance(module, nn.ParameterDict):
        return False
    params = dict(module.named_parameters(recurse=False))
    down = params.get(DOWN)
    up = params.get(GATED_UP, params.get(PLAIN_UP))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def is_bank_4bit(module: nn.Module) -> bool:
    """A fused experts module whose projections are 4-bit banks (:class:`~lora_lightning.nn.experts4bit.Experts4bit`,
    kind :mod:`lora_lightning.kinds.bnb_experts`): it carries its layout and ``banks_4bit``."""
    return isinstance(getattr(module, "layout", None), Layout) and hasattr(module, "banks_4bit")


def layout_of(module: nn.Module) -> Layout | None:
    """The layout of a fused experts module, or None when ``module`` is not one."""
    if is_bank_4bit(module):
        return module.layout
    if not _looks_like_bank(module):
        return None
    name = type(module).__name__
    if name in KNOWN_UNDECORATED:
        return Layout(has_gate=True, has_bias=False, is_transposed=True, has_post_expert_norm=False, routed=False)
    if not all(isinstance(getattr(module, flag, None), bool) for flag in LAYOUT_FLAGS):
        return None
    return Layout(
        has_gate=module.has_gate,
        has_bias=module.has_bias,
        is_transposed=module.is_transposed,
        has_post_expert_norm=module.has_post_expert_norm,
        is_concatenated=module.is_concatenated,
    )


def is_expert_bank(module: nn.Module) -> bool:
    """``module`` looks like fused experts (3-D projection parameters, or 4-bit banks), known layout or not."""
    return _looks_like_bank(module) or is_bank_4bit(module)


class ExpertBank:
    """How to read and update one fused experts module (dense parameters).

    Every method takes the experts module itself; the adapter never reads its parameters directly.
    """

    name = "Experts"
    dense = True

    def problem(self, module: nn.Module) -> str | None:
        """Why this bank cannot carry an adapter, or None."""
        layout = layout_of(module)
        if layout is None:
            flags = ", ".join(LAYOUT_FLAGS)
            return (
                f"stores fused experts in a layout lora-lightning does not know: a {type(module).__name__} sets "
                f"none of transformers' use_experts_implementation flags ({flags}); known: decorated experts "
                f"classes and {', '.join(KNOWN_UNDECORATED)}"
            )
        if getattr(module, "_is_expert_parallel", False):
            return "is expert-parallel (its experts are sharded across ranks); adapt it unsharded"
        for projection in layout.projections:
            weight = self.stored(module, projection)
            if not weight.is_floating_point():
                return f"has {projection} of dtype {weight.dtype}; LoRA needs floating-point expert weights"
        if layout.has_gate and not callable(getattr(module, "_apply_gate", None)) and layout.routed:
            return "has a gate but no _apply_gate; transformers' decorator adds one to every gated class"
        if not layout.has_gate and not callable(getattr(module, "act_fn", None)):
            return "has no gate and no act_fn"
        return None

    def layout(self, module: nn.Module) -> Layout:
        layout = layout_of(module)
        if layout is None:
            raise TypeError(f"{type(module).__name__} {self.problem(module)}")
        return layout

    def stored(self, module: nn.Module, projection: str) -> Tensor:
        """The parameter holding one projection of every expert, as the module stores it."""
        return getattr(module, projection)

    def functions(self, module: nn.Module) -> nn.Module:
        """The module whose gate, activation, biases and post-expert norm the experts forward uses."""
        return module

    def restore(self, module: nn.Module, projection: str) -> bool:
        """Undo a merge other than by subtracting the update (False: subtract it)."""
        return False

    def bias(self, module: nn.Module, projection: str) -> Tensor | None:
        return getattr(module, f"{projection}_bias", None) if self.layout(module).has_bias else None

    def num_experts(self, module: nn.Module) -> int:
        return self.stored(module, DOWN).shape[0]

    def features(self, module: nn.Module, projection: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of one expert's projection (A is ``(r, in)``, B ``(out, r)``)."""
        _, rows, cols = self.stored(module, projection).shape
        return (rows, cols) if self.layout(module).is_transposed else (cols, rows)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return self.stored(module, DOWN).dtype

    def device(self, module: nn.Module) -> torch.device:
        return self.stored(module, DOWN).device

    def is_meta(self, module: nn.Module) -> bool:
        return self.stored(module, DOWN).is_meta

    def grouped_weight(self, module: nn.Module, projection: str) -> Tensor:
        """Every expert's weight as ``(E, in, out)`` (a view), the right operand of ``x @ W_e``."""
        weight = self.stored(module, projection)
        return weight if self.layout(module).is_transposed else weight.transpose(-2, -1)

    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> Tensor:
        """One expert's weight as ``(out, in)``: a view of the stored tensor."""
        weight = self.stored(module, projection)[expert]
        return weight.t() if self.layout(module).is_transposed else weight

    @torch.no_grad()
    def add_update(self, module: nn.Module, projection: str, B: Tensor, A: Tensor, alpha: float) -> None:
        """``W_e <- W_e + alpha * B_e @ A_e`` for every expert, summed in float32 and rounded once.

        One expert at a time, so the transient is one expert's weight in float32, never the bank's.

        Args:
            module: the experts module.
            projection: ``gate_up_proj`` / ``up_proj`` / ``down_proj``.
            B: ``(E, out, r)``.
            A: ``(E, r, in)``.
            alpha: ``scale`` to merge, ``-scale`` to unmerge.
        """
        for expert in range(self.num_experts(module)):
            weight = self.expert_weight(module, projection, expert)
            merged = weight.float()
            merged.addmm_(B[expert].float(), A[expert].float(), alpha=alpha)
            weight.copy_(merged)


class RouterWeight(ExpertBank):
    """A module's bare 2-D ``weight`` used as ``x @ weight.T`` (a MoE router, ``*TopKRouter``): one
    "expert" of one projection, ``weight``, so the bank adapter's merge and file layout serve it."""

    name = "Router"

    def problem(self, module: nn.Module) -> str | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or not weight.is_floating_point():
            return "has no 2-D floating-point weight parameter"
        return None

    def layout(self, module: nn.Module) -> Layout:
        raise TypeError(f"{type(module).__name__} is a router, not an expert bank")

    def stored(self, module: nn.Module, projection: str) -> Tensor:
        return module.weight

    def bias(self, module: nn.Module, projection: str) -> Tensor | None:
        return None

    def num_experts(self, module: nn.Module) -> int:
        return 1

    def features(self, module: nn.Module, projection: str) -> tuple[int, int]:
        rows, cols = module.weight.shape
        return cols, rows

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device

    def is_meta(self, module: nn.Module) -> bool:
        return module.weight.is_meta

    def grouped_weight(self, module: nn.Module, projection: str) -> Tensor:
        return module.weight.t().unsqueeze(0)

    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> Tensor:
        return module.weight


BANK = ExpertBank()
ROUTER = RouterWeight()
ROUTER_PARAMETER = "weight"


def is_router(module: nn.Module) -> bool:
    """A module that is neither a linear layer nor a bank and holds a bare 2-D ``weight`` (a MoE router)."""
    weight = getattr(module, ROUTER_PARAMETER, None)
    own = dict(module.named_parameters(recurse=False))
    return (
        isinstance(weight, nn.Parameter)
        and own.get(ROUTER_PARAMETER) is weight
        and weight.dim() == 2
        and not isinstance(module, (nn.Linear, nn.Embedding))
        and not is_expert_bank(module)
    )
