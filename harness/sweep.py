"""Sweep glue: the end-of-sweep summary and launcher checks, as Hydra callbacks.

Hydra's launchers (basic, joblib, submitit) and sweepers (basic, optuna) do the scheduling;
this module only reads back what the jobs recorded.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_records(sweep_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(sweep_dir).rglob("record.json")):
        try:
            records.append({**json.loads(path.read_text()), "run_dir": str(path.parent)})
        except (OSError, json.JSONDecodeError):
            print(f"[arena] warning: unreadable record {path}", flush=True)
    return records


def summary_lines(records: list[dict], limit: int = 30) -> list[str]:
    """Counts by status and a short table of results, one line per job."""
    counts = Counter(r.get("status") for r in records)
    lines = [f"[arena] sweep summary: {len(records)} records: "
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


class SweepSummary(Callback):
    """Prints counts by status and a short table at the end of every multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        n_jobs = config.hydra.launcher.get("n_jobs", 1)
        if "joblib" in launcher and n_jobs != 1:
            print("[arena] warning: hydra/launcher=joblib runs several jobs at once on this machine; "
                  "their speed and memory numbers share the CPU/GPU and are not comparable. Use the "
                  "basic launcher or arena-bench for timing.", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        records = sweep_records(Path(config.hydra.sweep.dir))
        print("\n".join(summary_lines(records)), flush=True)
