"""Profile one model's training step as arena-bench times it: step time, page faults, user and
system time per step, and torch.profiler's top operators.

The model, batch and optimiser are built the way ``harness.bench_worker`` builds them, from the
same composition (``config_name=bench`` plus the overrides given), so the numbers describe the
step that ``arena-bench -m experiment=quickstart_speed`` measures.

    flock /tmp/arena-cpu.lock .venv/bin/python bench/profile_step.py \\
        experiment=quickstart_speed model=performer task.seq_len=2048 --steps 5 --top 15
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="arena-bench overrides, e.g. model=performer")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 untimed)")
    parser.add_argument("--top", type=int, default=15, help="profiler rows to print (0: no profile)")
    args = parser.parse_args()

    from harness.api import compose_config
    from harness.bench import bench_job
    from harness.config import instantiate_without_name
    from harness.objectives import loss_and_counts
    from omegaconf import OmegaConf
    from tasks.base import TaskSpec, random_batch

    cfg = compose_config(["logger=none", *args.overrides], config_name="bench")
    job = bench_job(cfg, torch.device("cpu"))
    torch.set_num_threads(job["threads"])
    spec = TaskSpec(**{**job["spec"], "eval_seq_lens": tuple(job["spec"]["eval_seq_lens"])})
    torch.manual_seed(job["seed"])
    model = instantiate_without_name(OmegaConf.create(job["model"]), spec=spec)
    batch = random_batch(spec, job["batch_size"], seed=job["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"])

    def step() -> None:
        loss, _, _ = loss_and_counts(model(batch), batch, spec)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    times, faults, user, system = [], [], [], []
    for _ in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        times.append((t1 - t0) * 1e3)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        user.append((r1.ru_utime - r0.ru_utime) * 1e3)
        system.append((r1.ru_stime - r0.ru_stime) * 1e3)
    med = statistics.median
    print(f"{cfg.model.name} L={spec.seq_len} B={job['batch_size']} threads={torch.get_num_threads()}: "
          f"step {med(times):.1f} ms (min {min(times):.1f}), minor faults/step {med(faults):.0f}, "
          f"user {med(user):.0f} ms, sys {med(system):.0f} ms, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.top:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
