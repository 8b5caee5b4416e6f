"""The callback on a Mixture-of-Experts model: experts adapted, adapter-only checkpoints, exact resume, merge."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lora_lightning import LoRACallback
from lora_lightning.inject import lora_banks
from tests.lightning.test_callback import _trainer
from tests.lightning_modules import CausalLM, token_data
from tests.moe_models import tiny_qwen3_moe


class MoECausalLM(CausalLM):
    """The same user module over a tiny Qwen3-MoE."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.model = tiny_qwen3_moe(seed=seed).train()


def _fit(tmp_path: Path, epochs: int, resume: str | None = None) -> tuple[MoECausalLM, ModelCheckpoint, LoRACallback]:
    module = MoECausalLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    callback = LoRACallback(r=4, alpha=8, module="model", merge_on_fit_end=False)
    trainer = _trainer(tmp_path, [callback, checkpoint], max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(module, token_data(n=16), ckpt_path=resume)
    return module, checkpoint, callback


def _bank_state(module: MoECausalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items() if "lora_" in k}


def test_the_experts_train_checkpoint_adapter_only_and_resume_bit_for_bit(tmp_path: Path) -> None:
    full, _, callback = _fit(tmp_path / "full", epochs=2)
    assert lora_banks(full.model) and any(m.kind == "Experts" for m in callback.report.modules)
    trained = _bank_state(full)
    assert any("experts.lora_B.gate_up_proj" in k and v.abs().sum() > 0 for k, v in trained.items())

    _, checkpoint, _ = _fit(tmp_path / "first", epochs=1)
    first = sorted(Path(checkpoint.dirpath).glob("*.ckpt"))[0]
    content = torch.load(first, weights_only=True)
    keys = set(content["state_dict"])
    assert keys and all(".lora_A" in k or ".lora_B" in k for k in keys)
    assert "model.model.layers.0.mlp.experts.lora_B.down_proj" in keys

    resumed, _, _ = _fit(tmp_path / "first", epochs=2, resume=str(first))
    after = _bank_state(resumed)
    assert after.keys() == trained.keys()
    assert all(torch.equal(after[k], trained[k]) for k in trained), "resume is bit-exact"
    assert resumed.losses == full.losses[len(full.losses) - len(resumed.losses) :]


def test_fit_end_merges_the_banks_back_into_the_models_experts(tmp_path: Path) -> None:
    module = MoECausalLM()
    ids = token_data(n=8).dataset.tensors[0][:2]
    trainer = _trainer(tmp_path, [LoRACallback(r=4, alpha=8, module="model")], max_epochs=1)
    trainer.fit(module, token_data(n=16))
    assert not lora_banks(module.model)
    assert type(module.model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    with torch.no_grad():
        moved = module.model(input_ids=ids).logits
        untrained = tiny_qwen3_moe()(input_ids=ids).logits
    assert not torch.allclose(moved, untrained), "the merged experts carry what training changed"


def _fit_4bit(tmp_path: Path, epochs: int, resume: str | None = None, **options) -> tuple[MoECausalLM, LoRACallback]:
    module = MoECausalLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    callback = LoRACallback(r=4, alpha=8, module="model", quantize="nf4", **options)
    trainer = _trainer(tmp_path, [callback, checkpoint], max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(module, token_data(n=16), ckpt_path=resume)
    return module, callback


def test_quantize_makes_the_banks_4bit_trains_resumes_exactly_and_exports_unquantized(tmp_path: Path) -> None:
    """QLoRA on the MoE: the banks are 4-bit under the adapters, resume is bit-exact, and the fit-end
    export (each bank dequantized with its update) loads in plain transformers with the trained logits."""
    from transformers import AutoModelForCausalLM

    from lora_lightning.nn.experts4bit import Experts4bit

    full, callback = _fit_4bit(tmp_path / "full", epochs=2, merge_on_fit_end=False, export_dir=tmp_path / "export")
    banks = lora_banks(full.model)
    assert banks and all(isinstance(b.base_layer, Experts4bit) for n, b in banks.items() if n.endswith("experts"))
    trained = _bank_state(full)
    ids = token_data(n=8).dataset.tensors[0][:2]
    with torch.no_grad():
        expected = full.model(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(callback.export_paths["merged"]).eval()
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

    _fit_4bit(tmp_path / "first", epochs=1, merge_on_fit_end=False)
    first = sorted((tmp_path / "first" / "ckpt").glob("*.ckpt"))[0]
    resumed, _ = _fit_4bit(tmp_path / "first", epochs=2, resume=str(first), merge_on_fit_end=False)
    after = _bank_state(resumed)
    assert all(torch.equal(after[k], trained[k]) for k in trained), "resume is bit-exact"


def test_a_second_fit_over_merged_4bit_banks_starts_from_the_first_fits_model(tmp_path: Path) -> None:
    """After a fit-end merge, the next fit re-adapts: the 4-bit banks come back as they were (not the
    merged weights quantized again with the update in them), so the model it starts from computes
    what the merged model did."""
    import lightning.pytorch as pl

    ids = token_data(n=8).dataset.tensors[0][:2]
    seen = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            with torch.no_grad():
                seen.append(pl_module.model(input_ids=ids).logits)

    module = MoECausalLM()
    callback = LoRACallback(r=4, alpha=8, module="model", quantize="nf4")
    _trainer(tmp_path / "one", [callback], max_epochs=1).fit(module, token_data(n=16))
    with torch.no_grad():
        merged = module.model(input_ids=ids).logits
    _trainer(tmp_path / "two", [callback, Probe()], max_epochs=1).fit(module, token_data(n=16))
    restarted = seen[-1]
    assert (restarted - merged).abs().max() <= 1e-4 * merged.abs().max()
