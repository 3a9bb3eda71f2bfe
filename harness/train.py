"""``arena-train``: one training run, or a sweep with ``-m``.

    arena-train model=transformer task=mqar
    arena-train -m model=transformer,mamba task=mqar task.seq_len=256,1024 seed=0,1,2

Every run writes ``record.json`` into its Hydra output directory, whatever happens (see
harness.records). A failed single run exits non-zero with its record written; in a multirun a
failed job is recorded and the sweep goes on (``sweep.fail_fast=true`` stops it instead).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from architectures.layers import UnsupportedTask
from harness.api import build_model, build_task
from harness.config import CONF_DIR, register_resolvers, result_config
from harness.loggers import make_logger
from harness.objectives import tokens_in
from harness.records import (
    FAILED, SCHEMA, atomic_write_text, config_hash, environment, new_run_id, now_iso,
    read_record, write_record,
)
from harness.trainer import CHECKPOINT_FILE, METRICS_FILE, Diverged, TimeLimit, Trainer, seed_everything

# outcomes of the jobs this process ran: (run_dir, status, multirun)
OUTCOMES: list[tuple[Path, str, bool]] = []


class ProgressBar:
    """A tqdm bar with loss, last val metric and tokens/s; silent when disabled."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True,
                            mininterval=0.5)
        self.position = initial

    def update(self, step: int, *, loss: float, val: float | None, tokens_per_s: float | None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.position)
        self.position = step
        postfix = {"loss": f"{loss:.3f}"}
        if val is not None:
            postfix["val"] = f"{val:.3f}"
        if tokens_per_s:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available; use trainer.device=cpu")
    return device


def classify_failure(exc: BaseException) -> str:
    """Map an exception from a run to a record status."""
    if isinstance(exc, Diverged):
        return "diverged"
    if isinstance(exc, TimeLimit):
        return "timeout"
    if isinstance(exc, UnsupportedTask):
        return "unsupported"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    if isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc) or "can't allocate memory" in str(exc)
    ):
        return "oom"
    return "error"


def base_record(cfg: DictConfig, *, run_id: str, chash: str, device: torch.device) -> dict:
    return {
        "schema": SCHEMA, "kind": "train", "run_id": run_id, "config_hash": chash,
        "status": "error", "error": None, "model": cfg.model.name, "task": cfg.task.name,
        "seed": cfg.seed, "seq_len": cfg.task.get("seq_len"), "batch_size": cfg.trainer.batch_size,
        "params": None, "metrics": {}, "speed": {}, "memory": {}, "env": environment(device),
        "started_at": now_iso(), "ended_at": None, "wall_s": None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def config_error_record(cfg: DictConfig, run_dir: Path, exc: Exception) -> dict:
    """The record of a job whose config cannot even be resolved: status error, config as written."""
    now = now_iso()
    record = {
        "schema": SCHEMA, "kind": "train", "run_id": new_run_id(), "config_hash": None, "status": "error",
        "error": f"the config could not be resolved: {type(exc).__name__}: {exc}\n{traceback.format_exc()}",
        "model": OmegaConf.select(cfg, "model.name", default=None, throw_on_resolution_failure=False),
        "task": OmegaConf.select(cfg, "task.name", default=None, throw_on_resolution_failure=False),
        "seed": OmegaConf.select(cfg, "seed", default=None, throw_on_resolution_failure=False),
        "seq_len": None, "batch_size": None, "params": None, "metrics": {}, "speed": {}, "memory": {},
        "env": environment(torch.device("cpu")), "started_at": now, "ended_at": now, "wall_s": 0.0,
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    write_record(run_dir, record)
    return record


def should_skip(cfg: DictConfig, run_dir: Path, chash: str, multirun: bool) -> dict | None:
    """The existing record when this job needs no rerun (same config already done)."""
    existing = read_record(run_dir)
    if cfg.force:
        # a forced rerun starts from scratch: no resuming from the finished run's checkpoint
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        return None
    if existing is None:
        return None
    if existing.get("config_hash") != chash:
        # the directory held a different config: keep its record aside and start afresh
        stale = run_dir / f"record.superseded-{existing.get('config_hash')}.json"
        (run_dir / "record.json").rename(stale)
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        print(f"[arena] {run_dir}: config changed; old record kept as {stale.name}", flush=True)
        return None
    if existing["status"] in ("ok", "unsupported"):
        return existing
    if existing["status"] in FAILED and multirun and not cfg.sweep.retry_failed:
        return existing
    return None


def run_experiment(cfg: DictConfig, run_dir: Path, *, multirun: bool = False) -> dict:
    """Train and test one configuration into ``run_dir``; always returns (and writes) a record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in run_dir.glob(".*.tmp"):  # a write cut short by a kill; the final file is intact
        leftover.unlink(missing_ok=True)
    try:
        chash = config_hash(result_config(cfg))
    except Exception as exc:  # noqa: BLE001 - e.g. an interpolation that does not resolve
        return config_error_record(cfg, run_dir, exc)
    skipped = should_skip(cfg, run_dir, chash, multirun)
    if skipped is not None:
        how = "sweep.retry_failed=true or force=true" if skipped["status"] in FAILED else "force=true"
        print(f"[arena] skip {run_dir}: it holds a {skipped['status']} record of the same config "
              f"(config_hash {chash}); {how} reruns it", flush=True)
        return skipped
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = pick_device(cfg.trainer.device)
    run_id = f"{chash}-{new_run_id()}"
    record = base_record(cfg, run_id=run_id, chash=chash, device=device)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.perf_counter()
    logger, trainer, bar = None, None, None
    try:
        seed_everything(cfg.seed)
        task = build_task(cfg)
        model = build_model(cfg, task)
        record["params"] = sum(p.numel() for p in model.parameters())
        logger = make_logger(cfg, run_dir=run_dir, job_type="train", run_id=run_id)
        trainer = Trainer(model=model, task=task, trainer_cfg=cfg.trainer, seed=cfg.seed,
                          device=device, run_dir=run_dir, logger=logger)
        trainer.maybe_resume()
        if trainer.resumed_from is not None:
            print(f"[arena] resuming {run_dir} from step {trainer.resumed_from}", flush=True)
        bar = ProgressBar(cfg.trainer.steps, trainer.state.step,
                          f"{cfg.model.name}/{cfg.task.name}", cfg.trainer.progress)
        trainer.fit(bar)
        record["status"] = "ok"
    except KeyboardInterrupt:
        raise  # interrupted, not finished: the checkpoint lets a rerun resume
    except BaseException as exc:  # noqa: BLE001 - every outcome gets a record
        record["status"] = classify_failure(exc)
        record["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        if bar is not None:
            bar.close()
    if trainer is not None:
        finish_metrics(trainer, record)
    record["ended_at"] = now_iso()
    record["wall_s"] = time.perf_counter() - started
    write_record(run_dir, record)
    if logger is not None:
        logger.summary(wandb_summary(record))
        logger.finish(record["status"])
    return record


def wandb_summary(record: dict) -> dict:
    """The record's results as a flat W&B summary (read back by harness.wandb_runs)."""
    summary = {k: v for k, v in record["metrics"].items() if v is not None}
    summary.update({f"speed/{k}": v for k, v in record["speed"].items() if v is not None})
    summary.update({f"memory/{k}": v for k, v in record["memory"].items() if v is not None})
    summary.update({k: record[k] for k in ("status", "kind", "config_hash", "params", "wall_s")})
    return summary


def finish_metrics(trainer: Trainer, record: dict) -> None:
    """Test with the best-val weights when training got that far; fill metrics/speed/memory."""
    record["metrics"] = trainer.summary_metrics()
    record["speed"] = trainer.timer.summary(tokens_per_step(trainer))
    record["memory"] = trainer.memory.stop()
    if record["status"] in ("ok", "timeout") and trainer.state.best_weights is not None:
        try:
            record["metrics"].update(trainer.test())
        except Exception as exc:  # noqa: BLE001 - a failed test pass must not lose training
            record["status"] = classify_failure(exc)
            record["error"] = f"during test: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def tokens_per_step(trainer: Trainer) -> int:
    return tokens_in(trainer.train_set[torch.arange(trainer.cfg.batch_size)])


def report(record: dict, run_dir: Path) -> None:
    metrics = record.get("metrics") or {}
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                      if k.startswith(("val_", "test_")) and isinstance(v, float))
    speed = record.get("speed") or {}
    tps = speed.get("tokens_per_s")
    print(f"[arena] {record['model']} on {record['task']}: status={record['status']}"
          + (f", {shown}" if shown else "") + (f", {tps:,.0f} tokens/s" if tps else ""), flush=True)
    if record["status"] not in ("ok", "unsupported") and record.get("error"):
        print(f"[arena] error: {record['error'].splitlines()[0]}", file=sys.stderr, flush=True)
    print(f"[arena] record: {run_dir / 'record.json'}", flush=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    if multirun and cfg.sweep.fail_fast and any(s in FAILED for _, s, m in OUTCOMES if m):
        print(f"[arena] not started {run_dir}: an earlier job failed and sweep.fail_fast is set", flush=True)
        return None
    record = run_experiment(cfg, run_dir, multirun=multirun)
    report(record, run_dir)
    OUTCOMES.append((run_dir, record["status"], multirun))
    if multirun and cfg.sweep.fail_fast and record["status"] in FAILED:
        raise RuntimeError(f"sweep.fail_fast: job in {run_dir} ended with status {record['status']}")
    # the value an optimising sweeper (hydra/sweeper=optuna) sees: the best validation metric
    return next((v for k, v in record["metrics"].items() if k.startswith("val_")), None)


def main() -> None:
    register_resolvers()
    hydra_main()
    failed = [(d, s) for d, s, multirun in OUTCOMES if not multirun and s in FAILED]
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
