"""A causal-LM loss that never holds the logits of the whole sequence.

A model's own loss forms the logits of every token, ``(B, T, V)`` in the compute dtype, upcasts
them to float32 and keeps them for backward, then their gradient: for Llama-3's 128,256-token
vocabulary and 2,048 tokens that is about 3 GiB, the peak of a 4-bit 8B step. Here the model runs
to its last hidden state and the output head is applied to a chunk of labelled tokens at a time:
each chunk's cross-entropy is summed in float32, and its gradient (``softmax - onehot``) goes back
through the head at once, into the hidden states and any trainable head parameter; then the
chunk's logits are freed. Backward only scales those gradients: nothing of size ``(tokens x
vocabulary)`` outlives its chunk, and the head runs forward and backward once, as with the whole
logits. Only labelled tokens (label not ``-100``) reach the head at all.

    loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])

The value is the model's own ``model(input_ids, labels=labels).loss`` up to float rounding: the
mean over labelled tokens of the next-token cross-entropy (labels shifted by one inside, as
transformers does), or the sum divided by ``num_items_in_batch`` when given (gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
#: tokens per chunk by default: 1,024 x 128,256 float32 logits are 0.5 GiB, twice that in backward
DEFAULT_CHUNK_TOKENS = 1024
# config fields that change the logits after the output head: the chunked loss does not apply them
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _head_of(model: nn.Module) -> nn.Module:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        raise TypeError(
            f"causal_lm_loss needs a transformers causal LM with an output head (get_output_embeddings()); "
            f"{type(model).__name__} has none"
        )
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"causal_lm_loss: {type(model).__name__} transforms its logits after the head "
                f"(config.{name}={value!r}); use the model's own loss (loss_chunk_tokens=None in the app)"
            )
    return head


def chunked_cross_entropy(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets``, a chunk of tokens at a time.

    Args:
        hidden: ``(N, H)`` (or ``(..., H)``) the states the head reads, already aligned with ``targets``.
        head: the output head; it may hold trainable parameters (an adapted head): their gradients
            flow as through the plain head.
        targets: ``(N,)`` (or ``(...)``) token ids, ``-100`` for tokens without a loss.
        chunk_tokens: labelled tokens per chunk (the peak holds one chunk's logits and their gradient).
        num_items_in_batch: divide the sum by this instead of the number of labelled tokens.

    Returns:
        A scalar, float32 (float64 for a float64 head).
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    labelled = targets != IGNORE_INDEX
    hidden, targets = hidden[labelled], targets[labelled]  # (n, H), (n,): only these reach the head
    count = targets.numel()
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        total = _ChunkedCrossEntropy.apply(hidden, targets, head, chunk_tokens, *params)
    else:
        parts = range(0, count, chunk_tokens)
        total = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype)) + sum(
            _chunk_sum(head(hidden[i : i + chunk_tokens]), targets[i : i + chunk_tokens])[0] for i in parts
        )
    if not count:  # no labelled token: 0, still through the head's graph (zero gradients, every rank alike)
        return total * 0.0
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    if isinstance(denominator, Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, as transformers' loss upcasts the logits; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def _chunk_sum(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(the chunk's summed cross-entropy, its gradient with respect to the logits)``.

    Formed in float32 (float64 stays float64): ``logsumexp - the target's logit``, and the gradient
    ``softmax - onehot`` in a buffer of its own (the head's graph may keep its output).
    """
    logits = logits.to(_loss_dtype(logits.dtype))  # (n, V)
    lse = torch.logsumexp(logits, dim=1)  # (n,)
    total = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    grad = torch.sub(logits, lse[:, None]).exp_()  # the softmax
    grad[torch.arange(targets.numel(), device=grad.device), targets] -= 1
    return total, grad


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The cross-entropy summed over chunks, its gradients formed chunk by chunk in forward.

    Each chunk's logits exist only while its loss and their gradient are formed; that gradient goes
    straight back through the head (``torch.autograd.grad``) into the hidden states and any
    trainable head parameter, so backward only scales what forward kept, ``(n, H)`` and the
    parameters' shapes, never ``(n, V)``. The head runs forward and backward once, as with the
    whole logits.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_tokens, *params):  # type: ignore[override]
        need_hidden = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_params = [torch.zeros_like(p) for p in params]
        total = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype))
        for start in range(0, targets.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            with torch.enable_grad():
                h = hidden[part].detach().requires_grad_(need_hidden)
                logits = head(h)  # (n, V)
                chunk_total, grad_logits = _chunk_sum(logits, targets[part])
                wrt = ([h] if need_hidden else []) + list(params)
                grads = list(torch.autograd.grad(logits, wrt, grad_logits.to(logits.dtype), allow_unused=True))
            del logits, grad_logits
            total += chunk_total
            if need_hidden:
                grad_hidden[part] = grads.pop(0)
            for into, grad in zip(grad_params, grads, strict=True):
                if grad is not None:
                    into += grad
        ctx.need_hidden = need_hidden
        ctx.save_for_backward(*([grad_hidden] if need_hidden else []), *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        saved = [grad * grad_total.to(grad.dtype) for grad in ctx.saved_tensors]
        grad_hidden = saved.pop(0) if ctx.need_hidden else None
        return (grad_hidden, None, None, None, *saved)


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    num_items_in_batch: int | Tensor | None = None,
    **model_kwargs: object,
) -> Tensor:
    """The next-token loss of a transformers causal LM, its logits formed a chunk at a time.

    Args:
        model: a transformers ``*ForCausalLM`` (adapted or not, a LoRA-adapted head included).
        input_ids: ``(B, T)``.
        labels: ``(B, T)``, ``-100`` where no loss is wanted (padding, prompts); shifted inside.
        chunk_tokens: labelled tokens per chunk of the head.
        num_items_in_batch: as transformers' argument: the denominator of a gradient-accumulated sum.
        **model_kwargs: passed to the model (``attention_mask``, ``position_ids``, ...).

    Returns:
        A scalar: ``model(input_ids, labels=labels, **model_kwargs).loss`` up to rounding.

    Raises:
        TypeError: the model has no output head. ValueError: it transforms its logits after the head
            (soft-capping, a logit scale), or ``chunk_tokens`` is not a positive integer.
    """
    head = _head_of(model)
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise TypeError(f"causal_lm_loss: {type(model).__name__} has no transformer body (base_model) under its head")
    outputs = backbone(input_ids=input_ids, **model_kwargs)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state  # (B, T, H)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts token t+1
    return chunked_cross_entropy(hidden, head, targets, chunk_tokens, num_items_in_batch)


__all__ = ["DEFAULT_CHUNK_TOKENS", "causal_lm_loss", "chunked_cross_entropy"]
