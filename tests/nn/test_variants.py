"""DoRA and PiSSA / OLoRA: against the formulas in float64, against PEFT on the same weights, and
through the PEFT file format both ways."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import safetensors
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from lora_lightning import LoRACallback, LoRAConfig, inject_lora, merge_and_unload, unmerge_lora
from lora_lightning.inject import lora_layers
from lora_lightning.io.adapters import export_merged, load_adapter, save_adapter
from lora_lightning.merge import merge_lora
from lora_lightning.nn.dora import DORA, _ScaleOutputs, weight_norm
from lora_lightning.nn.layers import LoRAEmbedding, LoRALinear
from lora_lightning.ops.lora_linear import lora_linear
from tests.models import output_of, tiny_gpt2, tiny_llama, token_ids
from tests.peft_reference import copy_factors, peft_config_for


def _f64(*shape, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def _perturb(model: nn.Module, seed: int = 5) -> None:
    """Move every adapter tensor away from its init, so nothing passes by being zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B.dtype) * 0.05)
            if hasattr(layer, "lora_magnitude_vector"):
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g).to(m.dtype))


# -- DoRA ---------------------------------------------------------------------------------------------


def test_dora_scaling_backward_gradcheck_float64():
    """The DoRA output ``(m / n) * (x W^T + s (x A^T) B^T) + b`` with the norm a constant (as PEFT
    and the paper treat it): our backward against numerical gradients, in float64."""
    x, W, b = _f64(3, 5, seed=1), _f64(4, 5, seed=2, requires_grad=False), _f64(4, seed=3)
    A, B, m = _f64(2, 5, seed=4), _f64(4, 2, seed=5), _f64(4, seed=6)
    norm = (W + 0.7 * B.detach() @ A.detach()).norm(dim=1)  # a constant

    def dora(x, A, B, m, b):
        return _ScaleOutputs.apply(lora_linear(x, W, None, A, B, 0.7), m / norm, b)

    assert torch.autograd.gradcheck(dora, (x, A, B, m, b))
    assert torch.autograd.gradcheck(lambda x, A, B, m: dora(x, A, B, m, None), (x, A, B, m))


def test_the_row_norms_equal_the_norms_of_the_formed_weight():
    torch.manual_seed(0)
    for base in (nn.Linear(48, 40).double(), nn.Embedding(30, 12).double()):
        cls = LoRAEmbedding if isinstance(base, nn.Embedding) else LoRALinear
        layer = cls(base, 6, 9.0, variant=DORA)
        with torch.no_grad():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
        formed = layer.base_weight() + layer.scale * layer.lora_B @ layer.lora_A  # (out, in), what PEFT forms
        torch.testing.assert_close(weight_norm(layer).double(), formed.norm(dim=1), rtol=1e-6, atol=0)


def _dora_reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula in float64, the norm detached."""
    W = layer.base_weight().double()
    A, B, m = layer.lora_A.double(), layer.lora_B.double(), layer.lora_magnitude_vector.double()
    norm = (W + layer.scale * B @ A).norm(dim=1).detach()
    bias = layer.bias.double() if layer.bias is not None else 0.0
    return (m / norm) * (x.double() @ W.t() + layer.scale * (x.double() @ A.t()) @ B.t()) + bias


def test_dora_layer_outputs_and_gradients_equal_float64():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 16), 4, 8.0, variant=DORA)
    _perturb(nn.Sequential(layer))
    x = torch.randn(3, 5, 24)
    out = layer(x)
    want = _dora_reference(layer, x)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = {name: getattr(layer, name).detach().double().requires_grad_() for name in ("lora_A", "lora_B")}
    m = layer.lora_magnitude_vector.detach().double().requires_grad_()
    W = layer.base_weight().double()
    norm = (W + layer.scale * ref["lora_B"].detach() @ ref["lora_A"].detach()).norm(dim=1)
    h = x.double() @ W.t() + layer.scale * (x.double() @ ref["lora_A"].t()) @ ref["lora_B"].t()
    ((m / norm) * h + layer.bias.double()).square().sum().backward()
    for got, want_grad in zip(grads, [ref["lora_A"].grad, ref["lora_B"].grad, m.grad], strict=True):
        torch.testing.assert_close(got.double(), want_grad, rtol=1e-4, atol=1e-6)


def _peft_dora_twin(base: nn.Module, config: LoRAConfig, ours: nn.Module) -> nn.Module:
    peft_model = get_peft_model(copy.deepcopy(base), peft_config_for(config, ours))
    theirs = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    copy_factors(lora_layers(ours), theirs)
    return peft_model


@pytest.mark.parametrize(
    ("build", "targets"),
    [(tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"]), (tiny_gpt2, ["c_attn", "c_fc"])],
    ids=["llama-with-embedding", "gpt2-conv1d"],
)
def test_dora_outputs_and_gradients_equal_peft(build, targets):
    config = LoRAConfig(r=4, alpha=8, target_modules=targets, use_dora=True)
    base = build()
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    _perturb(ours)
    theirs = _peft_dora_twin(base, config, ours)
    ids = token_ids()
    out, out_peft = output_of(ours, ids), output_of(theirs, ids)
    torch.testing.assert_close(out, out_peft, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    out_peft.square().mean().backward()
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    for name, layer in lora_layers(ours).items():
        twin = peft_layers[name]
        magnitude = twin.lora_magnitude_vector["default"].weight.grad
        torch.testing.assert_close(layer.lora_magnitude_vector.grad, magnitude, rtol=1e-4, atol=1e-7)
        peft_B = twin.lora_B["default"].weight if "default" in twin.lora_B else twin.lora_embedding_B["default"]
        torch.testing.assert_close(layer.lora_B.grad, peft_B.grad, rtol=1e-4, atol=1e-7)


def test_dora_merge_and_unmerge_are_exact_and_load_strict_into_a_plain_model():
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)
    model = tiny_llama()
    inject_lora(model, config)
    _perturb(model)
    ids = token_ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
        merge_lora(model)
        merge_lora(model)  # twice changes nothing
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        for name, layer in lora_layers(model).items():
            torch.testing.assert_close(layer.base_layer.weight, weights[name], rtol=1e-5, atol=1e-6)
        merge_and_unload(model)
        plain = tiny_llama(seed=9)
        plain.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_dora_with_freeze_A_trains_B_and_the_magnitude():
    model = tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], use_dora=True, freeze_A=True))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_B", "lora_magnitude_vector"}


# -- PiSSA and OLoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_principal_inits_start_at_the_original_model_and_take_the_top_of_the_weight(init):
    base = tiny_llama()
    targets = ["q_proj", "o_proj", "down_proj"]
    with torch.no_grad():  # a decaying spectrum, so the top-r part is well defined (random init has none)
        for name, module in base.named_modules():
            if name.endswith(tuple(targets)):
                U, _, Vh = torch.linalg.svd(module.weight, full_matrices=False)
                S = 2.0 ** -torch.arange(U.shape[1], dtype=torch.float32)
                module.weight.copy_(U @ torch.diag(S) @ Vh)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets, init_lora_weights=init))
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    eye = torch.eye(4, dtype=torch.float64)
    for name, layer in lora_layers(model).items():
        original = base.get_submodule(name).weight.double()
        start = layer.scale * layer.lora_B.double() @ layer.lora_A.double()
        torch.testing.assert_close(layer.base_layer.weight.double() + start, original, rtol=0, atol=1e-6)
        if init == "olora":  # B = the first r columns of Q: orthonormal, and B A = Q_r R_r
            torch.testing.assert_close(layer.lora_B.double().t() @ layer.lora_B.double(), eye, atol=1e-5, rtol=0)
        else:  # s B A = the top-r singular part of W (randomised SVD: close to it)
            U, S, Vh = torch.linalg.svd(original)
            top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
            tolerance = 1e-6 if init == "pissa" else 1e-3
            assert (start - top).norm() <= tolerance * top.norm(), (name, float((start - top).norm()))


def _trained_pissa(init: str = "pissa"):
    base = tiny_llama()
    model = copy.deepcopy(base)
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=init)
    inject_lora(model, config)
    _perturb(model)  # as if trained
    return base, model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_adapter_is_written_for_the_original_base_and_loads_in_peft_and_here(init, tmp_path):
    base, model = _trained_pissa(init)
    ids = token_ids()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    directory = save_adapter(model, tmp_path / "adapter")
    data = json.loads((directory / "adapter_config.json").read_text())
    assert (data["r"], data["lora_alpha"], data["init_lora_weights"]) == (8, 16, True)
    peft_fields = {field.name for field in dataclasses.fields(LoraConfig)}
    assert set(data) <= peft_fields, sorted(set(data) - peft_fields)  # PEFT's own fields, nothing of ours
    with safetensors.safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as file:
        assert file.metadata()["lora_lightning.trained_from_init"] == init  # our record, where PEFT does not read
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Unexpected keyword arguments ... upgrade the PEFT version"
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directory)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    ours = copy.deepcopy(base)
    load_adapter(ours, directory)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    merged_dir = export_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_a_peft_pissa_adapter_loads_by_running_the_init_on_the_base(tmp_path):
    """PEFT's unconverted PiSSA adapter expects the loader to make the base the residual again."""
    base = tiny_llama()
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
        want = peft_model(input_ids=token_ids()).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=token_ids()).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_reads_our_dora_adapter_and_we_read_peft_s(tmp_path):
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)
    base = tiny_llama()
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    _perturb(ours)
    ids = token_ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert data["use_dora"] is True
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    peft_model.save_pretrained(tmp_path / "peft")  # PEFT's own file of the same adapter
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_variant_inputs_fail_before_the_model_changes():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cases = [
        (dict(init_lora_weights="pisa"), "init_lora_weights must be one of 'kaiming', 'gaussian', 'pissa'"),
        (
            dict(target_modules=["embed_tokens"], init_lora_weights="pissa"),
            "cannot start module 'model.embed_tokens': it is an embedding",
        ),
        (dict(use_dora=True, dropout=0.1), "use_dora=True with dropout=0.1 is not supported"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            inject_lora(model, LoRAConfig(**{"target_modules": ["q_proj"], **fields}))
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(
        ValueError, match="cannot start module 'model.layers.0.self_attn.q_proj': it has its weight on the meta"
    ):
        inject_lora(meta, LoRAConfig(target_modules=["q_proj"], init_lora_weights="olora"))
    assert not lora_layers(model) and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("fields", [{"use_dora": True}, {"init_lora_weights": "pissa_niter_2"}], ids=["dora", "pissa"])
def test_the_callback_trains_resumes_and_merges_variants(tmp_path, fields):
    """Adapter-only checkpoints resume: DoRA's magnitude is part of the adapter; PiSSA's residual
    base is rebuilt from the original base (and the seed) and its fingerprint matches."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.lightning_modules import CausalLM, token_data

    def run(steps: int, ckpt: str | None = None) -> tuple[CausalLM, ModelCheckpoint]:
        pl.seed_everything(0)
        module = CausalLM()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / f"ckpt-{steps}-{ckpt is not None}", save_last=True)
        lora = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], module="model", **fields)
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[lora, checkpoint], default_root_dir=str(tmp_path),
        )  # fmt: skip
        trainer.fit(module, token_data(n=16), ckpt_path=ckpt)
        return module, checkpoint

    full, _ = run(4)
    _, checkpoint = run(2)
    resumed, _ = run(4, checkpoint.last_model_path)
    # The first step after the resume sees exactly the adapted model the uninterrupted run had
    # there: the base (PiSSA's residual, rebuilt) and every adapter tensor (DoRA's magnitude too).
    assert resumed.losses[0] == full.losses[2]
    if "use_dora" in fields:
        state = torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"]
        assert sum(k.endswith("lora_magnitude_vector") for k in state) == 4
