"""Forward + backward time and peak memory of sparse attention against full attention.

Builds the shared backbone with each model's mixer from conf/model/<name>.yaml (batch 1, the
yaml's d_model / n_layers unless overridden) and times forward + backward over a random
sequence, nanoGPT bench.py style: warm-up, then the median of timed repeats.

CPU peak memory is the peak resident set of a fresh process per (model, length) minus its
baseline after building the model and input; CUDA uses ``torch.cuda.max_memory_allocated``.

Usage:
    flock /tmp/arena-bench.lock python bench/bench_attention_sparse.py \
        --models transformer local longformer bigbird --lengths 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from architectures.backbone import SequenceModel  # noqa: E402
from tasks.base import TaskSpec  # noqa: E402


def build_model(name: str, L: int, causal: bool, d_model: int | None, n_layers: int | None):
    """The yaml's model for a task of length L, without Hydra (pyyaml + importlib)."""
    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    mixer_cfg = dict(cfg.pop("mixer"))
    module, cls = mixer_cfg.pop("_target_").rsplit(".", 1)
    mixer_cfg.pop("_partial_")
    mixer_cls = getattr(importlib.import_module(module), cls)
    for key in ("name", "_target_"):
        cfg.pop(key)
    cfg.update({k: v for k, v in (("d_model", d_model), ("n_layers", n_layers)) if v is not None})
    spec = TaskSpec(kind="lm" if causal else "classify", vocab_size=32, n_outputs=32 if causal else 2, seq_len=L)
    return SequenceModel(spec=spec, mixer=lambda d, **kw: mixer_cls(d, **mixer_cfg, **kw), **cfg)


def measure(args, name: str, L: int) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(name, L, args.causal, args.d_model, args.n_layers).to(device)
    batch = {"tokens": torch.randint(1, 32, (1, L), device=device)}

    def step():
        model(batch).float().sum().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"model": name, "seq_len": L, "causal": args.causal, "device": args.device,
            "threads": torch.get_num_threads(), "ms": 1000 * statistics.median(times), "peak_mib": peak / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["transformer", "local", "longformer", "bigbird"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--causal", action="store_true", help="causal (lm) instead of bidirectional (classify)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--one", nargs=2, metavar=("MODEL", "L"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args, args.one[0], int(args.one[1]))))
        return
    print(f"{'model':<12} {'seq_len':>7} {'ms':>10} {'peak MiB':>10}   ({args.device}, threads={args.threads}, "
          f"{'causal' if args.causal else 'bidirectional'})")
    for name in args.models:
        for L in args.lengths:
            if args.device == "cpu":  # a fresh process per point, so its peak RSS is its own
                cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name, str(L)]
                row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            else:
                row = measure(args, name, L)
            print(f"{name:<12} {L:>7} {row['ms']:>10.1f} {row['peak_mib']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
