"""Nothing lost, nothing stale: run folders, bad files, config values and data errors, checked on
the parts themselves (no subprocess; the end-to-end checks are in test_robustness_e2e.py).

Each test stands for a case that once went wrong: a result reused for other data, a superseded
run's metrics appended to, a bad record that crashed a sweep, a corrupt cache that failed every
later run, a value reported by torch rather than by its key, files other users could not read.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.api import compose_config
from harness.config import result_config
from harness.records import RECORD_FILE, config_hash, new_record, read_record, validate_record, write_record
from harness.results import load_curves, load_runs
from harness.run_folder import FolderBusy, claim, make_room_for
from harness.validation import config_problems
from tasks.base import atomic_write, atomic_write_dir, cached_splits, remove_stale_temps, temp_name
from tasks.image import read_batch
from tasks.listops import read_listops_tsv
from tasks.lra_io import DataFormatError


def a_record(chash: str = "abc", **changes) -> dict:
    record = new_record(kind="train", config_hash=chash, model="transformer", task="mqar", seed=0,
                        seq_len=32, batch_size=4, env={}, config={"trainer": {"lr": 0.001}})
    record.update({"status": "ok", "metrics": {"val_accuracy": 0.5, "test_accuracy": 0.5}, **changes})
    return record


# --------------------------------------------------------------------------- identity of a run


def test_the_data_folder_is_part_of_a_runs_identity_and_the_cache_folder_is_not():
    base = ["task=listops", "task.source=lra"]
    a = config_hash(result_config(compose_config([*base, "task.data_dir=/data/a"])))
    b = config_hash(result_config(compose_config([*base, "task.data_dir=/data/b"])))
    cached_elsewhere = config_hash(result_config(compose_config([*base, "task.data_dir=/data/a",
                                                                  "task.cache_dir=/elsewhere"])))
    assert a != b, "a run on other data must not reuse the old result"
    assert a == cached_elsewhere, "where the cache lives changes no result"


def test_a_relative_data_folder_counts_as_the_folder_it_names(tmp_path, monkeypatch):
    cfg = compose_config(["task=listops", "task.data_dir=data/listops"])
    monkeypatch.chdir(tmp_path)
    here = config_hash(result_config(cfg))
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert config_hash(result_config(cfg)) != here


def test_a_folder_holding_another_configuration_is_set_aside_with_the_keys_that_changed(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = compose_config(["trainer.lr=0.001"])
    old_result = result_config(old)
    record = a_record(config_hash(old_result))
    record["config"] = json.loads(json.dumps(old_result))
    write_record(run_dir, record)
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "split": "val"}\n')
    (run_dir / "checkpoint.pt").write_bytes(b"old")
    new_result = result_config(compose_config(["trainer.lr=0.002"]))
    with caplog.at_level(logging.WARNING):
        make_room_for(run_dir, config_hash(new_result), new_result)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / RECORD_FILE).exists()
    [aside] = run_dir.glob(".superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "record.json"]
    assert "trainer.lr: 0.001 -> 0.002" in caplog.text
    assert load_runs(tmp_path).empty, "a run set aside is not a result"


def test_the_same_configuration_keeps_its_folder(tmp_path):
    result = result_config(compose_config([]))
    write_record(tmp_path, a_record(config_hash(result)))
    make_room_for(tmp_path, config_hash(result), result)
    assert (tmp_path / RECORD_FILE).exists() and not list(tmp_path.glob(".superseded-*"))


def test_a_run_folder_has_one_writer_and_the_second_is_told_who(tmp_path):
    with claim(tmp_path):
        with pytest.raises(FolderBusy, match=rf"{tmp_path}.*pid {os.getpid()}"):
            with claim(tmp_path):
                pass
    with claim(tmp_path):  # released when the first writer is done
        pass


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("content", [b"\x00\xff\xfe garbage", b"[1, 2, 3]", b'{"schema": 1, "kind": "train"}'],
                         ids=["binary", "json-list", "no-status"])
def test_a_bad_record_is_set_aside_with_a_message_naming_it(tmp_path, caplog, content):
    (tmp_path / RECORD_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert read_record(tmp_path) is None
    assert str(tmp_path / RECORD_FILE) in caplog.text
    [aside] = tmp_path.glob("record.json.corrupt-*")
    assert aside.read_bytes() == content and not (tmp_path / RECORD_FILE).exists()


def test_records_are_checked_for_types_not_only_fields():
    assert validate_record(a_record()) == []
    problems = validate_record(a_record(metrics=[1, 2], seed="abc", status="fine"))
    assert any(p.startswith("metrics") for p in problems)
    assert any(p.startswith("seed") for p in problems)
    assert any(p.startswith("status") for p in problems)


def test_the_report_skips_bad_records_and_metrics_naming_each_and_reads_the_rest(tmp_path):
    good, wrong_types, garbage = tmp_path / "good", tmp_path / "types", tmp_path / "garbage"
    write_record(good, a_record())
    (good / "metrics.jsonl").write_text('{"step": 10, "split": "val", "loss": 1.0, "metric": 0.5}\n')
    wrong_types.mkdir()
    (wrong_types / RECORD_FILE).write_text(json.dumps(a_record(metrics="high", wall_s="long")))
    write_record(garbage, a_record())
    (garbage / "metrics.jsonl").write_bytes(b"\x89PNG\x00\x01\xff\n[1, 2]\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs(tmp_path)
        curves = load_curves(tmp_path)
    messages = "\n".join(str(w.message) for w in caught)
    assert str(wrong_types / RECORD_FILE) in messages
    assert f"{garbage / 'metrics.jsonl'}:1" in messages and f"{garbage / 'metrics.jsonl'}:2" in messages
    assert len(runs) == 2 and set(runs.run_dir) == {str(good), str(garbage)}
    assert list(curves.run_dir) == [str(good)]


def test_a_truncated_data_cache_is_set_aside_and_rebuilt(tmp_path, caplog):
    calls = []

    def build():
        calls.append(1)
        return {"train": {"tokens": torch.arange(6).view(3, 2)}}

    first = cached_splits("toy", {"n": 3}, build, tmp_path)
    [cache] = tmp_path.glob("toy-*.pt")
    cache.write_bytes(cache.read_bytes()[:40])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        again = cached_splits("toy", {"n": 3}, build, tmp_path)
    assert len(calls) == 2 and torch.equal(again["train"]["tokens"], first["train"]["tokens"])
    assert str(cache) in caplog.text and list(tmp_path.glob("toy-*.pt.corrupt-*"))
    assert cached_splits("toy", {"n": 3}, build, tmp_path) and len(calls) == 2, "the rebuilt cache is used"


def test_a_dead_writers_temporary_files_are_removed_and_a_live_writers_kept(tmp_path):
    target = tmp_path / "data.pt"
    mine = tmp_path / f"{temp_name(target)}abc.tmp"  # this (live) process
    mine.write_bytes(b"in progress")
    dead_pid = 2**22 + 12345  # above pid_max on Linux: no such process
    dead = tmp_path / f"{temp_name(target).replace(f'-{os.getpid()}.', f'-{dead_pid}.')}xyz.tmp"
    dead.write_bytes(b"killed")
    dead_dir = tmp_path / f".folder.{dead.name.split('.', 2)[2]}"
    dead_dir.mkdir()
    old_foreign = tmp_path / ".data.pt.otherhost-1.q.tmp"
    old_foreign.write_bytes(b"a day old")
    os.utime(old_foreign, (time.time() - 2 * 86400,) * 2)
    removed = remove_stale_temps(tmp_path)
    assert set(removed) == {dead, dead_dir, old_foreign}
    assert mine.exists()


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                           (0o077, 0o600, 0o700)])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, folder_mode):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "record.json", lambda tmp: tmp.write_text("{}"))
        folder = atomic_write_dir(tmp_path / "generated", lambda tmp: (tmp / "a.tsv").write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE(folder.stat().st_mode) == folder_mode


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, key", [
    ("trainer.steps=0", "trainer.steps=0"), ("model.n_layers=-1", "model.n_layers=-1"),
    ("trainer.batch_size=0", "trainer.batch_size=0"), ("trainer.eval_every=0", "trainer.eval_every=0"),
    ("trainer.lr=abc", "trainer.lr='abc'"), ("trainer.lr=-0.1", "trainer.lr=-0.1"),
    ("seed=abc", "seed='abc'"), ("trainer.precision=fp16", "trainer.precision='fp16'"),
    ("size.d_model=0", "model.d_model=0"), ("logger.mode=sometimes", "logger.mode='sometimes'"),
    ("size.dropout=1.5", "model.dropout=1.5"),
])
def test_a_bad_config_value_is_named_by_key_and_value(override, key):
    problems = config_problems(compose_config([override]))
    assert len(problems) == 1 and problems[0].startswith(key), problems


@pytest.mark.parametrize("model", sorted(p.stem for p in (Path(__file__).parents[1] / "conf/model").glob("*.yaml")))
def test_every_shipped_model_passes_the_checks(model):
    assert config_problems(compose_config([f"model={model}"])) == []


# --------------------------------------------------------------------------- data errors


def test_bytes_that_are_not_utf8_in_a_listops_tsv_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_bytes(b"Source\tTarget\n( [MAX 2 9 ] )\t9\n( [MIN 1 \xff ] )\t1\n")
    with pytest.raises(DataFormatError, match=rf"{path}:3: expected UTF-8 text, found byte 0xff at column 10"):
        read_listops_tsv(path, 16)


def test_cifar_labels_that_are_not_integers_are_named(tmp_path):
    path = tmp_path / "data_batch_1"
    data = np.zeros((2, 3072), dtype=np.uint8)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": ["cat", "dog"]}))
    with pytest.raises(DataFormatError, match=r"data_batch_1:entry 0 of b'labels': expected a class 0-9"):
        read_batch(path)


def test_a_file_missing_from_a_release_folder_is_named_on_the_first_line(tmp_path):
    from tasks.listops import ListOps

    (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n( [MAX 2 9 ] )\t9\n")
    task = ListOps(source="lra", data_dir=str(tmp_path), seq_len=16, n_train=1, n_val=1, n_test=1,
                   min_length=1, max_length=16, max_depth=2, max_args=2, seed=0, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as caught:
        task.dataset("train")
    first_line = str(caught.value).splitlines()[0]
    assert "basic_val.tsv, basic_test.tsv not found" in first_line, first_line
