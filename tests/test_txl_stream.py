"""Stream mode (issue 14): char_lm's stream order and the trainer carrying Transformer-XL's memory
across consecutive batches, emptied at the start of every evaluation, as the reference's
LMOrderedIterator + train()/evaluate() (kimiyoung/transformer-xl pytorch/train.py)."""

from __future__ import annotations

import pytest
import torch

from harness.api import build_model, build_task, compose_config
from harness.loggers import NoLogger
from harness.objectives import loss_and_counts
from harness.trainer import Trainer
from tasks.char_lm import stream_indices, windows

TINY_XL = ["model=transformer_xl", "task=char_lm", "task.source=generate", "task.n_bytes=20000", "task.seq_len=8",
           "size.d_model=16", "size.n_layers=2", "size.n_heads=2", "size.dropout=0.0", "model.seg_len=4",
           "model.mem_len=4", "trainer=smoke", "trainer.batch_size=4", "trainer.eval_batch_size=3",
           "trainer.progress=false", "logger=none"]


def test_stream_order_continues_every_row_in_the_text():
    stream = torch.arange(203) % 256  # every byte tells its position
    data = windows(stream, 8)  # 25 windows
    per_stream = 25 // 4
    for step in range(2 * per_stream):
        now = data["tokens"][stream_indices(step, n_windows=25, batch_size=4)]
        after = data["tokens"][stream_indices(step + 1, n_windows=25, batch_size=4)]
        if (step + 1) % per_stream:  # each row goes on where it stopped
            assert torch.equal(after[:, 0], now[:, -1] + 1)
        else:  # the streams start over, each at its own first window
            assert torch.equal(after[:, 0], torch.arange(4) * per_stream * 8)
    with pytest.raises(ValueError, match="trainer.batch_size"):
        stream_indices(0, n_windows=3, batch_size=4)


def make_trainer(tmp_path, *extra: str, base: list[str] = TINY_XL) -> Trainer:
    cfg = compose_config([*base, *extra])
    task = build_task(cfg)
    return Trainer(model=build_model(cfg, task), task=task, trainer_cfg=cfg.trainer, seed=0,
                   device=torch.device("cpu"), run_dir=tmp_path, logger=NoLogger())


def test_trainer_feeds_streams_and_the_model_carries_its_memory(tmp_path):
    trainer = make_trainer(tmp_path, "model.stream=true")
    model, n = trainer.model, len(trainer.train_set)
    assert trainer.stream and model.stream
    first, second = trainer.train_indices(0), trainer.train_indices(1)
    assert torch.equal(second, first + 1)  # row r: the next window of stream r
    trainer.train_step(trainer.to_device(trainer.train_set[first]))
    assert model.carried[True] is not None and model.carried[True][0].shape[:2] == (4, 4)
    trainer.train_indices(n // 4)  # the streams start over: no memory from their ends
    assert model.carried[True] is None
    # shuffled order without stream mode
    assert not make_trainer(tmp_path / "plain").stream


def test_stream_evaluation_equals_the_whole_stream_read_at_once(tmp_path):
    trainer = make_trainer(tmp_path, "model.stream=true")
    model, val = trainer.model, trainer.val_set
    model.train()
    model({"tokens": val[torch.arange(4)]["tokens"].long()})  # a training memory that must not leak
    got = trainer.evaluate(val, 3)  # 3 batches of 3 streams
    assert trainer.evaluate(val, 3) == got  # every evaluation starts from an empty memory
    # reference: each stream's first 3 windows as one sequence, read in one call without carried memory
    per_stream = len(val) // 3
    rows = torch.arange(3)[:, None] * per_stream + torch.arange(3)  # (streams, windows)
    batch = {k: val[rows.reshape(-1)][k].long().view(3, -1) for k in ("tokens", "targets")}  # (3, 24)
    model.stream = False
    model.eval()
    with torch.no_grad():
        loss, _, count = loss_and_counts(model(batch), batch, trainer.spec)
    assert count == got["count"] == 3 * 3 * 8
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    model.train()
    assert model.carried[True] is not None  # evaluation left the training memory alone


def test_stream_mode_needs_a_stream_task(tmp_path):
    with pytest.raises(ValueError, match="model.stream=true"):
        make_trainer(tmp_path, "model.stream=true", "task=mqar", "task.seq_len=16", "task.n_pairs=2",
                     "task.vocab_size=32", "task.n_train=64", "task.n_val=16", "task.n_test=16",
                     base=[o for o in TINY_XL if not o.startswith("task")])
