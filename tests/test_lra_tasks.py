"""LRA ListOps, Text, Retrieval and Image: loaders on tiny fixtures in the official formats, the
ListOps generator, the error messages for bad data, and models built on each task."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lra_fixtures import AAN_ROWS, IMDB, write_aan, write_cifar, write_imdb
from tasks import listops as lo
from tasks.image import Image, to_grey
from tasks.listops import ListOps
from tasks.lra_io import DataFormatError
from tasks.retrieval import Retrieval
from tasks.text import Text

# ---------------------------------------------------------------------------------- fixtures


def write_listops(directory: Path, rows: dict[str, list[tuple[str, int]]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        lines = ["Source\tTarget"] + [f"{s}\t{t}" for s, t in split_rows]
        (directory / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return directory


MAX_2_9 = "( ( ( [MAX 2 ) 9 ) ] )"  # [MAX 2 9 ] = 9
NESTED = "( ( ( ( [SM 3 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 8 ) ] )"  # [SM 3 [MIN 4 7 ] 8 ] = 5
LISTOPS_ROWS = {"train": [(MAX_2_9, 9), (NESTED, 5)], "val": [(NESTED, 5)], "test": [(MAX_2_9, 9)]}


def listops_task(tmp_path: Path, **overrides) -> ListOps:
    kw = dict(source="lra", data_dir=str(tmp_path / "listops"), seq_len=8, n_train=60, n_val=10,
              n_test=10, min_length=10, max_length=60, max_depth=10, max_args=10, seed=0,
              cache_dir=str(tmp_path / "cache"))
    kw.update(overrides)
    return ListOps(**kw)


# ---------------------------------------------------------------------------------- ListOps


def test_evaluate_matches_numpy_semantics():
    parse = lambda s: lo.parse_tokens(lo.tokenize(s))  # noqa: E731
    assert lo.evaluate(parse("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]")) == 5
    assert lo.evaluate(parse("[MED 3 8 ]")) == 5 and lo.evaluate(parse("[MED 1 2 ]")) == 1
    assert lo.evaluate(parse("[SM 9 8 7 ]")) == 4
    rng = random.Random(0)
    for _ in range(300):
        values = [rng.randrange(10) for _ in range(rng.randint(2, 10))]
        for op, ref in [(lo.MED, int(np.median(values))), (lo.SUM_MOD, int(np.sum(values) % 10)),
                        (lo.MIN, min(values)), (lo.MAX, max(values))]:
            assert lo.evaluate((op, tuple(values))) == ref


def test_to_source_is_lra_nesting_and_parses_back():
    assert lo.to_source((lo.MAX, (2, 9))) == MAX_2_9
    tree = (lo.SUM_MOD, (3, (lo.MIN, (4, 7)), 8))
    assert lo.to_source(tree) == NESTED
    assert lo.tokenize(NESTED) == ["[SM", "3", "[MIN", "4", "7", "]", "8", "]"]
    assert lo.parse_tokens(lo.tokenize(NESTED)) == tree and lo.evaluate(tree) == 5


def test_generator_properties():
    params = dict(n_train=150, n_val=25, n_test=25, min_length=20, max_length=120, max_depth=6,
                  max_args=4, seed=1)
    splits = lo.generate_listops(**params)
    rows = [r for s in ("train", "val", "test") for r in splits[s]]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [150, 25, 25]
    assert len({src for src, _ in rows}) == 200  # deduplicated
    n_args = set()

    def depth_and_args(t, d=1):
        if isinstance(t, int):
            return d
        n_args.add(len(t[1]))
        return max(depth_and_args(c, d + 1) for c in t[1])

    for source, label in rows:
        tokens = lo.tokenize(source)
        tree = lo.parse_tokens(tokens)
        assert lo.to_source(tree) == source
        assert label == lo.evaluate(tree)
        assert 20 < len(tokens) < 120 and len(tokens) == lo.tree_length(tree)
        assert depth_and_args(tree) <= 6
    assert n_args == {2, 3, 4}  # randint(2, max_args) includes both ends
    assert lo.generate_listops(**params) == splits
    assert lo.generate_listops(**{**params, "seed": 2}) != splits
    with pytest.raises(ValueError, match="min_length"):
        lo.generate_listops(**{**params, "min_length": 50, "max_length": 51})


def test_generate_source_writes_tsv_and_caches(tmp_path):
    task = listops_task(tmp_path, source="generate", seq_len=64)
    train = task.dataset("train")
    assert len(train) == 60 and len(task.dataset("val")) == 10 and len(task.dataset("test")) == 10
    (gen_dir,) = (tmp_path / "cache").glob("listops-gen-*")
    lines = (gen_dir / "basic_train.tsv").read_text().splitlines()
    assert lines[0] == "Source\tTarget" and len(lines) == 61
    source, target = lines[1].split("\t")
    ids = [lo.TOKEN_ID[t] for t in lo.tokenize(source)]
    assert train[0]["tokens"][: len(ids)].tolist() == ids[:64] and int(train[0]["label"]) == int(target)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp left
    # 16 ids and 10 labels are stored in one byte each, and describe() says so with the sizes
    assert train.arrays["tokens"].dtype == train.arrays["label"].dtype == torch.uint8
    text = task.describe()
    assert "stored as tokens uint8, label uint8; 5.2 KB in memory" in text  # 80 x 64 + 80 bytes
    assert "generated TSVs:" in text
    again = listops_task(tmp_path, source="generate", seq_len=64).dataset("train")
    assert torch.equal(again.arrays["tokens"], train.arrays["tokens"])
    other = listops_task(tmp_path, source="generate", seq_len=64, seed=1).dataset("train")
    assert not torch.equal(other.arrays["tokens"], train.arrays["tokens"])


def test_listops_loader_reads_official_tsv(tmp_path):
    write_listops(tmp_path / "listops", LISTOPS_ROWS)
    task = listops_task(tmp_path, seq_len=6)
    batch = task.dataset("train")[[0, 1]]
    t = lo.TOKEN_ID
    assert batch["tokens"].tolist() == [
        [t["[MAX"], t["2"], t["9"], t["]"], 0, 0],  # padded on the right
        [t["[SM"], t["3"], t["[MIN"], t["4"], t["7"], t["]"]],  # cut to seq_len
    ]
    assert batch["label"].tolist() == [9, 5] and task.spec.vocab_size == 16 and task.spec.n_outputs == 10
    text = task.describe()
    assert "train       2 examples" in text and "5: 50.0%" in text


@pytest.mark.parametrize("split, content, where, found", [
    ("val", "Source\tLabel\n", "basic_val.tsv:1", "'Source\\tLabel'"),
    ("val", "Source\tTarget\n( [MAX 1 ] )\t1\n( [MAX 1 2 ] )\n", "basic_val.tsv:3", "1 field(s)"),
    ("test", "Source\tTarget\n( [MAX 1 ] )\t12\n", "basic_test.tsv:2", "'12'"),
    ("test", "Source\tTarget\n( [MAX 1 ] )\t1\n( [POW 1 ] )\t1\n", "basic_test.tsv:3", "unknown token '[POW'"),
    ("train", "", "basic_train.tsv:1", "an empty file"),
    ("train", "Source\tTarget\n", "basic_train.tsv:2", "none"),
])
def test_listops_malformed_rows_name_file_and_line(tmp_path, split, content, where, found):
    directory = write_listops(tmp_path / "listops", LISTOPS_ROWS)
    (directory / f"basic_{split}.tsv").write_text(content)
    with pytest.raises(DataFormatError) as err:
        listops_task(tmp_path).dataset("train")
    assert where in str(err.value) and found in str(err.value) and "expected" in str(err.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing cached


def test_listops_missing_dir_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        listops_task(tmp_path).dataset("train")
    msg = str(err.value)
    assert "task.data_dir" in msg and "basic_train.tsv" in msg and "lra_release" in msg
    assert "task.source=generate" in msg


def test_cache_follows_data_file_changes(tmp_path):
    directory = write_listops(tmp_path / "listops", LISTOPS_ROWS)
    assert listops_task(tmp_path).dataset("test")[0]["label"] == 9
    write_listops(directory, {"test": [(NESTED, 5), (NESTED, 5)]})
    assert listops_task(tmp_path).dataset("test").arrays["label"].tolist() == [5, 5]


# ---------------------------------------------------------------------------------- Text


def test_text_reads_aclimdb_bytes(tmp_path):
    write_imdb(tmp_path, IMDB)
    task = Text(data_dir=str(tmp_path), seq_len=8, val_split="test", seed=0, cache_dir=str(tmp_path / "c"))
    train = task.dataset("train")
    assert len(train) == 20 and train.arrays["label"].tolist() == [0] * 10 + [1] * 10
    assert train[0]["tokens"].tolist() == [ord(c) + 1 for c in "Bad."] + [0] * 4  # stripped, +1, padded
    assert train[10]["tokens"].tolist() == [ord(c) + 1 for c in "Great mo"]  # cut to seq_len
    assert train[11]["tokens"].tolist()[:6] == [c + 1 for c in "caf\u00e9".encode()] + [0]  # bytes, not chars
    assert torch.equal(task.dataset("val").arrays["tokens"], task.dataset("test").arrays["tokens"])
    assert task.spec.vocab_size == 257 and task.spec.pad_id == 0
    assert "val         2 examples" in task.describe()


def test_text_holdout_is_a_fixed_tenth_of_train(tmp_path):
    write_imdb(tmp_path, IMDB)
    make = lambda seed: Text(data_dir=str(tmp_path / "aclImdb"), seq_len=8, val_split="holdout",  # noqa: E731
                             seed=seed, cache_dir=str(tmp_path / "c"))
    task = make(0)
    train, val = task.dataset("train").arrays, task.dataset("val").arrays
    assert len(train["label"]) == 18 and len(val["label"]) == 2 and len(task.dataset("test")) == 2
    rows = {tuple(r) for r in torch.cat([train["tokens"], val["tokens"]]).tolist()}
    assert len(rows) == 20  # a partition of the 20 training reviews
    assert torch.equal(make(0).dataset("val").arrays["tokens"], val["tokens"])


def test_text_errors(tmp_path):
    write_imdb(tmp_path, IMDB)
    (tmp_path / "aclImdb" / "test" / "pos" / "5_9.txt").write_bytes(b" \n")
    task = Text(data_dir=str(tmp_path), seq_len=8, val_split="test", seed=0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataFormatError, match=r"5_9\.txt:1: expected the text of a review, found an empty file"):
        task.dataset("train")
    with pytest.raises(FileNotFoundError, match=r"(?s)train/pos.*aclImdb_v1\.tar\.gz"):
        Text(data_dir=str(tmp_path / "nowhere"), seq_len=8, val_split="test", seed=0).dataset("train")


# ---------------------------------------------------------------------------------- Retrieval


def test_retrieval_reads_aan_rows(tmp_path):
    write_aan(tmp_path / "aan", AAN_ROWS)
    task = Retrieval(data_dir=str(tmp_path / "aan"), seq_len=2, cache_dir=str(tmp_path / "c"))
    batch = task.dataset("train")[[0, 1]]
    assert set(batch) == {"tokens", "tokens2", "label"} and task.spec.kind == "pair"
    assert batch["tokens"].tolist() == [[ord("a") + 1, ord("b") + 1], [ord('"') + 1, ord("q") + 1]]
    assert batch["tokens2"].tolist() == [[ord("c") + 1, ord("d") + 1], [ord("x") + 1, ord(" ") + 1]]
    assert batch["label"].tolist() == [1, 0] and task.dataset("val")[0]["label"] == 1
    assert "tokens2: length" in task.describe()


def test_retrieval_cuts_documents_at_10000_bytes_first(tmp_path):
    long_text = "a" * 11000
    write_aan(tmp_path / "aan", {**AAN_ROWS, "test": [f"1\tA\tB\t{long_text}\tb"]})
    task = Retrieval(data_dir=str(tmp_path / "aan"), seq_len=12000, cache_dir=str(tmp_path / "c"))
    test = task.dataset("test")[0]
    assert int((test["tokens"] != 0).sum()) == 10000 and int((test["tokens2"] != 0).sum()) == 1


@pytest.mark.parametrize("split, lines, where, found", [
    ("val", ["1\tA\tB\tx\ty", "1\tA\tB\tx"], "new_aan_pairs.eval.tsv:2", "4 field(s)"),
    ("test", ["2\tA\tB\tx\ty"], "new_aan_pairs.test.tsv:1", "a label 0 or 1 in column 1, found '2'"),
    ("train", [], "new_aan_pairs.train.tsv:1", "an empty file"),
])
def test_retrieval_malformed(tmp_path, split, lines, where, found):
    write_aan(tmp_path / "aan", {**AAN_ROWS, split: lines})
    with pytest.raises(DataFormatError) as err:
        Retrieval(data_dir=str(tmp_path / "aan"), seq_len=4, cache_dir=str(tmp_path / "c")).dataset("train")
    assert where in str(err.value) and found in str(err.value)
    with pytest.raises(FileNotFoundError, match="new_aan_pairs.train.tsv"):
        Retrieval(data_dir=str(tmp_path / "none"), seq_len=4).dataset("train")


# ---------------------------------------------------------------------------------- Image


def test_grey_matches_tf_rgb_to_grayscale():
    # TF: uint8(trunc(float32(x / 255) . (0.2989, 0.587, 0.114) * 255.5))
    data = np.zeros((5, 3072), dtype=np.uint8)
    for k, (r, g, b) in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (10, 20, 30)]):
        data[k, 0], data[k, 1024], data[k, 2048] = r, g, b
    assert to_grey(data)[:, 0].tolist() == [76, 149, 29, 255, 18]  # 18.10: 0.2989*10+0.587*20+0.114*30
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(64, 3072), dtype=np.uint8)
    ref = (rgb.reshape(64, 3, 1024).astype(np.float64) / 255 * np.array([0.2989, 0.587, 0.114])[None, :, None])
    ref = np.floor(ref.sum(1) * 255.5)
    assert np.abs(to_grey(rgb) - ref).max() <= 1 and (to_grey(rgb) == ref).mean() > 0.99


def test_image_reads_cifar_batches(tmp_path):
    directory, made = write_cifar(tmp_path / "cifar-10-batches-py")
    task = Image(data_dir=str(tmp_path), seq_len=1024, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    train, val, test = (task.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 4)
    all_labels = [y for n in [f"data_batch_{i}" for i in range(1, 6)] for y in made[n][1]]
    assert train.arrays["label"].tolist() + val.arrays["label"].tolist() == all_labels  # file order
    assert test.arrays["label"].tolist() == made["test_batch"][1]
    assert test.arrays["tokens"].shape == (4, 1024) and test.arrays["tokens"][:, 0].tolist() == [76, 149, 29, 255]
    expected = torch.from_numpy(to_grey(made["test_batch"][0]))
    assert torch.equal(test.arrays["tokens"], expected)  # raster order, no padding
    assert task.spec.pad_id == 256 and int(train.arrays["tokens"].max()) <= 255
    assert "test        4 examples" in task.describe()


@pytest.mark.parametrize("payload, found", [
    ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "(2, 3000)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "entry 1 of b'labels': expected a class 0-9, found 10"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 labels"),
    ({b"labels": [0]}, "b'data' and b'labels'"),
    (None, "an empty file"),
])
def test_image_malformed(tmp_path, payload, found):
    directory, _ = write_cifar(tmp_path / "cifar-10-batches-py")
    with open(directory / "data_batch_3", "wb") as f:
        if payload is not None:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(DataFormatError) as err:
        Image(data_dir=str(directory), seq_len=1024, val_fraction=0.1, cache_dir=str(tmp_path / "c")).dataset("val")
    assert "data_batch_3" in str(err.value) and found in str(err.value)
    assert not (tmp_path / "c").exists()


def test_image_refuses_code_in_pickles_and_missing_files(tmp_path):
    directory, _ = write_cifar(tmp_path / "cifar-10-batches-py")
    with open(directory / "test_batch", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)
    with pytest.raises(DataFormatError, match="refusing to load"):
        Image(data_dir=str(directory), seq_len=1024, val_fraction=0.1, cache_dir=str(tmp_path / "c")).dataset("val")
    os.remove(directory / "data_batch_5")
    with pytest.raises(FileNotFoundError, match=r"(?s)data_batch_5.*cifar-10-python\.tar\.gz"):
        Image(data_dir=str(tmp_path), seq_len=1024, val_fraction=0.1).dataset("val")
    with pytest.raises(ValueError, match="task.seq_len"):
        Image(data_dir=str(tmp_path), seq_len=2048, val_fraction=0.1)


# ---------------------------------------------------------------------------------- models


SMALL_MODEL = ["model=transformer", "model.d_model=16", "model.n_layers=1", "model.d_ff=32", "model.mixer.n_heads=2"]


def test_models_build_on_every_lra_task(tmp_path):
    from harness.api import build

    write_imdb(tmp_path, IMDB)
    write_aan(tmp_path / "aan", AAN_ROWS)
    write_cifar(tmp_path / "cifar")
    cache = f"task.cache_dir={tmp_path / 'cache'}"
    cases = {
        "listops": ["task.source=generate", "task.n_train=20", "task.n_val=4", "task.n_test=4",
                    "task.min_length=10", "task.max_length=60", "task.seq_len=64"],
        "text": [f"task.data_dir={tmp_path}", "task.seq_len=32"],
        "retrieval": [f"task.data_dir={tmp_path / 'aan'}", "task.seq_len=16"],
        "image": [f"task.data_dir={tmp_path / 'cifar'}"],
    }
    for name, overrides in cases.items():
        built = build([*SMALL_MODEL, f"task={name}", cache, *overrides])
        logits = built.model(built.task.dataset("val")[[0]])  # indexing gives int64: no cast
        assert logits.shape == (1, built.task.spec.n_outputs), name
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["listops", "pathfinder", "pathx"])
def test_with_no_data_folder_the_default_is_the_generator_and_with_one_the_release(name):
    from harness.api import build

    assert build([f"task={name}"]).task.source == "generate"
    assert build([f"task={name}", "task.data_dir=/data/lra_release"]).task.source == "lra"
