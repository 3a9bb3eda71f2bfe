"""LRA Pathfinder / Path-X: the loader on tiny fixtures in the official layout, its error messages,
the procedural generator (determinism, balance, sizes, labels against ground truth and against
the connectivity of the drawn paths), and a model built on the task."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.api import build
from harness.config import CONF_DIR
from tasks.lra_io import DataFormatError
from tasks.pathfinder import Pathfinder
from tasks.pathfinder_draw import PathStyle, draw_pathfinder

LEVEL = "curv_contour_length_14"

# ---------------------------------------------------------------------------------- fixtures


def yaml_kwargs(name: str, **overrides) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml"))
    node.pop("name"), node.pop("_target_")
    node.update(overrides)
    return node


def task(tmp_path: Path, name: str = "pathfinder", **overrides) -> Pathfinder:
    kw = dict(data_dir=str(tmp_path / "lra_release"), cache_dir=str(tmp_path / "cache"))
    kw.update(overrides)
    return Pathfinder(**yaml_kwargs(name, **kw))


def write_release(root: Path, batches: dict[int, list], resolution: int = 32) -> Path:
    """``pathfinder<R>/<LEVEL>`` with one metadata file per batch. An entry is ``(label, pixels)``
    with pixels a (R, R) uint8 array, ``b""`` for a 0-byte file, or bytes written as they are."""
    level = root / f"pathfinder{resolution}" / LEVEL
    (level / "metadata").mkdir(parents=True, exist_ok=True)
    for batch, entries in batches.items():
        (level / "imgs" / str(batch)).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (label, pixels) in enumerate(entries):
            png = level / "imgs" / str(batch) / f"sample_{i}.png"
            if isinstance(pixels, bytes):
                png.write_bytes(pixels)
            else:
                Image.fromarray(pixels).save(png)
            lines.append(f"imgs/{batch} sample_{i}.png {i} {label} 1.8 14 5 2 1.5 3 1")
        (level / "metadata" / f"{batch}.npy").write_text("\n".join(lines) + "\n")
    return level


def random_images(rng: np.random.Generator, n: int, resolution: int = 32) -> list[tuple[int, np.ndarray]]:
    return [(int(rng.integers(2)), rng.integers(1, 256, (resolution, resolution), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------------ loader


def test_loader_reads_official_layout(tmp_path):
    rng = np.random.default_rng(0)
    first, second = random_images(rng, 9), random_images(rng, 11)
    black = np.zeros((32, 32), dtype=np.uint8)
    # batch 10 must come after batch 2 (numeric order); one 0-byte file and one all-black image
    write_release(tmp_path / "lra_release", {10: second, 2: first[:4] + [(1, b"")] + first[4:] + [(0, black)]})
    t = task(tmp_path)
    expected = first + second
    train, val, test = (t.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (16, 2, 2)  # 80/10/10 of 20 kept images, in order
    tokens = torch.cat([d.arrays["tokens"] for d in (train, val, test)])
    labels = torch.cat([d.arrays["label"] for d in (train, val, test)])
    assert tokens.shape == (20, 1024) and tokens.dtype == torch.uint8
    assert torch.equal(tokens, torch.from_numpy(np.stack([p.reshape(-1) for _, p in expected])))
    assert labels.tolist() == [y for y, _ in expected]
    assert t.spec.vocab_size == 257 and t.spec.pad_id == 256 and t.spec.n_outputs == 2
    text = t.describe()
    assert "train      16 images" in text and "skipped: 1 empty files, 1 all-black images" in text


def test_binary_npy_metadata_and_release_folder_above(tmp_path):
    """A metadata file saved by np.save (string array) reads like the text one; data_dir may be
    the folder above the unpacked lra_release/."""
    rng = np.random.default_rng(1)
    level = write_release(tmp_path / "lra_release", {0: random_images(rng, 10)})
    text_rows = [line.split() for line in (level / "metadata" / "0.npy").read_text().splitlines()]
    np.save(level / "metadata" / "0.npy", np.array(text_rows))
    t = task(tmp_path, data_dir=str(tmp_path))
    assert len(t.dataset("train")) == 8


def test_building_reads_no_data_and_missing_data_says_where(tmp_path):
    t = task(tmp_path, data_dir=str(tmp_path / "nowhere"))  # no error yet: lazy
    with pytest.raises(FileNotFoundError) as e:
        t.dataset("train")
    msg = str(e.value)
    assert "nowhere" in msg and "pathfinder32/curv_contour_length_14/metadata" in msg
    assert "lra_release.gz" in msg and "task.source=generate" in msg


def test_seq_len_is_fixed_by_resolution(tmp_path):
    with pytest.raises(ValueError, match=r"task.seq_len is fixed at 1024"):
        task(tmp_path, seq_len=2048)
    with pytest.raises(ValueError, match=r"task.seq_len is fixed at 16384 .* for pathx"):
        task(tmp_path, "pathx", seq_len=1024)
    with pytest.raises(ValueError, match="task.level"):
        task(tmp_path, level="curv_contour_length_7")


def _break(level: Path, case: str) -> str:
    """Spoil line 3 of 0.npy (or its image); returns the expected message fragment."""
    meta = level / "metadata" / "0.npy"
    lines = meta.read_text().splitlines()
    png = level / "imgs" / "0" / "sample_2.png"
    if case == "short line":
        lines[2] = "imgs/0 sample_2.png 2"
        meta.write_text("\n".join(lines) + "\n")
        return r"0\.npy:3: expected at least 4 space-separated fields .* found 3 in 'imgs/0 sample_2.png 2'"
    if case == "bad label":
        lines[2] = lines[2].replace("sample_2.png 2 1", "sample_2.png 2 2").replace("sample_2.png 2 0", "sample_2.png 2 2")
        meta.write_text("\n".join(lines) + "\n")
        return r"0\.npy:3: expected a label 0 or 1 in field 3, found '2'"
    if case == "missing image":
        png.unlink()
        return r"0\.npy:3: expected an image at .*sample_2\.png, found no such file"
    if case == "wrong size":
        Image.fromarray(np.full((30, 28), 7, dtype=np.uint8)).save(png)
        return r"0\.npy:3: expected a 32x32 image at .*imgs/0/sample_2\.png, found a 28x30 image"
    png.write_bytes(b"not a png at all")
    return r"0\.npy:3: expected a readable PNG image at .*sample_2\.png, found UnidentifiedImageError"


@pytest.mark.parametrize("case", ["short line", "bad label", "missing image", "wrong size", "unreadable"])
def test_malformed_data_names_file_and_line_and_caches_nothing(tmp_path, case):
    rng = np.random.default_rng(2)
    images = random_images(rng, 10)
    level = write_release(tmp_path / "lra_release", {0: images})
    expected = _break(level, case)
    with pytest.raises(DataFormatError, match=expected):
        task(tmp_path).dataset("train")
    assert not list((tmp_path / "cache").glob("*.pt")), "nothing half-loaded may be cached"
    write_release(tmp_path / "lra_release", {0: images})  # repaired: loads in full
    assert len(task(tmp_path).dataset("train")) == 8


# --------------------------------------------------------------------------------- generator


def style_of(name: str) -> PathStyle:
    t = Pathfinder(**yaml_kwargs(name))
    return t.style


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (0 outside), by max-propagation."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        h, w = mask.shape
        best = np.max([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)
        new = np.where(mask, best, 0)
        if np.array_equal(new, labels):
            return labels
        labels = new


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)
    return mask


@pytest.mark.parametrize("name,n_images", [("pathfinder", 24), ("pathx", 6)])
def test_labels_agree_with_ground_truth_and_drawn_connectivity(name, n_images):
    """Each curve drawn alone: its pixels, grouped into components after closing the paddle gaps
    (a dilation by half a gap), and each marker's core (pixels whose centre lies within one
    pixel of the marker's): both markers touch one component of one curve iff label 1."""
    style = style_of(name)
    rng = np.random.default_rng(3)
    bridge = math.ceil(style.paddle_gap / 2)
    yy, xx = np.mgrid[: style.resolution, : style.resolution]
    for i in range(n_images):
        label = i % 2
        d = draw_pathfinder(rng, style, label, with_masks=True)
        assert d.image.shape == (style.resolution, style.resolution) and d.image.dtype == np.uint8
        assert d.label == label == int(d.marker_paths[0] == d.marker_paths[1])
        cores = [np.hypot(xx - x, yy - y) <= 1.0 for x, y in d.marker_centres]
        for core, marker in zip(cores, d.marker_masks):
            assert marker[core].all() and (d.image[core] == 255).any(), "markers are drawn white"
        touched = [set(), set()]  # per marker: the (curve, component) pairs its core overlaps
        for k, mask in enumerate(d.curve_masks):
            comp = np.where(mask, components(dilate(mask, bridge)), 0)
            for m, core in enumerate(cores):
                touched[m] |= {(k, c) for c in np.unique(comp[core]) if c}
        assert [{k for k, _ in t} for t in touched] == [{d.marker_paths[0]}, {d.marker_paths[1]}], \
            "each marker touches its ground-truth path and no other curve"
        assert [len(t) for t in touched] == [1, 1]
        assert bool(touched[0] & touched[1]) == (label == 1)


def test_generated_task_is_deterministic_balanced_and_sized(tmp_path):
    small = dict(source="generate", n_train=12, n_val=4, n_test=6)
    a = task(tmp_path, cache_dir=str(tmp_path / "a"), **small)
    b = task(tmp_path, cache_dir=str(tmp_path / "b"), **small)
    c = task(tmp_path, cache_dir=str(tmp_path / "c"), **{**small, "seed": 1})
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        da, db, dc = a.dataset(split).arrays, b.dataset(split).arrays, c.dataset(split).arrays
        assert da["tokens"].shape == (n, 1024)
        assert torch.equal(da["tokens"], db["tokens"]) and torch.equal(da["label"], db["label"])
        assert not torch.equal(da["tokens"], dc["tokens"])
        assert int(da["label"].sum()) == n // 2, "exactly half positive"
        assert int(da["tokens"].max()) == 255 and int(da["tokens"].min()) == 0
    # the same layout as the release: the loader read PNGs and text metadata from the cache
    metadata = list((tmp_path / "a").glob(f"pathfinder-gen-*/pathfinder32/{LEVEL}/metadata/0.npy"))
    assert len(metadata) == 1 and len(metadata[0].read_text().splitlines()) == 22
    assert "label 0" in a.describe() and "0 empty files" in a.describe()


def test_generated_pathx_is_128x128(tmp_path):
    t = task(tmp_path, "pathx", source="generate", n_train=2, n_val=2, n_test=2)
    arrays = t.dataset("train").arrays
    assert t.spec.seq_len == 16384 and arrays["tokens"].shape == (2, 16384)
    assert arrays["label"].tolist().count(1) == 1


def test_model_builds_and_runs_on_generated_pathfinder(tmp_path):
    built = build(["model=transformer", "task=pathfinder", "task.source=generate", "task.n_train=4",
                   "task.n_val=2", "task.n_test=2", f"task.cache_dir={tmp_path / 'cache'}",
                   "model.d_model=32", "model.n_layers=1", "model.d_ff=64", "model.mixer.n_heads=2"])
    batch = built.task.dataset("train")[[0, 1, 2]]
    with torch.no_grad():
        logits = built.model.eval()(batch)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
