"""Time ``load_runs`` + the whole report on 10,000 synthetic records (not a test).

    python bench/bench_report.py [--n 10000] [--dir /tmp/arena-bench-report] [--no-plots]

Writes a synthetic sweep (models x tasks x seq_lens x learning rates x seeds, plus bench
records and a few failures), then times loading and report generation separately.
Target: under 10 s for 10,000 records with plots.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import time
from pathlib import Path

MODELS = ["transformer", "local", "longformer", "bigbird", "linear_transformer", "performer",
          "linformer", "s4d", "mamba", "lstm"]
TASKS = {"listops": "accuracy", "text": "accuracy", "retrieval": "accuracy", "image": "accuracy",
         "pathfinder": "accuracy", "mqar": "accuracy", "char_lm": "bpc"}
SEQ_LENS = [256, 512, 1024, 2048]
LRS = [1e-4, 3e-4, 1e-3, 3e-3]


def record(*, kind, model, task, seq_len, seed, lr, rng, status="ok") -> dict:
    metric = TASKS.get(task, "accuracy")
    base = rng.random() if metric == "accuracy" else 1.0 + rng.random()
    metrics = {} if kind == "bench" else {f"val_{metric}": base, f"test_{metric}": base * 0.99,
                                          "best_step": 1000, "steps": 2000,
                                          "final_train_loss": 0.5}
    quad = 2.0 if model in ("transformer", "bigbird", "longformer") else 1.0
    step_ms = 1e-3 * seq_len ** quad * (1 + 0.05 * rng.random())
    return {
        "schema": 1, "kind": kind, "run_id": f"{rng.getrandbits(48):012x}", "config_hash": "x",
        "status": status, "error": None if status == "ok" else "synthetic failure",
        "model": model, "task": task, "seed": seed, "seq_len": seq_len, "batch_size": 32,
        "params": 100000, "metrics": metrics,
        "speed": {"step_ms_median": step_ms, "step_ms_iqr": 0.1, "tokens_per_s": 1e5},
        "memory": {"peak_bytes": int(1e3 * seq_len ** quad), "how": "cuda_max_allocated"},
        "env": {"device": "cuda:0", "device_name": "synthetic", "torch": "2.13", "cuda": None,
                "threads": 1, "git_commit": None, "host": "bench"},
        "started_at": "2025-01-01T00:00:00+00:00", "ended_at": "2025-01-01T00:10:00+00:00",
        "wall_s": 600.0,
        "config": {"seed": seed, "model": {"name": model, "d_model": 64, "n_layers": 2},
                   "task": {"name": task, "seq_len": seq_len, "seed": 0},
                   "trainer": {"lr": lr, "steps": 2000, "batch_size": 32, "betas": [0.9, 0.98]},
                   "sweep": {"name": "bench"}},
    }


def write_records(root: Path, n: int) -> None:
    rng = random.Random(0)
    combos = itertools.cycle(itertools.product(MODELS, TASKS, SEQ_LENS, LRS, range(5)))
    for i in range(n):
        if i % 20 == 0:  # 5% bench records
            model, seq_len = rng.choice(MODELS), rng.choice(SEQ_LENS)
            rec = record(kind="bench", model=model, task="text", seq_len=seq_len, seed=0,
                         lr=1e-3, rng=rng)
        else:
            model, task, seq_len, lr, seed = next(combos)
            status = "oom" if rng.random() < 0.02 else "ok"
            rec = record(kind="train", model=model, task=task, seq_len=seq_len, seed=seed,
                         lr=lr, rng=rng, status=status)
        run_dir = root / f"run{i:05d}"
        run_dir.mkdir(parents=True)
        (run_dir / "record.json").write_text(json.dumps(rec))
        if i % 50 == 1 and rec["kind"] == "train":  # some curves
            metric = TASKS[rec["task"]]
            lines = [json.dumps({"step": s, "split": "val", "loss": 1.0 / s, "metric_name": metric,
                                 "metric": 1 - 1.0 / s, "elapsed_s": s, "tokens_per_s": 1e5})
                     for s in range(100, 2001, 100)]
            (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/arena-bench-report"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    write_records(args.dir / "runs", args.n)

    from harness.report import build_report
    from harness.results import load_runs

    t0 = time.perf_counter()
    runs = load_runs(args.dir / "runs")
    t1 = time.perf_counter()
    build_report([str(args.dir / "runs")], args.dir / "report", plots=not args.no_plots)
    t2 = time.perf_counter()
    print(f"{len(runs)} records: load_runs {t1 - t0:.2f} s; full report (loads again) "
          f"{t2 - t1:.2f} s; target < 10 s for the report")


if __name__ == "__main__":
    main()
