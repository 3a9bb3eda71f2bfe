"""Experiment trackers, and the console side of Python logging.

``logger=none`` never imports wandb; ``logger=wandb`` runs offline by default, writing into the
run directory, so nothing ever waits on the network.

What a W&B run holds (the names of state-spaces/s4's runs):

* history: ``train/loss``, ``train/lr``, ``train/tokens_per_s`` every ``trainer.log_every``
  steps; ``val/loss`` and ``val/<metric>`` at each evaluation; ``test/...`` once at the end;
* summary: the record's final values under the same names (``train/loss``, ``val/<metric>`` of
  the last evaluation, ``test/<metric>``), ``best/val/<metric>`` and ``best/step`` (the
  best-on-val checkpoint the test used), ``speed/...``, ``memory/...``, ``status``, ``params``;
* its id is derived from the run folder (and config hash), with ``resume="allow"``: a resumed
  job continues the same W&B run instead of starting another;
* ``job_type`` is ``train`` for arena-train and ``bench`` for arena-bench (``logger=wandb``);
* offline, ``files/config.yaml`` and ``files/wandb-summary.json`` are written into the offline
  run folder, so the folder can be read without W&B's binary ``.wandb`` file.

Every module logs through ``logging.getLogger(__name__)``. The Hydra apps configure handlers in
``conf/hydra/job_logging/arena.yaml`` (console: INFO and up, warnings and errors on stderr; the
run's log file: DEBUG and up, with time, logger and level); ``arena-report`` uses
``console_handlers`` below, the same console layout without a file.
"""

from __future__ import annotations

import hashlib
import json
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


def wandb_run_id(run_dir: str | Path, config_hash: str | None) -> str:
    """The W&B run id of a run folder: the same folder with the same config gives the same id (a
    resumed job continues its W&B run); another config in that folder starts another run."""
    blob = f"{Path(run_dir).resolve()}\0{config_hash}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class WandbLogger:
    """One W&B run per run folder: resolved config, history, a final summary (module docstring)."""

    def __init__(self, cfg: DictConfig, *, run_dir: Path, job_type: str, run_id: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        # wandb's own telemetry posts to its servers and, on a network that drops packets, holds
        # the process at exit long after the run has finished; a user can turn it back on
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        if cfg.logger.mode == "offline":
            os.environ.update(OFFLINE_ENVIRONMENT)
        import wandb

        self._wandb = wandb
        self._cfg = cfg
        self._summary: dict = {}
        self.run = init_run(
            wandb, mode=cfg.logger.mode, timeout_s=cfg.logger.get("timeout_s") or 30.0, run_dir=run_dir,
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=cfg.logger.get("group"),
            tags=[str(t) for t in cfg.logger.get("tags") or []],
            job_type=job_type,
            name=run_name(cfg, job_type),
            id=run_id,
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def summary(self, values: dict) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        for key, value in values.items():
            self.run.summary[key] = value
        self._summary.update(values)

    def finish(self, status: str) -> None:
        self.summary({"status": status})
        if getattr(self.run, "offline", self._cfg.logger.mode == "offline"):  # offline by choice or by fallback
            self.write_offline_files()
        self.run.finish(exit_code=0 if status == "ok" else 1)

    def write_offline_files(self) -> None:
        """``config.yaml`` and ``wandb-summary.json`` in the offline run's ``files/`` folder (the
        names an online run has), readable without W&B; ``wandb sync`` uploads the run itself."""
        files = Path(self.run.dir)
        files.mkdir(parents=True, exist_ok=True)
        (files / "config.yaml").write_text(OmegaConf.to_yaml(self._cfg, resolve=True))
        (files / "wandb-summary.json").write_text(
            json.dumps(self._summary, indent=2, sort_keys=True, default=str) + "\n")


def run_name(cfg: DictConfig, job_type: str) -> str:
    """A W&B display name: model, task and seed for training; model, task and length for bench."""
    if job_type == "bench":
        return f"{cfg.model.name}-{cfg.task.name}-L{cfg.task.seq_len}-b{cfg.trainer.batch_size}"
    return f"{cfg.model.name}-{cfg.task.name}-s{cfg.seed}"


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
