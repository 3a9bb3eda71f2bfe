"""The Python API for notebooks and tests: the same composition as the CLI, no run directory."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from harness.config import CONF_DIR, instantiate_without_name, register_resolvers


@dataclass
class Built:
    """A composed config with its task and model."""

    cfg: DictConfig
    task: object
    model: nn.Module


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style ``overrides``."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def build_task(cfg: DictConfig):
    return instantiate_without_name(cfg.task)


def build_model(cfg: DictConfig, task) -> nn.Module:
    """Instantiate ``cfg.model`` for ``task.spec``; raises UnsupportedTask for a bad pairing."""
    return instantiate_without_name(cfg.model, spec=task.spec)


def build(overrides: list[str] | None = None) -> Built:
    """Compose the config as ``arena-train`` would and build its task and model.

    Example (a doctest, run by tests/test_contract.py):
        >>> built = build(["model=transformer", "task=mqar", "task.n_train=64", "task.n_val=16",
        ...                "task.n_test=16"])
        >>> batch = built.task.dataset("train")[[0, 1]]
        >>> built.model(batch).shape  # logits (B, L, V): MQAR asks for a value at every position
        torch.Size([2, 128, 256])
    """
    cfg = compose_config(overrides)
    task = build_task(cfg)
    return Built(cfg=cfg, task=task, model=build_model(cfg, task))
