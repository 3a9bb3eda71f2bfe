"""Sweep glue: the end-of-sweep summary and launcher checks, as Hydra callbacks.

Hydra's launchers (basic, joblib, submitit) and sweepers (basic, optuna) do the scheduling;
this module only reads back what the jobs recorded. Its lines go to the console through
``logging``: the per-job line inside the job (so also into that job's log file), the summary and
the launcher warning outside any job (conf/hydra/hydra_logging/arena.yaml).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.records import RECORD_FILE, parse_record

log = logging.getLogger(__name__)


def sweep_records(sweep_dir: Path) -> list[dict]:
    """The valid records of a sweep (a bad one is named in a warning; runs set aside are skipped)."""
    records = []
    for path in sorted(Path(sweep_dir).rglob(RECORD_FILE)):
        if any(part.startswith(".") for part in path.relative_to(sweep_dir).parts[:-1]):
            continue  # .superseded-*: runs of an earlier configuration
        record, problem = parse_record(path)
        if problem is not None:
            log.warning("%s: %s", path, problem)
            continue
        records.append({**record, "run_dir": str(path.parent)})
    return records


def summary_lines(records: list[dict], limit: int = 30) -> list[str]:
    """Counts by status and a short table of results, one line per job."""
    counts = Counter(r.get("status") for r in records)
    lines = [f"sweep summary: {len(records)} records: "
             + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))]
    header = f"{'model':<20} {'task':<18} {'seed':>4} {'status':<11} {'val':>8} {'test':>8}  run"
    lines.append(header)
    for r in records[:limit]:
        metrics = r.get("metrics") or {}
        val = next((v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, float)), None)
        test = next((v for k, v in metrics.items() if k.startswith("test_") and k != "test_loss"
                     and "_len" not in k and isinstance(v, float)), None)
        fmt = lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}"  # noqa: E731
        lines.append(f"{r.get('model', '?'):<20} {r.get('task', '?'):<18} {str(r.get('seed', '')):>4} "
                     f"{r.get('status', '?'):<11} {fmt(val)} {fmt(test)}  {Path(r['run_dir']).name}")
    if len(records) > limit:
        lines.append(f"... and {len(records) - limit} more (arena-report for the full tables)")
    return lines


def count_jobs(config: DictConfig) -> int | None:
    """Jobs a basic multirun will launch: the product of the sweep sizes on the command line and
    in ``hydra.sweeper.params``; None for sweepers that decide as they go (e.g. Optuna)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    strings = list(config.hydra.overrides.task)
    params = sweeper.get("params") or {}
    overridden = {s.split("=", 1)[0].lstrip("+~") for s in strings}
    strings += [f"{key}={value}" for key, value in params.items() if key not in overridden]
    total = 1
    for override in OverridesParser.create().parse_overrides(strings):
        if override.is_sweep_override():
            total *= len(list(override.sweep_string_iterator()))
    return total


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


PROGRESS_DIR = ".progress"  # in the sweep folder while a multirun runs: one file per finished job


class SweepProgress(Callback):
    """One tqdm bar over a multirun's jobs: finished / total, elapsed time and an estimate of what
    is left (a log line per job instead when stderr is not a terminal, e.g. a batch job's file).

    The count is that of the sweep, not of one process: each finished job leaves a marker file
    in ``<sweep dir>/.progress``, so under the joblib launcher, where jobs end in worker processes,
    every worker's bar shows how many jobs of the whole sweep are done.
    """

    def __init__(self) -> None:
        self.bar = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            total = count_jobs(config)
        except Exception:  # noqa: BLE001 - progress is a courtesy, never a failure
            total = None
        folder = Path(config.hydra.sweep.dir) / PROGRESS_DIR
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.json").write_text(json.dumps({"total": total, "started": time.time()}))
        self.bar = self._make_bar(total, time.time())

    @staticmethod
    def _make_bar(total: int | None, started: float):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="sweep", unit="job", smoothing=0, dynamic_ncols=True,
                   disable=None, leave=True)
        bar.start_t = started  # elapsed and ETA count from the start of the sweep
        return bar

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        folder = Path(config.hydra.sweep.dir) / PROGRESS_DIR
        try:
            (folder / f"job{config.hydra.job.num}").touch()
            meta = json.loads((folder / "sweep.json").read_text())
            done = sum(1 for p in folder.iterdir() if p.name.startswith("job"))
        except (OSError, json.JSONDecodeError):
            return  # a folder removed under us: no progress to show, the job itself is fine
        if self.bar is None:  # a joblib worker: its own bar, the sweep's count
            self.bar = self._make_bar(meta["total"], meta["started"])
        self.bar.n = done
        self.bar.set_postfix_str(" ".join(config.hydra.overrides.task)[:60], refresh=False)
        self.bar.refresh()
        if self.bar.disable:
            elapsed = time.time() - meta["started"]
            total = meta["total"]
            eta = f", about {_duration(elapsed / done * (total - done))} left" if total else ""
            log.info("sweep: %d%s jobs done after %s%s", done, f"/{total}" if total else "",
                     _duration(elapsed), eta)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        shutil.rmtree(Path(config.hydra.sweep.dir) / PROGRESS_DIR, ignore_errors=True)


class SweepSummary(Callback):
    """Logs counts by status and a short table at the end of every multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        n_jobs = config.hydra.launcher.get("n_jobs", 1)
        if "joblib" in launcher and n_jobs != 1:
            log.warning("hydra/launcher=joblib runs several jobs at once on this machine; their speed "
                        "and memory numbers share the CPU/GPU and are not comparable. Use the basic "
                        "launcher or arena-bench for timing.")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        records = sweep_records(Path(config.hydra.sweep.dir))
        log.info("%s", "\n".join(summary_lines(records)))
