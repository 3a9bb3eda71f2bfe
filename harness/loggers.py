"""Experiment trackers, and the console side of Python logging.

``logger=none`` never imports wandb; ``logger=wandb`` runs offline by default, writing into the
run directory, so nothing ever waits on the network.

Every module logs through ``logging.getLogger(__name__)``. The Hydra apps configure handlers in
``conf/hydra/job_logging/arena.yaml`` (console: INFO and up, warnings and errors on stderr; the
run's log file: DEBUG and up, with time, logger and level); ``arena-report`` uses
``console_handlers`` below, the same console layout without a file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


CONSOLE_FORMAT = "%(message)s"
CONSOLE_WARNING_FORMAT = "%(levelname)s [%(name)s] %(message)s"


class BelowLevel(logging.Filter):
    """Passes records below ``level``: stdout takes what stderr does not (errors stay on stderr)."""

    def __init__(self, level: int | str = logging.WARNING):
        super().__init__()
        self.level = logging.getLevelNamesMapping()[level] if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def console_handlers() -> list[logging.Handler]:
    """stdout for INFO lines as plain text, stderr for warnings and errors with level and logger
    (the console part of conf/hydra/job_logging/arena.yaml, for CLIs that are not Hydra apps)."""
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(logging.INFO)
    out.addFilter(BelowLevel(logging.WARNING))
    out.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter(CONSOLE_WARNING_FORMAT))
    return [out, err]


class NoLogger:
    def log(self, values: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class WandbLogger:
    """One W&B run per training run: resolved config, metrics per evaluation, a final summary."""

    def __init__(self, cfg: DictConfig, *, run_dir: Path, job_type: str, run_id: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.logger.mode == "offline":
            # never reach for the network, not even for a version check
            os.environ.setdefault("WANDB_DISABLE_CODE", "true")
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=cfg.logger.get("group"),
            tags=[str(t) for t in cfg.logger.get("tags") or []],
            job_type=job_type,
            name=f"{cfg.model.name}-{cfg.task.name}-s{cfg.seed}",
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.logger.mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(console="off", x_disable_stats=True),
            reinit="finish_previous",
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "ok" else 1)


def make_logger(cfg: DictConfig, *, run_dir: Path, job_type: str, run_id: str):
    if cfg.logger.name == "none":
        return NoLogger()
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg, run_dir=run_dir, job_type=job_type, run_id=run_id)
    raise ValueError(f"logger must be 'wandb' or 'none', got logger.name={cfg.logger.name!r}")
