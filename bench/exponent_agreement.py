"""Do two runs of the same arena-bench sweep fit the same scaling exponents? (issue 21, item 3c)

    arena-bench -m experiment=speed_stability_cpu sweep.name=stability_a
    arena-bench -m experiment=speed_stability_cpu sweep.name=stability_b
    python bench/exponent_agreement.py results/sweeps/stability_a results/sweeps/stability_b

One row per model: the time and memory exponents of each sweep A and B
(harness.results.scaling_exponents, the report's fit), the time exponents' bootstrap standard
errors (``time se``; over the rounds, or over the paired cycles where the sweep set
``bench.paired_cycles``: ``from``), their differences (also in standard errors of the difference),
the rounds per point and how far apart the rounds of a point were (``spread``: the largest
``round_ms_max / round_ms_min`` over the model's lengths). Exits with status 1 when a
difference is over ``--limit`` (0.05).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from harness.results import efficiency_cells, load_runs, scaling_exponents


def exponents(folder: str) -> pd.DataFrame:
    """The sweep's fits, one row per model, with its widest spread of rounds."""
    if not Path(folder).is_dir():
        raise SystemExit(f"no such folder: {folder} (run the sweep first)")
    runs = load_runs(folder)
    fits = scaling_exponents(efficiency_cells(runs)).set_index("model")
    if fits.empty:
        raise SystemExit(f"no ok bench records under {folder} (arena-bench writes them)")
    bench = runs[(runs["kind"] == "bench") & (runs["status"] == "ok")]
    if {"speed.round_ms_max", "speed.round_ms_min"} <= set(bench.columns):
        spread = (bench["speed.round_ms_max"] / bench["speed.round_ms_min"]).groupby(bench["model"]).max()
        rounds = bench.groupby("model")["speed.rounds"].min()
    else:  # records of one round
        spread = rounds = pd.Series(dtype=float)
    return fits[["time_exponent", "time_exponent_se", "time_from", "memory_exponent", "seq_lens"]].rename(
        columns={"time_exponent": "time", "time_exponent_se": "time se", "time_from": "from",
                 "memory_exponent": "memory", "seq_lens": "lengths"}).assign(rounds=rounds, spread=spread)


def agreement(first: str, second: str) -> pd.DataFrame:
    """Both sweeps' exponents side by side, for the models they share, and the differences."""
    a, b = exponents(first), exponents(second)
    shared = a.index.intersection(b.index)
    if shared.empty:
        raise SystemExit(f"{first} and {second} share no model")
    table = pd.merge(a.loc[shared], b.loc[shared], left_index=True, right_index=True,
                     suffixes=(" A", " B"))
    for what in ("time", "memory"):
        table[f"{what} diff"] = (table[f"{what} A"] - table[f"{what} B"]).abs()
    # the difference in standard errors of a difference of two independent fits
    table["time diff / se"] = table["time diff"] / (table["time se A"] ** 2 + table["time se B"] ** 2) ** 0.5
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="one sweep folder")
    parser.add_argument("second", help="the same sweep, run again")
    parser.add_argument("--limit", type=float, default=0.05, help="largest difference allowed (0.05)")
    args = parser.parse_args(argv)
    table = agreement(args.first, args.second)
    columns = ["time A", "time se A", "from A", "time B", "time se B", "from B", "time diff", "time diff / se",
               "memory A", "memory B", "memory diff", "rounds A", "rounds B", "spread A", "spread B"]
    print(table[columns].to_string(float_format=lambda v: f"{v:.4f}"))
    worst = table[["time diff", "memory diff"]].max()
    print(f"\nlargest difference: time {worst.iloc[0]:.4f}, memory {worst.iloc[1]:.4f} "
          f"(limit {args.limit})")
    if table["lengths A"].ne(table["lengths B"]).any():
        print("warning: the two sweeps fitted different lengths for some model")
    over = worst.max() > args.limit
    print("over the limit" if over else "within the limit")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
