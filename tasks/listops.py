"""ListOps (Nangia & Bowman 2018) as in the Long Range Arena (Tay et al. 2021, arXiv 2011.04006).

A sequence is a nested prefix expression over the digits 0-9 with four list operators, and the
label is its value (10 classes)::

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

``[MIN``, ``[MAX``: min and max; ``[MED``: ``int(numpy.median(...))`` (an even count averages
the two middle values and truncates: [3, 8] -> 5); ``[SM``: sum modulo 10.

Data come from one of two sources (``task.source``):

* ``lra``: the released TSV files ``basic_{train,val,test}.tsv`` (header ``Source\\tTarget``)
  from ``lra_release/listops-1000``.
* ``generate``: LRA's generator (``lra_benchmarks/data/listops.py``) re-implemented call for
  call: a node is a leaf (``random.choice(range(10))``) unless ``random.random() <= 0.25`` and
  the node is above ``max_depth`` (the root has depth 1); an operator takes
  ``random.randint(2, max_args)`` children (both ends included), generated before its operator
  is drawn with ``random.choice``; a tree's length is 2 + the children's lengths (a leaf is 1);
  trees with ``min_length < length < max_length`` are kept, duplicates dropped, and the first
  ``n_train`` / ``n_val`` / ``n_test`` distinct trees make the splits. With ``random.seed(s)``
  the original script draws the same trees as ``seed=s`` here; it then orders them by
  iterating a Python ``set`` (hash order, not reproducible), where we keep generation order.
  The trees are written as the same TSV into the cache and read back by the same loader.

Tokenisation follows the state-spaces/s4 pipeline: ``(`` and ``)`` are dropped, ``]`` is kept
(s4 renames it ``X``), and the text is split on whitespace, so the token count equals the tree
length. (LRA's own JAX pipeline used ``tfds Tokenizer``, which also drops ``]`` and the ``[`` of
the operators; s4 and later work keep ``]`` because without it the nesting is ambiguous.)
Ids: 0 pad, 1-10 the digits 0-9, then ``[MIN [MAX [MED [SM ]`` (vocab 16). Sequences are cut
to ``seq_len`` (LRA: 2000) and right-padded.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import torch

from tasks.base import (
    TaskSpec, atomic_write_dir, cache_key, cached_splits, default_cache_dir, format_bytes, progress,
    smallest_token_dtype,
)
from tasks.lra_io import FileTask, fingerprint, format_error, missing_data, pad_rows, resolve_source, shorten

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUES = range(10)
VALUE_P = 0.25  # a node above max_depth is an operator when random.random() <= VALUE_P
VOCAB = ("<pad>", *(str(v) for v in VALUES), *OPERATORS, END)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID = 0
SPLITS = ("train", "val", "test")
HEADER = ["Source", "Target"]
TOKEN_DTYPE = smallest_token_dtype(len(VOCAB) - 1)  # uint8: 16 ids
log = logging.getLogger(__name__)
HOW_TO_GET = (
    "Download lra_release.gz from the Long Range Arena repository "
    "(github.com/google-research/long-range-arena), unpack it and point task.data_dir at "
    "lra_release/listops-1000; or generate the data with task.source=generate."
)

# A tree is a leaf value 0-9 or an operator node (op, (child, child, ...)).
Tree = int | tuple


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[Tree, int]:
    """Draw one tree as LRA's ``generate_tree`` does; returns (tree, length in tokens)."""
    r = rng.random() if depth < max_depth else 1
    if r > VALUE_P:
        return rng.choice(VALUES), 1
    length = 2  # the operator and its closing ']'
    children = []
    for _ in range(rng.randint(2, max_args)):  # randint includes max_args
        child, child_length = generate_tree(rng, depth + 1, max_depth, max_args)
        children.append(child)
        length += child_length
    op = rng.choice(OPERATORS)  # drawn after the children, as in the original
    return (op, tuple(children)), length


def evaluate(tree: Tree) -> int:
    """The value of a tree (0-9)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [evaluate(c) for c in children]
    if op == MIN:
        return min(values)
    if op == MAX:
        return max(values)
    if op == MED:  # int(numpy.median(values)) for non-negative ints
        s = sorted(values)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    if op == SUM_MOD:
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def tree_length(tree: Tree) -> int:
    """Tokens of a tree once parentheses are dropped: 1 per leaf, 2 + children per operator."""
    return 1 if isinstance(tree, int) else 2 + sum(tree_length(c) for c in tree[1])


def to_source(tree: Tree) -> str:
    """LRA's bracketed string: ``[MAX 2 9 ]`` is written ``( ( ( [MAX 2 ) 9 ) ] )``."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    s = f"( {op} {to_source(children[0])} )"
    for child in children[1:]:
        s = f"( {s} {to_source(child)} )"
    return f"( {s} ] )"


def tokenize(source: str) -> list[str]:
    """Drop parentheses, keep ``]``, split on whitespace."""
    return source.replace("(", "").replace(")", "").split()


def parse_tokens(tokens: list[str]) -> Tree:
    """The tree written by ``tokens`` (as from :func:`tokenize`); raises ValueError if malformed."""
    stack: list[tuple[str, list]] = []
    root = None
    for tok in tokens:
        if root is not None:
            raise ValueError(f"tokens after the end of the expression: {tok!r}")
        if tok in OPERATORS:
            stack.append((tok, []))
            continue
        if tok == END:
            if not stack or not stack[-1][1]:
                raise ValueError("']' without an open operator with arguments")
            op, args = stack.pop()
            node = (op, tuple(args))
        elif tok.isdigit() and len(tok) == 1:
            node = int(tok)
        else:
            raise ValueError(f"unknown token {tok!r}")
        if stack:
            stack[-1][1].append(node)
        else:
            root = node
    if stack or root is None:
        raise ValueError("the expression is not closed")
    return root


def generate_listops(
    *, n_train: int, n_val: int, n_test: int, min_length: int, max_length: int, max_depth: int,
    max_args: int, seed: int,
) -> dict[str, list[tuple[str, int]]]:
    """Draw distinct trees with ``min_length < length < max_length``; (source, label) per split."""
    if max_length - min_length < 2:
        raise ValueError(
            f"listops: no tree length lies strictly between task.min_length={min_length} and "
            f"task.max_length={max_length}; widen them"
        )
    rng = random.Random(seed)
    wanted = n_train + n_val + n_test
    trees: dict[Tree, None] = {}  # insertion-ordered set
    budget = 1000 * wanted + 1_000_000
    bar = progress(total=wanted, desc="listops: drawing trees", unit="tree")
    for _ in range(budget):
        if len(trees) == wanted:
            break
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length < length < max_length and tree not in trees:
            trees[tree] = None
            bar.update()
    else:
        bar.close()
        raise RuntimeError(
            f"listops: only {len(trees)} distinct trees of {wanted} after {budget} draws; "
            "widen task.min_length/max_length, raise task.max_depth, or ask for fewer examples"
        )
    bar.close()
    rows = [(to_source(t), evaluate(t)) for t in progress(trees, desc="listops: writing trees", unit="tree")]
    return {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


def write_generated(directory: Path, splits: dict[str, list[tuple[str, int]]]) -> None:
    """Write ``basic_<split>.tsv`` files into ``directory`` atomically (a temp dir, renamed)."""

    def write(tmp: Path) -> None:
        for split, rows in splits.items():
            with open(tmp / f"basic_{split}.tsv", "w", newline="") as f:
                writer = csv.writer(f, delimiter="\t", lineterminator="\n")
                writer.writerow(HEADER)
                writer.writerows(rows)

    atomic_write_dir(directory, write)


def decode_line(path: Path, line_no: int, raw: bytes) -> str:
    """One line of a released TSV as text; bytes that are not UTF-8 are an error naming file:line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise format_error(path, line_no, "UTF-8 text",
                           f"byte 0x{raw[e.start]:02x} at column {e.start + 1}") from None


def read_listops_tsv(path: Path, seq_len: int) -> dict[str, torch.Tensor]:
    """Read one released ListOps TSV into ``tokens`` (N, seq_len) and ``label`` (N,)."""
    rows, labels = [], []
    bar = progress(total=path.stat().st_size, desc=f"listops: reading {path.name}", unit="B",
                   unit_scale=True)
    with open(path, "rb") as f, bar:
        lines = (decode_line(path, line_no, raw) for line_no, raw in enumerate(f, start=1))
        header = next(lines, "")
        if not header:
            raise format_error(path, 1, "the header 'Source\\tTarget'", "an empty file")
        if header.rstrip("\r\n").split("\t") != HEADER:
            raise format_error(path, 1, "the header 'Source\\tTarget'", shorten(header.rstrip("\r\n")))
        for line_no, line in enumerate(lines, start=2):
            bar.update(len(line))  # characters; bytes for this ASCII format
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2:
                raise format_error(path, line_no, "2 tab-separated fields (Source, Target)",
                                   f"{len(fields)} field(s): {shorten(line.rstrip())}")
            source, target = (x.strip('"') for x in fields)
            if not (target.isdigit() and int(target) < 10):
                raise format_error(path, line_no, "a label 0-9 in column 'Target'", shorten(target))
            tokens = tokenize(source)
            unknown = [t for t in tokens if t not in TOKEN_ID]
            if not tokens or unknown:
                found = f"unknown token {shorten(unknown[0])}" if unknown else "an empty Source"
                raise format_error(path, line_no, "tokens 0-9, [MIN, [MAX, [MED, [SM, ], ( and )", found)
            rows.append([TOKEN_ID[t] for t in tokens])
            labels.append(int(target))
    if not rows:
        raise format_error(path, 2, "at least one example after the header", "none")
    return {"tokens": pad_rows(rows, seq_len, pad_id=PAD_ID, dtype=TOKEN_DTYPE),
            "label": torch.tensor(labels, dtype=torch.uint8)}


class ListOps(FileTask):
    """LRA ListOps as a 10-way ``classify`` task.

    Args:
        source: ``lra`` (read ``data_dir``), ``generate`` (LRA's generator, cached) or ``auto``
            (``lra`` when ``data_dir`` is set, else ``generate``).
        data_dir: folder with ``basic_{train,val,test}.tsv`` (``source=lra``).
        seq_len: tokens per sequence after cutting and padding (LRA: 2000).
        n_train, n_val, n_test: generated examples per split (LRA: 96000 / 2000 / 2000).
        min_length, max_length: generated trees have ``min_length < length < max_length``.
        max_depth: nodes at this depth are leaves (LRA: 10).
        max_args: operators take 2 to ``max_args`` arguments, both included (LRA: 10).
        seed: generator seed (``source=generate``).
        cache_dir: where generated TSVs and tokenised tensors are cached (``None``: default).
    """

    name = "listops"

    def __init__(
        self, *, source: str, data_dir: str | None, seq_len: int, n_train: int, n_val: int,
        n_test: int, min_length: int, max_length: int, max_depth: int, max_args: int, seed: int,
        cache_dir: str | None = None,
    ):
        self.source = resolve_source("listops", source, data_dir)
        self.data_dir = data_dir
        self.seq_len = seq_len
        self.generator_params = dict(
            n_train=n_train, n_val=n_val, n_test=n_test, min_length=min_length,
            max_length=max_length, max_depth=max_depth, max_args=max_args, seed=seed,
        )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.spec = TaskSpec(kind="classify", vocab_size=len(VOCAB), n_outputs=10, seq_len=seq_len,
                             pad_id=PAD_ID)

    def tsv_dir(self) -> Path:
        """The folder holding the TSVs: ``data_dir``, or the generated copy in the cache."""
        if self.source == "generate":
            directory = self.cache_dir / f"listops-gen-{cache_key('listops-gen', self.generator_params)}"
            if not directory.exists():
                log.info("listops: generating %d trees with LRA's generator into %s (LRA's size "
                         "takes minutes)", sum(self.generator_params[f"n_{s}"] for s in SPLITS), directory)
                write_generated(directory, generate_listops(**self.generator_params))
            return directory
        if self.data_dir is None:
            raise ValueError(f"listops: task.source=lra needs task.data_dir. {HOW_TO_GET}")
        directory = Path(self.data_dir)
        missing = [directory / f"basic_{s}.tsv" for s in SPLITS if not (directory / f"basic_{s}.tsv").is_file()]
        if missing:
            raise missing_data("listops", directory, missing, HOW_TO_GET)
        return directory

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        """The TSVs (released, or generated into the cache) tokenised at ``seq_len``, cached."""
        directory = self.tsv_dir()
        paths = {s: directory / f"basic_{s}.tsv" for s in SPLITS}
        # version 2: tokens and labels stored as uint8 (version 1: int16)
        params = dict(files=fingerprint(list(paths.values())), seq_len=self.seq_len, version=2)
        build = lambda: {s: read_listops_tsv(p, self.seq_len) for s, p in paths.items()}  # noqa: E731
        return cached_splits("listops", params, build, self.cache_dir)

    def title(self) -> str:
        return f"listops (source={self.source}, seq_len={self.seq_len}, vocab={len(VOCAB)})"

    def describe(self) -> str:
        """The shared summary, plus the size of the generated TSVs kept in the cache."""
        text = super().describe()
        if self.source == "generate":
            tsv = sum(p.stat().st_size for p in self.tsv_dir().glob("basic_*.tsv"))
            text += f"\n  generated TSVs: {format_bytes(tsv)} in {self.tsv_dir()}"
        return text
