"""Run records read back into pandas: loading, best-on-val selection, efficiency cells.

Every number in a report is computed here from ``record.json`` files (schema 1, see
harness/records.py) and ``metrics.jsonl`` curves, so that a notebook gets the same numbers as
``arena-report``:

    >>> runs = load_runs("results/sweeps/lra")       # one row per record.json
    >>> cells = summarize(runs)                      # best setting on val, test mean ± std
    >>> eff = efficiency_cells(runs)                 # steps/s and peak memory per (model, L)

Units: records hold accuracy as a fraction; summaries report it in percent (as papers do), bpc
as is. Claims thresholds and published numbers use the same display units.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from harness.config import NON_RESULT_BENCH_KEYS, NON_RESULT_TASK_KEYS, NON_RESULT_TRAINER_KEYS, RESULT_KEYS
from harness.records import METRICS_FILE, RECORD_FILE, parse_record
from tasks.base import progress

REQUIRED = ("kind", "status", "model", "task")
HIGHER_IS_BETTER = {"accuracy": True, "bpc": False, "loss": False, "ppl": False}
DISPLAY_SCALE = {"accuracy": 100.0}  # fraction -> percent
# Config columns that make two runs different "settings": those under the result nodes
# (harness.config.RESULT_KEYS) minus bookkeeping, and never a seed (a key whose last part is
# "seed", e.g. config.seed or config.task.seed, marks a replicate, not a setting).
SETTING_PREFIXES = tuple(f"config.{k}." for k in RESULT_KEYS if k != "seed")
IGNORED_CONFIG = (
    {f"config.trainer.{k}" for k in NON_RESULT_TRAINER_KEYS}
    | {f"config.task.{k}" for k in NON_RESULT_TASK_KEYS}
    | {f"config.bench.{k}" for k in NON_RESULT_BENCH_KEYS}
)
# The settings that change how step time and memory grow with length: speed-ups are taken and
# scaling exponents fitted within one group, never across two. A compile switch goes here too
# when a config key for one exists (none does yet).
EFFICIENCY_GROUP = ["task", "batch_size", "env.device_name", "precision", "env.threads"]


# --------------------------------------------------------------------------- loading


def _find(paths, name: str) -> list[Path]:
    found = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            if path.name == name:
                found.append(path)
            continue
        if not path.exists():
            warnings.warn(f"{path}: no such file or directory; nothing read from it", stacklevel=3)
        for root, dirs, files in os.walk(path):
            # hidden folders hold no results: .hydra, and runs set aside (.superseded-*)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if name in files:
                found.append(Path(root) / name)
    return found


def _flatten(d: dict, prefix: str, out: dict) -> None:
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            _flatten(value, name + ".", out)
        elif isinstance(value, (list, dict)):
            out[name] = json.dumps(value)  # hashable, so settings can be compared and grouped
        else:
            out[name] = value


def _setting_key(config: dict) -> str:
    """A string naming a run's hyper-parameter setting: its config minus seeds and bookkeeping."""
    flat: dict = {}
    _flatten(config, "config.", flat)
    kept = {k: v for k, v in flat.items() if not _is_ignored(k)}
    return json.dumps(kept, sort_keys=True, default=str)


def _is_ignored(column: str) -> bool:
    return (not column.startswith(SETTING_PREFIXES) or column.rsplit(".", 1)[-1] == "seed"
            or any(column == k or column.startswith(k + ".") for k in IGNORED_CONFIG))


def _metric_name(metrics: dict) -> str | None:
    for key in metrics:
        if key.startswith("val_") and key != "val_loss" and "_len" not in key:
            return key[4:]
    for key in metrics:
        if key.startswith("test_") and key != "test_loss" and "_len" not in key:
            return key[5:]
    return None


def load_runs(*paths) -> pd.DataFrame:
    """Read every ``record.json`` under ``paths`` into one DataFrame, one row per record.

    Nested sections are flattened to dotted columns (``config.trainer.lr``,
    ``metrics.test_accuracy``, ``speed.step_ms_median``, ``env.device_name``); unknown extra
    fields are kept. Added columns: ``run_dir``; ``metric`` (the task metric's name, e.g.
    ``accuracy``); ``val_metric`` / ``test_metric`` (its raw values); ``setting`` (a key that is
    equal for runs differing only in seed). A record that cannot be parsed, or lacks one of
    kind/status/model/task, is skipped with a warning naming the file.
    """
    records = []
    for path in progress(_find(paths or ("results",), RECORD_FILE), desc="reading records",
                         unit="record"):
        record, problem = parse_record(path)
        if problem is not None:
            warnings.warn(f"skipping {path}: {problem}", stacklevel=2)
            continue
        records.append((str(path.parent), record))
    return records_frame(records)


def records_frame(records: list[tuple[str, dict]]) -> pd.DataFrame:
    """One row per ``(where, record)``: the columns of :func:`load_runs`, from records however
    they were obtained (files, or W&B runs through harness.wandb_runs)."""
    rows = []
    for where, record in records:
        missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            warnings.warn(f"skipping {where}: missing field(s) {', '.join(missing)}", stacklevel=3)
            continue
        row: dict = {}
        _flatten(record, "", row)
        metrics = record.get("metrics") or {}
        metric = _metric_name(metrics) if isinstance(metrics, dict) else None
        row["run_dir"] = where
        row["metric"] = metric
        row["val_metric"] = metrics.get(f"val_{metric}") if metric else None
        row["test_metric"] = metrics.get(f"test_{metric}") if metric else None
        row["setting"] = _setting_key(record.get("config") or {})
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("kind", "status", "model", "task", "seed", "seq_len", "batch_size", "metric",
                "val_metric", "test_metric", "setting", "run_dir", "env.device_name"):
        if col not in df:
            df[col] = pd.Series(dtype=float if col.endswith("metric") else object)
    return df


def load_wandb_runs(project: str, filters: dict | None = None) -> pd.DataFrame:
    """The same DataFrame from the runs of W&B project ``entity/project`` (public API; offline
    runs need ``wandb sync`` first, see harness.wandb_runs)."""
    from harness.wandb_runs import records_from_wandb_api

    return records_frame([(r["source"], r) for r in records_from_wandb_api(project, filters)])


def load_curves(*paths) -> pd.DataFrame:
    """Read every ``metrics.jsonl`` under ``paths``: one row per evaluation line.

    Columns: the JSON fields (step, split, loss, metric_name, metric, elapsed_s, tokens_per_s),
    ``run_dir``, and model/task/seed/seq_len/setting from the ``record.json`` beside the file
    when there is one (a run still in progress has none yet). Unparseable lines (a run killed
    mid-write) are skipped with a warning naming the file and line.
    """
    frames = []
    for path in progress(_find(paths or ("results",), METRICS_FILE), desc="reading curves",
                         unit="file"):
        lines = []
        try:
            raw_lines = path.read_bytes().splitlines()
        except OSError as e:
            warnings.warn(f"skipping {path}: unreadable ({e})", stacklevel=2)
            continue
        for lineno, raw in enumerate(raw_lines, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                line = None
            if not isinstance(line, dict) or not isinstance(line.get("step"), int) or "split" not in line:
                warnings.warn(f"skipping {path}:{lineno}: not a metrics line", stacklevel=2)
                continue
            lines.append(line)
        if not lines:
            continue
        frame = pd.DataFrame(lines)
        frame["run_dir"] = str(path.parent)
        record, _ = parse_record(path.parent / RECORD_FILE) if (path.parent / RECORD_FILE).exists() else ({}, None)
        record = record or {}
        for key in ("model", "task", "seed", "seq_len", "status"):
            frame[key] = record.get(key)
        frame["setting"] = _setting_key(record.get("config") or {})
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["step", "split", "loss", "metric_name", "metric", "run_dir", "model", "task"])


# --------------------------------------------------------------------------- filtering

_OPS = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal,
        "ne": np.not_equal, "eq": np.equal}


def filter_runs(df: pd.DataFrame, where: dict | None) -> pd.DataFrame:
    """Rows of ``df`` matching ``where``: {column: value | [values] | {gt|ge|lt|le|ne|eq: v}}.

    Columns are the dotted names of load_runs (``config.sweep.name``, ``seq_len``); a column
    no record has matches nothing.
    """
    keep = pd.Series(True, index=df.index)
    for column, cond in (where or {}).items():
        if column not in df:
            return df.iloc[0:0]
        col = df[column]
        if isinstance(cond, dict):
            for op, value in cond.items():
                if op not in _OPS:
                    raise ValueError(f"where {column}: unknown operator {op!r}; use {sorted(_OPS)}")
                numeric = pd.to_numeric(col, errors="coerce")
                keep &= pd.Series(_OPS[op](numeric, value), index=df.index).fillna(False)
        elif isinstance(cond, list):
            keep &= col.isin(cond)
        else:
            keep &= col == cond
    return df[keep]


def experiment_of(df: pd.DataFrame) -> pd.Series:
    """The experiment each run belongs to: the record's ``experiment`` field (the ``experiment=``
    choice, recorded by harness.records.new_record), else ``config.sweep.name`` (records written
    before that field, or runs without ``experiment=``; every experiment names its sweep after
    itself)."""
    out = df["experiment"] if "experiment" in df else pd.Series(None, index=df.index, dtype=object)
    if "config.sweep.name" in df:
        out = out.where(out.notna(), df["config.sweep.name"])
    return out


def in_experiments(df: pd.DataFrame, names) -> pd.DataFrame:
    """The runs of ``df`` that belong to one of the experiments ``names`` (a name or a list)."""
    names = [names] if isinstance(names, str) else list(names)
    return df[experiment_of(df).isin(names)]


# --------------------------------------------------------------------------- statistics

CONFIDENCE = 0.95
MIN_SEEDS = 3  # a cell with fewer ok seeds decides no claim ("too few seeds")
# Chance accuracy by task: 1 / classes for the classification tasks; for the synthetic token
# tasks what their headline() says (1 / data symbols), and for MQAR 1 / n_pairs: a model that
# copies any value of the context is right that often.
CLASSES = {"listops": 10, "image": 10, "text": 2, "retrieval": 2, "pathfinder": 2, "pathx": 2}
SYMBOLS_BESIDE = {"copying": 2, "induction_heads": 2, "selective_copying": 2, "reverse": 4}


def t_interval(mean: float, std: float, n: int, confidence: float = CONFIDENCE,
               metric: str | None = None) -> tuple[float, float]:
    """Student-t interval of a mean over ``n`` seeds from its sample std (NaN for one seed; the
    point itself when every seed gave the same number); an accuracy's is cut to [0, 100]."""
    if not n or n < 2 or pd.isna(mean) or pd.isna(std):
        return math.nan, math.nan
    if std == 0:
        return float(mean), float(mean)
    low, high = scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    if metric == "accuracy":
        low, high = max(low, 0.0), min(high, 100.0)
    return float(low), float(high)


def chance_level(task: str, config_task: dict) -> float | None:
    """Chance accuracy (a fraction) of ``task`` with config ``config_task``; None when unknown."""
    if task in CLASSES:
        return 1.0 / CLASSES[task]
    vocab = config_task.get("vocab_size")
    if task in SYMBOLS_BESIDE and _number(vocab) and vocab > SYMBOLS_BESIDE[task]:
        return 1.0 / (vocab - SYMBOLS_BESIDE[task])
    pairs = config_task.get("n_pairs")
    if task == "mqar" and _number(pairs) and pairs > 0:
        return 1.0 / pairs
    return None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def near_chance(accuracy_percent: float, chance: float | None, n_examples: float,
                confidence: float = CONFIDENCE) -> bool:
    """Whether an accuracy over ``n_examples`` test examples is not clearly above ``chance``: the
    exact binomial 95% interval (scipy.stats.binomtest) includes chance or lies below it. Token
    tasks score several positions per example, so counting examples makes the interval wider
    than it is: it flags more, not less."""
    if chance is None or pd.isna(chance) or pd.isna(accuracy_percent) or not n_examples \
            or pd.isna(n_examples):
        return False
    n = int(n_examples)
    k = min(n, max(0, int(round(accuracy_percent / 100.0 * n))))
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return bool(ci.low <= chance)


# --------------------------------------------------------------------------- accuracy cells


def display_scale(metric: str | None) -> float:
    return DISPLAY_SCALE.get(metric, 1.0)


def higher_is_better(metric: str | None) -> bool:
    return HIGHER_IS_BETTER.get(metric, True)


def _failure_label(statuses) -> str:
    statuses = set(statuses)
    if statuses <= {"ok"}:
        return "no metric"  # ok runs that recorded no val/test metric (e.g. zero steps)
    if statuses <= {"unsupported"}:
        return "n/a"
    return "OOM" if "oom" in statuses else "FAIL"


def summarize(df: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (model, task, seq_len, *by) of train runs: the best setting's test result.

    Settings (runs equal up to seed) are ranked by their mean val metric over ok seeds, in the
    metric's better direction; the best one's test metric is reported as mean, sample std
    (ddof 1; NaN for one seed) and n over its ok seeds, in display units (accuracy in percent).
    ``n_total`` counts all of that setting's runs. A cell with no ok run gets ``status`` "OOM"
    when any run ran out of memory, "n/a" when all were unsupported, else "FAIL"; extrapolation
    metrics ``metrics.test_<metric>_len<L>`` are averaged the same way (with ``..._std`` and
    ``..._n`` beside each). Also: ``ci_low``/``ci_high``, the 95% t interval of the mean
    (:func:`t_interval`); ``params``, the chosen setting's parameter count (median over seeds);
    ``chance`` (a fraction, :func:`chance_level`), ``n_test`` (test examples per run, from
    ``config.task.n_test``) and ``near_chance``: whether the accuracy's binomial 95% interval
    over n_test x seeds examples includes chance or lies below it (:func:`near_chance`).
    """
    keys = ["model", "task", "seq_len", *by]
    train = df[df["kind"] == "train"].copy()
    train["params"] = pd.to_numeric(train["params"], errors="coerce") if "params" in train \
        else np.nan
    task_cols = [c for c in train.columns if c.startswith("config.task.")]
    train["_chance"] = [chance_level(t, {c[len("config.task."):]: v for c, v in zip(task_cols, r)})
                        for t, r in zip(train["task"], train[task_cols].itertuples(index=False))]
    train["_n_test"] = pd.to_numeric(train["config.task.n_test"], errors="coerce") \
        if "config.task.n_test" in train else np.nan
    extra = sorted(c for c in train.columns
                   if c.startswith("metrics.test_") and "_len" in c and c[-1].isdigit())
    if train.empty:
        return pd.DataFrame(columns=[*keys, "metric", "n_settings", "status", "mean", "std", "n",
                                     "ci_low", "ci_high", "params", "near_chance", "n_total",
                                     "val_mean", "setting", "chosen", "run_ids"])
    # One metric per cell (the first one named), its display scale and better direction.
    train["metric"] = train.groupby(keys, dropna=False)["metric"].transform("first")
    scale = train["metric"].map(lambda m: display_scale(m)).astype(float)
    for col in ("val_metric", "test_metric", *extra):
        train[col] = pd.to_numeric(train[col], errors="coerce") * scale
    sign = train["metric"].map(lambda m: 1.0 if higher_is_better(m) else -1.0).astype(float)
    train["_rank"] = -sign * train["val_metric"]  # lower ranks first
    if "run_id" not in train:
        train["run_id"] = ""
    varying = [c for c in train.columns if c.startswith("config.") and not _is_ignored(c)
               and c not in keys and train[c].astype(str).nunique() > 1]

    cells = train.groupby(keys, dropna=False, sort=True).agg(
        metric=("metric", "first"), n_settings=("setting", "nunique"),
        statuses=("status", lambda s: frozenset(s)), n_runs=("status", "size"))
    totals = train.groupby([*keys, "setting"], dropna=False).size().rename("n_total")
    ranked = train[(train["status"] == "ok")
                   & (train["val_metric"].notna() | train["test_metric"].notna())]
    per_setting = ranked.groupby([*keys, "setting"], dropna=False).agg(
        val_mean=("val_metric", "mean"), rank=("_rank", "mean"), mean=("test_metric", "mean"),
        std=("test_metric", "std"), n=("test_metric", "count"),
        run_ids=("run_id", lambda r: ",".join(map(str, r))),
        params=("params", "median"), chance=("_chance", "first"), n_test=("_n_test", "first"),
        **{c.replace("metrics.", ""): (c, "mean") for c in extra},
        **{c.replace("metrics.", "") + "_std": (c, "std") for c in extra},
        **{c.replace("metrics.", "") + "_n": (c, "count") for c in extra},
        **{f"_v:{c}": (c, "first") for c in varying})
    per_setting = per_setting.join(totals).reset_index()
    per_setting["rank"] = per_setting["rank"].fillna(math.inf)
    best = per_setting.sort_values(["rank", "setting"], kind="stable").drop_duplicates(keys)
    # Describe the chosen setting by the hyper-parameters that vary inside its cell.
    spread = {c: train.assign(_s=train[c].astype(str)).groupby(keys, dropna=False)["_s"]
              .nunique().rename(c) for c in varying}
    best = best.merge(pd.DataFrame(spread).reset_index() if spread else
                      cells.reset_index()[keys], on=keys, how="left", suffixes=("", "_spread"))
    best["chosen"] = [", ".join(f"{c.removeprefix('config.')}={row[f'_v:{c}']}"
                                for c in varying if row[c] > 1) for _, row in best.iterrows()]
    best = best.drop(columns=["rank", *varying, *(f"_v:{c}" for c in varying)])
    out = cells.reset_index().merge(best, on=keys, how="left")
    failed = out["mean"].isna() & out["n"].isna()
    out["status"] = [_failure_label(st) if f else "ok" for st, f in zip(out["statuses"], failed)]
    out.loc[failed, "n"] = 0
    out["n_total"] = out["n_total"].where(~failed, out["n_runs"]).astype(int)
    out["n"] = out["n"].astype(int)
    intervals = [t_interval(m, sd, n, metric=metric) for m, sd, n, metric in
                 zip(out["mean"], out["std"], out["n"], out["metric"])]
    out["ci_low"] = [lo for lo, _ in intervals]
    out["ci_high"] = [hi for _, hi in intervals]
    out["near_chance"] = [m == "accuracy" and near_chance(v, c, t * n) for m, v, c, t, n in
                          zip(out["metric"], out["mean"], out["chance"], out["n_test"], out["n"])]
    return out.drop(columns=["statuses", "n_runs"])


# --------------------------------------------------------------------------- efficiency


def _precision(df: pd.DataFrame) -> pd.Series:
    """fp32 | bf16 per row: ``config.trainer.precision``, else the ``dtype`` that bench records
    carry (those written before the trainer vocabulary have only that), else fp32."""
    out = pd.Series(None, index=df.index, dtype=object)
    for col in ("config.trainer.precision", "dtype", "config.dtype"):
        if col in df:
            out = out.where(out.notna(), df[col])
    return out.where(out.notna(), "fp32")


def efficiency_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Speed and memory per (EFFICIENCY_GROUP, model, seq_len), repeats by median.

    Bench records are used when there are any; otherwise the speed measured inside ok train
    runs. Columns: the group (task, batch_size, env.device_name, precision, env.threads),
    model, seq_len, steps_per_s, step_ms, peak_gb (10^9 bytes), status ("ok", or "OOM"/"FAIL"/
    "n/a" when no measurement succeeded), speedup (steps/s over ``transformer`` in the same
    group and seq_len), n, round_ms (the ok rounds' step-time medians of bench records measured
    with ``bench.rounds``; empty otherwise), paired_ms and paired_id (the cycle times of the
    cell's paired timing, ``bench.paired_cycles``, and what tells its process: its time and
    lengths; empty and None unless exactly one such timing is in the cell), source.
    """
    bench = df[df["kind"] == "bench"]
    source = "bench"
    if bench.empty:
        bench, source = df[df["kind"] == "train"], "train"
    bench = bench.assign(precision=_precision(bench))
    for col in EFFICIENCY_GROUP:
        if col not in bench:
            bench[col] = pd.Series(dtype=object)
    for col in ("speed.step_ms_median", "memory.peak_bytes"):
        bench[col] = pd.to_numeric(bench[col], errors="coerce") if col in bench else np.nan
    keys = [*EFFICIENCY_GROUP, "model", "seq_len"]
    rows = []
    for key, group in bench.groupby(keys, dropna=False, sort=True):
        row = dict(zip(keys, key))
        ok = group[(group["status"] == "ok") & group["speed.step_ms_median"].gt(0)]
        if ok.empty:
            if source == "train" and not (group["status"] == "oom").any():
                continue  # a failed train run says nothing about speed
            row.update(status=_failure_label(group["status"]), n=0)
        else:
            step_ms = ok["speed.step_ms_median"].median()
            peak = ok["memory.peak_bytes"].median()
            row.update(status="ok", step_ms=step_ms, steps_per_s=1000.0 / step_ms,
                       peak_gb=peak / 1e9, n=len(ok),
                       round_ms=tuple(ms for rounds in ok.get("rounds", []) for ms in _round_medians(rounds)),
                       **_paired_times(ok))
        row["source"] = source
        rows.append(row)
    cells = pd.DataFrame(rows, columns=[*keys, "status", "step_ms", "steps_per_s", "peak_gb", "n",
                                        "round_ms", "paired_ms", "paired_id", "source"])
    ref = cells[cells["model"] == "transformer"].set_index(EFFICIENCY_GROUP + ["seq_len"])
    index = pd.MultiIndex.from_frame(cells[EFFICIENCY_GROUP + ["seq_len"]])
    base = ref["steps_per_s"].reindex(index).to_numpy() if len(ref) else np.nan
    cells["speedup"] = cells["steps_per_s"].to_numpy(dtype=float) / base
    return cells


def scaling_exponents(cells: pd.DataFrame) -> pd.DataFrame:
    """Least-squares slopes of log(step time) and log(peak memory) against log(seq_len).

    One row per (EFFICIENCY_GROUP, model) with at least two ok seq_lens, so that e.g. fp32 and
    bf16 measurements of one model are two fits; an exponent near 2 is quadratic, near 1 linear.
    Memory is ``memory.peak_bytes``: on CPU the peak above the measurement process's runtime
    floor (``how = cpu_vmhwm_above_floor``, harness.measure.PeakMemory; the raw peak is
    ``memory.peak_raw_bytes``), so a fixed runtime of ~300 MB does not flatten the exponent.
    Non-positive memory (CPU RSS deltas can be 0) is left out of the memory fit.
    ``time_exponent_se``: the time exponent's bootstrap standard error over the rounds of its
    points (:func:`_slope_standard_error`), NaN unless every point has 3 rounds or more.
    ``time_from``: ``paired`` when every point was timed in one paired process
    (``bench.paired_cycles``): the time exponent is then fitted on the medians of the paired
    cycles and its standard error bootstrapped over cycles (:func:`_paired_fit`); ``rounds``
    otherwise, fitted on the points' step times.
    """
    rows = []
    ok = cells[cells["status"] == "ok"]
    for key, group in ok.groupby([*EFFICIENCY_GROUP, "model"], dropna=False, sort=True):
        row = dict(zip([*EFFICIENCY_GROUP, "model"], key))
        paired = _paired_fit(group)
        if paired is not None:
            row["time_exponent"], row["time_exponent_se"], row["time_from"] = *paired, "paired"
        else:
            row["time_exponent"] = _slope(group["seq_len"], group["step_ms"])
            row["time_exponent_se"], row["time_from"] = _slope_standard_error(group), "rounds"
        row["memory_exponent"] = _slope(group["seq_len"], group["peak_gb"])
        row["n_points"] = int(group["seq_len"].nunique())
        row["seq_lens"] = ",".join(str(int(s)) for s in sorted(group["seq_len"].unique()))
        if row["n_points"] >= 2:
            rows.append(row)
    return pd.DataFrame(rows, columns=[*EFFICIENCY_GROUP, "model", "time_exponent", "time_exponent_se",
                                       "time_from", "memory_exponent", "n_points", "seq_lens"])


def _paired_times(ok: pd.DataFrame) -> dict:
    """A cell's paired cycle times (a record's ``paired``, harness.bench.finish_paired) and the
    id of the process that timed them, when exactly one record of the cell has them."""
    if "paired.status" not in ok:
        return {"paired_ms": (), "paired_id": None}
    paired = ok[ok["paired.status"] == "ok"]
    ids = (paired["paired.measured_at"].astype(str) + " " + paired["paired.lengths"].astype(str)).unique()
    if len(ids) != 1:
        return {"paired_ms": (), "paired_id": None}
    return {"paired_ms": tuple(json.loads(paired["paired.cycle_ms"].iloc[0])), "paired_id": ids[0]}


def _round_medians(rounds) -> list[float]:
    """The step-time medians of a record's ok ``rounds`` (a list, or its JSON text in a flattened
    table; absent for records of one round)."""
    if isinstance(rounds, str):
        rounds = json.loads(rounds)
    if not isinstance(rounds, list):
        return []
    return [r["step_ms_median"] for r in rounds if r.get("status") == "ok" and r.get("step_ms_median")]


def _slope_standard_error(points: pd.DataFrame, n_resamples: int = 999) -> float:
    """Bootstrap standard error of the time exponent: each point's rounds resampled on their own
    (scipy.stats.bootstrap, independent samples), its median taken as the record does, the slope
    refitted. The spread of the rounds is the noise of the machine the sweep ran on, so this says
    how far another run of the same sweep may land."""
    points = points[points["seq_len"] > 0].sort_values("seq_len")
    samples = [np.asarray(r, dtype=float) for r in points.get("round_ms", [])]
    if len(samples) < 2 or points["seq_len"].nunique() < len(samples) or min(map(len, samples)) < 3:
        return np.nan
    slope = functools.partial(_slope_of_medians, np.log(points["seq_len"].to_numpy(dtype=float)))
    result = scipy.stats.bootstrap(samples, slope, n_resamples=n_resamples, vectorized=True,
                                   method="percentile", rng=np.random.default_rng(0))
    return float(result.standard_error)


def _slope_of_medians(log_len: np.ndarray, *samples, axis=-1):
    """Least-squares slope of log(median of each point's sample) against ``log_len`` (one per
    point); vectorised over leading axes, as scipy.stats.bootstrap calls it."""
    centred = log_len - log_len.mean()
    y = np.log(np.stack([np.median(s, axis=axis) for s in samples], axis=-1))  # (..., points)
    return ((y - y.mean(axis=-1, keepdims=True)) * centred).sum(axis=-1) / (centred ** 2).sum()


def _paired_fit(points: pd.DataFrame, n_resamples: int = 999) -> tuple[float, float] | None:
    """The time exponent and its standard error from one paired timing of all the points (the
    same ``paired_id``, as many cycles each), or None. Slope of log(median cycle time) against
    log(seq_len); the error resamples whole cycles (scipy.stats.bootstrap, paired), so each
    resample keeps the lengths of a cycle together, as they were timed."""
    if "paired_ms" not in points or points["seq_len"].nunique() < 2 or len(points) != points["seq_len"].nunique():
        return None
    ids, cycles = set(points["paired_id"]), {len(ms) for ms in points["paired_ms"]}
    if len(ids) != 1 or None in ids or len(cycles) != 1 or min(cycles) < 2:
        return None
    points = points.sort_values("seq_len")
    slope = functools.partial(_slope_of_medians, np.log(points["seq_len"].to_numpy(dtype=float)))
    samples = [np.asarray(ms, dtype=float) for ms in points["paired_ms"]]
    result = scipy.stats.bootstrap(samples, slope, n_resamples=n_resamples, vectorized=True, paired=True,
                                   method="percentile", rng=np.random.default_rng(0))
    return float(slope(*samples)), float(result.standard_error)


def _slope(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if len(np.unique(x[keep])) < 2:
        return np.nan
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])
