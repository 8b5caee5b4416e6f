"""End-to-end jobs of the app, shrunk: the CLI with W&B offline, tiny GPT-2 in-process, model=hf from a local dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_lightning.app.models.tiny_base import MANIFEST
from tests.app_support import (
    SHORT,
    TINY_GPT2,
    TINY_LLAMA,
    app_env,
    compose_job,
    offline_runs,
    read_offline_run,
    read_summary,
    run_cli,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_job_run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The default job (tiny Llama, r8, all linear layers, stdlib code, W&B offline), shrunk, through the CLI.

    With the progress bar on and W&B not silenced, as a new user runs it. Returns the output dir and
    everything the command printed.
    """
    work = tmp_path_factory.mktemp("default-job")
    out = work / "run"
    env = app_env(cache_dir)
    env.pop("WANDB_SILENT")
    args = [*TINY_LLAMA, *SHORT, "trainer.enable_progress_bar=true", "logger.log_model=true", f"hydra.run.dir={out}"]
    env["PYTHONUNBUFFERED"] = "1"  # what reaches the terminal, in the order it does
    proc = run_cli(args, cache_dir, cwd=work, env=env, one_stream=True)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def default_job(default_job_run: tuple[Path, str]) -> Path:
    return default_job_run[0]


def test_the_recap_is_the_last_thing_a_run_prints(default_job_run: tuple[Path, str]) -> None:
    """W&B's footer (run history, summary, sync hint) comes before the recap, not after it."""
    _, printed = default_job_run
    assert "wandb" in printed  # the premise: W&B did print (offline, not silenced)
    done = printed.rindex("lora-lightning: done")
    assert "wandb" not in printed[done:], printed[done:]
    # the adapter table: one row per role across the 2 layers, not one per module
    assert "model.layers.*.self_attn.q_proj (x2)" in printed and "model.layers.0.self_attn.q_proj" not in printed


def test_default_job_is_quiet_and_counts_steps(default_job_run: tuple[Path, str]) -> None:
    out, printed = default_job_run
    for noise in ("litlogger", "LeafSpec", "Loading weights", "Writing model shards", "anonymous setting"):
        assert noise not in printed, noise
    assert "step 8/8" in printed and "Epoch 0/-" not in printed  # the bar counts optimizer steps
    # The recap shows both continuations of one prompt, decoded without loops (no repeated 3-gram).
    summary = read_summary(out)
    assert "sample, base" in printed and "sample, tuned" in printed
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    for text in (summary["base_sample"], summary["sample"]):
        assert text.startswith("def ")
        ids = tokenizer(text).input_ids
        grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
        assert len(grams) == len(set(grams)), text
    assert summary["peak_mem_mib"] > 50 and summary["status"] == "ok" and summary["method"] == "lora"


def test_default_job_learns_and_reports(default_job: Path) -> None:
    summary = read_summary(default_job)
    assert summary["model"] == "tiny_llama" and summary["targets"] == "all_linear"
    assert summary["lora"]["r"] == 8 and summary["lora"]["alpha"] == 16
    assert summary["lora"]["target_modules"] == "all-linear"
    # The adapters were trained: held-out code got more predictable than under the base.
    assert summary["val_ppl"] < summary["base_val_ppl"]
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]), rel_tol=1e-3)
    # The exported merged model, reloaded by transformers, scores what the adapted model scored.
    assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    params = summary["params"]
    # Per layer, r=8 on q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->128, down 128->64; 2 layers.
    per_layer = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 3)
    assert params["trainable"] == 2 * per_layer and params["adapted_modules"] == 14
    assert summary["steps"] == 8 and isinstance(summary["sample"], str)


def test_default_job_output_dir(default_job: Path) -> None:
    summary = read_summary(default_job)
    assert {p for p in summary["paths"]} >= {"adapter", "merged", "checkpoints", "config", "summary"}
    # The resolved config: interpolations replaced by values.
    resolved = yaml.safe_load((default_job / "config.yaml").read_text())
    assert resolved["data"]["seed"] == 0 and "${" not in (default_job / "config.yaml").read_text()
    # Adapter in PEFT's format.
    adapter_cfg = json.loads((default_job / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    targets = adapter_cfg["target_modules"]
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert targets == "all-linear" or {name.rsplit(".", 1)[-1] for name in targets} == linear
    tensors = load_file(default_job / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 14 and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    # Checkpoints hold the adapters only.
    (ckpt,) = (default_job / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in key for key in state), sorted(state)[:5]
    # The merged model and its tokenizer load with the Auto classes and generate.
    model = AutoModelForCausalLM.from_pretrained(default_job / "merged")
    tokenizer = AutoTokenizer.from_pretrained(default_job / "merged")
    ids = tokenizer("import os\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_default_job_adapter_reloads_onto_its_base(default_job: Path) -> None:
    """The exported adapter on the base (ours and PEFT's loader) computes what the merged model computes."""
    from peft import PeftModel

    from lora_lightning import load_adapter

    summary = read_summary(default_job)
    ids = AutoTokenizer.from_pretrained(default_job / "merged")(
        "class A:\n    def f(self):", return_tensors="pt"
    ).input_ids
    merged = AutoModelForCausalLM.from_pretrained(default_job / "merged").eval()
    expected = merged(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"]).eval()
    assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-4)  # training changed something
    load_adapter(base, default_job / "adapter")
    torch.testing.assert_close(base(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(summary["base_model"]), default_job / "adapter"
    ).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_default_job_wandb_offline_run(default_job: Path) -> None:
    (run_dir,) = offline_runs(default_job)
    run = read_offline_run(run_dir)
    assert run["run"]["project"] == "lora-lightning" and "lora" in run["run"]["tags"]
    assert run["run"]["group"] == ""  # a single run has no group
    config, summary = run["config"], run["summary"]
    # The LoRA config and the counts are in the run config.
    assert config["lora/r"] == 8 and config["lora/alpha"] == 16
    assert config["lora/trainable_params"] == read_summary(default_job)["params"]["trainable"]
    assert config["lora"]["targets"] == "all_linear" and config["model"]["name"] == "tiny_llama"
    # Losses and perplexity are in the history, the final figures in the summary.
    val_ppl = [row["val/ppl"] for row in run["history"] if "val/ppl" in row]
    assert len(val_ppl) >= 3  # before training, twice during, after
    assert any("train/loss" in row for row in run["history"])
    assert summary["final/val_loss"] == pytest.approx(read_summary(default_job)["val_loss"])
    assert summary["final/base_val_ppl"] > summary["final/val_ppl"]
    assert summary["final/peak_mem_mib"] == read_summary(default_job)["peak_mem_mib"]
    assert "train/loss" in summary and run["exit_code"] == 0  # wandb.finish() ran
    # logger.log_model=true: the exported PEFT adapter is the run's model artifact.
    (artifact,) = run["artifacts"]
    assert artifact["type"] == "model" and artifact["name"] == f"adapter-{run['run']['id']}"
    assert sorted(artifact["files"]) == ["adapter_config.json", "adapter_model.safetensors"]


_compose = compose_job


def test_tiny_gpt2_job_in_process(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model=tiny_gpt2: the Conv1D path, end to end; the job returns the monitored val metric."""
    from lora_lightning.app.run.job import run

    monkeypatch.setenv("LORA_LIGHTNING_CACHE", str(cache_dir))
    out = tmp_path / "gpt2"
    cfg = _compose([*TINY_GPT2, *SHORT, "targets=all_linear", "logger=csv"], out)
    returned = run(cfg)
    summary = read_summary(out)
    assert returned == pytest.approx(summary["val_loss"]) == pytest.approx(summary["monitor"]["val/loss"])
    assert summary["model"] == "tiny_gpt2" and summary["val_ppl"] < summary["base_val_ppl"]
    # all-linear on GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj (Conv1D) in 2 blocks, head excluded.
    assert summary["params"]["adapted_modules"] == 8
    # c_attn 64->192, c_proj 64->64, c_fc 64->256, mlp.c_proj 256->64, r=8, 2 blocks.
    assert summary["params"]["trainable"] == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert math.isclose(summary["merged_val_ppl"], summary["val_ppl"], rel_tol=2e-3)
    assert (out / "csv" / "version_0" / "metrics.csv").is_file()
    bases = [p for p in cache_dir.iterdir() if p.is_dir() and p.name.startswith("tiny_gpt2-")]
    assert len(bases) == 1 and json.loads((bases[0] / MANIFEST).read_text())["architecture"]["model_type"] == "gpt2"


def test_hf_model_from_local_dir(cache_dir: Path, default_job: Path, tmp_path: Path) -> None:
    """model=hf loads any save_pretrained directory through the real from_pretrained path."""
    base = read_summary(default_job)["base_model"]  # the tiny Llama base in the cache
    out = tmp_path / "run"
    args = ["model=hf", f"model.name_or_path={base}", "model.torch_dtype=float32", *SHORT, "logger=none"]
    proc = run_cli(
        [*args, "targets=attention", "checkpoint.enabled=false", f"hydra.run.dir={out}"], cache_dir, tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out)
    assert summary["model"] == "hf" and summary["base_model"] == base
    assert summary["params"]["adapted_modules"] == 8  # q, k, v, o in 2 layers
    assert summary["paths"]["checkpoints"] is None and not (out / "checkpoints").exists()
    assert not (out / "wandb").exists()
