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


log = logging.getLogger(__name__)

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


# Offline means no network attempt at all. wandb reads these before any run exists: its process-wide
# setup starts a telemetry exporter (which posts to W&B's servers) unless the mode is offline in the
# environment and error reporting is off, whatever mode `wandb.init` is later given.
OFFLINE_ENVIRONMENT = {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_CODE": "true"}


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
        # wandb's own telemetry posts to its servers and, on a network that drops packets, holds
        # the process at exit long after the run has finished; a user can turn it back on
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        if cfg.logger.mode == "offline":
            os.environ.update(OFFLINE_ENVIRONMENT)
        import wandb

        self._wandb = wandb
        self.run = init_run(
            wandb, mode=cfg.logger.mode, timeout_s=cfg.logger.get("timeout_s") or 30.0, run_dir=run_dir,
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=cfg.logger.get("group"),
            tags=[str(t) for t in cfg.logger.get("tags") or []],
            job_type=job_type,
            name=f"{cfg.model.name}-{cfg.task.name}-s{cfg.seed}",
            id=run_id,
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "ok" else 1)


def init_run(wandb, *, mode: str, timeout_s: float, run_dir: Path, **init_kwargs):
    """``wandb.init`` that never blocks a run for long: offline makes no network attempt; online
    waits at most ``timeout_s`` for W&B (init, and the upload at finish), then goes on offline with
    a warning (``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later)."""
    def init(run_mode: str):
        settings = wandb.Settings(console="off", x_disable_stats=True,
                                  init_timeout=timeout_s, finish_timeout=timeout_s,
                                  x_graphql_timeout_seconds=timeout_s, x_graphql_retry_max=1)
        return wandb.init(mode=run_mode, dir=str(run_dir), settings=settings, reinit="finish_previous",
                          **init_kwargs)

    if mode != "online":
        return init(mode)
    try:
        return init("online")
    except Exception as exc:  # noqa: BLE001 - any failure to reach W&B: keep the run, log offline
        log.warning("W&B could not be reached within logger.timeout_s=%s s (%s: %s); this run logs "
                    "offline into %s/wandb (upload it later with `wandb sync`)", timeout_s,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", run_dir)
        os.environ.update(OFFLINE_ENVIRONMENT)
        wandb.teardown()  # the service still holds the run id of the attempt that timed out
        return init("offline")


def make_logger(cfg: DictConfig, *, run_dir: Path, job_type: str, run_id: str):
    if cfg.logger.name == "none":
        return NoLogger()
    if cfg.logger.name == "wandb":
        try:
            return WandbLogger(cfg, run_dir=run_dir, job_type=job_type, run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - a tracker must never cost a run
            log.warning("W&B could not start (%s: %s); this run goes on without it (its record and "
                        "metrics.jsonl are written as usual)", type(exc).__name__, str(exc).splitlines()[0])
            return NoLogger()
    raise ValueError(f"logger must be 'wandb' or 'none', got logger.name={cfg.logger.name!r}")
