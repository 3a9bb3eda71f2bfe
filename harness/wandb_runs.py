"""W&B runs as run records, so that a report can read a W&B project instead of ``record.json``.

Two ways to read runs back, both giving the same DataFrame columns (harness.results):

* local runs: their ``record.json`` files, ``arena-report results/sweeps/<name>`` (always there,
  whatever the logger; the record is the source of truth);
* W&B runs, through W&B's public API (``wandb.Api()``): upload the offline runs first, then read
  the project::

      wandb sync results/sweeps/<name>/**/wandb/offline-run-*
      arena-report --wandb <entity>/<project> --out report/

  Each run's ``config`` is the resolved Hydra config and its ``summary`` holds the record's
  results under the history's names (harness.loggers): ``train/loss``, ``val/<metric>``,
  ``test/<metric>``, ``best/val/<metric>``, ``best/step``, ``speed/...``, ``memory/...``.

W&B's offline ``.wandb`` files are W&B's private format and are not read here; an offline run
folder also holds ``files/config.yaml`` and ``files/wandb-summary.json`` for a human.
"""

from __future__ import annotations


def record_from_run(config: dict, summary: dict, *, run_id: str, source: str) -> dict:
    """A schema-1 record dict from a W&B run's config and summary (the inverse of
    harness.train.wandb_summary, and of harness.bench.log_to_tracker for bench runs)."""
    config = {k: v for k, v in config.items() if not k.startswith("_wandb")}  # W&B's own keys
    summary = {k: v for k, v in summary.items() if not k.startswith("_")}
    metrics = {f"test_{k[5:]}": v for k, v in summary.items() if k.startswith("test/")}
    metrics.update({f"val_{k[9:]}": v for k, v in summary.items() if k.startswith("best/val/")})
    for name, key in (("best_step", "best/step"), ("steps", "train/steps"),
                      ("final_train_loss", "train/loss")):
        if key in summary:
            metrics[name] = summary[key]
    model, task = config.get("model", {}), config.get("task", {})
    kind = summary.get("kind", "train")
    return {
        "schema": 1, "kind": kind, "run_id": summary.get("run_id", run_id),
        "config_hash": summary.get("config_hash"), "status": summary.get("status", "unknown"),
        "error": None, "model": model.get("name"), "task": task.get("name"), "seed": config.get("seed"),
        "seq_len": task.get("seq_len"), "batch_size": config.get("trainer", {}).get("batch_size"),
        "params": summary.get("params"), "metrics": metrics if kind == "train" else {},
        "speed": {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("speed/")},
        "memory": {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("memory/")},
        "env": {}, "started_at": None, "ended_at": None, "wall_s": summary.get("wall_s"),
        "config": config, "source": source,
        **({"dtype": summary["precision"]} if "precision" in summary else {}),
    }


def records_from_wandb_api(path: str, filters: dict | None = None) -> list[dict]:
    """Records of every run of ``entity/project`` through W&B's public API (network and login
    needed; offline runs must be uploaded with ``wandb sync`` first)."""
    import wandb

    runs = wandb.Api().runs(path, filters=filters or {})
    return [record_from_run(dict(run.config), dict(run.summary), run_id=run.id, source=run.url)
            for run in runs]
