"""The task contract: what every task exposes to models and to the harness.

A task is any object that satisfies the :class:`Task` protocol:

* ``spec``: a :class:`TaskSpec` (kind, vocabulary, classes, length, pad id, metric);
* ``dataset(split, *, seq_len=None)``: an :class:`ArrayDataset` for ``split`` in ``train``,
  ``val``, ``test``. ``seq_len=None`` (or ``spec.seq_len``) gives the data at the task's own
  length; another length is drawn afresh by generated tasks (length extrapolation, the lengths
  of ``spec.eval_seq_lens``) and refused with a ``ValueError`` by tasks read from files. A split
  outside ``SPLITS`` raises ``KeyError``. Loading happens on the first call, never in the
  constructor, so that building a task for a config check costs nothing;
* ``describe()``: a few lines for a human: where the data come from, examples and lengths per
  split, label or answer balance, chance level where it is known.

Tasks are plain classes built by Hydra from ``conf/task/<name>.yaml``; they need not inherit from
anything. Generated tasks share :class:`GeneratedTask` (seeds per split, the disk cache, other
lengths); tasks read from files in a published format share :class:`tasks.lra_io.FileTask`.

Batches are dicts of tensors whose keys depend on the task kind:

========== ================================================================================
kind       batch keys (B = batch, L = seq_len)
========== ================================================================================
classify   ``tokens`` (B, L), ``label`` (B,)
pair       ``tokens`` (B, L), ``tokens2`` (B, L), ``label`` (B,)
lm         ``tokens`` (B, L), ``targets`` (B, L) with ``IGNORE_INDEX`` where nothing is asked
seq2seq    ``source`` (B, Ls), ``target`` (B, Lt); both padded with ``pad_id``
========== ================================================================================

A task may add keys that models ignore (``reverse`` stores each source ``length`` for reports).
Token ids lie in ``[0, spec.vocab_size)``; labels and targets in ``[0, spec.n_outputs)``, or
``IGNORE_INDEX`` for ``lm`` targets. Arrays are stored in the smallest integer dtype that holds
them; indexing a dataset returns int64 tensors, ready for an embedding. Padding is always
``spec.pad_id`` and always on the right (``lm`` batches are never padded).

For ``seq2seq`` the target vocabulary is ``spec.n_outputs``. Target position 0 is the first
real output token (no BOS stored); native encoder-decoders prepend ``spec.bos_id`` themselves,
and decoder-only models read ``source + [sep_id] + target[:-1]`` as a prefix language model.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
KINDS = ("classify", "pair", "lm", "seq2seq")
Kind = Literal["classify", "pair", "lm", "seq2seq"]
Arrays = dict[str, torch.Tensor]  # one split: equally long tensors by batch key


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
    ``arrays`` keep their compact stored dtypes; what indexing returns is int64 for every
    integer array, because embeddings and losses take nothing narrower, so a batch goes straight
    into a model: ``model(task.dataset("train")[[0, 1]])``.
    """

    def __init__(self, arrays: Arrays):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all arrays of a dataset must have the same length, got {lengths}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index) -> Arrays:
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        return {k: as_int64(v[index]) for k, v in self.arrays.items()}


def as_int64(x: torch.Tensor) -> torch.Tensor:
    """``x`` as int64 when it holds integers (any width, signed or not), else unchanged."""
    dtype = x.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return x
    return x.long()


@runtime_checkable
class Task(Protocol):
    """What every task provides (see the module docstring for the rules on its data).

    Attributes:
        spec: what a model needs to build its embedding and head.
    """

    spec: TaskSpec

    def dataset(self, split: str, *, seq_len: int | None = None) -> ArrayDataset:
        """The examples of ``split`` (train, val or test), at ``spec.seq_len`` or at ``seq_len``."""
        ...

    def describe(self) -> str:
        """A short multi-line summary of the data for a human."""
        ...


def check_split(task: str, split: str) -> None:
    """Raise a KeyError naming the task when ``split`` is not one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise KeyError(f"{task}: split must be one of {SPLITS}, got {split!r}")


def smallest_int_dtype(max_value: int) -> torch.dtype:
    """The smallest signed integer dtype that holds ``max_value`` and ``IGNORE_INDEX``."""
    for dtype in (torch.int16, torch.int32):
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class DiskFull(OSError):
    """A write failed because the file system holding ``path`` has no room left."""


def file_mode(*, folder: bool = False) -> int:
    """The permission bits a plain ``open()`` (or ``mkdir``) would give a new file (folder) under
    this process's umask: 0644 (0755) under the usual 022, so that colleagues on a shared disk can
    read what a run wrote."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def temp_name(path: Path) -> str:
    """The prefix of a temporary file for ``path``: it names the host and process that write it,
    so a later writer can tell a dead writer's leftover from a live writer's file."""
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


STALE_TEMP_S = 24 * 3600  # another host's temporary file older than this is a leftover


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders (``.<name>.<host>-<pid>.<random>.tmp``) that a
    killed write left in ``folder``: those of this host whose process is gone, and any older than
    a day. A live writer's files are left alone. Returns what was removed."""
    removed = []
    marker = f".{socket.gethostname()}-"  # this host's writers: .<name>.<host>-<pid>.<random>.tmp
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            age = time.time() - tmp.lstat().st_mtime
        except FileNotFoundError:
            continue  # its writer finished meanwhile
        _, found, rest = tmp.name.rpartition(marker)
        pid = rest.split(".", 1)[0]
        dead = bool(found) and pid.isdigit() and not process_alive(int(pid))
        if dead or age > STALE_TEMP_S:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def disk_full_error(path: Path, exc: BaseException) -> DiskFull | None:
    """A :class:`DiskFull` naming ``path`` when ``exc`` came from a full file system (errno
    ENOSPC, or a library's own words for a short write while the disk has no room left)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        full = True
    else:
        try:
            full = shutil.disk_usage(path.parent).free < 1 << 20
        except OSError:
            full = False
    if not full:
        return None
    return DiskFull(errno.ENOSPC, f"no space left on the device holding {path.parent} while writing "
                                  f"{path.name} (free some space, or point the output elsewhere)", str(path))


def release_frames(exc: BaseException) -> None:
    """Drop the frames of a failed write (and of the errors it chained): they hold the writer's open
    file, and while it stays open the space of the removed temporary file is not given back, so
    the record that follows a full disk would find it full too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    gc.collect()


def smallest_token_dtype(max_value: int) -> torch.dtype:
    """The smallest dtype that stores ids ``0..max_value``: uint8 up to 255 (pixels, ListOps'
    16 ids, class labels), else :func:`smallest_int_dtype` (byte tasks: byte + 1 reaches 256).

    Only for arrays that never hold ``IGNORE_INDEX`` (inputs and class labels, not ``lm`` targets).
    """
    return torch.uint8 if 0 <= max_value <= torch.iinfo(torch.uint8).max else smallest_int_dtype(max_value)


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str = "it", **kwargs):
    """A tqdm bar (counts, rate, ETA) for work that takes more than a few seconds: generating,
    reading and tokenising data. On stderr, refreshed at most once a second, and switched off when
    stderr is not a terminal (a batch job's output file gets the log line before it instead)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=1.0, dynamic_ncols=True,
                disable=None, **kwargs)


def stored_bytes(splits: dict[str, dict[str, torch.Tensor]]) -> int:
    """Bytes of every array of ``splits``: what the cache file holds, give or take a few KB."""
    return sum(t.numel() * t.element_size() for arrays in splits.values() for t in arrays.values())


def describe_storage(splits: dict[str, dict[str, torch.Tensor]]) -> str:
    """One line for ``describe()``: the stored dtypes and the size of the cached arrays."""
    first = next(iter(splits.values()), {})
    dtypes = ", ".join(f"{k} {str(v.dtype).removeprefix('torch.')}" for k, v in first.items())
    return f"  stored as {dtypes}; {format_bytes(stored_bytes(splits))} in memory and in the cache file"


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def raise_if_disk_full(path: Path, exc: BaseException) -> None:
    """Raise :class:`DiskFull` naming ``path`` in place of ``exc`` when the disk is full."""
    full = disk_full_error(path, exc)
    if full is not None:
        release_frames(exc)
        raise full from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create ``path`` through ``write(tmp)`` on a temporary file beside it, then a rename.

    A reader, or a ``kill -9`` at any moment, sees the old file or the complete new one, never
    half of one; the temporary file is removed when ``write`` fails, and the leftovers of killed
    writers in the same folder are removed first (:func:`remove_stale_temps`). The file gets the
    permissions of the process's umask, as a plain ``open()`` would give it. A full disk raises
    :class:`DiskFull` naming the file. The one implementation of atomic writes: task caches use
    it, and so do run records and checkpoints (harness.records).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path), suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())  # mkstemp made it 0600
        os.replace(tmp, path)
    except Exception as exc:
        raise_if_disk_full(path, exc)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create the folder ``path`` through ``write(tmp)`` on a temporary folder beside it, then a
    rename: :func:`atomic_write` for data sets of many files (generated TSVs, images).

    When another process has created ``path`` meanwhile, its folder is kept and this one dropped:
    it is complete, having been renamed into place in the same way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_name(path), suffix=".tmp"))
    try:
        write(tmp)
        os.chmod(tmp, file_mode(folder=True))  # mkdtemp made it 0700
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.exists():
                raise
    except Exception as exc:
        raise_if_disk_full(path, exc)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


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
        try:
            splits = torch.load(path, weights_only=True)
            check_cached_splits(splits)
            return splits
        except Exception as exc:  # noqa: BLE001 - truncated, garbage or foreign: rebuild it
            aside = set_aside(path)
            log.warning("%s: unreadable data cache (%s: %s); moved to %s and generated again",
                        path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", aside.name)
    log.info("%s: building the data once into %s", name, path)
    splits = build()
    atomic_write(path, lambda tmp: torch.save(splits, tmp))
    log.info("%s: cached %s in %s", name, format_bytes(path.stat().st_size), path)
    return splits


def check_cached_splits(splits) -> None:
    """Raise ValueError unless ``splits`` is ``{split: {key: tensor}}`` with equally long tensors."""
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"expected a dict of splits, found {type(splits).__name__}")
    for split, arrays in splits.items():
        if not isinstance(arrays, dict) or not all(isinstance(v, torch.Tensor) for v in arrays.values()):
            raise ValueError(f"split {split!r} is not a dict of tensors")
        if len({len(v) for v in arrays.values()}) > 1:
            raise ValueError(f"split {split!r} has arrays of different lengths")


def set_aside(path: str | Path) -> Path:
    """Rename a bad file to ``<name>.corrupt-<UTC time>`` beside it, so that the next run starts
    afresh while the file stays there for a human to look at. Returns the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, aside)
    return aside


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
    lines.append(describe_storage(splits))
    return "\n".join(lines)


class GeneratedTask:
    """The shared part of tasks drawn by a generator: each such task is its generator plus its spec.

    A subclass sets ``name`` (as in ``conf/task/<name>.yaml``), checks its knobs, builds its
    :class:`TaskSpec` and passes both with its generator to ``__init__``; it supplies
    :meth:`headline` and may replace :meth:`describe` (the default suits ``lm`` tasks).

    The data are a pure function of the knobs, the split sizes and ``seed``: split ``i`` of
    :data:`SPLITS` is drawn by ``generate(n_<split>, **knobs, seed=seed * 3 + i)``, so the
    test set does not change when ``n_train`` does, and all three are cached on disk in one file
    keyed by every parameter. ``dataset(split, seq_len=L)`` draws the split at another length
    with the split's own seed and size (its own cache file), so a test set at length 1024 is as
    reproducible as the one at the training length.

    Args:
        spec: the task's spec.
        generate: ``generate(n_examples, **knobs, seed=...) -> arrays`` with the batch keys of
            ``spec.kind``.
        knobs: the generator's parameters; must hold ``seq_len``, which other lengths replace.
        n_train, n_val, n_test: examples per split.
        seed: data seed; the data are a pure function of the knobs, the sizes and this seed.
        cache_dir: where generated data are cached (``None``: ``$SEQ_ARENA_CACHE`` or
            ``results/cache``).
    """

    name: str

    def __init__(self, spec: TaskSpec, generate: Callable[..., Arrays], knobs: dict, *, n_train: int,
                 n_val: int, n_test: int, seed: int, cache_dir: str | Path | None):
        self.spec = spec
        self.generate = generate
        self.knobs = knobs
        self.sizes = dict(train=n_train, val=n_val, test=n_test)
        self.seed = seed
        self.cache_dir = cache_dir
        self._splits: dict[str, Arrays] | None = None
        self._other_lengths: dict[tuple[str, int], Arrays] = {}

    @property
    def params(self) -> dict:
        """Everything the data depend on: the cache key."""
        sizes = {f"n_{split}": n for split, n in self.sizes.items()}
        return {**self.knobs, **sizes, "seed": self.seed}

    def split_seed(self, split: str) -> int:
        return self.seed * 3 + SPLITS.index(split)

    def draw(self, split: str, seq_len: int) -> Arrays:
        """Split ``split`` drawn afresh at ``seq_len`` tokens (no cache)."""
        knobs = {**self.knobs, "seq_len": seq_len}
        return self.generate(self.sizes[split], **knobs, seed=self.split_seed(split))

    def splits(self) -> dict[str, Arrays]:
        """The three splits at the task's length, from the cache or generated once."""
        if self._splits is None:
            self._splits = cached_splits(
                self.name, self.params, lambda: {s: self.draw(s, self.spec.seq_len) for s in SPLITS},
                self.cache_dir,
            )
        return self._splits

    def dataset(self, split: str, *, seq_len: int | None = None) -> ArrayDataset:
        """The examples of ``split``, at the task's length or drawn at ``seq_len`` tokens."""
        check_split(self.name, split)
        if seq_len is None or seq_len == self.spec.seq_len:
            return ArrayDataset(self.splits()[split])
        length = int(seq_len)
        if (split, length) not in self._other_lengths:
            params = {**self.params, "seq_len": length, "split": split}
            drawn = cached_splits(self.name, params, lambda: {split: self.draw(split, length)}, self.cache_dir)
            self._other_lengths[split, length] = drawn[split]
        return ArrayDataset(self._other_lengths[split, length])

    def headline(self) -> list[str]:
        """The first lines of :meth:`describe`: what the task asks and its chance level."""
        raise NotImplementedError(f"{type(self).__name__} must say what it is in headline()")

    def describe(self) -> str:
        """:meth:`headline`, then examples, scored positions and answer balance per split."""
        return describe_lm_splits(self.headline(), self.splits())
