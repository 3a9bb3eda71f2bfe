"""Byte-level document matching on the ACL Anthology Network (AAN), LRA's ``Retrieval`` task.

Two papers are read byte by byte; the label says whether one cites the other::

    tokens  b"We propose ..."  -> [88, 102, 33, 113, ...]     (paper 1, padded to seq_len)
    tokens2 b"Statistical ..." -> [84, 117, 98, 117, ...]     (paper 2, padded to seq_len)
    label   1

Data: ``lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv`` (``eval`` is our ``val``),
tab-separated without a header and without quoting, five columns
``label id1 id2 text1 text2``; the label is a number equal to 0 or 1 (LRA reads it as a float).

Tokens follow LRA's matching pipeline with ``tokenizer=char``: each text is cut to 10,000
bytes, encoded with ``tfds ByteTextEncoder`` (byte b -> id b + 1, id 0 is padding; vocab 257),
then cut to ``seq_len`` (LRA: 4000 per document, 8000 in all). Models encode both documents
with shared weights and classify the pair (batch keys ``tokens``, ``tokens2``, ``label``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.base import TaskSpec, cached_splits, default_cache_dir, progress
from tasks.lra_io import FileTask, encode_bytes, fingerprint, format_error, missing_data, pad_rows, shorten

PAD_ID = 0
VOCAB_SIZE = 257
FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
HOW_TO_GET = (
    "Download lra_release.gz from the Long Range Arena repository "
    "(github.com/google-research/long-range-arena), unpack it and point task.data_dir at "
    "lra_release/tsv_data."
)


def parse_label(text: bytes) -> int | None:
    """0 or 1 from a label field such as ``1``, ``0.0``; None when it is neither."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def read_aan_tsv(path: Path, seq_len: int) -> dict[str, torch.Tensor]:
    """Read one AAN pairs file into ``tokens``, ``tokens2`` (N, seq_len) and ``label`` (N,)."""
    rows1, rows2, labels = [], [], []
    bar = progress(total=path.stat().st_size, desc=f"retrieval: reading {path.name}", unit="B",
                   unit_scale=True)
    with open(path, "rb") as f, bar:
        for line_no, line in enumerate(f, start=1):
            bar.update(len(line))
            fields = line.rstrip(b"\r\n").split(b"\t")
            if len(fields) != 5:
                raise format_error(path, line_no, "5 tab-separated fields (label, id1, id2, text1, text2)",
                                   f"{len(fields)} field(s): {shorten(line.rstrip())}")
            label = parse_label(fields[0])
            if label is None:
                raise format_error(path, line_no, "a label 0 or 1 in column 1", shorten(fields[0]))
            rows1.append(encode_bytes(fields[3], seq_len))
            rows2.append(encode_bytes(fields[4], seq_len))
            labels.append(label)
    if not labels:
        raise format_error(path, 1, "rows 'label<TAB>id1<TAB>id2<TAB>text1<TAB>text2'", "an empty file")
    return {
        "tokens": pad_rows(rows1, seq_len, pad_id=PAD_ID),
        "tokens2": pad_rows(rows2, seq_len, pad_id=PAD_ID),
        "label": torch.tensor(labels, dtype=torch.int16),
    }


class Retrieval(FileTask):
    """LRA Retrieval (AAN citation matching) as a 2-way ``pair`` task.

    Args:
        data_dir: folder with ``new_aan_pairs.{train,eval,test}.tsv``.
        seq_len: bytes per document after cutting and padding (LRA: 4000).
        cache_dir: where tokenised tensors are cached (``None``: default).
    """

    name = "retrieval"

    def __init__(self, *, data_dir: str | None, seq_len: int, cache_dir: str | None = None):
        self.data_dir = data_dir
        self.seq_len = seq_len
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.spec = TaskSpec(kind="pair", vocab_size=VOCAB_SIZE, n_outputs=2, seq_len=seq_len, pad_id=PAD_ID)

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        """The three AAN pair files as bytes at ``seq_len``, cached."""
        if self.data_dir is None:
            raise ValueError(f"retrieval: set task.data_dir. {HOW_TO_GET}")
        directory = Path(self.data_dir)
        paths = {split: directory / name for split, name in FILES.items()}
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            raise missing_data("retrieval", directory, missing, HOW_TO_GET)
        params = dict(files=fingerprint(list(paths.values())), seq_len=self.seq_len, version=1)
        build = lambda: {s: read_aan_tsv(p, self.seq_len) for s, p in paths.items()}  # noqa: E731
        return cached_splits("retrieval", params, build, self.cache_dir)

    def title(self) -> str:
        return f"retrieval (byte-level AAN pairs, seq_len={self.seq_len} per document)"
