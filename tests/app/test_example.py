"""The README's "add LoRA to your own Trainer" example runs as shipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.app_support import REPO, app_env

pytestmark = pytest.mark.slow


def test_example_trains_and_exports(tmp_path: Path) -> None:
    out = tmp_path / "lora-out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "lora_with_your_trainer.py"), "--steps", "3", "--out", str(out)],
        cwd=tmp_path,
        env=app_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 layers x (q_proj 64->64 + v_proj 64->64), r=8: 2 * 2 * 8 * 128 trainable of the model's total.
    assert "trainable params: 4,096 ||" in proc.stdout
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 8 and any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    logits = merged(input_ids=torch.tensor([list(b"import json\n")])).logits
    assert logits.shape == (1, 12, 256) and torch.isfinite(logits).all()
