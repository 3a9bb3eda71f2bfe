"""Shared parts of the Long Range Arena loaders: the :class:`FileTask` base, errors that name file
and line, cache keys from the data files, padding, byte encoding and a one-screen summary.

Every loader in ``tasks/`` that reads a published LRA format goes through these, so that a
missing folder or a bad row reads the same way in every task::

    basic_train.tsv:17: expected a label 0-9 in column 'Target', found '12'
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tasks.base import ArrayDataset, TaskSpec, check_split, describe_storage

log = logging.getLogger(__name__)

# Raw documents are cut to this many bytes before tokenisation in the LRA byte pipelines
# (matching/input_pipeline.py: ``encoder.encode(s.numpy()[:10000])``).
LRA_BYTE_CUT = 10_000


class DataFormatError(ValueError):
    """A data file does not hold what its published format says; the message names file:line."""


def format_error(path: str | Path, where: int | str | None, expected: str, found: str) -> DataFormatError:
    """An error reading ``<file>:<line>: expected <what>, found <what>``.

    Args:
        path: the offending file.
        where: a 1-based line number, or a free-form location (``"entry 17 of b'labels'"``).
        expected: what the format asks for.
        found: what the file holds (keep it short; see :func:`shorten`).
    """
    location = str(path) if where is None else f"{path}:{where}"
    return DataFormatError(f"{location}: expected {expected}, found {found}")


def shorten(text: str | bytes, limit: int = 60) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, for error messages."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def missing_data(task: str, data_dir: str | Path, missing: Sequence[str | Path], how_to_get: str) -> FileNotFoundError:
    """The error for data that are not where ``task.data_dir`` points.

    Args:
        task: the task name, as typed on the command line.
        data_dir: the configured folder.
        missing: the files or folders that were looked for and not found.
        how_to_get: one or two sentences on where the data come from.
    """
    listed = "\n".join(f"  - {m}" for m in missing)
    # the first line names what is missing: a sweep's summary and a skipped rerun show only that line
    names = ", ".join(relative_name(m, data_dir) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
    return FileNotFoundError(
        f"{task}: {names} not found under task.data_dir={str(data_dir)!r}. Missing:\n{listed}\n"
        f"{how_to_get}\nThen run with task.data_dir=<that folder>."
    )


def relative_name(path: str | Path, folder: str | Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


SOURCES = ("auto", "lra", "generate")
_announced: set[str] = set()


def resolve_source(task: str, source: str, data_dir: str | None) -> str:
    """``lra`` or ``generate`` for a task that can read the release or draw its data.

    ``auto`` (the default) reads the release when ``task.data_dir`` is set and otherwise uses the
    generator, saying so once per process, so a fresh clone runs with nothing downloaded.
    """
    if source not in SOURCES:
        raise ValueError(f"task.source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source != "auto":
        return source
    if data_dir:
        return "lra"
    if task not in _announced:
        _announced.add(task)
        log.info("%s: no task.data_dir, so the data come from the generator (task.source=generate); "
                 "set task.data_dir to read the LRA release", task)
    return "generate"


def fingerprint(paths: Sequence[str | Path]) -> str:
    """A hash of the files' resolved paths, sizes and modification times (the cache key)."""
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def pad_rows(rows: Sequence[Sequence[int] | np.ndarray], seq_len: int, *, pad_id: int,
             dtype: torch.dtype = torch.int16) -> torch.Tensor:
    """Right-pad (or cut) each row to ``seq_len``; returns a ``dtype`` tensor (N, seq_len)
    (int16 holds the byte tasks' ids 0-256; ListOps passes uint8, see base.smallest_token_dtype)."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    out = np.full((len(rows), seq_len), pad_id, dtype=np_dtype)
    for i, row in enumerate(rows):
        row = np.asarray(row[:seq_len], dtype=np_dtype)
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def encode_bytes(data: bytes, seq_len: int) -> np.ndarray:
    """LRA's byte encoding (``tfds ByteTextEncoder``): byte b -> id b + 1, id 0 is padding.

    ``data`` is cut to :data:`LRA_BYTE_CUT` bytes and then to ``seq_len`` tokens, as in LRA.
    """
    cut = data[:LRA_BYTE_CUT][:seq_len]
    return np.frombuffer(cut, dtype=np.uint8).astype(np.int16) + 1


def describe_splits(title: str, splits: dict[str, dict[str, torch.Tensor]], *, pad_id: int, seq_len: int) -> str:
    """A short multi-line summary: examples, real-token lengths and label balance per split.

    Lengths count the tokens that are not ``pad_id``; ``full`` is the share of sequences that
    fill all ``seq_len`` positions (those were cut, or happened to fit exactly).
    """
    lines = [title]
    for split, arrays in splits.items():
        label = arrays["label"]
        counts = torch.bincount(label.long()).tolist()
        share = ", ".join(f"{c}: {n / max(len(label), 1):.1%}" for c, n in enumerate(counts))
        lines.append(f"  {split:5s} {len(label):7d} examples; labels {share}")
        for key in ("tokens", "tokens2"):
            if key not in arrays:
                continue
            lengths = (arrays[key] != pad_id).sum(1).double()
            if len(lengths) == 0:
                continue
            q = torch.quantile(lengths, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).tolist()
            full = (lengths == seq_len).double().mean().item()
            lines.append(
                f"        {key}: length min {q[0]:.0f} / median {q[1]:.0f} / max {q[2]:.0f}, "
                f"mean {lengths.mean():.1f}; {full:.1%} fill seq_len={seq_len}"
            )
    lines.append(describe_storage(splits))
    return "\n".join(lines)


class FileTask:
    """The shared part of the tasks read from files in a published format (the LRA loaders).

    A subclass sets ``name`` and ``spec`` and supplies :meth:`load` (read and tokenise the three
    splits at ``spec.seq_len``, through the disk cache) and :meth:`title`. Nothing is read until
    the first :meth:`splits`, so building a task for a config check touches no file.
    """

    name: str
    spec: TaskSpec
    _splits: dict[str, dict[str, torch.Tensor]] | None = None  # set by the first splits()

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must read its files in load()")

    def title(self) -> str:
        """The first line of :meth:`describe`: the task, its source and its length."""
        raise NotImplementedError(f"{type(self).__name__} must name itself in title()")

    def splits(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{split: arrays}``, loaded on the first call."""
        if self._splits is None:
            self._splits = self.load()
        return self._splits

    def dataset(self, split: str, *, seq_len: int | None = None) -> ArrayDataset:
        """The examples of ``split``. The files are tokenised at ``spec.seq_len`` only, so another
        ``seq_len`` is refused rather than answered with data of the wrong shape."""
        check_split(self.name, split)
        if seq_len is not None and seq_len != self.spec.seq_len:
            raise ValueError(
                f"{self.name}: the data are tokenised at task.seq_len={self.spec.seq_len} only, so "
                f"there is no dataset({split!r}, seq_len={seq_len}); set task.seq_len instead"
            )
        return ArrayDataset(self.splits()[split])

    def describe(self) -> str:
        """:meth:`title`, then examples, token lengths and label balance per split."""
        return describe_splits(self.title(), self.splits(), pad_id=self.spec.pad_id, seq_len=self.spec.seq_len)
