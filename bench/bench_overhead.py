"""The harness's own overhead: a step timed by arena-bench's measurement process versus a bare
training loop over the same model and batch, each in a fresh process, alternated A B A B.

    .venv/bin/python bench/bench_overhead.py [--model transformer] [--seq-len 1024] [--rounds 3]

Prints both medians and their ratio; the target is at most 5% apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.api import compose_config  # noqa: E402
from harness.bench import bench_job  # noqa: E402

BARE_LOOP = r"""
import json, statistics, sys, time
import torch
from omegaconf import OmegaConf
from harness.config import instantiate_without_name
from tasks.base import TaskSpec, random_batch
import torch.nn.functional as F

job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])
torch.manual_seed(job["seed"])
spec = TaskSpec(**{**job["spec"], "eval_seq_lens": ()})
model = instantiate_without_name(OmegaConf.create(job["model"]), spec=spec)
batch = random_batch(spec, job["batch_size"], seed=job["seed"])
opt = torch.optim.AdamW(model.parameters(), lr=job["lr"])
times = []
for i in range(job["untimed_steps"] + job["min_repeats"]):
    t0 = time.perf_counter()
    logits = model(batch)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["label"].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i >= job["untimed_steps"]:
        times.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"step_ms_median": statistics.median(times)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cfg = compose_config([
        f"model={args.model}", f"task.seq_len={args.seq_len}", f"trainer.batch_size={args.batch_size}",
        f"trainer.threads={args.threads}", "bench.untimed_steps=3", f"bench.min_repeats={args.steps}",
        f"bench.max_repeats={args.steps}", "bench.min_time_s=0"], config_name="bench")
    job = bench_job(cfg, __import__("torch").device("cpu"))  # task=text: classify, one label per row
    harness_ms, bare_ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        for _ in range(args.rounds):
            subprocess.run([sys.executable, "-m", "harness.bench_worker", str(job_path), str(out_path)],
                           check=True, cwd=REPO)
            harness_ms.append(json.loads(out_path.read_text())["speed"]["step_ms_median"])
            out = subprocess.run([sys.executable, "-c", BARE_LOOP, str(job_path)], check=True, cwd=REPO,
                                 capture_output=True, text=True)
            bare_ms.append(json.loads(out.stdout)["step_ms_median"])
    h, b = statistics.median(harness_ms), statistics.median(bare_ms)
    print(f"model={args.model} L={args.seq_len} B={args.batch_size} threads={args.threads} "
          f"rounds={args.rounds} at {time.strftime('%H:%M:%S')}")
    print(f"arena-bench worker : {h:8.2f} ms/step  (rounds: {', '.join(f'{x:.1f}' for x in harness_ms)})")
    print(f"bare loop          : {b:8.2f} ms/step  (rounds: {', '.join(f'{x:.1f}' for x in bare_ms)})")
    print(f"ratio harness/bare : {h / b:.3f}  ({'within' if abs(h / b - 1) <= 0.05 else 'NOT within'} 5%)")


if __name__ == "__main__":
    main()
