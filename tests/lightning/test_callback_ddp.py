"""Real multi-process DDP: two CPU processes on gloo, launched the way Lightning launches them."""

from __future__ import annotations

import json

import pytest
import torch

from tests.lightning.test_callback_checkpoints import _run_script


@pytest.mark.slow
def test_ddp_two_processes_train_identical_adapters_and_write_one_export(tmp_path):
    result = _run_script("fit", str(tmp_path), "--ddp", "--epochs", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "adapters_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "adapters_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and len(rank0) == 8
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP kept the replicas in lockstep
    assert any(torch.count_nonzero(v) for k, v in rank0.items() if k.endswith("lora_B"))  # and they trained
    for rank in (0, 1):
        assert json.loads((tmp_path / f"losses_rank{rank}.json").read_text())["global_step"] == 4
    # one export, complete, nothing half-written beside it
    export = tmp_path / "export"
    assert sorted(p.name for p in export.iterdir()) == ["adapter", "merged"]
    assert (export / "adapter" / "adapter_model.safetensors").is_file()
    assert (export / "merged" / "config.json").is_file()
