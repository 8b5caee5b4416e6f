from __future__ import annotations

import copy

import pytest
import torch

from lora_lightning import LoRAConfig, get_lora_config, inject_lora, merge_and_unload, merge_lora, unmerge_lora
from lora_lightning.inject import lora_layers
from tests.models import BUILDERS, output_of, token_ids
from tests.test_inject import TARGETS, _randomise_B


def _adapted(family: str):
    base = BUILDERS[family]()
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS[family]))
    _randomise_B(model)
    return base, model


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_merged_equals_adapted_twice_and_unmerge_restores(family):
    base, model = _adapted(family)
    ids = token_ids()
    with torch.no_grad():
        adapted = output_of(model, ids)
        merge_lora(model)
        once = {k: v.clone() for k, v in model.state_dict().items()}
        torch.testing.assert_close(output_of(model, ids), adapted, rtol=1e-5, atol=1e-5)
        merge_lora(model)  # idempotent: nothing changes the second time
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())
        torch.testing.assert_close(output_of(model, ids), adapted, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        for name, layer in lora_layers(model).items():
            original = base.get_submodule(name).weight
            torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
        torch.testing.assert_close(output_of(model, ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_merge_and_unload_gives_plain_model_that_loads_strict(family):
    base, model = _adapted(family)
    ids = token_ids()
    with torch.no_grad():
        adapted = output_of(model, ids)
    plain = merge_and_unload(model)
    assert plain is model and not lora_layers(plain) and get_lora_config(plain) is None
    assert set(plain.state_dict()) == set(base.state_dict())
    fresh = BUILDERS[family](seed=123)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, ids), adapted, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(output_of(fresh, ids), output_of(base, ids), atol=1e-4)
    # the unloaded model can be adapted again
    inject_lora(plain, LoRAConfig(r=2, target_modules=TARGETS[family]))
