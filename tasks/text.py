"""Byte-level IMDb sentiment classification, LRA's ``Text`` task (Tay et al. 2021).

Each review is read as raw bytes and classified positive or negative::

    b"Great movie!"  ->  tokens [72, 115, 102, 98, 117, 33, 110, 112, 119, 106, 102, 34, 0, ...]
                         label 1 (pos)

Data: the Stanford release ``aclImdb_v1.tar.gz`` (ai.stanford.edu/~amaas/data/sentiment/),
unpacked as ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``; ``task.data_dir`` may point
at ``aclImdb`` itself or at the folder holding it. This is the layout TFDS ``imdb_reviews``
(what LRA loads) is built from, with the same preprocessing: each file's bytes with leading and
trailing ASCII whitespace stripped, label 0 for ``neg`` and 1 for ``pos``; the ``unsup`` folder
is ignored. TFDS's own TFRecord cache is not read (it needs TensorFlow); the examples are the
same 25k + 25k, in sorted file order rather than TFDS's shuffled order.

Tokens follow ``tfds ByteTextEncoder`` as LRA used it: byte b -> id b + 1, id 0 is padding
(vocab 257). Reviews are cut to ``seq_len`` bytes (the paper: 4K; the released config: 1000).

Validation: LRA validates on the test set (IMDb has no validation split), so by default
(``val_split=test``) val and test are the same 25k examples; report that when you quote a val
score. ``val_split=holdout`` instead holds out 10% of train (a fixed permutation of ``seed``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.base import TaskSpec, cached_splits, default_cache_dir, progress
from tasks.lra_io import FileTask, encode_bytes, fingerprint, format_error, missing_data, pad_rows

PAD_ID = 0
VOCAB_SIZE = 257  # pad + 256 byte values
LABELS = {"neg": 0, "pos": 1}
HOLDOUT_FRACTION = 0.1
HOW_TO_GET = (
    "Download aclImdb_v1.tar.gz from https://ai.stanford.edu/~amaas/data/sentiment/ and unpack "
    "it; task.data_dir is the resulting aclImdb folder or its parent."
)


def find_root(data_dir: str | Path) -> Path:
    """``data_dir`` if it holds ``train/`` and ``test/``, else ``data_dir/aclImdb``."""
    directory = Path(data_dir)
    if not (directory / "train").is_dir() and (directory / "aclImdb").is_dir():
        directory = directory / "aclImdb"
    missing = [directory / part / label for part in ("train", "test") for label in LABELS
               if not (directory / part / label).is_dir()]
    if missing:
        raise missing_data("text", data_dir, missing, HOW_TO_GET)
    return directory


def list_reviews(root: Path, part: str) -> list[tuple[Path, int]]:
    """(file, label) for every review of ``part`` (train or test), neg first, sorted by name."""
    files = []
    for label_name, label in LABELS.items():
        folder = root / part / label_name
        found = sorted(folder.glob("*.txt"))
        if not found:
            raise format_error(folder, None, "review files <id>_<rating>.txt", "no .txt file")
        files += [(f, label) for f in found]
    return files


def read_reviews(files: list[tuple[Path, int]], seq_len: int) -> dict[str, torch.Tensor]:
    """Bytes of each review, stripped as TFDS does, as ``tokens`` (N, seq_len) and ``label``."""
    rows = []
    for path, _ in progress(files, desc="text: reading reviews", unit="review"):
        text = path.read_bytes().strip()
        if not text:
            raise format_error(path, 1, "the text of a review", "an empty file")
        rows.append(encode_bytes(text, seq_len))
    labels = torch.tensor([label for _, label in files], dtype=torch.int16)
    return {"tokens": pad_rows(rows, seq_len, pad_id=PAD_ID), "label": labels}


class Text(FileTask):
    """LRA Text (byte-level IMDb) as a 2-way ``classify`` task.

    Args:
        data_dir: the ``aclImdb`` folder, or the folder holding it.
        seq_len: bytes per review after cutting and padding (paper 4096, released config 1000).
        val_split: ``test`` (LRA: validate on the test set) or ``holdout`` (10% of train).
        seed: the permutation that picks the holdout (``val_split=holdout``).
        cache_dir: where tokenised tensors are cached (``None``: default).
    """

    name = "text"

    def __init__(self, *, data_dir: str | None, seq_len: int, val_split: str, seed: int,
                 cache_dir: str | None = None):
        if val_split not in ("test", "holdout"):
            raise ValueError(f"task.val_split must be 'test' or 'holdout', got {val_split!r}")
        self.data_dir = data_dir
        self.seq_len = seq_len
        self.val_split = val_split
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.spec = TaskSpec(kind="classify", vocab_size=VOCAB_SIZE, n_outputs=2, seq_len=seq_len,
                             pad_id=PAD_ID)

    def _build(self, files: dict[str, list[tuple[Path, int]]]) -> dict[str, dict[str, torch.Tensor]]:
        train = read_reviews(files["train"], self.seq_len)
        test = read_reviews(files["test"], self.seq_len)
        if self.val_split == "test":
            return {"train": train, "val": test, "test": test}
        n = len(train["label"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(HOLDOUT_FRACTION * n))
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        return {
            "train": {k: v[train_idx] for k, v in train.items()},
            "val": {k: v[val_idx] for k, v in train.items()},
            "test": test,
        }

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        """The reviews of ``data_dir`` as bytes at ``seq_len``, split by ``val_split``, cached."""
        if self.data_dir is None:
            raise ValueError(f"text: set task.data_dir. {HOW_TO_GET}")
        root = find_root(self.data_dir)
        files = {part: list_reviews(root, part) for part in ("train", "test")}
        params = dict(
            files=fingerprint([f for part in files.values() for f, _ in part]),
            seq_len=self.seq_len, val_split=self.val_split, version=1,
            seed=self.seed if self.val_split == "holdout" else None,
        )
        return cached_splits("text", params, lambda: self._build(files), self.cache_dir)

    def title(self) -> str:
        return f"text (byte-level IMDb, seq_len={self.seq_len}, val_split={self.val_split})"
