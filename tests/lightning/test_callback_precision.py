from __future__ import annotations

import pytest
import torch

from lora_lightning import LoRACallback
from lora_lightning.inject import lora_layers
from tests.lightning.test_callback import Probe, _trainer
from tests.lightning_modules import CausalLM, token_data
from tests.models import token_ids


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train_and_merge(tmp_path, precision):
    module = CausalLM(lr=2e-2)
    ids = token_ids(batch=4, length=16)
    probe = Probe(ids)
    callback = LoRACallback(r=4, alpha=8, target_modules="all-linear", module="model")
    _trainer(tmp_path, [callback, probe], max_epochs=3, precision=precision).fit(module, token_data())
    assert sum(module.losses[-4:]) < sum(module.losses[:4]) - 0.2
    assert not lora_layers(module)
    want_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.model.model.layers[0].self_attn.q_proj.weight.dtype == want_dtype
    with torch.no_grad():
        merged = module(ids)
    # the merge rounds once into the weight dtype: within bf16 rounding of the adapted output
    torch.testing.assert_close(merged.float(), probe.adapted_output.float(), rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_still_trains_adapters(tmp_path, reentrant):
    module = CausalLM()
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    # recent transformers add an input-grad hook themselves; older ones and other models do not:
    # remove it so only the callback can make reentrant checkpointing pass gradients to the adapters
    module.model.disable_input_require_grads()
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], module="model", merge_on_fit_end=False)
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, token_data())
    # B starts at zero: it moved only if gradients reached it through the checkpointed blocks
    for name, layer in lora_layers(module.model).items():
        assert torch.count_nonzero(layer.lora_B) > 0, name
    # the input-grad hook the callback added is gone after fit
    assert not module.model.model.embed_tokens._forward_hooks
