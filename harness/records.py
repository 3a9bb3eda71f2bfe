"""Run records: the schema of ``record.json``, config hashing, atomic writes, environment facts.

Every run (train or bench) ends with exactly one ``record.json``, whatever the outcome. It is
written to a temporary file in the same directory and renamed, so a reader (or a ``kill -9``)
never sees half a record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

SCHEMA = 1
STATUSES = ("ok", "oom", "diverged", "error", "timeout", "unsupported")
FAILED = ("oom", "diverged", "error", "timeout")
RECORD_FILE = "record.json"

# The fields every record carries (schema 1); more may be added, none removed or renamed.
RECORD_FIELDS = (
    "schema", "kind", "run_id", "config_hash", "status", "error", "model", "task", "seed",
    "seq_len", "batch_size", "params", "metrics", "speed", "memory", "env", "started_at",
    "ended_at", "wall_s", "config",
)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(result_config: dict) -> str:
    """A stable hash of the result-relevant config (see harness.config.result_config)."""
    blob = json.dumps(result_config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def git_commit() -> str | None:
    """The commit of the working tree the code runs from, or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo on Linux, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Facts about where a run ran: device, its name, versions, threads, commit, host."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_name()
    return {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
    }


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_record(run_dir: str | Path, record: dict) -> Path:
    """Validate and atomically write ``record.json`` into ``run_dir``."""
    problems = validate_record(record)
    if problems:
        raise ValueError(f"refusing to write an invalid record: {'; '.join(problems)}")
    path = Path(run_dir) / RECORD_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_record(run_dir: str | Path) -> dict | None:
    """The record in ``run_dir``, or None when there is none or it cannot be parsed."""
    path = Path(run_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def validate_record(record: dict) -> list[str]:
    """Problems with a record against schema 1 (an empty list means valid)."""
    problems = [f"missing field {name!r}" for name in RECORD_FIELDS if name not in record]
    if record.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA}, got {record.get('schema')!r}")
    if record.get("kind") not in ("train", "bench"):
        problems.append(f"kind must be 'train' or 'bench', got {record.get('kind')!r}")
    if record.get("status") not in STATUSES:
        problems.append(f"status must be one of {STATUSES}, got {record.get('status')!r}")
    for section in ("metrics", "speed", "memory", "env", "config"):
        if section in record and not isinstance(record[section], dict):
            problems.append(f"{section} must be an object")
    if record.get("status") == "ok" and record.get("error") is not None:
        problems.append("an ok record must have error null")
    return problems
