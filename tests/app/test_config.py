"""Every config group option composes and instantiates; roles map to real modules of every model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lightning.app.cli import config_dir
from lora_lightning.app.errors import UsageError
from lora_lightning.app.models.loading import ROLES, LoadedModel
from lora_lightning.app.run.job import lora_config_from
from lora_lightning.app.run.tracking import build_logger
from lora_lightning.targets import plan_adapters
from tests.app_support import REPO, TINY_GPT2, TINY_LLAMA, TINY_MOE
from tests.reference import scale_of

CONF = config_dir()
GROUPS = ("model", "rank", "targets", "quant", "data", "trainer", "logger", "method", "experiment")
LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")
SHRINK = {"tiny_llama": TINY_LLAMA, "tiny_gpt2": TINY_GPT2[1:], "tiny_moe": TINY_MOE[1:]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def llama(cache_dir: Path) -> LoadedModel:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_LIGHTNING_CACHE", str(cache_dir))
        return instantiate(_compose(TINY_LLAMA).model, _convert_="all")


def test_the_config_dir_is_the_checkout_or_the_package() -> None:
    assert (CONF / "config.yaml").is_file()
    assert {p.name for p in CONF.iterdir() if p.is_dir()} >= set(GROUPS)
    assert options("model") == ["hf", "tiny_gpt2", "tiny_llama", "tiny_moe"]
    assert options("rank") == ["r16", "r32", "r4", "r64", "r8"]
    assert options("targets") == sorted(ROLES)
    assert options("data") == [
        "hf_dataset",
        "hf_sft",
        "pydoc",
        "sft_jsonl",
        "stdlib_code",
        "stdlib_docstrings",
        "text_files",
    ]
    assert options("trainer") == ["cpu", "ddp", "default", "fsdp", "gpu"]
    assert options("logger") == ["csv", "mlflow", "none", "tensorboard", "wandb"]
    assert options("quant") == ["fp4", "int8", "nf4", "nf4_dq", "none"]
    assert options("method") == ["full", "lora"]


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate_and_map_every_role(
    name: str, cache_dir: Path, llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORA_LIGHTNING_CACHE", str(cache_dir))
    extra = [f"model.name_or_path={llama.name_or_path}"] if name == "hf" else SHRINK[name]
    cfg = _compose([f"model={name}", *extra])
    loaded = instantiate(cfg.model, _convert_="all")
    assert isinstance(loaded, LoadedModel) and loaded.name == name
    assert loaded.loss_chunk_tokens == 1024  # the chunked loss by default; model.loss_chunk_tokens=null: off
    assert (
        instantiate(_compose([f"model={name}", *extra, "model.loss_chunk_tokens=null"]).model).loss_chunk_tokens is None
    )
    assert loaded.tokenizer.eos_token_id is not None
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    kinds = {"tiny_gpt2": {"Conv1D"}, "tiny_moe": {"Linear", "Qwen3MoeExperts"}}.get(name, {"Linear"})
    counts = {}
    for role in ROLES:  # every role resolves to modules that exist in this model
        cfg = _compose([f"model={name}", *extra, f"targets={role}"])
        linears, banks = plan_adapters(loaded.model, lora_config_from(cfg))
        planned = linears + [(bank.name, bank.module) for bank in banks]
        types = {type(module).__name__ for _, module in planned}
        assert planned and types <= kinds and (role not in ("mlp", "all_linear") or types & kinds == types)
        if name == "tiny_moe" and role in ("mlp", "all_linear"):
            assert banks and all(bank.projections == ("gate_up_proj", "down_proj") for bank in banks)
        counts[role] = len(planned)
    assert counts["qv"] <= counts["attention"] < counts["all_linear"]
    assert counts["mlp"] < counts["all_linear"]


@pytest.mark.parametrize("name", options("quant"))
def test_quant_options_load_the_tiny_base_as_bitsandbytes_would(
    name: str, cache_dir: Path, llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORA_LIGHTNING_CACHE", str(cache_dir))
    cfg = _compose([f"quant={name}", *TINY_LLAMA])
    quant = OmegaConf.to_container(cfg.quant) if cfg.quant.method else None
    loaded = instantiate(cfg.model, quant=quant, _convert_="all")
    layer = loaded.model.model.layers[0].self_attn.q_proj
    want = {"none": "Linear", "int8": "Linear8bitLt"}.get(name, "Linear4bit")
    assert type(layer).__name__ == want and type(loaded.model.lm_head).__name__ == "Linear"
    if want == "Linear4bit":
        state = layer.weight.quant_state
        assert state.quant_type == ("fp4" if name == "fp4" else "nf4") and bool(state.nested) == (name == "nf4_dq")


@pytest.mark.parametrize("name", options("rank"))
def test_rank_options(name: str) -> None:
    config = lora_config_from(_compose([f"rank={name}"]))
    assert config.r == int(name[1:]) and config.alpha == 2 * config.r
    assert scale_of(config, "model.layers.0.self_attn.q_proj") == pytest.approx(2.0)
    rs = lora_config_from(_compose([f"rank={name}", "lora.use_rslora=true"]))
    assert scale_of(rs, "x.q_proj") == pytest.approx(2 * rs.r / rs.r**0.5)


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate_and_batch(name: str, llama: LoadedModel, tmp_path: Path) -> None:
    extra: list[str] = []
    if name == "text_files":
        (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
        (tmp_path / "b.jsonl").write_text('{"text": "print(1)"}\n' * 100)
        extra = [f"data.source.train=[{tmp_path}/*.txt]", f"data.source.val=[{tmp_path / 'b.jsonl'}]"]
    if name == "hf_dataset":
        (tmp_path / "corpus.txt").write_text("\n".join(f"line {i} of a local corpus" for i in range(400)))
        extra = [
            "data.source.path=text",
            f"data.source.data_files={tmp_path / 'corpus.txt'}",
            "data.source.val_split=null",
        ]
    if name == "sft_jsonl":  # the README's example file (test_app_sft reads the chat one)
        extra = [f"data.source.train=[{REPO}/examples/sft_records.jsonl]", "data.source.val_fraction=0.2"]
    if name == "hf_sft":
        (tmp_path / "qa.jsonl").write_text("".join(f'{{"q": "{i} + 1?", "a": "{i + 1}"}}\n' for i in range(40)))
        extra = [
            "data.source.path=json",
            f"data.source.data_files={tmp_path / 'qa.jsonl'}",
            "data.source.val_split=null",
        ]
        extra += ["data.source.fields={prompt: q, response: a}"]
    if name == "stdlib_docstrings":
        extra = ["data.max_train_examples=40", "data.source.max_code_chars=120"]
    supervised = name in ("sft_jsonl", "hf_sft", "stdlib_docstrings")
    size = ["data.max_length=128"] if supervised else ["data.block_size=32"]
    cfg = _compose([f"data={name}", *size, "data.batch_size=2", *extra])
    data = instantiate(cfg.data, tokenizer=llama.tokenizer, _convert_="all")
    if name in ("hf_dataset", "hf_sft") and importlib.util.find_spec("datasets") is None:
        with pytest.raises(UsageError, match=r"pip install 'lora-lightning\[datasets\]'"):
            data.source.check()
        return
    data.source.check()
    data.setup("fit")
    data.check_validation()
    batch = next(iter(data.train_dataloader()))
    if supervised:  # padded to the longest example, loss on responses only
        assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 128
        mask = "position_ids" if data.packing else "attention_mask"  # packed rows: positions restart per example
        assert batch[mask].shape == batch["input_ids"].shape
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
        assert data.summary()["counts"]["train"]["used"] > 0
        return
    assert batch["input_ids"].shape == (2, 32) and torch.equal(batch["input_ids"], batch["labels"])
    assert len(data.val_blocks) > 0


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = _compose([f"trainer={name}"])
    if not torch.cuda.is_available() and cfg.trainer.accelerator == "gpu":
        # The config is real; only the hardware is missing: Lightning says so when it is built.
        with pytest.raises(Exception, match="(?i)gpu|cuda"):
            instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
        cfg.trainer.accelerator = "cpu"
        if cfg.trainer.get("strategy") == "fsdp":
            return  # FSDP exists for GPUs only
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
    assert isinstance(trainer, L.Trainer) and trainer.max_steps == cfg.trainer.max_steps
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    expected = {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy"}.get(name)
    if expected is not None:
        assert type(trainer.strategy).__name__ == expected


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(name: str, tmp_path: Path) -> None:
    cfg = _compose([] if name == "wandb" else [f"logger={name}"], output_dir=tmp_path)  # wandb is the default
    logger = build_logger(cfg.logger, tmp_path, "tiny_llama-r8-qv")
    expected = {
        "wandb": WandbLogger,
        "csv": CSVLogger,
        "none": type(None),
        "tensorboard": TensorBoardLogger,
        "mlflow": MLFlowLogger,
    }[name]
    assert isinstance(logger, expected)
    if name == "wandb":
        assert logger._wandb_init["mode"] == "offline" and logger._wandb_init["name"] == "tiny_llama-r8-qv"
        assert logger._wandb_init["group"] is None  # a single run has no group
    if name == "tensorboard":  # a single run: <output_dir>/tensorboard/<overrides>, no group directory
        assert Path(logger.log_dir) == tmp_path / "tensorboard" / "logger=tensorboard"
    if name == "mlflow":  # the local store in the job's output dir
        run = logger.experiment.get_run(logger.run_id)
        assert run.info.run_name == "logger=mlflow" and (tmp_path / "mlflow.db").is_file()
        logger.finalize("success")


@pytest.mark.parametrize(("name", "package"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_logger_whose_package_is_missing_fails_before_any_work(name, package, tmp_path, monkeypatch) -> None:
    import importlib.util

    from lora_lightning.app.errors import UsageError
    from lora_lightning.app.run.tracking import check_logger

    cfg = _compose([f"logger={name}"], output_dir=tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod.startswith(package) else real(mod, *a))
    with pytest.raises(UsageError, match=rf"logger={name} needs {package}.*pip install 'lora-lightning\[{name}\]'"):
        check_logger(cfg.logger)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_options_instantiate(name: str) -> None:
    cfg = _compose([f"hydra/launcher={name}"])
    # hydra.utils.instantiate refuses hydra._internal targets (the basic launcher), so build it by hand.
    params = {key: value for key, value in cfg.hydra.launcher.items() if key != "_target_"}
    launcher = get_class(cfg.hydra.launcher._target_)(**params)
    expected = {
        "basic": "BasicLauncher",
        "joblib": "JoblibLauncher",
        "submitit_local": "LocalLauncher",
        "submitit_slurm": "SlurmLauncher",
    }[name]
    assert type(launcher).__name__ == expected


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_recipes_compose(name: str, tmp_path: Path) -> None:
    cfg = _compose([f"experiment={name}"], output_dir=tmp_path)
    config = lora_config_from(cfg)
    assert config.r == cfg.lora.r
    data = instantiate(cfg.data, _convert_="all")
    length = "max_length" if "max_length" in cfg.data else "block_size"  # supervised or packed-text data
    assert getattr(data, length) == cfg.data[length]
    if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available():
        assert isinstance(instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path)), L.Trainer)
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    assert "${" not in OmegaConf.to_yaml(job, resolve=True)  # every interpolation resolves


def test_sweep_recipe_holds_the_grid() -> None:
    cfg = _compose(["experiment=sweep_rank_targets"])
    assert cfg.hydra.sweeper.params == {"rank": "r4,r8,r16", "targets": "qv,all_linear"}


@pytest.mark.parametrize("name", options("method"))
def test_method_options(name: str, llama: LoadedModel, tmp_path: Path) -> None:
    from lora_lightning.app.run.methods import FullFineTune, build_method
    from lora_lightning.lightning.callback import LoRACallback

    cfg = _compose([f"method={name}"], output_dir=tmp_path)
    method = build_method(cfg, lora_config_from(cfg), llama, tmp_path)
    assert method.name == name and cfg.optim.lr == 5e-3  # full fine-tuning keeps LoRA's optimizer settings
    if name == "lora":
        assert isinstance(method.callback, LoRACallback) and method.describe()["lora"]["r"] == 8
    else:
        assert isinstance(method.callback, FullFineTune) and method.describe() == {
            "method": "full",
            "targets": None,
            "lora": None,
        }


def test_study_recipe_runs_the_reference_once_beside_the_grid() -> None:
    """experiment=rank_study: hydra/sweeper=study turns its grid and reference into 11 jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose(["experiment=rank_study"])
    sweeper_cfg = cfg.hydra.sweeper
    assert sweeper_cfg.params == {"rank": "r4,r8,r16,r32,r64", "targets": "qv,all_linear"}
    assert sweeper_cfg.references == [["method=full", "eval_base=true"]] and cfg.eval_base is False
    # Hydra instantiates sweepers only from the hydra_plugins namespace; build it the same way.
    sweeper = get_class(sweeper_cfg._target_)(
        max_batch_size=None, params=sweeper_cfg.params, references=sweeper_cfg.references
    )
    params = [f"{key}={value}" for key, value in sweeper_cfg.params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, "experiment=rank_study", "seed=0"])
    (jobs,) = sweeper.split_arguments(overrides, None)
    assert len(jobs) == 11
    assert jobs[0] == ["experiment=rank_study", "seed=0", "method=full", "eval_base=true"]
    assert sorted(job[:2] for job in jobs[1:])[0] == ["rank=r16", "targets=all_linear"]
    assert {tuple(job[:2]) for job in jobs[1:]} == {
        (f"rank=r{r}", f"targets={t}") for r in (4, 8, 16, 32, 64) for t in ("qv", "all_linear")
    }


def test_user_config_dir_adds_options(tmp_path: Path) -> None:
    """--config-dir puts a user's directory on the search path: its files become group options."""
    import yaml

    from tests.app_support import run_cli

    mine = tmp_path / "my_conf"
    (mine / "rank").mkdir(parents=True)
    (mine / "experiment").mkdir()
    (mine / "rank" / "r2.yaml").write_text("# @package lora\nr: 2\nalpha: 4\n")
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /rank: r2\n  - override /model: tiny_gpt2\noptim:\n  lr: 1.0e-4\n"
    )
    proc = run_cli(["--config-dir", str(mine), "experiment=mine", "--cfg", "job"], tmp_path / "cache", tmp_path)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["lora"]["r"] == 2 and job["lora"]["alpha"] == 4
    assert job["model"]["name"] == "tiny_gpt2" and job["optim"]["lr"] == 1.0e-4
    assert job["lora"]["targets"] == "all_linear"  # the packaged defaults still apply
