"""Sequential grayscale CIFAR-10, LRA's ``Image`` task (Tay et al. 2021).

A 32x32 colour image becomes 1024 grey levels in raster order (row by row), one token each::

    pixel (row 0, col 0) RGB (255, 0, 0) -> grey 76 -> tokens [76, ...]; label 3 (cat)

Data: the CIFAR-10 python release ``cifar-10-python.tar.gz``
(https://www.cs.toronto.edu/~kriz/cifar.html), unpacked as ``cifar-10-batches-py/``
holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``: pickled dicts with ``b'data'``,
uint8 (N, 3072) with the 1024 red, then green, then blue values of each image, and
``b'labels'``, N ints 0-9. ``task.data_dir`` may point at that folder or at its parent. The
pickles are read with an unpickler that only accepts numpy arrays and plain Python values.

Grayscale as LRA's ``tf.image.rgb_to_grayscale`` on uint8 images, in float32:
``grey = uint8(trunc((0.2989 R + 0.5870 G + 0.1140 B) / 255 * 255.5))`` (TF scales to [0, 1],
takes the weighted sum, scales back by 255.5 and casts, which truncates). It equals TF up to
float32 summation order. Tokens are the grey levels 0-255 themselves; the pad id is 256
(vocab 257), so a black pixel is never taken for padding (images are never padded).

Splits: LRA uses TFDS ``train[:90%]`` / ``train[90%:]`` / ``test``. TFDS stores the train set in
its own shuffled order; here train is the first 90% of ``data_batch_1..5`` in file order
(45,000) and val the last 10% (5,000, i.e. ``data_batch_5``), test is ``test_batch`` (10,000).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from tasks.base import TaskSpec, cached_splits, default_cache_dir
from tasks.lra_io import FileTask, fingerprint, format_error, missing_data, shorten

PAD_ID = 256
VOCAB_SIZE = 257
N_PIXELS = 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
PIL_GREY_WEIGHTS = (19595, 38470, 7471)  # Pillow's RGB -> L: (R 19595 + G 38470 + B 7471 + 2^15) >> 16
GRAYSCALES = ("lra", "pil")  # LRA's TF conversion; torchvision's Grayscale (Pillow), the S4 repository's
HOW_TO_GET = (
    "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
    "unpack it; task.data_dir is the resulting cifar-10-batches-py folder or its parent."
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtins only: a data file must not run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes under pickle protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def to_grey(data: np.ndarray, grayscale: str = "lra") -> np.ndarray:
    """(N, 3072) channel-major uint8 RGB -> (N, 1024) uint8 grey, as TF's rgb_to_grayscale (``lra``)
    or as Pillow's ``convert('L')``, which torchvision's Grayscale calls (``pil``)."""
    if grayscale == "pil":
        r, g, b = data.reshape(-1, 3, N_PIXELS).astype(np.int64).transpose(1, 0, 2)  # each (N, 1024)
        wr, wg, wb = PIL_GREY_WEIGHTS
        return ((r * wr + g * wg + b * wb + 0x8000) >> 16).astype(np.uint8)
    rgb = data.reshape(-1, 3, N_PIXELS).astype(np.float32) * np.float32(1.0 / 255)  # (N, 3, 1024)
    w = np.asarray(GREY_WEIGHTS, dtype=np.float32)
    grey = rgb[:, 0] * w[0] + rgb[:, 1] * w[1] + rgb[:, 2] * w[2]  # (N, 1024) in [0, 1]
    return (grey * np.float32(255.5)).astype(np.uint8)  # the cast truncates, as in TF


def read_batch(path: Path, grayscale: str = "lra") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (grey (N, 1024) uint8, labels (N,) int64), checked."""
    with open(path, "rb") as f:
        if not f.read(1):
            raise format_error(path, None, "a pickled CIFAR-10 batch", "an empty file")
        f.seek(0)
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a wrong file
            raise format_error(path, None, "a pickled CIFAR-10 batch", f"{type(e).__name__}: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise format_error(path, None, "a dict with keys b'data' and b'labels'", f"{keys}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * N_PIXELS:
        found = f"{type(data).__name__} {getattr(data, 'dtype', '')} of shape {getattr(data, 'shape', '?')}"
        raise format_error(path, "b'data'", "uint8 (N, 3072): 32x32 images, channel-major RGB", found)
    if len(data) == 0:
        raise format_error(path, "b'data'", "at least one image", "none")
    labels = np.asarray(labels)
    if labels.shape != (len(data),):
        raise format_error(path, "b'labels'", f"{len(data)} labels (one per image)", f"shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        first = next(i for i, y in enumerate(labels.tolist()) if not isinstance(y, int))
        raise format_error(path, f"entry {first} of b'labels'", "a class 0-9 (an integer)",
                           shorten(str(labels.tolist()[first])))
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if len(bad):
        raise format_error(path, f"entry {bad[0]} of b'labels'", "a class 0-9", f"{labels[bad[0]]}")
    return to_grey(data, grayscale), labels.astype(np.int64)


class Image(FileTask):
    """LRA Image (grayscale CIFAR-10 as 1024 tokens) as a 10-way ``classify`` task.

    Args:
        data_dir: the ``cifar-10-batches-py`` folder, or the folder holding it.
        seq_len: must be 1024 (32x32 pixels); present so that every task has ``task.seq_len``.
        val_fraction: the share of the training files (from the end) used for validation (LRA 0.1).
        grayscale: ``lra`` (TF's rgb_to_grayscale, LRA's input pipeline) or ``pil`` (Pillow's
            integer luma, through torchvision's Grayscale in the S4 repository's pipeline).
        cache_dir: where tokenised tensors are cached (``None``: default).
    """

    name = "image"

    def __init__(self, *, data_dir: str | None, seq_len: int, val_fraction: float, grayscale: str = "lra",
                 cache_dir: str | None = None):
        if seq_len != N_PIXELS:
            raise ValueError(f"task.seq_len is fixed at {N_PIXELS} (32x32 pixels) for image, got {seq_len}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"task.val_fraction must lie in (0, 1), got {val_fraction}")
        if grayscale not in GRAYSCALES:
            raise ValueError(f"task.grayscale must be one of {GRAYSCALES}, got {grayscale!r}")
        self.grayscale = grayscale
        self.data_dir = data_dir
        self.val_fraction = val_fraction
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.spec = TaskSpec(kind="classify", vocab_size=VOCAB_SIZE, n_outputs=10, seq_len=N_PIXELS,
                             pad_id=PAD_ID)

    def find_root(self) -> Path:
        if self.data_dir is None:
            raise ValueError(f"image: set task.data_dir. {HOW_TO_GET}")
        directory = Path(self.data_dir)
        if not (directory / TEST_FILE).exists() and (directory / "cifar-10-batches-py").is_dir():
            directory = directory / "cifar-10-batches-py"
        missing = [directory / n for n in (*TRAIN_FILES, TEST_FILE) if not (directory / n).is_file()]
        if missing:
            raise missing_data("image", self.data_dir, missing, HOW_TO_GET)
        return directory

    def _build(self, root: Path) -> dict[str, dict[str, torch.Tensor]]:
        batches = [read_batch(root / name, self.grayscale) for name in TRAIN_FILES]
        grey = np.concatenate([g for g, _ in batches])
        labels = np.concatenate([y for _, y in batches])
        n_train = len(grey) - int(round(self.val_fraction * len(grey)))
        test_grey, test_labels = read_batch(root / TEST_FILE, self.grayscale)

        def arrays(g: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
            # grey levels 0-255 and labels 0-9 fit uint8 (the pad id 256 is never stored)
            return {"tokens": torch.from_numpy(g.astype(np.uint8)), "label": torch.from_numpy(y.astype(np.uint8))}

        return {
            "train": arrays(grey[:n_train], labels[:n_train]),
            "val": arrays(grey[n_train:], labels[n_train:]),
            "test": arrays(test_grey, test_labels),
        }

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        """The CIFAR-10 batches as grey levels, train/val split by ``val_fraction``, cached."""
        root = self.find_root()
        files = [root / n for n in (*TRAIN_FILES, TEST_FILE)]
        params = dict(files=fingerprint(files), val_fraction=self.val_fraction,
                      version=2)  # version 2: uint8 (version 1: int16)
        if self.grayscale != "lra":  # the key of LRA's conversion stays that of the caches before this option
            params["grayscale"] = self.grayscale
        return cached_splits("image", params, lambda: self._build(root), self.cache_dir)

    def title(self) -> str:
        return "image (grayscale CIFAR-10, 1024 tokens, pad id 256 never used)"
