"""The task contract: what every task exposes to models and to the harness.

A task is a plain object with

* ``spec``: a :class:`TaskSpec` (kind, vocabulary, classes, length, pad id, metric), and
* ``dataset(split)``: an :class:`ArrayDataset` for ``split`` in ``train``, ``val``, ``test``.

Batches are dicts of tensors whose keys depend on the task kind:

========== ================================================================================
kind       batch keys (B = batch, L = seq_len)
========== ================================================================================
classify   ``tokens`` (B, L), ``label`` (B,)
pair       ``tokens`` (B, L), ``tokens2`` (B, L), ``label`` (B,)
lm         ``tokens`` (B, L), ``targets`` (B, L) with ``IGNORE_INDEX`` where nothing is asked
seq2seq    ``source`` (B, Ls), ``target`` (B, Lt); both padded with ``pad_id``
========== ================================================================================

Tokens are stored in the smallest integer dtype that holds the vocabulary; the harness casts
them to ``long`` on the device. Padding is always ``spec.pad_id`` and always on the right.

For ``seq2seq`` the target vocabulary is ``spec.n_outputs``. Target position 0 is the first
real output token (no BOS stored); native encoder-decoders prepend ``spec.bos_id`` themselves,
and decoder-only models read ``source + [sep_id] + target[:-1]`` as a prefix language model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
KINDS = ("classify", "pair", "lm", "seq2seq")
Kind = Literal["classify", "pair", "lm", "seq2seq"]


@dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about a task to build its embedding and head.

    Attributes:
        kind: one of ``classify``, ``pair``, ``lm``, ``seq2seq``.
        vocab_size: number of input token ids, pad and special tokens included.
        n_outputs: classes for ``classify``/``pair``; output vocabulary for ``lm``/``seq2seq``.
        seq_len: maximum input length (for ``seq2seq``: of the source).
        pad_id: the padding token id (inputs only; targets use ``IGNORE_INDEX``).
        metric: ``accuracy`` (higher is better) or ``bpc`` (bits per character, lower is better).
        target_len: ``seq2seq`` only: maximum target length.
        bos_id: ``seq2seq`` only: the start-of-target id in the output vocabulary.
        sep_id: ``seq2seq`` only: separator id in the input vocabulary for prefix-LM models.
        eval_seq_lens: extra lengths evaluated at test time (length extrapolation), if any.
    """

    kind: Kind
    vocab_size: int
    n_outputs: int
    seq_len: int
    pad_id: int = 0
    metric: str = "accuracy"
    target_len: int | None = None
    bos_id: int | None = None
    sep_id: int | None = None
    eval_seq_lens: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "seq2seq" and (self.target_len is None or self.bos_id is None):
            raise ValueError("a seq2seq task must set target_len and bos_id")

    @property
    def causal(self) -> bool:
        """Whether models must not look ahead (language modelling and prefix-LM seq2seq)."""
        return self.kind in ("lm", "seq2seq")

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "bpc"


class ArrayDataset(torch.utils.data.Dataset):
    """Examples held as a dict of equally long tensors, indexable by int or by index tensor.

    Indexing with a list or tensor of indices returns a whole batch at once, so a
    ``DataLoader(ds, sampler=BatchSampler(...), batch_size=None)`` never collates one by one.
    """

    def __init__(self, arrays: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all arrays of a dataset must have the same length, got {lengths}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        return {k: v[index] for k, v in self.arrays.items()}


def smallest_int_dtype(max_value: int) -> torch.dtype:
    """The smallest signed integer dtype that holds ``max_value`` and ``IGNORE_INDEX``."""
    for dtype in (torch.int16, torch.int32):
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def default_cache_dir() -> Path:
    """Where generated data is cached: ``$SEQ_ARENA_CACHE`` or ``results/cache``."""
    return Path(os.environ.get("SEQ_ARENA_CACHE", "results/cache"))


def cache_key(name: str, params: dict) -> str:
    """A short stable hash of a generator's name and parameters (seed included)."""
    blob = json.dumps({"name": name, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_splits(
    name: str,
    params: dict,
    build: Callable[[], dict[str, dict[str, torch.Tensor]]],
    cache_dir: str | Path | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Return ``build()``'s splits, generated once and cached on disk keyed by ``params``.

    The file is written to a temporary name and renamed, so an interrupted generation never
    leaves a half-written cache behind. Loading uses ``weights_only=True``.

    Args:
        name: the task name (part of the file name, for humans).
        params: every parameter the data depends on, seed included.
        build: makes ``{"train": arrays, "val": arrays, "test": arrays}``.
        cache_dir: directory for the cache; ``None`` means :func:`default_cache_dir`.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-{cache_key(name, params)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    splits = build()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(splits, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return splits


def random_batch(spec: TaskSpec, batch_size: int, *, seed: int = 0, seq_len: int | None = None,
                 padded: bool = False) -> dict[str, torch.Tensor]:
    """A batch of random tokens with the shapes and keys of ``spec``'s kind (long tensors).

    Used by benchmarks (speed does not depend on the data) and by tests. With ``padded=True``,
    classify/pair/seq2seq examples get random real lengths, right-padded with ``pad_id``.
    """
    g = torch.Generator().manual_seed(seed)
    L = seq_len or spec.seq_len
    low = 1 if spec.pad_id == 0 else 0

    def tokens(length: int) -> torch.Tensor:
        x = torch.randint(low, spec.vocab_size, (batch_size, length), generator=g)
        x[x == spec.pad_id] = low  # never draw the pad id as a real token
        if padded:
            real = torch.randint(max(1, length // 2), length + 1, (batch_size,), generator=g)
            x[torch.arange(length)[None, :] >= real[:, None]] = spec.pad_id
        return x

    if spec.kind == "lm":
        return {"tokens": tokens(L), "targets": torch.randint(0, spec.n_outputs, (batch_size, L), generator=g)}
    if spec.kind == "classify":
        return {"tokens": tokens(L), "label": torch.randint(0, spec.n_outputs, (batch_size,), generator=g)}
    if spec.kind == "pair":
        return {"tokens": tokens(L), "tokens2": tokens(L),
                "label": torch.randint(0, spec.n_outputs, (batch_size,), generator=g)}
    return {"source": tokens(L), "target": tokens(spec.target_len)}


def describe_lm_splits(header: list[str], splits: dict[str, dict[str, torch.Tensor]]) -> str:
    """A short summary of ``lm`` splits: examples, lengths, scored positions, answer balance.

    Shared by the synthetic ``lm`` tasks (copying, selective copying, induction heads, MQAR).
    """
    lines = list(header)
    for split, arrays in splits.items():
        tokens, targets = arrays["tokens"], arrays["targets"]
        N, L = tokens.shape
        scored = targets[targets != IGNORE_INDEX].long()
        counts = torch.bincount(scored)
        counts = counts[counts > 0]
        share = counts.double() / max(scored.numel(), 1)
        balance = (
            f"{len(counts)} answer ids, share min {share.min():.1%} max {share.max():.1%}"
            if scored.numel() else "no scored positions"
        )
        lines.append(
            f"  {split}: {N} examples x {L} tokens, {scored.numel() / max(N, 1):.1f} scored per "
            f"example; {balance}"
        )
    return "\n".join(lines)


def generated_splits(name: str, params: dict, generate: Callable, cache_dir, **knobs) -> dict[str, dict[str, torch.Tensor]]:
    """Train/val/test drawn by ``generate(n, **knobs, seed=...)``, each split with its own seed
    (``seed * 3 + split index``), cached by :func:`cached_splits` keyed on ``params``."""
    def build() -> dict[str, dict[str, torch.Tensor]]:
        return {split: generate(params[f"n_{split}"], **knobs, seed=params["seed"] * 3 + i)
                for i, split in enumerate(SPLITS)}

    return cached_splits(name, params, build, cache_dir)
