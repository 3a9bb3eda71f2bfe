"""Who may write a run folder, and which run it holds.

A run folder belongs to one process at a time: :func:`claim` takes an OS lock on its ``.lock``
file for as long as the run writes there, so two processes launched on the same configuration
(or the same sweep started twice) never write beside each other; the second one is told which
process holds the folder and leaves it alone.

A folder also holds one configuration at a time. Its identity is the ``config_hash`` of the run
it holds (from ``record.json``, or from ``config.yaml`` while a run is unfinished); a run of
another configuration first moves those files into a hidden ``.superseded-<hash>-<time>/``
folder, with a message saying which keys changed, so that nothing is ever appended to another
run's files.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

from harness.config import result_config
from harness.records import (
    CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, RECORD_FILE, config_hash, read_record,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# What a run leaves in its folder (train.log is the job's log and stays: it is appended to)
RUN_FILES = (RECORD_FILE, METRICS_FILE, CHECKPOINT_FILE, CONFIG_FILE, "wandb")


class FolderBusy(RuntimeError):
    """Another live process holds the run folder."""


@contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process (an exclusive ``flock`` on ``run_dir/.lock``).

    Raises:
        FolderBusy: another process holds it; the message names the folder and that process.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderBusy(
            f"{run_dir} is in use by {holder}: this job leaves it alone. Rerun when that process "
            f"has finished (its finished run is then skipped)") from None
    try:
        handle.seek(0)
        handle.truncate()
        since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {since})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race a waiting claim)


def held_config_hash(run_dir: Path, record: dict | None) -> tuple[str | None, dict | None]:
    """The ``config_hash`` of the run ``run_dir`` holds and that run's resolved config: from its
    ``record``, or from ``config.yaml`` when it never finished; ``(None, None)`` when it holds none."""
    if record is not None:
        return record.get("config_hash"), record.get("config")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None, None
    try:
        config = OmegaConf.load(path)
        return config_hash(result_config(config)), OmegaConf.to_container(config)
    except Exception as exc:  # noqa: BLE001 - unreadable: treat it as another run's file
        log.warning("%s: unreadable (%s); the run it belonged to is set aside", path, exc)
        return "unreadable", None


def changed_keys(old: dict | None, new: dict, *, limit: int = 5) -> str:
    """The result-relevant keys whose values differ between two resolved configs, for a message."""
    if old is None:
        return "its config is unknown"

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    try:
        before = flat(result_config(OmegaConf.create(old)))
    except Exception:  # noqa: BLE001 - a config of an older layout
        before = flat({k: old.get(k) for k in new if isinstance(old.get(k), dict)})
    after = flat(new)
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    shown = [f"{k}: {json.dumps(before.get(k), default=str)} -> {json.dumps(after.get(k), default=str)}"
             for k in keys[:limit]]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(shown) + more if shown else "no key differs (an older hash)"


def set_aside_superseded(run_dir: Path, held: str, old_config: dict | None, new_config: dict) -> Path | None:
    """Move the run files of another configuration into ``run_dir/.superseded-<hash>-<time>/``."""
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = run_dir / f".superseded-{held}-{stamp}"
    aside.mkdir()
    for path in present:
        os.replace(path, aside / path.name)
    log.warning("%s held a run of another configuration (%s); its files were moved to %s and this "
                "run starts afresh", run_dir, changed_keys(old_config, new_config), aside.name)
    return aside


def make_room_for(run_dir: Path, chash: str, new_config: dict) -> dict | None:
    """Set aside whatever ``run_dir`` holds of a configuration other than ``chash``; returns the
    record of a run of ``chash`` the folder holds (read once here, for the caller's skip check)."""
    record = read_record(run_dir)
    held, old_config = held_config_hash(run_dir, record)
    if held is not None and held != chash:
        set_aside_superseded(run_dir, held, old_config, new_config)
        return None
    return record
