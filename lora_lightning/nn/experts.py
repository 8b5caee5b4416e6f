"""LoRA on an expert bank: per-expert factors over a Mixture-of-Experts block's fused experts.

``LoRAExperts`` wraps a transformers 5 experts module (the base stays a child, unchanged) and
computes the experts' forward itself from the layout the module declares
(:mod:`lora_lightning.kinds.experts`): the token-expert pairs are sorted by expert, each projection
runs as one grouped GEMM over the bank (:mod:`lora_lightning.ops.grouped`), and each adapted
projection adds two more grouped GEMMs of rank r on the same tokens,
``scale * (dropout(x_e) A_eᵀ) B_eᵀ``. ``W + s B A`` is never formed for the bank: the memory the
adapter adds is the ``(tokens x r)`` intermediate, not a copy of every expert's weight. The gate and
activation are the module's own (``_apply_gate``, ``act_fn``), then biases, the post-expert norm,
the routing weights and the sum back per token, in the order transformers' ``grouped_mm`` forward
uses, so with ``B = 0`` the output is the model's own, bit for bit, where the same kernels run.

Factors per projection ``p``: ``lora_A[p]`` ``(E, r, in)`` and ``lora_B[p]`` ``(E, out, r)``;
:mod:`lora_lightning.io.peft_format` maps them to PEFT's ``target_parameters`` layout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lora_lightning.kinds.bnb_experts import BANK_4BIT, bank_kind
from lora_lightning.kinds.experts import BANK, ROUTER, ROUTER_PARAMETER, ExpertBank, Layout
from lora_lightning.nn.layers import lora_scale
from lora_lightning.ops.grouped import grouped_mm

BANK_INITS = ("kaiming", "gaussian")


class ParameterAdapter(nn.Module):
    """LoRA factors on bare parameters of one module: an expert bank's projections, or a router's weight.

    Each adapted parameter ``p`` holds, for each of its ``E`` experts (1 for a router),
    ``lora_A[p]`` ``(E, r, in)`` and ``lora_B[p]`` ``(E, out, r)``. The module's kind
    (:mod:`lora_lightning.kinds.experts`) reads and updates its weights; subclasses compute the forward.

    Args:
        base_layer: the module holding the parameters; kept as the child ``base_layer``.
        ranks: ``{parameter: (r, alpha)}`` for the adapted parameters.
        dropout: dropout probability on each adapted projection's input (training mode only).
        use_rslora: ``scale = alpha / sqrt(r)``.
        init: "kaiming" (A uniform in ``±1/sqrt(in)`` per expert, as ``nn.Linear`` and PEFT's
            ``lora_A``), "gaussian" (A ~ N(0, init_std)); B is zero; None leaves both zero for a
            caller that loads them.
        init_std: standard deviation for the gaussian init.
        dtype: dtype of the factors; None = the weights' dtype.
    """

    kind: ExpertBank

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: dict[str, tuple[int, float]],
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str | None = "kaiming",
        init_std: float = 0.02,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kind = self.kind = self._kind_of(base_layer)
        problem = kind.problem(base_layer)
        if problem is not None:
            raise TypeError(f"{type(base_layer).__name__} {problem}")
        known = self._parameter_names(base_layer)
        unknown = sorted(set(ranks) - set(known))
        if unknown or not ranks:
            raise ValueError(f"{type(base_layer).__name__} has parameters {', '.join(known)}; got {unknown or 'none'}")
        self.base_layer = base_layer
        self.num_experts = kind.num_experts(base_layer)
        self.projections = tuple(p for p in known if p in ranks)
        self.r = {p: ranks[p][0] for p in self.projections}
        self.alpha = {p: ranks[p][1] for p in self.projections}
        self.use_rslora = use_rslora
        self.scale = {p: lora_scale(self.r[p], self.alpha[p], use_rslora) for p in self.projections}
        self.features = {p: kind.features(base_layer, p) for p in self.projections}
        self.merged = False
        factory = {"device": kind.device(base_layer), "dtype": dtype or kind.compute_dtype(base_layer)}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p in self.projections:
            in_f, out_f = self.features[p]
            # A (E, r, in) and B (E, out, r), laid out so that A^T (E, in, r) and B^T (E, r, out), the
            # operands of the grouped GEMMs, are contiguous (measured: half the time of strided ones)
            A = torch.zeros(self.num_experts, in_f, self.r[p], **factory).transpose(-2, -1)
            B = torch.zeros(self.num_experts, self.r[p], out_f, **factory).transpose(-2, -1)
            self.lora_A[p], self.lora_B[p] = nn.Parameter(A), nn.Parameter(B)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init is not None:
            self.reset_lora_parameters(init, init_std)

    def _parameter_names(self, base_layer: nn.Module) -> tuple[str, ...]:
        raise NotImplementedError

    def _kind_of(self, base_layer: nn.Module) -> ExpertBank:
        return type(self).kind

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming", init_std: float = 0.02) -> None:
        """Start A random and B at zero, so the adapted module computes what the base did."""
        if init not in BANK_INITS:
            raise ValueError(f"init {init!r} is not supported on expert banks; use one of {BANK_INITS}")
        for p in self.projections:
            A = self.lora_A[p]
            if init == "kaiming":  # nn.Linear's kaiming_uniform(a=sqrt(5)) on each expert's (r, in)
                bound = 1.0 / math.sqrt(A.shape[-1])
                A.uniform_(-bound, bound)
            else:
                A.normal_(0.0, init_std)
            self.lora_B[p].zero_()

    # -- merge ---------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, measure: bool = False) -> tuple[float, float] | None:
        """Fold every expert's update into its weight (float32 sum, rounded once, one expert at a time).

        Returns:
            With ``measure``: ``(||kept - update||^2, ||update||^2)`` over every expert, measured one
            expert at a time in float64; else None.
        """
        if self.merged:
            return None
        error_sq = update_sq = 0.0
        for p in self.projections:
            A, B, scale = self.lora_A[p], self.lora_B[p], self.scale[p]
            if not measure:
                self.kind.add_update(self.base_layer, p, B, A, scale)
                continue
            for e in range(self.num_experts):
                weight = self.kind.expert_weight(self.base_layer, p, e)
                before = weight.double()
                weight.copy_(weight.float().addmm_(B[e].float(), A[e].float(), alpha=scale))
                update = B[e].double() @ A[e].double() * scale
                error_sq += float((weight.double() - before - update).square().sum())
                update_sq += float(update.square().sum())
        self.merged = True
        return (error_sq, update_sq) if measure else None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the rounding of the weights' dtype)."""
        if not self.merged:
            return
        for p in self.projections:
            if not self.kind.restore(self.base_layer, p):
                self.kind.add_update(self.base_layer, p, self.lora_B[p], self.lora_A[p], -self.scale[p])
        self.merged = False

    def _dropped(self, x: Tensor) -> Tensor:
        return self.lora_dropout(x) if self.training and isinstance(self.lora_dropout, nn.Dropout) else x

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{p}: r={self.r[p]}" for p in self.projections)
        return f"experts={self.num_experts}, {ranks}, merged={self.merged}"


class ExpertsForward:
    """The experts forward of a fused experts module, in the order of transformers' ``grouped_mm``
    forward: sort the token-expert pairs by expert, up (gate) projection, the module's gate or
    activation, down projection, post-expert norm, routing weights, the sum back per token.

    A class using it has ``layout``, ``num_experts``, ``functions`` (the module holding ``act_fn`` /
    ``_apply_gate`` / ``post_expert_norm``) and ``_project(x, p, offsets, counts, bias_rows)``.
    """

    layout: Layout
    num_experts: int

    @property
    def functions(self) -> nn.Module:
        raise NotImplementedError

    def _project(self, x: Tensor, p: str, offsets: Tensor, counts: list[int], bias_rows: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _expert_mlp(self, x: Tensor, offsets: Tensor, counts: list[int], rows: Tensor | None) -> Tensor:
        """up (gate) -> down, with the module's own gate / activation and post-expert norm."""
        base, layout = self.functions, self.layout
        up, down = layout.projections
        hidden = self._project(x, up, offsets, counts, rows)
        if not layout.has_gate:
            hidden = base.act_fn(hidden)
        elif callable(getattr(base, "_apply_gate", None)):
            hidden = base._apply_gate(hidden)
        else:  # Llama 4: [gate; up] halves, act(gate) * up
            gate, up_half = hidden.chunk(2, dim=-1)
            hidden = base.act_fn(gate) * up_half
        out = self._project(hidden, down, offsets, counts, rows)
        if layout.has_post_expert_norm:
            out = base.post_expert_norm(out)
        return out

    def _experts_forward(self, hidden_states: Tensor, *routing: Tensor) -> Tensor:
        if not self.layout.routed:
            return self._forward_every_expert(hidden_states, *routing)
        return self._forward_routed(hidden_states, *routing)

    def _forward_routed(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """transformers' ``grouped_mm`` experts forward, through this class's projections."""
        num_top_k = top_k_index.size(-1)
        num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
        expert_ids = top_k_index.reshape(-1)
        sample_weights = top_k_weights.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        x = hidden_states[perm // num_top_k]
        tokens_per_expert = torch.bincount(expert_ids_g, minlength=self.num_experts)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        counts = tokens_per_expert.tolist()
        out = self._expert_mlp(x, offsets, counts, expert_ids_g if self.layout.has_bias else None)
        weighted = out * sample_weights[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.size(0), device=perm.device)
        weighted = weighted[inverse]
        return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)

    def _forward_every_expert(self, hidden_states: Tensor) -> Tensor:
        """Llama 4: ``(E * T, H)`` rows, expert ``e`` taking rows ``e*T:(e+1)*T`` (scores already applied)."""
        rows = hidden_states.shape[0] // self.num_experts
        counts = [rows] * self.num_experts
        offsets = torch.arange(1, self.num_experts + 1, device=hidden_states.device, dtype=torch.int32) * rows
        return self._expert_mlp(hidden_states, offsets, counts, None)


class LoRAExperts(ExpertsForward, ParameterAdapter):
    """``h_e = W_e x + b_e + scale * B_e A_e dropout(x)`` for every projection of every expert of a bank.

    ``base_layer`` is the experts module (``MixtralExperts``, ``Qwen3MoeExperts``, ``GptOssExperts``,
    ``Llama4TextExperts``, ...); ``ranks`` names its projections (``gate_up_proj`` or ``up_proj``,
    ``down_proj``). Other arguments: :class:`ParameterAdapter`.
    """

    kind = BANK

    def __init__(self, base_layer: nn.Module, ranks: dict[str, tuple[int, float]], **options) -> None:
        super().__init__(base_layer, ranks, **options)
        self.layout: Layout = self.kind.layout(base_layer)

    def _kind_of(self, base_layer: nn.Module) -> ExpertBank:
        return bank_kind(base_layer)

    def _parameter_names(self, base_layer: nn.Module) -> tuple[str, ...]:
        return self._kind_of(base_layer).layout(base_layer).projections

    # -- forward -------------------------------------------------------------------------------

    @property
    def functions(self) -> nn.Module:
        return self.kind.functions(self.base_layer)

    def _project(self, x: Tensor, p: str, offsets: Tensor, counts: list[int], bias_rows: Tensor | None) -> Tensor:
        """One projection over tokens sorted by expert: base GEMM (grouped, or per expert from 4 bits),
        bias, then the rank-r update."""
        base = self.base_layer
        if self.kind is BANK_4BIT:
            out = base.project(x, p, offsets, counts)
        else:
            weight = self.kind.grouped_weight(base, p)
            out = grouped_mm(x.to(weight.dtype), weight, offsets, counts)
        bias = self.kind.bias(base, p)
        if bias is not None and bias_rows is not None:
            out.add_(bias[bias_rows])
        if p in self.lora_A:
            A, B = self.lora_A[p], self.lora_B[p]
            source = self._dropped(x).to(A.dtype)
            low = grouped_mm(source, A.transpose(-2, -1), offsets, counts)  # (S, r)
            update = grouped_mm(low, B.transpose(-2, -1), offsets, counts)  # (S, out)
            out = out + (update * self.scale[p]).to(out.dtype)
        return out

    def forward(self, hidden_states: Tensor, *routing: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(hidden_states, *routing)
        return self._experts_forward(hidden_states, *routing)


class LoRARouter(ParameterAdapter):
    """LoRA on a MoE router's bare ``weight`` (``*TopKRouter``): the router runs its own forward with
    ``W + scale * B A`` in place of ``W`` (the router is ``E x H``, so forming it costs little), so its
    top-k, softmax and score corrections are the model's own."""

    kind = ROUTER

    def _parameter_names(self, base_layer: nn.Module) -> tuple[str, ...]:
        return (ROUTER_PARAMETER,)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        p = ROUTER_PARAMETER
        weight = self.kind.stored(self.base_layer, p)
        A, B = self.lora_A[p][0], self.lora_B[p][0]
        adapted = weight + ((B @ A) * self.scale[p]).to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {p: adapted}, args, kwargs, strict=False)


def is_lora_bank(module: nn.Module) -> bool:
    """An adapter on bare parameters: an expert bank or a router."""
    return isinstance(module, ParameterAdapter)
