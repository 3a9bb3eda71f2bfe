"""End to end: this checkout's `arena-train` (``python -m harness.train``) in a subprocess writes
real records, is deterministic, resumes after a kill -9, skips finished work, records failures,
and logs to the console and to the run's ``train.log``.

A subprocess costs a few seconds of imports before it trains, so these tests share runs where
they can: one reference run of the small MQAR serves the learning, determinism and resume checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, cli_env

from harness.records import validate_record

# MQAR small enough to learn in a few seconds on a CPU: 4 pairs, values from 16 ids.
TINY_MQAR = ["task=mqar", "model=transformer", "trainer=smoke", "task.vocab_size=32", "task.seq_len=32",
             "task.n_pairs=4", "task.n_train=4000", "task.n_val=256", "task.n_test=256",
             "trainer.steps=200", "trainer.lr=3e-3", "trainer.eval_every=50", "trainer.eval_batches=null",
             "trainer.checkpoint_every=10", "trainer.threads=1"]
SHORT = ["trainer.steps=20", "trainer.eval_every=10"]
CHANCE = 1 / 16
LOG_FILE = "train.log"  # Hydra's job log: <output dir>/<job name>.log


def train(cwd: Path, run_dir: Path, *extra: str, check: bool = True, logger: str = "none",
          base: list[str] = TINY_MQAR):
    """One ``arena-train`` run of ``base`` plus ``extra`` into ``run_dir``, data cached in ``cwd``."""
    proc = subprocess.run(cli("harness.train", *base, f"logger={logger}", f"hydra.run.dir={run_dir}", *extra),
                          cwd=cwd, env=cli_env(SEQ_ARENA_CACHE=str(cwd / "cache")), capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"arena-train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def record_of(run_dir: Path) -> dict:
    record = json.loads((run_dir / "record.json").read_text())
    assert validate_record(record) == []
    return record


def eval_steps(run_dir: Path) -> list[int]:
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [line["step"] for line in lines if line["split"] == "val"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run of TINY_MQAR: its folder and its process."""
    root = tmp_path_factory.mktemp("reference")
    return root / "run", train(root, root / "run")


@pytest.mark.slow
def test_smoke_run_learns_and_logs_to_console_and_file(reference):
    run_dir, proc = reference
    rec = record_of(run_dir)
    assert rec["status"] == "ok" and rec["model"] == "transformer" and rec["task"] == "mqar"
    assert rec["metrics"]["val_accuracy"] > 2.5 * CHANCE, rec["metrics"]
    assert rec["metrics"]["steps"] == 200
    assert rec["speed"]["step_ms_median"] > 0 and rec["memory"]["peak_bytes"] > 0
    assert rec["memory"]["peak_raw_bytes"] == rec["memory"]["floor_bytes"] + rec["memory"]["peak_bytes"]
    # the measurement environment arena-bench's workers have too (harness/runtime.py)
    assert rec["env"]["allocator"]["setting"] == "tuned" and rec["env"]["threads"] == 1
    assert rec["env"]["affinity"]
    assert eval_steps(run_dir) == [50, 100, 150, 200]
    # trainer=smoke has no progress bar: each evaluation is a line, then the outcome and the record
    assert "step 50/200" in proc.stdout and "status=ok" in proc.stdout
    assert f"record: {run_dir / 'record.json'}" in proc.stdout
    assert "ERROR" not in proc.stderr and "WARNING [harness" not in proc.stderr
    log = (run_dir / LOG_FILE).read_text()
    assert "[harness.train][INFO]" in log and "status=ok" in log and "step 200/200" in log
    assert "parameters" in log, "the file holds the detail (DEBUG) the console leaves out"


@pytest.mark.slow
def test_kill_minus_9_then_rerun_resumes_to_the_same_result(reference, tmp_path):
    # a second process computing the same numbers as the reference: determinism, and exact resume
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(cli("harness.train", *TINY_MQAR, "logger=none", f"hydra.run.dir={run_dir}"),
                            cwd=tmp_path, env=cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = run_dir / "metrics.jsonl"  # kill after the first evaluation (train lines come earlier)
    while time.time() < deadline and not (metrics.exists() and '"split": "val"' in metrics.read_text()):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "record.json").exists()
    out = train(tmp_path, run_dir)
    assert f"resuming {run_dir} from step" in out.stdout
    assert record_of(run_dir)["metrics"] == record_of(reference[0])["metrics"]
    assert eval_steps(run_dir) == [50, 100, 150, 200], "no evaluation lost or repeated"


@pytest.mark.slow
def test_rerun_is_skipped_and_force_reruns_from_scratch(tmp_path):
    run_dir = tmp_path / "run"
    train(tmp_path, run_dir, *SHORT)
    first = record_of(run_dir)
    skipped = train(tmp_path, run_dir, *SHORT)
    assert f"skip {run_dir}" in skipped.stdout
    assert record_of(run_dir)["run_id"] == first["run_id"]
    forced = train(tmp_path, run_dir, *SHORT, "force=true")
    assert f"resuming {run_dir}" not in forced.stdout and f"skip {run_dir}" not in forced.stdout
    again = record_of(run_dir)
    assert again["run_id"] != first["run_id"] and again["speed"]["steps_timed"] > 0
    assert again["metrics"] == first["metrics"], "a forced rerun of the same config is deterministic"


@pytest.mark.slow
def test_failed_run_shows_its_whole_message_and_logs_the_traceback(tmp_path):
    run_dir = tmp_path / "bad"
    missing_data = ["task=text", "task.data_dir=/nonexistent", "trainer=smoke"]
    out = train(tmp_path, run_dir, base=missing_data, check=False)
    assert out.returncode != 0
    rec = record_of(run_dir)
    assert rec["status"] == "error"
    assert "/nonexistent/train/pos" in rec["error"] and "Traceback" in rec["error"]
    # every line of the message on the console (stderr: it is an error), the traceback not
    console = out.stdout + out.stderr
    message = rec["error"].split("\nTraceback (most recent call last):")[0]
    assert len(message.splitlines()) > 3, message
    for line in message.splitlines():
        assert line.strip() in out.stderr, line
    assert "/nonexistent/test/neg" in out.stderr and "task.data_dir=<that folder>" in out.stderr
    assert "Traceback" not in console and 'File "' not in console
    assert "status=error" in out.stdout and "record:" in out.stdout
    # the run's log file has both: the message, then the traceback
    log = (run_dir / LOG_FILE).read_text()
    assert "[harness.train][ERROR]" in log and "/nonexistent/test/neg" in log
    assert "Traceback (most recent call last)" in log and "FileNotFoundError" in log


@pytest.mark.slow
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
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120,
                   env=cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache")))


@pytest.mark.slow
def test_a_config_that_does_not_resolve_still_gets_an_error_record(tmp_path):
    run_dir = tmp_path / "unresolved"
    out = train(tmp_path, run_dir, "+model.extra=${no_such_resolver:1}", check=False)
    assert out.returncode != 0
    rec = record_of(run_dir)
    assert rec["status"] == "error" and "could not be resolved" in rec["error"]
    assert rec["model"] == "transformer" and rec["task"] == "mqar"
    assert "could not be resolved" in out.stderr and "Traceback" not in out.stderr


def test_run_folder_names_are_safe():
    from harness.config import run_dirname

    assert run_dirname("") == "defaults"
    assert "/" not in run_dirname("task.data_dir=/data/lra,seed=1")
    long = ",".join(f"key{i}=value{i}" for i in range(60))
    name = run_dirname(long)
    assert len(name.encode()) <= 200 and name != run_dirname(long + ",x=1")
