"""The package as users install it: a wheel built from this checkout carries the configs and the
published numbers, and its entry points run from any working directory with the wheel alone.

The wheel goes into a fresh virtual environment that sees this environment's dependencies
(torch, hydra, ...) through a plain path entry, but not this checkout or its editable install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("seq_arena-*.whl")
    return built


def test_the_wheel_carries_every_config_and_published_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"harness/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    published = {f"harness/published/{p.name}" for p in (ROOT / "results/published").iterdir() if p.is_file()}
    assert configs and configs <= names, sorted(configs - names)[:5]
    assert published and published <= names, sorted(published - names)


def test_the_installed_wheel_trains_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # this environment's packages, as a plain path: its .pth files (the editable install) stay unread
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline",
           "SEQ_ARENA_CACHE": str(tmp_path / "cache")}
    where = subprocess.run([str(python), "-c", "import harness; print(harness.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert str(site) in where and str(ROOT) not in where, where
    train = subprocess.run([str(venv / "bin" / "arena-train"), "trainer=smoke", "logger=none", "trainer.steps=4",
                            "trainer.eval_every=2", "hydra.run.dir=run"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    assert json.loads((elsewhere / "run" / "record.json").read_text())["status"] == "ok"
