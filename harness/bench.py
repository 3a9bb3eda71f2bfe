"""``arena-bench``: speed and memory of training steps over models x sequence lengths.

    arena-bench model=transformer seq_len=4096
    arena-bench -m model=transformer,performer seq_len=1024,2048,4096
    arena-bench -m experiment=lra_speed_cpu

Each configuration is measured in a fresh subprocess (harness.bench_worker), so an
out-of-memory or a crash becomes a record (``oom``, ``error``, ``timeout``) and one
configuration's memory never leaks into another's. At the end of a multirun the scaling
exponents (least-squares slope of log step time and log memory against log L, per model) are
written to ``scaling.csv`` in the sweep directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, instantiate_without_name, register_resolvers
from harness.records import SCHEMA, config_hash, environment, new_run_id, now_iso, read_record, write_record

NON_RESULT_KEYS = ("logger", "force", "sweep", "hydra", "timeout_s")


def bench_job(cfg: DictConfig, device: torch.device) -> dict:
    """What the measurement process needs: the model config, the spec at seq_len, the settings."""
    task = instantiate_without_name(cfg.task)
    spec = dataclasses.replace(task.spec, seq_len=cfg.seq_len, eval_seq_lens=())
    if spec.kind == "seq2seq":
        spec = dataclasses.replace(spec, target_len=cfg.seq_len)
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "spec": dataclasses.asdict(spec),
        "device": str(device),
        **{k: cfg[k] for k in ("batch_size", "dtype", "threads", "seed", "warmup_steps", "min_steps",
                               "min_time_s", "max_steps", "memory_limit_mb", "lr")},
    }


def run_worker(job: dict, timeout_s: float) -> dict:
    """Measure ``job`` in a fresh Python process; crashes and timeouts become results."""
    with tempfile.TemporaryDirectory(prefix="arena-bench-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run([sys.executable, "-m", "harness.bench_worker", str(job_path), str(out_path)],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"measurement exceeded timeout_s={timeout_s}"}
        if out_path.exists():
            return json.loads(out_path.read_text())
        killed = proc.returncode < 0 and -proc.returncode == 9
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"status": "oom" if killed else "error",
                "error": f"measurement process exited with {proc.returncode}" + (f":\n{tail}" if tail else "")}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_bench(cfg: DictConfig, run_dir: Path) -> dict:
    """Measure one configuration into ``run_dir/record.json`` (skipped when already measured)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash({k: v for k, v in resolved.items() if k not in NON_RESULT_KEYS})
    existing = read_record(run_dir)
    if existing and existing.get("config_hash") == chash and existing["status"] in ("ok", "unsupported") \
            and not cfg.force:
        print(f"[arena-bench] skip {run_dir}: already measured (force=true remeasures)", flush=True)
        return existing
    device = pick_device(cfg.device)
    started_at, t0 = now_iso(), time.perf_counter()
    result = run_worker(bench_job(cfg, device), cfg.timeout_s)
    env = environment(device)
    env["threads"] = result.get("threads", env["threads"])
    record = {
        "schema": SCHEMA, "kind": "bench", "run_id": f"{chash}-{new_run_id()}", "config_hash": chash,
        "status": result["status"], "error": result.get("error"), "model": cfg.model.name,
        "task": cfg.task.name, "seed": cfg.seed, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
        "params": result.get("params"), "metrics": {}, "speed": result.get("speed", {}),
        "memory": result.get("memory", {}), "env": env, "started_at": started_at, "ended_at": now_iso(),
        "wall_s": time.perf_counter() - t0, "config": resolved, "dtype": cfg.dtype,
    }
    if record["status"] == "ok":
        record["error"] = None
    write_record(run_dir, record)
    return record


def describe(record: dict) -> str:
    head = f"[arena-bench] {record['model']} L={record['seq_len']} B={record['batch_size']}: {record['status']}"
    if record["status"] != "ok":
        return head + (f" ({record['error'].splitlines()[0]})" if record.get("error") else "")
    s, m = record["speed"], record["memory"]
    return (head + f", {s['step_ms_median']:.1f} ms/step (IQR {s['step_ms_iqr']:.1f}), "
            f"{s['tokens_per_s']:,.0f} tokens/s, peak {m['peak_bytes'] / 2**20:,.0f} MiB ({m['how']})")


def fit_exponent(lengths: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(length); None with fewer than two points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(lengths, values) if x > 0 and y and y > 0]
    if len({p[0] for p in points}) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def scaling_exponents(records: list[dict]) -> list[dict]:
    """Per (model, task, batch, dtype): slopes of log time and log memory against log seq_len."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("kind") == "bench" and r.get("status") == "ok":
            key = (r["model"], r["task"], r["batch_size"], r.get("dtype", "fp32"))
            groups.setdefault(key, []).append(r)
    rows = []
    for (model, task, batch_size, dtype), rs in sorted(groups.items()):
        lengths = [r["seq_len"] for r in rs]
        rows.append({
            "model": model, "task": task, "batch_size": batch_size, "dtype": dtype,
            "seq_lens": " ".join(str(l) for l in sorted(lengths)),
            "time_exponent": fit_exponent(lengths, [r["speed"]["step_ms_median"] for r in rs]),
            "memory_exponent": fit_exponent(lengths, [r["memory"]["peak_bytes"] for r in rs]),
        })
    return rows


def write_scaling(sweep_dir: Path) -> Path | None:
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("record.json"))]
    rows = scaling_exponents(records)
    if not rows:
        return None
    path = sweep_dir / "scaling.csv"
    lines = ["model,task,batch_size,dtype,seq_lens,time_exponent,memory_exponent"]
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{r['model']},{r['task']},{r['batch_size']},{r['dtype']},{r['seq_lens']},"
                     f"{fmt(r['time_exponent'])},{fmt(r['memory_exponent'])}")
    path.write_text("\n".join(lines) + "\n")
    return path


class ScalingCallback(Callback):
    """After a bench multirun: print and write the scaling exponents of the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = write_scaling(Path(config.hydra.sweep.dir))
        if path is not None:
            print(f"[arena-bench] scaling exponents (log time, log memory vs log L):\n{path.read_text()}"
                  f"[arena-bench] written to {path}", flush=True)


@hydra.main(config_path=str(CONF_DIR), config_name="bench", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    record = run_bench(cfg, run_dir)
    print(describe(record), flush=True)


def main() -> None:
    register_resolvers()
    hydra_main()


if __name__ == "__main__":
    main()
