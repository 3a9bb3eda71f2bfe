"""LRA Pathfinder (32x32, 1024 tokens) and Path-X (128x128, 16384 tokens) as ``classify`` tasks.

Is there a dashed path joining the two circular markers? An image is read in raster order
(row by row), one token per pixel, the grey level itself::

    row 0: 0 0 0 ... 0 | row 1: 0 0 73 255 73 0 ... | ... -> tokens [0, 0, ..., 73, 255, ...]
    label 1 (both markers on one path) or 0 (each on a different path)

Tokens are the grey levels 0-255 unchanged; the pad id is 256 (vocab 257), so that black pixels
are not padding (images are never padded). ``task.seq_len`` is fixed by the resolution.

Data (``task.source=lra``): the LRA release ``lra_release.gz`` holds, per resolution N and level,
``pathfinderN/<level>/imgs/<batch>/sample_<i>.png`` and ``pathfinderN/<level>/metadata/<batch>.npy``;
despite the name, a metadata file is TEXT, one line per image, fields separated by spaces:
0 the sub-folder (``imgs/0``), 1 the file name, 2 the image index, 3 the label, then generator
settings (ignored). A binary ``.npy`` string array with the same columns (what the original
``snakes2`` script saves) is read too. Levels: ``curv_baseline`` (paths of 6 paddles),
``curv_contour_length_9``, ``curv_contour_length_14`` (LRA's "hard", Table 1). ``task.data_dir``
is the folder holding ``pathfinder32/`` (``pathfinder128/`` for Path-X), e.g. ``lra_release/``.

Order and splits: metadata files by batch number, lines in file order; the first 80% are train,
the next 10% val, the last 10% test (LRA takes TFDS ``[:80%]``, ``[80%:90%]``, ``[90%:]`` of its
beam-built dataset, whose order it does not fix; the S4 code splits at random with seed 42).
Empty images are skipped as in S4's loader (the release has a 0-byte
``pathfinder32/curv_baseline/imgs/0/sample_172.png``): 0-byte files and all-black images; their
counts are in :meth:`Pathfinder.describe`.

``task.source=generate`` draws images with :mod:`tasks.pathfinder_draw` and writes them in the
same layout (PNG files and text metadata, batches of 1000) into the cache, keyed by every knob
and the seed; the same loader then reads them, train then val then test, ``n_train``/``n_val``/
``n_test`` images, labels exactly balanced in each split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from tasks.base import (
    TaskSpec, atomic_write_dir, cache_key, cached_splits, default_cache_dir, describe_storage, progress,
)
from tasks.lra_io import FileTask, fingerprint, format_error, missing_data, resolve_source, shorten
from tasks.pathfinder_draw import PathStyle, balanced_labels, draw_pathfinder

PAD_ID = 256
VOCAB_SIZE = 257
LEVELS = {"curv_baseline": 6, "curv_contour_length_9": 9, "curv_contour_length_14": 14}
SPLITS = ("train", "val", "test")
GENERATED_BATCH = 1000  # images per imgs/<batch> folder when generating
HOW_TO_GET = (
    "Download lra_release.gz (https://storage.googleapis.com/long-range-arena/lra_release.gz, linked "
    "from the README of github.com/google-research/long-range-arena) and unpack it with "
    "`tar xzf lra_release.gz`; task.data_dir is the folder that holds pathfinder32/ (pathfinder128/ "
    "for pathx). Or draw the images here with task.source=generate."
)


def metadata_files(level_dir: Path) -> list[Path]:
    """``metadata/*.npy`` of a level, by batch number (``2.npy`` before ``10.npy``)."""
    files = (level_dir / "metadata").glob("*.npy")
    return sorted(files, key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem))


def read_metadata(path: Path) -> list[tuple[int, str, str, int]]:
    """One metadata file -> ``(line, sub-folder, file name, label)`` per image; checked."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":  # a binary string array, as np.save writes it
        table = np.load(path, allow_pickle=False)
        if table.ndim != 2 or table.dtype.kind != "U":
            raise format_error(path, None, "a 2-d array of strings (one row per image)",
                               f"{table.dtype} of shape {table.shape}")
        lines = [(i, " ".join(row)) for i, row in enumerate(table.tolist(), start=1)]
        where = "row"
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = list(enumerate(f.read().splitlines(), start=1))
        where = None
    rows = []
    for line_no, line in lines:
        if not line.strip():
            continue
        fields = line.split()
        loc = line_no if where is None else f"{where} {line_no}"
        if len(fields) < 4:
            raise format_error(path, loc, "at least 4 space-separated fields 'imgs/<batch> sample_<i>.png "
                               "<index> <label> ...'", f"{len(fields)} in {shorten(line)}")
        if fields[3] not in ("0", "1"):
            raise format_error(path, loc, "a label 0 or 1 in field 3", shorten(fields[3]))
        if not fields[1].lower().endswith(".png"):
            raise format_error(path, loc, "a .png file name in field 1", shorten(fields[1]))
        rows.append((line_no, fields[0], fields[1], int(fields[3])))
    return rows


def read_image(png: Path, resolution: int, meta: Path, line: int) -> np.ndarray | None:
    """A grey PNG as (resolution**2,) uint8 in raster order; None for a 0-byte or all-black image."""
    try:
        size = png.stat().st_size
    except FileNotFoundError:
        raise format_error(meta, line, f"an image at {png}", "no such file") from None
    if size == 0:
        return None
    try:
        with PILImage.open(png) as img:
            img.load()
            grey = img.convert("L")  # as S4's loader; the release's PNGs are grey already
    except Exception as e:  # noqa: BLE001 - any decoding failure means a broken file
        raise format_error(meta, line, f"a readable PNG image at {png}", f"{type(e).__name__}: {e}") from e
    if grey.size != (resolution, resolution):
        w, h = grey.size
        raise format_error(meta, line, f"a {resolution}x{resolution} image at {png}", f"a {w}x{h} image")
    pixels = np.asarray(grey, dtype=np.uint8).reshape(-1)
    return pixels if pixels.any() else None


def read_level(level_dir: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Every image of a level, in metadata order: (pixels (N, R*R) uint8, labels (N,), skipped)."""
    pixels, labels = [], []
    skipped = {"empty_files": 0, "all_black": 0}
    entries = [(meta, row) for meta in metadata_files(level_dir) for row in read_metadata(meta)]
    for meta, (line, folder, name, label) in progress(entries, desc=f"{level_dir.name}: reading",
                                                      unit="image"):
        png = level_dir / folder / name
        image = read_image(png, resolution, meta, line)
        if image is None:
            skipped["empty_files" if png.stat().st_size == 0 else "all_black"] += 1
            continue
        pixels.append(image)
        labels.append(label)
    if not pixels:
        raise format_error(level_dir / "metadata", None, "metadata lines naming non-empty images", "none")
    return np.stack(pixels), np.asarray(labels, dtype=np.int64), skipped


def lra_split_sizes(n: int) -> tuple[int, int, int]:
    """80/10/10 by order: val and test get ``int(0.1 n)`` each, train the rest."""
    n_val = n_test = int(0.1 * n)
    return n - n_val - n_test, n_val, n_test


def write_generated(root: Path, style: PathStyle, level: str, sizes: dict[str, int], seed: int) -> None:
    """Draw ``sizes`` images per split and write the official layout under ``root`` atomically."""

    def write(tmp: Path) -> None:
        level_dir = tmp / f"pathfinder{style.resolution}" / level
        (level_dir / "metadata").mkdir(parents=True)
        lines: dict[int, list[str]] = {}
        index = 0
        bar = progress(total=sum(sizes.values()), desc=f"pathfinder{style.resolution}: drawing",
                       unit="image")
        for split_id, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, split_id])
            for label in balanced_labels(rng, sizes[split]):
                bar.update()
                drawing = draw_pathfinder(rng, style, int(label))
                batch, i = divmod(index, GENERATED_BATCH)
                folder = level_dir / "imgs" / str(batch)
                folder.mkdir(parents=True, exist_ok=True)
                PILImage.fromarray(drawing.image).save(folder / f"sample_{i}.png", compress_level=1)
                # fields after the label, like snakes2: turn, contour and distractor length, paddle
                # length, width and gap, markers
                lines.setdefault(batch, []).append(
                    f"imgs/{batch} sample_{i}.png {i} {drawing.label} {style.max_turn_deg:g} "
                    f"{style.contour_length} {style.distractor_length} {style.paddle_length:g} "
                    f"{style.paddle_width:g} {style.paddle_gap:g} 2"
                )
                index += 1
        bar.close()
        for batch, batch_lines in lines.items():
            (level_dir / "metadata" / f"{batch}.npy").write_text("\n".join(batch_lines) + "\n")

    atomic_write_dir(root, write)


class Pathfinder(FileTask):
    """LRA Pathfinder / Path-X as a 2-way ``classify`` task over grey-level tokens.

    Args:
        source: ``lra`` (read the release under ``data_dir``) or ``generate`` (draw, cached).
        data_dir: the folder holding ``pathfinder<resolution>/`` (``source=lra``).
        resolution: image side: 32 (Pathfinder) or 128 (Path-X); the release also has 64, 256.
        level: ``curv_baseline``, ``curv_contour_length_9`` or ``curv_contour_length_14``; for
            ``generate`` it sets the paddles per path (6, 9, 14).
        seq_len: must be ``resolution**2``; present so that every task has ``task.seq_len``.
        n_train, n_val, n_test: generated images per split (``source=generate``).
        n_distractors, distractor_length: distractor curves per image and their paddles
            (``None``: a third of the path's, as in snakes2).
        paddle_length, paddle_gap, paddle_width, marker_radius, max_turn_deg, clearance,
        start_distance: drawing style, see :class:`tasks.pathfinder_draw.PathStyle`.
        seed: generator seed; the data are a pure function of the knobs and this seed.
        cache_dir: where generated images and token tensors are cached (``None``: default).
    """

    def __init__(
        self, *, source: str, data_dir: str | None, resolution: int, level: str, seq_len: int,
        n_train: int, n_val: int, n_test: int, n_distractors: int, distractor_length: int | None,
        paddle_length: float, paddle_gap: float, paddle_width: float, marker_radius: float,
        max_turn_deg: float, clearance: float, start_distance: float, seed: int, cache_dir: str | None = None,
    ):
        self.name = {32: "pathfinder", 128: "pathx"}.get(resolution, f"pathfinder{resolution}")
        if level not in LEVELS:
            raise ValueError(f"task.level must be one of {sorted(LEVELS)}, got {level!r}")
        if seq_len != resolution * resolution:
            raise ValueError(f"task.seq_len is fixed at {resolution * resolution} ({resolution}x{resolution} "
                             f"pixels) for {self.name}, got {seq_len}; change task.resolution instead")
        source = resolve_source(self.name, source, data_dir)
        if source == "generate" and min(n_train, n_val, n_test) < 1:
            raise ValueError("task.n_train, task.n_val and task.n_test must be >= 1 for task.source=generate")
        contour = LEVELS[level]
        self.style = PathStyle(
            resolution=resolution, contour_length=contour, n_distractors=n_distractors,
            distractor_length=distractor_length or max(1, round(contour / 3)), paddle_length=paddle_length,
            paddle_gap=paddle_gap, paddle_width=paddle_width, marker_radius=marker_radius,
            max_turn_deg=max_turn_deg, clearance=clearance, start_distance=start_distance,
        )
        self.source, self.data_dir, self.resolution, self.level, self.seed = source, data_dir, resolution, level, seed
        self.sizes = dict(train=n_train, val=n_val, test=n_test)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.spec = TaskSpec(kind="classify", vocab_size=VOCAB_SIZE, n_outputs=2, seq_len=seq_len, pad_id=PAD_ID)
        self.skipped: dict[str, int] = {}

    def level_dir(self) -> Path:
        """``pathfinder<R>/<level>`` of the release, or of the generated copy in the cache."""
        sub = Path(f"pathfinder{self.resolution}") / self.level
        if self.source == "generate":
            params = dict(style=vars(self.style), level=self.level, sizes=self.sizes, seed=self.seed, version=1)
            root = self.cache_dir / f"{self.name}-gen-{cache_key(self.name + '-gen', params)}"
            if not root.exists():
                write_generated(root, self.style, self.level, self.sizes, self.seed)
            return root / sub
        if self.data_dir is None:
            raise ValueError(f"{self.name}: task.source=lra needs task.data_dir. {HOW_TO_GET}")
        base = Path(self.data_dir)
        # accept the folder above pathfinderN/, the unpacked lra_release/ above that, or pathfinderN/ itself
        for candidate in (base / sub, base / "lra_release" / sub, base / self.level):
            if metadata_files(candidate):
                return candidate
        raise missing_data(self.name, self.data_dir, [base / sub / "metadata" / "<batch>.npy"], HOW_TO_GET)

    def _build(self, level_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
        pixels, labels, skipped = read_level(level_dir, self.resolution)
        n = len(labels)
        sizes = [self.sizes[s] for s in SPLITS] if self.source == "generate" else lra_split_sizes(n)
        if sum(sizes) != n:
            raise format_error(level_dir / "metadata", None, f"{sum(sizes)} images (the generated counts)", f"{n}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        start = 0
        for split, size in zip(SPLITS, sizes):
            part = slice(start, start + size)
            # grey levels 0-255 and labels 0/1 fit uint8 (the pad id 256 is never stored)
            out[split] = {"tokens": torch.from_numpy(pixels[part].astype(np.uint8)),
                          "label": torch.from_numpy(labels[part].astype(np.uint8))}
            start += size
        out["skipped"] = {k: torch.tensor([v]) for k, v in skipped.items()}
        return out

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        """The level's images (released, or drawn into the cache) as tokens, split, cached."""
        level_dir = self.level_dir()
        files = metadata_files(level_dir) + sorted(p for p in (level_dir / "imgs").glob("*") if p.is_dir())
        params = dict(files=fingerprint(files), resolution=self.resolution, level=self.level,
                      sizes=self.sizes if self.source == "generate" else "80/10/10",
                      version=2)  # version 2: uint8 (version 1: int16)
        loaded = dict(cached_splits(self.name, params, lambda: self._build(level_dir), self.cache_dir))
        self.skipped = {k: int(v) for k, v in loaded.pop("skipped").items()}
        return loaded

    def describe(self) -> str:
        """Images per split, label balance, and pixel statistics (overall and per label)."""
        splits = self.splits()
        R = self.resolution
        lines = [f"{self.name} (source={self.source}, level={self.level}, {R}x{R} = {R * R} tokens, "
                 f"pad id {PAD_ID} never used)"]
        for split, arrays in splits.items():
            tokens, label = arrays["tokens"], arrays["label"].long()
            n = len(label)
            share = ", ".join(f"{c}: {k / max(n, 1):.1%}" for c, k in enumerate(torch.bincount(label, minlength=2).tolist()))
            lines.append(f"  {split:5s} {n:7d} images; labels {share}")
            if n == 0:
                continue
            ink = (tokens > 0).double().mean(1)  # share of non-black pixels per image
            per_label = ", ".join(f"label {c} {ink[label == c].mean():.1%}" for c in (0, 1) if (label == c).any())
            lines.append(f"        grey mean {tokens.double().mean():.1f}, white (255) {(tokens == 255).double().mean():.1%}"
                         f", non-black {ink.mean():.1%} ({per_label})")
        lines.append(f"  skipped: {self.skipped.get('empty_files', 0)} empty files, "
                     f"{self.skipped.get('all_black', 0)} all-black images")
        lines.append(describe_storage(splits))
        return "\n".join(lines)
