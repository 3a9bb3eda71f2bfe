"""The measurement environment of a process: its memory allocator, threads and CPU affinity.

Every training process and every arena-bench measurement process sets these up the same way, from
``trainer.allocator`` and ``trainer.threads``, and records them in ``env`` of its record
(:func:`runtime_env`), because they bend step times and fitted exponents (issue 21):

* ``tuned`` (the default): a fast allocator (tcmalloc, jemalloc) when one is preloaded
  (``LD_PRELOAD``) is used as it is; otherwise glibc's malloc with its two documented thresholds
  raised, ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (mallopt(3); the environment variables
  ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` are the same knobs read at start-up).
  By default glibc serves every block of 32 MiB or more with a fresh ``mmap`` and returns it with
  ``munmap`` on free, so a training step that makes such tensors faults and zeroes them again on
  every step (Performer at batch 4, L = 2048: about 280,000 page faults a step, kernel time as
  large as user time). With the thresholds at 1 GiB these blocks come from the heap and stay.
* ``default``: glibc's defaults, untouched (or the preloaded allocator, which a process cannot
  unload).

The thresholds are set in the running process with ``mallopt`` (effective for every later
allocation) and exported to the environment, so that the processes it starts (arena-bench's
measurement workers, torchrun's ranks) read them from their first allocation on.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

ALLOCATORS = ("tuned", "default")
# mallopt(3) parameter numbers (malloc.h) and the variables glibc reads for them at start-up
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_TUNED = {"MALLOC_MMAP_THRESHOLD_": 2**30, "MALLOC_TRIM_THRESHOLD_": 2**30}
FAST_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def check_allocator(setting: str, *, key: str = "trainer.allocator") -> None:
    """Refuse an allocator setting other than those in :data:`ALLOCATORS`."""
    if setting not in ALLOCATORS:
        raise ValueError(f"{key} must be one of {', '.join(ALLOCATORS)}, got {setting!r} "
                         f"(tuned: a preloaded tcmalloc/jemalloc, else glibc with raised mmap and "
                         f"trim thresholds; default: glibc as it comes)")


def preloaded_allocator() -> str | None:
    """The fast allocator mapped into this process (``LD_PRELOAD=libtcmalloc.so ...``), if any."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    return next((name for name in FAST_ALLOCATORS if f"lib{name}" in maps), None)


def configure_allocator(setting: str) -> dict:
    """Set this process's allocator up for ``setting`` (see the module docstring); returns what it
    is, for ``env.allocator``: name, setting, and glibc's thresholds where they were set."""
    check_allocator(setting)
    fast = preloaded_allocator()
    if fast is not None:
        return {"name": fast, "setting": setting, "how": "preloaded"}
    info: dict = {"name": "glibc", "setting": setting}
    if setting == "default" or not sys.platform.startswith("linux"):
        inherited = {name: os.environ.pop(name) for name in GLIBC_TUNED if name in os.environ}
        # thresholds a parent exported were read at this process's start (so recorded); the
        # processes it starts get glibc's defaults, as asked
        return {**info, "how": "glibc defaults", **({"inherited": inherited} if inherited else {})}
    libc = ctypes.CDLL("libc.so.6")
    applied = (libc.mallopt(M_MMAP_THRESHOLD, GLIBC_TUNED["MALLOC_MMAP_THRESHOLD_"])
               and libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TUNED["MALLOC_TRIM_THRESHOLD_"]))
    os.environ.update({name: str(value) for name, value in GLIBC_TUNED.items()})
    return {**info, "mmap_threshold": GLIBC_TUNED["MALLOC_MMAP_THRESHOLD_"],
            "trim_threshold": GLIBC_TUNED["MALLOC_TRIM_THRESHOLD_"],
            "how": "mallopt and environment" if applied else "environment only (mallopt refused)"}


def affinity() -> list[int] | None:
    """The CPUs this process may run on (``os.sched_getaffinity``), or None where unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def configure_process(*, allocator: str, threads: int | None) -> dict:
    """Allocator and intra-op threads of this process, set once at its start; returns
    :func:`runtime_env` for the record."""
    allocator_info = configure_allocator(allocator)
    if threads:
        torch.set_num_threads(threads)
    return runtime_env(allocator_info)


def runtime_env(allocator_info: dict | None = None) -> dict:
    """``env`` fields of the measurement environment: allocator, threads, affinity."""
    return {"allocator": allocator_info or {"name": "unknown"}, "threads": torch.get_num_threads(),
            "affinity": affinity()}


def worker_environment(setting: str) -> dict[str, str]:
    """The environment for a measurement process of ``setting``: this one's, with glibc's
    thresholds exported (tuned) or removed (default), so they hold from its first allocation."""
    check_allocator(setting)
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_TUNED}
    if setting == "tuned":
        env.update({name: str(value) for name, value in GLIBC_TUNED.items()})
    return env
