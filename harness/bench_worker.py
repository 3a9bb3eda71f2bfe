"""The measurement process of ``arena-bench``: one configuration, nothing else in the process.

Run as ``python -m harness.bench_worker IN.json OUT.json``. It reads the model config, the
task spec and the settings (harness.bench.bench_job: batch_size, lr, threads, precision,
untimed_steps, min_repeats, min_time_s, max_repeats, memory_limit_mb), measures training steps
on a random batch, and writes speed and memory to OUT.json.
Its peak memory is its own: on CPU the peak resident set minus the resident set after imports.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from omegaconf import OmegaConf

from harness.measure import PeakMemory, StepTimer, autocast, current_rss_bytes, timing_summary
from harness.records import is_out_of_memory


def limit_memory(limit_mb: int | None) -> None:
    """Cap this process's address space so that an oversized configuration fails cleanly."""
    if limit_mb:
        limit = int(limit_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def measure(job: dict) -> dict:
    from architectures.layers import UnsupportedTask
    from harness.config import instantiate_without_name
    from harness.objectives import auxiliary_loss, loss_and_counts, tokens_in
    from tasks.base import TaskSpec, random_batch

    baseline = current_rss_bytes()  # after imports: torch and the harness are not the model's
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    spec = TaskSpec(**{**job["spec"], "eval_seq_lens": tuple(job["spec"]["eval_seq_lens"])})
    memory = PeakMemory(device)
    memory.start()
    if device.type == "cpu":
        memory.baseline = baseline
    torch.manual_seed(job["seed"])
    try:
        model = instantiate_without_name(OmegaConf.create(job["model"]), spec=spec).to(device)
    except UnsupportedTask as e:
        return {"status": "unsupported", "error": str(e)}
    batch = {k: v.to(device) for k, v in random_batch(spec, job["batch_size"], seed=job["seed"]).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"])

    timer = StepTimer(device, warmup=job["untimed_steps"])

    def step() -> None:
        with autocast(device, job["precision"]):
            loss, _, _ = loss_and_counts(model(batch), batch, spec)
            aux = auxiliary_loss(model)  # a model's own loss is part of its training step
            loss = loss if aux is None else loss + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

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
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    job_path, out_path = sys.argv[1], sys.argv[2]
    job = json.loads(open(job_path).read())
    limit_memory(job.get("memory_limit_mb"))
    try:
        result = measure(job)
    except Exception as e:  # noqa: BLE001 - every outcome is a result, out of memory or not
        result = {"status": "oom" if is_out_of_memory(e) else "error", "error": f"{type(e).__name__}: {e}"}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
