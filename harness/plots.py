"""Report figures with seaborn (Agg backend): each is saved as PNG and PDF.

Every function takes the DataFrames of harness.results and returns the written PNG path, or
None when the data cannot make that figure (e.g. one seq_len only).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: reports are written by scripts and on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from harness.results import EFFICIENCY_GROUP, display_scale  # noqa: E402

UNITS = {"accuracy": "accuracy (%)", "bpc": "bits per character"}


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(out_dir / f"{name}.pdf", bbox_inches="tight")
    plt.close(fig)
    return png


def _length_axis(ax, lengths) -> None:
    """A log2 x axis ticked at the sequence lengths that were run, written out in full."""
    ax.set_xscale("log", base=2)
    ticks = sorted({int(v) for v in lengths})
    ax.set_xticks(ticks, [str(t) for t in ticks], rotation=45 if len(ticks) > 4 else 0)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("sequence length")


def _palette(models) -> dict:
    models = sorted(set(models))
    return dict(zip(models, sns.color_palette("tab20" if len(models) > 10 else "tab10",
                                              len(models))))


def _facets(data: pd.DataFrame, x: str, ylabel, name: str, out_dir: Path,
            xlog: bool) -> Path:
    """One panel per task, one line per model through ``mean`` with a ± ``sd`` band.

    ``data`` is already aggregated (one row per point): plotting thousands of raw runs with
    seaborn's own aggregation is what made reports slow.
    """
    tasks = sorted(data["task"].unique())
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    palette = _palette(data["model"])
    for ax, task in zip(axes.flat, tasks):
        part = data[data["task"] == task].sort_values(x)
        sns.lineplot(data=part, x=x, y="mean", hue="model", palette=palette, marker="o",
                     errorbar=None, ax=ax, legend=False)
        for model, line in part.groupby("model"):
            sd = line["sd"].fillna(0.0)
            ax.fill_between(line[x], line["mean"] - sd, line["mean"] + sd, alpha=0.15,
                            color=palette[model], linewidth=0)
        ax.set(title=task, ylabel=ylabel(part))
        if xlog:
            _length_axis(ax, part[x])
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=c, marker="o", label=m) for m, c in palette.items()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def accuracy_vs_seq_len(cells: pd.DataFrame, out_dir: Path) -> Path | None:
    """Test metric against seq_len, one panel per task, one line per model (mean ± sd).

    Points are the summary cells (best setting on val, mean and sd over seeds); only tasks run
    at two or more lengths are drawn.
    """
    if cells.empty or "mean" not in cells:
        return None
    data = cells[(cells["status"] == "ok") & cells["mean"].notna()].rename(columns={"std": "sd"})
    data = data[data.groupby("task")["seq_len"].transform("nunique") > 1]
    if data.empty:
        return None
    return _facets(data, "seq_len", lambda part: UNITS.get(part["metric"].iloc[0], "metric"),
                   "accuracy_vs_seq_len", out_dir, xlog=True)


def _main_group(eff: pd.DataFrame) -> pd.DataFrame:
    """The efficiency group (task, batch, device) with the most measurements."""
    ok = eff[eff["status"] == "ok"]
    if ok.empty:
        return ok
    sizes = ok.groupby(EFFICIENCY_GROUP, dropna=False).size()
    key = sizes.idxmax()
    mask = np.ones(len(ok), dtype=bool)
    for col, value in zip(EFFICIENCY_GROUP, key):
        mask &= (ok[col].isna() if pd.isna(value) else ok[col] == value).to_numpy()
    return ok[mask]


def scaling(eff: pd.DataFrame, fits: pd.DataFrame, out_dir: Path) -> Path | None:
    """Step time and peak memory against seq_len on log-log axes; fitted slopes in the legend."""
    data = _main_group(eff)
    if data.empty or data["seq_len"].nunique() < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    palette = _palette(data["model"])
    for ax, column, label, fit_col in ((axes[0], "step_ms", "step time (ms)", "time_exponent"),
                                       (axes[1], "peak_gb", "peak memory (GB)", "memory_exponent")):
        for model, g in data.groupby("model"):
            g = g.sort_values("seq_len")
            fit = fits[fits["model"] == model][fit_col]
            slope = f" (slope {fit.iloc[0]:.2f})" if len(fit) and pd.notna(fit.iloc[0]) else ""
            y = g[column].where(g[column] > 0)
            ax.plot(g["seq_len"], y, marker="o", color=palette[model], label=f"{model}{slope}")
        ax.set(yscale="log", ylabel=label)
        _length_axis(ax, data["seq_len"])
        ax.legend(fontsize=7)
    first = data.iloc[0]
    fig.suptitle(f"task {first['task']}, batch {first['batch_size']}, "
                 f"{first['env.device_name']} ({first['source']} records)", fontsize=9)
    return _save(fig, out_dir, "scaling")


def bubble(eff: pd.DataFrame, accuracy: pd.DataFrame, out_dir: Path) -> Path | None:
    """LRA Figure 3: x steps/s, y accuracy score, bubble area peak memory, one bubble a model.

    Speed and memory are taken at the largest seq_len of the main efficiency group; the score is
    the table's Avg column, or the model's mean over the accuracy columns it has.
    """
    data = _main_group(eff)
    if data.empty or accuracy.empty:
        return None
    at = data[data["seq_len"] == data["seq_len"].max()].set_index("model")
    rows = []
    for model, row in accuracy.iterrows():
        if model not in at.index:
            continue
        score = row.get("Avg", np.nan)
        if pd.isna(score):
            score = pd.to_numeric(row.drop("Avg", errors="ignore"), errors="coerce").mean()
        if pd.notna(score):
            rows.append({"model": model, "steps_per_s": at.loc[model, "steps_per_s"],
                         "score": score, "peak_gb": at.loc[model, "peak_gb"]})
    if not rows:
        return None
    points = pd.DataFrame(rows)
    palette = _palette(points["model"])
    biggest = points["peak_gb"].max()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for _, p in points.iterrows():
        # bubble area proportional to peak memory, as in LRA Figure 3
        area = 2000 * p["peak_gb"] / biggest if biggest > 0 else 200
        ax.scatter(p["steps_per_s"], p["score"], s=max(area, 20), alpha=0.5,
                   color=palette[p["model"]], label=f"{p['model']} ({p['peak_gb']:.3g} GB)")
        ax.annotate(p["model"], (p["steps_per_s"], p["score"]), fontsize=7, ha="center")
    if points["steps_per_s"].max() > 10 * points["steps_per_s"].min():
        ax.set_xscale("log")
    ax.set(xlabel=f"steps per second at L={int(data['seq_len'].max())}",
           ylabel="accuracy score (%)", title="speed, accuracy and memory (bubble area)")
    ax.legend(fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left", markerscale=0.3)
    return _save(fig, out_dir, "bubble")


def training_curves(curves: pd.DataFrame, cells: pd.DataFrame, out_dir: Path) -> Path | None:
    """Validation metric against step, one panel per task, one line per model (mean ± sd).

    Only the runs of each cell's chosen setting, at the task's largest seq_len, are drawn.
    """
    if curves.empty or "split" not in curves or cells.empty or "setting" not in cells:
        return None
    chosen = cells[cells["status"] == "ok"]
    chosen = chosen[chosen["seq_len"] == chosen.groupby("task")["seq_len"].transform("max")]
    val = curves[(curves["split"] == "val") & curves["metric"].notna()].merge(
        chosen[["model", "task", "seq_len", "setting"]], on=["model", "task", "seq_len", "setting"])
    if val.empty:
        return None
    val = val.assign(value=val["metric"] * val["metric_name"].map(display_scale).fillna(1.0))
    data = val.groupby(["task", "model", "step"], as_index=False).agg(
        mean=("value", "mean"), sd=("value", "std"), metric_name=("metric_name", "first"))
    return _facets(data, "step", lambda part: "val " + UNITS.get(part["metric_name"].iloc[0],
                                                                 "metric"),
                   "training_curves", out_dir, xlog=False)
