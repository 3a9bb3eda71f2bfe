"""The bench/ scripts over bench records: the README's efficiency table, two runs' exponents side
by side, and the exponents' standard error (over rounds, or over paired cycles) that both print."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from test_report import bench_sweep, make

from harness.results import efficiency_cells, load_runs, scaling_exponents


def load_script(name: str):
    """``bench/<name>.py`` as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_readme_efficiency_table_script(tmp_path, capsys):
    """bench/efficiency_table.py: one row per model, speed-up at the lengths asked for, the
    exponents of the shared fit, an OOM shown as such, and the settings above the table."""
    script = load_script("efficiency_table")
    bench_sweep(tmp_path, lengths=(1024, 2048, 4096, 8192))
    make(tmp_path, kind="bench", model="performer", task="text", seq_len=8192, batch_size=32, status="oom")
    script.main([str(tmp_path), "--at", "4096,8192", "--csv", str(tmp_path / "t.csv")])
    out = capsys.readouterr().out
    assert "machine: testcpu" in out and "batch: 32" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "model" not in line}
    assert rows["linear_transformer"][2] == "1.25 (8.0x)"      # 8192: 800 ms vs 6400 ms
    assert rows["linear_transformer"][-2] == "1.00" and rows["transformer"][-2] == "2.00"
    assert rows["performer"][2] == "OOM"
    assert list(pd.read_csv(tmp_path / "t.csv")["model"])[0] == "linear_transformer"
    with pytest.raises(SystemExit, match="no such folder"):
        script.main([str(tmp_path / "missing")])


def test_the_exponent_agreement_script(tmp_path, capsys):
    """bench/exponent_agreement.py: the two sweeps' exponents per model, their difference, and
    exit status 1 when one is over the limit."""
    script = load_script("exponent_agreement")
    bench_sweep(tmp_path / "a")
    for model, power in (("transformer", 2.06), ("linear_transformer", 1.0)):  # the same, run again
        for L in (1024, 2048, 4096):
            make(tmp_path / "b", kind="bench", model=model, task="text", seq_len=L, batch_size=32,
                 step_ms=(L / 1024) ** power * 100.0, peak=int((L / 1024) ** power * 1e9))
    table = script.agreement(str(tmp_path / "a"), str(tmp_path / "b"))
    assert table.loc["transformer", "time diff"] == pytest.approx(0.06)
    assert table.loc["linear_transformer", "time diff"] == pytest.approx(0.0, abs=1e-9)
    assert script.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "over the limit" in capsys.readouterr().out
    assert script.main([str(tmp_path / "a"), str(tmp_path / "b"), "--limit", "0.07"]) == 0
    with pytest.raises(SystemExit, match="no such folder"):
        script.main([str(tmp_path / "a"), str(tmp_path / "missing")])


def test_the_time_exponent_carries_a_bootstrap_standard_error_over_rounds(tmp_path):
    """Rounds that agree give an exponent with no error; rounds 10% apart an error of a few
    hundredths, the same on every call; records without 3 rounds per point none."""
    for L in (1024, 2048, 4096):
        ms = L / 1024 * 100.0
        common = dict(kind="bench", model="s4d", task="text", seq_len=L, batch_size=1, step_ms=ms, peak=L * 1000)
        make(tmp_path / "agree", **common, rounds=[{"status": "ok", "step_ms_median": ms}] * 3)
        make(tmp_path / "apart", **common, rounds=[{"status": "ok", "step_ms_median": ms * f} for f in (0.9, 1, 1.1)]
             + [{"status": "error", "step_ms_median": None}])
        make(tmp_path / "once", **common)
    fit = {name: scaling_exponents(efficiency_cells(load_runs(tmp_path / name))).iloc[0]
           for name in ("agree", "apart", "once")}
    assert fit["agree"]["time_exponent"] == pytest.approx(1.0)
    assert fit["agree"]["time_exponent_se"] == pytest.approx(0.0, abs=1e-12)
    assert 0.01 < fit["apart"]["time_exponent_se"] < 0.1
    again = scaling_exponents(efficiency_cells(load_runs(tmp_path / "apart"))).iloc[0]
    assert again["time_exponent_se"] == fit["apart"]["time_exponent_se"]
    assert np.isnan(fit["once"]["time_exponent_se"])


def test_the_time_exponent_of_paired_lengths_is_fitted_on_their_cycles(tmp_path):
    """bench.paired_cycles: the lengths timed in one process are fitted on their cycles, which
    a drifting machine slows alike; whole cycles resampled, so a drift shared by every length
    costs no precision. Paired times from two processes, or missing at one length, are not
    mixed: the fit falls back to the rounds."""
    lengths, drift = (1024, 2048, 4096), (1.0, 1.3, 0.8, 1.1, 0.9)  # each cycle's speed, shared
    for name in ("paired", "two_processes", "one_missing"):
        for i, L in enumerate(lengths):
            ms = L / 1024 * 100.0
            paired = {"status": "ok", "cycles": 5, "steps_per_cycle": 2, "lengths": list(lengths),
                      "cycle_ms": [ms * L / 1024 * d for d in drift],  # time grows as L^2 here
                      "measured_at": "2026-12-07T00:00:00" if name != "two_processes" or i else "other"}
            rounds = [{"status": "ok", "step_ms_median": ms}] * 3
            make(tmp_path / name, kind="bench", model="s4d", task="text", seq_len=L, batch_size=1,
                 step_ms=ms, peak=L * 1000, rounds=rounds,
                 **({} if name == "one_missing" and L == 2048 else {"paired": paired}))
    fit = {name: scaling_exponents(efficiency_cells(load_runs(tmp_path / name))).iloc[0]
           for name in ("paired", "two_processes", "one_missing")}
    assert fit["paired"]["time_from"] == "paired"
    assert fit["paired"]["time_exponent"] == pytest.approx(2.0)
    assert fit["paired"]["time_exponent_se"] == pytest.approx(0.0, abs=1e-12)
    for name in ("two_processes", "one_missing"):
        assert fit[name]["time_from"] == "rounds" and fit[name]["time_exponent"] == pytest.approx(1.0)
