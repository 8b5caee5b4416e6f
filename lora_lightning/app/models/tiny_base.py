"""Pretrained bases for the tiny models, built here on first use and cached like a hub download.

LoRA needs a base that already knows something. With no hub access, the tiny models get one the
first time they are used: a byte-level BPE tokenizer and a minute or two of full training on the
English prose that ships with every CPython (``pydoc_data.topics``, the text of ``help()``). The
result is written with ``save_pretrained`` to ``<cache_dir>/<name>-<key>``, where the key hashes
everything that shapes the weights, and is loaded with ``from_pretrained`` from then on, exactly
like a model from the hub. A file lock keeps parallel sweep jobs from building it twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from lightning.pytorch.utilities.seed import isolate_rng
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from lora_lightning.app.console import console
from lora_lightning.app.data.token_blocks import PydocTopics, TokenBlockDataModule
from lora_lightning.app.models.lightning_module import CausalLMModule
from lora_lightning.app.trainer import StepProgressBar

BASE_FORMAT = 1  # bump when the build recipe changes, so old cache entries are not reused
MANIFEST = "lora_lightning_base.json"
EOS = "<|endoftext|>"


def pydoc_corpus() -> list[str]:
    """The pretraining corpus: every topic text of ``pydoc_data.topics``, in key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on ``texts``.

    Byte-level means every string, including source code the corpus never showed, encodes
    without unknown tokens. One special token, ``<|endoftext|>``, serves as bos, eos and pad.

    Returns:
        A ``transformers`` fast tokenizer, ready for ``save_pretrained``.
    """

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(
            f"model.tokenizer.vocab_size must be an integer >= 257 (256 bytes + <|endoftext|>), got {vocab_size!r}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def cache_key(spec: Mapping[str, Any]) -> str:
    """12 hex digits of a hash over everything that shapes the weights."""
    text = json.dumps({"format": BASE_FORMAT, "python": sys.version_info[:2], **spec}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_spec(architecture: Mapping[str, Any], pretrain: Mapping[str, Any]) -> None:
    problems = []
    for key in ("steps", "batch_size", "block_size"):
        value = pretrain.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"model.pretrain.{key} must be a positive integer, got {value!r}")
    lr = pretrain.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        problems.append(f"model.pretrain.lr must be a positive number, got {lr!r}")
    positions = architecture.get("max_position_embeddings", architecture.get("n_positions"))
    block = pretrain.get("block_size")
    if isinstance(positions, int) and isinstance(block, int) and block > positions:
        problems.append(f"model.pretrain.block_size={block} exceeds the model's {positions} positions")
    if "model_type" not in architecture:
        problems.append("model.architecture.model_type is required (e.g. llama, gpt2)")
    if problems:
        raise ValueError("; ".join(problems))


def ensure_base(
    name: str,
    architecture: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    pretrain: Mapping[str, Any],
    cache_dir: str | Path,
) -> Path:
    """The directory of the pretrained base, building it first if no cache entry exists.

    Args:
        name: model name, the prefix of the cache entry.
        architecture: keyword arguments of the transformers config; ``model_type`` picks its class.
        tokenizer: ``vocab_size`` of the byte-level BPE tokenizer.
        pretrain: ``steps``, ``batch_size``, ``block_size``, ``lr``, ``warmup_steps``,
            ``weight_decay``, ``seed`` of the full pretraining run.
        cache_dir: where bases live (``~`` is expanded).

    Returns:
        A directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load.
    """

    _check_spec(architecture, pretrain)
    spec = {"architecture": dict(architecture), "tokenizer": dict(tokenizer), "pretrain": dict(pretrain)}
    root = Path(cache_dir).expanduser()
    target = root / f"{name}-{cache_key(spec)}"
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Parallel jobs (joblib, SLURM arrays, DDP ranks) block here while the first one builds.
    with FileLock(str(root / f"{target.name}.lock")):
        if (target / MANIFEST).is_file():
            return target
        staging = root / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with isolate_rng():  # the build seeds itself; the job's own seed must not depend on a cache miss
                _build(name, spec, staging)
            os.replace(staging, target)  # atomic: a reader sees no entry or a complete one
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(name: str, spec: Mapping[str, Any], out: Path) -> None:

    pretrain = spec["pretrain"]
    start = time.perf_counter()
    console().print(
        f"[bold]Building the {name} base[/bold] (first use; cached afterwards): byte-level BPE tokenizer and "
        f"{pretrain['steps']} steps of full training on pydoc_data.topics",
        soft_wrap=True,
    )
    L.seed_everything(pretrain.get("seed", 0), verbose=False)
    texts = pydoc_corpus()
    tokenizer = train_tokenizer(texts, spec["tokenizer"]["vocab_size"])
    eos = tokenizer.eos_token_id
    architecture = dict(spec["architecture"])
    config = AutoConfig.for_model(
        architecture.pop("model_type"),
        **architecture,
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = AutoModelForCausalLM.from_config(config)
    data = TokenBlockDataModule(
        PydocTopics(val_fraction=0.0),
        tokenizer=tokenizer,
        block_size=pretrain["block_size"],
        batch_size=pretrain["batch_size"],
        seed=pretrain.get("seed", 0),
    )
    module = CausalLMModule(
        model,
        tokenizer,
        lr=pretrain["lr"],
        weight_decay=pretrain.get("weight_decay", 0.0),
        betas=tuple(pretrain.get("betas", (0.9, 0.95))),
        warmup_steps=pretrain.get("warmup_steps", 0),
        min_lr_ratio=pretrain.get("min_lr_ratio", 0.1),
    )
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=pretrain["steps"],
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        callbacks=[StepProgressBar()],  # "step 120/200" rather than "Epoch 0/-2"
    )
    trainer.fit(module, datamodule=data)
    final_loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {
        "name": name,
        **spec,
        "corpus": "pydoc_data.topics",
        "final_train_loss": final_loss,
        "build_seconds": round(time.perf_counter() - start, 1),
        "built_with": {"python": sys.version.split()[0], "torch": torch.__version__},
    }
    # Written last: its presence is what marks the entry complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    console().print(f"base {name} ready in {manifest['build_seconds']} s (final train loss {final_loss:.3f})")
