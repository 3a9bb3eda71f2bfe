"""The efficiency table of the README from one arena-bench sweep: speed-up over the Transformer at
chosen lengths, fitted time and memory exponents, peak memory, and the settings it was measured
under (machine, threads, batch, allocator, compile, activation checkpointing, commit).

    arena-bench -m experiment=speed_scaling_cpu                    # the sweep (about 15 min on 2 cores)
    python bench/efficiency_table.py results/sweeps/speed_scaling_cpu
    python bench/efficiency_table.py results/sweeps/speed_scaling_cpu --at 4096,8192 --csv table.csv
    python bench/efficiency_table.py --run                      # the sweep, then the table

Speed-ups are steps per second over the Transformer's at the same length, within the sweep; the
exponents are least-squares slopes of log(step time) and log(peak memory) against log(length) over
every length the sweep measured (harness.results.scaling_exponents, the report's fit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from harness.results import efficiency_cells, load_runs, scaling_exponents

# Settings the table names once, above it: (record column, label). A column absent from older
# records is shown as "not recorded".
SETTINGS = [
    ("env.device_name", "machine"), ("env.torch", "torch"), ("env.threads", "threads"),
    ("batch_size", "batch"), ("config.trainer.precision", "precision"),
    ("env.allocator.name", "allocator"), ("env.allocator.how", "allocator set-up"),
    ("env.compile.applied", "compile applied"), ("memory.how", "memory"),
    ("config.trainer.activation_checkpointing", "activation checkpointing"),
    ("env.git_commit", "commit"),
]


def settings(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """The measurement settings as (label, value) pairs; several values are joined by ' | '."""
    bench = runs[runs["kind"] == "bench"]
    out = []
    for column, label in SETTINGS:
        if column not in bench:
            out.append((label, "not recorded"))
            continue
        values = sorted({str(v)[:12] if column == "env.git_commit" else str(v)
                         for v in bench[column].dropna()})
        out.append((label, " | ".join(values) if values else "not recorded"))
    return out


def efficiency_table(runs: pd.DataFrame, at: list[int]) -> pd.DataFrame:
    """One row per model: params, steps/s and speed-up at each length in ``at``, peak memory there,
    and the exponents; models ordered by speed-up at the longest length."""
    cells = efficiency_cells(runs)
    if cells.empty:
        raise SystemExit("no bench records in the folder(s) given (arena-bench writes them)")
    fits = scaling_exponents(cells).set_index("model")
    params = runs[runs["kind"] == "bench"].groupby("model")["params"].first()
    rows = []
    for model, group in cells.groupby("model", sort=True):
        row = {"model": model, "params": params.get(model, np.nan)}
        by_len = group.set_index("seq_len")
        for length in at:
            cell = by_len.loc[length] if length in by_len.index else None
            ok = cell is not None and cell["status"] == "ok"
            row[f"steps/s @{length}"] = cell["steps_per_s"] if ok else np.nan
            row[f"speed-up @{length}"] = cell["speedup"] if ok else np.nan
            row[f"peak MB @{length}"] = cell["peak_gb"] * 1e3 if ok else np.nan
            if cell is not None and not ok:
                row[f"steps/s @{length}"] = cell["status"]
        fit = fits.loc[model] if model in fits.index else None
        row["time exponent"] = fit["time_exponent"] if fit is not None else np.nan
        row["memory exponent"] = fit["memory_exponent"] if fit is not None else np.nan
        row["lengths fitted"] = fit["seq_lens"] if fit is not None else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(f"speed-up @{at[-1]}", ascending=False, na_position="last",
                             key=lambda s: pd.to_numeric(s, errors="coerce"))


def markdown(table: pd.DataFrame, at: list[int]) -> str:
    """The table as GitHub markdown: speed-up in brackets after steps/s, memory in MB."""
    head = ["model", "params"] + [f"steps/s at {n} (speed-up)" for n in at] \
        + [f"peak MB at {n}" for n in at] + ["time exp.", "memory exp."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [r["model"], f"{int(r['params']):,}" if pd.notna(r["params"]) else "n/a"]
        for n in at:
            sps, up = r[f"steps/s @{n}"], r[f"speed-up @{n}"]
            cells.append(str(sps) if isinstance(sps, str) else
                         "n/a" if pd.isna(sps) else f"{sps:.3g}" + ("" if pd.isna(up) else f" ({up:.1f}x)"))
        cells += ["n/a" if pd.isna(r[f"peak MB @{n}"]) else f"{r[f'peak MB @{n}']:.0f}" for n in at]
        cells += ["n/a" if pd.isna(r[k]) else f"{r[k]:.2f}" for k in ("time exponent", "memory exponent")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["results/sweeps/speed_scaling_cpu"],
                        help="sweep folders with bench records (default: results/sweeps/speed_scaling_cpu)")
    parser.add_argument("--at", default="4096,8192", help="lengths for the speed-up and memory columns")
    parser.add_argument("--csv", help="also write the table here")
    parser.add_argument("--run", action="store_true",
                        help="run `arena-bench -m experiment=speed_scaling_cpu` first")
    args = parser.parse_args(argv)
    at = [int(n) for n in args.at.split(",")]
    if args.run:
        arena_bench = Path(sys.executable).with_name("arena-bench")
        subprocess.run([str(arena_bench), "-m", "experiment=speed_scaling_cpu"], check=True,
                       env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        raise SystemExit(f"no such folder: {', '.join(missing)} (run the sweep first, or pass --run)")
    runs = load_runs(*args.folders)
    table = efficiency_table(runs, at)
    for label, value in settings(runs):
        print(f"{label}: {value}")
    print()
    print(markdown(table, at))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
