"""Timing and memory helpers shared by training runs and ``arena-bench``.

Rules (DESIGN.md, "Measurement rules"): a timed step is forward + backward + optimizer step;
the first steps are warm-up and not counted; CUDA work is synchronised before the clock is read;
the median and inter-quartile range are reported. Peak memory is CUDA's allocator peak, or on
CPU the process's own peak resident set (VmHWM, reset at the start of the region) above its
resident set then, the floor (PeakMemory).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time

import torch


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    """Refuse a ``trainer.precision`` that training and arena-bench cannot run."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(device: torch.device, precision: str):
    """The context a step runs in: bf16 autocast on ``device``, or nothing for fp32. The one
    place training, evaluation and arena-bench's measured step turn precision into torch."""
    check_precision(precision)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Collects wall times of steps after ``warmup`` steps, synchronising CUDA around each."""

    def __init__(self, device: torch.device, *, warmup: int = 5):
        self.device = device
        self.warmup = warmup
        self.seen = 0
        self.times_ms: list[float] = []
        self._t0: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """End the step; returns its wall time in ms (counted only after warm-up)."""
        synchronize(self.device)
        ms = (time.perf_counter() - self._t0) * 1e3
        self.seen += 1
        if self.seen > self.warmup:
            self.times_ms.append(ms)
        return ms

    def summary(self, tokens_per_step: int) -> dict[str, float | None]:
        return timing_summary(self.times_ms, tokens_per_step)


def timing_summary(times_ms: list[float], tokens_per_step: int) -> dict[str, float | None]:
    """Median and IQR of step times in ms, and tokens per second at the median."""
    if not times_ms:
        return {"step_ms_median": None, "step_ms_iqr": None, "tokens_per_s": None, "steps_timed": 0}
    median = statistics.median(times_ms)
    if len(times_ms) >= 4:
        q = statistics.quantiles(times_ms, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return {
        "step_ms_median": median,
        "step_ms_iqr": iqr,
        "tokens_per_s": tokens_per_step / (median / 1e3) if median > 0 else None,
        "steps_timed": len(times_ms),
    }


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux). On Linux it
    includes the peak of the parent at ``fork`` (it survives ``exec``): not a process's own."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM) to its resident set now, by writing 5 to
    ``/proc/self/clear_refs`` (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return high_water_rss_bytes() is not None


def proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (``VmHWM``, ``VmSize``, ...) in bytes, or None where
    /proc does not tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def high_water_rss_bytes() -> int | None:
    """This process's peak resident set since it started or since :func:`reset_peak_rss`
    (VmHWM), or None where /proc does not tell."""
    return proc_status_bytes("VmHWM")


class PeakMemory:
    """Peak memory of the region between ``start()`` and ``stop()``.

    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

    On CPU (``how = cpu_vmhwm_above_floor``): the floor is the resident set at ``start()``; the
    peak resident set (VmHWM) is reset to it then, so it is this process's own peak during the
    region, whatever the process (or its parent) held before. ``stop()`` gives ``peak_raw_bytes``
    (the whole process's peak resident set in the region, floor included), ``floor_bytes`` and
    ``peak_bytes`` = peak_raw_bytes - floor_bytes, the memory the region added: what scaling
    exponents are fitted on. Where VmHWM cannot be reset (not Linux), the peak is ``ru_maxrss``
    minus the floor (``how = cpu_peak_rss_minus_baseline``, as before issue 21): exact only in a
    fresh process whose parent held less, and said so (``_shared_process``) for a process that
    ran something bigger before (``isolated=False``).
    """

    def __init__(self, device: torch.device, *, isolated: bool = True):
        self.device = device
        self.isolated = isolated
        self.baseline = 0
        self.reset = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline = current_rss_bytes()
            self.reset = reset_peak_rss()

    def stop(self) -> dict[str, int | str]:
        if self.device.type == "cuda":
            return {"peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "how": "cuda_max_memory_allocated"}
        if self.reset:
            raw = max(high_water_rss_bytes(), self.baseline)
            return {"peak_bytes": raw - self.baseline, "peak_raw_bytes": raw,
                    "floor_bytes": self.baseline, "how": "cpu_vmhwm_above_floor"}
        how = "cpu_peak_rss_minus_baseline" + ("" if self.isolated else "_shared_process")
        raw = peak_rss_bytes()
        return {"peak_bytes": max(0, raw - self.baseline), "peak_raw_bytes": raw,
                "floor_bytes": self.baseline, "how": how}
