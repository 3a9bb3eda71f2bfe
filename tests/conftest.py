"""Shared test fixtures: every test gets its own data cache and never touches the network."""

import os

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
