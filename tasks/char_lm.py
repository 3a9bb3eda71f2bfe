"""Character-level language modelling on raw bytes, scored in bits per character (bpc).

``source: file`` reads any local file as bytes (enwik8 is the standard: the first 10^8 bytes of
an English Wikipedia XML dump, http://mattmahoney.net/dc/enwik8.zip). The byte stream is split
by position 90% / 5% / 5% into train / val / test, which for enwik8 is the usual 90M / 5M / 5M
(Transformer-XL, ``prep_enwik8.py``). ``source: generate`` writes a synthetic text-like corpus
instead (see :func:`generate_corpus`), so the task runs with no download.

Tokens are the bytes themselves: ``vocab_size = n_outputs = 256``. ``lm`` batches are never
padded, so byte 0 is an ordinary token here although it is the nominal ``pad_id``.

Each split is cut into windows of ``seq_len + 1`` bytes with a stride of ``seq_len``: inputs are
the first ``seq_len`` bytes of a window, targets the last ``seq_len`` (the next byte at every
position). Windows overlap by the one byte that is a target of one window and the first input of
the next, so every byte of a split but its first is predicted exactly once; a tail shorter than
a window is dropped. There are no ignored positions.

Worked example (seq_len = 4, split bytes ``b"hello world"``)::

    tokens   h  e  l  l      o  _  w  o
    targets  e  l  l  o      _  w  o  r

Stream order (:func:`stream_indices`, for a model that carries memory across batches, e.g.
``model=transformer_xl model.stream=true``): the windows, in text order, are cut into
``batch_size`` streams of ``n // batch_size`` consecutive windows; row r of the batch at step s
is window s of stream r (modulo the stream length), so each row continues the previous batch's
row in the text. This is the reference's ``LMOrderedIterator`` (kimiyoung/transformer-xl
``pytorch/data_utils.py``: the corpus viewed as ``(batch_size, -1)``, batch i the columns
``[i * tgt_len, (i + 1) * tgt_len)``), with a tail of fewer than ``batch_size`` windows dropped.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import torch

from tasks.base import (
    ArrayDataset, TaskSpec, cached_splits, check_split, format_bytes, smallest_int_dtype,
)

CORPUS_VERSION = 1  # part of the cache key: bump when generate_corpus changes its output
ENWIK8_HELP = (
    "To use enwik8: download http://mattmahoney.net/dc/enwik8.zip, unzip it and set "
    "task.path=/absolute/path/to/enwik8. For a corpus that needs no download, set "
    "task.source=generate."
)


class _Uniform:
    """Uniform floats from a seeded ``torch.Generator``, drawn in blocks for a Python loop."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.block: list[float] = []
        self.i = 0

    def __call__(self) -> float:
        if self.i == len(self.block):
            self.block = torch.rand(1 << 16, generator=self.generator, dtype=torch.float64).tolist()
            self.i = 0
        self.i += 1
        return self.block[self.i - 1]

    def below(self, n: int) -> int:
        return min(int(self() * n), n - 1)

    def weighted(self, cumulative: list[float]) -> int:
        return min(bisect.bisect_right(cumulative, self() * cumulative[-1]), len(cumulative) - 1)


def _word(u: _Uniform, n_syllables: int) -> str:
    onsets, vowels, codas = "bcdfghklmnprstvz", "aeiou", ["", "", "", "n", "r", "s", "l"]
    return "".join(
        onsets[u.below(len(onsets))] + vowels[u.below(len(vowels))] + codas[u.below(len(codas))]
        for _ in range(n_syllables)
    )


def generate_corpus(n_bytes: int, *, seed: int) -> bytes:
    """A deterministic synthetic corpus of ``n_bytes`` text-like ASCII bytes.

    A tiny seeded generative model of "encyclopedia articles": a lexicon of 3000 pseudo-words
    with Zipfian frequencies and a sparse bigram preference (each word has 6 favoured successors,
    taken 60% of the time), and 400 named entities of two capitalised pseudo-words. An article
    has a title line ``= Name =`` and 2-6 paragraphs of sentences; each article has a cast of
    2-4 entities (the title entity first) that its sentences keep mentioning, with occasional
    numbers and commas. Local statistics can be learnt from the lexicon, but which names follow
    in an article can only be predicted from the article's earlier text: the long-range
    structure a model with a longer memory should exploit.
    """
    u = _Uniform(seed)
    n_words, n_entities = 3000, 400
    lexicon = [_word(u, 1 + u.below(3)) for _ in range(n_words)]
    cumulative, total = [], 0.0
    for rank in range(n_words):
        total += 1.0 / (rank + 1) ** 1.1
        cumulative.append(total)
    successors = [[u.weighted(cumulative) for _ in range(6)] for _ in range(n_words)]
    entities = [
        " ".join(_word(u, 2 + u.below(2)).capitalize() for _ in range(2)) for _ in range(n_entities)
    ]

    parts: list[str] = []
    size = 0
    while size < n_bytes:
        cast = [entities[u.below(n_entities)] for _ in range(2 + u.below(3))]
        article = [f"= {cast[0]} =\n\n"]
        for _ in range(2 + u.below(5)):
            sentences = []
            for _ in range(2 + u.below(6)):
                words = [cast[u.below(len(cast))]] if u() < 0.6 else []
                w = u.weighted(cumulative)
                for _ in range(4 + u.below(13)):
                    r = u()
                    if r < 0.06:
                        words.append(cast[u.below(len(cast))])
                    elif r < 0.09:
                        words.append(str(1700 + u.below(320)))
                    else:
                        w = successors[w][u.below(6)] if u() < 0.6 else u.weighted(cumulative)
                        words.append(lexicon[w] + ("," if u() < 0.08 else ""))
                sentence = " ".join(words).rstrip(",")
                sentences.append(sentence[0].upper() + sentence[1:] + ".")
            article.append(" ".join(sentences) + "\n\n")
        text = "".join(article)
        parts.append(text)
        size += len(text)
    return "".join(parts).encode("ascii")[:n_bytes]


def split_stream(data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a byte stream by position, 90% / 5% / 5% (enwik8: 90M / 5M / 5M)."""
    n = len(data)
    n_train, n_val = n * 90 // 100, n * 5 // 100
    return {
        "train": data[:n_train],
        "val": data[n_train:n_train + n_val],
        "test": data[n_train + n_val:],
    }


def windows(stream: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """Cut a byte stream into ``tokens``/``targets`` (N, seq_len), targets shifted by one."""
    n = (len(stream) - 1) // seq_len
    tokens = stream[: n * seq_len].view(n, seq_len)  # a view: no copy of the stream
    targets = stream[1: n * seq_len + 1].view(n, seq_len).to(smallest_int_dtype(255))
    return {"tokens": tokens, "targets": targets}


def stream_indices(step: int, *, n_windows: int, batch_size: int) -> torch.Tensor:
    """Window indices (batch_size,) of the batch at ``step`` in stream order (module docstring).

    Row r is window ``r * per_stream + step % per_stream``, ``per_stream = n_windows // batch_size``;
    the streams start over (row r back at its first window) every ``per_stream`` steps.
    """
    per_stream = n_windows // batch_size
    if per_stream == 0:
        raise ValueError(
            f"char_lm stream order: a batch of {batch_size} streams needs at least {batch_size} windows, the "
            f"split has {n_windows}; lower trainer.batch_size (trainer.eval_batch_size for val/test) or task.seq_len"
        )
    return torch.arange(batch_size) * per_stream + step % per_stream


class CharLM:
    """Byte-level language modelling as an ``lm`` task, metric ``bpc``.

    Args:
        source: ``file`` (read ``path``) or ``generate`` (the synthetic corpus, cached).
        path: the byte file for ``source: file``, e.g. enwik8; relative paths are relative to
            the working directory.
        seq_len: tokens per training window.
        n_bytes: size of the generated corpus (``source: generate`` only).
        seed: seed of the generated corpus (``source: generate`` only; a file does not depend
            on it).
        cache_dir: where the generated corpus is cached (``None``: ``results/cache``).
    """

    def __init__(
        self,
        *,
        source: str,
        path: str | None,
        seq_len: int,
        n_bytes: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        if source not in ("file", "generate"):
            raise ValueError(f"char_lm: task.source must be 'file' or 'generate', got {source!r}")
        if source == "file" and not path:
            raise ValueError(f"char_lm: task.source=file needs task.path. {ENWIK8_HELP}")
        self.source, self.path, self.n_bytes, self.seed = source, path, n_bytes, seed
        self.seq_len = seq_len
        self.spec = TaskSpec(kind="lm", vocab_size=256, n_outputs=256, seq_len=seq_len, metric="bpc")
        self.cache_dir = cache_dir
        self._streams: dict[str, torch.Tensor] | None = None

    def _read_file(self) -> torch.Tensor:
        file = Path(self.path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"char_lm: task.path={self.path!r} does not exist (looked for {file.resolve()}). "
                f"{ENWIK8_HELP}"
            )
        return torch.from_file(str(file), shared=False, size=file.stat().st_size, dtype=torch.uint8)

    def _generate(self) -> torch.Tensor:
        params = dict(n_bytes=self.n_bytes, seed=self.seed, version=CORPUS_VERSION)

        def build() -> dict[str, dict[str, torch.Tensor]]:
            corpus = generate_corpus(self.n_bytes, seed=self.seed)
            return {"corpus": {"bytes": torch.frombuffer(bytearray(corpus), dtype=torch.uint8)}}

        return cached_splits("char_lm-corpus", params, build, self.cache_dir)["corpus"]["bytes"]

    def _load(self) -> dict[str, torch.Tensor]:
        if self._streams is None:
            data = self._read_file() if self.source == "file" else self._generate()
            streams = split_stream(data)
            for split, stream in streams.items():
                self._check_length(split, stream, self.seq_len)
            self._streams = streams
        return self._streams

    def _check_length(self, split: str, stream: torch.Tensor, seq_len: int) -> None:
        """Refuse a split too short for one window: an empty dataset would fail far from here."""
        n_bytes = len(stream)
        if n_bytes < seq_len + 1:
            where = f"task.path={self.path!r}" if self.source == "file" else f"task.n_bytes={self.n_bytes}"
            raise ValueError(
                f"char_lm: the {split} split of {where} has {n_bytes} bytes, fewer than one window "
                f"of seq_len + 1 = {seq_len + 1}; use a bigger corpus or a smaller task.seq_len"
            )

    def dataset(self, split: str, *, seq_len: int | None = None) -> ArrayDataset:
        """Windows of ``split``, of ``task.seq_len`` bytes or of ``seq_len`` (the same bytes, cut
        into other windows: longer contexts need no new data)."""
        check_split("char_lm", split)
        seq_len = self.seq_len if seq_len is None else seq_len
        stream = self._load()[split]
        self._check_length(split, stream, seq_len)
        return ArrayDataset(windows(stream, seq_len))

    def stream_indices(self, step: int, *, n_windows: int, batch_size: int) -> torch.Tensor:
        """Stream order over a split's windows (:func:`stream_indices`): the windows are consecutive
        pieces of one text, so a model may carry its memory from one batch to the next."""
        return stream_indices(step, n_windows=n_windows, batch_size=batch_size)

    def describe(self) -> str:
        streams = self._load()
        what = f"file {self.path}" if self.source == "file" else (
            f"generated corpus ({self.n_bytes} bytes, seed {self.seed})")
        counts = torch.bincount(streams["train"], minlength=256).double()
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * p.log2()).sum())
        lines = [
            f"char_lm: {what}, bytes as tokens, windows of {self.seq_len}; {len(p)} distinct "
            f"bytes in train, unigram entropy {entropy:.3f} bits (the bpc of a context-free model)",
        ]
        for split, stream in streams.items():
            n = (len(stream) - 1) // self.seq_len
            lines.append(
                f"  {split}: {len(stream)} bytes, {n} windows, {n * self.seq_len} scored bytes"
            )
        total = sum(len(s) for s in streams.values())
        lines.append(f"  stored as one uint8 byte stream; {format_bytes(total)} in memory"
                     + (" and in the cache file" if self.source == "generate" else ""))
        return "\n".join(lines)
