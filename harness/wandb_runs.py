"""W&B runs as run records, so a report can read W&B instead of local ``record.json`` files.

Two sources give the same record dicts (and so, through ``harness.results``, the same DataFrame
columns):

* ``records_from_wandb_api("entity/project", filters=...)``: W&B's public API (needs network and
  a login); each run's ``config`` is the resolved Hydra config and its ``summary`` holds the
  record's metrics, speed, memory and status (harness.train writes them at the end of a run).
* ``records_from_offline_dirs(path)``: the ``wandb/offline-run-*`` folders a run writes with
  ``logger.mode=offline`` (the default), read straight from their ``.wandb`` files; this is what
  the tests use, and what lets a user check a sweep before ``wandb sync``.

    arena-report --wandb entity/project --out report/     # public API
    arena-report --wandb-offline results/sweeps/mine      # offline run files
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# The .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records,
# each with a 7-byte header (crc32, length, type); a record may be split across blocks.
FILE_HEADER = 7
BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_log(path: str | Path) -> list[bytes]:
    """The serialized protobuf records of one ``run-*.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:4]!r})")
    records, pending, pos = [], b"", FILE_HEADER
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < RECORD_HEADER:
            pos += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == 0 and length == 0:
            continue  # zero padding written at the end of a block
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def offline_run(path: str | Path) -> dict:
    """Config, final summary, group, tags and job type of one offline run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(path).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{path}: no run-*.wandb file in this W&B run folder")
    run = {"config": {}, "summary": {}, "group": None, "tags": [], "job_type": None, "id": None}
    for raw in read_wandb_log(files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, group=r.run_group or None, tags=list(r.tags), job_type=r.job_type or None)
            _apply(run["config"], r.config.update)
        elif kind == "config":
            _apply(run["config"], record.config.update)
        elif kind == "summary":
            _apply(run["summary"], record.summary.update)
    run["config"] = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in run["config"].items()}
    return run


def _apply(target: dict, items) -> None:
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)


def record_from_run(config: dict, summary: dict, *, run_id: str, source: str) -> dict:
    """A schema-1 record dict from a W&B run's config and summary."""
    config = {k: v for k, v in config.items() if not k.startswith("_wandb")}  # W&B's own keys
    summary = {k: v for k, v in summary.items() if not k.startswith("_")}
    metrics = {k: v for k, v in summary.items() if k.startswith(("val_", "test_")) or k in
               ("best_step", "steps", "final_train_loss")}
    model, task = config.get("model", {}), config.get("task", {})
    return {
        "schema": 1, "kind": summary.get("kind", "train"), "run_id": run_id,
        "config_hash": summary.get("config_hash"), "status": summary.get("status", "unknown"),
        "error": None, "model": model.get("name"), "task": task.get("name"), "seed": config.get("seed"),
        "seq_len": task.get("seq_len"), "batch_size": config.get("trainer", {}).get("batch_size"),
        "params": summary.get("params"), "metrics": metrics,
        "speed": {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("speed/")},
        "memory": {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("memory/")},
        "env": {}, "started_at": None, "ended_at": None, "wall_s": summary.get("wall_s"),
        "config": config, "source": source,
    }


def records_from_offline_dirs(*paths: str | Path) -> list[dict]:
    """Records from every ``offline-run-*`` folder under ``paths``."""
    records = []
    for path in paths:
        for run_dir in sorted(Path(path).rglob("offline-run-*")):
            if run_dir.is_dir():
                run = offline_run(run_dir)
                records.append(record_from_run(run["config"], run["summary"], run_id=run["id"],
                                               source=str(run_dir)))
    return records


def records_from_wandb_api(path: str, filters: dict | None = None) -> list[dict]:
    """Records from W&B's public API for ``entity/project`` (network and login needed)."""
    import wandb

    runs = wandb.Api().runs(path, filters=filters or {})
    return [record_from_run(dict(run.config), dict(run.summary), run_id=run.id, source=run.url)
            for run in runs]
