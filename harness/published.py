"""Published numbers (``results/published/*.csv``) and the runs each is set beside.

A published row names the configuration that reproduces its source's model (``experiment``,
``model_config``), how it was measured (``protocol``) and whether the harness matches it
(``matched``, else ``why_unmatched``); results/published/README.md describes the format.
:func:`compare_published` sets our number beside a row only when all of that matches;
:func:`published_matches` lists every row with its configuration (``arena-report
--published-matches``). Formatting lives in harness.report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import PUBLISHED_DIR
from harness.results import efficiency_cells, in_experiments, summarize, t_interval

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")  # LRA's Avg leaves out Path-X


def load_published(directory: str | Path = PUBLISHED_DIR) -> pd.DataFrame:
    """Every ``*.csv`` in ``directory`` (the tidy published-numbers format), concatenated."""
    frames = [pd.read_csv(p, dtype={"model": str, "task": str}) for p in
              sorted(Path(directory).glob("*.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


PUBLISHED_CONFIG = ("experiment", "model_config", "protocol", "matched", "why_unmatched")
# How a published number was measured, and where ours comes from (results/published/README.md):
#   test                    best-on-val checkpoint's test metric, trained and tested at seq_len
#   extrapolation from N    trained at length N, tested at seq_len (test_<metric>_len<seq_len>)
#   average                 the mean of the five LRA tasks' test accuracies (Path-X excluded)
#   speed, speedup          steps/s, peak memory, speed-up over transformer at seq_len
PROTOCOLS = ("test", "extrapolation from N", "average", "speed", "speedup")


def model_config(text) -> dict[str, str]:
    """``"model=transformer model.positional=rope"`` as run columns: ``{"model": "transformer",
    "config.model.positional": "rope"}``."""
    out = {}
    for item in str(text or "").split():
        key, _, value = item.partition("=")
        out[key if key == "model" else f"config.{key}"] = value
    return out


def _same(column: pd.Series, value: str) -> pd.Series:
    numeric = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    if pd.notna(numeric):
        return pd.to_numeric(column, errors="coerce") == numeric
    return column.astype(str) == value


def matched_runs(runs: pd.DataFrame, pub) -> pd.DataFrame:
    """The runs a published row is compared with: its experiment's, with its model options."""
    if not pub.get("experiment") or runs.empty:
        return runs.iloc[0:0]
    mine = in_experiments(runs, pub["experiment"])
    for column, value in model_config(pub.get("model_config")).items():
        if column not in mine:
            return mine.iloc[0:0]
        mine = mine[_same(mine[column], value)]
    return mine[mine["task"] == pub["task"]] if pub["task"] != "average" else mine


def configuration(pub) -> str:
    return " ".join(x for x in (f"experiment={pub['experiment']}" if pub.get("experiment")
                                else "", str(pub.get("model_config") or "")) if x)


def compare_published(published: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Published numbers beside ours: one row per published row of a (model, task) we ran.

    A run is set beside a published number only when the row is matched (``matched`` yes: the
    configuration it names reproduces the source's model) and the runs are of that experiment
    and model options, on that task, measured by that protocol (PROTOCOLS) at that length. Every
    other row keeps ``ours`` empty and says why in ``match``. Accuracy and bpc: mean, 95%
    interval and seeds of the chosen setting; speed: steps/s, speed-up over the transformer of
    the same experiment, peak memory; ``diff`` = ours - published (accuracy, bpc, speed-up).
    """
    if published.empty or runs.empty:
        return pd.DataFrame()
    for column in PUBLISHED_CONFIG:
        if column not in published:
            published = published.assign(**{column: ""})
    published = published.fillna({c: "" for c in PUBLISHED_CONFIG})
    ran = set(zip(runs["model"], runs["task"]))
    ran |= {(m, "average") for m, t in ran if t in LRA_TASKS}  # LRA's Avg: models run on LRA
    rows = []
    for _, pub in published.iterrows():
        mine = matched_runs(runs, pub) if pub["matched"] == "yes" else runs.iloc[0:0]
        if mine.empty and (pub["model"], pub["task"]) not in ran:
            continue
        ours = {"ours": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": np.nan}
        if pub["matched"] != "yes":
            match = f"unmatched: {pub['why_unmatched'] or 'no configuration named'}"
        elif mine.empty:
            match = f"unmatched: no runs of {configuration(pub)} on {pub['task']} here"
        else:
            ours = _ours(in_experiments(runs, pub["experiment"]), mine, pub)
            match = f"matched: {configuration(pub)}" if pd.notna(ours["ours"]) else \
                f"unmatched: no {pub['protocol']} number at seq_len {pub['seq_len']} in those runs"
        metric = pub["metric"]
        diff = ours["ours"] - float(pub["value"]) if metric in ("accuracy", "bpc", "speedup") \
            and pd.notna(ours["ours"]) and pd.notna(pub["value"]) else np.nan
        rows.append({"source": pub["source"], "table": pub["table"], "model": pub["model"],
                     "paper_model": pub.get("paper_model", pub["model"]), "task": pub["task"],
                     "seq_len": pub["seq_len"], "metric": metric, "published": pub["value"],
                     **ours, "diff": diff, "configuration": configuration(pub),
                     "protocol": pub["protocol"], "match": match, "unit": pub["unit"],
                     "note": pub["note"]})
    return pd.DataFrame(rows)


def _ours(study: pd.DataFrame, mine: pd.DataFrame, pub) -> dict:
    """Our number for a matched published row by its protocol (NaN when the runs lack it)."""
    none = {"ours": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": np.nan}
    protocol, L, metric = str(pub["protocol"]), pub["seq_len"], pub["metric"]
    if protocol in ("speed", "speedup"):
        eff = efficiency_cells(study)
        hit = eff[(eff["model"] == pub["model"]) & (eff["task"] == pub["task"])
                  & (eff["seq_len"] == L) & (eff["status"] == "ok")] if len(eff) else eff
        hit = hit[hit["model"].isin(mine["model"])] if len(hit) else hit
        column = {"steps_per_s": "steps_per_s", "speedup": "speedup",
                  "peak_memory_gb": "peak_gb"}.get(metric)
        if hit.empty or column is None:
            return none
        return {**none, "ours": hit[column].iloc[0], "n": hit["n"].iloc[0]}
    cells = summarize(mine)
    cells = cells[cells["status"] == "ok"]
    if protocol == "average":
        per_task = cells[cells["task"].isin(LRA_TASKS)]
        if set(per_task["task"]) != set(LRA_TASKS) or per_task["task"].duplicated().any():
            return none
        return {**none, "ours": per_task["mean"].mean(), "n": per_task["n"].min()}
    if protocol.startswith("extrapolation from "):
        trained = float(protocol.rsplit(" ", 1)[1])
        column = f"test_{metric}_len{int(L)}" if pd.notna(L) else None
        hit = cells[cells["seq_len"] == trained]
        if hit.empty or column not in hit or hit[column].isna().all():
            return none
        row = hit.iloc[0]
        mean, std, n = row[column], row.get(f"{column}_std"), row.get(f"{column}_n")
    else:
        hit = cells[cells["seq_len"] == L]
        if hit.empty:
            return none
        row = hit.iloc[0]
        mean, std, n = row["mean"], row["std"], row["n"]
    low, high = t_interval(mean, std, n, metric=metric)
    return {"ours": mean, "ci_low": low, "ci_high": high, "n": n}


def published_matches(directory: str | Path = PUBLISHED_DIR) -> pd.DataFrame:
    """Every published row with the configuration it is matched to, or why it is unmatched
    (``arena-report --published-matches``)."""
    published = load_published(directory)
    if published.empty:
        return published
    published = published.fillna({c: "" for c in PUBLISHED_CONFIG if c in published})
    return pd.DataFrame({
        "source": published["source"], "table": published["table"],
        "paper_model": published["paper_model"], "task": published["task"],
        "seq_len": published["seq_len"].map(lambda v: "" if pd.isna(v) else f"{int(v)}"),
        "metric": published["metric"], "value": published["value"],
        "protocol": published.get("protocol", ""),
        "match": [f"matched: {configuration(r)}" if r.get("matched") == "yes" else
                  f"unmatched ({configuration(r) or 'no configuration'}): {r.get('why_unmatched')}"
                  for _, r in published.iterrows()]})
