"""Shared test fixtures: every test gets its own data cache and never touches the network."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Generated data go to a per-test cache, so tests never share or leave state."""
    monkeypatch.setenv("SEQ_ARENA_CACHE", str(tmp_path / "cache"))
    yield


# --------------------------------------------------------------------------- the checkout's CLIs

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that must run this checkout's code, not whatever copy of
    the package is installed: the checkout's root first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def cli(module: str, *args: str) -> list[str]:
    """The command line of an entry point of this checkout, e.g. ``cli("harness.train", ...)``
    (``arena-train``); run it with ``env=cli_env()``."""
    return [sys.executable, "-m", module, *args]
