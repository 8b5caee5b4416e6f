"""QLoRA: adapters over bitsandbytes 4-/8-bit bases, on the CPU (bitsandbytes 0.50 trains there).

References: HF PEFT over the same quantized base with the same factors (outputs, gradients,
counts, files both ways); a float64 computation from the dequantized weights; and the exported
merged model loaded by plain transformers in a process where bitsandbytes cannot be imported.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lora_lightning import LoRACallback, LoRAConfig, inject_lora, parameter_summary
from lora_lightning.compat.private_names import private
from lora_lightning.inject import lora_layers
from lora_lightning.io.adapters import export_merged, load_adapter, save_adapter
from lora_lightning.kinds import bnb as quantized
from lora_lightning.kinds.bnb import Linear4bitKind, dequantize_into
from lora_lightning.merge import MergeFidelity, merge_and_unload, merge_lora, unmerge_lora
from lora_lightning.ops import lora_linear as kernels
from lora_lightning.quantize import quantize_model
from tests.lightning_modules import CausalLM, token_data
from tests.models import tiny_gpt2, tiny_llama, token_ids
from tests.peft_reference import copy_factors, peft_config_for, peft_twin

bnb = pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[2]
METHODS = ["nf4", "nf4-dq", "fp4", "int8"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(directory)
    return directory


def load_quantized(
    directory: Path, method: str, compute: torch.dtype = torch.float32, cpu_inference_path: bool = False
) -> nn.Module:
    """The way a user loads a quantized base: from_pretrained with a BitsAndBytesConfig.

    On a CPU with AVX512-BF16, bitsandbytes sends a Linear4bit that scores in eval mode without
    grad down its own inference path (the weight repacked in place, the scales rounded to bf16):
    a reference on that path computes something else than ours. Unless ``cpu_inference_path``,
    every 4-bit layer is kept on the path every CPU takes, the one an adapted layer keeps.
    """
    if method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if method == "fp4" else "nf4",
            bnb_4bit_use_double_quant=method == "nf4-dq",
            bnb_4bit_compute_dtype=compute,
        )
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu")
    if not cpu_inference_path:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def _randomise(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", METHODS)
def test_outputs_gradients_and_counts_equal_peft_on_the_same_quantized_base(dense_dir, method):
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    ours = load_quantized(dense_dir, method)
    report = inject_lora(ours, config)
    assert {m.kind for m in report.modules} == {"Linear8bitLt" if method == "int8" else "Linear4bit"}
    _randomise(ours)
    theirs = peft_twin(load_quantized(dense_dir, method), config, ours)
    assert (report.params.trainable, report.params.total) == theirs.get_nb_trainable_parameters()
    ids = token_ids()
    logits, logits_peft = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert _rel(logits, logits_peft) <= 1e-5
    logits.square().mean().backward()
    logits_peft.square().mean().backward()
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    for name, layer in lora_layers(ours).items():
        twin = peft_layers[name]
        assert _rel(layer.lora_A.grad, twin.lora_A["default"].weight.grad) <= 1e-4, name
        assert _rel(layer.lora_B.grad, twin.lora_B["default"].weight.grad) <= 1e-4, name


def test_a_4bit_layer_keeps_no_dense_weight_for_backward_and_matches_float64():
    """The fused path dequantizes in forward and again in backward: what autograd keeps for the
    layer is the input and x A^T, never an (out, in) weight."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96))
    quantize_model(net, "nf4")
    inject_lora(net, LoRAConfig(r=4, target_modules=["0"]))
    layer = net[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 64, requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    assert (96, 64) not in saved and (64, 96) not in saved, saved
    out.square().sum().backward()
    W = layer.base_weight().double()  # the dequantized weight, in float64
    xd, A, B = x.detach().double().requires_grad_(), layer.lora_A.double(), layer.lora_B.double()
    want = xd @ W.t() + layer.bias.double() + layer.scale * (xd @ A.t()) @ B.t()
    want.square().sum().backward()
    assert _rel(out.detach(), want.detach()) <= 1e-6
    assert _rel(x.grad, xd.grad) <= 1e-5
    assert layer.base_layer.support_avx512bf16_for_cpu is False  # one weight layout, eval or not


def formula_float64(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, shape, blocksize: int) -> torch.Tensor:
    """4-bit dequantization from its definition, in float64: code[q] * absmax of q's block."""
    codes = bnb.functional.get_4bit_type(quant_type, device="cpu").double()
    data = packed.view(torch.uint8).reshape(-1).long()
    q = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)  # the high half holds the first element
    n = shape[0] * shape[1]
    return (codes[q[:n]] * absmax.double().repeat_interleave(blocksize)[:n]).reshape(shape)


def scales_of(state) -> torch.Tensor:
    """A 4-bit weight's block scales (dequantized first under double quantization)."""
    if state.nested:
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


@pytest.mark.parametrize("method", ["nf4", "nf4-dq", "fp4"])
@pytest.mark.parametrize("into", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("origin", [torch.float32, torch.bfloat16])
def test_dequantization_is_the_formula_bit_for_bit_whatever_the_cpu_kernel(monkeypatch, method, into, origin):
    """On the CPU a 4-bit weight is dequantized band by band into a reused buffer, and every
    element is code * scale in float32, rounded once to the quantized-from dtype: the float64
    formula's value on every CPU. 64 and 128 columns hold whole blocks (bitsandbytes' op does a
    band); 96 and 40 do not (a band of 2 and of 8 rows ends on a block: computed in torch, since
    bitsandbytes' AVX-512 CPU kernel misreads the scales there)."""
    monkeypatch.setattr(quantized, "DEQUANT_CHUNK", 300)  # many bands
    torch.manual_seed(0)
    widths = [(96, 50), (40, 30), (64, 24), (128, 40)]
    net = nn.Sequential(*(nn.Linear(i, o, dtype=origin) for i, o in widths))
    quantize_model(net, method)
    for layer in net:
        state = layer.weight.quant_state
        formula = formula_float64(layer.weight.data, scales_of(state), state.quant_type, state.shape, state.blocksize)
        want = formula.float().to(origin).to(into)  # a float32 product is exact: float64 rounds the same
        buffer = torch.full((layer.out_features, layer.in_features), float("nan"), dtype=into)
        assert torch.equal(dequantize_into(layer, buffer, origin), want), (layer.in_features, layer.out_features)
        assert torch.equal(Linear4bitKind().dense_weight(layer), formula.float().to(origin))


@pytest.mark.parametrize("method", ["nf4", "nf4-dq"])
def test_a_layer_bitsandbytes_repacked_for_cpu_inference_is_unpacked_when_adapted(dense_dir, method):
    """A transformers 4-bit model that scored a batch in eval mode on an AVX512-BF16 CPU holds
    layers bitsandbytes repacked in place (codes reordered, scales rounded to bf16, double
    quantization undone). The repacking is plain torch, so this test puts the layers in that state
    on any CPU where scoring did not; inject_lora must undo it and compute from the codes and the
    bf16 scales (the float64 formula), then keep the layer off that path in eval."""
    model = load_quantized(dense_dir, method, cpu_inference_path=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    codes = {n: m.weight.data.clone() for n, m in layers.items()}
    scales = {n: scales_of(m.weight.quant_state).float() for n, m in layers.items()}
    ids = token_ids()
    with torch.no_grad():
        model(input_ids=ids)  # repacks every layer on an AVX512-BF16 CPU, none elsewhere
    pack = private("pack_cpu_4bit")
    for layer in layers.values():
        if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = pack(layer.weight.data, layer.weight.quant_state)
        assert layer.weight.quant_state.packing_format_for_cpu
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        assert not base.weight.quant_state.packing_format_for_cpu and base.support_avx512bf16_for_cpu is False
        assert torch.equal(base.weight.data, codes[name])  # the codes are back in bitsandbytes' order
        state = base.weight.quant_state
        bf16_scales = scales[name].to(torch.bfloat16).double()
        torch.testing.assert_close(scales_of(state).double(), bf16_scales, rtol=0 if method == "nf4" else 0.02, atol=0)
        if method == "nf4":  # no re-quantized scales: exact
            want = formula_float64(codes[name], bf16_scales, state.quant_type, state.shape, state.blocksize)
            assert torch.equal(layer.base_weight(), want.float()), name
    with torch.no_grad():
        train = model(input_ids=ids).logits
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, train, rtol=0, atol=0)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
@pytest.mark.parametrize("tied", [False, True])
def test_adapting_a_4bit_model_closes_the_mapped_full_precision_checkpoint(tmp_path, tied):
    """from_pretrained leaves the unquantized tensors as views into the mapped bf16 file, which
    keeps every page read to quantize resident; adapting moves them out so the mapping closes."""
    tiny_llama(tie_word_embeddings=tied).to(torch.bfloat16).save_pretrained(tmp_path)
    checkpoint = str(tmp_path / "model.safetensors")

    def mapped() -> bool:
        return any(line.rstrip().endswith(checkpoint) for line in Path("/proc/self/maps").read_text().splitlines())

    model = load_quantized(tmp_path, "nf4")
    assert mapped()  # the premise: the embeddings, head and norms still point into the file
    plain = {name: t.clone() for name, t in model.state_dict().items() if t.is_floating_point()}
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    gc.collect()
    assert not mapped()
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is embeddings) == tied and (head.data_ptr() == embeddings.data_ptr()) == tied
    after = {name.replace(".base_layer", ""): t for name, t in model.state_dict().items()}
    assert plain and all(torch.equal(after[name], value) for name, value in plain.items())


def test_a_4bit_layer_trains_after_running_under_inference_mode(monkeypatch):
    """Lightning validates under torch.inference_mode(); the reused dequantization buffer, when made
    there, must still take the writes of the training steps after it."""
    monkeypatch.setattr(kernels._SCRATCH, "buffers", {})  # this thread's buffers start empty
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96))
    quantize_model(net, "nf4")
    inject_lora(net, LoRAConfig(r=4, target_modules=["0"]))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        validated = net(x)
    out = net(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), validated, rtol=0, atol=0)
    assert net[0].lora_B.grad is not None and net[0].lora_B.grad.abs().sum() > 0


def test_eval_without_grad_and_an_out_features_not_divisible_by_32():
    """bitsandbytes' CPU inference path repacks weights only for out_features % 32 == 0; an adapted
    layer never takes it, so eval/no-grad and training compute the same thing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    quantize_model(net, "nf4-dq")
    inject_lora(net, LoRAConfig(r=2, target_modules=["0", "2"]))
    _randomise(net)
    x = torch.randn(3, 40)
    train = net(x).detach()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), train)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_merge_dequantizes_exactly_and_unmerge_restores_the_quantized_layer(dense_dir, compute):
    model = load_quantized(dense_dir, "nf4", compute)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    _randomise(model)
    layers = lora_layers(model)
    originals = {name: layer.base_layer for name, layer in layers.items()}
    want = {name: layer.base_weight().double() + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
            for name, layer in layers.items()}  # fmt: skip
    fidelity = MergeFidelity()
    merge_lora(model, fidelity)
    for name, layer in layers.items():
        assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == compute
        merged = layer.base_layer.weight.double()
        tolerance = 1e-6 if compute == torch.float32 else 2**-8  # one rounding into the compute dtype
        assert ((merged - want[name]).abs() <= tolerance * want[name].abs() + 1e-7).all(), name
        # the reported figure is the update's own relative error, recomputed here in float64
        update = layer.scale * layer.lora_B.double() @ layer.lora_A.double()
        assert fidelity.per_layer[name] == pytest.approx(
            float((merged - originals_dense(originals[name]) - update).norm() / update.norm()), rel=1e-6
        )
    assert (fidelity.overall < 1e-6) if compute == torch.float32 else (1e-4 < fidelity.overall < 0.05)
    unmerge_lora(model)
    assert all(layer.base_layer is originals[name] for name, layer in layers.items())


def originals_dense(module: nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).double()


def test_merge_fidelity_on_a_bf16_base_is_the_rounding_of_the_update():
    """PEFT's bf16 merge of a 1024x1024, r=16 update loses 12.9% to rounding; we report our own."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 1024)).to(torch.bfloat16)
    inject_lora(net, LoRAConfig(r=16, alpha=16, target_modules=["0"]))
    with torch.no_grad():
        net[0].lora_B.normal_(std=0.01)
    before = net[0].base_layer.weight.double()
    update = net[0].scale * net[0].lora_B.double() @ net[0].lora_A.double()
    fidelity = MergeFidelity()
    merge_and_unload(net, fidelity)
    expected = float((net[0].weight.double() - before - update).norm() / update.norm())
    assert fidelity.summary()["overall_rel_error"] == pytest.approx(expected, rel=1e-9)
    assert 0.001 < expected < 0.129  # rounded once: less lost than PEFT's bf16 merge


def _blocked_bitsandbytes_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``from_pretrained(directory)`` in a process where bitsandbytes cannot be imported."""
    code = (
        "import sys, json, torch\n"
        "sys.modules['bitsandbytes'] = None  # any import of it fails\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(directory)!r})\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "print(json.dumps(model(input_ids=ids).logits.tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))


def _dequantized(module: nn.Module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a 4- or 8-bit layer's weight, (out, in) float32."""
    weight = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


@pytest.mark.parametrize("method", ["nf4-dq", "int8"])
def test_export_merged_writes_an_unquantized_model_plain_transformers_loads(dense_dir, tmp_path, method):
    model = load_quantized(dense_dir, method)
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    _randomise(model)
    ids = token_ids()
    # the reference: the dense model with each weight replaced by bitsandbytes' dequantization plus s B A
    reference = AutoModelForCausalLM.from_pretrained(dense_dir)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            update = layer.scale * layer.lora_B.double() @ layer.lora_A.double()
            reference.get_submodule(name).weight.copy_(_dequantized(layer.base_layer).double() + update)
        want = reference(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
    directory = export_merged(model, tmp_path / "merged", dtype="float32")
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert lora_layers(model)  # exporting does not merge the model itself
    got = _blocked_bitsandbytes_logits(directory, ids)
    assert _rel(got, want) <= 1e-5
    # 4-bit computes exactly the dequantized matmul; LLM.int8() also quantizes activations
    assert _rel(got, adapted) <= (1e-4 if method != "int8" else 0.02)


def test_export_restores_gpt2_conv1d_layout_and_shards(tmp_path, monkeypatch):
    directory = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(directory)
    model = load_quantized(directory, "nf4")
    inject_lora(model, LoRAConfig(r=4, target_modules=["c_attn", "c_proj"]))
    _randomise(model)
    ids = token_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    import lora_lightning.io.export as export_module

    monkeypatch.setattr(export_module, "SHARD_BYTES", 64 * 1024)  # several shards and an index
    out = export_merged(model, tmp_path / "merged")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert _rel(plain(input_ids=ids).logits, want) <= 1e-4


def test_peft_loads_our_qlora_adapter_and_we_load_peft_s(dense_dir, tmp_path):
    ids = token_ids()
    ours = load_quantized(dense_dir, "nf4-dq")
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    _randomise(ours)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(load_quantized(dense_dir, "nf4-dq"), tmp_path / "ours")
    with torch.no_grad():
        assert _rel(peft_model(input_ids=ids).logits, want) <= 1e-5

    theirs = get_peft_model(load_quantized(dense_dir, "nf4"), LoraConfig(r=4, target_modules=["k_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
        want = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    base = load_quantized(dense_dir, "nf4")
    load_adapter(base, tmp_path / "peft")
    with torch.no_grad():
        assert _rel(base(input_ids=ids).logits, want) <= 1e-5


def test_bad_inputs_fail_before_the_model_changes(dense_dir):
    quantized = load_quantized(dense_dir, "nf4")
    with pytest.raises(ValueError, match="quantize='nf4' given for a model that is already quantized"):
        quantize_model(quantized, "nf4")
    with pytest.raises(ValueError, match="modules_to_save includes 'model.layers.0.mlp.up_proj' .*Linear4bit"):
        inject_lora(quantized, LoRAConfig(target_modules=["q_proj"], modules_to_save=["layers.0.mlp.up_proj"]))
    assert not lora_layers(quantized)
    gpt2 = tiny_gpt2()
    before = {n: type(m) for n, m in gpt2.named_modules()}
    with pytest.raises(TypeError, match="cannot quantize transformers Conv1D layers .*transformer.h.0.attn.c_attn"):
        quantize_model(gpt2, "nf4")
    assert {n: type(m) for n, m in gpt2.named_modules()} == before
    with pytest.raises(ValueError, match="quantize must be None or one of 'nf4', 'nf4-dq', 'fp4', 'int8', got 'nf3'"):
        LoRACallback(r=2, quantize="nf3")


class _AdaptedAtTrainEnd(pl.Callback):
    """Logits of the adapted (quantized, unmerged) model just before the fit-end merge."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def on_train_end(self, trainer, pl_module):
        layers = lora_layers(pl_module.model).values()
        self.kinds = {type(layer.base_layer).__name__ for layer in layers}
        self.seams = {type(layer.kind).__name__ for layer in layers}
        self.bases = [layer.base_layer for layer in layers]
        with torch.no_grad():
            self.logits = pl_module.model(input_ids=self.ids).logits.detach().clone()


def test_quantize_any_lightning_module_train_resume_merge_and_export(tmp_path):
    """LoRACallback(quantize=...) on a module not loaded through transformers: the base is quantized
    at setup (head and embeddings stay full precision), the adapters train, the checkpoint resumes
    against a freshly quantized base, the fit end merges with its fidelity reported, and the
    export loads as a plain model."""
    ids = token_ids(batch=2, length=16)
    probe = _AdaptedAtTrainEnd(ids)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)

    def callback() -> LoRACallback:
        return LoRACallback(
            r=4, alpha=8, target_modules="all-linear", module="model", quantize="nf4-dq", export_dir=tmp_path / "out"
        )

    lora = callback()
    module = CausalLM(lr=1e-2)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[lora, probe, checkpoint], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, token_data(n=16))
    assert probe.kinds == {"Linear4bit"}
    assert type(module.model.lm_head) is nn.Linear and type(module.model.model.embed_tokens) is nn.Embedding
    assert module.losses[-1] < module.losses[0]
    summary = lora.merge_fidelity.summary()
    assert summary["layers"] == 14 and summary["overall_rel_error"] < 1e-5  # float32 compute: next to nothing lost
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    with torch.no_grad():
        assert _rel(merged(input_ids=ids).logits, probe.logits) <= 1e-4
    # resume: a fresh process would build the dense model and quantize it the same way
    resumed = CausalLM(lr=1e-2)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LoRACallback(r=4, alpha=8, target_modules="all-linear", module="model", quantize="nf4-dq")],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(resumed, token_data(n=16), ckpt_path=checkpoint.last_model_path)
    assert trainer.global_step == 6 and len(resumed.losses) == 2
    other = CausalLM(seed=5)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LoRACallback(r=4, alpha=8, target_modules="all-linear", module="model", quantize="nf4-dq")],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(ValueError, match="trained on a different base model"):
        trainer.fit(other, token_data(n=16), ckpt_path=checkpoint.last_model_path)


def test_the_fingerprint_of_a_quantized_base_survives_save_and_load(dense_dir, tmp_path):
    from lora_lightning.lightning.checkpoint_record import base_fingerprint, compare_fingerprints

    model = load_quantized(dense_dir, "nf4-dq")
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    a, b = base_fingerprint(model.named_parameters()), base_fingerprint(again.named_parameters())
    assert compare_fingerprints(a, b) == []
    other = load_quantized(dense_dir, "fp4")
    assert compare_fingerprints(a, base_fingerprint(other.named_parameters()))


@pytest.mark.skipif(os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.cuda
def test_lightning_bitsandbytes_precision_plugin_with_the_callback(tmp_path):
    """Lightning's BitsandbytesPrecision converts linear layers at strategy setup, after the
    callback injected: the adapters follow their base layer's new kind."""
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = CausalLM(lr=1e-2)
    lora = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], module="model")
    probe = _AdaptedAtTrainEnd(token_ids().cuda())
    trainer = pl.Trainer(
        max_steps=3, accelerator="cuda", devices=1, logger=False, enable_progress_bar=False,
        plugins=BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16), callbacks=[lora, probe],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, token_data(n=16))
    # The plugin swaps in its own Linear4bit subclasses (``_NF4DQLinear``): the 4-bit seam handles them.
    assert all(isinstance(base, bnb.nn.Linear4bit) for base in probe.bases), probe.kinds
    assert probe.seams == {"Linear4bitKind"}
    assert module.losses[-1] < module.losses[0]
    assert parameter_summary(module).trainable == 0  # merged and unloaded: nothing left to train


def test_dora_on_a_4bit_base_equals_peft(dense_dir):
    """DoRA's row norms dequantize the weight (transiently): outputs equal PEFT's DoRA on the same base."""
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    ours = load_quantized(dense_dir, "nf4-dq")
    inject_lora(ours, config)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.normal_(std=0.05)
            layer.lora_magnitude_vector.mul_(1.1)
    theirs = get_peft_model(load_quantized(dense_dir, "nf4-dq"), peft_config_for(config))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    copy_factors(lora_layers(ours), peft_layers)
    with torch.no_grad():
        ids = token_ids()
        assert _rel(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5
