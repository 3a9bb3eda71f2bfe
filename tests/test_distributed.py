"""One run on several processes (DDP over gloo on this CPU): the same numbers as one process with
the same global batch, one writer, resumable after a rank is killed, started by torchrun, by
``trainer.devices`` and by the submitit launcher; arena-bench refuses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_env

from harness.api import compose_config
from harness.bench import refuse_several_processes
from harness.records import validate_record

TINY = ["model=transformer", "task=mqar", "trainer=smoke", "trainer.threads=1", "task.vocab_size=32",
        "task.seq_len=32", "task.n_train=200", "task.n_val=32", "task.n_test=32", "logger=none",
        "trainer.batch_size=16", "trainer.steps=40", "trainer.eval_every=10", "trainer.checkpoint_every=5"]
TOLERANCE = 1e-5  # fp32: the two ranks' gradients are averaged in another order than one batch's


def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache"))


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "harness.train", *args]


def losses(run_dir: Path, split: str = "val") -> list[tuple[int, float]]:
    """(step, loss) of the ``split`` lines of metrics.jsonl (train lines every trainer.log_every)."""
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(line["step"], line["loss"]) for line in lines if line["split"] == split]


def record_of(run_dir: Path) -> dict:
    record = json.loads((run_dir / "record.json").read_text())
    assert validate_record(record) == []
    return record


def assert_same_run(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        la, lb = losses(a, split), losses(b, split)
        assert la and [s for s, _ in la] == [s for s, _ in lb]
        assert max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) < TOLERANCE
    ma, mb = record_of(a)["metrics"], record_of(b)["metrics"]
    assert abs(ma["final_train_loss"] - mb["final_train_loss"]) < TOLERANCE
    assert abs(ma["test_loss"] - mb["test_loss"]) < TOLERANCE


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one")
    subprocess.run(cli("harness.train", *TINY, f"hydra.run.dir={root / 'run'}"), cwd=root, env=env(root),
                   check=True, capture_output=True, timeout=300)
    return root / "run"


@pytest.mark.slow
def test_trainer_devices_runs_two_gloo_processes_that_match_one_process(one_process, tmp_path):
    """``trainer.devices=2`` starts torchrun itself; the same numbers as one process with the
    same global batch, one record, no timing (the kill test below starts torchrun by hand)."""
    run_dir = tmp_path / "devices"
    proc = subprocess.run(cli("harness.train", *TINY, "trainer.devices=2", f"hydra.run.dir={run_dir}"), cwd=tmp_path,
                          env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(one_process, run_dir)
    record = record_of(run_dir)
    assert record["env"]["world_size"] == 2
    assert [r["rank"] for r in record["distributed"]["per_rank"]] == [0, 1]
    assert record["speed"]["step_ms_median"] is None, "no timing under DDP unless trainer.ddp_timing=true"
    assert len(list(tmp_path.rglob("record.json"))) == 1, "rank 0 alone writes"


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_leaves_no_torn_file_and_the_rerun_resumes(tmp_path):
    # 100 steps: the kill lands within a poll (50 ms) of the first checkpoint (step 5), 95 steps
    # (seconds) before the end
    run_dir = tmp_path / "killed"
    args = torchrun(*TINY, "trainer.steps=100", "trainer.eval_every=25", f"hydra.run.dir={run_dir}")
    launcher = subprocess.Popen(args, cwd=tmp_path, env=env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (run_dir / "checkpoint.pt").exists()
    ranks = [int(p) for p in subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True,
                                            text=True).stdout.split() if int(p) != launcher.pid]
    os.kill(max(ranks), signal.SIGKILL)  # the last-started process: a rank, not torchrun
    launcher.wait(timeout=120)
    assert not (run_dir / "record.json").exists(), "killed before the end: no record yet"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] % 5 == 0, "the checkpoint is whole"
    rerun = subprocess.run(args, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout + rerun.stderr
    assert not list(run_dir.glob(".*.tmp"))
    steps = [s for s, _ in losses(run_dir)]
    assert steps == [25, 50, 75, 100], "each evaluation once"
    assert record_of(run_dir)["status"] == "ok"


@pytest.mark.slow
def test_the_submitit_launcher_runs_one_job_as_two_tasks(tmp_path):
    proc = subprocess.run(cli("harness.train", "-m", *TINY, "hydra/launcher=submitit_local",
                              "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", "sweep.name=tasks"),
                          cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "results/sweeps/tasks").rglob("record.json")]
    assert record["status"] == "ok" and record["env"]["world_size"] == 2


def test_arena_bench_refuses_several_processes(monkeypatch):
    with pytest.raises(ValueError, match="arena-bench measures one process, not a world of 2"):
        refuse_several_processes(compose_config(["trainer.devices=2"], config_name="bench"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="without torchrun"):
        refuse_several_processes(compose_config([], config_name="bench"))
