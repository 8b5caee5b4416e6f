"""Adapted linears that read the same input tensor, computed as one node (opt-in).

Attention calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` on one tensor ``h``, an MLP calls
``gate_proj(h)`` and ``up_proj(h)``. One by one, each adapted layer's backward reads ``h`` for its
``dA`` and adds its adapter term into its own ``dh``, and autograd then adds the layers' ``dh``;
computed together (:class:`~lora_lightning.kernels.SharedInputLoRAFunction`) ``h`` is read once
for every ``dA`` and ``dh`` is written once. Off by default (``inject_lora(...,
share_inputs=True)``, ``LoRACallback(share_inputs=True)``, or :func:`share_inputs`): on an H200 it
makes the whole step 2.4% faster at the 1.1B shape and 1.2% at the 8B shape, and a resumed run
repeats an uninterrupted one only to rounding when it is on (benchmarks/RESULTS.md).

Which layers share an input is observed, never assumed from names. Each module's groupable
adapted children of one input width start as a *candidate* group: in a call of the parent (a
*round*, opened and closed by its forward hooks) every candidate runs alone, and the group notes
which tensor each member read (identity, version counter, grad and autocast mode). At the start of
a later round the group is cut into the members seen reading one tensor; those groups are
*settled*: the first member called computes all of them and keeps the others' outputs, which a
member gets only for the very same tensor. A member called with another tensor runs alone (and
the next round regroups), so siblings fed different tensors (mixture-of-experts slices) cost no
computation beyond their own. Kept outputs never outlive the round.

Only layers whose output is exactly the fused kernel of their terms are grouped: the group asks
each layer for them (``LoRALinear.shared_terms``), and a layer whose variant or base kind the
kernel does not compute (DoRA, a quantized base), or with adapter dropout in training, or merged,
runs alone. A group is cut only in a round outside backward and once no computation it made
before can still run backward, so a forward that activation checkpointing recomputes (even after
further forwards, as DPO's two forwards before one backward) makes the same choices as its
original. Layers also run alone outside their parent's call, in a thread other than the one
inside it, under ``torch.compile`` or ``inference_mode``, or when a member's weights are not
materialised plain tensors (FSDP / ZeRO-3 shards).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lora_lightning.kernels import Terms, autocast_dtype, fused_shared_input
from lora_lightning.rounds import Round, can_run_backward, during_backward, saved_tensors_hooks

if TYPE_CHECKING:  # pragma: no cover
    from lora_lightning.layers import LoRALinear

_ATTR = "_shared_input"  # on each LoRALinear: its InputGroup, or None


def _is_adapted_linear(module: nn.Module) -> bool:
    """A LoRALinear (recognised by the method a group asks it, so this module needs no layers import)."""
    return callable(getattr(module, "shared_terms", None))


def _context_allows() -> bool:
    """Grouping needs version counters (not under inference mode) and eager execution."""
    return not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()


def _mode(x: Tensor) -> tuple[Any, ...]:
    """What must not change between the calls that share a result: the tensor's version, grad mode, autocast."""
    return x._version, torch.is_grad_enabled(), autocast_dtype(x.device.type)


def _materialised(t: Tensor | None, shape: tuple[int, ...] | None) -> bool:
    """``t`` is a plain tensor of ``shape`` with its storage in place (None when ``shape`` is None).

    Not a DTensor shard (FSDP2 outside the layer's own unit), nor a freed or emptied parameter
    (FSDP1 / ZeRO-3 between their gathers): those are gathered by the layer's own hooks, which
    have not run yet when a sibling computes the group.
    """
    if t is None or shape is None:
        return t is None and shape is None
    if type(t) not in (Tensor, nn.Parameter) or tuple(t.shape) != shape:
        return False
    return t.numel() == 0 or t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size()


class InputGroup:
    """Adapted linears that may read one tensor: a candidate (observed) or settled (computed together).

    Args:
        members: the layers, in the order their parent lists them.
        round: the parent's :class:`Round`, which opens and closes this group's rounds.
        settled: members were seen reading one tensor; False for a candidate group.
    """

    def __init__(self, members: list[LoRALinear], round: Round, settled: bool = False) -> None:
        self.members = tuple(members)
        self.round = round
        self.settled = settled
        self._pending: dict[int, Tensor] = {}  # id(member) -> its output, kept within this round
        self._x: weakref.ref[Tensor] | None = None
        self._x_mode: tuple[Any, ...] | None = None
        self._seen: set[int] = set()  # members called in this round
        self._untaught = False  # this round found a member the group cannot compute: it teaches nothing
        # This round (outside backward): which members read which tensor, in call order.
        self._reads: list[tuple[weakref.ref[Tensor], tuple[Any, ...], list[LoRALinear]]] = []
        self._record: list[list[LoRALinear]] | None = None  # the last complete round's reads
        # Computations made outside backward (grouped or alone) whose backward has not run yet.
        self._open: dict[int, weakref.ref[Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Kept outputs and round state belong to one call; copies and pickles keep the grouping only.
        state = {
            **self.__dict__,
            "_pending": {},
            "_x": None,
            "_x_mode": None,
            "_seen": set(),
            "_reads": [],
            "_untaught": False,
        }
        return {**state, "_record": None, "_open": {}}

    def __repr__(self) -> str:
        return f"InputGroup({len(self.members)} layers, {'settled' if self.settled else 'candidate'})"

    def _is_member(self, layer: LoRALinear) -> bool:
        return any(m is layer for m in self.members)

    def _drop(self) -> None:
        self._pending, self._x, self._x_mode = {}, None, None

    def begin(self, in_backward: bool) -> None:
        """A call of the parent starts: forget the last one's kept outputs; maybe regroup."""
        self._drop()
        self._seen, self._untaught = set(), False
        if not in_backward:
            if self._record is not None and self._settled() and self._cut(self._record):
                return
            self._reads = []

    def end(self, completed: bool) -> None:
        """The parent's call ended: nothing kept outlives it; remember what a complete round showed."""
        self._drop()
        if (
            self._reads and completed and not self._untaught
        ):  # (a call that raised half-way shows only part of the pattern)
            self._record = [members for _, _, members in self._reads]
        self._reads = []

    def _settled(self) -> bool:
        """No computation made before can run backward (and so be recomputed) any more.

        A node is done when it is gone or its saved tensors are: a backward without
        ``retain_graph`` frees them; one with it leaves the node able to run (and recompute) again.
        """
        for key, ref in list(self._open.items()):
            node = ref()
            if node is None or not can_run_backward(node):
                del self._open[key]
        return not self._open

    def _note_read(self, layer: LoRALinear, x: Tensor) -> None:
        mode = _mode(x)
        for ref, seen_mode, members in self._reads:
            if ref() is x and seen_mode == mode:
                members.append(layer)
                return
        self._reads.append((weakref.ref(x), mode, [layer]))

    def _track(self, out: Tensor, in_backward: bool) -> Tensor:
        node = out.grad_fn
        if node is not None and not in_backward:
            # A C++ node (TypeError) is not our kernels' output: grouping could not change it.
            with contextlib.suppress(TypeError):
                self._open[id(node)] = weakref.ref(node)
        return out

    def __call__(self, layer: LoRALinear, x: Tensor) -> Tensor | None:
        """``layer``'s output for ``x``, or None to have the layer compute it alone."""
        if not _context_allows() or not self.round.inside() or not self._is_member(layer):
            return None  # (not a member: a shallow replica, as nn.DataParallel makes, runs alone)
        if x.is_inference() or saved_tensors_hooks() != self.round.hooks:
            # An inference tensor has no version counter. Other saved-tensor hooks than at the
            # parent's call start mean a checkpoint (or offload) region inside the parent: its
            # recomputation runs without the parent's call, so its forward must run alone too.
            return None
        in_backward = during_backward()
        key = id(layer)
        if not in_backward and key not in self._seen and not self._untaught:
            self._note_read(layer, x)
        if key in self._pending and self._x is not None and self._x() is x and self._x_mode == _mode(x):
            out = self._pending.pop(key)
            self._seen.add(key)
            if not self._pending:
                self._drop()
            return out
        first = not self._seen
        self._seen.add(key)
        terms = [m.shared_terms() for m in self.members] if first else []
        if first and not all(_materialised_terms(t, m) for t, m in zip(terms, self.members, strict=True)):
            if not in_backward:
                self._reads, self._record = [], None  # a round the group could not run teaches nothing
            self._untaught = True
        if not (self.settled and first) or self._untaught:
            # A candidate, a second call within one round, another tensor than the kept outputs
            # came from, or a member that cannot be computed from its terms now: alone (tracked,
            # so no regroup happens while its backward can still recompute it).
            self._drop()
            return self._track(layer.forward_alone(x), in_backward)
        outs = fused_shared_input(x, terms)  # type: ignore[arg-type]
        self._track(outs[0], in_backward)
        mine = None
        for member, out in zip(self.members, outs, strict=True):
            if member is layer:
                mine = out
            else:
                self._pending[id(member)] = out
        self._x, self._x_mode = weakref.ref(x), _mode(x)
        return mine

    def _cut(self, record: list[list[LoRALinear]]) -> bool:
        """Regroup into the members the last round saw reading one tensor (settled groups).

        Returns:
            True when this group is replaced (then it is no longer in use).
        """
        self._record = None
        if self.settled and len(record) == 1 and len(record[0]) == len(self.members):
            return False
        order = {id(m): i for i, m in enumerate(self.members)}
        for member in self.members:
            setattr(member, _ATTR, None)
        groups = [
            InputGroup(sorted(read, key=lambda m: order[id(m)]), self.round, settled=True)
            for read in record
            if len(read) > 1
        ]
        for group in groups:
            for member in group.members:
                setattr(member, _ATTR, group)
        index = self.round.groups.index(self)
        self.round.groups[index : index + 1] = groups
        return True


def _materialised_terms(terms: Terms | None, layer: LoRALinear) -> bool:
    """The layer gave terms (see ``LoRALinear.shared_terms``) and each is materialised at its shape."""
    if terms is None:
        return False
    out_f, in_f, r = layer.out_features, layer.in_features, layer.r
    bias_shape = None if terms[1] is None else (out_f,)
    shapes = ((out_f, in_f), bias_shape, (r, in_f), (out_f, r))
    return all(_materialised(t, shape) for t, shape in zip(terms[:4], shapes, strict=True))


_ROUND_ATTR = "_lora_input_round"  # on each parent module with groups: its Round


def _remove_round_hooks(parent: nn.Module) -> None:
    """Drop the hooks a Round registered on ``parent`` (also on a copy, whose hooks are copies)."""
    for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), Round)]:
            del hooks[key]
            parent._forward_hooks_always_called.pop(key, None)


def share_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Compute adapted linears that read the same tensor together, or not (the default).

    Turning it on (again) starts from the candidate groups: each module's groupable adapted
    linear children with the same input width, dtype and device, observed before grouped. Their
    rounds are the calls of that module, or, when it is a ``ModuleList`` / ``ModuleDict``
    (containers are never called), of its nearest ancestor that is not one.

    Args:
        model: a model with LoRA layers.
        enabled: False computes every adapted layer on its own.

    Returns:
        The number of candidate groups (0 when disabled).
    """
    parent_of: dict[int, nn.Module] = {}
    for module in model.modules():
        vars(module).pop(_ROUND_ATTR, None)
        _remove_round_hooks(module)
        for child in module.children():
            parent_of.setdefault(id(child), module)
            if _is_adapted_linear(child):
                setattr(child, _ATTR, None)
    if not enabled:
        return 0
    count = 0
    for parent in model.modules():
        buckets: dict[tuple[Any, ...], list[LoRALinear]] = {}
        for child in parent.children():
            # Only layers the fused kernel computes exactly (plain LoRA over a dense weight).
            if _is_adapted_linear(child) and child.variant.fusable and child.kind.dense:
                base = child.base_layer
                key = (child.in_features, child.kind.compute_dtype(base), child.kind.device(base))
                buckets.setdefault(key, []).append(child)
        candidates = [members for members in buckets.values() if len(members) > 1]
        if not candidates:
            continue
        owner = parent
        while isinstance(owner, (nn.ModuleList, nn.ModuleDict)) and id(owner) in parent_of:
            owner = parent_of[id(owner)]
        round_ = vars(owner).get(_ROUND_ATTR)
        if round_ is None:
            round_ = Round()
            owner.register_forward_pre_hook(round_.enter)
            owner.register_forward_hook(round_.returned)
            owner.register_forward_hook(round_.exit, always_call=True)
            setattr(owner, _ROUND_ATTR, round_)
        for members in candidates:
            group = InputGroup(members, round_)
            round_.groups.append(group)
            for member in members:
                setattr(member, _ATTR, group)
        count += len(candidates)
    return count


def input_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The groups in use, as tuples of module names.

    Candidates (by parent and input width) until a forward after the first one's backward cuts
    them into the members seen reading one tensor.
    """
    names = {id(m): name for name, m in model.named_modules()}
    groups: dict[int, tuple[str, ...]] = {}
    for module in model.modules():
        group = getattr(module, _ATTR, None) if _is_adapted_linear(module) else None
        if isinstance(group, InputGroup):
            groups[id(group)] = tuple(names.get(id(m), "?") for m in group.members)
    return list(groups.values())
