"""Nothing lost, nothing stale, nothing hangs, end to end: this checkout's `arena-train` and
`arena-bench` in subprocesses, against a second writer, a corrupt checkpoint, a full disk (a small
tmpfs), a network that never answers, bad config values in a sweep, and a killed parent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import cli, cli_env

from harness.records import validate_record

pytestmark = pytest.mark.slow  # every test here launches arena-train or arena-bench
TINY = ["model=transformer", "task=mqar", "trainer=smoke", "trainer.threads=1", "task.vocab_size=32",
        "task.seq_len=32", "task.n_train=200", "task.n_val=32", "task.n_test=32"]


def train(cwd: Path, *args: str, timeout: float = 300, env: dict | None = None, logger: str = "none"):
    return subprocess.run(cli("harness.train", *TINY, f"logger={logger}", *args), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env or cli_env(SEQ_ARENA_CACHE=str(cwd / "cache")))


def record_of(run_dir: Path) -> dict:
    record = json.loads((run_dir / "record.json").read_text())
    assert validate_record(record) == []
    return record


def test_two_processes_on_one_run_folder_one_trains_the_other_leaves_it_alone(tmp_path):
    run_dir = tmp_path / "run"
    args = [*cli("harness.train", *TINY, "logger=none", f"hydra.run.dir={run_dir}", "trainer.steps=300",
                 "trainer.eval_every=100")]
    env = cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache"))
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode != 0
    assert f"{run_dir} is in use by pid {first.pid}" in second.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "val"] == [100, 200, 300], "one writer's, once each"
    train_steps = [line["step"] for line in lines if line["split"] == "train"]
    assert train_steps == sorted(set(train_steps)), "no train line twice"
    assert record_of(run_dir)["status"] == "ok"


def test_a_corrupt_checkpoint_is_set_aside_and_the_run_starts_again(tmp_path):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", "trainer.steps=20", "trainer.eval_every=10"]
    reference = tmp_path / "reference"
    train(tmp_path, f"hydra.run.dir={reference}", *args[1:])
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")  # a torn or foreign file
    proc = train(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert f"{run_dir / 'checkpoint.pt'} cannot be resumed from" in proc.stderr
    assert list(run_dir.glob("checkpoint.pt.corrupt-*"))
    assert record_of(run_dir)["metrics"] == record_of(reference)["metrics"], "as if it had never been cut"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_and_still_gets_an_error_record(tmp_path, small_disk):
    run_dir = small_disk / "run"
    # a 2 MB checkpoint cannot fit on a 1 MB disk; the config and the record can
    proc = train(tmp_path, f"hydra.run.dir={run_dir}", "trainer.steps=10", "trainer.eval_every=5")
    assert proc.returncode != 0
    assert f"no space left on the device holding {run_dir}" in proc.stderr
    assert "checkpoint.pt" in proc.stderr
    record = record_of(run_dir)
    assert record["status"] == "error" and "no space left" in record["error"]
    assert not (run_dir / "checkpoint.pt").exists() and not list(run_dir.glob(".*.tmp")), "no torn file"


def test_bad_values_in_a_sweep_get_error_records_naming_the_key_and_the_sweep_goes_on(tmp_path):
    proc = subprocess.run(cli("harness.train", "-m", *TINY, "logger=none", "trainer.batch_size=0,16",
                              "sweep.name=bad"), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr
    records = {r["config"]["trainer"]["batch_size"]: r for r in
               (json.loads(p.read_text()) for p in (tmp_path / "results/sweeps/bad").rglob("record.json"))}
    assert records[16]["status"] == "ok"
    assert records[0]["status"] == "error"
    assert "trainer.batch_size=0: Input should be greater than 0" in records[0]["error"]
    assert "trainer.batch_size=0" in proc.stderr


def test_a_missing_device_is_an_error_record_naming_the_key(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    run_dir = tmp_path / "run"
    proc = train(tmp_path, f"hydra.run.dir={run_dir}", "trainer.device=cuda")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "trainer.device='cuda' but CUDA is not available" in proc.stderr
    assert record_of(run_dir)["status"] == "error"


# --------------------------------------------------------------------------- the network

AUDIT = '''
import socket, sys
LOOPBACK = ("127.", "::1", "localhost", "0.0.0.0")
def audit(what, target):
    if isinstance(target, tuple) and target and not str(target[0]).startswith(LOOPBACK):
        with open({log!r}, "a") as f:
            f.write(f"{{what}} {{target}}\\n")
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        audit("connect", address)
    return _connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    audit("getaddrinfo", (host,))
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
'''


def test_offline_wandb_makes_no_network_attempt(tmp_path):
    """Python's sockets are audited in the run's process; the whole process tree's connect()
    calls (wandb's service is a separate binary) are traced with strace where it is installed."""
    audit_dir, attempts = tmp_path / "audit", tmp_path / "attempts.txt"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(AUDIT.format(log=str(attempts)))
    env = cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache"))
    env.pop("WANDB_MODE", None)  # the harness's own settings, not the test suite's, must keep it offline
    env["PYTHONPATH"] = os.pathsep.join([str(audit_dir), env["PYTHONPATH"]])
    run_dir = tmp_path / "run"
    command = cli("harness.train", *TINY, "logger=wandb", f"hydra.run.dir={run_dir}", "trainer.steps=4",
                  "trainer.eval_every=2")
    trace = tmp_path / "strace.txt"
    if shutil.which("strace"):
        command = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *command]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert record_of(run_dir)["status"] == "ok" and list((run_dir / "wandb").glob("offline-run-*"))
    assert not attempts.exists(), f"network attempts from Python:\n{attempts.read_text()}"
    if trace.exists():
        outside = [line for line in trace.read_text().splitlines()
                   if ("AF_INET" in line) and "127.0.0.1" not in line and "::1" not in line]
        assert not outside, "connect() outside loopback:\n" + "\n".join(outside)


class BlackHole:
    """A loopback server that accepts connections and never answers (a network dropping packets)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self):
        self.server.close()
        for connection in self.held:
            connection.close()


def test_online_wandb_that_cannot_be_reached_falls_back_to_offline_in_bounded_time(tmp_path):
    hole = BlackHole()
    env = cli_env(SEQ_ARENA_CACHE=str(tmp_path / "cache"), WANDB_MODE="online",
                  WANDB_BASE_URL=f"http://127.0.0.1:{hole.port}", WANDB_API_KEY="a" * 40)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    try:
        proc = train(tmp_path, f"hydra.run.dir={run_dir}", "logger.mode=online", "logger.timeout_s=3",
                     "trainer.steps=4", "trainer.eval_every=2", env=env, logger="wandb", timeout=240)
    finally:
        hole.close()
    assert proc.returncode == 0, proc.stderr
    assert "W&B could not be reached within logger.timeout_s=3" in proc.stderr
    assert record_of(run_dir)["status"] == "ok"
    assert list((run_dir / "wandb").glob("offline-run-*")), "the run is kept offline for `wandb sync`"
    assert time.monotonic() - started < 120


# --------------------------------------------------------------------------- arena-bench


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_killing_arena_bench_kills_its_measurement_process_and_removes_its_job_folder(tmp_path):
    tag = uuid.uuid4().hex[:8]
    env = cli_env(TMPDIR=str(tmp_path / f"tmp-{tag}"))
    Path(env["TMPDIR"]).mkdir()
    bench = subprocess.Popen(cli("harness.bench", "model=transformer", "task.seq_len=64", "trainer.batch_size=2",
                                 "bench.min_time_s=120", "bench.max_repeats=100000", "bench.min_repeats=100000",
                                 "trainer.threads=1"),
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while not workers and time.time() < deadline:
        time.sleep(0.5)
        workers = children_of(bench.pid)
    assert workers, "the measurement process started"
    time.sleep(3)
    bench.send_signal(signal.SIGKILL)
    bench.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text()
              for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and "zombie" not in Path(f"/proc/{w}/status").read_text()]
    assert not alive, "the measurement process outlived arena-bench"
    assert not list(Path(env["TMPDIR"]).glob("arena-bench-*")), "its job folder is removed"
