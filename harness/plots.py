"""Report figures (matplotlib/seaborn, Agg backend), readable at paper size: each saved as PNG and
PDF, legends outside the data, log axes ticked with plain numbers, and one colour per model that
is the same in every figure of every report (:func:`model_colours`).

Every function takes the DataFrames of harness.results / harness.report and returns the written
PNG path, or None when the data cannot make that figure (e.g. one seq_len only).
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

from harness.config import CONF_DIR  # noqa: E402
from harness.results import EFFICIENCY_GROUP, display_scale  # noqa: E402

UNITS = {"accuracy": "accuracy (%)", "bpc": "bits per character"}
# Kelly's colours of maximum contrast (K. Kelly 1965, "Twenty-two colors of maximum contrast"),
# white and black left out, ordered so that neighbours differ most: models next to each other in
# the alphabet (transformer, transformer_xl) never look alike.
# (transformer, 12th of conf/model today, gets the strong blue; the near-black olive goes first.)
KELLY = ["#2B3D26", "#F38400", "#008856", "#BE0032", "#875692", "#F3C300", "#848482", "#A1CAF1",
         "#882D17", "#8DB600", "#E68FAC", "#0067A5", "#F99379", "#604E97", "#F6A600", "#B3446C",
         "#DCD300", "#654522", "#E25822", "#C2B280"]
MARKERS = ["o", "s", "^", "D", "v", "P"]  # with more models than colours, markers tell them apart


def known_models() -> list[str]:
    """The models of conf/model, in the order that fixes their colours."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_colours(models=()) -> dict[str, str]:
    """A colour per model, the same in every figure: the model's place among conf/model/*.yaml
    picks its colour; models not there (e.g. published-only names) follow."""
    order = known_models()
    order += sorted(set(models) - set(order))
    return {m: KELLY[i % len(KELLY)] for i, m in enumerate(order)}


def model_markers(models=()) -> dict[str, str]:
    order = known_models()
    order += sorted(set(models) - set(order))
    return {m: MARKERS[(i // len(KELLY)) % len(MARKERS)] for i, m in enumerate(order)}


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(out_dir / f"{name}.pdf", bbox_inches="tight")
    plt.close(fig)
    return png


def _plain(value: float, _pos=None) -> str:
    """A tick label as a plain number: 0.6, 2, 1000, 0.005 (never 6x10^-1)."""
    if value == 0 or not np.isfinite(value):
        return "0"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def plain_log_axis(ax, which: str = "y") -> None:
    """A log10 axis with ticks at 1, 2, 5 x 10^k, labelled as plain numbers."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(_plain))
    axis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=np.arange(2, 10)))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _length_axis(ax, lengths) -> None:
    """A log2 x axis ticked at the sequence lengths that were run, written out in full."""
    ax.set_xscale("log", base=2)
    ticks = sorted({int(v) for v in lengths})
    ax.set_xticks(ticks, [str(t) for t in ticks], rotation=45 if len(ticks) > 4 else 0)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("sequence length")


def _legend_outside(fig, models, colours, markers) -> None:
    handles = [plt.Line2D([], [], color=colours[m], marker=markers[m], label=m) for m in models]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False, title="model", title_fontsize=8)


def _facets(data: pd.DataFrame, x: str, ylabel, name: str, out_dir: Path, xlog: bool) -> Path:
    """One panel per task, one line per model through ``mean`` with a ± ``sd`` band.

    ``data`` is already aggregated (one row per point): plotting thousands of raw runs with
    seaborn's own aggregation is what made reports slow.
    """
    tasks = sorted(data["task"].unique())
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    colours, markers = model_colours(data["model"]), model_markers(data["model"])
    for ax, task in zip(axes.flat, tasks):
        part = data[data["task"] == task].sort_values(x)
        for model, line in part.groupby("model"):
            sd = line["sd"].fillna(0.0)
            ax.plot(line[x], line["mean"], color=colours[model], marker=markers[model], ms=4)
            ax.fill_between(line[x], line["mean"] - sd, line["mean"] + sd, alpha=0.15,
                            color=colours[model], linewidth=0)
        ax.set(title=task, ylabel=ylabel(part))
        if xlog:
            _length_axis(ax, part[x])
        else:
            ax.set_xlabel(x)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    _legend_outside(fig, sorted(data["model"].unique()), colours, markers)
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


def accuracy_heatmap(means: pd.DataFrame, out_dir: Path) -> Path | None:
    """Model by task, the cell's test accuracy (%) written in it: the picture of a one-length
    accuracy table (Avg included). Cells with no number are left blank."""
    if means.empty or means.notna().sum().sum() == 0:
        return None
    data = means.astype(float)
    fig, ax = plt.subplots(figsize=(1.1 * len(data.columns) + 2.5, 0.42 * len(data) + 1.2))
    sns.heatmap(data, annot=True, fmt=".1f", cmap="viridis", vmin=0, vmax=100, ax=ax,
                cbar_kws={"label": "test accuracy (%)"}, linewidths=0.5, linecolor="white",
                annot_kws={"fontsize": 8})
    ax.set(xlabel="task", ylabel="model")
    ax.tick_params(axis="x", rotation=30)
    plt.setp(ax.get_xticklabels(), ha="right")
    return _save(fig, out_dir, "accuracy_heatmap")


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
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours, markers = model_colours(data["model"]), model_markers(data["model"])
    handles = []
    for ax, column, label, fit_col in ((axes[0], "step_ms", "step time (ms)", "time_exponent"),
                                       (axes[1], "peak_gb", "peak memory (GB)", "memory_exponent")):
        for model, g in data.groupby("model"):
            g = g.sort_values("seq_len")
            y = g[column].where(g[column] > 0)
            ax.plot(g["seq_len"], y, marker=markers[model], ms=4, color=colours[model])
        ax.set_ylabel(label)
        plain_log_axis(ax, "y")
        _length_axis(ax, data["seq_len"])
    for model in sorted(data["model"].unique()):
        fit = fits[fits["model"] == model]
        slopes = [f"{fit[c].iloc[0]:.2f}" if len(fit) and pd.notna(fit[c].iloc[0]) else "–"
                  for c in ("time_exponent", "memory_exponent")]
        handles.append(plt.Line2D([], [], color=colours[model], marker=markers[model],
                                  label=f"{model} (slopes {slopes[0]}, {slopes[1]})"))
    first = data.iloc[0]
    fig.suptitle(f"task {first['task']}, batch {first['batch_size']}, "
                 f"{first['env.device_name']} ({first['source']} records)", fontsize=9)
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False, title="model (time, memory slope)", title_fontsize=8)
    return _save(fig, out_dir, "scaling")


def place_labels(ax, xs, ys, labels, *, fontsize: float = 7) -> list:
    """Text labels beside points, nudged apart so that no two overlap.

    Each label starts just right of its point; going through them from the top, a label whose
    box overlaps one already placed moves down below it (a leader line joins a moved label to
    its point). Boxes are measured in display coordinates after a draw.
    """
    fig = ax.figure
    leader = dict(arrowstyle="-", lw=0.5, color="#888", shrinkA=0, shrinkB=2)
    texts = [ax.annotate(label, (x, y), xytext=(6, 0), textcoords="offset points",
                         fontsize=fontsize, va="center", arrowprops=leader)
             for x, y, label in zip(xs, ys, labels)]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    order = sorted(range(len(texts)), key=lambda i: -texts[i].get_window_extent(renderer).y0)
    placed = []
    for i in order:
        text = texts[i]
        box = text.get_window_extent(renderer)
        shift = 0.0
        for _ in range(len(placed) + 1):
            moved = box.translated(0, -shift)
            clash = [p for p in placed if moved.overlaps(p)]
            if not clash:
                break
            shift = box.y1 - min(p.y0 for p in clash) + 1.0
        if shift:
            text.set_position((6, -shift * 72.0 / fig.dpi))  # display pixels -> points
        placed.append(box.translated(0, -shift))
    return texts


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
    colours = model_colours(points["model"])
    biggest = points["peak_gb"].max()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for _, p in points.iterrows():
        # bubble area proportional to peak memory, as in LRA Figure 3
        area = 2000 * p["peak_gb"] / biggest if biggest > 0 else 200
        ax.scatter(p["steps_per_s"], p["score"], s=max(area, 20), alpha=0.5,
                   color=colours[p["model"]], edgecolor="black", linewidth=0.3)
    if points["steps_per_s"].max() > 10 * points["steps_per_s"].min():
        plain_log_axis(ax, "x")
    ax.margins(x=0.25, y=0.15)
    ax.set(xlabel=f"steps per second at L={int(data['seq_len'].max())}",
           ylabel="accuracy score (%)", title="speed, accuracy and memory (bubble area)")
    place_labels(ax, points["steps_per_s"], points["score"],
                 [f"{m} ({gb:.3g} GB)" for m, gb in zip(points["model"], points["peak_gb"])])
    return _save(fig, out_dir, "bubble")


def published_dots(comparison: pd.DataFrame, out_dir: Path) -> Path | None:
    """Ours against published accuracy: one row per (model, task), our value as a dot in the
    model's colour, the published value as a black bar; the gap is the line between them."""
    if comparison.empty:
        return None
    data = comparison[(comparison["metric"] == "accuracy") & comparison["ours"].notna()
                      & (comparison["task"] != "average")]
    if data.empty:
        return None
    data = data.sort_values(["task", "model", "source"]).reset_index(drop=True)
    labels = [f"{r.model} · {r.task}" + (f" ({r.source})" if data.duplicated(["model", "task"],
                                                                               keep=False)[i]
                                           else "") for i, r in enumerate(data.itertuples())]
    colours = model_colours(data["model"])
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(data) + 1.2))
    y = np.arange(len(data))
    ax.hlines(y, data["ours"], data["published"].astype(float), color="#bbb", lw=1, zorder=1)
    ax.scatter(data["published"].astype(float), y, marker="|", s=160, color="black", zorder=2)
    ax.scatter(data["ours"], y, color=[colours[m] for m in data["model"]], s=36, zorder=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[plt.Line2D([], [], color="black", marker="|", ls="", ms=10, label="published"),
                       plt.Line2D([], [], color="#555", marker="o", ls="", label="ours (model colour)")],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _save(fig, out_dir, "published")


def claim_dots(points: pd.DataFrame, out_dir: Path) -> Path | None:
    """Each claim's deciding values against its threshold: a dot per value (± the seeds' sd as
    an interval where there are several seeds), the threshold as a red bar, verdict in the label.

    ``points`` (harness.report.claim_points): claim, verdict, model, value, low, high, threshold,
    unit; one panel per unit (accuracy, bpc, exponent).
    """
    if points.empty:
        return None
    units = list(dict.fromkeys(points["unit"]))
    heights = [points[points["unit"] == u]["claim"].nunique() for u in units]
    fig, axes = plt.subplots(len(units), 1, figsize=(7, 0.45 * sum(heights) + 1.2 * len(units)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    colours = model_colours(points["model"])
    for ax, unit in zip(axes[:, 0], units):
        part = points[points["unit"] == unit]
        claims = list(dict.fromkeys(part["claim"]))
        row = {c: i for i, c in enumerate(claims)}
        for _, p in part.iterrows():
            yy = row[p["claim"]]
            if pd.notna(p["low"]) and pd.notna(p["high"]):
                ax.hlines(yy, p["low"], p["high"], color=colours[p["model"]], lw=2, alpha=0.6)
            ax.scatter(p["value"], yy, color=colours[p["model"]], s=30, zorder=3)
        thresholds = part.drop_duplicates("claim")
        ax.scatter(thresholds["threshold"], [row[c] for c in thresholds["claim"]], marker="|",
                   s=250, color="#b00020", zorder=4)
        verdicts = part.drop_duplicates("claim").set_index("claim")["verdict"]
        ax.set_yticks(range(len(claims)), [f"{c} [{verdicts[c]}]" for c in claims], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3)
    models = sorted(points["model"].unique())
    handles = [plt.Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in models]
    handles.append(plt.Line2D([], [], color="#b00020", marker="|", ls="", ms=12, label="threshold"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    return _save(fig, out_dir, "claims")


def training_curves(curves: pd.DataFrame, cells: pd.DataFrame, out_dir: Path) -> Path | None:
    """Training loss (top row) and validation metric (bottom row) against step, one column per
    task, one line per model (mean ± sd over seeds).

    Only the runs of each cell's chosen setting, at the task's largest seq_len, are drawn; runs
    written before metrics.jsonl had train lines show their validation curve only.
    """
    if curves.empty or "split" not in curves or cells.empty or "setting" not in cells:
        return None
    chosen = cells[cells["status"] == "ok"]
    chosen = chosen[chosen["seq_len"] == chosen.groupby("task")["seq_len"].transform("max")]
    keys = ["model", "task", "seq_len", "setting"]
    mine = curves.merge(chosen[keys], on=keys)
    if mine.empty:
        return None
    val = mine[mine["split"] == "val"]
    if "metric" in val and val["metric"].notna().any():
        val = val[val["metric"].notna()]
        val = val.assign(value=val["metric"] * val["metric_name"].map(display_scale).fillna(1.0))
    else:
        val = val[:0]
    train = mine[(mine["split"] == "train") & mine["loss"].notna()].assign(value=lambda d: d["loss"])
    rows = [(name, part) for name, part in (("training loss", train), ("val", val)) if len(part)]
    if not rows:
        return None
    tasks = sorted(mine["task"].unique())
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(4.2 * len(tasks), 3.1 * len(rows)),
                             squeeze=False)
    colours, markers = model_colours(mine["model"]), model_markers(mine["model"])
    for r, (name, part) in enumerate(rows):
        data = part.groupby(["task", "model", "step"], as_index=False).agg(
            mean=("value", "mean"), sd=("value", "std"))
        for c, task in enumerate(tasks):
            ax = axes[r, c]
            for model, line in data[data["task"] == task].groupby("model"):
                line = line.sort_values("step")
                sd = line["sd"].fillna(0.0)
                ax.plot(line["step"], line["mean"], color=colours[model], lw=1.2,
                        marker=markers[model] if len(line) <= 20 else None, ms=3)
                ax.fill_between(line["step"], line["mean"] - sd, line["mean"] + sd, alpha=0.15,
                                color=colours[model], linewidth=0)
            if name == "training loss":
                ylabel = "training loss"
                if data[data["task"] == task]["mean"].gt(0).all():
                    plain_log_axis(ax, "y")
            else:
                metric = part[part["task"] == task]["metric_name"].dropna()
                ylabel = "val " + UNITS.get(metric.iloc[0] if len(metric) else None, "metric")
            ax.set(title=task if r == 0 else "", xlabel="step", ylabel=ylabel)
    fig.tight_layout()
    _legend_outside(fig, sorted(mine["model"].unique()), colours, markers)
    return _save(fig, out_dir, "training_curves")
