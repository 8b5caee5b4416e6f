"""The app's quant group: the default tiny Llama (and tiny GPT-2) with a 4-bit base, shrunk, on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.app_support import SHORT, TINY_GPT2, TINY_LLAMA, read_summary, run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("model", "quant"), [(TINY_LLAMA, "nf4_dq"), (TINY_GPT2, "nf4")], ids=["tiny_llama-nf4_dq", "tiny_gpt2-nf4"]
)
def test_qlora_job_trains_merges_and_exports_unquantized(cache_dir: Path, tmp_path: Path, model, quant) -> None:
    out = tmp_path / "run"
    proc = run_cli([*model, *SHORT, f"quant={quant}", "logger=csv", f"hydra.run.dir={out}"], cache_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(out)
    assert summary["quant"]["method"] == quant.replace("_", "-")
    assert summary["val_ppl"] < summary["base_val_ppl"]  # the adapters learnt over the 4-bit base
    # the merged export is unquantized (float32 sums, rounded once) and scores what the 4-bit model did
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    fidelity = summary["merge_fidelity"]
    assert fidelity["layers"] > 0 and fidelity["overall_rel_error"] < 1e-5  # float32 compute
    assert "base=" + quant.replace("_", "-") in proc.stdout


def test_bad_quant_values_fail_in_one_line_before_the_base_loads(cache_dir: Path, tmp_path: Path) -> None:
    for override, message in (
        ("quant.method=nf5", "quant.method must be null or one of nf4, nf4-dq, fp4, int8, got 'nf5'"),
        ("quant=nf4 quant.compute_dtype=fp8", "quant.compute_dtype must be one of auto, float32"),
        ("optim.name=sgd", "optim.name must be one of adamw, adamw_8bit, paged_adamw_8bit, got 'sgd'"),
        ("quant=nf4 method=full", "method=full trains every weight, which a quantized base cannot; got quant.method="),
    ):
        out = tmp_path / override.split("=")[0]
        proc = run_cli([*TINY_LLAMA, *SHORT, *override.split(), f"hydra.run.dir={out}"], cache_dir, cwd=tmp_path)
        assert proc.returncode == 1, proc.stdout[-2000:]
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists()
