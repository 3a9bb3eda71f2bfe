"""The measurement environment (issue 21): the allocator set up and recorded, a CPU peak that is
a process's own (reset VmHWM above a floor), and rounds summarised into one point."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
import torch

from harness.api import compose_config
from harness.bench import add_round, bench_job, check_bench_settings, rounds_measured, round_of, run_worker
from harness.measure import PeakMemory, high_water_rss_bytes, reset_peak_rss
from harness.runtime import GLIBC_TUNED, check_allocator, configure_allocator, runtime_env, worker_environment
from harness.validation import ConfigError, check_config

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and mallopt are Linux's")
MiB = 2**20


# --------------------------------------------------------------------------- allocator


def test_allocator_setting_is_validated_with_the_key_named():
    with pytest.raises(ValueError, match="trainer.allocator must be one of tuned, default"):
        check_allocator("jemalloc")
    with pytest.raises(ConfigError, match="trainer.allocator"):
        check_config(compose_config(["trainer.allocator=fast"]))
    assert compose_config([]).trainer.allocator == "tuned"
    with pytest.raises(ValueError, match="bench.rounds must be a positive integer"):
        check_bench_settings(compose_config(["bench.rounds=0"], config_name="bench"))
    with pytest.raises(ValueError, match="bench.paired_cycles must be an integer >= 0"):
        check_bench_settings(compose_config(["bench.paired_cycles=-1"], config_name="bench"))


@linux_only
def test_tuned_glibc_is_applied_recorded_and_handed_to_workers(monkeypatch):
    for name in GLIBC_TUNED:
        monkeypatch.delenv(name, raising=False)
    info = configure_allocator("tuned")
    if info["name"] != "glibc":  # a preloaded tcmalloc/jemalloc is used as it is
        assert info["how"] == "preloaded"
        return
    assert info["how"] == "mallopt and environment" and info["mmap_threshold"] == 2**30
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(2**30)  # for the processes this one starts
    assert worker_environment("tuned")["MALLOC_TRIM_THRESHOLD_"] == str(2**30)
    assert not set(GLIBC_TUNED) & set(worker_environment("default"))
    env = runtime_env(info)
    assert env["allocator"] is info and env["threads"] == torch.get_num_threads()
    assert env["affinity"] == sorted(os.sched_getaffinity(0))


def test_the_allocator_is_part_of_a_bench_job_but_not_of_a_train_runs_hash():
    from harness.config import result_config
    from harness.records import config_hash

    hashes = {a: config_hash(result_config(compose_config([f"trainer.allocator={a}"]))) for a in ("tuned", "default")}
    assert hashes["tuned"] == hashes["default"]  # the same training run, whatever its allocator
    cfg = compose_config(["trainer.allocator=default"], config_name="bench")
    assert bench_job(cfg, torch.device("cpu"))["allocator"] == "default"


# --------------------------------------------------------------------------- CPU peak


@linux_only
def test_cpu_peak_is_the_regions_own_after_a_bigger_one():
    """A 96 MiB region, then an 8 MiB one in the same process: the second reads its own size,
    not the first's (VmHWM is reset at start); raw = floor + peak."""
    # freed but resident heap from earlier tests in this process would be reused by the region
    # without raising the resident set: give it back first
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    first = PeakMemory(torch.device("cpu"))
    first.start()
    big = torch.ones(96 * MiB // 4)  # touched: resident
    big_peak = first.stop()
    del big
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # back to the OS, whichever thresholds glibc has
    second = PeakMemory(torch.device("cpu"))
    second.start()
    small = torch.ones(8 * MiB // 4)
    small_peak = second.stop()
    del small
    assert big_peak["how"] == small_peak["how"] == "cpu_vmhwm_above_floor"
    assert 90 * MiB <= big_peak["peak_bytes"] <= 130 * MiB
    assert 7 * MiB <= small_peak["peak_bytes"] <= 40 * MiB
    assert small_peak["peak_raw_bytes"] == small_peak["floor_bytes"] + small_peak["peak_bytes"]
    assert small_peak["peak_raw_bytes"] < big_peak["peak_raw_bytes"] - 50 * MiB


@linux_only
def test_reset_brings_the_high_water_mark_down_to_the_resident_set():
    held = torch.ones(64 * MiB // 4)
    del held
    assert reset_peak_rss()
    from harness.measure import current_rss_bytes

    assert high_water_rss_bytes() <= current_rss_bytes() + 4 * MiB


@pytest.mark.slow
@linux_only
def test_a_small_job_under_a_large_parent_reads_its_own_size():
    """The parent holds ~600 MiB (touched) while a worker measures a tiny model: ru_maxrss in the
    worker would start at the parent's peak (it survives fork and exec on Linux); the worker's
    peak resident set, reset after its floor, is its own."""
    parent = bytearray(600 * MiB)
    parent[::4096] = b"\1" * len(parent[::4096])  # touch every page
    cfg = compose_config(["task.seq_len=32", "trainer.batch_size=1", "trainer.threads=1", "size.d_model=32",
                          "size.n_layers=1", "bench.untimed_steps=1", "bench.min_repeats=2",
                          "bench.min_time_s=0"], config_name="bench")
    result = run_worker(bench_job(cfg, torch.device("cpu")), timeout_s=300)
    assert result["status"] == "ok", result.get("error")
    memory = result["memory"]
    assert memory["how"] == "cpu_vmhwm_above_floor"
    assert memory["peak_bytes"] < 64 * MiB  # a tiny model: a few MiB above the runtime floor
    assert memory["peak_raw_bytes"] < 600 * MiB - 100 * MiB  # whole worker, torch included
    assert result["env"]["allocator"]["setting"] == "tuned"
    del parent


# --------------------------------------------------------------------------- rounds


def test_rounds_are_summarised_by_the_median_round_and_keep_their_spread():
    def result(ms: float, peak: int) -> dict:
        return {"status": "ok", "speed": {"step_ms_median": ms, "step_ms_iqr": ms / 10, "steps_timed": 5,
                                          "tokens_per_s": 1000 * 1e3 / ms, "steps_per_s": 1e3 / ms},
                "memory": {"peak_bytes": peak, "peak_raw_bytes": peak + 100, "floor_bytes": 100,
                           "how": "cpu_vmhwm_above_floor"}}

    first = result(30.0, 300)
    record = {"status": "ok", "speed": dict(first["speed"]), "memory": dict(first["memory"]),
              "rounds": [round_of(first)]}
    assert rounds_measured(record) == 1 and rounds_measured({"status": "ok"}) == 1
    add_round(record, result(10.0, 100))
    add_round(record, {"status": "timeout", "error": "slow"})
    add_round(record, result(20.0, 200))
    speed, memory = record["speed"], record["memory"]
    assert speed["step_ms_median"] == 20.0 and (speed["round_ms_min"], speed["round_ms_max"]) == (10.0, 30.0)
    assert speed["rounds"] == 3 == rounds_measured(record) and speed["steps_timed"] == 15
    assert speed["tokens_per_s"] == pytest.approx(1000 * 1e3 / 20.0) and speed["step_ms_iqr"] == 2.0
    assert memory["peak_bytes"] == 200 and memory["peak_raw_bytes"] == 300
    assert [r["status"] for r in record["rounds"]] == ["ok", "ok", "timeout", "ok"]


def test_rounds_are_not_part_of_a_bench_hash_other_measurement_settings_are():
    from harness.config import result_config
    from harness.records import config_hash

    def bench_hash(*overrides: str) -> str:
        return config_hash(result_config(compose_config(list(overrides), config_name="bench")))

    assert bench_hash("bench.rounds=3") == bench_hash("bench.rounds=1")
    assert bench_hash("bench.min_repeats=3") != bench_hash("bench.min_repeats=4")
