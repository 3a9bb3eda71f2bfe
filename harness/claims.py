"""Published claims checked against our runs: each evaluates to holds / differs / not run.

Claims live in a YAML file (results/published/claims.yaml) as a list under ``claims:``.
Every claim has ``id``, ``claim`` (the sentence, as the paper makes it), ``citation`` and
``check`` (one of CHECKS below), plus the fields its check needs:

    - id: lra_linear_faster_4k
      claim: Linear Transformer trains faster than the vanilla Transformer at 4K.
      citation: Tay et al. 2021, Long Range Arena, ICLR 2021 (arXiv 2011.04006), Table 2
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
- ``where``: optional scope applied to both sides, e.g. ``{config.sweep.name: lra_speed}``;
  values are equal-to, a list (any of), or ``{gt|ge|lt|le|ne|eq: number}``.
- ``threshold``: in display units (accuracy in percent, bpc as is); "meets" means >= for
  higher-is-better metrics and <= for bpc.
- ``key``: the config column a trend runs along (``seq_len``, ``config.model.mem_len`` ...).
- ``tolerance``: for ``falls_with``, how much one step may rise (display units, default 0).
- ``quantity`` (``time`` | ``memory``) and ``value`` for ``exponent_below``.
- ``test_factor``: for ``better`` and ``solves``, compare the extra test length ``test_factor``
  times the training length (``metrics.test_<metric>_len<L>``, length extrapolation) instead
  of the test metric at the training length.

A claim is "not run" when our records do not hold the runs it needs; "holds" or "differs"
always comes with the numbers it was decided on.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from harness.results import (
    EFFICIENCY_GROUP, efficiency_cells, filter_runs, higher_is_better, scaling_exponents, summarize,
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
        for field in ("id", "claim", "citation", *CHECKS[check]):
            if field not in claim and not (field == "model" and "a" in claim):
                raise ValueError(f"{where}: check {check!r} needs field {field!r}")
    return claims


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
    return _fmt(row["mean"]) if row["status"] == "ok" else row["status"]


def _verdict(results: list) -> str:
    decided = [r for r in results if r is not None]
    if not decided:
        return NOT_RUN
    return HOLDS if all(decided) and len(decided) == len(results) else DIFFERS


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
    """Cells whose ``mean`` is the test metric at ``factor`` x the training length; a cell not
    tested there gets status "not tested" (never decided)."""
    cells = cells.copy()
    means, statuses = [], []
    for _, row in cells.iterrows():
        column = f"test_{row['metric']}_len{int(round(row['seq_len'] * factor))}"
        value = row[column] if column in row.index else float("nan")
        means.append(value)
        statuses.append(row["status"] if row["status"] != "ok" or pd.notna(value) else "not tested")
    cells["mean"], cells["status"] = means, statuses
    return cells


def _solves(row, threshold) -> bool | None:
    if row["status"] == "n/a":
        return None
    return row["status"] == "ok" and _meets(row["mean"], threshold, row["metric"])


def _check_solves(df, claim) -> tuple[str, str]:
    side = _side(claim.get("model") or claim["a"])
    cells = _summary(df, claim, side)
    if cells.empty:
        return NOT_RUN, f"no {side['label']} runs on {claim['task']}"
    results = [_solves(r, claim["threshold"]) for _, r in cells.iterrows()]
    numbers = [f"L={_key(r['seq_len'])}: {_cell(r)} (n={r['n']})" for _, r in cells.iterrows()]
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
            results.append(None if sa is None or sb is None else sa and not sb)
        elif ra["status"] == "ok" and rb["status"] == "ok":
            sign = 1 if higher_is_better(ra["metric"]) else -1
            results.append(sign * (ra["mean"] - rb["mean"]) > 0)
        else:
            results.append(True if ra["status"] == "ok" and rb["status"] in ("FAIL", "OOM")
                           else False if rb["status"] == "ok" and ra["status"] in ("FAIL", "OOM")
                           else None)
        numbers.append(f"L={_key(p['seq_len'])}: {a['label']} {_cell(ra)} vs "
                       f"{b['label']} {_cell(rb)}")
    text = "; ".join(numbers)
    if "test_factor" in claim:
        text = f"tested at {claim['test_factor']}x the training length: " + text
    if "threshold" in claim:
        text += f" (threshold {claim['threshold']})"
    return _verdict(results), text


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
            if len(line) < 2 or None in decided:
                results.append(None)
            else:
                results.append(all(decided))
            continue
        values = line[line["status"] == "ok"]["mean"].to_numpy()
        if len(values) < 2:
            results.append(None)
            continue
        tol = claim.get("tolerance", 0.0)
        results.append(bool(all(values[1:] - values[:-1] <= tol) and values[-1] < values[0]))
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
        lengths = sorted(int(c[len(prefix):]) for c in row.index
                         if c.startswith(prefix) and pd.notna(row[c]))
        for length in (n for n in lengths if n > (row["seq_len"] or 0)):
            value = row[f"{prefix}{length}"]
            results.append(_meets(value, claim["threshold"], row["metric"]))
            numbers.append(f"trained L={_key(row['seq_len'])}, tested {length}: {_fmt(value)}")
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


def evaluate_claims(df: pd.DataFrame, claims: list[dict]) -> pd.DataFrame:
    """One row per claim: id, claim, citation, check, status (holds/differs/not run), numbers."""
    rows = []
    for claim in claims:
        if df.empty:
            status, numbers = NOT_RUN, "no records"
        else:
            status, numbers = _EVALUATORS[claim["check"]](df, claim)
        rows.append({"id": claim["id"], "claim": claim["claim"], "citation": claim["citation"],
                     "check": claim["check"], "status": status, "numbers": numbers})
    return pd.DataFrame(rows, columns=["id", "claim", "citation", "check", "status", "numbers"])
