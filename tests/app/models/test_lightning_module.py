"""The app's LightningModule trains on the chunked loss by default: the same loss, the same gradients."""

from __future__ import annotations

import pytest
import torch

from lora_lightning.app.models.lightning_module import CausalLMModule
from tests.models import tiny_llama, token_ids


@pytest.mark.parametrize("packed", [False, True])
def test_the_chunked_training_loss_is_the_models_own(packed):
    ids = token_ids(batch=2, length=16, seed=3)
    labels = ids.clone()
    labels[:, :5] = -100  # prompts
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # two examples a row, position ids restarting
        batch["position_ids"] = torch.cat([torch.arange(8), torch.arange(8)]).repeat(2, 1)
    else:
        batch["attention_mask"] = torch.ones_like(ids)
    losses, grads = [], []
    for chunk in (None, 3):
        model = tiny_llama(seed=1).train()
        loss = CausalLMModule(model, loss_chunk_tokens=chunk).training_step(dict(batch), 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
