"""``arena-bench``: speed and memory of training steps over models x sequence lengths.

    arena-bench model=transformer task.seq_len=4096
    arena-bench -m model=transformer,performer task.seq_len=1024,2048,4096 trainer.batch_size=8
    arena-bench -m experiment=lra_speed_cpu

The keys are arena-train's for the same things (``task.seq_len``, ``trainer.batch_size``,
``trainer.lr``, ``trainer.threads``, ``trainer.precision``, ``trainer.device``, ``model.*``);
bench's own knobs sit under ``bench.`` (conf/bench.yaml). The spellings of before (``seq_len=``,
``dtype=``, ``warmup_steps=`` ...) still work on the command line for a while, with a warning
naming the new key (:data:`RENAMED`).

Each configuration is measured in a fresh subprocess (harness.bench_worker), so an
out-of-memory or a crash becomes a record (``oom``, ``error``, ``timeout``) and one
configuration's memory never leaks into another's. The worker's allocator, threads and affinity
are set up as ``trainer.allocator`` and ``trainer.threads`` say (harness.runtime) and recorded in
``env``.

``bench.rounds=R`` measures each configuration R times, each in a fresh process. In a multirun
the rounds are interleaved: every job measures its first round, then the sweep is measured again
R - 1 times in job order (:class:`ScalingCallback`), so that a slow change of the machine's load
falls on every configuration alike. The record keeps each round (``rounds``) and summarises them:
``speed.step_ms_median`` is the median of the rounds' medians, ``speed.round_ms_min`` /
``round_ms_max`` their spread.

Separate processes differ by 5-13% in step time on a shared 2-core VM, so exponents fitted on
rounds wander by a few hundredths between runs of one sweep. ``bench.paired_cycles=N`` adds a
paired measurement at the multirun's end (:func:`finish_paired`): the jobs of one model that
differ only in ``task.seq_len`` are built in one process and timed alternating, ``N`` cycles of
``bench.paired_steps`` steps per length (harness.bench_worker.measure_paired). Each record keeps
its length's cycle times in ``paired``, and the time exponent is fitted on them
(harness.results.scaling_exponents), so that a change of the machine's speed falls on every
length of a cycle alike. Step times, speed-ups and memory stay those of the separate processes.

At the end of a multirun the scaling exponents of the sweep (harness.results.scaling_exponents,
the report's fit) are written to ``scaling.csv`` in the sweep directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, instantiate_without_name, register_resolvers, result_config
from harness.distributed import world_from_env
from harness.loggers import make_logger, wandb_run_id
from harness.measure import check_precision
from harness.records import (
    config_hash, environment, new_record, now_iso, pick_device, read_record, unusable_config_record,
    write_record,
)
from harness.run_folder import FolderBusy, claim, make_room_for
from harness.runtime import check_allocator, worker_environment
from harness.validation import check_config
from tasks.base import process_alive

log = logging.getLogger(__name__)

# Command-line keys of before arena-bench shared arena-train's vocabulary -> today's keys; main()
# rewrites them (with a warning) before Hydra composes, so run folders and hashes follow the new keys.
RENAMED = {
    "seq_len": "task.seq_len", "batch_size": "trainer.batch_size", "dtype": "trainer.precision",
    "device": "trainer.device", "threads": "trainer.threads", "lr": "trainer.lr",
    "warmup_steps": "bench.untimed_steps", "min_steps": "bench.min_repeats",
    "max_steps": "bench.max_repeats", "min_time_s": "bench.min_time_s",
    "timeout_s": "bench.timeout_s", "memory_limit_mb": "bench.memory_limit_mb",
}
SCALING_FILE = "scaling.csv"


def renamed_overrides(args: list[str]) -> list[str]:
    """``args`` with old override keys (``seq_len=2048``, ``+dtype=bf16``) spelled as today's,
    each logged as a warning; flags and every other override unchanged."""
    out = []
    for arg in args:
        prefix = arg[:len(arg) - len(arg.lstrip("+~"))]
        key, sep, value = arg[len(prefix):].partition("=")
        if key not in RENAMED:
            out.append(arg)
            continue
        new = f"{prefix}{RENAMED[key]}{sep}{value}"
        log.warning("arena-bench: `%s` is an old spelling, read as `%s`; write %s (arena-train's "
                    "key for the same thing); the old one will be removed", key, RENAMED[key], new)
        out.append(new)
    return out


def bench_job(cfg: DictConfig, device: torch.device) -> dict:
    """What the measurement process needs: the model config, the spec at task.seq_len, the settings."""
    check_precision(cfg.trainer.precision)
    task = instantiate_without_name(cfg.task)
    # the spec's length is task.seq_len, the key model configs read (e.g. linformer's projections)
    spec = dataclasses.replace(task.spec, seq_len=cfg.task.seq_len, eval_seq_lens=())
    if spec.kind == "seq2seq":
        spec = dataclasses.replace(spec, target_len=cfg.task.seq_len)
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "spec": dataclasses.asdict(spec),
        "device": str(device),
        "seed": cfg.seed,
        **{k: cfg.trainer[k] for k in ("batch_size", "lr", "threads", "precision")},
        **{k: cfg.trainer.get(k, False) for k in ("compile", "activation_checkpointing")},
        "allocator": cfg.trainer.get("allocator", "tuned"),
        **{k: cfg.bench[k] for k in ("untimed_steps", "min_repeats", "min_time_s", "max_repeats",
                                     "memory_limit_mb")},
    }


TEMP_PREFIX = "arena-bench-"


def remove_dead_bench_temps() -> None:
    """Remove the job folders that killed arena-bench processes left in the temp directory
    (``arena-bench-<pid>-*``, whose process is gone)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = folder.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def run_worker(job: dict, timeout_s: float) -> dict:
    """Measure ``job`` in a fresh Python process; crashes and timeouts become results. The worker
    dies with this process (harness.bench_worker.die_with_parent) and removes the job folder."""
    remove_dead_bench_temps()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps({**job, "parent_pid": os.getpid()}))
        try:
            proc = subprocess.run([sys.executable, "-m", "harness.bench_worker", str(job_path), str(out_path)],
                                  capture_output=True, text=True, timeout=timeout_s,
                                  env=worker_environment(job["allocator"]))
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"measurement exceeded bench.timeout_s={timeout_s}"}
        if out_path.exists():
            return json.loads(out_path.read_text())
        killed = proc.returncode < 0 and -proc.returncode == 9
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"status": "oom" if killed else "error",
                "error": f"measurement process exited with {proc.returncode}" + (f":\n{tail}" if tail else "")}


class Pending(NamedTuple):
    """A job of this multirun with more to measure at its end (:class:`ScalingCallback`). The
    config hash tells its record from that of a later job of the same sweep that took over its
    folder (a swept key the folder name leaves out, e.g. trainer.threads)."""
    run_dir: Path
    chash: str
    cfg: DictConfig
    job: dict


# Jobs of this multirun with rounds still to measure (bench.rounds)
PENDING_ROUNDS: list[Pending] = []
# Ok jobs of this multirun to time again in pairs of lengths (bench.paired_cycles), alike
PENDING_PAIRED: list[Pending] = []


def run_bench(cfg: DictConfig, run_dir: Path, *, defer_rounds: bool = False) -> dict:
    """Measure one configuration into ``run_dir/record.json`` (skipped when already measured).
    ``defer_rounds``: measure only the first of ``bench.rounds`` now; the multirun's end measures
    the others, interleaved with the other jobs' (:func:`finish_rounds`)."""
    with claim(run_dir):
        return run_bench_claimed(cfg, run_dir, defer_rounds=defer_rounds)


def check_bench_settings(cfg: DictConfig) -> None:
    """Refuse a ``trainer.allocator`` or ``bench.rounds`` that arena-bench cannot use."""
    check_allocator(cfg.trainer.get("allocator", "tuned"))
    for key, least in (("rounds", 1), ("paired_cycles", 0), ("paired_steps", 1)):
        value = cfg.bench.get(key, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive integer" if least else "an integer >= 0"
            raise ValueError(f"bench.{key} must be {kind} (conf/bench.yaml), got {value!r}")


def refuse_several_processes(cfg: DictConfig) -> None:
    """arena-bench times one process; DDP is for training (timings of processes sharing a machine
    are not comparable with those of one)."""
    world = world_from_env()
    if world.distributed or (cfg.trainer.get("devices") or 1) > 1:
        size = world.size if world.distributed else cfg.trainer.devices
        raise ValueError(f"arena-bench measures one process, not a world of {size} (trainer.devices="
                         f"{cfg.trainer.get('devices')}, WORLD_SIZE={os.environ.get('WORLD_SIZE', 1)}); "
                         f"run it with trainer.devices=1 and without torchrun")


def run_bench_claimed(cfg: DictConfig, run_dir: Path, *, defer_rounds: bool = False) -> dict:
    try:
        check_config(cfg)
        check_bench_settings(cfg)
        refuse_several_processes(cfg)
        device = pick_device(cfg.trainer.device, key="trainer.device")
    except ValueError as exc:  # a value out of range, or a device this machine lacks
        log.error("%s", exc)
        record = unusable_config_record(cfg, kind="bench", chash=None)
        record.update(error=str(exc), ended_at=record["started_at"], wall_s=0.0)
        write_record(run_dir, record)
        return record
    # result_config leaves trainer.device out (a trained model does not depend on it); a
    # measurement does, so the device measured on is part of a bench record's hash.
    # trainer.allocator is left out of a train run's hash (harness.config.NON_RESULT_TRAINER_KEYS:
    # it does not change what is learnt) but changes what a measurement measures
    result = {**result_config(cfg), "measured_on": str(device),
              "allocator": cfg.trainer.get("allocator", "tuned")}
    chash = config_hash(result)
    existing = make_room_for(run_dir, chash, result)
    if existing and existing["status"] in ("ok", "unsupported") and not cfg.force and (
            existing["status"] == "unsupported" or rounds_measured(existing) >= cfg.bench.rounds):
        log.info("skip %s: already measured (force=true remeasures)", run_dir)
        if existing["status"] == "ok":
            queue_pairing(Pending(run_dir, chash, cfg, bench_job(cfg, device)), defer_rounds)
        return existing
    record = new_record(
        kind="bench", config_hash=chash, model=cfg.model.name, task=cfg.task.name, seed=cfg.seed,
        seq_len=cfg.task.seq_len, batch_size=cfg.trainer.batch_size, env=environment(device),
        config=OmegaConf.to_container(cfg, resolve=True), dtype=cfg.trainer.precision)
    t0 = time.perf_counter()
    try:
        job = bench_job(cfg, device)
    except Exception as exc:  # noqa: BLE001 - e.g. a task that cannot be built at this length
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    else:
        result = run_worker(job, cfg.bench.timeout_s)
    record["env"].update(result.get("env", {}))  # the worker's allocator, threads and affinity
    record["env"]["compile"] = result.get("compile")  # trainer.compile: applied, or why not
    record.update(status=result["status"], error=None if result["status"] == "ok" else result.get("error"),
                  params=result.get("params"), speed=result.get("speed", {}),
                  memory=result.get("memory", {}), rounds=[round_of(result)])
    more = cfg.bench.rounds - 1 if result["status"] == "ok" else 0
    if result["status"] == "ok":
        queue_pairing(Pending(run_dir, chash, cfg, job), defer_rounds)
    if more and defer_rounds:
        PENDING_ROUNDS.append(Pending(run_dir, chash, cfg, job))
        record.update(ended_at=now_iso(), wall_s=time.perf_counter() - t0)
        write_record(run_dir, record)  # a valid record of one round, should the sweep be stopped
        return record
    for _ in range(more):
        add_round(record, run_worker(job, cfg.bench.timeout_s))
    record.update(ended_at=now_iso(), wall_s=time.perf_counter() - t0)
    write_record(run_dir, record)
    log_to_tracker(cfg, run_dir, record)
    return record


def queue_pairing(pending: Pending, in_multirun: bool) -> None:
    """Keep an ok job for the multirun's paired timing of lengths (``bench.paired_cycles``)."""
    if in_multirun and pending.cfg.bench.get("paired_cycles", 0):
        PENDING_PAIRED.append(pending)


def rounds_measured(record: dict) -> int:
    """How many rounds an ok record summarises (1 for records from before bench.rounds)."""
    return len([r for r in record.get("rounds") or [{"status": "ok"}] if r.get("status") == "ok"])


ROUND_SPEED = ("step_ms_median", "step_ms_iqr", "steps_timed")
ROUND_MEMORY = ("peak_bytes", "peak_raw_bytes", "floor_bytes")


def round_of(result: dict) -> dict:
    """One round's entry in a record's ``rounds``: status, its median and IQR, its memory."""
    speed, memory = result.get("speed") or {}, result.get("memory") or {}
    return {"status": result["status"], **{k: speed.get(k) for k in ROUND_SPEED},
            **{k: memory[k] for k in ROUND_MEMORY if k in memory}}


def add_round(record: dict, result: dict) -> None:
    """Add a further round to an ok ``record`` and summarise its ok rounds in ``speed``/``memory``:
    the median of the rounds' medians (and of their IQRs), the lowest and highest round median,
    the memory of the round with the median peak. A failed round is kept in ``rounds`` only."""
    record["rounds"].append(round_of(result))
    ok = [r for r in record["rounds"] if r["status"] == "ok"]
    medians = [r["step_ms_median"] for r in ok]
    median = statistics.median(medians)
    tokens_per_s = record["speed"]["tokens_per_s"] * record["speed"]["step_ms_median"]
    record["speed"].update(
        step_ms_median=median, step_ms_iqr=statistics.median(r["step_ms_iqr"] for r in ok),
        tokens_per_s=tokens_per_s / median, steps_per_s=1e3 / median,
        steps_timed=sum(r["steps_timed"] for r in ok), rounds=len(ok),
        round_ms_min=min(medians), round_ms_max=max(medians))
    middle = sorted(ok, key=lambda r: r.get("peak_bytes", 0))[(len(ok) - 1) // 2]
    record["memory"].update({k: middle[k] for k in ROUND_MEMORY if k in middle})


def finish_rounds() -> None:
    """Measure the rounds the jobs of this multirun left (:data:`PENDING_ROUNDS`), one pass over
    the sweep per round, in job order, and rewrite their records."""
    pending, records = list(PENDING_ROUNDS), {}
    PENDING_ROUNDS.clear()
    for n in range(2, max((cfg.bench.rounds for _, _, cfg, _ in pending), default=1) + 1):
        log.info("bench.rounds: round %d over %d configurations", n, len(pending))
        for run_dir, chash, cfg, job in pending:
            if n > cfg.bench.rounds:
                continue
            try:
                with claim(run_dir):
                    record = records.get(run_dir) or read_record(run_dir)
                    if record is None or record["status"] != "ok":
                        continue
                    if record["config_hash"] != chash:
                        if n == 2:
                            log.warning("bench.rounds: %s now holds another job of this sweep (its "
                                        "folder name leaves out a swept key); the rounds left of "
                                        "config %s are not measured", run_dir, chash)
                        continue
                    t0 = time.perf_counter()
                    add_round(record, run_worker(job, cfg.bench.timeout_s))
                    record.update(ended_at=now_iso(), wall_s=record["wall_s"] + time.perf_counter() - t0)
                    write_record(run_dir, record)
                    records[run_dir] = record
            except FolderBusy as exc:
                log.error("%s", exc)
    for run_dir, chash, cfg, _ in pending:
        if run_dir in records and records[run_dir]["config_hash"] == chash:
            log.info(describe(records[run_dir]))
            log_to_tracker(cfg, run_dir, records[run_dir])


def paired_group(cfg: DictConfig) -> str:
    """What the jobs timed together in one paired process share: their config as written (before
    interpolation, so e.g. linformer's ``${task.seq_len}`` reads alike), except ``task.seq_len``."""
    config = OmegaConf.to_container(cfg, resolve=False)
    config["task"].pop("seq_len", None)
    return json.dumps(config, sort_keys=True, default=str)


def finish_paired() -> None:
    """Time the lengths of each model of this multirun alternating in one process
    (:data:`PENDING_PAIRED`, ``bench.paired_cycles``) and keep each length's cycle times in its
    record's ``paired``. A group whose records hold these times already is skipped (unless
    ``force``); a failed measurement is recorded there as its status and error."""
    groups: dict[str, list[Pending]] = {}
    for pending in sorted(PENDING_PAIRED, key=lambda p: p.cfg.task.seq_len):
        groups.setdefault(paired_group(pending.cfg), []).append(pending)
    PENDING_PAIRED.clear()
    for members in groups.values():
        if len({m.cfg.task.seq_len for m in members}) < 2:
            continue
        try:
            measure_group(members)
        except FolderBusy as exc:
            log.error("%s", exc)


def measure_group(members: list[Pending]) -> None:
    """The paired timing of one model's lengths (:func:`finish_paired`), into their records."""
    cfg = members[0].cfg
    lengths = [m.cfg.task.seq_len for m in members]
    wanted = {"cycles": cfg.bench.paired_cycles, "steps_per_cycle": cfg.bench.paired_steps, "lengths": lengths}
    records = [read_record(m.run_dir) for m in members]
    if any(r is None or r["config_hash"] != m.chash for r, m in zip(records, members)):
        log.warning("bench.paired_cycles: a folder of %s's lengths now holds another job of this sweep "
                    "(its folder name leaves out a swept key); its lengths are not timed in pairs",
                    cfg.model.name)
        return
    if not cfg.force and all(
            (r.get("paired") or {}).get("status") == "ok"
            and {k: r["paired"].get(k) for k in wanted} == wanted for r in records):
        log.info("skip %s's paired lengths %s: already timed (force=true times them again)", cfg.model.name, lengths)
        return
    log.info("bench.paired_cycles: %s at lengths %s, alternating in one process, %d cycles of %d steps",
             cfg.model.name, lengths, cfg.bench.paired_cycles, cfg.bench.paired_steps)
    jobs = [m.job for m in members]
    result = run_worker({"paired": jobs, "cycles": cfg.bench.paired_cycles, "steps": cfg.bench.paired_steps,
                         **{k: jobs[0][k] for k in ("allocator", "threads", "memory_limit_mb")}},
                        cfg.bench.timeout_s * len(jobs))
    if result["status"] != "ok":
        log.warning("bench.paired_cycles: %s at lengths %s: %s (%s); its exponent is fitted on rounds",
                    cfg.model.name, lengths, result["status"], (result.get("error") or "").partition("\n")[0])
    measured_at = now_iso()  # with ``lengths``, what tells the records of one paired process
    for n, member in enumerate(members):
        with claim(member.run_dir):
            record = read_record(member.run_dir)
            if record is None or record["config_hash"] != member.chash:
                continue
            if result["status"] == "ok":
                cycle_ms = result["cycle_ms"][n]
                record["paired"] = {"status": "ok", **wanted, "cycle_ms": cycle_ms,
                                    "step_ms_median": statistics.median(cycle_ms), "measured_at": measured_at}
            else:
                record["paired"] = {"status": result["status"], **wanted, "error": result.get("error")}
            write_record(member.run_dir, record)


def log_to_tracker(cfg: DictConfig, run_dir: Path, record: dict) -> None:
    """The measurement as a W&B run of ``job_type=bench`` (``logger=wandb``; none by default):
    ``speed/...``, ``memory/...``, ``seq_len`` and ``batch_size`` in its summary and one history row."""
    if cfg.logger.name == "none":
        return
    logger = make_logger(cfg, run_dir=run_dir, job_type="bench",
                         run_id=wandb_run_id(run_dir, record["config_hash"]))
    values = {**{f"speed/{k}": v for k, v in record["speed"].items() if isinstance(v, (int, float))},
              **{f"memory/{k}": v for k, v in record["memory"].items() if isinstance(v, (int, float))}}
    logger.log(values, step=0)
    logger.summary({**values, "memory/how": record["memory"].get("how"), "seq_len": record["seq_len"],
                    "batch_size": record["batch_size"], "precision": record.get("dtype"),
                    **{k: record[k] for k in ("kind", "run_id", "config_hash", "params", "wall_s")}})
    logger.finish(record["status"])


def describe(record: dict) -> str:
    head = (f"{record['model']} L={record['seq_len']} B={record['batch_size']} "
            f"{record.get('dtype', 'fp32')}: {record['status']}")
    if record["status"] != "ok":
        return head + (f" ({record['error'].splitlines()[0]})" if record.get("error") else "")
    s, m = record["speed"], record["memory"]
    return (head + f", {s['step_ms_median']:.1f} ms/step (IQR {s['step_ms_iqr']:.1f}), "
            f"{s['tokens_per_s']:,.0f} tokens/s, peak {m['peak_bytes'] / 2**20:,.0f} MiB ({m['how']})"
            + (f", {s['rounds']} rounds {s['round_ms_min']:.1f}-{s['round_ms_max']:.1f} ms"
               if s.get("rounds", 1) > 1 else ""))


def write_scaling(sweep_dir: Path) -> Path | None:
    """The sweep's scaling exponents, fitted as the report fits them, into ``scaling.csv``."""
    # imported here: pandas and scipy.stats (harness.results) took a third of arena-bench's start,
    # and only a multirun's end needs them
    from harness.results import efficiency_cells, load_runs, scaling_exponents

    fits = scaling_exponents(efficiency_cells(load_runs(sweep_dir)))
    if fits.empty:
        return None
    path = Path(sweep_dir) / SCALING_FILE
    columns = ["model", *(c for c in fits.columns if c != "model")]
    fits[columns].to_csv(path, index=False, float_format="%.3f")
    return path


class ScalingCallback(Callback):
    """After a bench multirun: measure the rounds left (``bench.rounds``) and the paired lengths
    (``bench.paired_cycles``), then log and write the scaling exponents of the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        finish_rounds()
        finish_paired()
        path = write_scaling(Path(config.hydra.sweep.dir))
        if path is not None:
            log.info("scaling exponents (log time, log memory vs log L), written to %s:\n%s",
                     path, path.read_text())


@hydra.main(config_path=str(CONF_DIR), config_name="bench", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        log.info(describe(run_bench(cfg, run_dir, defer_rounds=hc.mode == RunMode.MULTIRUN)))
    except FolderBusy as exc:
        log.error("%s", exc)


def main() -> None:
    register_resolvers()
    sys.argv[1:] = renamed_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    # `python -m harness.bench` runs this file as __main__: run the imported module instead, the
    # code the console script runs (its logger is harness.bench, not __main__)
    from harness.bench import main as _main

    _main()
