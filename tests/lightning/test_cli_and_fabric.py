"""LoRACallback from LightningCLI configs (nested, flat, command line, --print_config round trip),
and the Fabric example: the shipped examples, run for real and shrunk."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_lightning import LoRACallback, LoRAConfig, load_adapter
from tests.app_support import REPO, app_env

pytestmark = pytest.mark.slow
CLI = REPO / "examples" / "lora_with_lightning_cli.py"
SHRUNK = [
    "--trainer.max_steps=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.block_size=32",
]


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLI), "fit", *args],
        cwd=tmp_path,
        env=app_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _flat(tmp_path: Path, **init_args) -> Path:
    config = {
        "trainer": {
            "logger": False,
            "enable_checkpointing": False,
            "callbacks": [{"class_path": "lora_lightning.LoRACallback", "init_args": init_args}],
        }
    }
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _callback_args(printed: str) -> dict:
    (callback,) = yaml.safe_load(printed)["trainer"]["callbacks"]
    assert callback["class_path"] == "lora_lightning.LoRACallback"
    return callback["init_args"]


def test_the_callback_signature_names_every_lora_config_field():
    """jsonargparse reads explicit parameters; a LoRAConfig field missing here would be unreachable."""
    parameters = inspect.signature(LoRACallback).parameters
    for field in dataclasses.fields(LoRAConfig):
        assert field.name in parameters and parameters[field.name].default is None, field.name
    assert LoRACallback(r=4, target_modules=["q"]).config == LoRAConfig(r=4, target_modules=["q"])
    with pytest.raises(TypeError, match=r"give either config or LoRAConfig fields, not both .*\['r'\]"):
        LoRACallback(LoRAConfig(), r=4)


def test_nested_yaml_trains_and_exports(tmp_path):
    out = tmp_path / "out"
    args = ["--config", str(REPO / "examples" / "lora_with_lightning_cli.yaml"), *SHRUNK]
    proc = _cli(tmp_path, *args, f"--trainer.callbacks.init_args.export_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.manual_seed(0)  # the example's model: seed 0, then the same config
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    load_adapter(base, out / "adapter")
    ids = torch.tensor([list(b"import json\n")])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_flat_yaml_and_command_line_forms_train(tmp_path):
    flat = _flat(tmp_path, r=4, alpha=8, target_modules=["q_proj", "v_proj"], module="model")
    proc = _cli(tmp_path, "--config", str(flat), *SHRUNK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA: merged the adapters" in proc.stdout + proc.stderr
    command_line = [
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks+=lora_lightning.LoRACallback",
        "--trainer.callbacks.r=8",
        "--trainer.callbacks.target_modules=[q_proj,v_proj]",
        "--trainer.callbacks.module=model",
    ]
    proc = _cli(tmp_path, *command_line, *SHRUNK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA: merged the adapters" in proc.stdout + proc.stderr
    # with checkpointing on, the saved config and the checkpoint land in the example's own folder
    on = [arg for arg in command_line if "enable_checkpointing" not in arg]
    before = {p.name for p in tmp_path.iterdir()}
    proc = _cli(tmp_path, *on, *SHRUNK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} - before <= {"lora-cli-out"}  # no config.yaml, no checkpoints/
    run = tmp_path / "lora-cli-out" / "run"
    assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("form", ["nested", "flat"])
def test_print_config_fed_back_gives_the_same_callback(tmp_path, form):
    if form == "nested":
        source = ["--config", str(REPO / "examples" / "lora_with_lightning_cli.yaml")]
    else:
        source = ["--config", str(_flat(tmp_path, r=4, alpha=8, target_modules=["q_proj"], module="model"))]
    first = _cli(tmp_path, *source, "--print_config")
    assert first.returncode == 0, first.stderr[-3000:]
    printed = tmp_path / "printed.yaml"
    printed.write_text(first.stdout)
    second = _cli(tmp_path, "--config", str(printed), "--print_config")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout == first.stdout
    init_args = _callback_args(first.stdout)
    config = init_args.pop("config")
    fields = {k: v for k, v in init_args.items() if k in {f.name for f in dataclasses.fields(LoRAConfig)}}
    rest = {k: v for k, v in init_args.items() if k not in fields}
    callback = LoRACallback(LoRAConfig(**config), **rest) if config else LoRACallback(**fields, **rest)
    want = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]) if form == "nested" else None
    want = want or LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
    assert callback.config == want and callback.module == "model"
    proc = _cli(tmp_path, "--config", str(printed), *SHRUNK, "--trainer.callbacks.init_args.export_dir=null")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("form", ["nested", "flat"])
def test_a_wrong_value_gets_the_one_line_message_naming_it(tmp_path, form):
    if form == "nested":
        example = str(REPO / "examples" / "lora_with_lightning_cli.yaml")
        args = ["--config", example, "--trainer.callbacks.init_args.config.r=0"]
    else:
        args = ["--config", str(_flat(tmp_path, r=0, target_modules=["q_proj"], module="model"))]
    proc = _cli(tmp_path, *args)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "lora_with_lightning_cli.py: error: r must be a positive integer, got 0", proc.stderr[-2000:]


def test_a_wrong_key_is_named(tmp_path):
    proc = _cli(tmp_path, "--config", str(_flat(tmp_path, rr=4, module="model")))
    assert proc.returncode != 0
    assert "'rr'" in proc.stderr and "not accepted" in proc.stderr, proc.stderr[-2000:]


def test_fabric_example_trains_checkpoints_and_exports(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "lora_with_fabric.py"), "--steps", "3", "--out", str(out),
         "--accelerator", "cpu"],
        cwd=tmp_path, env=app_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params: 4,096 ||" in proc.stdout
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["adapter"]) == 8
    assert all(key.endswith(("lora_A", "lora_B")) for key in checkpoint["adapter"])
    torch.manual_seed(0)  # Fabric's seed_everything(0), then the example's config
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    load_adapter(base, out / "adapter")
    for name, tensor in checkpoint["adapter"].items():  # the checkpoint holds the factors the adapter holds
        torch.testing.assert_close(base.get_parameter(name), tensor)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([list(b"def main():\n")])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
