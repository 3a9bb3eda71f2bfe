"""End to end: `arena-train` in a subprocess writes real records, is deterministic, resumes
after a kill -9, skips finished work and records failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.records import validate_record

ARENA_TRAIN = str(Path(sys.executable).parent / "arena-train")
# MQAR small enough to learn in a few seconds on a CPU: 4 pairs, values from 16 ids.
TINY_MQAR = ["task=mqar", "model=transformer", "trainer=smoke", "task.vocab_size=32", "task.seq_len=32",
             "task.n_pairs=4", "task.n_train=4000", "task.n_val=256", "task.n_test=256",
             "trainer.steps=200", "trainer.lr=3e-3", "trainer.eval_every=50", "trainer.eval_batches=null",
             "trainer.checkpoint_every=10", "trainer.threads=1"]
CHANCE = 1 / 16


def train(tmp_path: Path, run_dir: Path, *extra: str, check: bool = True, logger: str = "none"):
    proc = subprocess.run([ARENA_TRAIN, *TINY_MQAR, f"logger={logger}", f"hydra.run.dir={run_dir}", *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"arena-train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def record_of(run_dir: Path) -> dict:
    record = json.loads((run_dir / "record.json").read_text())
    assert validate_record(record) == []
    return record


def test_smoke_run_learns_and_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    out = train(tmp_path, first)
    assert "record:" in out.stdout
    rec = record_of(first)
    assert rec["status"] == "ok" and rec["model"] == "transformer" and rec["task"] == "mqar"
    assert rec["metrics"]["val_accuracy"] > 2.5 * CHANCE, rec["metrics"]
    assert rec["metrics"]["steps"] == 200
    assert rec["speed"]["step_ms_median"] > 0 and rec["memory"]["peak_bytes"] > 0
    lines = [json.loads(l) for l in (first / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [50, 100, 150, 200]
    train(tmp_path, second)
    assert record_of(second)["metrics"] == rec["metrics"]


def test_rerun_with_ok_record_is_skipped(tmp_path):
    run_dir = tmp_path / "run"
    train(tmp_path, run_dir, "trainer.steps=20", "trainer.eval_every=10")
    before = record_of(run_dir)
    out = train(tmp_path, run_dir, "trainer.steps=20", "trainer.eval_every=10")
    assert "skip" in out.stdout
    assert record_of(run_dir)["run_id"] == before["run_id"]


def test_kill_minus_9_then_rerun_resumes_to_the_same_result(tmp_path):
    reference = tmp_path / "reference"
    train(tmp_path, reference)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([ARENA_TRAIN, *TINY_MQAR, "logger=none", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "record.json").exists()
    out = train(tmp_path, run_dir)
    assert "resuming" in out.stdout
    resumed = record_of(run_dir)
    assert resumed["metrics"] == record_of(reference)["metrics"]
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [50, 100, 150, 200], "no evaluation lost or repeated"


def test_failed_run_writes_error_record_and_exits_nonzero(tmp_path):
    run_dir = tmp_path / "bad"
    out = train(tmp_path, run_dir, "model.mixer.n_heads=3", check=False)
    assert out.returncode != 0
    rec = record_of(run_dir)
    assert rec["status"] == "error"
    assert "n_heads" in rec["error"] and "Traceback" in rec["error"]


def test_wandb_offline_run_is_written_inside_the_run_dir(tmp_path):
    run_dir = tmp_path / "wb"
    train(tmp_path, run_dir, "trainer.steps=20", "trainer.eval_every=10", logger="wandb")
    record = record_of(run_dir)
    assert record["status"] == "ok"
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline W&B files in the run dir"
    # the offline run file reads back as the same record (what a report from W&B would see)
    from harness.wandb_runs import records_from_offline_dirs

    (from_wandb,) = records_from_offline_dirs(run_dir)
    for key in ("status", "model", "task", "seed", "seq_len", "batch_size", "config_hash", "params",
                "metrics", "speed", "memory"):
        assert from_wandb[key] == record[key], key
    assert from_wandb["config"]["trainer"]["lr"] == record["config"]["trainer"]["lr"]
    # ... and into the same DataFrame columns the report reads from record.json files
    from harness.results import load_runs, load_wandb_runs

    local, remote = load_runs(run_dir), load_wandb_runs(offline_dirs=(run_dir,))
    for column in ("model", "task", "status", "seed", "seq_len", "metric", "val_metric", "test_metric",
                   "metrics.test_accuracy", "speed.step_ms_median", "memory.peak_bytes",
                   "config.trainer.lr", "setting"):
        assert remote[column].tolist() == local[column].tolist(), column


def test_logger_none_never_imports_wandb(tmp_path):
    code = (
        "import sys; from pathlib import Path\n"
        "from harness.api import compose_config\n"
        "from harness.train import run_experiment\n"
        f"cfg = compose_config({TINY_MQAR!r} + ['logger=none', 'trainer.steps=5', 'trainer.eval_every=5'])\n"
        f"rec = run_experiment(cfg, Path({str(tmp_path / 'run')!r}))\n"
        "assert rec['status'] == 'ok', rec['error']\n"
        "assert 'wandb' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)


def test_a_config_that_does_not_resolve_still_gets_an_error_record(tmp_path):
    run_dir = tmp_path / "unresolved"
    out = train(tmp_path, run_dir, "+model.extra=${no_such_resolver:1}", check=False)
    assert out.returncode != 0
    rec = record_of(run_dir)
    assert rec["status"] == "error" and "could not be resolved" in rec["error"]
    assert rec["model"] == "transformer" and rec["task"] == "mqar"


def test_force_reruns_from_scratch(tmp_path):
    run_dir = tmp_path / "forced"
    train(tmp_path, run_dir, "trainer.steps=20", "trainer.eval_every=10")
    first = record_of(run_dir)
    out = train(tmp_path, run_dir, "trainer.steps=20", "trainer.eval_every=10", "force=true")
    assert "resuming" not in out.stdout and "skip" not in out.stdout
    again = record_of(run_dir)
    assert again["run_id"] != first["run_id"] and again["speed"]["steps_timed"] > 0
    assert again["metrics"] == first["metrics"], "a forced rerun of the same config is deterministic"


def test_run_folder_names_are_safe():
    from harness.config import run_dirname

    assert run_dirname("") == "defaults"
    assert "/" not in run_dirname("task.data_dir=/data/lra,seed=1")
    long = ",".join(f"key{i}=value{i}" for i in range(60))
    name = run_dirname(long)
    assert len(name.encode()) <= 200 and name != run_dirname(long + ",x=1")
