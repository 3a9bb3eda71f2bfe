"""Sweeps with this checkout's `arena-train -m` (``python -m harness.train -m``): failure isolation,
idempotent reruns, kill -9 and resume, Hydra launchers and sweepers, the progress and summary lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_env

from harness.records import validate_record

pytestmark = pytest.mark.slow  # every test here launches arena-train
TINY = ["logger=none", "trainer=smoke", "trainer.steps=12", "trainer.eval_every=6", "trainer.checkpoint_every=2",
        "trainer.threads=1", "task.vocab_size=32", "task.seq_len=32", "task.n_train=200", "task.n_val=32",
        "task.n_test=32"]


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli("harness.train", "-m", *TINY, *args), cwd=tmp_path, env=env(tmp_path),
                          capture_output=True, text=True, timeout=600)


def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache"))


def skipped(proc: subprocess.CompletedProcess) -> int:
    return sum(line.startswith("skip ") for line in proc.stdout.splitlines())


def statuses(sweep_dir: Path) -> dict[str, str]:
    out = {}
    for p in sweep_dir.rglob("record.json"):
        record = json.loads(p.read_text())
        assert validate_record(record) == [], p
        out[p.parent.name] = record["status"]
    return out


def test_a_failing_job_is_recorded_and_the_sweep_goes_on_then_reruns_skip(tmp_path):
    # n_pairs=99 cannot fit in 32 tokens: that job fails with a clear error
    proc = sweep(tmp_path, "task.n_pairs=1,2,3,99", "sweep.name=s")
    assert proc.returncode == 0, proc.stderr
    found = statuses(tmp_path / "results/sweeps/s")
    assert sorted(found.values()) == ["error", "ok", "ok", "ok"]
    # not a terminal: the bar gives way to one line per finished job, counted over the sweep
    assert "sweep: 1/4 jobs done" in proc.stdout and "sweep: 4/4 jobs done" in proc.stdout
    assert "sweep summary: 4 records: 1 error, 3 ok" in proc.stdout
    assert "task.n_pairs=99 needs 99 distinct keys" in proc.stderr, "the failed job's message"
    again = sweep(tmp_path, "task.n_pairs=1,2,3,99", "sweep.name=s")
    assert again.returncode == 0
    assert skipped(again) == 4  # ok jobs skipped; the failed one only on request
    assert "its recorded error: ValueError: mqar: task.n_pairs=99" in again.stderr
    retried = sweep(tmp_path, "task.n_pairs=1,2,3,99", "sweep.name=s", "sweep.retry_failed=true")
    assert skipped(retried) == 3


def test_fail_fast_exits_nonzero(tmp_path):
    proc = sweep(tmp_path, "task.n_pairs=99,1", "sweep.name=ff", "sweep.fail_fast=true")
    assert proc.returncode != 0
    assert list(statuses(tmp_path / "results/sweeps/ff").values()) == ["error"], "stops at the first failure"


def test_sweep_killed_with_sigkill_then_restarted_finishes_with_every_record(tmp_path):
    # 50 steps a job (over a second), a checkpoint every 2: time enough for the kill, which lands
    # within a 20 ms poll of the second job's first checkpoint, to land inside the second job
    args = cli("harness.train", "-m", *TINY, "trainer.steps=50", "seed=0,1,2", "sweep.name=k")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    sweep_dir = tmp_path / "results/sweeps/k"
    deadline = time.time() + 300
    # kill once the first job is done and the second is part-way through
    while time.time() < deadline:
        done = list(sweep_dir.rglob("record.json"))
        checkpoints = [p for p in sweep_dir.rglob("checkpoint.pt") if not (p.parent / "record.json").exists()]
        if done and checkpoints:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(sweep_dir.rglob("record.json")))
    interrupted = [p for p in sweep_dir.rglob("checkpoint.pt") if not (p.parent / "record.json").exists()]
    assert 1 <= finished < 3
    # whatever carries a final name is whole: every record parses, every checkpoint loads
    statuses(sweep_dir)
    for checkpoint in sweep_dir.rglob("checkpoint.pt"):
        torch.load(checkpoint, weights_only=True)
    rerun = subprocess.run(args, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(sweep_dir.rglob("*.tmp")), "temporary files of the killed write are cleaned up"
    assert skipped(rerun) == finished
    assert ("resuming" in rerun.stdout) == bool(interrupted)
    assert sorted(statuses(sweep_dir).values()) == ["ok", "ok", "ok"]


def test_submitit_local_launcher_runs_jobs(tmp_path):
    proc = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=0,1",
                 "sweep.name=sl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(statuses(tmp_path / "results/sweeps/sl").values()) == ["ok", "ok"]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results/sweeps/sl").rglob("record.json")]
    assert {r["experiment"] for r in records} == {None}  # no experiment= given


def test_optuna_sweeper_searches_the_learning_rate(tmp_path):
    proc = sweep(tmp_path, "experiment=lr_search", "hydra.sweeper.n_trials=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Best parameters" in proc.stdout + proc.stderr
    assert len(statuses(tmp_path / "results/sweeps/lr_search")) == 2
    records = [json.loads(p.read_text()) for p in (tmp_path / "results/sweeps/lr_search").rglob("record.json")]
    assert {r["experiment"] for r in records} == {"lr_search"}  # Hydra's experiment= choice


def test_sweep_progress_counts_the_jobs_of_the_sweep_across_processes(tmp_path, caplog):
    """Under joblib, jobs end in worker processes, each with its own callback object: the count
    comes from the sweep folder, so each says how many of the whole sweep are done."""
    import logging

    from omegaconf import OmegaConf

    from harness.sweep import PROGRESS_DIR, SweepProgress

    def config(num: int):
        return OmegaConf.create({"hydra": {
            "mode": "RunMode.MULTIRUN", "sweep": {"dir": str(tmp_path)}, "job": {"num": num},
            "overrides": {"task": [f"seed={num}"]}, "sweeper": {"params": None}}})

    parent = SweepProgress()
    start = OmegaConf.create({"hydra": {"mode": "RunMode.MULTIRUN", "sweep": {"dir": str(tmp_path)},
                                        "overrides": {"task": ["seed=0,1,2"]}, "sweeper": {}}})
    parent.on_multirun_start(start)
    workers = [SweepProgress(), SweepProgress()]  # two processes: nothing shared in memory
    with caplog.at_level(logging.INFO, logger="harness.sweep"):
        workers[0].on_job_end(config(1), None)
        workers[1].on_job_end(config(0), None)
        workers[0].on_job_end(config(2), None)
    assert [b.bar.n for b in workers] == [3, 2] and workers[0].bar.total == 3
    assert "sweep: 3/3 jobs done" in caplog.text
    parent.on_multirun_end(start)
    assert not (tmp_path / PROGRESS_DIR).exists()
