"""arena-bench: arena-train's vocabulary, records for every outcome, memory that grows with
length, and the report's scaling fit for a sweep."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import cli, cli_env

from harness.api import compose_config
import harness.bench
from harness.bench import bench_job, finish_rounds, renamed_overrides, run_bench, write_scaling
from harness.measure import StepTimer
from harness.records import environment, new_record, read_record, validate_record, write_record

FAST = ["trainer.batch_size=2", "bench.untimed_steps=1", "bench.min_repeats=3", "bench.min_time_s=0",
        "trainer.threads=1", "size.d_model=32", "size.n_layers=1"]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli("harness.bench", *args), cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def records_under(path: Path) -> dict[tuple, dict]:
    out = {}
    for p in path.rglob("record.json"):
        r = json.loads(p.read_text())
        assert validate_record(r) == [], p
        out[(r["model"], r["seq_len"])] = r
    return out


# --------------------------------------------------------------------------- the vocabulary


def test_the_job_reads_arena_trains_keys_and_the_model_follows_task_seq_len():
    cfg = compose_config(["model=linformer", "task.seq_len=8192", "trainer.batch_size=3",
                          "trainer.precision=bf16", "bench.min_repeats=7"], config_name="bench")
    job = bench_job(cfg, torch.device("cpu"))
    assert job["spec"]["seq_len"] == 8192 and job["model"]["mixer"]["seq_len"] == 8192
    assert (job["batch_size"], job["precision"], job["min_repeats"]) == (3, "bf16", 7)
    defaults = compose_config([], config_name="bench")
    assert (defaults.task.seq_len, defaults.trainer.batch_size) == (1024, 8)
    with pytest.raises(ValueError, match="trainer.precision"):
        bench_job(compose_config(["trainer.precision=fp16"], config_name="bench"), torch.device("cpu"))


def test_old_spellings_are_read_as_the_new_keys_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="harness.bench"):
        args = renamed_overrides(["-m", "model=transformer", "seq_len=1024,2048", "+dtype=bf16",
                                  "warmup_steps=2", "trainer.warmup_steps=5", "hydra.run.dir=x"])
    assert args == ["-m", "model=transformer", "task.seq_len=1024,2048", "+trainer.precision=bf16",
                    "bench.untimed_steps=2", "trainer.warmup_steps=5", "hydra.run.dir=x"]
    warned = caplog.text
    assert all(new in warned for new in ("task.seq_len", "trainer.precision", "bench.untimed_steps"))
    assert "trainer.warmup_steps" not in warned


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_linformer_benches_beyond_its_task_default_length_set_by_an_old_spelling(tmp_path):
    # one arena-bench run for two checks (each run starts arena-bench and a measurement process):
    # text's own seq_len is 4096: the projections must follow task.seq_len, not the task default;
    # and the old spellings seq_len= and batch_size= warn and take effect, as task.seq_len= and
    # trainer.batch_size=
    out = bench(tmp_path, "model=linformer", "seq_len=8192", "batch_size=1", *FAST[1:], "bench.min_repeats=2")
    assert "`seq_len` is an old spelling" in out.stderr and "task.seq_len=8192" in out.stderr
    assert "`batch_size` is an old spelling" in out.stderr
    record = json.loads((tmp_path / "results/bench/linformer-text/L8192-B1-fp32/record.json").read_text())
    assert record["status"] == "ok", record["error"]
    assert (record["seq_len"], record["batch_size"]) == (8192, 1)
    assert record["config"]["model"]["mixer"]["seq_len"] == 8192
    assert "linformer L=8192 B=1 fp32: ok" in out.stdout + out.stderr


@pytest.mark.slow
def test_sweep_with_an_oom_configuration_records_it_and_goes_on(tmp_path):
    # a 65536-wide feed-forward on 8 x 2048 tokens needs > 4 GB; on 8 x 64 tokens ~150 MB
    bench(tmp_path, "-m", "model=transformer", "task.seq_len=64,2048", "bench.memory_limit_mb=1500",
          "model.d_ff=65536", "sweep.name=t", *FAST[1:], "trainer.batch_size=8")
    records = records_under(tmp_path / "results/sweeps/t")
    assert records[("transformer", 64)]["status"] == "ok"
    oom = records[("transformer", 2048)]
    assert oom["status"] == "oom" and oom["kind"] == "bench", oom["error"]


@pytest.mark.slow
def test_transformer_memory_grows_with_length_and_exponents_are_written(tmp_path):
    # two rounds, interleaved: each job measures its first, the multirun's end the second; then
    # both lengths again in one process, alternating (bench.paired_cycles), for the exponent
    out = bench(tmp_path, "-m", "model=transformer", "task.seq_len=256,1024", "sweep.name=m",
                "bench.rounds=2", "bench.paired_cycles=2", *FAST)
    records = records_under(tmp_path / "results/sweeps/m")
    short, long = records[("transformer", 256)], records[("transformer", 1024)]
    assert short["status"] == long["status"] == "ok"
    assert short["dtype"] == "fp32" and short["config"]["trainer"]["precision"] == "fp32"
    assert long["memory"]["peak_bytes"] > short["memory"]["peak_bytes"]
    assert long["speed"]["step_ms_median"] > 0 and short["speed"]["steps_timed"] >= 6
    assert "bench.rounds: round 2 over 2 configurations" in out.stdout + out.stderr
    for record in (short, long):
        assert [r["status"] for r in record["rounds"]] == ["ok", "ok"] and record["speed"]["rounds"] == 2
        assert record["speed"]["round_ms_min"] <= record["speed"]["step_ms_median"] <= record["speed"]["round_ms_max"]
        assert record["env"]["allocator"]["setting"] == "tuned" and record["env"]["threads"] == 1
        assert record["memory"]["how"] == "cpu_vmhwm_above_floor"
        paired = record["paired"]
        assert paired["status"] == "ok" and paired["lengths"] == [256, 1024] and len(paired["cycle_ms"]) == 2
    assert long["paired"]["step_ms_median"] > short["paired"]["step_ms_median"]
    assert "transformer at lengths [256, 1024], alternating in one process" in out.stdout + out.stderr
    assert "scaling exponents" in out.stdout + out.stderr
    scaling = pd.read_csv(tmp_path / "results/sweeps/m/scaling.csv")
    assert list(scaling.columns[:2]) == ["model", "task"] and scaling["time_from"].tolist() == ["paired"]


def test_a_job_that_takes_over_a_folder_keeps_its_own_rounds(tmp_path, monkeypatch, caplog):
    # The bookkeeping of rounds, with each measurement's result made up (the test above measures
    # for real): trainer.threads is not in the folder name, so the threads=2 job moves the
    # threads=1 record aside, and the round the threads=1 job left must not join its record.
    def measured(job: dict, timeout_s: float) -> dict:
        return {"status": "ok", "env": {"threads": job["threads"]},
                "speed": {"step_ms_median": 10.0 * job["threads"], "step_ms_iqr": 0.0,
                          "steps_timed": 3, "tokens_per_s": 1.0},
                "memory": {"peak_bytes": 1, "how": "test"}}
    monkeypatch.setattr(harness.bench, "run_worker", measured)
    run_dir = tmp_path / "L64"
    for threads in (1, 2):
        cfg = compose_config(["task.seq_len=64", "bench.rounds=3", f"trainer.threads={threads}"],
                             config_name="bench")
        run_bench(cfg, run_dir, defer_rounds=True)
    with caplog.at_level(logging.WARNING, logger="harness.bench"):
        finish_rounds()
    record = read_record(run_dir)
    assert record["env"]["threads"] == 2 and record["speed"]["round_ms_min"] == 20.0
    assert len(record["rounds"]) == record["speed"]["rounds"] == 3
    (aside,) = [read_record(p) for p in run_dir.glob(".superseded-*")]
    assert aside["env"]["threads"] == 1 and len(aside["rounds"]) == 1
    assert caplog.text.count("now holds another job of this sweep") == 1


# --------------------------------------------------------------------------- scaling.csv


def test_scaling_csv_is_the_reports_fit_one_row_per_precision(tmp_path):
    """fp32 steps growing as L^2 and bf16 steps as L^1, same model: two fits, 2.0 and 1.0."""
    env = environment(torch.device("cpu"))
    for dtype, power in (("fp32", 2), ("bf16", 1)):
        for L in (1024, 2048, 4096):
            record = new_record(kind="bench", config_hash=f"{dtype}{L}", model="transformer", task="text",
                                seed=0, seq_len=L, batch_size=8, env=env,
                                config={"trainer": {"precision": dtype}}, dtype=dtype)
            record.update(status="ok", speed={"step_ms_median": (L / 1024) ** power * 10.0},
                          memory={"peak_bytes": L * 1000, "how": "test"})
            (tmp_path / f"{dtype}-{L}").mkdir()
            write_record(tmp_path / f"{dtype}-{L}", record)
    path = write_scaling(tmp_path)
    fits = pd.read_csv(path).set_index("precision")
    assert len(fits) == 2
    assert fits.loc["fp32", "time_exponent"] == pytest.approx(2.0)
    assert fits.loc["bf16", "time_exponent"] == pytest.approx(1.0)
    assert fits["memory_exponent"].tolist() == pytest.approx([1.0, 1.0])


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
