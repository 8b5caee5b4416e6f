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
