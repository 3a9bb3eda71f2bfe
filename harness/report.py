"""``arena-report DIR... [--out OUT]``: tables, plots and claims from run records.

Reads every ``record.json`` (and ``metrics.jsonl``) under the given directories and writes to
OUT (default ``DIR/report``):

    report.md, report.html      the whole report; the HTML (templates/report.html.j2) embeds its
                                figures and opens offline; header: sweep, machine, commit
    tables/<name>.csv, .tex     accuracy, params, efficiency, scaling exponents, comparison,
                                claims
                                (.tex: booktabs tables that fit an article page, best in bold,
                                needing booktabs, graphicx, array); *_cells.csv: tidy numbers
    plots/<name>.png, .pdf      accuracy heatmap (one length) or accuracy vs seq_len, scaling
                                (log-log), bubble, ours vs published, claims, training curves

Presentation (names, precision, bold, LaTeX, HTML) lives in harness.report_render; the figures in
harness.plots; published numbers and which runs they are set beside in harness.published.

The terminal shows the accuracy and efficiency tables and the path of report.html.
``arena-report --published-matches`` prints every published row with the configuration it is
matched to (results/published/README.md), and exits.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from harness.claims import VERDICTS, evaluate_claims, load_claims
from harness.config import PUBLISHED_DIR
from harness.loggers import console_handlers
from harness.published import LRA_TASKS, compare_published, load_published, published_matches
from harness.results import (
    EFFICIENCY_GROUP, efficiency_cells, filter_runs, in_experiments, load_curves, load_runs,
    load_wandb_runs, scaling_exponents, summarize, t_interval,
)

log = logging.getLogger(__name__)

NOT_RUN = "–"
CHANCE_MARK = "†"  # not clearly above chance (results.near_chance)


# --------------------------------------------------------------------------- tables


def _num(x: float, metric: str | None = "accuracy") -> str:
    """Accuracy (%) to one decimal, bpc to three: the precision a seed-to-seed spread allows."""
    return f"{x:.3f}" if metric == "bpc" else f"{x:.1f}"


def common_seeds(cells: pd.DataFrame) -> int | None:
    """The seed count most cells have (said once in the caption, not in every cell)."""
    ok = cells[cells["status"] == "ok"] if len(cells) else cells
    return int(ok["n"].mode().max()) if len(ok) else None


def _accuracy_text(row, seeds: int | None) -> str:
    """``mean ± std``; ``(n=k)`` only where a cell has another seed count than most, ``(n=k/m)``
    where some of its seeds failed."""
    if row["status"] != "ok":
        return row["status"]
    text = _num(row["mean"], row["metric"]) + (CHANCE_MARK if row.get("near_chance") else "")
    if row["n"] > 1:
        text += f" ± {_num(row['std'], row['metric'])}"
    if row["n"] != row["n_total"]:
        return f"{text} (n={row['n']}/{row['n_total']})"
    return text if row["n"] == seeds else f"{text} (n={row['n']})"


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
    seeds = common_seeds(cells)
    text = cells.assign(text=cells.apply(_accuracy_text, axis=1, seeds=seeds)).pivot(
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


# --------------------------------------------------------------------------- presentation

COMPARISON_COLUMNS = {"model": "Model", "task": "Task", "seq_len": "Length", "metric": "Metric",
                      "published": "Published", "ours": "Ours [95% CI]", "diff": "Ours − published",
                      "n": "Seeds", "match": "Configuration", "source": "Source",
                      "note": "Note"}
METRIC_NAMES = {"accuracy": "accuracy (%)", "bpc": "bpc", "speedup": "speed-up (x)",
                "steps_per_s": "steps/s", "peak_memory_gb": "peak memory (GB)"}


def _value(x, metric: str) -> str:
    if pd.isna(x):
        return NOT_RUN
    if metric in ("accuracy", "speedup"):
        return f"{x:.1f}"
    if metric == "bpc":
        return f"{x:.3f}"
    return _short(x)


def _signed(x, metric: str) -> str:
    return "" if pd.isna(x) else ("+" if x > 0 else "") + _value(x, metric).replace("-", "−")


def comparison_display(comparison: pd.DataFrame) -> pd.DataFrame:
    """The comparison formatted: matched rows with ours [95% interval] and the difference, then
    the unmatched rows with the published number alone and why (the configuration column)."""
    if comparison.empty:
        return pd.DataFrame()
    rows = comparison.assign(_unmatched=comparison["ours"].isna()).sort_values(
        "_unmatched", kind="stable")

    def ours(r):
        text = _value(r["ours"], r["metric"])
        if pd.notna(r["ci_low"]) and r["ci_low"] != r["ci_high"]:
            text += f" [{_value(r['ci_low'], r['metric'])}, {_value(r['ci_high'], r['metric'])}]"
        return text

    out = pd.DataFrame({
        "model": rows["model"], "task": rows["task"],
        "seq_len": rows["seq_len"].map(lambda v: "" if pd.isna(v) else f"{int(v)}"),
        "metric": rows["metric"].map(lambda m: METRIC_NAMES.get(m, m)),
        "published": [_value(v, m) for v, m in zip(rows["published"], rows["metric"])],
        "ours": [ours(r) for _, r in rows.iterrows()],
        "diff": [_signed(v, m) for v, m in zip(rows["diff"], rows["metric"])],
        "n": rows["n"].map(lambda v: "" if pd.isna(v) else f"{int(v)}"),
        "match": rows["match"],
        "source": rows["source"] + ", " + rows["table"].astype(str),
        "note": rows["note"].fillna(""),
    })
    return out.rename(columns=COMPARISON_COLUMNS).reset_index(drop=True)


def params_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Model x task column: the chosen setting's parameter count, marked ``▲ +k%`` when more
    than 10% over the transformer's in the same column (LRA's rule for a fair comparison)."""
    if cells.empty or cells["params"].isna().all():
        return pd.DataFrame()
    cells = cells.assign(column=_column_labels(cells))
    order = list(dict.fromkeys(cells.sort_values(["task", "seq_len"])["column"]))
    base = cells[cells["model"] == "transformer"].set_index("column")["params"]

    def text(row):
        if pd.isna(row["params"]):
            return NOT_RUN
        out = f"{row['params'] / 1e6:.2f}M" if row["params"] >= 1e6 else f"{row['params'] / 1e3:.0f}K"
        ref = base.get(row["column"], np.nan)
        if pd.notna(ref) and ref > 0 and row["params"] > 1.1 * ref:
            out += f" ▲ +{100 * (row['params'] / ref - 1):.0f}%"
        return out

    table = cells.assign(text=cells.apply(text, axis=1)).pivot(
        index="model", columns="column", values="text").reindex(columns=order)
    return table.fillna(NOT_RUN).rename_axis(index=None, columns=None)


MATCHING_TEXT = {"equal_size": "every model at the same width and depth (size.d_model, size.n_layers)",
                 # records written before the rule matched depth (the LSTMs kept one layer)
                 "equal_width": "every model at the same width (size.d_model), depth as its yaml said",
                 "as_published": "each model at its paper's size",
                 "none": "no matching stated"}


def matching_note(runs: pd.DataFrame) -> str:
    """How each study (sweep) of the train runs matched its models (``matching.rule``, set by the
    study; conf/study/none.yaml), or "" when no record says."""
    train = runs[runs["kind"] == "train"]
    if "config.matching.rule" not in train or train["config.matching.rule"].isna().all():
        return ""
    name = train["config.sweep.name"] if "config.sweep.name" in train else pd.Series("runs", index=train.index)
    rules = train.assign(_study=name.fillna("runs")).dropna(subset=["config.matching.rule"]).groupby(
        "_study")["config.matching.rule"].agg(lambda r: " / ".join(sorted(set(r))))
    return "; ".join(f"{study}: {MATCHING_TEXT.get(rule, rule)} ({rule})" for study, rule in rules.items())


def fits_display(fit_table: pd.DataFrame) -> pd.DataFrame:
    if fit_table.empty:
        return pd.DataFrame()
    out = pd.DataFrame(index=fit_table.index)
    if "setup" in fit_table and fit_table["setup"].nunique() > 1:
        out["Setup"] = fit_table["setup"]
    se = fit_table["time_exponent_se"] if "time_exponent_se" in fit_table else pd.Series(np.nan, fit_table.index)
    paired = fit_table["time_from"].eq("paired") if "time_from" in fit_table else pd.Series(False, fit_table.index)
    out["Time exponent"] = [NOT_RUN if pd.isna(v) else f"{v:.2f}" + ("" if pd.isna(e) else f" ± {e:.2f}")
                            + (" (paired lengths)" if p else "")
                            for v, e, p in zip(fit_table["time_exponent"], se, paired)]
    out["Memory exponent"] = fit_table["memory_exponent"].map(
        lambda v: NOT_RUN if pd.isna(v) else f"{v:.2f}")
    out["Lengths fitted"] = fit_table["seq_lens"].str.replace(",", ", ")
    return out


def claims_display(claims: pd.DataFrame) -> pd.DataFrame:
    if claims.empty:
        return pd.DataFrame()
    return pd.DataFrame({"Claim": claims["claim"], "Source": claims["citation"],
                         "Study": claims["experiment"], "Verdict": claims["status"],
                         "Our numbers": claims["numbers"]})


def claim_points(runs: pd.DataFrame, claims: list[dict], verdicts: pd.DataFrame) -> pd.DataFrame:
    """The values a threshold claim is decided on, for the claims figure: one row per (claim,
    model, seq_len) with the test mean and its 95% t interval over seeds (the interval the claim
    is decided on), or the fitted exponent and its bound; only the claim's experiment's runs."""
    from harness.claims import _side, _summary, claim_sides

    verdict = dict(zip(verdicts.get("id", []), verdicts.get("status", [])))
    rows = []
    for claim in claims:
        label = claim["id"]
        study = in_experiments(runs, claim["experiment"])
        if claim["check"] == "exponent_below":
            side = _side(claim["model"])
            eff = efficiency_cells(filter_runs(study[study["model"] == side["model"]],
                                               claim.get("where")))
            fits = scaling_exponents(eff) if len(eff) else pd.DataFrame()
            column = f"{claim['quantity']}_exponent"
            for _, f in fits[fits[column].notna()].iterrows() if len(fits) else []:
                rows.append({"claim": label, "verdict": verdict.get(label), "model": side["model"],
                             "value": f[column], "low": np.nan, "high": np.nan,
                             "threshold": claim["value"], "unit": "scaling exponent"})
            continue
        if "threshold" not in claim or not claim.get("task"):
            continue
        for side in claim_sides(claim):
            cells = _summary(study, claim, side) if len(study) else pd.DataFrame()
            for _, c in cells[cells["status"] == "ok"].iterrows() if len(cells) else []:
                low, high = t_interval(c["mean"], c["std"], c["n"], metric=c["metric"])
                rows.append({"claim": label, "verdict": verdict.get(label), "model": side["model"],
                             "value": c["mean"], "low": low, "high": high,
                             "threshold": claim["threshold"],
                             "unit": UNIT_NAMES.get(c["metric"], c["metric"])})
    return pd.DataFrame(rows, columns=["claim", "verdict", "model", "value", "low", "high",
                                       "threshold", "unit"])


UNIT_NAMES = {"accuracy": "test accuracy (%)", "bpc": "bits per character"}


def _direction(column: str, metric_of: dict) -> str:
    return "min" if metric_of.get(column) == "bpc" else "max"


def report_header(runs: pd.DataFrame, dirs: list[str]) -> dict[str, str]:
    """Sweep, machine and commit of the records (every distinct value, most frequent first)."""
    def values(column: str, short: int | None = None) -> str:
        if column not in runs:
            return "unknown"
        counts = runs[column].dropna().astype(str).value_counts()
        names = [v[:short] if short else v for v in counts.index]
        return ", ".join(names) if names else "unknown"

    ok = int((runs["status"] == "ok").sum())
    return {"sweep": values("config.sweep.name"), "machine": values("env.device_name"),
            "host": values("env.host"), "commit": values("env.git_commit", 12),
            "records": f"{len(runs)} ({ok} ok) from {', '.join(dirs) or 'W&B'}"}


# --------------------------------------------------------------------------- command line


def build_report(dirs: list[str], out: Path, *, published_dir: Path = PUBLISHED_DIR,
                 claims_file: Path | None = None, plots: bool = True,
                 runs: pd.DataFrame | None = None) -> dict:
    """Compute every table, write every output under ``out``; returns the tables by name.

    ``runs`` replaces reading ``dirs`` (e.g. runs loaded from W&B by results.load_wandb_runs).
    """
    from harness.report_render import DisplayTable, render_page, to_latex, to_markdown
    from tasks.base import progress

    runs = load_runs(*dirs) if runs is None else runs
    if runs.empty:
        raise SystemExit(f"arena-report: no record.json under {' '.join(dirs)}; point it at a "
                         "run or sweep directory (e.g. results/sweeps/<name>)")
    cells = summarize(runs)
    eff = efficiency_cells(runs)
    fits = scaling_exponents(eff)
    acc_text, acc_means = accuracy_table(cells)
    eff_text = efficiency_table(eff)
    comparison = compare_published(load_published(published_dir), runs)
    params = params_table(cells)
    matching = matching_note(runs)
    # every claims*.yaml of the published directory (one per study), or the one file asked for
    claim_files = [claims_file] if claims_file else sorted(Path(published_dir).glob("claims*.yaml"))
    loaded = [claim for path in claim_files if path.exists() for claim in load_claims(path)]
    claims = evaluate_claims(runs, loaded) if loaded else pd.DataFrame()
    claims_file = ", ".join(p.name for p in claim_files)  # where: --published (or --claims)
    fit_table = fits.assign(setup=fits.apply(_setup_label, axis=1) if len(fits) else []).drop(
        columns=EFFICIENCY_GROUP).set_index("model").rename_axis(None)

    out.mkdir(parents=True, exist_ok=True)
    tables_dir = out / "tables"
    tables_dir.mkdir(exist_ok=True)
    tables = {"accuracy": acc_text, "params": params, "efficiency": eff_text,
              "scaling_exponents": fit_table, "comparison": comparison, "claims": claims}
    for name, table in tables.items():
        table.to_csv(tables_dir / f"{name}.csv", index=name not in ("comparison", "claims"))
    cells.drop(columns=["setting"], errors="ignore").to_csv(tables_dir / "accuracy_cells.csv",
                                                            index=False)
    eff.to_csv(tables_dir / "efficiency_cells.csv", index=False)

    seeds = common_seeds(cells)
    metric_of = {}
    if len(cells):
        labelled = cells.assign(column=_column_labels(cells))
        metric_of = dict(zip(labelled["column"], labelled["metric"]))
    source = eff["source"].iloc[0] if len(eff) else "none"
    setups = eff.apply(_setup_label, axis=1).unique() if len(eff) else []
    display = [
        DisplayTable(acc_text, "Accuracy", (
            f"Test accuracy (%) of the setting best on val, mean ± sample std over "
            f"{seeds if seeds else 'the'} seed{'s' if seeds != 1 else ''} (another count is shown "
            "as n=k, n=k/m when some seeds failed); bpc as is, lower is better. Best per column "
            "in bold. FAIL / OOM: no run succeeded; n/a: the model does not support the task; "
            f"– not run. Avg as in LRA (Path-X excluded). {CHANCE_MARK} not clearly above "
            "chance: the exact binomial 95% interval of the accuracy over the test examples of all "
            "seeds includes chance or lies below it (chance: 1 / classes; 1 / data symbols on the "
            "synthetic token tasks; 1 / pairs on MQAR). The 95% t intervals are in tables/accuracy_cells.csv."),
            "accuracy", row_label="Model",
            better={c: _direction(c, metric_of) for c in acc_text.columns}),
        DisplayTable(params, "Parameters", (
            "Trainable parameters of the setting in the accuracy table. ▲ +k%: more than 10% over "
            "the transformer's in the same column (LRA's rule: models compared within 10% of the "
            "base Transformer's parameters)."
            + (f" How the studies matched their models: {matching}." if matching else "")),
            "params", row_label="Model"),
        DisplayTable(eff_text, "Efficiency", (
            "Training steps per second (speed-up over transformer) and peak memory in GB "
            f"(10⁹ bytes), from {source} records, repeats by median"
            + (f"; {setups[0]}" if len(setups) == 1 else "") + ". Best per column in bold."),
            "efficiency", row_label="Model",
            better={c: "max" if c.startswith("steps/s") else "min" for c in eff_text.columns
                    if c.startswith(("steps/s", "mem"))}, groups="setup"),
        DisplayTable(fits_display(fit_table), "Scaling exponents", (
            "Least-squares slope of log step time and log peak memory against log sequence "
            "length (2 = quadratic, 1 = linear); lowest in bold. ± se: the time exponent's "
            "bootstrap standard error over the rounds of its points (bench.rounds of 3 or more)."), "scaling_exponents",
            row_label="Model", better={"Time exponent": "min", "Memory exponent": "min"},
            groups="Setup"),
        DisplayTable(comparison_display(comparison), "Comparison with published numbers", (
            "Published numbers of the models and tasks we ran. Ours (mean [95% t interval] over "
            "seeds) stands beside a published number only where the task, the protocol and the "
            "configuration match: the configuration column names it (results/published/*.csv, "
            "columns experiment, model_config, protocol); every other published number stands "
            "alone, marked unmatched with the reason. Ours − published for accuracy, bpc and "
            "speed-up only (absolute speed and memory depend on the hardware)."), "comparison",
            latex_drop=("Note", "Source", "Configuration")),
        DisplayTable(claims_display(claims), "Claims", (
            f"Published claims ({claims_file}), each decided only on the runs of its own study "
            "(Study: the experiment names). Accuracy claims need 3 seeds per cell: mean [95% t "
            "interval] (n seeds); holds / differs when the intervals clear the threshold or each "
            "other, inconclusive when they overlap, too few seeds below 3. Speed and memory "
            "claims compare medians of timed steps."), "claims",
            latex_drop=("Source",)),
    ]
    for table in display:
        (tables_dir / f"{table.name}.tex").write_text(to_latex(table, f"tab:{table.name}"))

    written: dict[str, Path] = {}
    captions = {
        "accuracy_heatmap": "Test accuracy (%) by model and task (one length per task).",
        "accuracy_vs_seq_len": "Test metric against sequence length (mean ± sd over seeds).",
        "scaling": "Step time and peak memory against sequence length, log-log, with fitted slopes.",
        "bubble": "Speed, accuracy and memory at the longest measured length (LRA Figure 3).",
        "published": "Ours (dot, model colour) against the published value (black bar).",
        "claims": "The values each threshold claim is decided on (95% t interval over seeds) "
                  "and its threshold (red bar).",
        "training_curves": "Training loss and validation metric against step (mean ± sd over "
                           "seeds) of each model's chosen setting.",
    }
    if plots:
        from harness import plots as P  # matplotlib is imported only when plots are asked for

        plot_dir = out / "plots"
        several = len(cells) and (cells.groupby("task")["seq_len"].nunique() > 1).any()
        makers = {
            "accuracy_heatmap": lambda: None if several else P.accuracy_heatmap(acc_means, plot_dir),
            "accuracy_vs_seq_len": lambda: P.accuracy_vs_seq_len(cells, plot_dir),
            "scaling": lambda: P.scaling(eff, fits, plot_dir),
            "bubble": lambda: P.bubble(eff, acc_means, plot_dir),
            "published": lambda: P.published_dots(comparison, plot_dir),
            "claims": lambda: P.claim_dots(claim_points(runs, loaded, claims), plot_dir),
            "training_curves": lambda: P.training_curves(load_curves(*dirs), cells, plot_dir),
        }
        for name, make in progress(makers.items(), total=len(makers), desc="report: figures",
                                   unit="figure"):
            path = make()
            if path is not None:
                written[name] = path

    md = ["# seq-arena report", ""]
    md += [f"- {k}: {v}" for k, v in report_header(runs, dirs).items()] + [""]
    for table in display:
        md += [f"## {table.title}", "", table.caption, "", to_markdown(table)]
    md += ["## Figures", ""] + [f"![{k}](plots/{k}.png) ([pdf](plots/{k}.pdf))\n" for k in written]
    (out / "report.md").write_text("\n".join(md))
    figures = [{"name": k, "caption": captions[k],
                "png_base64": base64.b64encode(v.read_bytes()).decode("ascii")}
               for k, v in written.items()]
    (out / "report.html").write_text(render_page(
        title="seq-arena report", header=report_header(runs, dirs), tables=display,
        figures=figures, notes=[]))
    return {**tables, "cells": cells, "efficiency_cells": eff, "plots": written,
            "display": {t.name: t for t in display}, "html": out / "report.html"}


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
    parser.add_argument("--published-matches", action="store_true",
                        help="print every published row with the configuration it is matched to "
                             "(or why it is unmatched), as markdown, and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, handlers=console_handlers())  # a no-op if already set up
    if args.published_matches:
        from harness.report_render import DisplayTable, to_markdown

        table = published_matches(args.published)
        print(to_markdown(DisplayTable(table, "Published rows", "", "published_matches"))
              if len(table) else "no published rows")
        return 0
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
                                              for s in VERDICTS))
    log.info("\nreport: %s", result["html"])
    return 0


if __name__ == "__main__":
    # `python -m harness.report` runs this file as __main__: run the imported module instead, the
    # code the console script runs (its logger is harness.report, not __main__)
    from harness.report import main as _main

    sys.exit(_main())
