"""The chunked causal-LM loss against transformers' own loss, in float64, gradients included."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_lightning import LoRAConfig, causal_lm_loss, chunked_cross_entropy, inject_lora
from lora_lightning.inject import lora_layers
from tests.models import tiny_gpt2, tiny_llama, token_ids

BUILDERS = {
    "llama": lambda: tiny_llama(),
    "llama_tied": lambda: tiny_llama(tie_word_embeddings=True),
    "gpt2": lambda: tiny_gpt2(),  # GPT-2 ties its head to the embeddings
}


def _batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch: row 1 ends in 4 pad tokens; -100 on the padding and on a few prompt tokens."""
    ids = token_ids(batch=2, length=12, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # a prompt
    return ids, mask, labels


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model: torch.nn.Module, ids, mask, labels, num_items=None) -> torch.Tensor:
    """transformers' logits, the next-token loss formula in float64 (its own loss casts them to float32)."""
    logits = model(input_ids=ids, attention_mask=mask).logits.double()  # (B, T, V)
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
    return total / (num_items if num_items is not None else (target != -100).sum())


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_equals_the_models_own_loss_in_float64_with_gradients(family, chunk):
    model = BUILDERS[family]().double().eval()  # eval: no dropout (GPT-2's), gradients all the same
    ids, mask, labels = _batch()
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' loss (float32 logits)
    want = _reference(model, ids, mask, labels)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_tokens=chunk)
    got.backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, own.double(), rtol=1e-6, atol=0)  # to float32 rounding
    got_grads = _grads(model)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_equals_the_models_own_loss_in_float32(family):
    model = BUILDERS[family]().eval()
    ids, mask, labels = _batch(seed=7)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_tokens=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, own, rtol=1e-6, atol=0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_with_a_frozen_head_gets_the_same_gradients(targets):
    """The usual case: every weight frozen, the head too; only the adapters train."""
    model = tiny_llama().double().eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    ids, mask, labels = _batch(seed=5)
    want = _reference(model, ids, mask, labels)
    want.backward()
    want_grads = _grads(model)
    assert want_grads and all("lora_" in name for name in want_grads)
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_tokens=7)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_a_lora_adapted_head_and_num_items_in_batch():
    model = tiny_llama().double().train()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    ids, mask, labels = _batch(seed=4)
    want = _reference(model, ids, mask, labels, num_items=40)
    want.backward()
    want_grads = _grads(model)
    assert "lm_head.lora_B" in want_grads and "lm_head.lora_A" in want_grads
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_tokens=3, num_items_in_batch=40)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    own = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=40).loss
    torch.testing.assert_close(got, own.double(), rtol=1e-6, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_no_tensor_of_the_whole_logits_is_ever_saved_for_backward():
    """What autograd saves (weights aside) holds at most one chunk of logits, never (tokens x vocabulary)."""
    vocab, chunk = 1000, 8  # a vocabulary no other width of the model shares
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, vocab, (2, 32))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[tuple[int, ...]] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:  # a weight (or a view of one) is no activation
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        causal_lm_loss(model, ids, ids, chunk_tokens=chunk).backward()
    param_shapes = {tuple(p.shape) for p in model.parameters()}  # the head's own gradient is one of these
    logits_like = [shape for shape in saved if vocab in shape and shape not in param_shapes]
    assert all(math.prod(shape) <= chunk * vocab for shape in logits_like), logits_like
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    assert any(math.prod(shape) >= ids.numel() * vocab for shape in saved)  # the premise: the model's loss keeps them


def test_what_it_refuses():
    model = tiny_llama()
    ids = token_ids()
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer, got 0"):
        causal_lm_loss(model, ids, ids, chunk_tokens=0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"config.final_logit_softcapping=30.0.*use the model's own loss"):
        causal_lm_loss(model, ids, ids)
    with pytest.raises(TypeError, match="needs a transformers causal LM with an output head"):
        causal_lm_loss(model.model, ids, ids)
    # nothing labelled: zero, and still a graph to call backward on
    hidden = torch.randn(4, 64, requires_grad=True)
    empty = chunked_cross_entropy(hidden, model.lm_head, torch.full((4,), -100))
    empty.backward()
    assert empty.item() == 0.0 and hidden.grad is not None
