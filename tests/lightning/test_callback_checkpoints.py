from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lora_lightning import LoRACallback, LoRAConfig, inject_lora
from lora_lightning.inject import lora_layers
from lora_lightning.lightning.fit_state import Phase
from tests.lightning.test_callback import _trainer
from tests.lightning_modules import CausalLM, token_data

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "v_proj"]


def _callback(**kwargs) -> LoRACallback:
    return LoRACallback(**{"r": 4, "alpha": 8, "target_modules": TARGETS, "module": "model", **kwargs})


def _fit_with_checkpoints(tmp_path: Path, epochs: int = 2, **checkpoint_kwargs) -> tuple[CausalLM, ModelCheckpoint]:
    module = CausalLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **checkpoint_kwargs)
    trainer = _trainer(tmp_path, [_callback(), checkpoint], max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(module, token_data(), token_data(n=16, seed=5))
    return module, checkpoint


def test_checkpoints_hold_only_what_trains_and_are_a_small_fraction(tmp_path):
    _, checkpoint = _fit_with_checkpoints(tmp_path, epochs=1)
    adapter_ckpt = Path(checkpoint.best_model_path)
    content = torch.load(adapter_ckpt, weights_only=True)
    keys = set(content["state_dict"])
    assert keys and all(k.endswith(("lora_A", "lora_B")) for k in keys) and len(keys) == 8
    assert content["optimizer_states"][0]["state"], "optimizer state for the adapters is there"
    assert content["lora_lightning"]["config"]["r"] == 4
    # the same run without LoRA writes the full model
    full = ModelCheckpoint(dirpath=tmp_path / "full")
    _trainer(tmp_path, [full], max_epochs=1, enable_checkpointing=True).fit(CausalLM(), token_data())
    ratio = adapter_ckpt.stat().st_size / Path(full.best_model_path).stat().st_size
    print(f"\nadapter-only checkpoint is {ratio:.3%} of the full checkpoint")
    assert ratio < 0.1


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.lightning_modules", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result


@pytest.mark.slow
def test_killed_run_resumes_exactly_like_an_uninterrupted_one(tmp_path):
    full = _run_script("fit", str(tmp_path / "full"), "--epochs", "4")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = _run_script("fit", str(tmp_path / "crash"), "--epochs", "4", "--kill-after-epoch", "1")
    assert crashed.returncode == -9, (crashed.returncode, crashed.stderr[-2000:])  # SIGKILL: no cleanup ran
    crash_ckpt = tmp_path / "crash" / "crash.ckpt"
    assert set(torch.load(crash_ckpt, weights_only=True)["state_dict"]) == {
        f"model.model.layers.{i}.self_attn.{proj}.lora_{f}" for i in (0, 1) for proj in TARGETS for f in "AB"
    }
    resumed = _run_script("fit", str(tmp_path / "crash"), "--epochs", "4", "--resume", str(crash_ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = json.loads((tmp_path / "full" / "losses_rank0.json").read_text())
    after_resume = json.loads((tmp_path / "crash" / "losses_rank0.json").read_text())
    steps_done = 2 * 4  # two epochs of four batches before the kill
    assert after_resume["global_step"] == uninterrupted["global_step"] == 16
    assert after_resume["losses"] == uninterrupted["losses"][steps_done:]  # step for step, bit for bit


@pytest.mark.parametrize(
    ("make_callback", "make_module", "message"),
    [
        (lambda: _callback(r=8), CausalLM, "r=4 in the checkpoint, 8 here"),
        (
            lambda: _callback(target_modules=["q_proj"]),
            CausalLM,
            r"target_modules=\['q_proj', 'v_proj'\] in the checkpoint",
        ),
        (
            _callback,
            lambda: CausalLM(seed=7),
            "trained on a different base model: base weight 'lm_head.weight' holds different values",
        ),
    ],
    ids=["rank", "targets", "base"],
)
def test_mismatched_checkpoint_is_refused_with_the_reason(tmp_path, make_callback, make_module, message):
    _, checkpoint = _fit_with_checkpoints(tmp_path, epochs=1)
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, [make_callback()], max_epochs=2)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, token_data(), ckpt_path=checkpoint.best_model_path)
    # nothing was loaded into the model's base
    for key, value in module.model.state_dict().items():
        if "lora_" not in key:
            original = before["model." + key.replace("base_layer.", "")]
            assert torch.equal(value, original), key


def test_a_checkpoint_with_non_finite_adapter_tensors_is_refused_naming_them(tmp_path):
    _, checkpoint = _fit_with_checkpoints(tmp_path, epochs=1)
    content = torch.load(checkpoint.best_model_path, weights_only=True)
    key = "model.model.layers.1.self_attn.v_proj.lora_B"
    content["state_dict"][key][3, 1] = float("nan")  # a diverged step saved as is
    damaged = tmp_path / "damaged.ckpt"
    torch.save(content, damaged)
    module = CausalLM()
    with pytest.raises(ValueError, match=rf"adapter tensor\(s\) \['{key}'\] hold NaN or inf"):
        _trainer(tmp_path, [_callback()], max_epochs=2).fit(module, token_data(), ckpt_path=damaged)
    assert module.losses == []


def test_lora_fa_checkpoints_keep_the_frozen_A(tmp_path):
    """Under LoRA-FA A does not train, but it is half of the adapter: a resume needs it."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    callback = _callback(freeze_A=True)
    trainer = _trainer(tmp_path, [callback, checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer.fit(CausalLM(), token_data())
    keys = set(torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"])
    assert sum(k.endswith("lora_A") for k in keys) == sum(k.endswith("lora_B") for k in keys) == 4
    module = CausalLM(seed=0)
    torch.manual_seed(123)  # a different random A at injection: the checkpoint's A must replace it
    resumed = _trainer(tmp_path, [_callback(freeze_A=True)], max_epochs=1)
    resumed.validate(module, token_data(n=16, seed=5), ckpt_path=checkpoint.best_model_path)
    state = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    for name, layer in lora_layers(module.model).items():
        assert torch.equal(layer.lora_A, state[f"model.{name}.lora_A"]), name


def test_checkpoint_without_lora_record_is_refused(tmp_path):
    plain = ModelCheckpoint(dirpath=tmp_path / "plain")
    _trainer(tmp_path, [plain], max_epochs=1, enable_checkpointing=True).fit(CausalLM(), token_data())
    with pytest.raises(ValueError, match="not written with LoRACallback"):
        _trainer(tmp_path, [_callback()], max_epochs=2).fit(CausalLM(), token_data(), ckpt_path=plain.best_model_path)


def _adapted_val_loss(ckpt_path: str) -> float:
    """Independent reference: fresh base + inject + the checkpoint's adapter tensors, loaded by hand."""
    module = CausalLM()
    inject_lora(module.model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    module.eval()
    with torch.no_grad():
        losses = [module.model(input_ids=ids, labels=ids).loss for (ids,) in token_data(n=16, seed=5)]
    return float(torch.stack(losses).mean())


def test_save_weights_only_writes_adapter_only_files_that_load(tmp_path):
    _module, _checkpoint = _fit_with_checkpoints(tmp_path, epochs=2, save_weights_only=True)
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == 2
    first = torch.load(files[0], weights_only=True)
    assert "optimizer_states" not in first and "callbacks" not in first  # Lightning's weights-only path
    assert all(k.endswith(("lora_A", "lora_B")) for k in first["state_dict"]) and "lora_lightning" in first
    trainer = _trainer(tmp_path, [_callback()])
    (result,) = trainer.validate(CausalLM(), token_data(n=16, seed=5), ckpt_path=str(files[0]))
    assert result["val/loss"] == pytest.approx(_adapted_val_loss(str(files[0])), rel=1e-6)


def test_validate_and_test_after_merge_load_checkpoint_adapters_correctly(tmp_path):
    module = CausalLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=-1)
    callback = _callback()
    trainer = _trainer(tmp_path, [callback, checkpoint], max_epochs=3, enable_checkpointing=True)
    val = token_data(n=16, seed=5)
    assert callback.state.phase is Phase.FRESH
    trainer.fit(module, token_data(), val)
    assert not lora_layers(module) and callback.state.phase is Phase.MERGED  # merged at fit end
    epoch0 = str(sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0])

    phases = []
    probe = pl.Callback()
    probe.on_validation_start = lambda trainer, module: phases.append(callback.state.phase)
    trainer.callbacks.append(probe)
    (result,) = trainer.validate(module, val, ckpt_path=epoch0)
    assert result["val/loss"] == pytest.approx(_adapted_val_loss(epoch0), rel=1e-5)
    assert phases == [Phase.READAPTED]  # re-adapted to load the checkpoint's adapters
    assert not lora_layers(module) and callback.state.phase is Phase.MERGED  # and merged again afterwards

    (result,) = trainer.test(module, val, ckpt_path="best")
    assert result["val/loss"] == pytest.approx(_adapted_val_loss(checkpoint.best_model_path), rel=1e-5)

    # without a checkpoint, the merged model is evaluated as it is (the best adapters, merged)
    (result,) = trainer.validate(module, val)
    assert result["val/loss"] == pytest.approx(_adapted_val_loss(checkpoint.best_model_path), rel=1e-5)
