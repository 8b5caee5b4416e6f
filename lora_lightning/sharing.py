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
:class:`InputGroup`. Grouping happens only inside one call of that parent module (its forward
pre- and post-hooks open and close a *round*): the first member called computes every member's
output and keeps the others', and a member's own call returns its kept output after checking it
received the very same tensor (object identity, version counter, grad and autocast mode). A member
called with another tensor (``o_proj``, which reads the attention output; k and v in
cross-attention) starts a computation of the members not yet served, from its tensor. Kept outputs
never outlive the parent's call. At a later round the group is cut into what the last round
showed: members served by one computation stay together, the others (and members never called)
run alone.

Numbers do not depend on that history: forward computes each member's ``x A^T`` on its own and an
unused output costs no backward work, so a layer gets bit for bit the same result from a
speculative group as from its final group (and one used member of a group gets what the layer
alone gets). When layers are called the same way in every forward, as in standard architectures,
a resumed run therefore repeats an uninterrupted one exactly.

A group is cut only in a round outside backward, and only once every grouped computation made
before has been backpropagated or freed: a forward that non-reentrant activation checkpointing
recomputes (even after further forwards, as with DPO's two forwards before one backward) then
saves what its original saved. Layers run alone outside their parent's call, in threads other than
the one inside it, under ``torch.compile`` (Inductor fuses on its own), ``torch.inference_mode``,
adapter dropout in training, when a member is merged, or when members' weights are not
materialised plain tensors (per-layer FSDP / ZeRO-3 sharding); none of these changes a group.
"""

from __future__ import annotations

import sys
import threading
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


def _can_run_backward(node: Any) -> bool:
    """The autograd node still holds its saved tensors (read raw: nothing is unpacked or recomputed)."""
    try:
        saved = node._raw_saved_tensors
    except RuntimeError:  # freed by a backward that did not retain the graph
        return False
    return saved is not None


def _saved_tensors_hooks() -> Any:
    """The innermost ``saved_tensors_hooks`` in effect (activation checkpointing, CPU offload), or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(True) if top is not None else None


class _Round:
    """One call of a parent module: which thread is inside it, how deep, and its groups."""

    def __init__(self) -> None:
        self.groups: list[InputGroup] = []
        self.owner: int | None = None  # the thread inside the parent's call
        self.depth = 0
        self.frame: Any = None  # the outermost call's frame, while it runs
        self.completed = False  # the outermost call returned (rather than raised)
        self.hooks: Any = None  # the saved-tensor hooks in effect when it began
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Copies start outside any call (a lock is not copied; each copy gets its own).
        return {**self.__dict__, "owner": None, "depth": 0, "frame": None, "hooks": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def inside(self) -> bool:
        return self.depth > 0 and self.owner == threading.get_ident()

    def enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        with self._lock:
            me = threading.get_ident()
            if self.owner not in (None, me):
                return  # another thread is inside: this call's layers run alone
            if self.depth and not self._outermost_running():
                self.depth = 0  # the last call never ended (KeyboardInterrupt skips forward hooks)
            self.owner = me
            self.depth += 1
            first = self.depth == 1
        if first:
            self.frame, self.completed, self.hooks = sys._getframe(1), False, _saved_tensors_hooks()
            in_backward = _in_backward()
            for group in list(self.groups):
                group.begin(in_backward)

    def _outermost_running(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame is self.frame:
                return True
            frame = frame.f_back
        return False

    def returned(self, module: nn.Module, args: Any, output: Any) -> None:
        """A plain forward hook: runs only when the call returns (before :meth:`exit`)."""
        if self.depth == 1 and self.owner == threading.get_ident():
            self.completed = True

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        with self._lock:
            if self.owner != threading.get_ident():
                return
            self.depth -= 1
            if self.depth:
                return
            self.owner, self.frame = None, None
        for group in self.groups:
            group.end(self.completed)


class InputGroup:
    """Adapted linears that may read one tensor; the first one called in a round computes them all.

    Args:
        members: the layers, in the order their parent lists them.
        round: the parent's :class:`_Round`, which opens and closes this group's rounds.
    """

    def __init__(self, members: list[LoRALinear], round: _Round) -> None:
        self.members = tuple(members)
        self.round = round
        self._pending: dict[int, Tensor] = {}  # id(member) -> its output, kept within this round
        self._x: weakref.ref[Tensor] | None = None
        self._x_mode: tuple[Any, ...] | None = None
        self._seen: set[int] = set()  # members served (or run alone) in this round
        # The last complete round outside backward: the members each computation served.
        self._served: list[list[LoRALinear]] = []
        self._record: list[list[LoRALinear]] | None = None  # None: nothing to learn from
        # Grouped computations made outside backward whose backward has not run yet.
        self._open: dict[int, weakref.ref[Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Kept outputs and round state belong to one call; copies and pickles keep the grouping only.
        state = {**self.__dict__, "_pending": {}, "_x": None, "_x_mode": None, "_seen": set()}
        return {**state, "_served": [], "_record": None, "_open": {}}

    def __repr__(self) -> str:
        return f"InputGroup({len(self.members)} layers)"

    def _is_member(self, layer: LoRALinear) -> bool:
        return any(m is layer for m in self.members)

    def _drop(self) -> None:
        self._pending, self._x, self._x_mode = {}, None, None

    def begin(self, in_backward: bool) -> None:
        """A call of the parent starts: forget the last one's kept outputs; maybe cut the group."""
        self._drop()
        self._seen = set()
        if not in_backward:
            if self._record is not None and self._settled() and self._cut(self._record):
                return
            self._served = []

    def end(self, completed: bool) -> None:
        """The parent's call ended: nothing kept outlives it; remember what a complete round showed."""
        self._drop()
        if self._served and completed:  # (a call that raised half-way shows only part of the pattern)
            self._record = self._served
        self._served = []

    def _settled(self) -> bool:
        """No grouped computation made before can run backward (and so be recomputed) any more.

        A node is done when it is gone or its saved tensors are: a backward without
        ``retain_graph`` frees them; one with it leaves the node able to run (and recompute) again.
        """
        for key, ref in list(self._open.items()):
            node = ref()
            if node is None or not _can_run_backward(node):
                del self._open[key]
        return not self._open

    def _ready(self) -> bool:
        for m in self.members:
            if m.merged or (m.training and isinstance(m.lora_dropout, nn.Dropout)):
                return False
            base = m.base_layer
            if not (
                _materialised(m.base_weight(), (m.out_features, m.in_features))
                and _materialised(base.bias, None if base.bias is None else (m.out_features,))
                and _materialised(m.lora_A, (m.r, m.in_features))
                and _materialised(m.lora_B, (m.out_features, m.r))
            ):
                return False
        return True

    def __call__(self, layer: LoRALinear, x: Tensor) -> Tensor | None:
        """``layer``'s output for ``x``, or None to have the layer compute it alone."""
        if not _context_allows() or not self.round.inside() or not self._is_member(layer):
            return None  # (not a member: a shallow replica, as nn.DataParallel makes, runs alone)
        if x.is_inference() or _saved_tensors_hooks() != self.round.hooks:
            # An inference tensor has no version counter. Other saved-tensor hooks than at the
            # parent's call start mean a checkpoint (or offload) region inside the parent: its
            # recomputation runs without the parent's call, so its forward must run alone too.
            return None
        in_backward = _in_backward()
        key = id(layer)
        if key in self._pending and self._x is not None and self._x() is x and self._x_mode == _mode(x):
            out = self._pending.pop(key)
            self._seen.add(key)
            if not in_backward and self._served:
                self._served[-1].append(layer)
            if not self._pending:
                self._drop()
            return out
        if key in self._seen:
            return None  # called again within one call of the parent: on its own
        # The first call of the round, or another tensor than the kept outputs were computed
        # from: compute the members not served yet from this one.
        rest = [m for m in self.members if id(m) not in self._seen]
        self._drop()
        return self._start(layer, x, rest, in_backward)

    def _start(self, layer: LoRALinear, x: Tensor, members: list[LoRALinear], in_backward: bool) -> Tensor | None:
        """Compute ``members`` from ``x``; keep the others' outputs, return ``layer``'s."""
        self._seen.add(id(layer))
        if not self._ready():
            if not in_backward:
                self._served, self._record = [], None  # a round the group could not run teaches nothing
            return None
        if not in_backward:
            self._served.append([layer])
        if len(members) < 2:
            return None
        outs = self._compute(x, members)
        node = outs[0].grad_fn
        if node is not None and not in_backward:
            self._open[id(node)] = weakref.ref(node)
        mine = None
        for member, out in zip(members, outs, strict=True):
            if member is layer:
                mine = out
            else:
                self._pending[id(member)] = out
        self._x, self._x_mode = weakref.ref(x), _mode(x)
        return mine

    def _cut(self, record: list[list[LoRALinear]]) -> bool:
        """Cut the group into the computations the last round's members were served by.

        Returns:
            True when the grouping changed (then this group is no longer in use).
        """
        self._record = None
        if len(record) == 1 and len(record[0]) == len(self.members):
            return False
        order = {id(m): i for i, m in enumerate(self.members)}
        for member in self.members:
            setattr(member, _ATTR, None)
        groups = [InputGroup(sorted(run, key=lambda m: order[id(m)]), self.round) for run in record if len(run) > 1]
        for group in groups:
            for member in group.members:
                setattr(member, _ATTR, group)
        index = self.round.groups.index(self)
        self.round.groups[index : index + 1] = groups
        for group in groups:
            group._seen = set()
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


_ROUND_ATTR = "_lora_input_round"  # on each parent module with groups: its _Round


def _remove_round_hooks(parent: nn.Module) -> None:
    """Drop the hooks a _Round registered on ``parent`` (also on a copy, whose hooks are copies)."""
    for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), _Round)]:
            del hooks[key]
            parent._forward_hooks_always_called.pop(key, None)


def share_inputs(model: nn.Module, enabled: bool = True) -> int:
    """Compute adapted linears that read the same tensor together (the default after injection), or not.

    Turning it on (again) starts from the speculative groups: each module's adapted linear
    children with the same input width, dtype and device. Their rounds are the calls of that
    module, or, when it is a ``ModuleList`` / ``ModuleDict`` (containers are never called), of its
    nearest ancestor that is not one.

    Args:
        model: a model with LoRA layers.
        enabled: False computes every adapted layer on its own.

    Returns:
        The number of speculative groups (0 when disabled).
    """
    from lora_lightning.layers import LoRALinear

    parent_of: dict[int, nn.Module] = {}
    for module in model.modules():
        vars(module).pop(_ROUND_ATTR, None)
        _remove_round_hooks(module)
        for child in module.children():
            parent_of.setdefault(id(child), module)
            if isinstance(child, LoRALinear):
                setattr(child, _ATTR, None)
    if not enabled:
        return 0
    count = 0
    for parent in model.modules():
        buckets: dict[tuple[Any, ...], list[LoRALinear]] = {}
        for child in parent.children():
            if isinstance(child, LoRALinear):
                weight = child.base_layer.weight
                buckets.setdefault((child.in_features, weight.dtype, weight.device), []).append(child)
        candidates = [members for members in buckets.values() if len(members) > 1]
        if not candidates:
            continue
        owner = parent
        while isinstance(owner, (nn.ModuleList, nn.ModuleDict)) and id(owner) in parent_of:
            owner = parent_of[id(owner)]
        round_ = vars(owner).get(_ROUND_ATTR)
        if round_ is None:
            round_ = _Round()
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

    Speculative (by parent and input width) until a forward after the first one's backward cuts them.
    """
    from lora_lightning.layers import LoRALinear

    names = {id(m): name for name, m in model.named_modules()}
    groups: dict[int, tuple[str, ...]] = {}
    for module in model.modules():
        group = getattr(module, _ATTR, None) if isinstance(module, LoRALinear) else None
        if isinstance(group, InputGroup):
            groups[id(group)] = tuple(names.get(id(m), "?") for m in group.members)
    return list(groups.values())
