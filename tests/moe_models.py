"""Tiny real Mixture-of-Experts transformers models built from configs, and a float64 reference of one
experts module's forward, shared by the expert-bank tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

VOCAB = 128
_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Weights and biases drawn at 0.05 (routers included, so tokens spread over experts); norms stay."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def tiny_mixtral(seed: int = 0, layers: int = 2) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(
        **_COMMON, intermediate_size=96, num_hidden_layers=layers, num_local_experts=4, num_experts_per_tok=2
    )
    return _randomise(MixtralForCausalLM(config), seed)


def tiny_qwen3_moe(seed: int = 0, layers: int = 2) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        **_COMMON,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=layers,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
    )
    return _randomise(Qwen3MoeForCausalLM(config), seed)


def tiny_gpt_oss(seed: int = 0, layers: int = 2) -> GptOssForCausalLM:
    """Transposed ``(E, in, out)`` banks, gate and up interleaved, per-expert biases."""
    torch.manual_seed(seed)
    config = GptOssConfig(
        **_COMMON,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["full_attention"] * layers,
    )
    return _randomise(GptOssForCausalLM(config), seed)


def tiny_deepseek_v3(seed: int = 0, layers: int = 3) -> DeepseekV3ForCausalLM:
    """A dense first layer (``mlp.gate_proj`` ...), then MoE layers with routed experts and ``shared_experts``."""
    torch.manual_seed(seed)
    config = DeepseekV3Config(
        **_COMMON,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=layers,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    )
    return _randomise(DeepseekV3ForCausalLM(config), seed)


def tiny_llama4(seed: int = 0, layers: int = 2) -> Llama4ForCausalLM:
    """Llama 4's fused but undecorated experts: every expert sees every token."""
    torch.manual_seed(seed)
    config = Llama4TextConfig(
        **_COMMON,
        intermediate_size=64,
        intermediate_size_mlp=128,
        num_hidden_layers=layers,
        num_local_experts=4,
        num_experts_per_tok=1,
        head_dim=16,
        interleave_moe_layer_step=1,
        no_rope_layers=[1] * layers,
    )
    return _randomise(Llama4ForCausalLM(config), seed)


class _Config:
    """What a decorated experts class reads from a transformers config."""

    def __init__(self, experts: int = 4, hidden: int = 32, intermediate: int = 48) -> None:
        self.n_routed_experts, self.hidden_size, self.moe_intermediate_size = experts, hidden, intermediate
        self._experts_implementation = "grouped_mm"


@use_experts_implementation(has_gate=False)
class UngatedExperts(nn.Module):
    """NemotronH's layout (``up_proj`` and ``down_proj``, no gate, ``act_fn``) in a class of our own: the
    real NemotronH is a Mamba hybrid, impractical to build on a CPU; the decorator is transformers' own."""

    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.up_proj = nn.Parameter(torch.randn(self.num_experts, config.moe_intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.randn(self.num_experts, config.hidden_size, config.moe_intermediate_size))
        self.act_fn = ACT2FN["relu2"]

    def forward(self, hidden_states, top_k_index, top_k_weights):  # the decorator dispatches to grouped_mm
        raise NotImplementedError


@use_experts_implementation(has_post_expert_norm=True)
class NormedExperts(nn.Module):
    """A gated bank with a norm after each expert (MuseSpark's flag), in a class of our own."""

    def __init__(self, config: _Config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.randn(self.num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.randn(self.num_experts, hidden, inter))
        self.act_fn = ACT2FN["silu"]
        self.post_expert_norm = nn.LayerNorm(hidden)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise NotImplementedError


def own_bank(cls: type, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bank = cls(_Config())
    with torch.no_grad():
        for param in bank.parameters():
            if param.dim() == 3:
                param.mul_(0.1)
    return bank


MODELS = {
    "mixtral": tiny_mixtral,
    "qwen3_moe": tiny_qwen3_moe,
    "gpt_oss": tiny_gpt_oss,
    "deepseek_v3": tiny_deepseek_v3,
    "llama4": tiny_llama4,
}


def routing(tokens: int, experts: int, top_k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-k expert indices per token and positive weights summing to one."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator) + 0.1
    return index, weights / weights.sum(-1, keepdim=True)


def bank_reference(adapter, x: torch.Tensor, index: torch.Tensor | None, weights: torch.Tensor | None):
    """The adapted experts' output in float64, one token and one expert at a time, from the dense
    per-expert weights ``W_e + s B_e A_e`` (formed here, as the formula reads, in float64).

    ``adapter`` is a :class:`~lora_lightning.nn.experts.LoRAExperts`; the gate, activation and norm
    are the module's own, run in float64. With ``index`` None every expert takes its ``T`` rows (Llama 4).
    """
    bank, kind, layout = adapter.base_layer, adapter.kind, adapter.layout
    functions = adapter.functions  # the experts module (a 4-bit bank keeps it as its child)

    def weight(p: str, e: int) -> torch.Tensor:
        if hasattr(bank, "banks_4bit"):  # bitsandbytes' dequantization of the expert's blocks
            w = bank.banks_4bit[p].dequantize(e).double()
        else:
            w = kind.expert_weight(bank, p, e).double()
        if p in adapter.lora_A:
            w = w + adapter.lora_B[p][e].double() @ adapter.lora_A[p][e].double() * adapter.scale[p]
        return w

    def bias(p: str, e: int):
        b = kind.bias(bank, p)
        return 0.0 if b is None else b[e].double()

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        up, down = layout.projections
        h = rows @ weight(up, e).t() + bias(up, e)
        if not layout.has_gate:
            h = functions.act_fn(h)
        elif hasattr(functions, "_apply_gate"):
            h = functions._apply_gate(h)
        else:
            gate, up_half = h.chunk(2, dim=-1)
            h = functions.act_fn(gate) * up_half
        out = h @ weight(down, e).t() + bias(down, e)
        return functions.post_expert_norm.double()(out) if layout.has_post_expert_norm else out

    x = x.double()
    if index is None:
        rows = x.shape[0] // adapter.num_experts
        return torch.cat([expert(e, x[e * rows : (e + 1) * rows]) for e in range(adapter.num_experts)])
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            out[t] += weights[t, k].double() * expert(int(index[t, k]), x[t : t + 1])[0]
    return out
