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
import logging
import os
import platform
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch

from tasks.base import atomic_write, set_aside

log = logging.getLogger(__name__)

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
# Added to schema 1 later, optional (records written before lack them; readers default to None):
# ``experiment``, the ``experiment=`` choice the run was launched with (the study whose claims
# it can decide; harness.results.in_experiments), None without one.
OPTIONAL_FIELDS = ("experiment",)


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


def experiment_name() -> str | None:
    """The ``experiment=`` choice of the Hydra job this process runs, None outside Hydra or
    without one (it is not part of the composed config, only of Hydra's runtime choices)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        choice = HydraConfig.get().runtime.choices.get("experiment")
    except Exception:  # noqa: BLE001 - a record never fails for want of this field
        return None
    return choice if isinstance(choice, str) and choice not in ("null", "None") else None


def new_record(*, kind: str, config_hash: str | None, model: str | None, task: str | None,
               seed: int | None, seq_len: int | None, batch_size: int | None, env: dict,
               config: dict, run_id: str | None = None, **extra: Any) -> dict:
    """A schema-1 record with every field present: status ``error`` until the run says otherwise.

    ``extra`` adds fields beyond the schema's (e.g. a bench record's ``dtype``); ``experiment``
    (:func:`experiment_name`) is filled from the Hydra job unless ``extra`` gives it.
    """
    extra.setdefault("experiment", experiment_name())
    return {
        "schema": SCHEMA, "kind": kind,
        "run_id": run_id or (f"{config_hash}-{new_run_id()}" if config_hash else new_run_id()),
        "config_hash": config_hash, "status": "error", "error": None, "model": model, "task": task,
        "seed": seed, "seq_len": seq_len, "batch_size": batch_size, "params": None, "metrics": {},
        "speed": {}, "memory": {}, "env": env, "started_at": now_iso(), "ended_at": None,
        "wall_s": None, "config": config, **extra,
    }


def unusable_config_record(cfg, *, kind: str, chash: str | None) -> dict:
    """The record of a job whose config cannot be used (it does not resolve, or a value is out of
    range): status error, the fields that are usable, the config resolved where it resolves."""
    from omegaconf import OmegaConf

    def select(key: str):
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)

    def integer(value):
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def text(value):
        return value if isinstance(value, str) else None

    try:
        config = OmegaConf.to_container(cfg, resolve=chash is not None)
    except Exception:  # noqa: BLE001 - keep the config as written
        config = OmegaConf.to_container(cfg, resolve=False)
    return new_record(
        kind=kind, config_hash=chash, model=text(select("model.name")), task=text(select("task.name")),
        seed=integer(select("seed")), seq_len=integer(select("task.seq_len")),
        batch_size=integer(select("trainer.batch_size")), env=environment(torch.device("cpu")),
        config=config,
    )


def write_record(run_dir: str | Path, record: dict) -> Path:
    """Validate and atomically write ``record.json`` into ``run_dir``."""
    problems = validate_record(record)
    if problems:
        raise ValueError(f"refusing to write an invalid record: {'; '.join(problems)}")
    path = Path(run_dir) / RECORD_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_record(run_dir: str | Path) -> dict | None:
    """The record in ``run_dir``, or None when there is none.

    A file that is not a valid schema-1 record (unparseable, not an object, wrong types, a
    missing field) is moved aside as ``record.json.corrupt-<time>`` with a warning naming it and
    what is wrong, and None is returned: the job then runs as if it had never run.
    """
    path = Path(run_dir) / RECORD_FILE
    if not path.exists():
        return None
    record, problem = parse_record(path)
    if problem is None:
        return record
    aside = set_aside(path)
    log.warning("%s: %s; moved to %s, the job runs again", path, problem, aside.name)
    return None


def parse_record(path: Path) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a valid record file, else ``(None, what is wrong with it)``."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not a readable JSON record ({type(e).__name__}: {e})"
    problems = validate_record(record)
    if problems:
        return None, f"not a valid record ({'; '.join(problems[:5])})"
    return record, None


Number = float | int


class RecordSchema(pydantic.BaseModel):
    """``record.json``, schema 1: every field present, with these types (extra fields allowed)."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)

    schema_: Literal[1] = pydantic.Field(alias="schema")
    kind: Literal["train", "bench"]
    run_id: str
    config_hash: str | None
    status: Literal[STATUSES]  # a tuple subscript is the same as listing the values
    error: str | None
    model: str | None
    task: str | None
    seed: int | None
    seq_len: int | None
    batch_size: int | None
    params: int | None
    metrics: dict[str, Number | None]
    speed: dict[str, Number | None]
    memory: dict[str, Number | str | None]
    env: dict[str, Any]
    started_at: str
    ended_at: str | None
    wall_s: Number | None
    config: dict[str, Any]
    experiment: str | None = None  # optional: OPTIONAL_FIELDS


def validate_record(record) -> list[str]:
    """Problems with a record against schema 1 (an empty list means valid)."""
    if not isinstance(record, dict):
        return [f"a record is a JSON object, found {type(record).__name__}"]
    try:
        RecordSchema.model_validate(record)
    except pydantic.ValidationError as e:
        return [f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}"
                .replace("schema_", "schema") for err in e.errors()]
    if record["status"] == "ok" and record["error"] is not None:
        return ["an ok record must have error null"]
    return []
