"""FSDP needs a GPU in Lightning: these run only where CUDA is available (marker ``cuda``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning import LoRACallback
from lora_lightning.inject import lora_layers
from tests.lightning.test_callback import Probe, _trainer
from tests.lightning_modules import CausalLM, token_data
from tests.models import token_ids


@pytest.mark.cuda
def test_fsdp_injects_before_sharding_and_merges_with_full_parameters(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    module = CausalLM()
    ids = token_ids(batch=4, length=16)
    probe = Probe(ids)
    callback = LoRACallback(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"], module="model", export_dir=tmp_path / "export"
    )
    trainer = _trainer(tmp_path, [callback, probe], accelerator="cuda", strategy=FSDPStrategy(), max_epochs=3)
    trainer.fit(module, token_data())

    assert probe.optimizer_params == probe.adapter_params  # only adapters reached the optimizer
    assert sum(module.losses[-4:]) < sum(module.losses[:4])
    assert not lora_layers(module) and isinstance(module.model.model.layers[0].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        merged = module(ids.to(module.device))
    torch.testing.assert_close(merged, probe.adapted_output, rtol=1e-4, atol=1e-4)
    # the export was written from full parameters: the merged checkpoint reproduces the outputs
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").to(module.device).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids.to(module.device)).logits, merged, rtol=1e-4, atol=1e-4)
