"""Results loading, tables, claims and the arena-report CLI on synthetic records."""

from __future__ import annotations

import base64
import copy
import json
import logging
import math
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, cli_env

from harness.claims import evaluate_claims, load_claims
from harness.published import compare_published, load_published, published_matches
from harness.report import (
    PUBLISHED_DIR, accuracy_table, comparison_display, efficiency_table, main, matching_note, params_table,
)
from harness.records import new_record
from harness.results import (
    efficiency_cells, filter_runs, load_curves, load_runs, near_chance, records_frame,
    scaling_exponents, summarize,
)

BASE = {
    "schema": 1, "kind": "train", "run_id": "r", "config_hash": "h", "status": "ok", "error": None,
    "model": "transformer", "task": "mqar", "seed": 0, "seq_len": 128, "batch_size": 8,
    "params": 1000, "metrics": {}, "speed": {}, "memory": {},
    "env": {"device": "cpu", "device_name": "testcpu", "torch": "2.13", "cuda": None,
            "threads": 1, "git_commit": None, "host": "h"},
    "started_at": "2025-01-01T00:00:00+00:00", "ended_at": "2025-01-01T00:01:00+00:00",
    "wall_s": 60.0, "config": {},
}
_counter = [0]


def make(root: Path, *, model="transformer", task="mqar", seq_len=128, seed=0, lr=1e-3,
         status="ok", kind="train", val=None, test=None, metric="accuracy", step_ms=None,
         peak=None, extra_metrics=None, model_cfg=None, **fields) -> Path:
    """Write one schema-1 record.json under ``root`` and return its run directory."""
    _counter[0] += 1
    rec = copy.deepcopy(BASE)
    rec.update(kind=kind, model=model, task=task, seq_len=seq_len, seed=seed, status=status,
               run_id=f"run{_counter[0]}", error=None if status == "ok" else "boom", **fields)
    if kind == "train" and status == "ok":
        rec["metrics"] = {f"val_{metric}": val, f"test_{metric}": test, "best_step": 10,
                          "steps": 20, "final_train_loss": 0.1, **(extra_metrics or {})}
    if step_ms is not None:
        rec["speed"] = {"step_ms_median": step_ms, "step_ms_iqr": 0.1, "tokens_per_s": 1.0}
        rec["memory"] = {"peak_bytes": peak, "how": "test"}
    rec["config"] = {"seed": seed, "model": {"name": model, **(model_cfg or {})},
                     "task": {"name": task, "seq_len": seq_len, "seed": seed},
                     "trainer": {"lr": lr, "betas": [0.9, 0.98], "device": "cpu"},
                     "sweep": {"name": "test"}}
    run_dir = root / f"{model}-{task}" / f"run{_counter[0]}"
    run_dir.mkdir(parents=True)
    (run_dir / "record.json").write_text(json.dumps(rec))
    return run_dir



def test_load_runs_flattens_and_keeps_unknown_fields(tmp_path):
    make(tmp_path, val=0.5, test=0.4, step_ms=10.0, peak=1000, note="hello",
         extra_metrics={"custom": 3})
    df = load_runs(tmp_path)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["config.trainer.lr"] == 1e-3
    assert row["config.trainer.betas"] == "[0.9, 0.98]"
    assert row["metrics.test_accuracy"] == 0.4 and row["metrics.custom"] == 3
    assert row["speed.step_ms_median"] == 10.0 and row["memory.peak_bytes"] == 1000
    assert row["env.device_name"] == "testcpu" and row["note"] == "hello"
    assert row["status"] == "ok" and row["metric"] == "accuracy"
    assert row["val_metric"] == 0.5 and row["test_metric"] == 0.4
    assert Path(row["run_dir"]).parent.name == "transformer-mqar"


def test_corrupt_and_incomplete_records_are_skipped_with_a_warning(tmp_path):
    make(tmp_path, val=0.5, test=0.4)
    bad = tmp_path / "bad" / "record.json"
    bad.parent.mkdir()
    bad.write_text('{"schema": 1, "kind": "tra')  # truncated
    partial = tmp_path / "partial" / "record.json"
    partial.parent.mkdir()
    partial.write_text(json.dumps({"schema": 1, "kind": "train", "model": "x"}))
    with pytest.warns(UserWarning) as caught:
        df = load_runs(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any(str(bad) in m and "JSON" in m for m in messages)
    assert any(str(partial) in m and "status" in m and "task" in m for m in messages)
    assert len(df) == 1


def test_load_curves_joins_the_record_and_skips_a_torn_line(tmp_path):
    run = make(tmp_path, val=0.5, test=0.4)
    lines = [{"step": s, "split": "val", "loss": 1.0, "metric_name": "accuracy", "metric": s / 10,
              "elapsed_s": 1.0, "tokens_per_s": 5.0} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 3, "sp')
    with pytest.warns(UserWarning, match="metrics.jsonl:3"):
        curves = load_curves(tmp_path)
    assert curves["step"].tolist() == [1, 2]
    assert set(curves["model"]) == {"transformer"} and set(curves["seq_len"]) == {128}



def test_best_setting_on_val_mean_and_std(tmp_path):
    # lr 1e-3: higher val mean, lower test -> must still be chosen (selection is on val).
    for seed, (v, t) in enumerate([(0.90, 0.80), (0.92, 0.82), (0.94, 0.84)]):
        make(tmp_path, lr=1e-3, seed=seed, val=v, test=t)
    for seed, (v, t) in enumerate([(0.85, 0.99), (0.86, 0.99), (0.87, 0.99)]):
        make(tmp_path, lr=1e-2, seed=seed, val=v, test=t)
    cells = summarize(load_runs(tmp_path))
    assert len(cells) == 1
    cell = cells.iloc[0]
    assert cell["mean"] == pytest.approx(82.0) and cell["std"] == pytest.approx(2.0)
    assert cell["n"] == 3 and cell["n_total"] == 3 and cell["n_settings"] == 2
    assert cell["val_mean"] == pytest.approx(92.0)
    assert cell["chosen"] == "trainer.lr=0.001"
    text, means = accuracy_table(cells)
    assert text.loc["transformer", "mqar"] == "82.0 ± 2.0"  # the seed count is in the caption
    assert means.loc["transformer", "mqar"] == pytest.approx(82.0)


def test_lower_is_better_metric_picks_lowest_val(tmp_path):
    make(tmp_path, task="char_lm", metric="bpc", lr=1e-3, val=1.5, test=1.6)
    make(tmp_path, task="char_lm", metric="bpc", lr=1e-2, val=1.2, test=1.3)
    cell = summarize(load_runs(tmp_path)).iloc[0]
    assert cell["metric"] == "bpc" and cell["mean"] == pytest.approx(1.3)
    assert math.isnan(cell["std"]) and cell["n"] == 1


def test_fail_oom_and_unsupported_cells(tmp_path):
    make(tmp_path, model="transformer", task="listops", status="oom")
    make(tmp_path, model="transformer", task="listops", status="error", lr=1e-2)
    make(tmp_path, model="lstm", task="listops", status="diverged")
    make(tmp_path, model="mamba", task="listops", status="unsupported")
    # one seed of the chosen setting failed: n shows 1/2
    make(tmp_path, model="local", task="listops", seed=0, val=0.5, test=0.25)
    make(tmp_path, model="local", task="listops", seed=1, status="timeout")
    # a failed setting beside an ok one: the ok one is reported
    make(tmp_path, model="s4d", task="listops", lr=1e-2, status="oom")
    make(tmp_path, model="s4d", task="listops", lr=1e-3, val=0.6, test=0.5)
    text, _ = accuracy_table(summarize(load_runs(tmp_path)))
    col = text["listops"]
    assert col["transformer"] == "OOM" and col["lstm"] == "FAIL" and col["mamba"] == "n/a"
    assert col["local"] == "25.0 (n=1/2)" and col["s4d"] == "50.0"  # 1 seed is the common count


def test_lra_average_column_and_not_run_cells(tmp_path):
    for task, acc in [("listops", 0.3), ("text", 0.6), ("pathx", 0.5)]:
        make(tmp_path, model="transformer", task=task, val=acc, test=acc)
    make(tmp_path, model="performer", task="listops", val=0.2, test=0.2)
    text, means = accuracy_table(summarize(load_runs(tmp_path)))
    assert means.loc["transformer", "Avg"] == pytest.approx(45.0)  # Path-X left out
    assert text.loc["performer", "Avg"] == "–" and text.loc["performer", "text"] == "–"


def test_several_lengths_make_separate_columns(tmp_path):
    make(tmp_path, seq_len=64, val=0.9, test=0.9)
    make(tmp_path, seq_len=256, val=0.7, test=0.7)
    text, _ = accuracy_table(summarize(load_runs(tmp_path)))
    assert list(text.columns) == ["mqar L=64", "mqar L=256"]


def test_filter_runs_operators(tmp_path):
    for mem in (0, 16, 64):
        make(tmp_path, model="transformer_xl", val=0.5, test=0.5, model_cfg={"mem_len": mem})
    df = load_runs(tmp_path)
    assert sorted(filter_runs(df, {"config.model.mem_len": {"gt": 0}})["config.model.mem_len"]) \
        == [16, 64]
    assert len(filter_runs(df, {"config.model.mem_len": [0, 64]})) == 2
    assert len(filter_runs(df, {"config.model.nothing": 1})) == 0



def bench_sweep(root, models=("transformer", "linear_transformer"), lengths=(1024, 2048, 4096),
                **fields):
    for model in models:
        power = 2 if model == "transformer" else 1
        for L in lengths:
            make(root, kind="bench", model=model, task="text", seq_len=L, batch_size=32,
                 step_ms=(L / 1024) ** power * 100.0, peak=int((L / 1024) ** power * 1e9), **fields)


def seeds3(root, *, val, spread=0.002, **kw):
    """Three seeds of one cell: val - spread, val, val + spread (val and test alike)."""
    for seed, d in enumerate((-spread, 0.0, spread)):
        make(root, seed=seed, val=val + d, test=val + d, **kw)


def test_efficiency_speedup_and_exponents(tmp_path):
    bench_sweep(tmp_path)
    make(tmp_path, kind="bench", model="performer", task="text", seq_len=4096, batch_size=32,
         status="oom")
    eff = efficiency_cells(load_runs(tmp_path))
    lin = eff[(eff["model"] == "linear_transformer") & (eff["seq_len"] == 4096)].iloc[0]
    assert lin["steps_per_s"] == pytest.approx(2.5) and lin["speedup"] == pytest.approx(4.0)
    assert lin["peak_gb"] == pytest.approx(4.0)
    fits = scaling_exponents(eff).set_index("model")
    assert fits.loc["transformer", "time_exponent"] == pytest.approx(2.0)
    assert fits.loc["linear_transformer", "memory_exponent"] == pytest.approx(1.0)
    table = efficiency_table(eff)
    assert table.loc["linear_transformer", "steps/s L=4096"] == "2.5 (4.0x)"
    assert table.loc["transformer", "steps/s L=4096"] == "0.625"
    assert table.loc["performer", "steps/s L=4096"] == "OOM"
    assert table.loc["performer", "mem GB L=1024"] == "–"


def test_scaling_is_fitted_per_precision_never_across_them():
    """fp32 records of slope 2 and bf16 records of slope 1 (merged they would fit 1.77): two
    fits, 2.0 and 1.0, and two setups in the efficiency table."""
    records = []
    for precision, power in (("fp32", 2), ("bf16", 1)):
        for L in (1024, 2048, 4096):
            record = new_record(kind="bench", config_hash=f"{precision}{L}", model="transformer",
                                task="text", seed=0, seq_len=L, batch_size=8, env=BASE["env"],
                                config={"trainer": {"precision": precision}}, dtype=precision)
            record.update(status="ok", speed={"step_ms_median": (L / 1024) ** power * 100.0},
                          memory={"peak_bytes": L * 10**6, "how": "test"})
            records.append((f"{precision}-{L}", record))
    eff = efficiency_cells(records_frame(records))
    fits = scaling_exponents(eff).set_index("precision")
    assert len(fits) == 2
    assert fits.loc["fp32", "time_exponent"] == pytest.approx(2.0)
    assert fits.loc["bf16", "time_exponent"] == pytest.approx(1.0)
    table = efficiency_table(eff)
    assert sorted(table["setup"]) == ["text, batch 8, bf16, 1 threads, testcpu",
                                      "text, batch 8, fp32, 1 threads, testcpu"]


def test_precision_of_bench_records_without_a_trainer_node(tmp_path):
    # bench records written before arena-bench shared arena-train's keys say only `dtype`
    make(tmp_path, kind="bench", model="transformer", task="text", step_ms=10.0, peak=1, dtype="bf16")
    make(tmp_path, kind="bench", model="performer", task="text", step_ms=10.0, peak=1)
    eff = efficiency_cells(load_runs(tmp_path)).set_index("model")
    assert eff.loc["transformer", "precision"] == "bf16" and eff.loc["performer", "precision"] == "fp32"


def test_train_speed_is_used_when_there_is_no_bench(tmp_path):
    make(tmp_path, val=0.5, test=0.5, step_ms=50.0, peak=2e9)
    eff = efficiency_cells(load_runs(tmp_path))
    assert eff["source"].tolist() == ["train"] and eff["steps_per_s"].tolist() == [20.0]



def test_published_numbers_are_tidy_and_cited():
    pub = load_published()
    assert {"source", "citation", "table", "model", "task", "seq_len", "metric", "value",
            "unit", "note"} <= set(pub.columns)
    assert pub["citation"].notna().all()

    def value(**kw):
        hit = pub
        for k, v in kw.items():
            hit = hit[hit[k] == v]
        assert len(hit) == 1, kw
        return hit["value"].iloc[0]

    assert value(model="transformer", task="listops", table="Table 1") == 36.37
    assert value(model="performer", seq_len=4000, metric="speedup") == 5.7
    assert value(model="synthesizer", seq_len=3000, metric="steps_per_s") == 6.6  # Table 2: 1K = 1000 tokens
    assert value(model="s4d", task="pathx") == 91.95
    assert value(model="mamba", task="selective_copying") == 99.8
    assert value(model="MHA-xPos", seq_len=1024) == 67.6
    assert sorted(pub[pub["model"] == "transformer_xl"]["value"]) == [0.99, 1.06, 18.3]


def test_comparison_sets_ours_beside_published_only_for_the_matched_configuration(tmp_path):
    make(tmp_path, task="listops", seq_len=2000, val=0.4, test=0.4, experiment="lra_table1")
    make(tmp_path, model="performer", task="listops", seq_len=2000, val=0.4, test=0.4, experiment="lra_table1",
         model_cfg={"init": "lra_released"})
    seeds3(tmp_path, model="transformer", task="text", seq_len=4000, val=0.6, experiment="lra_table1",
           model_cfg={"init": "lra_released"})
    bench_sweep(tmp_path)
    seeds3(tmp_path, model="h3", task="selective_copying", seq_len=4096, val=0.6,
           experiment="mamba_selective_copying")
    seeds3(tmp_path, model="h3", task="selective_copying", seq_len=4096, val=0.1,
           experiment="quickstart")  # another study's h3: never compared
    seeds3(tmp_path, model="transformer", task="induction_heads", seq_len=256, val=1.0,
           experiment="mamba_induction_heads", model_cfg={"positional": "learned"},
           extra_metrics={"test_accuracy_len512": 0.5})
    seeds3(tmp_path, model="transformer", task="mqar", val=0.9)  # a two-task "Avg" ...
    seeds3(tmp_path, model="transformer", task="selective_copying", val=0.9)
    comp = compare_published(load_published(), load_runs(tmp_path)).set_index(
        ["model", "task", "table", "seq_len", "metric"], drop=False)
    h3 = comp.loc[("h3", "selective_copying", "Selective Copying", 4096, "accuracy")]
    assert h3["ours"] == pytest.approx(60.0) and h3["diff"] == pytest.approx(60.0 - 57.0)
    assert h3["n"] == 3 and h3["ci_low"] < 60.0 < h3["ci_high"]
    assert h3["match"] == "matched: experiment=mamba_selective_copying model=h3"
    abs_ = comp[(comp["paper_model"] == "MHA-Abs") & (comp["seq_len"] == 512)].iloc[0]
    assert abs_["ours"] == pytest.approx(50.0) and abs_["protocol"] == "extrapolation from 256"
    rope = comp[comp["paper_model"] == "MHA-RoPE"]  # needs model.positional=rope runs
    assert rope["ours"].isna().all() and rope["match"].str.startswith("unmatched: no runs").all()
    # LRA's Transformer on ListOps is matched to lra_table1 with the release's init: the run made
    # without it (an lra_table1 record of before model.init) is not set beside it
    listops = comp.loc[("transformer", "listops", "Table 1", 2000, "accuracy")]
    assert pd.isna(listops["ours"]) and listops["match"].startswith("unmatched: no runs")
    text = comp.loc[("transformer", "text", "Table 1", 4000, "accuracy")]
    assert text["ours"] == pytest.approx(60.0) and text["match"].startswith("matched: experiment=lra_table1")
    # the Performer run above lacks the released FAVOR (model.mixer.variant): never set beside LRA's row
    performer = comp[(comp["model"] == "performer") & (comp["task"] == "listops")].iloc[0]
    assert pd.isna(performer["ours"]) and "model.mixer.variant=lra_released" in performer["match"]
    average = comp[comp["task"] == "average"]  # ... is never set beside LRA's average
    assert len(average) and average["ours"].isna().all() and average["diff"].isna().all()
    assert comp[comp["metric"] == "speedup"]["ours"].isna().all()  # LRA Table 2: unmatched
    shown = comparison_display(comp)
    assert shown["Ours [95% CI]"].iloc[0].startswith("60.0 [") and shown["Configuration"].iloc[0] \
        .startswith("matched")


def test_every_published_row_names_its_configuration_or_why_not():
    rows = load_published()
    assert {"experiment", "model_config", "protocol", "matched", "why_unmatched"} <= set(rows)
    rows = rows.fillna("")
    assert set(rows["matched"]) == {"yes", "no"}
    assert (rows[rows["matched"] == "no"]["why_unmatched"] != "").all()
    matched = rows[rows["matched"] == "yes"]
    assert (matched["experiment"] != "").all() and (matched["model_config"] != "").all()
    experiments = {p.stem for p in (PUBLISHED_DIR.parent.parent / "conf" / "experiment").glob("*.yaml")}
    assert set(rows["experiment"]) - {""} <= experiments
    assert set(rows["protocol"]) <= {"test", "average", "speed", "speedup", "extrapolation from 256"}
    table = published_matches()
    assert len(table) == len(rows)
    assert table["match"].str.startswith(("matched: experiment=", "unmatched")).all()


def test_params_table_marks_models_more_than_ten_percent_over_the_transformer(tmp_path):
    make(tmp_path, model="transformer", val=0.5, test=0.5, params=100_000)
    make(tmp_path, model="mamba", val=0.5, test=0.5, params=109_000)
    make(tmp_path, model="s4d", val=0.5, test=0.5, params=150_000)
    make(tmp_path, model="s4d", task="listops", seq_len=2000, val=0.5, test=0.5, params=2_500_000)
    table = params_table(summarize(load_runs(tmp_path)))
    assert table.loc["transformer", "mqar"] == "100K" and table.loc["mamba", "mqar"] == "109K"
    assert table.loc["s4d", "mqar"] == "150K ▲ +50%"
    assert table.loc["s4d", "listops"] == "2.50M"  # no transformer on listops: nothing to compare


def test_near_chance_is_flagged_from_the_binomial_interval(tmp_path):
    for model, acc in [("transformer", 0.26), ("mamba", 0.9), ("s4d", 0.03)]:
        for seed in range(3):
            run = make(tmp_path, model=model, seed=seed, val=acc, test=acc)
            rec = json.loads((run / "record.json").read_text())
            rec["config"]["task"].update(n_pairs=4, n_test=200)  # chance 1/4 on MQAR
            (run / "record.json").write_text(json.dumps(rec))
    cells = summarize(load_runs(tmp_path)).set_index("model")
    assert cells.loc["transformer", "near_chance"] and not cells.loc["mamba", "near_chance"]
    assert cells.loc["s4d", "near_chance"]  # below chance: not above it either
    assert cells.loc["transformer", "chance"] == pytest.approx(0.25)
    text, _ = accuracy_table(cells.reset_index())
    assert text.loc["transformer", "mqar"].startswith("26.0†") and "†" not in text.loc["mamba", "mqar"]
    assert near_chance(30.0, 0.25, 100) and not near_chance(40.0, 0.25, 100)  # 25 in [21, 40]
    assert near_chance(10.0, 0.25, 100)


def claim(check, **fields):
    return {"id": check, "claim": "c", "citation": "paper", "check": check, "experiment": "test",
            **fields}


def test_speed_and_memory_claims(tmp_path):
    bench_sweep(tmp_path)
    make(tmp_path, kind="bench", model="local", task="text", seq_len=4096, batch_size=32,
         status="oom")
    runs = load_runs(tmp_path)
    result = evaluate_claims(runs, [
        claim("faster", a="linear_transformer", b="transformer", seq_len=4096),
        claim("faster", a="transformer", b="linear_transformer"),  # default: largest L
        claim("less_memory", a="linear_transformer", b="transformer", seq_len=1024),
        claim("faster", a="performer", b="transformer"),
        claim("faster", a="local", b="transformer", seq_len=4096),
        claim("exponent_below", model="linear_transformer", quantity="memory", value=1.5),
        claim("exponent_below", model="transformer", quantity="time", value=1.5),
    ]).set_index(pd.RangeIndex(7))
    assert result["status"].tolist() == ["holds", "differs", "differs", "not run", "differs",
                                         "holds", "differs"]
    assert "2.5 steps/s" in result.loc[0, "numbers"] and "0.625 steps/s" in result.loc[0, "numbers"]
    assert "L=4096" in result.loc[1, "numbers"]
    assert "local OOM" in result.loc[4, "numbers"]


def test_accuracy_claims(tmp_path):
    seeds3(tmp_path, model="mamba", task="selective_copying", val=0.98)
    seeds3(tmp_path, model="s4d", task="selective_copying", val=0.18)
    seeds3(tmp_path, model="transformer", task="mqar", seq_len=64, val=0.998)
    seeds3(tmp_path, model="transformer", task="mqar", seq_len=256, val=0.9)
    for L, lstm, bahd in [(10, 0.9, 0.99), (20, 0.7, 0.98), (40, 0.4, 0.97)]:
        seeds3(tmp_path, model="lstm", task="reverse", seq_len=L, val=lstm)
        seeds3(tmp_path, model="lstm_bahdanau", task="reverse", seq_len=L, val=bahd)
    for mem, bpc in [(0, 1.5), (32, 1.3)]:
        seeds3(tmp_path, model="transformer_xl", task="char_lm", metric="bpc", val=bpc,
               model_cfg={"mem_len": mem})
    seeds3(tmp_path, model="mamba", task="induction_heads", seq_len=256, val=1.0, spread=0.0,
           extra_metrics={"test_accuracy_len512": 1.0, "test_accuracy_len1024": 0.97})
    xl = {"model": "transformer_xl", "where": {"config.model.mem_len": {"gt": 0}}}
    xl0 = {"model": "transformer_xl", "where": {"config.model.mem_len": 0}}
    claims = [
        claim("solves_where_other_fails", a="mamba", b="s4d", task="selective_copying",
              threshold=90),
        claim("solves_where_other_fails", a="s4d", b="mamba", task="selective_copying",
              threshold=90),
        claim("solves", model="transformer", task="mqar", threshold=99),
        claim("solves", model="transformer", task="mqar", threshold=99, seq_len=64),
        claim("falls_with", model="lstm", task="reverse", key="seq_len"),
        claim("falls_with", model="lstm_bahdanau", task="reverse", key="seq_len"),
        claim("holds_with", model="lstm_bahdanau", task="reverse", key="seq_len", threshold=96),
        claim("holds_with", model="lstm", task="reverse", key="seq_len", threshold=96),
        claim("better", a=xl, b=xl0, task="char_lm"),
        claim("better", a=xl0, b=xl, task="char_lm"),
        claim("extrapolates", model="mamba", task="induction_heads", threshold=95),
        claim("extrapolates", model="mamba", task="induction_heads", threshold=99),
        claim("solves", model="mamba", task="mqar", threshold=99),
        claim("falls_with", model="transformer_xl", task="char_lm", key="config.model.mem_len"),
    ]
    result = evaluate_claims(load_runs(tmp_path), claims)
    assert result["status"].tolist() == [
        "holds", "differs", "differs", "holds", "holds", "holds", "holds", "differs",
        "holds", "differs", "holds", "differs", "not run", "holds"]
    numbers = result["numbers"].tolist()
    assert "98 [" in numbers[0] and "18 [" in numbers[0] and "(n=3)" in numbers[0]
    assert "seq_len=10: 90" in numbers[4] and "seq_len=40: 40" in numbers[4]
    assert "tested 1024: 97 [97, 97] (n=3)" in numbers[10]
    assert "mem_len=0: 1.5" in numbers[13] and "mem_len=32: 1.3" in numbers[13]


def test_verdicts_need_three_seeds_and_intervals_clear_of_each_other(tmp_path):
    for model, values in [("mamba", (0.98, 0.99, 0.985)), ("s4d", (0.2, 0.22, 0.18)),
                          ("h3", (0.5, 0.95, 0.9)), ("hyena", (0.2, 0.25))]:
        for seed, v in enumerate(values):
            make(tmp_path, model=model, task="selective_copying", seed=seed, val=v, test=v)
    vs = lambda a, b: claim("solves_where_other_fails", a=a, b=b, task="selective_copying",
                            threshold=90)
    result = evaluate_claims(load_runs(tmp_path), [
        vs("mamba", "s4d"), vs("s4d", "mamba"), vs("mamba", "h3"), vs("mamba", "hyena"),
        claim("better", a="mamba", b="h3", task="selective_copying"),
        claim("better", a="hyena", b="mamba", task="selective_copying"),
        claim("solves", model="h3", task="selective_copying", threshold=90),
    ])
    assert result["status"].tolist() == ["holds", "differs", "inconclusive", "too few seeds",
                                         "inconclusive", "too few seeds", "inconclusive"]
    assert "hyena 22.5 [0, 54.27] (n=2)" in result["numbers"][3]  # accuracy's cut to [0, 100]


def test_a_claim_is_decided_on_its_own_study_only(tmp_path):
    seeds3(tmp_path, model="transformer", task="mqar", val=0.99, experiment="zoology_mqar_cpu",
           model_cfg={"d_model": 64})
    seeds3(tmp_path, model="s4d", task="mqar", val=0.3, experiment="zoology_mqar_cpu",
           model_cfg={"d_model": 64})
    seeds3(tmp_path, model="s4d", task="mqar", val=0.995, experiment="quickstart",
           model_cfg={"d_model": 64})  # in the same folder, another study: never counted
    runs = load_runs(tmp_path)
    runs["config.sweep.name"] = "renamed"  # sweep.name=... on the command line: still found
    claims = load_claims(PUBLISHED_DIR / "claims_zoology_mqar.yaml")
    result = evaluate_claims(runs, claims).set_index("id")
    assert result.loc["zoology_attention_solves_where_ssm_fails_d64", "status"] == "holds"
    assert "s4d 30 [" in result.loc["zoology_attention_solves_where_ssm_fails_d64", "numbers"]
    assert result.loc["zoology_attention_solves_where_h3_fails_d64", "status"] == "not run"
    # records written before the experiment field: their sweep name is their experiment
    old = load_runs(tmp_path).drop(columns="experiment")
    old["config.sweep.name"] = "zoology_mqar_cpu"
    assert evaluate_claims(old, claims).set_index("id").loc[
        "zoology_attention_solves_where_ssm_fails_d64", "status"] == "inconclusive"  # 6 s4d seeds
    assert evaluate_claims(runs.assign(experiment="quickstart"), claims)["status"].eq(
        "not run").all()


def test_records_carry_the_experiment_choice_and_old_records_stay_valid():
    from harness.records import validate_record

    rec = new_record(kind="train", config_hash="h", model="m", task="t", seed=0, seq_len=8,
                     batch_size=1, env={}, config={}, experiment="zoology_mqar_cpu")
    assert rec["experiment"] == "zoology_mqar_cpu" and validate_record(rec) == []
    outside_hydra = new_record(kind="train", config_hash="h", model="m", task="t", seed=0,
                               seq_len=8, batch_size=1, env={}, config={})
    assert outside_hydra["experiment"] is None and validate_record(outside_hydra) == []
    old = {k: v for k, v in rec.items() if k != "experiment"}
    assert validate_record(old) == []
    assert validate_record({**rec, "experiment": 3})  # a wrong type is still caught


def test_shipped_claims_load_and_bad_claims_are_explained(tmp_path):
    claims = [c for path in sorted(PUBLISHED_DIR.glob("claims*.yaml")) for c in load_claims(path)]
    assert all(c["experiment"] for c in claims)
    checks = {c["check"] for c in claims}
    assert {"faster", "less_memory", "solves", "solves_where_other_fails", "better",
            "falls_with", "holds_with", "extrapolates", "exponent_below"} <= checks
    assert all(c["citation"] for c in claims)
    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - {id: x, claim: c, citation: p, experiment: s, check: faster, a: mamba}\n")
    with pytest.raises(ValueError, match=r"claim 'x': check 'faster' needs field 'b'"):
        load_claims(bad)
    bad.write_text("claims:\n  - {id: z, claim: c, citation: p, check: faster, a: mamba, b: s4d}\n")
    with pytest.raises(ValueError, match=r"claim 'z': check 'faster' needs field 'experiment'"):
        load_claims(bad)
    bad.write_text("claims:\n  - {id: y, claim: c, citation: p, check: quicker}\n")
    with pytest.raises(ValueError, match="unknown check 'quicker'"):
        load_claims(bad)



class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables = {}, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images[attrs["alt"]] = attrs["src"]
        self.tables += tag == "table"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for model, acc in [("transformer", 0.6), ("linear_transformer", 0.5)]:
        for L in (1024, 2048, 4096):
            for seed in (0, 1):
                run = make(root, model=model, task="text", seq_len=L, seed=seed, val=acc,
                           test=acc + seed / 100)
                lines = [{"step": s, "split": "val", "loss": 1.0, "metric_name": "accuracy",
                          "metric": acc * s / 3, "elapsed_s": s, "tokens_per_s": 1.0}
                         for s in (1, 2, 3)]
                (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    make(root, model="performer", task="text", seq_len=1024, status="oom")
    bench_sweep(root, lengths=(1000, 2000, 4000), experiment="lra_speed")  # LRA Table 2: 1K = 1000 tokens
    seeds3(root, model="h3", task="selective_copying", seq_len=4096, val=0.6,
           experiment="mamba_selective_copying")  # matched to Mamba's published H3 row
    return root


def test_cli_writes_every_output(report_dir, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="harness.report"):  # what the console shows
        assert main([str(report_dir), "--out", str(out)]) == 0
    printed = caplog.text
    assert "Accuracy" in printed and "text L=4096" in printed and "OOM" in printed
    assert "steps/s L=4000" in printed and f"report: {out / 'report.html'}" in printed
    for name in ("accuracy", "efficiency", "scaling_exponents", "comparison", "claims"):
        for ext in ("csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").exists()
    plots = {"accuracy_vs_seq_len", "scaling", "bubble", "training_curves", "published", "claims"}
    for name in plots:
        assert (out / "plots" / f"{name}.png").exists() and (out / "plots" / f"{name}.pdf").exists()
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    written = {p.stem for p in (out / "plots").glob("*.png")}
    assert plots <= written and set(parser.images) == written and parser.tables >= 4
    for src in parser.images.values():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert all(f"plots/{name}.png" in md for name in plots)
    claims = pd.read_csv(out / "tables" / "claims.csv").set_index("id")
    assert claims.loc["lra_linear_transformer_faster_4k", "status"] == "holds"
    assert claims.loc["mamba_selective_copying_study", "status"] == "not run"
    assert "Parameters" in md and "matched: experiment=mamba_selective_copying model=h3" in md


def test_cli_without_records_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="no record.json under"):
        main([str(tmp_path), "--no-plots"])


@pytest.mark.slow
def test_cli_of_this_checkout_prints_tables_on_stdout_and_warnings_on_stderr(report_dir, tmp_path):
    proc = subprocess.run(cli("harness.report", str(report_dir), str(tmp_path / "missing"), "--out",
                              str(tmp_path / "out"), "--no-plots"),
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Accuracy" in proc.stdout and "OOM" in proc.stdout and "report: " in proc.stdout
    assert "WARNING [harness.report]" in proc.stderr and "missing" in proc.stderr
    assert "Accuracy" not in proc.stderr


def test_the_parameters_caption_says_how_each_study_matched_its_models(tmp_path):
    for model in ("transformer", "mamba"):
        run = make(tmp_path / "new", model=model, val=0.5, test=0.5)
        record = json.loads((run / "record.json").read_text())
        record["config"]["matching"] = {"rule": "equal_size"}
        record["config"]["sweep"]["name"] = "quickstart"
        (run / "record.json").write_text(json.dumps(record))
    make(tmp_path / "new", model="transformer", task="txl", val=0.5, test=0.5)  # a record of before the key
    assert matching_note(load_runs(tmp_path / "new")) == \
        "quickstart: every model at the same width and depth (size.d_model, size.n_layers) (equal_size)"
    make(tmp_path / "old", val=0.5, test=0.5)
    assert matching_note(load_runs(tmp_path / "old")) == ""
