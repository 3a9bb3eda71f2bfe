"""What a W&B run holds: history every trainer.log_every steps, the summary under the history's
names, an id from the run folder, config files in the offline folder, and the way back to a
record (harness.wandb_runs.record_from_run, what `arena-report --wandb` reads)."""

from __future__ import annotations

import json

import pytest
import yaml
from test_train import SHORT, TINY_MQAR, record_of, train

from harness.api import build_model, build_task, compose_config
from harness.loggers import NoLogger, wandb_run_id
from harness.records import METRICS_FILE
from harness.train import wandb_summary
from harness.trainer import Trainer
from harness.wandb_runs import record_from_run


class RecordingLogger(NoLogger):
    """A logger that keeps what it is given (the interface harness.loggers.WandbLogger serves)."""

    def __init__(self):
        self.history: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int) -> None:
        self.history.append((step, values))


def test_history_has_train_values_every_log_every_and_val_at_evaluations(tmp_path):
    cfg = compose_config([*TINY_MQAR, "logger=none", "trainer.steps=20", "trainer.eval_every=10",
                          "trainer.log_every=5", "trainer.progress=false"])
    task = build_task(cfg)
    logger = RecordingLogger()
    trainer = Trainer(model=build_model(cfg, task), task=task, trainer_cfg=cfg.trainer, seed=0,
                      device=__import__("torch").device("cpu"), run_dir=tmp_path, logger=logger)

    class Bar:
        def update(self, *args, **kwargs):
            pass

    trainer.fit(Bar())
    train_steps = [step for step, v in logger.history if "train/loss" in v]
    val_steps = [step for step, v in logger.history if "val/accuracy" in v]
    assert train_steps == [5, 10, 15, 20] and val_steps == [10, 20]
    train_keys = {k for _, v in logger.history if "train/loss" in v for k in v}
    assert train_keys == {"train/loss", "train/lr", "train/tokens_per_s"}
    assert all(set(v) == {"val/loss", "val/accuracy"} for _, v in logger.history if "val/loss" in v)
    # metrics.jsonl holds the same: train lines for the loss curves, val lines as before
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(l["split"], l["step"]) for l in lines] == [
        ("train", 5), ("train", 10), ("val", 10), ("train", 15), ("train", 20), ("val", 20)]
    assert all(l["loss"] > 0 and l["lr"] > 0 for l in lines if l["split"] == "train")


RECORD = {
    "schema": 1, "kind": "train", "run_id": "h-1", "config_hash": "h", "status": "ok", "error": None,
    "model": "mamba", "task": "mqar", "seed": 1, "seq_len": 64, "batch_size": 8, "params": 123,
    "metrics": {"val_accuracy": 0.9, "test_accuracy": 0.85, "test_loss": 0.4,
                "test_accuracy_len128": 0.7, "best_step": 40, "steps": 50, "final_train_loss": 0.3},
    "speed": {"step_ms_median": 5.0, "step_ms_iqr": 0.5, "tokens_per_s": 1e5},
    "memory": {"peak_bytes": 10**6, "how": "cpu rss"}, "env": {}, "wall_s": 12.0,
    "config": {"seed": 1, "model": {"name": "mamba"}, "task": {"name": "mqar", "seq_len": 64},
               "trainer": {"batch_size": 8}},
}


def test_summary_names_and_the_way_back_to_a_record():
    summary = wandb_summary(RECORD, last_val={"loss": 0.5, "metric": 0.88})
    assert summary["val/accuracy"] == 0.88 and summary["best/val/accuracy"] == 0.9  # last vs best
    assert summary["test/accuracy"] == 0.85 and summary["test/accuracy_len128"] == 0.7
    assert summary["train/loss"] == 0.3 and summary["best/step"] == 40
    assert not [k for k in summary if k.startswith(("val_", "test_"))], "one naming, not two"
    back = record_from_run(RECORD["config"], summary, run_id="x", source="wandb")
    for key in ("kind", "status", "model", "task", "seed", "seq_len", "batch_size", "params",
                "metrics", "speed", "memory", "config_hash", "run_id"):
        assert back[key] == RECORD[key], key


def test_run_id_is_a_function_of_the_run_folder_and_config(tmp_path):
    a = wandb_run_id(tmp_path / "job0", "h1")
    assert a == wandb_run_id(tmp_path / "job0", "h1")  # a resumed job: the same W&B run
    assert a != wandb_run_id(tmp_path / "job1", "h1") and a != wandb_run_id(tmp_path / "job0", "h2")
    assert a.isalnum() and len(a) <= 64  # W&B's rule for run ids


@pytest.mark.slow
def test_offline_run_folder_holds_config_and_summary_and_resumes_the_same_id(tmp_path):
    run_dir = tmp_path / "wb"
    train(tmp_path, run_dir, *SHORT, logger="wandb")
    record = record_of(run_dir)
    assert record["status"] == "ok"
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    assert folder.name.endswith(wandb_run_id(run_dir, record["config_hash"]))
    config = yaml.safe_load((folder / "files" / "config.yaml").read_text())
    summary = json.loads((folder / "files" / "wandb-summary.json").read_text())
    assert config["trainer"]["lr"] == record["config"]["trainer"]["lr"]
    assert {"train/loss", "val/loss", "val/accuracy", "test/accuracy", "best/val/accuracy",
            "best/step", "speed/tokens_per_s", "memory/peak_bytes", "status"} <= set(summary)
    back = record_from_run(config, summary, run_id=folder.name, source=str(folder))
    for key in ("status", "model", "task", "seed", "seq_len", "batch_size", "config_hash",
                "params", "metrics", "speed", "memory"):
        assert back[key] == record[key], key
    # the same job again (force=true reruns it in place): the same W&B run id, resumed
    train(tmp_path, run_dir, *SHORT, "force=true", logger="wandb")
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {wandb_run_id(run_dir, record["config_hash"])}


def test_report_refuses_the_removed_offline_reader_and_says_what_to_do(tmp_path, capsys):
    from harness.report import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--wandb-offline"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "wandb sync" in err and "record.json" in err
