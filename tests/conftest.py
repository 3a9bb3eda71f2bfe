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


def assert_an_lm_step_reaches_every_parameter(built, seq_len: int) -> None:
    """One forward and backward of a built (model, task) on three training examples of an lm task:
    logits of the task's shape, and a finite gradient on every parameter but the ``norm2`` the
    backbone builds even without a feed-forward (d_ff 0: unused, so no gradient)."""
    import torch.nn.functional as F

    model = built.model
    batch = {k: v.long() for k, v in built.task.dataset("train")[[0, 1, 2]].items()}
    logits = model(batch)
    assert logits.shape == (3, seq_len, built.task.spec.n_outputs)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    loss.backward()
    used = [(n, p) for n, p in model.named_parameters() if ".norm2." not in n]
    missing = [n for n, p in used if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


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
