"""Every task trains for a few steps with ``transformer`` and ``lstm`` through ``arena-train``.

    .venv/bin/python bench/smoke_every_task.py [--fixtures /tmp/lra_fixtures] [--tasks text,mqar]

For each task it builds the task as ``arena-train`` would (``harness.api.compose_config`` with
the same overrides), prints ``task.describe()`` (examples per split, lengths, label balance),
then runs::

    arena-train -m model=transformer,lstm task=<task> trainer=smoke logger=none <small overrides>
        sweep.name=smoke_tasks force=true

and prints each record's status and val/test metric. Exits non-zero when a record is not ``ok``
(``unsupported`` passes only when the model raised ``UnsupportedTask`` for the pairing).

Generated tasks run as they are, at small sizes (ListOps and Pathfinder both from the generator
and from the release format, Path-X from the generator). Text, Retrieval, Image and the
``source=lra`` ListOps/Pathfinder read small fixtures written here in the official release
layouts under ``--fixtures`` (outside the repository; rewritten when the fixture version
changes)::

    aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt (+ unsup/, urls_*.txt, imdb.vocab, README)
    tsv_data/new_aan_pairs.{train,eval,test}.tsv     label<TAB>id1<TAB>id2<TAB>text1<TAB>text2
    cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta (protocol-2 pickles)
    listops-1000/basic_{train,val,test}.tsv          csv.writer(delimiter="\\t"), CRLF, header
    pathfinder32/curv_contour_length_14/{imgs/<b>/sample_<i>.png, metadata/<b>.npy (text)}

Generated data and tokenised fixtures are cached under ``--cache`` ($SEQ_ARENA_CACHE of the runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.api import build_task, compose_config  # noqa: E402

FIXTURE_VERSION = "1"
MODELS = ("transformer", "lstm")
# a few steps of trainer=smoke: two evaluations, small batches, test split read whole
TRAINER = ["trainer.steps=12", "trainer.eval_every=6", "trainer.checkpoint_every=6",
           "trainer.warmup_steps=2", "trainer.batch_size=8", "trainer.eval_batches=2", "trainer.device=cpu",
           "trainer.threads=1"]  # 2 threads on 2 busy shared cores ran steps ~50x slower
SMALL = ["task.n_train=256", "task.n_val=32", "task.n_test=32"]


def tasks(fx: Path) -> list[tuple[str, list[str], list[str]]]:
    """(task, fixed overrides, swept overrides) per task; swept ones are ``key=a,b``."""
    return [
        ("listops", [*SMALL, "task.min_length=20", "task.max_length=400", "task.seq_len=512",
                     f"task.data_dir={fx / 'listops-1000'}"], ["task.source=generate,lra"]),
        ("text", ["task.seq_len=1000", f"task.data_dir={fx / 'aclImdb'}"], []),
        ("retrieval", ["task.seq_len=512", f"task.data_dir={fx / 'tsv_data'}"], []),
        ("image", [f"task.data_dir={fx / 'cifar-10-batches-py'}"], []),
        ("pathfinder", ["task.n_train=64", "task.n_val=16", "task.n_test=16", f"task.data_dir={fx}"],
         ["task.source=generate,lra"]),
        # 16384 tokens: one example per step, one layer (a 2-layer transformer step is ~13 s on CPU)
        ("pathx", ["task.source=generate", "task.n_train=4", "task.n_val=2", "task.n_test=2",
                   "model.n_layers=1", "trainer.batch_size=1", "trainer.steps=4", "trainer.eval_every=2",
                   "trainer.checkpoint_every=2", "trainer.eval_batches=1"], []),
        ("copying", [*SMALL, "task.seq_len=60"], []),
        ("selective_copying", [*SMALL, "task.seq_len=128", "task.n_tokens=8"], []),
        ("induction_heads", [*SMALL, "task.seq_len=64", "task.eval_seq_lens=[128,256]"], []),
        ("mqar", [*SMALL, "task.seq_len=64", "task.n_pairs=4"], []),
        ("reverse", [*SMALL, "task.seq_len=20"], []),
        ("char_lm", ["task.source=generate", "task.n_bytes=100000", "task.seq_len=128"], []),
    ]


# ------------------------------------------------------------------------------- fixtures

WORDS = ("the film story acting plot scene director cast character music camera script ending "
         "performance years watched role screen actor actress minutes moment audience series "
         "dialogue effects budget book version original time people way life world").split()
POSITIVE = "wonderful brilliant moving superb beautiful great touching excellent memorable funny".split()
NEGATIVE = "boring awful terrible dull waste poorly stupid worst predictable mess".split()
ACADEMIC = ("we propose model models parsing translation corpus annotated results show method "
            "approach statistical features training data evaluation baseline accuracy language "
            "semantic syntactic word sentence alignment grammar lexical dependency tagging "
            "experiments table section figure performance task learning algorithm").split()


def sentence(rng: random.Random, words: tuple | list, extra: list[str], n: int) -> str:
    picked = [rng.choice(extra) if rng.random() < 0.15 else rng.choice(words) for _ in range(n)]
    return " ".join(picked).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def write_imdb(root: Path, rng: random.Random, n: dict[str, int]) -> None:
    """aclImdb as unpacked from aclImdb_v1.tar.gz: neg ratings 1-4, pos 7-10, <br /> tags."""
    root.mkdir(parents=True)
    (root / "imdb.vocab").write_text("\n".join(sorted(set(WORDS + POSITIVE + NEGATIVE))) + "\n")
    (root / "README").write_text("Large Movie Review Dataset v1.0 (fixture)\n")
    for part, count in n.items():
        for label, extra, ratings in (("neg", NEGATIVE, (1, 2, 3, 4)), ("pos", POSITIVE, (7, 8, 9, 10))):
            folder = root / part / label
            folder.mkdir(parents=True)
            urls = []
            for i in range(count):
                paras = [" ".join(sentence(rng, WORDS, extra, rng.randint(6, 24))
                                  for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
                text = "<br /><br />".join(paras)
                if rng.random() < 0.2:
                    text += " Caf\u00e9 cr\u00e8me, 10/10 \u2014 na\u00efve."
                if rng.random() < 0.1:
                    text = " " + text + "\n"  # TFDS strips surrounding whitespace
                (folder / f"{i}_{rng.choice(ratings)}.txt").write_bytes(text.encode("utf-8"))
                urls.append(f"http://www.imdb.com/title/tt{rng.randint(10**6, 10**7 - 1)}/usercomments")
            (root / part / f"urls_{label}.txt").write_text("\n".join(urls) + "\n")
    unsup = root / "train" / "unsup"
    unsup.mkdir()
    for i in range(3):
        (unsup / f"{i}_0.txt").write_text(sentence(rng, WORDS, POSITIVE + NEGATIVE, 30))


def write_aan(folder: Path, rng: random.Random, n: dict[str, int]) -> None:
    """new_aan_pairs.*.tsv: label, two ACL ids, two paper texts (tabs/newlines never inside)."""
    folder.mkdir(parents=True)
    names = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
    for split, count in n.items():
        lines = []
        for _ in range(count):
            label = rng.randint(0, 1)
            ids = [f"{rng.choice('PJNCDW')}{rng.randint(0, 12):02d}-{rng.randint(1000, 2999)}" for _ in range(2)]
            topic = rng.sample(ACADEMIC, 6)
            docs = []
            for j in range(2):
                extra = topic if (label or j == 0) else rng.sample(ACADEMIC, 6)
                n_bytes = rng.choice([rng.randint(800, 4000), rng.randint(4000, 14000)])  # some > 10k cut
                text = ""
                while len(text) < n_bytes:
                    text += sentence(rng, ACADEMIC, extra, rng.randint(8, 30)) + " "
                docs.append(text.strip())
            lines.append(f"{label}\t{ids[0]}\t{ids[1]}\t{docs[0]}\t{docs[1]}")
        (folder / names[split]).write_text("\n".join(lines) + "\n")


def write_cifar(folder: Path, rng: np.random.Generator, n_per_batch: int) -> None:
    """CIFAR-10 python batches: uint8 (N, 3072) channel-major, labels, filenames, batches.meta."""
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    yy, xx = np.mgrid[:32, :32]
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [int(x) for x in rng.integers(0, 10, n_per_batch)]
        images = np.empty((n_per_batch, 3, 32, 32), dtype=np.uint8)
        for k, c in enumerate(labels):  # a class-coloured blob on a graded background, plus noise
            cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), 4 + c % 5
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
            for ch in range(3):
                base = 40 + 15 * c + 3 * yy * (ch + 1) / 3
                img = np.where(blob, 255 - 20 * ((c + ch) % 10), base) + rng.normal(0, 12, (32, 32))
                images[k, ch] = np.clip(img, 0, 255).astype(np.uint8)
        batch = {b"batch_label": (f"training batch {b + 1} of 5" if b < 5 else "testing batch 1 of 1").encode(),
                 b"labels": labels, b"data": images.reshape(n_per_batch, 3072),
                 b"filenames": [f"{names[c]}_s_{rng.integers(10**5, 10**6)}.png".encode() for c in labels]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": n_per_batch, b"label_names": [n.encode() for n in names],
                     b"num_vis": 3072}, f, protocol=2)


def write_listops(folder: Path, n: dict[str, int]) -> None:
    """basic_*.tsv as LRA's listops.py writes them (csv.writer, tab, default CRLF, header)."""
    from tasks.listops import generate_listops

    rows = generate_listops(n_train=n["train"], n_val=n["val"], n_test=n["test"], min_length=100,
                            max_length=700, max_depth=10, max_args=10, seed=1234)
    folder.mkdir(parents=True)
    for split, split_rows in rows.items():
        with open(folder / f"basic_{split}.tsv", "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["Source", "Target"])
            writer.writerows(split_rows)


def write_pathfinder(root: Path, batches: int, per_batch: int) -> None:
    """pathfinder32/curv_contour_length_14 with text metadata lines as in the release."""
    from PIL import Image as PILImage

    from tasks.pathfinder_draw import balanced_labels, draw_pathfinder

    cfg = compose_config(["task=pathfinder", "task.source=generate"])
    style = build_task(cfg).style
    level = root / "pathfinder32" / "curv_contour_length_14"
    (level / "metadata").mkdir(parents=True)
    rng = np.random.default_rng(77)
    for b in range(batches):
        (level / "imgs" / str(b)).mkdir(parents=True)
        lines = []
        for i, label in enumerate(balanced_labels(rng, per_batch)):
            drawing = draw_pathfinder(rng, style, int(label))
            PILImage.fromarray(drawing.image).save(level / "imgs" / str(b) / f"sample_{i}.png")
            lines.append(f"imgs/{b} sample_{i}.png {i} {drawing.label} 1.8 14 5 2 1.5 3 1")
        (level / "metadata" / f"{b}.npy").write_text("\n".join(lines) + "\n")


def write_fixtures(root: Path) -> None:
    stamp = root / ".fixture_version"
    if stamp.exists() and stamp.read_text() == FIXTURE_VERSION:
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(0)
    write_imdb(root / "aclImdb", rng, {"train": 48, "test": 16})
    write_aan(root / "tsv_data", rng, {"train": 64, "val": 16, "test": 16})
    write_cifar(root / "cifar-10-batches-py", np.random.default_rng(0), n_per_batch=24)
    write_listops(root / "listops-1000", {"train": 96, "val": 16, "test": 16})
    write_pathfinder(root, batches=2, per_batch=40)
    stamp.write_text(FIXTURE_VERSION)


# ------------------------------------------------------------------------------- running

def variants(swept: list[str]) -> list[list[str]]:
    """Every combination of the ``key=a,b`` overrides, as lists of ``key=value``."""
    options = [[f"{k}={v}" for v in vals.split(",")] for k, vals in (s.split("=", 1) for s in swept)]
    return [list(combo) for combo in product(*options)]


def fallback_summary(task) -> str:
    """The shared summaries of tasks/ for a task without ``describe()``."""
    from tasks.base import describe_lm_splits
    from tasks.lra_io import describe_splits

    splits = {s: task.dataset(s).arrays for s in ("train", "val", "test")}
    spec = task.spec
    if spec.kind == "lm":
        return describe_lm_splits([f"{type(task).__name__} (fallback summary)"], splits)
    return describe_splits(f"{type(task).__name__} (fallback summary)", splits, pad_id=spec.pad_id, seq_len=spec.seq_len)


def describe(task: str, fixed: list[str], swept: list[str]) -> list[str]:
    """Print ``describe()`` of every variant; returns the problems found."""
    problems = []
    for variant in variants(swept):
        cfg = compose_config([f"task={task}", *fixed, *variant])
        started = time.perf_counter()
        built = build_task(cfg)
        if hasattr(built, "describe"):
            text = built.describe()
        else:
            problems.append(f"{task}: {type(built).__module__}.{type(built).__name__} has no describe()")
            text = f"NO describe() on {type(built).__name__}; the script's summary instead:\n{fallback_summary(built)}"
        print(f"--- describe {task} {' '.join(variant)} ({time.perf_counter() - started:.1f}s)\n{text}", flush=True)
    return problems


def train(task: str, fixed: list[str], swept: list[str], log: Path, env: dict) -> tuple[int, list[Path]]:
    """One multirun over both models; returns its exit code and the record paths it reported."""
    cmd = [str(REPO / ".venv" / "bin" / "arena-train"), "-m", f"model={','.join(MODELS)}", f"task={task}",
           "trainer=smoke", "logger=none", *TRAINER, *fixed, *swept, "sweep.name=smoke_tasks", "force=true",
           # the default subdir is the override string: task.data_dir=/tmp/... puts '/' in it and
           # the last folder name runs past 255 bytes (OSError 36, the whole sweep dies unrecorded)
           "hydra.sweep.subdir=${model.name}-${task.name}/job${hydra.job.num}"]
    # fresh run folders: force=true alone resumes a finished run from its checkpoint (no training)
    for model in MODELS:
        shutil.rmtree(REPO / "results" / "sweeps" / "smoke_tasks" / f"{model}-{task}", ignore_errors=True)
    print("$ arena-train " + " ".join(cmd[1:]), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    records = [Path(line.split("[arena] record: ", 1)[1].strip())
               for line in log.read_text().splitlines() if line.startswith("[arena] record: ")]
    return rc, records


def check(record: dict) -> tuple[bool, str]:
    status, error = record["status"], record.get("error") or ""
    if status == "ok":
        return True, ""
    if status == "unsupported" and error.startswith("UnsupportedTask"):
        return True, error.splitlines()[0]
    frames = [line.strip() for line in error.splitlines() if line.startswith("  File ")]
    return False, error.splitlines()[0] + (f" (raised at {frames[-1]})" if frames else "") if error else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=Path("/tmp/lra_fixtures"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/smoke_every_task/cache"))
    parser.add_argument("--logs", type=Path, default=Path("/tmp/smoke_every_task/logs"))
    parser.add_argument("--tasks", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args()
    os.environ["SEQ_ARENA_CACHE"] = str(args.cache)  # describe() and the runs share one cache
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    args.logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_fixtures(args.fixtures)
    print(f"fixtures in {args.fixtures} ({time.perf_counter() - started:.1f}s)", flush=True)

    chosen = args.tasks.split(",") if args.tasks else None
    rows, failures = [], []
    for task, fixed, swept in tasks(args.fixtures):
        if chosen and task not in chosen:
            continue
        t0 = time.perf_counter()
        print(f"\n===== {task}", flush=True)
        try:
            failures += describe(task, fixed, swept)
        except Exception as exc:  # noqa: BLE001 - report and go on to the other tasks
            failures.append(f"{task}: describe() failed: {type(exc).__name__}: {exc}")
            print(f"describe FAILED: {type(exc).__name__}: {exc}", flush=True)
        log = args.logs / f"{task}.log"
        rc, paths = train(task, fixed, swept, log, env)
        expected = len(MODELS) * len(variants(swept))
        if "[arena] resuming" in log.read_text():
            failures.append(f"{task}: a job resumed from an old checkpoint instead of training (log {log})")
        if rc != 0 or len(paths) != expected:
            failures.append(f"{task}: arena-train exit {rc}, {len(paths)}/{expected} records (log {log})")
            print("\n".join(log.read_text().splitlines()[-25:]), flush=True)
        for path in paths:
            record = json.loads(path.read_text())
            cfg = record["config"]
            metric = "bpc" if task == "char_lm" else "accuracy"
            m = record.get("metrics") or {}
            ok, why = check(record)
            variant = f"source={cfg['task']['source']}" if swept else ""
            rows.append((record["model"], task, variant, record["status"], m.get(f"val_{metric}"),
                         m.get(f"test_{metric}"), metric, m.get("steps"), record.get("wall_s"), why))
            if not ok:
                failures.append(f"{record['model']} on {task} {variant}: {record['status']}: {why} ({path})")
        print(f"({task}: {time.perf_counter() - t0:.1f}s)", flush=True)

    fmt = lambda v: f"{v:8.4f}" if isinstance(v, float) else f"{'-':>8}"  # noqa: E731
    print(f"\n{'model':<12} {'task':<18} {'variant':<16} {'status':<11} {'val':>8} {'test':>8} "
          f"{'metric':<8} {'steps':>5} {'wall_s':>7}")
    for model, task, variant, status, val, test, metric, steps, wall, why in rows:
        print(f"{model:<12} {task:<18} {variant:<16} {status:<11} {fmt(val)} {fmt(test)} {metric:<8} "
              f"{str(steps):>5} {wall or 0:7.1f}" + (f"  {why}" if why else ""))
    print(f"\n{len(rows)} records in {time.perf_counter() - started:.0f}s; "
          f"{len(failures)} failure(s)" + "".join(f"\n  - {f}" for f in failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
