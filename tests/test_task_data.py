"""The data of every task, checked against the task contract (tasks/base.py) for every
``conf/task/*.yaml`` (timm-style discovery: a new task is covered the moment its yaml lands).

Each task is composed from its own yaml at tiny sizes and made to produce its data here: generated
tasks draw it, tasks with a generator for a released data set use ``task.source=generate``, and
the others read a tiny copy of their release in its official layout (tests/lra_fixtures.py). A new
task that needs a download fails here until it gets a fixture: that is on purpose.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from harness.api import build_task, compose_config
from harness.config import CONF_DIR
from lra_fixtures import AAN_ROWS, IMDB, write_aan, write_cifar, write_imdb
from tasks.base import IGNORE_INDEX, SPLITS, ArrayDataset, Task, TaskSpec

TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))

# The keys a model reads, by kind (the table of tasks/base.py), and the extra keys a task may
# store for reports, which models never read.
BATCH_KEYS = {
    "classify": {"tokens", "label"},
    "pair": {"tokens", "tokens2", "label"},
    "lm": {"tokens", "targets"},
    "seq2seq": {"source", "target"},
}
REPORT_KEYS = {"length"}  # reverse: each source's length, for accuracy by length
INPUT_KEYS = ("tokens", "tokens2", "source")  # ids below spec.vocab_size
OUTPUT_KEYS = ("label", "targets", "target")  # ids below spec.n_outputs

TINY = {"n_train": 8, "n_val": 4, "n_test": 4}  # applied where a task's yaml has the key

# What a task needs beyond TINY to make its data here, quickly and without a download.
OVERRIDES = {
    "char_lm": ["task.n_bytes=4000", "task.seq_len=32"],
    "listops": ["task.source=generate", "task.min_length=10", "task.max_length=60", "task.seq_len=64"],
    "pathfinder": ["task.source=generate"],
    "pathx": ["task.source=generate"],
    "text": ["task.seq_len=32", "task.val_split=holdout"],  # holdout: the seed picks the val set
    "retrieval": ["task.seq_len=16"],
}

# Tasks that only read a release: a writer of a tiny copy in its official layout, into the folder
# that task.data_dir then points at.
RELEASE_FIXTURES = {
    "text": lambda folder: write_imdb(folder, IMDB),
    "retrieval": lambda folder: write_aan(folder, AAN_ROWS),
    "image": lambda folder: write_cifar(folder),
}


def task_overrides(name: str, root: Path) -> list[str]:
    """The overrides that make ``name`` tiny and able to make its data under ``root``."""
    yaml = OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml")
    out = [f"task.{key}={value}" for key, value in TINY.items() if key in yaml]
    out += OVERRIDES.get(name, [])
    if name in RELEASE_FIXTURES:
        data_dir = root / "release"
        if not data_dir.exists():
            RELEASE_FIXTURES[name](data_dir)
        out.append(f"task.data_dir={data_dir}")
    return out


def make_task(name: str, root: Path, *extra: str, cache: str = "cache"):
    """Compose ``task=name`` at tiny sizes and build it; generated data go to ``root/cache``."""
    cfg = compose_config([f"task={name}", *task_overrides(name, root), f"task.cache_dir={root / cache}", *extra])
    return cfg, build_task(cfg)


def check_data(spec: TaskSpec, data: ArrayDataset, *, seq_len: int | None = None) -> None:
    """Assert that ``data`` keeps the contract of ``spec``; the message says which rule broke."""
    batch = data[torch.arange(len(data))]  # the whole split as one batch
    check_keys_and_dtypes(spec, data.arrays, batch)
    check_shapes(spec, batch, seq_len or spec.seq_len, at_own_length=seq_len is None)
    check_ids(spec, batch)
    if spec.kind != "lm":  # lm batches are never padded (for bytes, 0 is an ordinary token)
        check_right_padding(spec, batch)


def check_keys_and_dtypes(spec: TaskSpec, stored: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
    required = BATCH_KEYS[spec.kind]
    assert required <= set(batch), f"{spec.kind} batches need keys {sorted(required)}, got {sorted(batch)}"
    assert set(batch) - required <= REPORT_KEYS, f"unknown batch keys {sorted(set(batch) - required)}"
    for key, x in batch.items():
        assert not stored[key].is_floating_point(), f"{key} is stored as {stored[key].dtype}, not integers"
        assert x.dtype == torch.int64, f"indexing must return {key} as int64, got {x.dtype}"


def check_shapes(spec: TaskSpec, batch: dict[str, torch.Tensor], L: int, *, at_own_length: bool) -> None:
    N = len(next(iter(batch.values())))
    for key in INPUT_KEYS:
        if key in batch:
            assert batch[key].shape == (N, L), f"{key} of shape {tuple(batch[key].shape)}, not (N, {L})"
    if spec.kind == "lm":
        assert batch["targets"].shape == batch["tokens"].shape, "lm targets must align with tokens"
    if spec.kind in ("classify", "pair"):
        assert batch["label"].shape == (N,), f"label of shape {tuple(batch['label'].shape)}, not (N,)"
    if spec.kind == "seq2seq" and at_own_length:
        assert batch["target"].shape == (N, spec.target_len), "targets must be spec.target_len long"


def check_ids(spec: TaskSpec, batch: dict[str, torch.Tensor]) -> None:
    """Inputs in [0, vocab_size); labels and targets in [0, n_outputs), targets also IGNORE_INDEX."""
    for key in INPUT_KEYS:
        if key in batch:
            low, high = int(batch[key].min()), int(batch[key].max())
            assert 0 <= low and high < spec.vocab_size, \
                f"{key} ids must lie in [0, vocab_size={spec.vocab_size}), found {low}..{high}"
    for key in OUTPUT_KEYS:
        if key in batch:
            y = batch[key]
            scored = y if key == "label" else y[y != IGNORE_INDEX]
            assert scored.numel(), f"{key}: nothing is scored"
            low, high = int(scored.min()), int(scored.max())
            assert 0 <= low and high < spec.n_outputs, \
                f"{key} must lie in [0, n_outputs={spec.n_outputs}), found {low}..{high}"


def check_right_padding(spec: TaskSpec, batch: dict[str, torch.Tensor]) -> None:
    """No real token after the first pad of a row."""
    for key in (*INPUT_KEYS, "target"):
        if key in batch:
            is_pad = batch[key] == spec.pad_id  # (N, L)
            from_first_pad = is_pad.int().cummax(dim=1).values.bool()  # (N, L): True from the first pad on
            assert torch.equal(is_pad, from_first_pad), f"{key}: padding must be on the right only"


def all_arrays(task) -> dict[tuple[str, str], torch.Tensor]:
    return {(split, key): x for split in SPLITS for key, x in task.dataset(split).arrays.items()}


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", TASKS)
def test_task_satisfies_the_protocol(name, tmp_path):
    _, task = make_task(name, tmp_path)
    assert isinstance(task, Task), f"{type(task).__name__} lacks spec, dataset or describe"
    assert isinstance(task.spec, TaskSpec)
    with pytest.raises(KeyError, match=name):
        task.dataset("dev")


@pytest.mark.parametrize("name", TASKS)
def test_task_data_keep_the_contract(name, tmp_path):
    cfg, task = make_task(name, tmp_path)
    spec = task.spec
    for split in SPLITS:
        data = task.dataset(split)
        check_data(spec, data)
        if f"n_{split}" in cfg.task:
            assert len(data) == cfg.task[f"n_{split}"], f"{split}: {len(data)} examples, not task.n_{split}"
    at_own_length = task.dataset("test", seq_len=spec.seq_len).arrays
    assert all(torch.equal(x, task.dataset("test").arrays[k]) for k, x in at_own_length.items())
    for length in spec.eval_seq_lens:
        check_data(spec, task.dataset("test", seq_len=length), seq_len=length)
    # another length: drawn afresh by a generated task, refused by one read from files
    shorter = spec.seq_len // 2
    try:
        other = task.dataset("test", seq_len=shorter)
    except ValueError as e:
        assert "seq_len" in str(e)
    else:
        check_data(spec, other, seq_len=shorter)
    summary = task.describe()
    assert cfg.task.name in summary and all(split in summary for split in SPLITS)


@pytest.mark.parametrize("name", TASKS)
def test_task_data_are_a_function_of_the_seed(name, tmp_path):
    cfg, first = make_task(name, tmp_path)
    _, again = make_task(name, tmp_path, cache="again")  # made afresh, not read back
    a, b = all_arrays(first), all_arrays(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed, other data"
    if "seed" not in cfg.task:
        pytest.skip(f"{name} has no task.seed: its data are the release as it is")
    _, other = make_task(name, tmp_path, f"task.seed={cfg.task.seed + 1}", cache="other")
    c = all_arrays(other)
    assert any(a[k].shape != c[k].shape or not torch.equal(a[k], c[k]) for k in a), \
        f"{name}: task.seed={cfg.task.seed + 1} gives the same data as task.seed={cfg.task.seed}"


class FixedTask:
    """A task over given arrays, to show that the checks above catch what they must."""

    def __init__(self, spec: TaskSpec, arrays: dict[str, torch.Tensor]):
        self.spec, self.arrays = spec, arrays

    def dataset(self, split: str, *, seq_len: int | None = None) -> ArrayDataset:
        return ArrayDataset(self.arrays)

    def describe(self) -> str:
        return "fixed"


BROKEN = {
    # the example: token 2 in a task that declares vocab_size=2
    "vocab_size": FixedTask(TaskSpec(kind="lm", vocab_size=2, n_outputs=2, seq_len=3),
                            {"tokens": torch.tensor([[0, 1, 2]]), "targets": torch.tensor([[1, 0, 1]])}),
    "n_outputs": FixedTask(TaskSpec(kind="classify", vocab_size=5, n_outputs=2, seq_len=3),
                           {"tokens": torch.tensor([[1, 2, 0]]), "label": torch.tensor([2])}),
    "padding must be on the right": FixedTask(
        TaskSpec(kind="classify", vocab_size=5, n_outputs=2, seq_len=3),
        {"tokens": torch.tensor([[0, 1, 2]]), "label": torch.tensor([1])}),
    "not integers": FixedTask(TaskSpec(kind="classify", vocab_size=5, n_outputs=2, seq_len=3),
                       {"tokens": torch.tensor([[1.0, 2.0, 0.0]]), "label": torch.tensor([1])}),
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_checks_catch_broken_data(rule):
    task = BROKEN[rule]
    assert isinstance(task, Task)
    with pytest.raises(AssertionError, match=rule):
        check_data(task.spec, task.dataset("train"))


def test_checks_catch_a_real_task_whose_tokens_reach_vocab_size(tmp_path):
    _, task = make_task("copying", tmp_path)
    check_data(task.spec, task.dataset("train"))
    narrower = replace(task.spec, vocab_size=task.spec.vocab_size - 1)  # the delimiter falls outside
    with pytest.raises(AssertionError, match="vocab_size"):
        check_data(narrower, task.dataset("train"))
