"""model=tiny_moe end to end, in process: the experts are adapted, the recap says what share they are."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from lora_lightning.app.run.job import run
from lora_lightning.app.run.summary import print_recap
from lora_lightning.app.run.summary import read_summary as read_job_summary
from tests.app_support import SHORT, TINY_MOE, compose_job, read_summary


def test_tiny_moe_job_adapts_the_experts_and_reloads_merged(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("LORA_LIGHTNING_CACHE", str(cache_dir))
    out = tmp_path / "moe"
    run(compose_job([*TINY_MOE, *SHORT, "targets=all_linear", "logger=csv"], out))
    summary = read_summary(out)
    params = summary["params"]
    assert summary["model"] == "tiny_moe" and summary["val_ppl"] < summary["base_val_ppl"]
    # 2 layers x 8 experts x (gate_up 64 -> 128, down 64 -> 64); attention q, k, v, o; r = 8
    experts = 2 * 8 * (64 * 128 + 64 * 64)
    assert params["expert_params"] == params["adapted_expert_params"] == experts
    bank_factors = 2 * 8 * 8 * ((64 + 128) + (64 + 64))
    attention = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert params["trainable"] == bank_factors + attention
    assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    capsys.readouterr()
    print_recap(read_job_summary(out / "summary.json"))
    recap = capsys.readouterr().out
    share = 100 * experts / params["total"]
    assert f"{experts:,d} params ({share:.1f}% of the model) in expert banks, 100% of them adapted" in recap


def test_tiny_moe_with_quant_nf4_holds_4bit_experts_and_exports_unquantized(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``model=tiny_moe quant=nf4``: transformers' load_in_4bit quantizes the linear layers, the injection
    the expert banks; summary.json records the banks' bytes before and after; the export is unquantized."""
    monkeypatch.setenv("LORA_LIGHTNING_CACHE", str(cache_dir))
    out = tmp_path / "moe4"
    run(compose_job([*TINY_MOE, *SHORT, "targets=all_linear", "quant=nf4", "logger=csv"], out))
    summary = read_summary(out)
    banks = summary["quant"]["expert_banks"]
    experts = 2 * 8 * (64 * 128 + 64 * 64)
    assert banks["banks"] == 2 and banks["bytes_before"] == 4 * experts  # float32 banks
    assert banks["bytes_after"] < 0.15 * banks["bytes_before"]  # 4 bits and one float32 scale per 64
    assert summary["params"]["expert_params"] == summary["params"]["adapted_expert_params"] == experts
    assert summary["val_ppl"] < summary["base_val_ppl"]
    assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert "quantization_config" not in (out / "merged" / "config.json").read_text()
    assert type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    capsys.readouterr()
    print_recap(read_job_summary(out / "summary.json"))
    assert "100% of them adapted, 4-bit (" in capsys.readouterr().out
