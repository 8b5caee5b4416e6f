"""DoRA and PiSSA from the command line and in a sweep, shrunk: the app records the variant, and
the exported merged model (and, for PiSSA, the adapter on the original base) scores what training did."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_lightning import load_adapter
from tests.app_support import SHORT, TINY_LLAMA, offline_runs, read_offline_run, read_summary, run_cli

pytestmark = pytest.mark.slow


def test_a_dora_sweep_records_the_variant_per_job(cache_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "lora.use_dora=false,true", "rank=r4", *TINY_LLAMA, *SHORT, "checkpoint.enabled=false"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {
        read_summary(job)["lora"].get("use_dora", False): read_summary(job) for job in (sweep / "0", sweep / "1")
    }
    assert set(summaries) == {False, True}
    plain, dora = summaries[False], summaries[True]
    # DoRA adds one magnitude per output of every adapted layer to the same adapters
    assert dora["params"]["trainable"] > plain["params"]["trainable"]
    for summary in (plain, dora):
        assert summary["val_ppl"] < summary["base_val_ppl"]
        assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    (run_dir,) = offline_runs(sweep / "1")
    assert read_offline_run(run_dir)["config"]["lora/use_dora"] is True


def test_a_pissa_job_writes_an_adapter_for_the_original_base(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli([*TINY_LLAMA, *SHORT, "experiment=pissa", "logger=csv", f"hydra.run.dir={out}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(out)
    assert summary["lora"]["init_lora_weights"] == "pissa_niter_4"
    assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])  # the original base, untouched
    load_adapter(base, out / "adapter")
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
