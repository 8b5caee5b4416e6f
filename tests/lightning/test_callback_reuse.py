"""The callback across fits and its setup-time refusals: a reused callback never touches weights it
did not merge; an optimizer that would be emptied, or an export that would fail at fit end, is an
error before the first step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lora_lightning import LoRACallback
from lora_lightning.inject import lora_layers
from tests.lightning.test_callback import _trainer
from tests.lightning_modules import CausalLM, token_data

Q_PROJ = "model.layers.0.self_attn.q_proj"  # inside CausalLM.model


class BaseAtTrainStart(pl.Callback):
    """Records the adapted layers' base weights when training starts."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        layers = lora_layers(pl_module.model)
        self.seen.append({name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()})


def _q_weights(module: CausalLM) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in module.model.named_modules() if n.endswith("q_proj")}


def test_a_reused_callback_adapts_each_fresh_model_from_its_own_weights(tmp_path):
    """The issue's case: one callback, two fits on two freshly loaded models. The second model
    must train on its own pretrained weights, not on them minus the first run's update."""
    lora = LoRACallback(r=8, alpha=16, target_modules=["q_proj"], module="model")
    probe = BaseAtTrainStart()
    for run in range(2):
        module = CausalLM()  # the same pretrained weights each time (seed 0)
        pretrained = _q_weights(module)
        _trainer(tmp_path / str(run), [lora, probe], max_steps=5).fit(module, token_data())
        for name, weight in probe.seen[run].items():
            assert torch.equal(weight, pretrained[name]), (run, name)
        # what was exported / left merged is this run's base plus this run's update only
        saved = lora.state.merged.layers[Q_PROJ].tensors
        A, B = saved["lora_A"], saved["lora_B"]
        want = pretrained[Q_PROJ] + 2.0 * (B @ A)
        torch.testing.assert_close(module.model.model.layers[0].self_attn.q_proj.weight, want)


def test_a_reused_callback_adapts_another_architecture_from_scratch(tmp_path):
    """Before: a bare KeyError for the module the first model had and the second lacks."""
    lora = LoRACallback(r=4, alpha=8, target_modules=["q_proj"], module="model")
    _trainer(tmp_path / "a", [lora], max_steps=2).fit(CausalLM(layers=2), token_data())
    small = CausalLM(layers=1, seed=3)
    pretrained = _q_weights(small)
    probe = BaseAtTrainStart()
    _trainer(tmp_path / "b", [lora, probe], max_steps=2).fit(small, token_data())
    (only,) = probe.seen[0].values()
    assert torch.equal(only, pretrained[Q_PROJ])


def test_the_merged_module_is_readapted_only_while_its_merged_weights_are_unchanged(tmp_path):
    lora = LoRACallback(r=4, alpha=8, target_modules=["q_proj"], module="model")
    module = CausalLM()
    pretrained = _q_weights(module)
    _trainer(tmp_path / "a", [lora], max_steps=3).fit(module, token_data())
    probe = BaseAtTrainStart()
    _trainer(tmp_path / "b", [lora, probe], max_steps=1).fit(module, token_data())  # same module, untouched
    for name, weight in probe.seen[0].items():  # the merge was undone: the base the first fit started from
        torch.testing.assert_close(weight, pretrained[name], rtol=0, atol=1e-6)
    with torch.no_grad():  # the user changes the merged model between fits
        module.model.model.layers[0].self_attn.q_proj.weight.add_(0.25)
    changed = _q_weights(module)
    _trainer(tmp_path / "c", [lora, probe], max_steps=1).fit(module, token_data())
    for name, weight in probe.seen[1].items():  # not unmerged from weights it no longer merged
        assert torch.equal(weight, changed[name]), name


class TwoPlayers(pl.LightningModule):
    """A generator and a discriminator with an optimizer each (manual optimization, as for GANs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.automatic_optimization = False
        self.steps_of: list[int] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        loss_g = -self.discriminator(self.generator(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        if opt_d.optimizer.param_groups:  # a user who asked for an empty discriminator optimizer skips it
            loss_d = self.discriminator(self.generator(x).detach()).mean() - self.discriminator(x).mean()
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
        self.steps_of.append(len(opt_d.optimizer.param_groups))

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3),
        )


def _vectors() -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    return torch.utils.data.DataLoader(data, batch_size=8)


def test_an_optimizer_the_callback_would_empty_is_an_error_naming_it(tmp_path):
    module = TwoPlayers()
    lora = LoRACallback(r=2, target_modules=["generator.0", "generator.2"])
    with pytest.raises(ValueError, match=r"optimizer 1 of configure_optimizers \(Adam\) holds only parameters") as err:
        _trainer(tmp_path, [lora], max_steps=2).fit(module, _vectors())
    message = str(err.value)
    assert "discriminator.0.weight" in message and "modules_to_save" in message
    assert "allow_empty_optimizers=True" in message
    assert module.steps_of == []  # refused before the first step


def test_an_emptied_optimizer_is_kept_when_asked_for_and_modules_to_save_keeps_it_full(tmp_path):
    module = TwoPlayers()
    lora = LoRACallback(r=2, target_modules=["generator.0", "generator.2"], allow_empty_optimizers=True)
    _trainer(tmp_path / "a", [lora], max_steps=2).fit(module, _vectors())
    assert module.steps_of and set(module.steps_of) == {0}  # trained, with an empty discriminator optimizer
    module = TwoPlayers()
    lora = LoRACallback(r=2, target_modules=["generator.0", "generator.2"], modules_to_save=["discriminator"])
    _trainer(tmp_path / "b", [lora], max_steps=2).fit(module, _vectors())
    assert module.steps_of and set(module.steps_of) == {1}


@pytest.mark.parametrize("case", ["file", "foreign_adapter_dir", "foreign_merged_dir"])
def test_export_dir_problems_fail_at_setup_before_any_step(tmp_path, case):
    export = tmp_path / "out"
    if case == "file":
        export.write_text("not a directory")
        expected = "exists and is not a directory"
    else:
        sub = export / ("adapter" if case == "foreign_adapter_dir" else "merged")
        sub.mkdir(parents=True)
        (sub / "notes.txt").write_text("the user's own file")
        expected = "is not empty and holds no"
    module = CausalLM()
    lora = LoRACallback(r=2, target_modules=["q_proj"], module="model", export_dir=export)
    with pytest.raises(ValueError, match=expected):
        _trainer(tmp_path, [lora], max_steps=2).fit(module, token_data())
    assert module.losses == []  # no compute spent
    if case != "file":
        assert (sub / "notes.txt").read_text() == "the user's own file"
