"""The ``lora-lightning`` command: a Hydra app that fine-tunes a causal LM with LoRA.

``lora-lightning`` runs the default job (tiny Llama, rank 8, all linear layers, stdlib code);
``lora-lightning -m rank=r4,r8 targets=qv,all_linear`` sweeps. The configs are found inside the
installed package (``lora_lightning/conf``, put there by the wheel build) or, in a source checkout,
in the repository's top-level ``conf/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lora_lightning.app.console import library_noise
from lora_lightning.app.errors import PROG, USER_FULL_ERROR_ENV, UsageExit, full_error_requested, one_line
from lora_lightning.app.run.job import run
from lora_lightning.app.sweep.callback import report_after_error

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    """The directory holding ``config.yaml`` and the config groups.

    A wheel ships the configs as ``lora_lightning/conf``; a source checkout (or an editable
    install, which points into it) has them at the repository root as ``conf/``.
    """
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"lora-lightning's configs are missing: neither {_PACKAGE_DIR / 'conf'} nor {_PACKAGE_DIR.parent / 'conf'} "
        "holds config.yaml; reinstall the package"
    )


def _hydra_main() -> None:

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def task(cfg: DictConfig) -> float:
        with library_noise(bool(cfg.get("verbose", False))):
            return run(cfg)

    task()


def _is_config_error(error: BaseException) -> bool:
    """Errors of composition or overrides (unknown group choice, bad syntax, missing key)."""

    return isinstance(error, (HydraException, OmegaConfBaseException))


def _config_error_text(error: BaseException) -> str:
    """The message of a config error and of its causes (Hydra often wraps an OmegaConf error)."""
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(parts) < 3:
        text = one_line(str(seen))
        if text and all(text not in part for part in parts):
            parts.append(text)
        seen = seen.__cause__
    return "; ".join(parts) or type(error).__name__


def main() -> None:
    """Entry point of the console script and of ``python -m lora_lightning``."""
    # Hydra prints its own stripped traceback unless HYDRA_FULL_ERROR is set; set it so every
    # error reaches this function, which prints one line for a user's mistake. Whether the user
    # asked for full traces is remembered for the jobs (joblib/submitit workers inherit it).
    os.environ.setdefault(USER_FULL_ERROR_ENV, os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except UsageExit as exit_:
        print(f"{PROG}: error: {exit_.message}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:
        if full_error_requested():
            raise

        # A multirun whose sweeper stopped with an error still gets its report (None: not a sweep).
        message = report_after_error(error)
        if message is None and not _is_config_error(error):
            raise
        print(f"{PROG}: error: {message or _config_error_text(error)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
