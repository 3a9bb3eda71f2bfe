"""The measurement process of ``arena-bench``: one configuration, nothing else in the process.

Run as ``python -m harness.bench_worker IN.json OUT.json``. It reads the model config, the
task spec and the settings (harness.bench.bench_job: batch_size, lr, threads, precision,
untimed_steps, min_repeats, min_time_s, max_repeats, memory_limit_mb), measures training steps
on a random batch, and writes speed, memory and its environment (allocator, threads, affinity:
harness.runtime, set up first thing) to OUT.json.

With ``bench.paired_cycles`` the job is one model at several lengths (``{"paired": [job, ...],
"cycles": n, "steps": k}``): :func:`measure_paired` times them alternating, in this process.

Its peak memory is its own. On CPU: the floor is the resident set after the imports and a
model-independent runtime warm-up (:func:`warm_up_runtime`: a tiny training step that starts
the intra-op thread pool, the autograd engine, the optimizer and the kernels every model uses);
the peak resident set (VmHWM) is reset there, so what the parent held never counts
(harness.measure.PeakMemory). The record keeps the raw peak, the floor and the peak above it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from harness.measure import PeakMemory, StepTimer, autocast, proc_status_bytes, timing_summary
from harness.records import is_out_of_memory
from harness.runtime import configure_process

if TYPE_CHECKING:  # imported by prepare(), after the process is configured
    from harness.compile import StepCompiler


def limit_memory(limit_mb: int | None) -> None:
    """Cap the address space this process may add to what it holds after its imports, so that an
    oversized configuration fails cleanly. Relative to the imports, because a CUDA build of torch
    maps gigabytes of address space for its libraries before any tensor exists."""
    if limit_mb:
        limit = address_space_bytes() + int(limit_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def address_space_bytes() -> int:
    """This process's virtual size (VmSize), or 0 where /proc does not tell."""
    return proc_status_bytes("VmSize") or 0


def warm_up_runtime(device: torch.device, precision: str) -> None:
    """A few training steps of a tiny model, the same for every configuration: what the runtime
    allocates once per process (thread pool, autograd engine, kernels' code and buffers, AdamW's
    foreach path) is then part of the floor, not of a model's peak."""
    torch.manual_seed(0)
    vocab, width = 32, 16
    net = torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.LayerNorm(width),
                              torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                              torch.nn.Linear(4 * width, vocab)).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    tokens = torch.randint(vocab, (2, 8), device=device)  # (B, L)
    for _ in range(2):
        with autocast(device, precision):
            h = net[:2](tokens)  # (B, L, D)
            mix = torch.softmax(h @ h.transpose(1, 2), dim=-1) @ h  # (B, L, D), attention-like
            loss = torch.nn.functional.cross_entropy(net[2:](mix).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    del net, optimizer, tokens, h, mix, loss
    gc.collect()


def prepare(job: dict, device: torch.device) -> tuple[torch.nn.Module, StepCompiler, Callable[[], None], dict]:
    """The job's model, its step compiler, one training step (forward + backward + optimizer step
    on a random batch, as training runs it) and the batch; raises UnsupportedTask for a model
    that cannot run the task."""
    from harness.compile import StepCompiler, set_activation_checkpointing
    from harness.config import instantiate_without_name
    from harness.objectives import auxiliary_loss, loss_and_counts
    from tasks.base import TaskSpec, random_batch

    spec = TaskSpec(**{**job["spec"], "eval_seq_lens": tuple(job["spec"]["eval_seq_lens"])})
    torch.manual_seed(job["seed"])
    model = instantiate_without_name(OmegaConf.create(job["model"]), spec=spec).to(device)
    set_activation_checkpointing(model, job.get("activation_checkpointing", False))
    batch = {k: v.to(device) for k, v in random_batch(spec, job["batch_size"], seed=job["seed"]).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"])

    def forward() -> torch.Tensor:
        with autocast(device, job["precision"]):
            loss, _, _ = loss_and_counts(model(batch), batch, spec)
            aux = auxiliary_loss(model)  # a model's own loss is part of its training step
            return loss if aux is None else loss + aux

    compiler = StepCompiler(forward, enabled=job.get("compile", False))  # trainer.compile, as in training

    def backward(forward) -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward()

    def step() -> None:
        compiler.run(backward)
        optimizer.step()

    return model, compiler, step, batch


def measure(job: dict) -> dict:
    from architectures.layers import UnsupportedTask
    from harness.objectives import tokens_in

    device = torch.device(job["device"])
    warm_up_runtime(device, job["precision"])
    memory = PeakMemory(device)
    memory.start()  # the floor: imports and runtime warm-up; the peak is reset here
    try:
        model, compiler, step, batch = prepare(job, device)
    except UnsupportedTask as e:
        return {"status": "unsupported", "error": str(e)}
    timer = StepTimer(device, warmup=job["untimed_steps"])
    started = time.perf_counter()
    while True:
        timer.start()
        step()
        timer.stop()
        timed = len(timer.times_ms)
        enough = timed >= job["min_repeats"] and sum(timer.times_ms) / 1e3 >= job["min_time_s"]
        if enough or timed >= job["max_repeats"]:
            break
    return {
        "status": "ok",
        "params": sum(p.numel() for p in model.parameters()),
        "speed": {**timing_summary(timer.times_ms, tokens_in(batch)),
                  "steps_per_s": 1e3 / timing_summary(timer.times_ms, 1)["step_ms_median"]},
        "memory": memory.stop(),
        "measure_s": time.perf_counter() - started,
        "compile": compiler.status(),
    }


def measure_paired(jobs: list[dict], cycles: int, steps: int) -> dict:
    """Time the jobs (one model at several lengths) in this one process, alternating: each cycle
    times ``steps`` steps of every job in turn and keeps their median. A change of the machine's
    speed then falls on every length of a cycle alike, so the ratios of lengths, and the exponent
    fitted on them, are steadier than those of separate processes. No memory: the process holds
    every length's model."""
    device = torch.device(jobs[0]["device"])
    warm_up_runtime(device, jobs[0]["precision"])
    steps_of = []
    for job in jobs:
        _, _, step, _ = prepare(job, device)
        for _ in range(job["untimed_steps"]):
            step()
        steps_of.append(step)
    cycle_ms: list[list[float]] = [[] for _ in jobs]
    started = time.perf_counter()
    for _ in range(cycles):
        for step, times in zip(steps_of, cycle_ms):
            timer = StepTimer(device, warmup=0)
            for _ in range(steps):
                timer.start()
                step()
                timer.stop()
            times.append(statistics.median(timer.times_ms))
    return {"status": "ok", "cycle_ms": cycle_ms, "measure_s": time.perf_counter() - started}


def die_with_parent(parent_pid: int | None, job_dir: Path) -> None:
    """End this process when arena-bench (its parent) dies, even by ``kill -9``: Linux sends it
    SIGTERM then (``prctl(PR_SET_PDEATHSIG)``), on which it removes the job folder and exits."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return

    def on_parent_death(signum, frame) -> None:
        shutil.rmtree(job_dir, ignore_errors=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, on_parent_death)
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it died before the signal was asked for
        on_parent_death(signal.SIGTERM, None)


def main() -> None:
    job_path, out_path = sys.argv[1], sys.argv[2]
    job = json.loads(open(job_path).read())
    die_with_parent(job.get("parent_pid"), Path(job_path).parent)
    env = configure_process(allocator=job.get("allocator", "tuned"), threads=job["threads"])
    from architectures import layers  # noqa: F401 - the imports the measurement needs come first
    limit_memory(job.get("memory_limit_mb"))
    try:
        result = measure_paired(job["paired"], job["cycles"], job["steps"]) if "paired" in job else measure(job)
    except Exception as e:  # noqa: BLE001 - every outcome is a result, out of memory or not
        result = {"status": "oom" if is_out_of_memory(e) else "error", "error": f"{type(e).__name__}: {e}"}
    with open(out_path, "w") as f:
        json.dump({**result, "env": env}, f)


if __name__ == "__main__":
    main()
