from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lora_lightning import LoRACallback, LoRAConfig
from lora_lightning.inject import lora_layers
from tests.lightning_modules import CausalLM, LazyCausalLM, SmallCNN, image_data, token_data
from tests.models import token_ids


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class Probe(pl.Callback):
    """Captures the optimizer's parameters and the adapted model's state just before fit end."""

    def __init__(self, ids: torch.Tensor, module: str | None = "model") -> None:
        self.ids = ids
        self.module = module

    def on_train_start(self, trainer, pl_module):
        target = pl_module.get_submodule(self.module) if self.module else pl_module
        self.adapter_params = {id(p) for layer in lora_layers(target).values() for p in (layer.lora_A, layer.lora_B)}
        self.optimizer_params = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        self.trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        target = pl_module.get_submodule(self.module) if self.module else pl_module
        self.base_before_merge = {
            n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(target).items()
        }
        pl_module.eval()
        with torch.no_grad():
            self.adapted_output = pl_module(self.ids.to(pl_module.device)).detach().clone()


def test_fit_trains_only_adapters_then_merges_into_plain_layers(tmp_path):
    module = CausalLM()
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    ids = token_ids(batch=4, length=16)
    probe = Probe(ids)
    callback = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], module="model")
    _trainer(tmp_path, [callback, probe]).fit(module, token_data())

    # the optimizer held exactly the adapter parameters, although configure_optimizers passed self.parameters()
    assert probe.optimizer_params == probe.adapter_params == probe.trainable
    assert len(probe.adapter_params) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # the base weights were never touched during training
    for name, weight in probe.base_before_merge.items():
        assert torch.equal(weight, start[name + ".weight"]), name
    # training worked
    first, last = sum(module.losses[:4]) / 4, sum(module.losses[-4:]) / 4
    assert last < first - 0.05, (first, last)
    # after fit: plain layers, merged weights, same outputs as the adapted model
    assert not lora_layers(module) and isinstance(module.model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert set(module.model.state_dict()) == set(start) | {k for k in module.model.state_dict() if "rotary" in k}
    with torch.no_grad():
        torch.testing.assert_close(module(ids), probe.adapted_output, rtol=1e-5, atol=1e-5)
    assert not torch.equal(
        module.model.model.layers[0].self_attn.q_proj.weight, start["model.layers.0.self_attn.q_proj.weight"]
    )


def test_non_transformers_model_with_param_groups_and_scheduler(tmp_path):
    module = SmallCNN()
    features = copy.deepcopy(module.features.state_dict())
    probe = Probe(torch.randn(2, 1, 8, 8), module=None)
    callback = LoRACallback(r=4, alpha=32, target_modules=["fc1", "classifier"])
    trainer = _trainer(tmp_path, [callback, probe], max_epochs=6)
    trainer.fit(module, image_data())
    assert probe.optimizer_params == probe.adapter_params
    (optimizer,) = trainer.optimizers
    assert len(optimizer.param_groups) == 1  # the frozen features' group was dropped
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.1]  # and its scheduler entry with it
    assert module.losses[-1] < module.losses[0] * 0.7
    assert all(torch.equal(v, module.features.state_dict()[k]) for k, v in features.items())
    assert isinstance(module.fc1, nn.Linear) and isinstance(module.classifier, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(probe.ids), probe.adapted_output, rtol=1e-5, atol=1e-5)


def test_lora_plus_gives_B_its_own_faster_group(tmp_path):
    module = CausalLM(scheduler=True)
    callback = LoRACallback(r=4, target_modules=["q_proj"], module="model", lr_ratio_B=16)
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(module, token_data())
    a_group, b_group = trainer.optimizers[0].param_groups
    assert all(p.shape[0] == 4 for p in a_group["params"]) and all(p.shape[1] == 4 for p in b_group["params"])
    assert b_group["lr"] == pytest.approx(16 * a_group["lr"])
    assert a_group["lr"] < 1e-2  # the scheduler ran on both groups


def test_module_without_an_optimizer_of_its_own_gets_the_factory_one(tmp_path):
    class NoOptimizer(CausalLM):
        def configure_optimizers(self):
            return None

    module = NoOptimizer()
    made = []

    def factory(params):
        made.append(len(params))
        return torch.optim.SGD(params, lr=0.5)

    callback = LoRACallback(r=2, target_modules=["q_proj"], module="model", optimizer=factory)
    trainer = _trainer(tmp_path, [callback], max_epochs=1, max_steps=2)
    trainer.fit(module, token_data())
    assert made == [4] and isinstance(trainer.optimizers[0], torch.optim.SGD)
    default = LoRACallback(r=2, target_modules=["q_proj"], module="model")
    trainer = _trainer(tmp_path, [default], max_epochs=1, max_steps=1)
    trainer.fit(NoOptimizer(), token_data())
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)


def test_nothing_trainable_is_a_clear_error(tmp_path):
    class FrozenOptimizer(CausalLM):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.model.embed_tokens.parameters(), lr=1e-3)

    callback = LoRACallback(r=2, target_modules=["q_proj"], module="model")
    with pytest.raises(ValueError, match="optimizers over frozen parameters only"):
        _trainer(tmp_path, [callback], max_steps=1).fit(FrozenOptimizer(), token_data())


def test_network_built_in_configure_model_is_adapted(tmp_path):
    module = LazyCausalLM()
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], module="model", merge_on_fit_end=False)
    _trainer(tmp_path, [callback], max_epochs=2).fit(module, token_data())
    assert len(lora_layers(module.model)) == 4
    assert callback.report is not None and callback.report.params.trainable == 1792
    assert module.losses[-1] < module.losses[0]


def test_repeated_setup_for_validate_and_test_does_not_reinject(tmp_path):
    module = CausalLM()
    callback = LoRACallback(r=4, target_modules=["q_proj"], module="model", merge_on_fit_end=False)
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(module, token_data())
    layers = lora_layers(module.model)
    factors = {n: layer.lora_B.detach().clone() for n, layer in layers.items()}
    trainer.validate(module, token_data())
    trainer.test(module, token_data())
    assert lora_layers(module.model) == layers  # the very same layer objects
    assert all(torch.equal(layers[n].lora_B, v) for n, v in factors.items())


def test_callback_arguments_are_validated_at_construction():
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        LoRACallback(r=0)
    with pytest.raises(TypeError, match="either config or LoRAConfig fields"):
        LoRACallback(LoRAConfig(), r=4)
    with pytest.raises(ValueError, match="lr_ratio_B must be a positive number, got 0"):
        LoRACallback(lr_ratio_B=0)
    with pytest.raises(ValueError, match="module must be a dotted submodule path"):
        LoRACallback(module="")


def test_unknown_submodule_lists_the_children(tmp_path):
    callback = LoRACallback(r=2, module="modle")
    with pytest.raises(ValueError, match=r"module='modle'.*no such submodule; its children are: model"):
        _trainer(tmp_path, [callback], max_steps=1).fit(CausalLM(), token_data())


def test_logs_config_and_counts_to_every_logger_and_prints_the_table(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    callback = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], module="model")
    _trainer(tmp_path, [callback], max_epochs=1, logger=logger).fit(CausalLM(), token_data())
    hparams = (Path(logger.log_dir) / "hparams.yaml").read_text()
    assert "lora/r: 4" in hparams and "lora/alpha: 8" in hparams and "q_proj" in hparams
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "lora/trainable_params" in metrics and "1792.0" in metrics
    printed = capsys.readouterr().out
    assert (
        "model.layers.*.self_attn.v_proj (x2)" in printed and "trainable params: 1,792 || all params: 92,224" in printed
    )
    assert "model.layers.1.self_attn.v_proj" not in printed  # a row per role across layers
    full = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], module="model", full_report=True)
    _trainer(tmp_path / "full", [full], max_steps=1).fit(CausalLM(), token_data())
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.v_proj" in printed and "model.layers.1.self_attn.v_proj" in printed


def test_fit_end_exports_peft_adapter_and_merged_model_with_tokenizer(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.io.test_adapters_export import _tokenizer
    from tests.models import tiny_llama

    module = CausalLM()
    module.tokenizer = _tokenizer()  # picked up from the module, as the Hydra app's module exposes it
    ids = token_ids(batch=2, length=12)
    probe = Probe(ids)
    export = tmp_path / "export"
    callback = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], module="model", export_dir=export)
    _trainer(tmp_path, [callback, probe], max_epochs=2).fit(module, token_data())

    assert callback.export_paths == {"adapter": export / "adapter", "merged": export / "merged"}
    assert sorted(p.name for p in export.iterdir()) == ["adapter", "merged"]  # nothing half-written beside them
    merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()
    peft_model = PeftModel.from_pretrained(tiny_llama().eval(), export / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, probe.adapted_output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, probe.adapted_output, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(export / "merged")
    text = "Adapters are small."
    assert tokenizer(text)["input_ids"] == module.tokenizer(text)["input_ids"]


def test_merge_on_fit_end_off_keeps_adapters_and_still_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    module = CausalLM()
    ids = token_ids(batch=2, length=12)
    probe = Probe(ids)
    export = tmp_path / "export"
    callback = LoRACallback(r=4, target_modules=["q_proj"], module="model", merge_on_fit_end=False, export_dir=export)
    _trainer(tmp_path, [callback, probe], max_epochs=1).fit(module, token_data())
    assert len(lora_layers(module)) == 2 and not any(layer.merged for layer in lora_layers(module).values())
    merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, probe.adapted_output, rtol=1e-5, atol=1e-5)
