"""``arena-train``: one training run, or a sweep with ``-m``.

    arena-train model=transformer task=mqar
    arena-train -m model=transformer,mamba task=mqar task.seq_len=256,1024 seed=0,1,2

Every run writes ``record.json`` into its Hydra output directory, whatever happens (see
harness.records). A failed single run exits non-zero with its record written; in a multirun a
failed job is recorded and the sweep goes on (``sweep.fail_fast=true`` stops it instead).

Output goes through ``logging`` (conf/hydra/job_logging/arena.yaml): the console shows what a
user needs, a failure's whole message included; the run's ``train.log`` also keeps the
evaluations, and the traceback of a failure (which record.json holds as well).
"""

from __future__ import annotations

import logging
import subprocess
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
from harness.loggers import make_logger, wandb_run_id
from harness.objectives import tokens_in
from harness.records import (
    CHECKPOINT_FILE, CONFIG_FILE, FAILED, METRICS_FILE, RECORD_FILE, atomic_write_text, config_hash,
    environment, is_out_of_memory, new_record, now_iso, pick_device, read_record, unusable_config_record,
    write_record,
)
from harness.distributed import World, broadcast, device_of, gather, start, world_from_env
from harness.loggers import NoLogger
from harness.run_folder import FolderBusy, claim, make_room_for
from harness.runtime import configure_process
from harness.trainer import Diverged, TimeLimit, Trainer, seed_everything
from harness.validation import check_config

log = logging.getLogger(__name__)

# outcomes of the jobs this process ran: (run_dir, status, multirun)
OUTCOMES: list[tuple[Path, str, bool]] = []
BUSY = "busy"  # the outcome of a job whose folder another process holds (no record: not ours)


def start_process_group(world: World, cfg: DictConfig) -> None:
    """Join the DDP process group (NCCL when the run asks for CUDA and has it, else gloo)."""
    if world.distributed:
        wants_cuda = str(cfg.trainer.device).startswith("cuda") or (
            cfg.trainer.device == "auto" and torch.cuda.is_available())
        start(world, torch.device("cuda" if wants_cuda else "cpu"))


def detach_file_logging(run_dir: Path) -> None:
    """Stop writing log lines into ``run_dir`` (Hydra opened its train.log for this job)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()


class ProgressBar:
    """A tqdm bar with loss, last val metric and tokens/s. Each evaluation is also a log line: in
    the log file only under a bar, on the console too when the bar is off (``trainer.progress=false``,
    e.g. a batch job's output file)."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True,
                            mininterval=0.5)
        self.total = total
        self.description = description
        self.position = initial

    def update(self, step: int, *, loss: float, val: float | None, tokens_per_s: float | None,
               evaluated: bool = False) -> None:
        if evaluated:
            log.log(logging.DEBUG if self.bar is not None else logging.INFO,
                    "%s step %d/%d: train loss %.4f, val %s, %s tokens/s", self.description, step,
                    self.total, loss, "-" if val is None else f"{val:.4f}",
                    f"{tokens_per_s:,.0f}" if tokens_per_s else "-")
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
            self.bar = None


def classify_failure(exc: BaseException) -> str:
    """Map an exception from a run to a record status."""
    if isinstance(exc, Diverged):
        return "diverged"
    if isinstance(exc, TimeLimit):
        return "timeout"
    if isinstance(exc, UnsupportedTask):
        return "unsupported"
    return "oom" if is_out_of_memory(exc) else "error"


def record_failure(record: dict, exc: BaseException, *, context: str = "") -> None:
    """Put a failure into the record (status; error: message and traceback) and tell the user:
    the whole message on the console and in the log, the traceback in the log file only."""
    message = f"{context}{type(exc).__name__}: {exc}"
    record["status"] = classify_failure(exc)
    record["error"] = f"{message}\n{''.join(traceback.format_exception(exc))}"
    if record["status"] == "unsupported":
        log.warning("%s", message)
    else:
        log.error("%s", message)
    log.debug("traceback of the failure above", exc_info=exc)


def base_record(cfg: DictConfig, *, chash: str, device: torch.device) -> dict:
    return new_record(
        kind="train", config_hash=chash, model=cfg.model.name, task=cfg.task.name, seed=cfg.seed,
        seq_len=cfg.task.get("seq_len"), batch_size=cfg.trainer.batch_size, env=environment(device),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def config_error_record(cfg: DictConfig, run_dir: Path, exc: Exception, *, chash: str | None = None,
                        context: str = "the config could not be resolved: ", write: bool = True) -> dict:
    """The record of a job whose config cannot be used (it does not resolve, or a value is out of
    range): status error, the config as written, the message naming the keys."""
    record = unusable_config_record(cfg, kind="train", chash=chash)
    record_failure(record, exc, context=context)
    record.update(status="error", ended_at=record["started_at"], wall_s=0.0)
    if write:
        write_record_or_say_why(run_dir, record)
    return record


def write_record_or_say_why(run_dir: Path, record: dict) -> None:
    """Write the record; when even that fails (a full disk), say so rather than crash the sweep."""
    try:
        write_record(run_dir, record)
    except OSError as exc:
        log.error("could not write %s: %s", run_dir / RECORD_FILE, exc)
        log.debug("why", exc_info=exc)


def should_skip(cfg: DictConfig, run_dir: Path, existing: dict | None, multirun: bool) -> dict | None:
    """``existing`` (the folder's record of this same config, harness.run_folder.make_room_for)
    when this job needs no rerun."""
    if cfg.force:
        # a forced rerun starts from scratch: no resuming from the finished run's checkpoint
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        return None
    if existing is None:
        return None
    if existing["status"] in ("ok", "unsupported"):
        return existing
    if existing["status"] in FAILED and multirun and not cfg.sweep.retry_failed:
        return existing
    return None


def run_experiment(cfg: DictConfig, run_dir: Path, *, multirun: bool = False, world: World = World()) -> dict:
    """Train and test one configuration into ``run_dir``; always returns (and writes) a record.
    Under DDP every rank trains and rank 0 alone holds and writes the folder.

    Raises:
        FolderBusy: another process is writing ``run_dir``; nothing was written there.
    """
    if not world.is_main:
        return run_claimed(cfg, run_dir, multirun=multirun, world=world)
    with claim(run_dir):
        return run_claimed(cfg, run_dir, multirun=multirun, world=world)


def prepare_folder(cfg: DictConfig, run_dir: Path, chash: str, result: dict, multirun: bool) -> dict | None:
    """Rank 0's part before training: clear leftovers and other configurations' runs; the record
    of a finished run of this configuration when it needs no rerun."""
    for leftover in run_dir.glob(".*.tmp"):  # a write cut short by a kill (the folder is ours)
        leftover.unlink(missing_ok=True)
    return should_skip(cfg, run_dir, make_room_for(run_dir, chash, result), multirun)


def run_claimed(cfg: DictConfig, run_dir: Path, *, multirun: bool, world: World = World()) -> dict:
    try:
        result = result_config(cfg)
        chash = config_hash(result)
    except Exception as exc:  # noqa: BLE001 - e.g. an interpolation that does not resolve
        return config_error_record(cfg, run_dir, exc, write=world.is_main)
    skipped = prepare_folder(cfg, run_dir, chash, result, multirun) if world.is_main else None
    skipped = broadcast(skipped, world)  # every rank skips, or none
    if skipped is not None:
        how = "sweep.retry_failed=true or force=true" if skipped["status"] in FAILED else "force=true"
        log.info("skip %s: it holds a %s record of the same config (config_hash %s); %s reruns it",
                 run_dir, skipped["status"], chash, how)
        if skipped["status"] in FAILED and skipped.get("error"):
            log.warning("its recorded error: %s", skipped["error"].splitlines()[0])
        return skipped
    try:
        check_config(cfg)
        device = device_of(world, pick_device(cfg.trainer.device, key="trainer.device"))
    except ValueError as exc:
        return config_error_record(cfg, run_dir, exc, chash=chash, context="", write=world.is_main)
    # every training process (each DDP rank too) sets its allocator and threads up the same way
    # as arena-bench's measurement processes, and records them (harness/runtime.py)
    runtime = configure_process(allocator=cfg.trainer.get("allocator", "tuned"), threads=cfg.trainer.threads)
    record = base_record(cfg, chash=chash, device=device)
    record["env"].update(runtime)
    record["env"]["world_size"] = world.size
    started = time.perf_counter()
    logger, trainer, bar = None, None, None
    try:
        if world.is_main:
            atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        seed_everything(cfg.seed)  # every rank builds the same model
        task = build_task(cfg)
        model = build_model(cfg, task)
        record["params"] = sum(p.numel() for p in model.parameters())
        log.debug("%s on %s: %s parameters, %d steps on %s, into %s", cfg.model.name, cfg.task.name,
                  f"{record['params']:,}", cfg.trainer.steps, device, run_dir)
        logger = make_logger(cfg, run_dir=run_dir, job_type="train",
                             run_id=wandb_run_id(run_dir, chash)) if world.is_main else NoLogger()
        trainer = Trainer(model=model, task=task, trainer_cfg=cfg.trainer, seed=cfg.seed,
                          device=device, run_dir=run_dir, logger=logger, world=world)
        trainer.maybe_resume()
        if trainer.resumed_from is not None:
            log.info("resuming %s from step %d", run_dir, trainer.resumed_from)
        bar = ProgressBar(cfg.trainer.steps, trainer.state.step,
                          f"{cfg.model.name}/{cfg.task.name}", cfg.trainer.progress and world.is_main)
        trainer.fit(bar)
        record["status"] = "ok"
    except KeyboardInterrupt:
        raise  # interrupted, not finished: the checkpoint lets a rerun resume
    except BaseException as exc:  # noqa: BLE001 - every outcome gets a record
        if bar is not None:
            bar.close()  # before the error lines, so they do not land inside the bar
        record_failure(record, exc)
    finally:
        if bar is not None:
            bar.close()
    if trainer is not None:
        finish_metrics(trainer, record)
        if world.distributed:
            distributed_measurements(trainer, record, cfg)
    record["ended_at"] = now_iso()
    record["wall_s"] = time.perf_counter() - started
    if not world.is_main:
        return record
    write_record_or_say_why(run_dir, record)
    if logger is not None:
        last_val = trainer.state.last_val if trainer is not None else None
        summary = wandb_summary(record, last_val=last_val)
        tests = {k: v for k, v in summary.items() if k.startswith("test/")}
        if tests and trainer is not None:
            logger.log(tests, step=trainer.state.step)  # test values in the history too
        logger.summary(summary)
        logger.finish(record["status"])
    return record


def distributed_measurements(trainer: Trainer, record: dict, cfg: DictConfig) -> None:
    """Under DDP: each rank's step time and peak memory, and the total, in ``record["distributed"]``.
    The record's ``speed`` is kept only with ``trainer.ddp_timing=true``: timings of several
    processes sharing a machine are not comparable with single-process ones."""
    mine = {"rank": trainer.world.rank, "step_ms_median": record["speed"].get("step_ms_median"),
            "peak_bytes": record["memory"].get("peak_bytes")}
    ranks = gather(mine, trainer.world)
    peaks = [r["peak_bytes"] for r in ranks if r["peak_bytes"] is not None]
    record["distributed"] = {"world_size": trainer.world.size, "per_rank": ranks,
                             "peak_bytes_total": sum(peaks) if peaks else None}
    if not cfg.trainer.get("ddp_timing", False):
        record["speed"] = {key: None for key in record["speed"]}


def launch_ranks(cfg: DictConfig, run_dir: Path) -> dict:
    """``trainer.devices=N``: run this job as N DDP processes (torchrun on this machine) and return
    the record rank 0 wrote."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.trainer.devices}", "-m", "harness.train", *overrides,
               f"hydra.run.dir={run_dir}"]
    log.info("%s: %d processes (torchrun), rank 0 writes the record", run_dir, cfg.trainer.devices)
    done = subprocess.run(command)
    record = read_record(run_dir)
    if record is None:
        error = RuntimeError(f"the {cfg.trainer.devices} DDP processes exited with {done.returncode} and "
                             f"wrote no record; see {run_dir / 'train.log'}")
        return config_error_record(cfg, run_dir, error, context="")
    return record


def wandb_summary(record: dict, *, last_val: dict | None = None) -> dict:
    """The record's results as a flat W&B summary, under the names of the run's history
    (harness.loggers): read back by harness.wandb_runs.record_from_run.

    Args:
        record: the finished run's record.
        last_val: the latest evaluation's ``loss`` and ``metric`` (``val/...`` in the summary).
    """
    metrics = record.get("metrics") or {}
    metric = next((k[4:] for k in metrics if k.startswith("val_") and k != "val_loss"), None)
    summary = {
        "train/loss": metrics.get("final_train_loss"), "train/steps": metrics.get("steps"),
        "best/step": metrics.get("best_step"),
        **{f"test/{k[5:]}": v for k, v in metrics.items() if k.startswith("test_")},
        **{f"speed/{k}": v for k, v in record["speed"].items()},
        **{f"memory/{k}": v for k, v in record["memory"].items()},
        **{k: record.get(k) for k in ("status", "kind", "run_id", "config_hash", "params", "wall_s")},
    }
    if metric is not None:
        summary[f"best/val/{metric}"] = metrics[f"val_{metric}"]
        if last_val is not None:
            summary.update({"val/loss": last_val["loss"], f"val/{metric}": last_val["metric"]})
    return {k: v for k, v in summary.items() if v is not None}


def finish_metrics(trainer: Trainer, record: dict) -> None:
    """Test with the best-val weights when training got that far; fill metrics/speed/memory."""
    record["metrics"] = trainer.summary_metrics()
    record["speed"] = trainer.timer.summary(tokens_per_step(trainer))
    record["memory"] = trainer.memory.stop()
    record["env"]["compile"] = trainer.compiler.status()  # trainer.compile: applied, or why not
    if record["status"] in ("ok", "timeout") and trainer.state.best_weights is not None:
        try:
            record["metrics"].update(trainer.test())
        except Exception as exc:  # noqa: BLE001 - a failed test pass must not lose training
            record_failure(record, exc, context="during test: ")


def tokens_per_step(trainer: Trainer) -> int:
    return tokens_in(trainer.train_set[torch.arange(trainer.cfg.batch_size)])


def report(record: dict, run_dir: Path) -> None:
    """The run's outcome in two lines (a failure's message was logged when it happened)."""
    metrics = record.get("metrics") or {}
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                      if k.startswith(("val_", "test_")) and isinstance(v, float))
    speed = record.get("speed") or {}
    tps = speed.get("tokens_per_s")
    log.info("%s on %s: status=%s%s%s", record["model"], record["task"], record["status"],
             f", {shown}" if shown else "", f", {tps:,.0f} tokens/s" if tps else "")
    log.info("record: %s", run_dir / RECORD_FILE)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    if multirun and cfg.sweep.fail_fast and any(s in FAILED for _, s, m in OUTCOMES if m):
        log.warning("not started %s: an earlier job failed and sweep.fail_fast is set", run_dir)
        return None
    world = world_from_env()
    devices = cfg.trainer.get("devices") or 1
    if not world.is_main:  # rank 0 tells the user and writes the folder's log
        detach_file_logging(run_dir)
        for name in ("", "harness"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if devices > 1 and not world.distributed:
            record = launch_ranks(cfg, run_dir)
        else:
            start_process_group(world, cfg)
            record = run_experiment(cfg, run_dir, multirun=multirun, world=world)
    except FolderBusy as exc:
        detach_file_logging(run_dir)  # the folder's log belongs to the process that holds it
        log.error("%s", exc)
        OUTCOMES.append((run_dir, BUSY, multirun))
        return None
    if world.is_main:
        report(record, run_dir)
    OUTCOMES.append((run_dir, record["status"], multirun))
    if multirun and cfg.sweep.fail_fast and record["status"] in FAILED:
        raise RuntimeError(f"sweep.fail_fast: job in {run_dir} ended with status {record['status']}")
    # the value an optimising sweeper (hydra/sweeper=optuna) sees: the best validation metric
    return next((v for k, v in record["metrics"].items() if k.startswith("val_")), None)


def main() -> None:
    register_resolvers()
    hydra_main()
    failed = [(d, s) for d, s, multirun in OUTCOMES if not multirun and s in (*FAILED, BUSY)]
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    # `python -m harness.train` runs this file as __main__: run the imported module instead, the code
    # the console script runs (logger names under harness, Hydra's job name, pickled callables)
    from harness.train import main as _main

    _main()
