"""Shared helpers of the app tests: shrunk overrides, running the CLI, reading offline W&B runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# A tiny base (2 layers, 64 wide, 512-token vocab, 15 pretraining steps): seconds to build, and the
# same overrides give the same cache key, so every test after the first reuses it.
TINY_LLAMA = [
    "model.architecture.hidden_size=64",
    "model.architecture.intermediate_size=128",
    "model.architecture.num_hidden_layers=2",
    "model.architecture.num_attention_heads=4",
    "model.architecture.num_key_value_heads=2",
    "model.architecture.max_position_embeddings=128",
    "model.tokenizer.vocab_size=512",
    "model.pretrain.steps=15",
    "model.pretrain.batch_size=8",
    "model.pretrain.block_size=64",
    "model.pretrain.warmup_steps=2",
]
TINY_GPT2 = [
    "model=tiny_gpt2",
    "model.architecture.n_embd=64",
    "model.architecture.n_layer=2",
    "model.architecture.n_head=4",
    "model.architecture.n_positions=128",
    "model.tokenizer.vocab_size=512",
    "model.pretrain.steps=15",
    "model.pretrain.batch_size=8",
    "model.pretrain.block_size=64",
    "model.pretrain.warmup_steps=2",
]
TINY_MOE = [
    "model=tiny_moe",
    "model.architecture.hidden_size=64",
    "model.architecture.moe_intermediate_size=64",
    "model.architecture.num_hidden_layers=2",
    "model.architecture.head_dim=16",
    "model.architecture.max_position_embeddings=128",
    "model.tokenizer.vocab_size=512",
    "model.pretrain.steps=15",
    "model.pretrain.batch_size=8",
    "model.pretrain.block_size=64",
    "model.pretrain.warmup_steps=2",
]
# Little data, few steps, CPU: a job in seconds.
SHORT = [
    "data.block_size=64",
    "data.batch_size=4",
    "data.max_train_tokens=16000",
    "data.max_val_tokens=1024",
    "trainer.accelerator=cpu",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "optim.lr=1e-2",
    "optim.warmup_steps=1",
    "sample.max_new_tokens=4",
]


def app_env(cache_dir: Path) -> dict[str, str]:
    """Environment of a CLI run: this checkout's package first, offline W&B, the shared base cache."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        LORA_LIGHTNING_CACHE=str(cache_dir),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("LORA_LIGHTNING_FULL_ERROR", None)
    return env


def run_cli(
    args: list[str],
    cache_dir: Path,
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    one_stream: bool = False,
) -> subprocess.CompletedProcess:
    """``python -m lora_lightning ARGS`` in ``cwd``, as a user would run it.

    ``one_stream``: stderr goes into stdout, in the order a terminal shows them (``stderr`` is None).
    """
    return subprocess.run(
        [sys.executable, "-m", "lora_lightning", *args],
        cwd=cwd,
        env=env or app_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if one_stream else subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str], cache_dir: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Like run_cli, but returns at once (to run several quick failures side by side)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lora_lightning", *args],
        cwd=cwd,
        env=env or app_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_summary(output_dir: Path) -> dict[str, Any]:
    lines = (output_dir / "summary.json").read_text().splitlines()
    assert len(lines) == 1, f"summary.json must be one line, has {len(lines)}"
    summary = json.loads(lines[0])
    if summary.get("status") == "ok":  # every path a finished job lists is there
        missing = {key: path for key, path in summary["paths"].items() if path is not None and not Path(path).exists()}
        assert not missing, f"summary.json lists paths that do not exist: {missing}"
    return summary


# -- offline W&B runs ------------------------------------------------------------------------------
# An offline run is a LevelDB-style log of protobuf records (run-<id>.wandb): a 7-byte header, then
# 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: full/first/middle/last).

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer too small for a header: skip to the next block
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
        elif kind == 0:  # zero padding at the end of a block
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """The run record, final config, final summary and history rows of an offline W&B run directory."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    exit_code = None
    for raw in _records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = {"id": r.run_id, "group": r.run_group, "name": r.display_name, "project": r.project}
            run["tags"] = list(r.tags)
            config.update({_key(u): json.loads(u.value_json) for u in r.config.update})
        elif kind == "config":
            config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "artifact":
            a = record.artifact
            files = [entry.path for entry in a.manifest.contents]
            artifacts.append(
                {"name": a.name, "type": a.type, "files": files, "metadata": json.loads(a.metadata or "{}")}
            )
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {
        "run": run,
        "config": config,
        "summary": summary,
        "history": history,
        "artifacts": artifacts,
        "exit_code": exit_code,
    }


def offline_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


def compose_job(overrides: list[str], output_dir: Path) -> Any:
    """The config hydra.main would hand the job, plus the runtime fields a launch fills in (in-process runs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from lora_lightning.app.cli import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True)
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
