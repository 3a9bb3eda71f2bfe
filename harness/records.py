"""Run records: the files of a run folder, the schema of ``record.json``, building and writing
records, config hashing, the device a run uses and how a failure maps to a status.

Every run (train or bench) ends with exactly one ``record.json``, whatever the outcome. It is
written to a temporary file in the same directory and renamed, so a reader (or a ``kill -9``)
never sees half a record. ``arena-train`` and ``arena-bench`` build their records with
:func:`new_record`, so both kinds carry the same fields.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import torch

from tasks.base import atomic_write

SCHEMA = 1
STATUSES = ("ok", "oom", "diverged", "error", "timeout", "unsupported")
FAILED = ("oom", "diverged", "error", "timeout")
# The files of a run folder.
RECORD_FILE = "record.json"
METRICS_FILE = "metrics.jsonl"      # JSON lines: split "val" per evaluation, "train" every trainer.log_every steps
CHECKPOINT_FILE = "checkpoint.pt"   # the latest state, for resuming (train runs)
CONFIG_FILE = "config.yaml"         # the resolved config the run started with

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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see tasks.base.atomic_write), flushed to disk."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically: a killed save leaves the previous file intact."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def pick_device(name: str, *, key: str) -> torch.device:
    """The device a run uses: ``auto`` is CUDA when present, else the CPU; anything else as given.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        key: the config key ``name`` came from, named in the error.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name!r} but CUDA is not available here; use {key}=cpu or auto")
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the allocator running out of memory (CUDA, or the CPU's)."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def new_record(*, kind: str, config_hash: str | None, model: str | None, task: str | None,
               seed: int | None, seq_len: int | None, batch_size: int | None, env: dict,
               config: dict, run_id: str | None = None, **extra: Any) -> dict:
    """A schema-1 record with every field present: status ``error`` until the run says otherwise.

    ``extra`` adds fields beyond the schema's (e.g. a bench record's ``dtype``).
    """
    return {
        "schema": SCHEMA, "kind": kind,
        "run_id": run_id or (f"{config_hash}-{new_run_id()}" if config_hash else new_run_id()),
        "config_hash": config_hash, "status": "error", "error": None, "model": model, "task": task,
        "seed": seed, "seq_len": seq_len, "batch_size": batch_size, "params": None, "metrics": {},
        "speed": {}, "memory": {}, "env": env, "started_at": now_iso(), "ended_at": None,
        "wall_s": None, "config": config, **extra,
    }


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
