"""Published claims checked against our runs: holds / differs / inconclusive / too few seeds /
not run.

Claims live in a YAML file (results/published/claims.yaml) as a list under ``claims:``.
Every claim has ``id``, ``claim`` (the sentence, as the paper makes it), ``citation``,
``experiment`` (the study, or a list of studies, whose runs decide it) and ``check`` (one of
CHECKS below), plus the fields its check needs:

    - id: lra_linear_faster_4k
      claim: Linear Transformer trains faster than the vanilla Transformer at 4K.
      citation: Tay et al. 2021, Long Range Arena, ICLR 2021 (arXiv 2011.04006), Table 2
      experiment: [lra_speed, lra_speed_cpu]
      check: faster
      a: linear_transformer
      b: transformer
      seq_len: 4096

Fields:
- ``a``, ``b`` (two-sided checks) or ``model`` (one-sided): a model name, or a mapping
  ``{model: NAME, where: {...}, label: TEXT}`` to pick a subset of that model's runs (e.g.
  Transformer-XL with ``config.model.mem_len: {gt: 0}``).
- ``task``: needed by accuracy checks, optional for speed/memory checks (default: any task).
- ``seq_len``: optional; speed/memory checks default to the largest length both sides have,
  accuracy checks to every length both sides have.
- ``where``: optional narrowing within the experiment's runs, applied to both sides, e.g.
  ``{config.model.d_model: 64}``; values are equal-to, a list (any of), or
  ``{gt|ge|lt|le|ne|eq: number}``.
- ``threshold``: in display units (accuracy in percent, bpc as is); "meets" means >= for
  higher-is-better metrics and <= for bpc.
- ``key``: the config column a trend runs along (``seq_len``, ``config.model.mem_len`` ...).
- ``tolerance``: for ``falls_with``, how much one step may rise (display units, default 0).
- ``quantity`` (``time`` | ``memory``) and ``value`` for ``exponent_below``.
- ``test_factor``: for ``better`` and ``solves``, compare the extra test length ``test_factor``
  times the training length (``metrics.test_<metric>_len<L>``, length extrapolation) instead
  of the test metric at the training length.

A claim is decided only on the runs of its own experiment(s) (harness.results.in_experiments:
the record's ``experiment``, else ``config.sweep.name``), never on whatever else sits in the
folders the report reads.

Accuracy and bpc claims are decided with statistics over seeds: every cell (model, task, length)
needs at least MIN_SEEDS ok seeds, else the claim is "too few seeds" (never "differs"); each
cell's mean gets a 95% Student-t interval (harness.results.t_interval). A threshold is met
when the whole interval is on its good side and missed when the whole interval is on the other;
a is better than b when a's interval lies wholly on the better side of b's. Anything else
(an interval that overlaps the threshold, or the other side's interval) is "inconclusive".
A claim holds when every cell it covers holds, differs when any decided cell contradicts it,
and otherwise is too few seeds / inconclusive. Speed and memory claims (faster, less_memory,
exponent_below) compare medians of timed steps of bench records, not seeds, as before.

A claim is "not run" when our records do not hold the runs it needs; every verdict comes with
the numbers it was decided on (mean [95% interval] (n seeds)).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from harness.results import (
    EFFICIENCY_GROUP, MIN_SEEDS, efficiency_cells, filter_runs, higher_is_better, in_experiments,
    scaling_exponents, summarize, t_interval,
)

CHECKS = {
    "faster": ("a", "b"),
    "less_memory": ("a", "b"),
    "solves": ("model", "task", "threshold"),
    "solves_where_other_fails": ("a", "b", "task", "threshold"),
    "better": ("a", "b", "task"),
    "falls_with": ("model", "task", "key"),
    "holds_with": ("model", "task", "key", "threshold"),
    "extrapolates": ("model", "task", "threshold"),
    "exponent_below": ("model", "quantity", "value"),
}
HOLDS, DIFFERS, NOT_RUN = "holds", "differs", "not run"
INCONCLUSIVE, TOO_FEW = "inconclusive", "too few seeds"
VERDICTS = (HOLDS, DIFFERS, INCONCLUSIVE, TOO_FEW, NOT_RUN)


def load_claims(path: str | Path) -> list[dict]:
    """Read and validate a claims file; errors name the file, the claim and the field."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    claims = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(claims, list):
        raise ValueError(f"{path}: expected a top-level 'claims:' list")
    for i, claim in enumerate(claims):
        where = f"{path}: claim {claim.get('id', f'#{i + 1}')!r}"
        check = claim.get("check")
        if check not in CHECKS:
            raise ValueError(f"{where}: unknown check {check!r}; use one of {sorted(CHECKS)}")
        for field in ("id", "claim", "citation", "experiment", *CHECKS[check]):
            if field not in claim and not (field == "model" and "a" in claim):
                raise ValueError(f"{where}: check {check!r} needs field {field!r}"
                                 + (" (the experiment, or list of experiments, whose runs decide "
                                    "it)" if field == "experiment" else ""))
    return claims


def claim_sides(claim: dict) -> list[dict]:
    """The sides a claim compares, its ``model`` or its ``a`` and ``b``, each as
    {model, where, label}."""
    return [_side(claim[k]) for k in ("model", "a", "b") if k in claim]


def _side(spec) -> dict:
    if isinstance(spec, str):
        return {"model": spec, "where": {}, "label": spec}
    label = spec.get("label") or spec["model"] + "".join(
        f" [{k.removeprefix('config.')} {v}]" for k, v in (spec.get("where") or {}).items())
    return {"model": spec["model"], "where": spec.get("where") or {}, "label": label}


def _runs(df: pd.DataFrame, claim: dict, side: dict) -> pd.DataFrame:
    runs = filter_runs(filter_runs(df, claim.get("where")), side["where"])
    runs = runs[runs["model"] == side["model"]]
    return runs[runs["task"] == claim["task"]] if claim.get("task") else runs


def _meets(value: float, threshold: float, metric) -> bool:
    return value >= threshold if higher_is_better(metric) else value <= threshold


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _key(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _cell(row) -> str:
    """``mean [low, high] (n=k)``: the 95% interval over seeds; a status when no seed ran."""
    if row["status"] != "ok":
        return row["status"]
    low, high = t_interval(row["mean"], row["std"], row["n"], metric=row["metric"])
    band = f" [{_fmt(low)}, {_fmt(high)}]" if not math.isnan(low) else ""
    return f"{_fmt(row['mean'])}{band} (n={int(row['n'])})"


def _interval(row) -> tuple[float, float] | str:
    """The 95% interval of an ok cell, or TOO_FEW when it has fewer than MIN_SEEDS seeds."""
    if row["n"] < MIN_SEEDS:
        return TOO_FEW
    return t_interval(row["mean"], row["std"], row["n"], metric=row["metric"])


def _combine(outcomes: list):
    """One outcome from several: False (contradicted) first, then TOO_FEW, then INCONCLUSIVE;
    True when all are True; None when none is decided; a None beside decided ones is False (a
    cell that cannot be compared, e.g. n/a, keeps a claim about every cell from holding)."""
    decided = [o for o in outcomes if o is not None]
    if not decided:
        return None
    if any(o is False for o in decided):
        return False
    for outcome in (TOO_FEW, INCONCLUSIVE):
        if outcome in decided:
            return outcome
    return len(decided) == len(outcomes)


def _verdict(results: list) -> str:
    """Outcomes per cell (True / False / TOO_FEW / INCONCLUSIVE / None) to a verdict."""
    outcome = _combine(results)
    return {None: NOT_RUN, True: HOLDS, False: DIFFERS}[outcome] \
        if outcome is None or isinstance(outcome, bool) else outcome


def _efficiency(df, claim, side) -> pd.DataFrame:
    runs = _runs(df, claim, side)
    return efficiency_cells(runs) if len(runs) else pd.DataFrame()


def _check_speed_memory(df, claim) -> tuple[str, str]:
    a, b = _side(claim["a"]), _side(claim["b"])
    ea, eb = _efficiency(df, claim, a), _efficiency(df, claim, b)
    if ea.empty or eb.empty:
        return NOT_RUN, f"no speed/memory records for {a['label'] if ea.empty else b['label']}"
    pairs = ea.merge(eb, on=[*EFFICIENCY_GROUP, "seq_len"], suffixes=("_a", "_b"))
    if claim.get("seq_len") is not None:
        pairs = pairs[pairs["seq_len"] == claim["seq_len"]]
    elif len(pairs):
        pairs = pairs[pairs["seq_len"] == pairs["seq_len"].max()]
    if pairs.empty:
        return NOT_RUN, f"no seq_len measured for both {a['label']} and {b['label']}"
    column, unit = ("steps_per_s", "steps/s") if claim["check"] == "faster" else ("peak_gb", "GB")
    results, numbers = [], []
    for _, p in pairs.iterrows():
        sa, sb = p["status_a"], p["status_b"]
        if sa == "ok" and sb == "ok":
            va, vb = p[f"{column}_a"], p[f"{column}_b"]
            results.append(va > vb if claim["check"] == "faster" else va < vb)
            numbers.append(f"L={_key(p['seq_len'])}: {a['label']} {_fmt(va)} {unit} vs "
                           f"{b['label']} {_fmt(vb)} {unit}")
        else:
            results.append(True if sa == "ok" and sb == "OOM" else
                           False if sa == "OOM" and sb == "ok" else None)
            numbers.append(f"L={_key(p['seq_len'])}: {a['label']} {sa} vs {b['label']} {sb}")
    return _verdict(results), "; ".join(numbers)


def _summary(df, claim, side, by=()) -> pd.DataFrame:
    runs = _runs(df, claim, side)
    cells = summarize(runs, by=by) if len(runs) else pd.DataFrame()
    if len(cells) and claim.get("seq_len") is not None:
        cells = cells[cells["seq_len"] == claim["seq_len"]]
    if len(cells) and claim.get("test_factor") is not None:
        cells = _at_test_factor(cells, claim["test_factor"])
    return cells


def _at_test_factor(cells: pd.DataFrame, factor) -> pd.DataFrame:
    """Cells whose ``mean`` / ``std`` / ``n`` are the test metric's at ``factor`` x the training
    length; a cell not tested there gets status "not tested" (never decided)."""
    cells = cells.copy()
    for i, row in cells.iterrows():
        column = f"test_{row['metric']}_len{int(round(row['seq_len'] * factor))}"
        value = row[column] if column in row.index else float("nan")
        cells.loc[i, "mean"] = value
        cells.loc[i, "std"] = row.get(f"{column}_std", float("nan"))
        cells.loc[i, "n"] = row.get(f"{column}_n", 0) if pd.notna(value) else 0
        if row["status"] == "ok" and pd.isna(value):
            cells.loc[i, "status"] = "not tested"
    return cells


def _solves(row, threshold):
    """True / False / TOO_FEW / INCONCLUSIVE: whether a cell's 95% interval is wholly on the
    good side of ``threshold``; None when the cell cannot be compared (n/a, not tested)."""
    if row["status"] in ("n/a", "not tested"):
        return None
    if row["status"] != "ok":
        return False  # every run failed
    interval = _interval(row)
    if interval == TOO_FEW:
        return TOO_FEW
    low, high = interval
    if _meets(low, threshold, row["metric"]) and _meets(high, threshold, row["metric"]):
        return True
    if not _meets(low, threshold, row["metric"]) and not _meets(high, threshold, row["metric"]):
        return False
    return INCONCLUSIVE


def _better(ra, rb):
    """Whether cell a is better than cell b: True / False when their intervals are apart,
    INCONCLUSIVE when they overlap, TOO_FEW when either has too few seeds; a failed side loses."""
    if ra["status"] == "ok" and rb["status"] == "ok":
        ia, ib = _interval(ra), _interval(rb)
        if TOO_FEW in (ia, ib):
            return TOO_FEW
        sign = 1 if higher_is_better(ra["metric"]) else -1
        (la, ha), (lb, hb) = sorted(sign * x for x in ia), sorted(sign * x for x in ib)
        return True if la > hb else False if ha < lb else INCONCLUSIVE
    if ra["status"] == "ok" and rb["status"] in ("FAIL", "OOM"):
        return True
    if rb["status"] == "ok" and ra["status"] in ("FAIL", "OOM"):
        return False
    return None


def _check_solves(df, claim) -> tuple[str, str]:
    side = _side(claim.get("model") or claim["a"])
    cells = _summary(df, claim, side)
    if cells.empty:
        return NOT_RUN, f"no {side['label']} runs on {claim['task']}"
    results = [_solves(r, claim["threshold"]) for _, r in cells.iterrows()]
    numbers = [f"L={_key(r['seq_len'])}: {_cell(r)}" for _, r in cells.iterrows()]
    return _verdict(results), f"{side['label']}: " + "; ".join(numbers) + \
        f" vs threshold {claim['threshold']}"


def _paired(df, claim) -> tuple[dict, dict, pd.DataFrame]:
    a, b = _side(claim["a"]), _side(claim["b"])
    ca, cb = _summary(df, claim, a), _summary(df, claim, b)
    if ca.empty or cb.empty:
        return a, b, pd.DataFrame()
    return a, b, ca.merge(cb, on=["task", "seq_len"], suffixes=("_a", "_b"))


def _unsuffix(row, suffix):
    return {k[:-2]: v for k, v in row.items() if k.endswith(suffix)}


def _check_two_sided(df, claim) -> tuple[str, str]:
    a, b, pairs = _paired(df, claim)
    if pairs.empty:
        return NOT_RUN, f"no {claim['task']} runs of both {a['label']} and {b['label']}"
    results, numbers = [], []
    for _, p in pairs.iterrows():
        ra, rb = _unsuffix(p, "_a"), _unsuffix(p, "_b")
        if claim["check"] == "solves_where_other_fails":
            sa, sb = _solves(ra, claim["threshold"]), _solves(rb, claim["threshold"])
            # b "fails" is b does not solve: True when b's interval is wholly below the threshold
            fails_b = None if sb is None else (not sb if isinstance(sb, bool) else sb)
            results.append(_combine([sa, fails_b]) if None not in (sa, fails_b) else None)
        else:
            results.append(_better(ra, rb))
        numbers.append(f"L={_key(p['seq_len'])}: {a['label']} {_cell(ra)} vs "
                       f"{b['label']} {_cell(rb)}")
    text = "; ".join(numbers)
    if "test_factor" in claim:
        text = f"tested at {claim['test_factor']}x the training length: " + text
    if "threshold" in claim:
        text += f" (threshold {claim['threshold']})"
    return _verdict(results), text


def _falls(line: pd.DataFrame, tolerance: float):
    """Whether a series of cells (sorted along the key) falls in value (accuracy, or bpc): its
    last interval wholly below its first and no step rising clearly (the next interval wholly
    above the previous + tolerance). False when a step rises clearly or the last is not below
    the first at all."""
    ok = line[line["status"] == "ok"]
    if len(ok) < 2:
        return None
    intervals = [_interval(r) for _, r in ok.iterrows()]
    if TOO_FEW in intervals:
        return TOO_FEW
    worse = [tuple(sorted(iv)) for iv in intervals]
    if any(nxt[0] > prev[1] + tolerance for prev, nxt in zip(worse, worse[1:])):
        return False
    if worse[-1][0] >= worse[0][1]:
        return False
    return True if worse[-1][1] < worse[0][0] else INCONCLUSIVE


def _check_trend(df, claim) -> tuple[str, str]:
    side = _side(claim.get("model") or claim["a"])
    key = claim["key"]
    by = () if key == "seq_len" else (key,)
    cells = _summary(df, claim, side, by=by)
    if cells.empty:
        return NOT_RUN, f"no {side['label']} runs on {claim['task']}"
    lines = [cells] if key == "seq_len" else [g for _, g in cells.groupby("seq_len", dropna=False)]
    results, numbers = [], []
    for line in lines:
        line = line.sort_values(key)
        series = ", ".join(f"{key.removeprefix('config.')}={_key(r[key])}: {_cell(r)}"
                           for _, r in line.iterrows())
        at = f"L={_key(line['seq_len'].iloc[0])}: "
        numbers.append(series if key == "seq_len" else at + series)
        if claim["check"] == "holds_with":
            decided = [_solves(r, claim["threshold"]) for _, r in line.iterrows()]
            results.append(None if len(line) < 2 else _combine(decided))
            continue
        results.append(_falls(line, claim.get("tolerance", 0.0)))
    text = f"{side['label']}: " + "; ".join(numbers)
    if "threshold" in claim:
        text += f" (threshold {claim['threshold']})"
    return _verdict(results), text


def _check_extrapolates(df, claim) -> tuple[str, str]:
    side = _side(claim.get("model") or claim["a"])
    cells = _summary(df, claim, side)
    results, numbers = [], []
    for _, row in cells[cells["status"] == "ok"].iterrows() if len(cells) else []:
        prefix = f"test_{row['metric']}_len"
        lengths = sorted(int(c[len(prefix):]) for c in row.index if c.startswith(prefix)
                         and c[len(prefix):].isdigit() and pd.notna(row[c]))
        for length in (n for n in lengths if n > (row["seq_len"] or 0)):
            column = f"{prefix}{length}"
            at = {**row, "mean": row[column], "std": row.get(f"{column}_std", float("nan")),
                  "n": row.get(f"{column}_n", 0)}
            results.append(_solves(at, claim["threshold"]))
            numbers.append(f"trained L={_key(row['seq_len'])}, tested {length}: {_cell(at)}")
    if not results:
        return NOT_RUN, f"no {side['label']} {claim['task']} runs tested beyond their length"
    return _verdict(results), f"{side['label']}: " + "; ".join(numbers) + \
        f" (threshold {claim['threshold']})"


def _check_exponent(df, claim) -> tuple[str, str]:
    side = _side(claim.get("model") or claim["a"])
    cells = _efficiency(df, claim, side)
    fits = scaling_exponents(cells) if len(cells) else pd.DataFrame()
    column = f"{claim['quantity']}_exponent"
    if fits.empty or fits[column].isna().all():
        return NOT_RUN, f"fewer than two measured seq_lens for {side['label']}"
    fits = fits[fits[column].notna()]
    results = [v < claim["value"] for v in fits[column]]
    numbers = [f"{claim['quantity']} exponent {_fmt(v)} over L={s}"
               for v, s in zip(fits[column], fits["seq_lens"])]
    return _verdict(results), f"{side['label']}: " + "; ".join(numbers) + \
        f" (bound {claim['value']})"


_EVALUATORS = {
    "faster": _check_speed_memory, "less_memory": _check_speed_memory, "solves": _check_solves,
    "solves_where_other_fails": _check_two_sided, "better": _check_two_sided,
    "falls_with": _check_trend, "holds_with": _check_trend,
    "extrapolates": _check_extrapolates, "exponent_below": _check_exponent,
}


def _names(experiment) -> str:
    return experiment if isinstance(experiment, str) else " / ".join(experiment)


def evaluate_claims(df: pd.DataFrame, claims: list[dict]) -> pd.DataFrame:
    """One row per claim: id, claim, citation, experiment, check, status (one of VERDICTS) and
    numbers, each decided on the runs of the claim's own experiment(s) only."""
    rows = []
    for claim in claims:
        runs = in_experiments(df, claim["experiment"]) if len(df) else df
        if runs.empty:
            status, numbers = NOT_RUN, f"no runs of experiment {_names(claim['experiment'])}"
        else:
            status, numbers = _EVALUATORS[claim["check"]](runs, claim)
        rows.append({"id": claim["id"], "claim": claim["claim"], "citation": claim["citation"],
                     "experiment": _names(claim["experiment"]), "check": claim["check"],
                     "status": status, "numbers": numbers})
    return pd.DataFrame(rows, columns=["id", "claim", "citation", "experiment", "check", "status",
                                       "numbers"])
