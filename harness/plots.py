"""Report figures with seaborn (Agg backend): each is saved as PNG and PDF.

Every function takes the DataFrames of harness.results and returns the written PNG path, or
None when the data cannot make that figure (e.g. one seq_len only).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: reports are written by scripts and on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
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


def _palette(models) -> dict:
    models = sorted(set(models))
    return dict(zip(models, sns.color_palette("tab20" if len(models) > 10 else "tab10",
                                              len(models))))


def accuracy_vs_seq_len(runs: pd.DataFrame, cells: pd.DataFrame, out_dir: Path) -> Path | None:
    """Test metric against seq_len, one panel per task, one line per model (mean ± sd).

    Uses the runs of each cell's chosen setting, so every point is a best-on-val result.
    """
    if cells.empty or "setting" not in cells:
        return None
    chosen = cells[cells["status"] == "ok"][["model", "task", "seq_len", "setting"]]
    data = runs[(runs["kind"] == "train") & (runs["status"] == "ok")].merge(
        chosen, on=["model", "task", "seq_len", "setting"])
    data = data[data["test_metric"].notna()]
    tasks = [t for t, g in data.groupby("task") if g["seq_len"].nunique() > 1]
    if not tasks:
        return None
    data = data[data["task"].isin(tasks)].copy()
    data["value"] = data["test_metric"] * data["metric"].map(display_scale)
    grid = sns.relplot(data=data, x="seq_len", y="value", hue="model", col="task",
                       col_wrap=min(3, len(tasks)), kind="line", marker="o", errorbar="sd",
                       palette=_palette(data["model"]), facet_kws={"sharey": False},
                       height=3.2, aspect=1.2)
    grid.set(xscale="log")
    for task, ax in grid.axes_dict.items():
        metric = data.loc[data["task"] == task, "metric"].iloc[0]
        ax.set_ylabel(UNITS.get(metric, metric))
    grid.set_xlabels("sequence length")
    return _save(grid.figure, out_dir, "accuracy_vs_seq_len")


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
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label)
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
    val["value"] = val["metric"] * val["metric_name"].map(display_scale).fillna(1.0)
    tasks = sorted(val["task"].unique())
    grid = sns.relplot(data=val, x="step", y="value", hue="model", col="task",
                       col_wrap=min(3, len(tasks)), kind="line", errorbar="sd",
                       palette=_palette(val["model"]), facet_kws={"sharey": False,
                                                                  "sharex": False},
                       height=3.2, aspect=1.2)
    for task, ax in grid.axes_dict.items():
        metric = val.loc[val["task"] == task, "metric_name"].iloc[0]
        ax.set_ylabel(f"val {UNITS.get(metric, metric)}")
    return _save(grid.figure, out_dir, "training_curves")
