"""arena-bench: records for every outcome, memory that grows with length, scaling fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.bench import fit_exponent, scaling_exponents
from harness.measure import StepTimer
from harness.records import validate_record

ARENA_BENCH = str(Path(sys.executable).parent / "arena-bench")
FAST = ["batch_size=2", "warmup_steps=1", "min_steps=3", "min_time_s=0", "threads=1",
        "model.d_model=32", "model.n_layers=1"]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([ARENA_BENCH, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def records_under(path: Path) -> dict[tuple, dict]:
    out = {}
    for p in path.rglob("record.json"):
        r = json.loads(p.read_text())
        assert validate_record(r) == [], p
        out[(r["model"], r["seq_len"])] = r
    return out


def test_sweep_with_an_oom_configuration_records_it_and_goes_on(tmp_path):
    # a 65536-wide feed-forward on 8 x 2048 tokens needs > 4 GB; on 8 x 64 tokens ~150 MB
    bench(tmp_path, "-m", "model=transformer", "seq_len=64,2048", "memory_limit_mb=1500",
          "model.d_ff=65536", "sweep.name=t", *FAST[1:], "batch_size=8")
    records = records_under(tmp_path / "results/sweeps/t")
    assert records[("transformer", 64)]["status"] == "ok"
    oom = records[("transformer", 2048)]
    assert oom["status"] == "oom" and oom["kind"] == "bench", oom["error"]


def test_transformer_memory_grows_with_length_and_exponents_are_written(tmp_path):
    out = bench(tmp_path, "-m", "model=transformer", "seq_len=256,1024", "sweep.name=m", *FAST)
    records = records_under(tmp_path / "results/sweeps/m")
    short, long = records[("transformer", 256)], records[("transformer", 1024)]
    assert short["status"] == long["status"] == "ok"
    assert long["memory"]["peak_bytes"] > short["memory"]["peak_bytes"]
    assert long["speed"]["step_ms_median"] > 0 and short["speed"]["steps_timed"] >= 3
    assert "scaling exponents" in out.stdout
    assert (tmp_path / "results/sweeps/m/scaling.csv").read_text().startswith("model,task")


def test_fit_exponent_recovers_a_power_law():
    lengths = [1024, 2048, 4096, 8192]
    assert fit_exponent(lengths, [3.0 * l**2 for l in lengths]) == pytest.approx(2.0)
    assert fit_exponent(lengths, [5.0 * l for l in lengths]) == pytest.approx(1.0)
    assert fit_exponent([1024], [1.0]) is None
    rows = scaling_exponents([
        {"kind": "bench", "status": "ok", "model": "m", "task": "t", "batch_size": 1, "seq_len": l,
         "speed": {"step_ms_median": float(l)}, "memory": {"peak_bytes": l * l}} for l in lengths
    ])
    assert rows[0]["time_exponent"] == pytest.approx(1.0) and rows[0]["memory_exponent"] == pytest.approx(2.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_synchronises():
    """A timed region that launches a long kernel must include the kernel's run time."""
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    timer = StepTimer(device, warmup=1)
    for _ in range(3):
        timer.start()
        for _ in range(20):
            x = x @ x / 4096
        timer.stop()
    # 20 matmuls of 4096^3 are ~2.7 TFLOP: far more than the microseconds of a launch
    assert min(timer.times_ms) > 1.0
