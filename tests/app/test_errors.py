"""Bad input ends the CLI with one clear line, a non-zero exit, and nothing written.

Each mistake is checked in-process (the job as Hydra hands it over: the one-line message and an
output dir left empty, in the fast lane); a few, one of each kind (a composition error, a key
Hydra refuses, a value the job refuses, a missing file), also go through the real command, where
the exit status, stderr's single line and the directory the command ran in are checked (the slow
lane: each is a subprocess).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lightning.app.errors import UsageExit
from tests.app_support import app_env, compose_job, start_cli

# (overrides, words the one error line must contain)
CASES = {
    "unknown group choice": (["rank=r3"], ["rank/r3", "r16", "r4", "r64"]),
    "zero rank": (["lora.r=0"], ["lora", "r must be a positive integer, got 0"]),
    "unmapped target role": (
        ["targets=mlp", "model.target_roles.mlp=null"],
        ["lora.targets='mlp'", "tiny_llama", "qv, attention, all_linear"],
    ),
    "unknown target role": (["lora.targets=ffn"], ["lora.targets='ffn'", "model.target_roles"]),
    "missing model path": (
        ["model=hf", "model.name_or_path=/nonexistent/model"],
        ["/nonexistent/model", "does not exist"],
    ),
    "unset model path": (["model=hf"], ["required value not set: model.name_or_path"]),
    "missing data file": (
        ["data=text_files", "data.source.train=[/nonexistent/notes.txt]"],
        ["/nonexistent/notes.txt", "cannot read data file"],
    ),
    "malformed jsonl": (["data=text_files", "data.source.train=[{bad}]"], ["line 2", "'text'"]),
    "malformed sft json line": (
        ["data=sft_jsonl", "data.source.train=[{broken}]"],
        ["broken.jsonl' line 2 column 17: not valid JSON: expected ',' delimiter (near"],
    ),
    "sft records of no format": (
        ["data=sft_jsonl", "data.source.train=[{bad}]"],
        ["bad.jsonl' line 1: the record matches no record format ('text')", "set data.source.format"],
    ),
    "sft record without a field": (
        ["data=sft_jsonl", "data.source.train=[{bad_sft}]", "data.source.format=prompt_response"],
        ["bad_sft.jsonl' line 2", "no 'response' field (fields found: 'prompt', 'answer')"],
    ),
    "sft empty response": (
        ["data=sft_jsonl", "data.source.train=[{bad_sft}]", "data.source.fields={response: answer}"],
        ["bad_sft.jsonl' line 1", "empty response in field 'answer'"],
    ),
    "sft unknown format": (
        ["data=sft_jsonl", "data.source.train=[{bad_sft}]", "data.source.format=sharegpt"],
        ["data.source.format must be one of auto, prompt_response, alpaca, messages, got 'sharegpt'"],
    ),
    "bad override key": (["lora.rank=4"], ["lora.rank"]),
    "unknown monitor": (["monitor=val/acc"], ["monitor must be one of val/loss, val/ppl", "val/acc"]),
    "zero loss chunk": (["model.loss_chunk_tokens=0"], ["model.loss_chunk_tokens must be a positive integer or null"]),
    "bad logger mode": (["logger.mode=onlin"], ["logger.mode must be one of offline, online, disabled", "onlin"]),
    "zero learning rate": (["optim.lr=0"], ["optim.lr must be a positive number, got 0"]),
    "zero LoRA+ ratio": (["optim.lr_ratio_B=0"], ["lr_ratio_B must be a positive number, got 0"]),
    "unknown optim key": (["+optim.lrr=1"], ["optim.lrr is not an option", "lr, weight_decay"]),
    "negative max_steps": (["trainer.max_steps=-5"], ["trainer.max_steps must be a positive integer", "-5"]),
    "unknown precision": (["trainer.precision=bf17"], ["'bf17'", "is invalid", "bf16-mixed"]),
    "unknown trainer key": (["+trainer.max_stepz=5"], ["trainer:", "max_stepz"]),
    "unknown quant method": (
        ["quant.method=nf5"],
        ["quant.method must be null or one of nf4, nf4-dq, fp4, int8, got 'nf5'"],
    ),
    "unknown compute dtype": (
        ["quant=nf4", "quant.compute_dtype=fp8"],
        ["quant.compute_dtype must be one of auto, float32"],
    ),
    "unknown optimizer": (
        ["optim.name=sgd"],
        ["optim.name must be one of adamw, adamw_8bit, paged_adamw_8bit, got 'sgd'"],
    ),
    "full fine-tune of a 4-bit base": (
        ["quant=nf4", "method=full"],
        ["method=full trains every weight, which a quantized base cannot; got quant.method="],
    ),
}
# Sweeps whose group choices name an option that does not exist: refused before any sweep dir is made.
SWEEP_CASES = {
    "basic sweeper": (["rank=r4,r3"], ["rank=r3", "group 'rank'", "r16, r32, r4, r64, r8"]),
    "optuna search space": (
        ["hydra/sweeper=optuna", "rank=choice(r4,r3)", "optim.lr=interval(1e-3,1e-2)"],
        ["command line: rank=r3 is not an option of group 'rank'"],
    ),
    "study grid": (
        ["experiment=rank_study", "hydra.sweeper.params.targets='qv,mlpp'"],
        ["hydra.sweeper.params.targets: targets=mlpp", "all_linear, attention, mlp, qv"],
    ),
}


# Errors Hydra raises while composing the config: only the command shows them (in-process, compose raises).
COMPOSE_CASES = {"unknown group choice", "bad override key"}
# Through the real command as well: one of each kind of mistake.
CLI_CASES = ("unknown group choice", "bad override key", "zero rank", "missing data file")


def _data_files(tmp_path: Path) -> dict[str, str]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    bad_sft = tmp_path / "bad_sft.jsonl"
    bad_sft.write_text('{"prompt": "a", "response": "b", "answer": " "}\n{"prompt": "c", "answer": "d"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a, "response": "b"}\n')
    return {"{bad}": str(bad), "{bad_sft}": str(bad_sft), "{broken}": str(broken)}


def _overrides(name: str, files: dict[str, str]) -> list[str]:
    args = []
    for override in CASES[name][0]:
        for placeholder, path in files.items():
            override = override.replace(placeholder, path)
        args.append(override)
    return args


@pytest.mark.parametrize("name", sorted(set(CASES) - COMPOSE_CASES))
def test_bad_input_stops_the_job_with_one_line_before_any_work(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_lightning.app.run.job import run

    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_LIGHTNING_CACHE", str(cache))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("LORA_LIGHTNING_FULL_ERROR", raising=False)
    out = tmp_path / "run"
    cfg = compose_job(_overrides(name, _data_files(tmp_path)), out)
    with pytest.raises(UsageExit) as raised:
        run(cfg)
    message = raised.value.message
    assert "\n" not in message, f"{name}: more than one line: {message!r}"
    for word in CASES[name][1]:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    assert not out.exists() or not any(out.iterdir()), f"{name}: left {sorted(out.rglob('*'))}"
    assert not cache.exists() or not any(cache.iterdir()), f"{name}: a base was built for a bad input"


@pytest.mark.slow  # subprocesses
def test_bad_input_one_line_no_output(tmp_path: Path) -> None:
    files = _data_files(tmp_path)
    cache = tmp_path / "cache"
    env = {**app_env(cache), "OMP_NUM_THREADS": "1"}
    procs = {}
    for name in CLI_CASES:  # all at once: each fails within its startup time
        # each command in an empty directory of its own, with Hydra's default outputs/<date>/<time>
        run_dir = tmp_path / "runs" / name.replace(" ", "_")
        run_dir.mkdir(parents=True)
        procs[name] = (start_cli(_overrides(name, files), cache, run_dir, env=env), run_dir)
    nested = tmp_path / "mine" / "runs" / "first"  # a run dir whose parents Hydra creates too
    procs["nested run dir"] = (start_cli(["lora.r=0", f"hydra.run.dir={nested}"], cache, tmp_path, env=env), nested)
    for name, (proc, run_dir) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode != 0, f"{name}: exit 0\n{stdout[-2000:]}"
        assert len(lines) == 1, f"{name}: expected one line on stderr, got:\n{stderr}"
        assert lines[0].startswith("lora-lightning: error: "), f"{name}: {lines[0]}"
        for word in CASES.get(name, ((), ["r must be a positive integer"]))[1]:
            assert word in lines[0], f"{name}: {word!r} not in {lines[0]!r}"
        if name == "nested run dir":
            assert not (tmp_path / "mine").exists(), f"{name}: left {sorted(tmp_path.joinpath('mine').rglob('*'))}"
        else:  # the directory the command ran in stays, empty
            assert run_dir.is_dir() and not any(run_dir.iterdir()), f"{name}: left {sorted(run_dir.rglob('*'))}"
    assert not cache.exists() or not any(cache.iterdir()), "no base model may be built for a bad input"


@pytest.mark.slow
def test_bad_sweep_input_one_line_no_sweep_dir(tmp_path: Path) -> None:
    env = {**app_env(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, (overrides, _) in SWEEP_CASES.items():
        sweep_dir = tmp_path / name.replace(" ", "_")
        procs[name] = (
            start_cli(["-m", *overrides, f"hydra.sweep.dir={sweep_dir}"], tmp_path, tmp_path, env),
            sweep_dir,
        )
    for name, (proc, sweep_dir) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and len(lines) == 1, f"{name}: {stderr}\n{stdout[-2000:]}"
        assert lines[0].startswith("lora-lightning: error: "), f"{name}: {lines[0]}"
        for word in SWEEP_CASES[name][1]:
            assert word in lines[0], f"{name}: {word!r} not in {lines[0]!r}"
        assert not sweep_dir.exists(), f"{name}: left {sorted(p.name for p in sweep_dir.rglob('*'))}"


@pytest.mark.slow
def test_a_user_directory_keeps_its_own_files_after_a_bad_input(tmp_path: Path) -> None:
    """hydra.run.dir may be a directory of the user's: only Hydra's own files are taken back."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.log").write_text("my notes")
    (mine / "data.txt").write_text("my data")
    proc = start_cli(["lora.r=0", f"hydra.run.dir={mine}"], tmp_path / "cache", tmp_path)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "r must be a positive integer" in stderr
    assert sorted(p.name for p in mine.iterdir()) == ["data.txt", "notes.log"]
    assert (mine / "notes.log").read_text() == "my notes"


@pytest.mark.slow
def test_full_trace_with_hydra_full_error(tmp_path: Path) -> None:
    env = {**app_env(tmp_path / "cache"), "HYDRA_FULL_ERROR": "1"}
    proc = start_cli(["lora.r=0", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "cache", tmp_path, env=env)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in stderr
    assert "r must be a positive integer, got 0" in stderr


@pytest.mark.slow
@pytest.mark.parametrize("help_flag", ["--help"])
def test_help_lists_the_config_groups(tmp_path: Path, help_flag: str) -> None:
    proc = start_cli([help_flag], tmp_path / "cache", tmp_path)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    for group in (
        "model: hf, tiny_gpt2, tiny_llama",
        "rank: r16, r32, r4, r64, r8",
        "targets: all_linear, attention, mlp, qv",
    ):
        assert group in stdout
