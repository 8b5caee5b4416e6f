"""Adapted linears that read the same input tensor are computed as one node.

Attention calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after another on the same tensor
``h``, and an MLP calls ``gate_proj(h)`` and ``up_proj(h)``. One by one, each adapted layer's
backward reads ``h`` for its ``dA`` and adds its own adapter term into its own ``dh``, and autograd
then adds the layers' ``dh`` together; those passes over ``h``-sized tensors are most of what LoRA
adds to a frozen model's step on a GPU. Computed together
(:class:`~lora_lightning.kernels.SharedInputLoRAFunction`) ``h`` is read once for every ``dA`` and
``dh`` is written once.

Which layers share an input is learnt, not assumed from module names, so any architecture works.
Each module's adapted linear children with the same input width start as one speculative
:class:`InputGroup`. The first member called in a forward computes every member's output and keeps
the others'; a member's own call returns its kept output after checking it received the very
same tensor (object identity, version counter, grad and autocast mode). A member called with
another tensor (``o_proj``, which reads the attention output; k and v in cross-attention) starts
a computation of the members not yet served, with its tensor. At the next forward the group is
cut into what the last one showed: members served by one computation stay together, the others
(and members never called) run alone.

Numbers do not depend on that history: forward computes each member's ``x A^T`` on its own and
an unused output costs no backward work, so a layer gets bit for bit the same result from a
speculative group as from its final group (and one used member of a group gets what the layer
alone gets), and a resumed run repeats an uninterrupted one exactly. Regrouping happens only in
forwards that run outside backward, so a forward that activation checkpointing recomputes saves
what its original saved. Under ``torch.compile`` (Inductor fuses on its own),
``torch.inference_mode``, adapter dropout in training, a merged member, or members whose weights
are not materialised (per-layer FSDP / ZeRO-3 sharding) layers run alone and nothing is learnt.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lora_lightning.kernels import autocast_dtype, shared_input_lora_linear

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.layers import LoRALinear

_ATTR = "_shared_input"  # on each LoRALinear: its InputGroup, or None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes forwards).

    A recomputed forward must save exactly what the original forward saved, so groups are cut
    (and what a forward served is recorded) only in forwards that run outside backward; the
    recomputation then repeats what its original forward did.
    """
    return torch._C._current_graph_task_id() != -1


def _context_allows() -> bool:
    """Grouping needs version counters (not under inference mode) and eager execution."""
    return not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()


def _mode(x: Tensor) -> tuple[Any, ...]:
    """What must not change between the calls that share a result: the tensor's version, grad mode, autocast."""
    return x._version, torch.is_grad_enabled(), autocast_dtype(x.device.type)


def _materialised(t: Tensor | None, shape: torch.Size | tuple[int, ...] | None = None) -> bool:
    """A plain tensor with its storage in place (not a DTensor shard or a freed FSDP/ZeRO-3 view)."""
    if t is None:
        return True
    if type(t) not in (Tensor, nn.Parameter):
        return False
    if shape is not None and tuple(t.shape) != tuple(shape):
        return False
    return t.numel() == 0 or t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size()


class InputGroup:
    """Adapted linears that may read one tensor; the first one called in a forward computes them all.

    Args:
        members: the layers, in the order their parent lists them.
    """

    def __init__(self, members: list[LoRALinear]) -> None:
        self.members = tuple(members)
        self._pending: dict[int, Tensor] = {}  # id(member) -> its output, kept from this round
        self._pending_in_backward = False
        self._x: weakref.ref[Tensor] | None = None
        self._x_mode: tuple[Any, ...] | None = None
        # The last round outside backward: the members each computation served, in order.
        self._served: list[list[LoRALinear]] = []

    def __getstate__(self) -> dict[str, Any]:
        # Kept outputs belong to one forward; copies and pickles start clean (and keep the grouping).
        return {**self.__dict__, "_pending": {}, "_x": None, "_x_mode": None, "_served": []}

    def __repr__(self) -> str:
        return f"InputGroup({len(self.members)} layers)"

    def _is_member(self, layer: LoRALinear) -> bool:
        return any(m is layer for m in self.members)

    def _drop(self) -> None:
        self._pending, self._x, self._x_mode = {}, None, None

    def _ready(self) -> bool:
        for m in self.members:
            if m.merged or (m.training and isinstance(m.lora_dropout, nn.Dropout)):
                return False
            if not (
                _materialised(m.base_layer.weight)
                and _materialised(m.base_layer.bias)
                and _materialised(m.lora_A, (m.r, m.in_features))
                and _materialised(m.lora_B, (m.out_features, m.r))
            ):
                return False
        return True

    def __call__(self, layer: LoRALinear, x: Tensor) -> Tensor | None:
        """``layer``'s output for ``x``, or None to have the layer compute it alone."""
        if not _context_allows() or not self._is_member(layer):
            return None  # (not a member: a shallow replica, as nn.DataParallel makes, runs alone)
        in_backward = _in_backward()
        if self._pending and self._pending_in_backward != in_backward:
            self._drop()  # kept by a recomputation in backward (which may stop early), or for one
        key = id(layer)
        if key in self._pending:
            if self._x is not None and self._x() is x and self._x_mode == _mode(x):
                out = self._pending.pop(key)
                if not in_backward and self._served:
                    self._served[-1].append(layer)
                if not self._pending:
                    self._drop()
                return out
            # Another tensor than the one its kept output was computed from: compute the members
            # this round has not served yet from this tensor instead.
            rest = [m for m in self.members if id(m) in self._pending]
            self._drop()
            return self._start(layer, x, rest, in_backward)
        # A member this round has served already (or nothing kept): a new round.
        self._drop()
        if not in_backward:
            if self._served and self._regroup():
                group = getattr(layer, _ATTR)
                return group(layer, x) if group is not None else None
            self._served = []
        return self._start(layer, x, list(self.members), in_backward)

    def _start(self, layer: LoRALinear, x: Tensor, members: list[LoRALinear], in_backward: bool) -> Tensor | None:
        """Compute ``members`` from ``x``; keep the others' outputs, return ``layer``'s."""
        if not self._ready():
            if not in_backward:
                self._served = []  # a forward the group could not run teaches nothing
            return None
        if not in_backward:
            self._served.append([layer])
        if len(members) < 2:
            return None
        outs = self._compute(x, members)
        mine = None
        for member, out in zip(members, outs, strict=True):
            if member is layer:
                mine = out
            else:
                self._pending[id(member)] = out
        self._x, self._x_mode, self._pending_in_backward = weakref.ref(x), _mode(x), in_backward
        return mine

    def _regroup(self) -> bool:
        """Cut the group into the computations the last round's members were served by.

        Returns:
            True when the grouping changed (then this group is no longer in use).
        """
        served = self._served
        self._served = []
        if len(served) == 1 and len(served[0]) == len(self.members):
            return False
        order = {id(m): i for i, m in enumerate(self.members)}
        for member in self.members:
            setattr(member, _ATTR, None)
        for run in served:
            if len(run) > 1:
                group = InputGroup(sorted(run, key=lambda m: order[id(m)]))
                for member in group.members:
                    setattr(member, _ATTR, group)
        return True

    def _compute(self, x: Tensor, layers: list[LoRALinear]) -> tuple[Tensor, ...]:
        device_type = x.device.type
        dtype = autocast_dtype(device_type)
        if dtype is not None:
            # As LoRALinear.forward: cast what autocast would cast for F.linear, then run without it.
            members = [
                (
                    m.base_weight().to(dtype),
                    None if m.base_layer.bias is None else m.base_layer.bias.to(dtype),
                    m.lora_A,
                    m.lora_B,
                    m.scale,
                )
                for m in layers
            ]
            with torch.autocast(device_type, enabled=False):
                return shared_input_lora_linear(x.to(dtype), members)
        members = [(m.base_weight(), m.base_layer.bias, m.lora_A, m.lora_B, m.scale) for m in layers]
        return shared_input_lora_linear(x, members)


def share_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Compute adapted linears that read the same tensor together (the default after injection), or not.

    Turning it on (again) starts from the speculative groups: each module's adapted linear
    children with the same input width, dtype and device.

    Args:
        model: a model with LoRA layers.
        enabled: False computes every adapted layer on its own.

    Returns:
        The number of speculative groups (0 when disabled).
    """
    from lora_lightning.layers import LoRALinear

    groups = 0
    for parent in model.modules():
        buckets: dict[tuple[Any, ...], list[LoRALinear]] = {}
        for child in parent.children():
            if isinstance(child, LoRALinear):
                setattr(child, _ATTR, None)
                weight = child.base_layer.weight
                buckets.setdefault((child.in_features, weight.dtype, weight.device), []).append(child)
        if not enabled:
            continue
        for members in buckets.values():
            if len(members) > 1:
                group = InputGroup(members)
                for member in members:
                    setattr(member, _ATTR, group)
                groups += 1
    return groups


def input_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The groups currently in use, as tuples of module names (speculative until the second forward)."""
    from lora_lightning.layers import LoRALinear

    names = {id(m): name for name, m in model.named_modules()}
    groups: dict[int, tuple[str, ...]] = {}
    for module in model.modules():
        group = getattr(module, _ATTR, None) if isinstance(module, LoRALinear) else None
        if isinstance(group, InputGroup):
            groups[id(group)] = tuple(names.get(id(m), "?") for m in group.members)
    return list(groups.values())
