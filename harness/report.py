"""``arena-report DIR... [--out OUT]``: tables, plots and claims from run records.

Reads every ``record.json`` (and ``metrics.jsonl``) under the given directories and writes to
OUT (default ``DIR/report``):

    report.md, report.html      the whole report; the HTML embeds its plots and opens offline
    tables/<name>.csv, .tex     accuracy, efficiency, scaling exponents, comparison, claims
                                (.tex uses booktabs); *_cells.csv hold the tidy numbers
    plots/<name>.png, .pdf      accuracy vs seq_len, scaling (log-log), bubble, training curves

The terminal shows the accuracy and efficiency tables and the path of report.html.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from harness.claims import evaluate_claims, load_claims
from harness.loggers import console_handlers
from harness.results import (
    EFFICIENCY_GROUP, efficiency_cells, load_curves, load_runs, load_wandb_runs,
    scaling_exponents, summarize,
)

log = logging.getLogger(__name__)

PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "results" / "published"
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")  # LRA's Avg leaves out Path-X
NOT_RUN = "–"


# --------------------------------------------------------------------------- tables


def _num(x: float, metric: str | None = "accuracy") -> str:
    return f"{x:.3f}" if metric == "bpc" else f"{x:.2f}"


def _accuracy_text(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    text = _num(row["mean"], row["metric"])
    if row["n"] > 1:
        text += f" ± {_num(row['std'], row['metric'])}"
    n = f"{row['n']}" if row["n"] == row["n_total"] else f"{row['n']}/{row['n_total']}"
    return f"{text} (n={n})"


def _column_labels(cells: pd.DataFrame) -> pd.Series:
    """A column per task, or per (task, seq_len) when a task was run at several lengths."""
    several = cells.groupby("task")["seq_len"].transform("nunique") > 1
    return cells["task"].where(~several, cells["task"] + " L=" + cells["seq_len"].astype(str))


def accuracy_table(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Model x task: "mean ± std (n=k)" strings, and the matching numeric means.

    Adds LRA's Avg column: the mean over LRA tasks (Path-X excluded) when the table has any,
    else over all accuracy columns; blank for a model missing one of them. No Avg when fewer
    than two tasks qualify or a task has columns at several lengths.
    """
    if cells.empty:
        return pd.DataFrame(), pd.DataFrame()
    cells = cells.assign(column=_column_labels(cells))
    order = list(dict.fromkeys(cells.sort_values(["task", "seq_len"])["column"]))
    text = cells.assign(text=cells.apply(_accuracy_text, axis=1)).pivot(
        index="model", columns="column", values="text").reindex(columns=order)
    means = cells.pivot(index="model", columns="column", values="mean").reindex(columns=order)
    metric_of = dict(zip(cells["column"], cells["metric"]))
    task_of = dict(zip(cells["column"], cells["task"]))
    accuracy_cols = [c for c in order if metric_of[c] == "accuracy"]
    avg_cols = [c for c in accuracy_cols if task_of[c] in LRA_TASKS] or accuracy_cols
    tasks = [task_of[c] for c in avg_cols]
    if len(tasks) >= 2 and len(set(tasks)) == len(tasks):  # one column per task, as in LRA
        means["Avg"] = means[avg_cols].mean(axis=1, skipna=False)
        text["Avg"] = means["Avg"].map(lambda v: NOT_RUN if pd.isna(v) else _num(v))
    return (text.fillna(NOT_RUN).rename_axis(index=None, columns=None),
            means.rename_axis(index=None, columns=None))


def _setup_label(row) -> str:
    """The efficiency group of a row (results.EFFICIENCY_GROUP) in words."""
    threads = row["env.threads"]
    threads = f", {int(threads)} threads" if pd.notna(threads) else ""
    return f"{row['task']}, batch {row['batch_size']}, {row['precision']}{threads}, {row['env.device_name']}"


def _short(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def efficiency_table(eff: pd.DataFrame) -> pd.DataFrame:
    """LRA Table 2's layout: steps/s (speed-up over transformer) and peak memory per seq_len."""
    if eff.empty:
        return pd.DataFrame()
    eff = eff.assign(setup=eff.apply(_setup_label, axis=1))

    def speed(row):
        if row["status"] != "ok":
            return row["status"]
        up = f" ({row['speedup']:.1f}x)" if pd.notna(row["speedup"]) and row["model"] != \
            "transformer" else ""
        return f"{_short(row['steps_per_s'])}{up}"

    def memory(row):
        return _short(row["peak_gb"]) if row["status"] == "ok" else row["status"]

    eff = eff.assign(speed=eff.apply(speed, axis=1), memory=eff.apply(memory, axis=1))
    lengths = sorted(eff["seq_len"].dropna().unique())
    index = ["setup", "model"]
    table = pd.concat(
        [eff.pivot(index=index, columns="seq_len", values="speed").reindex(columns=lengths)
         .rename(columns=lambda L: f"steps/s L={int(L)}"),
         eff.pivot(index=index, columns="seq_len", values="memory").reindex(columns=lengths)
         .rename(columns=lambda L: f"mem GB L={int(L)}")], axis=1).fillna(NOT_RUN)
    table = table.reset_index()
    if table["setup"].nunique() == 1:
        table = table.drop(columns="setup")
    return table.set_index("model").rename_axis(index=None, columns=None)


def load_published(directory: str | Path = PUBLISHED_DIR) -> pd.DataFrame:
    """Every ``*.csv`` in ``directory`` (the tidy published-numbers format), concatenated."""
    frames = [pd.read_csv(p, dtype={"model": str, "task": str}) for p in
              sorted(Path(directory).glob("*.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def compare_published(published: pd.DataFrame, cells: pd.DataFrame, eff: pd.DataFrame,
                      accuracy_means: pd.DataFrame) -> pd.DataFrame:
    """Published numbers beside ours for every (model, task) we ran, with ours - published.

    Accuracy/bpc: our best-on-val test mean at the published seq_len, else at the published
    length from a length-extrapolation test (``test_<metric>_len<L>``), else at our only (or
    longest) length, shown in ``ours_seq_len``. Speed: steps/s, speed-up and peak memory at the
    same seq_len; only the speed-up is differenced (absolute numbers depend on the hardware).
    """
    if published.empty:
        return pd.DataFrame()
    ran_accuracy = set(zip(cells.get("model", []), cells.get("task", [])))
    if "Avg" in accuracy_means:
        ran_accuracy |= {(m, "average") for m in accuracy_means.index}
    ran_speed = set(zip(eff.get("model", []), eff.get("task", [])))
    rows = []
    for _, pub in published.iterrows():
        speed = pub["metric"] in ("steps_per_s", "speedup", "peak_memory_gb")
        if (pub["model"], pub["task"]) not in (ran_speed if speed else ran_accuracy):
            continue
        ours, ours_len, n = np.nan, np.nan, np.nan
        L = pub["seq_len"]
        if speed:
            column = {"steps_per_s": "steps_per_s", "speedup": "speedup",
                      "peak_memory_gb": "peak_gb"}[pub["metric"]]
            hit = eff[(eff["model"] == pub["model"]) & (eff["task"] == pub["task"])
                      & (eff["seq_len"] == L) & (eff["status"] == "ok")]
            if len(hit):
                ours, ours_len, n = hit[column].iloc[0], L, hit["n"].iloc[0]
        elif pub["task"] == "average":
            ours = accuracy_means.loc[pub["model"], "Avg"]
        else:
            ours, ours_len, n = _our_metric(cells, pub)
        diff = ours - float(pub["value"]) if pub["metric"] in ("accuracy", "bpc", "speedup") \
            else np.nan
        rows.append({"source": pub["source"], "table": pub["table"], "model": pub["model"],
                     "task": pub["task"], "seq_len": L, "metric": pub["metric"],
                     "published": pub["value"], "ours": ours, "ours_seq_len": ours_len, "n": n,
                     "diff": diff, "unit": pub["unit"], "note": pub["note"]})
    return pd.DataFrame(rows)


def _our_metric(cells: pd.DataFrame, pub) -> tuple[float, float, float]:
    mine = cells[(cells["model"] == pub["model"]) & (cells["task"] == pub["task"])
                 & (cells["status"] == "ok")]
    if mine.empty:
        return np.nan, np.nan, np.nan
    L = pub["seq_len"]
    exact = mine[mine["seq_len"] == L]
    if len(exact):
        return exact["mean"].iloc[0], L, exact["n"].iloc[0]
    column = f"test_{pub['metric']}_len{int(L)}" if pd.notna(L) else None
    if column in mine and mine[column].notna().any():
        row = mine[mine[column].notna()].iloc[0]
        return row[column], L, row["n"]
    row = mine.sort_values("seq_len").iloc[-1]
    return row["mean"], row["seq_len"], row["n"]


# --------------------------------------------------------------------------- rendering


def _fmt_cell(x) -> str:
    if isinstance(x, (float, np.floating)):
        return "" if np.isnan(x) else f"{x:.4g}"
    return str(x)


def markdown_table(df: pd.DataFrame, index: bool = True) -> str:
    if df.empty:
        return "_no data_\n"
    frame = df.reset_index() if index else df
    if index:
        frame = frame.rename(columns={frame.columns[0]: ""})
    rows = [[_fmt_cell(v).replace("|", "\\|") for v in r] for r in frame.itertuples(index=False)]
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    text = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    return text.replace("±", r"$\pm$").replace("–", "--")


def latex_table(df: pd.DataFrame, caption: str, label: str, index: bool = True) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``); written by hand, no jinja2."""
    frame = df.reset_index() if index else df
    if index:
        frame = frame.rename(columns={frame.columns[0]: ""})
    spec = "l" * (1 if index else 0) + "r" * (len(frame.columns) - (1 if index else 0))
    head = " & ".join(_latex_escape(str(c)) for c in frame.columns) + r" \\"
    body = [" & ".join(_latex_escape(_fmt_cell(v)) for v in r) + r" \\"
            for r in frame.itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(caption)}}}",
                      rf"\label{{{label}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule", head,
                      r"\midrule", *body, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def _html_page(sections: list[tuple[str, str, object]], plots: dict[str, Path]) -> str:
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
           ".holds{color:#070}.differs{color:#b00}")
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>seq-arena report</title>",
             f"<style>{css}</style></head><body>", "<h1>seq-arena report</h1>"]
    for title, intro, table in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if intro:
            parts.append(f"<p>{html.escape(intro)}</p>")
        if isinstance(table, pd.DataFrame):
            body = table.to_html(escape=True, na_rep="", border=0) if not table.empty \
                else "<p><em>no data</em></p>"
            for status in ("holds", "differs"):  # colour claim verdicts
                body = body.replace(f"<td>{status}</td>", f"<td class='{status}'>{status}</td>")
            parts.append(body)
    if plots:
        parts.append("<h2>Plots</h2>")
    for name, png in plots.items():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(name)}</h3><figure><img alt='{name}' id='plot-{name}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{name}.png, "
                     f"<a href='plots/{name}.pdf'>{name}.pdf</a></figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- command line


def build_report(dirs: list[str], out: Path, *, published_dir: Path = PUBLISHED_DIR,
                 claims_file: Path | None = None, plots: bool = True,
                 runs: pd.DataFrame | None = None) -> dict:
    """Compute every table, write every output under ``out``; returns the tables by name.

    ``runs`` replaces reading ``dirs`` (e.g. runs loaded from W&B by results.load_wandb_runs).
    """
    runs = load_runs(*dirs) if runs is None else runs
    if runs.empty:
        raise SystemExit(f"arena-report: no record.json under {' '.join(dirs)}; point it at a "
                         "run or sweep directory (e.g. results/sweeps/<name>)")
    cells = summarize(runs)
    eff = efficiency_cells(runs)
    fits = scaling_exponents(eff)
    acc_text, acc_means = accuracy_table(cells)
    eff_text = efficiency_table(eff)
    comparison = compare_published(load_published(published_dir), cells, eff, acc_means)
    # every claims*.yaml of the published directory (one per study), or the one file asked for
    claim_files = [claims_file] if claims_file else sorted(Path(published_dir).glob("claims*.yaml"))
    loaded = [claim for path in claim_files if path.exists() for claim in load_claims(path)]
    claims = evaluate_claims(runs, loaded) if loaded else pd.DataFrame()
    claims_file = ", ".join(str(p) for p in claim_files)
    fit_table = fits.assign(setup=fits.apply(_setup_label, axis=1) if len(fits) else []).drop(
        columns=EFFICIENCY_GROUP).set_index("model").rename_axis(None)

    out.mkdir(parents=True, exist_ok=True)
    tables_dir = out / "tables"
    tables_dir.mkdir(exist_ok=True)
    tables = {"accuracy": acc_text, "efficiency": eff_text, "scaling_exponents": fit_table,
              "comparison": comparison, "claims": claims}
    for name, table in tables.items():
        index = name not in ("comparison", "claims")
        table.to_csv(tables_dir / f"{name}.csv", index=index)
        caption = name.replace("_", " ").capitalize()
        (tables_dir / f"{name}.tex").write_text(latex_table(table, caption, f"tab:{name}", index))
    cells.drop(columns=["setting"], errors="ignore").to_csv(tables_dir / "accuracy_cells.csv",
                                                            index=False)
    eff.to_csv(tables_dir / "efficiency_cells.csv", index=False)

    written = {}
    if plots:
        from harness import plots as P  # matplotlib is imported only when plots are asked for

        plot_dir = out / "plots"
        made = {"accuracy_vs_seq_len": P.accuracy_vs_seq_len(cells, plot_dir),
                "scaling": P.scaling(eff, fits, plot_dir),
                "bubble": P.bubble(eff, acc_means, plot_dir),
                "training_curves": P.training_curves(load_curves(*dirs), cells, plot_dir)}
        written = {k: v for k, v in made.items() if v is not None}

    n_runs = f"{len(runs)} records ({(runs['status'] == 'ok').sum()} ok) from {', '.join(dirs)}"
    source = eff["source"].iloc[0] if len(eff) else "none"
    sections = [
        ("Accuracy", "Test metric of the best setting on val (mean ± sample std over seeds, n "
         "seeds; n=k/m when some seeds failed); accuracy in %, bpc as is. FAIL / OOM: no run "
         "succeeded; n/a: the model does not support the task; – not run. Avg as in LRA "
         f"(Path-X excluded). {n_runs}.", acc_text),
        ("Efficiency", f"Training steps per second (speed-up over transformer) and peak memory "
         f"in GB (10^9 bytes), from {source} records, repeats by median.", eff_text),
        ("Scaling exponents", "Least-squares slope of log step time and log peak memory "
         "against log seq_len (2 = quadratic, 1 = linear).", fit_table),
        ("Comparison with published numbers", "ours - published in diff (accuracy, bpc and "
         "speed-up only; absolute speed and memory depend on the hardware).", comparison),
        ("Claims", f"Published claims checked against these runs ({claims_file}).", claims),
    ]
    md = ["# seq-arena report", ""]
    for title, intro, table in sections:
        md += [f"## {title}", "", intro, "", markdown_table(table, index=title not in (
            "Comparison with published numbers", "Claims"))]
    md += [f"## Plots", ""] + [f"![{k}](plots/{k}.png) ([pdf](plots/{k}.pdf))\n" for k in written]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html_page(
        [(t, i, tab.reset_index(drop=t in ("Comparison with published numbers", "Claims"))
          if isinstance(tab, pd.DataFrame) else tab) for t, i, tab in sections], written))
    return {**tables, "cells": cells, "efficiency_cells": eff, "plots": written,
            "html": out / "report.html"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="arena-report", description="Tables, plots and claim checks from run records.")
    parser.add_argument("dirs", nargs="*", help="run or sweep directories to read records from")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT",
                        help="read runs from W&B's public API instead of record.json files")
    parser.add_argument("--wandb-offline", action="store_true", help=argparse.SUPPRESS)  # removed
    parser.add_argument("--out", type=Path, help="output directory (default: FIRST_DIR/report)")
    parser.add_argument("--published", type=Path, default=PUBLISHED_DIR,
                        help="directory of published-number CSVs and claims.yaml")
    parser.add_argument("--claims", type=Path, help="claims file (default: PUBLISHED/claims.yaml)")
    parser.add_argument("--no-plots", action="store_true", help="tables only (faster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, handlers=console_handlers())  # a no-op if already set up
    if not args.dirs and not args.wandb:
        parser.error("give run or sweep directories, or --wandb ENTITY/PROJECT")
    if args.wandb and not args.out:
        parser.error("--wandb needs --out")
    out = args.out or Path(args.dirs[0]) / "report"
    runs = None
    if args.wandb_offline:
        parser.error("--wandb-offline is gone (it parsed W&B's private .wandb files): read the runs' "
                     "record.json files with `arena-report DIR`, or upload the offline runs with "
                     "`wandb sync DIR/**/wandb/offline-run-*` and read them with --wandb ENTITY/PROJECT")
    if args.wandb:
        runs = load_wandb_runs(args.wandb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = build_report(args.dirs, out, published_dir=args.published,
                                  claims_file=args.claims, plots=not args.no_plots, runs=runs)
        finally:
            for w in caught:  # one line each (corrupt records, torn metrics lines)
                if issubclass(w.category, UserWarning):
                    log.warning("%s", w.message)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        log.info("Accuracy (best setting on val; test mean ± std (n))\n%s",
                 result["accuracy"].to_string() if len(result["accuracy"]) else "  no train runs")
        log.info("\nEfficiency (steps/s (speed-up over transformer), peak memory GB)\n%s",
                 result["efficiency"].to_string() if len(result["efficiency"]) else "  none")
        claims = result["claims"]
        if len(claims):
            log.info("\nClaims: %s", ", ".join(f"{(claims['status'] == s).sum()} {s}"
                                              for s in ("holds", "differs", "not run")))
    log.info("\nreport: %s", result["html"])
    return 0


if __name__ == "__main__":
    # `python -m harness.report` runs this file as __main__: run the imported module instead, the
    # code the console script runs (its logger is harness.report, not __main__)
    from harness.report import main as _main

    sys.exit(_main())
