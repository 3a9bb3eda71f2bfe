"""Synthetic long-range tasks and char_lm: generator properties, determinism, caching, errors,
and that every task builds with a model and gives logits of the right shape."""

from __future__ import annotations

import pytest
import torch

from tasks.base import IGNORE_INDEX, ArrayDataset
from tasks.char_lm import CharLM, generate_corpus, split_stream, windows
from tasks.copying import Copying, generate_copying
from tasks.induction_heads import InductionHeads, generate_induction_heads
from tasks.mqar import MQAR
from tasks.reverse import BOS_ID, EOS_ID, PAD_ID, SEP_ID, Reverse, generate_reverse
from tasks.selective_copying import SelectiveCopying, generate_selective_copying

SMALL = dict(n_train=32, n_val=8, n_test=8, seed=0)

GENERATORS = {
    "copying": lambda seed: generate_copying(16, vocab_size=10, n_tokens=4, seq_len=20, seed=seed),
    "selective_copying": lambda seed: generate_selective_copying(
        16, vocab_size=16, n_tokens=4, seq_len=24, seed=seed),
    "induction_heads": lambda seed: generate_induction_heads(16, vocab_size=16, seq_len=24, seed=seed),
    "reverse": lambda seed: generate_reverse(16, vocab_size=12, min_len=2, seq_len=9, seed=seed),
}


def test_copying_targets():
    V, M, L = 10, 4, 20
    d = generate_copying(64, vocab_size=V, n_tokens=M, seq_len=L, seed=1)
    tokens, targets = d["tokens"].long(), d["targets"].long()
    data = tokens[:, :M]
    assert ((data >= 1) & (data <= V - 2)).all()
    assert (tokens[:, L - M - 1] == V - 1).all()  # delimiter right before the answer slots
    rest = torch.cat([tokens[:, M:L - M - 1], tokens[:, L - M:]], dim=1)
    assert (rest == 0).all()
    assert torch.equal(targets[:, L - M:], data)
    assert (targets[:, :L - M] == IGNORE_INDEX).all()


def test_copying_docstring_example_layout():
    d = generate_copying(1, vocab_size=10, n_tokens=3, seq_len=10, seed=0)
    tokens, targets = d["tokens"][0].tolist(), d["targets"][0].tolist()
    assert tokens[3:] == [0, 0, 0, 9, 0, 0, 0]
    assert targets[:7] == [IGNORE_INDEX] * 7 and targets[7:] == tokens[:3]


def test_selective_copying_answers_recomputed():
    V, M, L = 16, 5, 40
    d = generate_selective_copying(64, vocab_size=V, n_tokens=M, seq_len=L, seed=3)
    spreads = set()
    for tokens, targets in zip(d["tokens"].tolist(), d["targets"].tolist()):
        context, markers = tokens[:L - M], tokens[L - M:]
        data = [t for t in context if t != 0]  # the non-noise tokens, in order of position
        assert len(data) == M and all(1 <= t <= V - 2 for t in data)
        assert markers == [V - 1] * M
        assert targets[L - M:] == data
        assert targets[:L - M] == [IGNORE_INDEX] * (L - M)
        spreads.add(tuple(i for i, t in enumerate(context) if t != 0))
    assert len(spreads) > 50  # positions really vary per example (selective, not fixed)


def test_induction_heads_answers_recomputed():
    V, L = 16, 30
    d = generate_induction_heads(200, vocab_size=V, seq_len=L, seed=5)
    firsts = set()
    for tokens, targets in zip(d["tokens"].tolist(), d["targets"].tolist()):
        trigger_positions = [i for i, t in enumerate(tokens) if t == V - 1]
        assert len(trigger_positions) == 2 and trigger_positions[1] == L - 1
        first = trigger_positions[0]
        assert first <= L - 3
        assert all(1 <= t <= V - 2 for i, t in enumerate(tokens) if i not in trigger_positions)
        assert targets[-1] == tokens[first + 1]
        assert targets[:-1] == [IGNORE_INDEX] * (L - 1)
        firsts.add(first)
    assert min(firsts) == 0 and max(firsts) == L - 3  # the whole range is reachable


def test_induction_heads_other_lengths(tmp_path):
    task = InductionHeads(vocab_size=8, seq_len=16, eval_seq_lens=[16, 64], cache_dir=tmp_path, **SMALL)
    assert task.spec.eval_seq_lens == (16, 64)
    base = task.dataset("test")
    assert torch.equal(task.dataset("test", seq_len=16).arrays["tokens"], base.arrays["tokens"])
    long = task.dataset("test", seq_len=64)
    tokens, targets = long.arrays["tokens"].long(), long.arrays["targets"].long()
    assert tokens.shape == (SMALL["n_test"], 64)
    first = (tokens[:, :-1] == 7).long().argmax(1)
    assert torch.equal(targets[:, -1], tokens[torch.arange(len(tokens)), first + 1])
    again = InductionHeads(vocab_size=8, seq_len=16, eval_seq_lens=[64], cache_dir=tmp_path, **SMALL)
    assert torch.equal(again.dataset("test", seq_len=64).arrays["tokens"], long.arrays["tokens"])
    with pytest.raises(KeyError, match="split"):
        task.dataset("dev")


def test_every_generated_task_draws_other_lengths(tmp_path):
    """Not only induction heads: any generated task draws a split at another length, with the
    split's own seed and size, cached like the rest."""
    def make() -> MQAR:
        return MQAR(vocab_size=32, seq_len=32, n_pairs=4, power_a=0.01, cache_dir=tmp_path, **SMALL)

    task = make()
    long = task.dataset("test", seq_len=64).arrays
    assert long["tokens"].shape == (SMALL["n_test"], 64)
    assert int((long["targets"] != IGNORE_INDEX).sum(1).min()) == 4  # every key asked again
    assert torch.equal(make().dataset("test", seq_len=64).arrays["tokens"], long["tokens"])
    assert task.dataset("test").arrays["tokens"].shape == (SMALL["n_test"], 32)
    with pytest.raises(ValueError, match="task.seq_len"):
        task.dataset("test", seq_len=12)  # too short for 4 pairs: the generator's own check


def test_char_lm_windows_at_other_lengths(tmp_path):
    task = CharLM(source="generate", path=None, seq_len=16, n_bytes=4000, seed=0, cache_dir=tmp_path)
    short, long = task.dataset("val").arrays, task.dataset("val", seq_len=64).arrays
    assert long["tokens"].shape[1] == 64
    assert torch.equal(long["tokens"].flatten(), short["tokens"].flatten()[: long["tokens"].numel()])
    with pytest.raises(ValueError, match="200 bytes"):
        task.dataset("val", seq_len=400)  # the 5% split of 4000 bytes holds no window of 401


def test_indexing_returns_int64_and_keeps_storage_compact():
    ds = ArrayDataset({"tokens": torch.tensor([[1, 2], [3, 4]], dtype=torch.int16),
                       "bytes": torch.tensor([[5], [6]], dtype=torch.uint8),
                       "weight": torch.tensor([0.5, 1.5])})
    batch = ds[[1, 0]]
    assert batch["tokens"].dtype == batch["bytes"].dtype == torch.int64
    assert batch["tokens"].tolist() == [[3, 4], [1, 2]] and batch["bytes"].tolist() == [[6], [5]]
    assert batch["weight"].dtype == torch.float32  # only integers are widened
    assert ds[0]["tokens"].dtype == torch.int64
    assert ds.arrays["tokens"].dtype == torch.int16 and ds.arrays["bytes"].dtype == torch.uint8


def test_reverse_targets():
    V, lo, hi = 12, 2, 9
    d = generate_reverse(200, vocab_size=V, min_len=lo, seq_len=hi, seed=2)
    assert d["source"].shape == (200, hi) and d["target"].shape == (200, hi + 1)
    lengths = set()
    for source, target, n in zip(d["source"].tolist(), d["target"].tolist(), d["length"].tolist()):
        assert lo <= n <= hi
        assert all(4 <= t < V for t in source[:n]) and source[n:] == [PAD_ID] * (hi - n)
        assert target[:n] == source[:n][::-1]
        assert target[n] == EOS_ID and target[n + 1:] == [PAD_ID] * (hi - n)
        lengths.add(n)
    assert lengths == set(range(lo, hi + 1))


def test_reverse_spec():
    spec = Reverse(vocab_size=12, min_len=1, seq_len=9, **SMALL).spec
    assert (spec.kind, spec.n_outputs, spec.seq_len, spec.target_len) == ("seq2seq", 12, 9, 10)
    assert (spec.pad_id, spec.bos_id, spec.sep_id) == (PAD_ID, BOS_ID, SEP_ID)


def test_char_lm_windows_shift_by_one():
    stream = torch.arange(23, dtype=torch.uint8)
    w = windows(stream, 5)
    tokens, targets = w["tokens"].long(), w["targets"].long()
    assert tokens.shape == (4, 5)  # (23 - 1) // 5 windows; the 2-byte tail is dropped
    assert torch.equal(targets, tokens + 1)
    assert torch.equal(tokens.flatten(), torch.arange(20))  # every byte but the first is a target once


def test_char_lm_file_split_and_targets(tmp_path):
    data = bytes(range(256)) * 8  # 2048 bytes
    path = tmp_path / "bytes.bin"
    path.write_bytes(data)
    task = CharLM(source="file", path=str(path), seq_len=16, n_bytes=0, seed=0)
    assert task.spec.metric == "bpc" and task.spec.vocab_size == 256
    n_train, n_val = 2048 * 90 // 100, 2048 * 5 // 100
    train, val = task.dataset("train").arrays, task.dataset("val").arrays
    assert torch.equal(train["tokens"][0].long(), torch.tensor(list(data[:16])))
    assert torch.equal(train["targets"].long()[:, :-1], train["tokens"].long()[:, 1:])
    assert torch.equal(train["targets"].long()[:-1, -1], train["tokens"].long()[1:, 0])
    assert len(train["tokens"]) == (n_train - 1) // 16
    assert torch.equal(val["tokens"][0].long(), torch.tensor(list(data[n_train:n_train + 16])))
    assert sum(len(s) for s in split_stream(torch.arange(2048)).values()) == 2048


def test_char_lm_errors(tmp_path):
    missing = tmp_path / "nowhere" / "enwik8"
    with pytest.raises(FileNotFoundError, match="enwik8") as err:
        CharLM(source="file", path=str(missing), seq_len=16, n_bytes=0, seed=0).dataset("train")
    assert str(missing) in str(err.value) and "task.path" in str(err.value)
    with pytest.raises(ValueError, match="task.path"):
        CharLM(source="file", path=None, seq_len=16, n_bytes=0, seed=0)
    with pytest.raises(ValueError, match="task.source"):
        CharLM(source="wiki", path=None, seq_len=16, n_bytes=0, seed=0)
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="task.seq_len"):
        CharLM(source="file", path=str(small), seq_len=16, n_bytes=0, seed=0).dataset("train")


def test_generated_corpus():
    a, b = generate_corpus(20000, seed=0), generate_corpus(20000, seed=1)
    assert len(a) == 20000 and a == generate_corpus(20000, seed=0) and a != b
    assert a.decode("ascii").startswith("= ")
    title = a.decode().split("\n")[0].strip("= ")  # the first article's title entity ...
    first_article = a.decode().split("\n= ")[0]
    assert first_article.count(title) >= 3  # ... recurs through its article (long-range cue)


def test_config_errors():
    with pytest.raises(ValueError, match="task.seq_len"):
        Copying(vocab_size=10, n_tokens=10, seq_len=20, **SMALL)
    with pytest.raises(ValueError, match="task.seq_len"):
        SelectiveCopying(vocab_size=16, n_tokens=16, seq_len=31, **SMALL)
    with pytest.raises(ValueError, match="task.vocab_size"):
        Reverse(vocab_size=4, min_len=1, seq_len=5, **SMALL)
    with pytest.raises(ValueError, match="task.min_len"):
        Reverse(vocab_size=10, min_len=6, seq_len=5, **SMALL)
    with pytest.raises(ValueError, match="task.vocab_size=8"):
        MQAR(vocab_size=8, seq_len=64, n_pairs=4, power_a=0.01, **SMALL)  # 3 keys for 4 pairs
    with pytest.raises(ValueError, match="task.seq_len"):
        MQAR(vocab_size=64, seq_len=12, n_pairs=4, power_a=0.01, **SMALL)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_in_seed(name):
    make = GENERATORS[name]
    a, b, c = make(0), make(0), make(1)
    assert a.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], c[next(iter(c))])


def test_splits_differ_and_cache_round_trip(tmp_path, monkeypatch):
    task = Copying(vocab_size=10, n_tokens=4, seq_len=20, cache_dir=tmp_path, **SMALL)
    train, test = task.dataset("train").arrays, task.dataset("test").arrays
    assert not torch.equal(train["tokens"][:8], test["tokens"])
    assert len(list(tmp_path.glob("copying-*.pt"))) == 1
    again = Copying(vocab_size=10, n_tokens=4, seq_len=20, cache_dir=tmp_path, **SMALL)

    def fail(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(Copying, "generator", staticmethod(fail))
    assert torch.equal(again.dataset("train").arrays["tokens"], train["tokens"])
    other_seed = Copying(vocab_size=10, n_tokens=4, seq_len=20, cache_dir=tmp_path,
                         **{**SMALL, "seed": 1})
    with pytest.raises(AssertionError, match="cache"):
        other_seed.dataset("train")  # a new seed is a new cache key: it must generate


def test_char_lm_corpus_cached(tmp_path):
    task = CharLM(source="generate", path=None, seq_len=32, n_bytes=5000, seed=0, cache_dir=tmp_path)
    tokens = task.dataset("train").arrays["tokens"]
    assert len(list(tmp_path.glob("char_lm-corpus-*.pt"))) == 1
    again = CharLM(source="generate", path=None, seq_len=32, n_bytes=5000, seed=0, cache_dir=tmp_path)
    assert torch.equal(again.dataset("train").arrays["tokens"], tokens)
    assert bytes(tokens[0].tolist()) == generate_corpus(5000, seed=0)[:32]


BUILD = {
    "copying": ["task.seq_len=24", "task.n_tokens=4"],
    "selective_copying": ["task.seq_len=32", "task.n_tokens=4"],
    "induction_heads": ["task.seq_len=16", "task.eval_seq_lens=[32]"],
    "reverse": ["task.seq_len=8"],
    "char_lm": ["task.seq_len=32", "task.n_bytes=4000"],
}


@pytest.mark.parametrize("name", sorted(BUILD))
def test_builds_with_transformer(name, tmp_path):
    from harness.api import build

    sizes = [] if name == "char_lm" else ["task.n_train=8", "task.n_val=4", "task.n_test=4"]
    built = build(["model=transformer", f"task={name}", f"task.cache_dir={tmp_path}", *sizes,
                   *BUILD[name]])
    task, spec = built.task, built.task.spec
    batch = task.dataset("train")[[0, 1, 2]]  # int64 from indexing: no cast needed
    logits = built.model(batch)
    if spec.kind == "seq2seq":
        assert logits.shape == (3, spec.target_len, spec.n_outputs)
        assert batch["source"].shape == (3, spec.seq_len)
    else:
        assert logits.shape == (3, spec.seq_len, spec.n_outputs)
    for length in spec.eval_seq_lens:
        long = task.dataset("test", seq_len=length)[[0, 1]]
        assert built.model(long).shape == (2, length, spec.n_outputs)
    summary = task.describe()
    assert name in summary and all(split in summary for split in ("train", "val", "test"))
