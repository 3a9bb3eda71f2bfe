"""Forward + backward time and peak memory of linear attention mixers against softmax attention.

Each (model, mode, seq_len) runs in its own process, so that CPU peak memory is the resident
set of that process alone (peak minus the baseline after building model and batch); on CUDA
it is ``torch.cuda.max_memory_allocated``. Models come from their conf/model/*.yaml, with
batch 1 and the yaml's sizes (d_model 64, 2 layers).

    flock /tmp/arena-bench.lock .venv/bin/python bench/bench_attention_linear.py \\
        --models transformer linear_transformer performer linformer --seq-lens 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CAUSAL_CAPABLE = ("transformer", "linear_transformer", "performer")


def build(name: str, mode: str, seq_len: int) -> tuple[torch.nn.Module, dict]:
    from harness.api import compose_config
    from harness.config import instantiate_without_name
    from tasks.base import TaskSpec

    cfg = compose_config([f"model={name}", "logger=none", f"task.seq_len={seq_len}"])
    vocab = 16
    kind = "lm" if mode == "causal" else "classify"
    spec = TaskSpec(kind=kind, vocab_size=vocab, n_outputs=vocab if kind == "lm" else 2, seq_len=seq_len)
    model = instantiate_without_name(cfg.model, spec=spec)
    tokens = torch.randint(1, vocab, (1, seq_len))
    target = torch.randint(0, vocab, (1, seq_len)) if kind == "lm" else torch.zeros(1, dtype=torch.long)
    return model, {"tokens": tokens, "target": target}


def measure_one(name: str, mode: str, seq_len: int, device: str, repeats: int) -> dict:
    model, batch = build(name, mode, seq_len)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        logits = model({"tokens": batch["tokens"]})
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_bytes
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) * 1024
    return {"model": name, "mode": mode, "seq_len": seq_len, "ms": 1000 * statistics.median(times),
            "peak_mib": peak / 2**20, "device": device, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["transformer", "linear_transformer", "performer", "linformer"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "MODE", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        name, mode, seq_len = args.one
        print(json.dumps(measure_one(name, mode, int(seq_len), args.device, args.repeats)))
        return

    rows = []
    for mode in ("bidirectional", "causal"):
        for name in args.models:
            if mode == "causal" and name not in CAUSAL_CAPABLE:
                continue
            for seq_len in args.seq_lens:
                cmd = [sys.executable, __file__, "--one", name, mode, str(seq_len), "--device", args.device,
                       "--threads", str(args.threads), "--repeats", str(args.repeats)]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    print(f"{name} {mode} {seq_len}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"| mode | model | {' | '.join(f'L={n}' for n in args.seq_lens)} |")
    print(f"|---|---|{'---|' * len(args.seq_lens)}")
    for mode in ("bidirectional", "causal"):
        for name in args.models:
            cells = {r["seq_len"]: r for r in rows if r["model"] == name and r["mode"] == mode}
            if cells:
                text = [f"{cells[n]['ms']:.0f} ms / {cells[n]['peak_mib']:.0f} MiB" if n in cells else "-"
                        for n in args.seq_lens]
                print(f"| {mode} | {name} | {' | '.join(text)} |")


if __name__ == "__main__":
    main()
