"""Tiny data sets in the official layouts of the released LRA data (AAN pairs, aclImdb, CIFAR-10
python batches), for the loader tests and for the discovery test over every task."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_aan(directory: Path, rows: dict[str, list[str]]) -> Path:
    """``new_aan_pairs.{train,eval,test}.tsv`` under ``directory``, one line per row."""
    directory.mkdir(parents=True, exist_ok=True)
    names = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
    for split, lines in rows.items():
        (directory / names[split]).write_bytes(b"".join(line.encode() + b"\n" for line in lines))
    return directory


AAN_ROWS = {
    "train": ["1\tP01-1\tP02-2\tab\tcde", "0.0\tP03-3\tP04-4\t\"q\"\tx y"],
    "val": ["1.0\tA\tB\tabc\td"],
    "test": ["0\tA\tB\tz\tzz"],
}


def write_imdb(root: Path, reviews: dict[tuple[str, str], list[bytes]]) -> Path:
    """``root/aclImdb/{train,test}/{pos,neg}/<i>_<rating>.txt``, and the ignored ``unsup`` folder."""
    for (part, label), texts in reviews.items():
        folder = root / "aclImdb" / part / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_bytes(text)
    (root / "aclImdb" / "train" / "unsup").mkdir()  # present in the release, ignored
    return root


IMDB = {
    ("train", "neg"): [b"  Bad.\n", b"awful"] + [b"meh %d" % i for i in range(8)],
    ("train", "pos"): [b"Great movie!", "caf\u00e9".encode()] + [b"fine %d" % i for i in range(8)],
    ("test", "neg"): [b"no"],
    ("test", "pos"): [b"yes"],
}


def write_cifar(directory: Path, n_per_batch: int = 4) -> tuple[Path, dict]:
    """Five train batches and a test batch; image k of the whole set has pixel 0 = colour k % 4."""
    directory.mkdir(parents=True, exist_ok=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    made = {}
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        rng = np.random.default_rng(b)
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        for k in range(n_per_batch):
            r, g, bl = colours[k % 4]
            data[k, 0], data[k, 1024], data[k, 2048] = r, g, bl  # pixel (0, 0), channel-major
        labels = [(b + k) % 10 for k in range(n_per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data}, f, protocol=2)
        made[name] = (data, labels)
    return directory, made
