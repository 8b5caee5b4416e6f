"""The built wheel ships the Hydra configs, and an installed (non-editable) copy runs outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.app_support import REPO, SHORT, TINY_LLAMA, app_env, read_summary

pytestmark = pytest.mark.slow


def test_installed_wheel_finds_its_configs_and_runs(cache_dir: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob("lora_lightning-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    assert configs and all(f"lora_lightning/conf/{c}" in shipped for c in configs)
    # hydra/sweeper=study: Hydra finds sweepers only in the hydra_plugins namespace.
    assert "hydra_plugins/lora_lightning_study/study_sweeper.py" in shipped
    assert "hydra_plugins/__init__.py" not in shipped  # a namespace shared with Hydra's other plugins
    (entry_points,) = [name for name in shipped if name.endswith(".dist-info/entry_points.txt")]
    assert (
        "lora-lightning-report = lora_lightning.app.sweep.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )

    # Install the wheel alone into a target dir (dependencies come from this environment),
    # and run from a directory that has no conf/ and no source checkout.
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**app_env(cache_dir), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import lora_lightning.app.cli as m; print(m.__file__); print(m.config_dir())"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    module_file, conf = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(conf) == site / "lora_lightning" / "conf"

    # The console script pip wrote runs a real (shrunk) job with the packaged configs.
    script = site / "bin" / "lora-lightning"
    assert os.access(script, os.X_OK) and os.access(site / "bin" / "lora-lightning-report", os.X_OK)
    out = elsewhere / "run"
    args = [*TINY_LLAMA, *SHORT, "logger=none", "trainer.max_steps=2", f"hydra.run.dir={out}"]
    proc = subprocess.run([str(script), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out)
    assert summary["steps"] == 2 and Path(summary["paths"]["merged"]).is_dir()
    # The job's recorded config came from the packaged conf/.
    hydra_cfg = (out / ".hydra" / "hydra.yaml").read_text()
    assert f"config_dir: {conf}" in hydra_cfg or str(conf) in hydra_cfg
