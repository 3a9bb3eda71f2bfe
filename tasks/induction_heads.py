"""Induction heads (Olsson et al. 2022; as run by Gu & Dao 2023, arXiv 2312.00752, section 4.1.2).

A sequence of random tokens contains one special trigger token somewhere, followed by some
token ``a``; the sequence ends with the trigger again, and there the model must output ``a``
("... T a ... T -> a"). Only that final position is scored. Mamba trains at length 256 and tests
the same model at lengths 2^6 to 2^20 to measure length extrapolation; ``eval_seq_lens`` lists
the extra test lengths and ``dataset("test", seq_len=L)`` draws the test set at length ``L``.

The generator follows the H3/Hyena synthetic (HazyResearch/safari, ``generate_induction_head``
with one trigger): ``V = vocab_size`` counts two reserved ids, 0 (never used, safari's no-op)
and ``V - 1`` (the trigger); random tokens are uniform over ``[1, V - 2]``, so the trigger
occurs exactly twice. The first trigger sits uniformly in ``[0, seq_len - 3]``, so the token
after it is never the final trigger. Differences from safari, all harmless: safari scores every
next token during training (random tokens, so only noise in the loss) and its sequences are one
token longer than its ``input_seq_len``; here only the answer is scored and ``seq_len`` counts
every token the model reads.

Worked example (V = 6, seq_len = 8; trigger 5, ``-`` = ignored)::

    tokens   3  1  5  4  2  2  1  5
    targets  -  -  -  -  -  -  -  4

A model that only guesses scores ``1 / (V - 2)``.
"""

from __future__ import annotations

import torch

from tasks.base import (
    IGNORE_INDEX, SPLITS, ArrayDataset, TaskSpec, cached_splits, describe_lm_splits, smallest_int_dtype,
)


def check_induction_heads(*, vocab_size: int, seq_len: int) -> None:
    """Raise a ValueError naming the config key when the knobs cannot make a sequence."""
    if vocab_size < 3:
        raise ValueError(f"induction_heads: task.vocab_size={vocab_size} leaves no data tokens; use >= 3")
    if seq_len < 3:
        raise ValueError(
            f"induction_heads: a sequence needs at least 3 tokens, got {seq_len}; check task.seq_len "
            f"and task.eval_seq_lens"
        )


def generate_induction_heads(
    n_examples: int, *, vocab_size: int, seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Draw ``n_examples`` induction-head sequences; ``tokens``, ``targets`` of (N, seq_len)."""
    check_induction_heads(vocab_size=vocab_size, seq_len=seq_len)
    g = torch.Generator().manual_seed(seed)
    N = n_examples
    trigger = vocab_size - 1
    tokens = torch.randint(1, trigger, (N, seq_len), generator=g)  # (N, L), never the trigger
    first = torch.randint(0, seq_len - 2, (N,), generator=g)  # (N,), in [0, L - 3]
    rows = torch.arange(N)
    tokens[rows, first] = trigger
    tokens[:, -1] = trigger
    targets = torch.full((N, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, -1] = tokens[rows, first + 1]
    dtype = smallest_int_dtype(vocab_size)
    return {"tokens": tokens.to(dtype), "targets": targets.to(dtype)}


class InductionHeads:
    """Mamba's induction-heads task as an ``lm`` task scored by accuracy at the last position.

    Args:
        vocab_size: V; 0 is unused, V - 1 the trigger, random tokens come from [1, V - 2]
            (Mamba: 16).
        seq_len: training length (Mamba: 256).
        eval_seq_lens: extra test lengths for length extrapolation (Mamba: 2^6 to 2^20); the
            harness evaluates ``dataset("test", seq_len=L)`` for each.
        n_train, n_val, n_test: examples per split (each split drawn with its own seed); every
            extra test length gets ``n_test`` examples.
        seed: data seed; the data are a pure function of the parameters and this seed.
        cache_dir: where generated data are cached (``None``: ``results/cache``).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        eval_seq_lens: list[int] | tuple[int, ...] = (),
        n_train: int,
        n_val: int,
        n_test: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        # eval_seq_lens is not a cache key: it chooses which test sets exist, not their content
        self.params = dict(
            vocab_size=vocab_size, seq_len=seq_len, n_train=n_train, n_val=n_val, n_test=n_test,
            seed=seed,
        )
        for length in (seq_len, *eval_seq_lens):
            check_induction_heads(vocab_size=vocab_size, seq_len=length)
        self.seq_len = seq_len
        self.spec = TaskSpec(
            kind="lm", vocab_size=vocab_size, n_outputs=vocab_size, seq_len=seq_len,
            eval_seq_lens=tuple(int(length) for length in eval_seq_lens),
        )
        self.cache_dir = cache_dir
        self._splits: dict | None = None
        self._other_lengths: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def _seed(self, split: str) -> int:
        return self.params["seed"] * 3 + SPLITS.index(split)

    def _build(self) -> dict[str, dict[str, torch.Tensor]]:
        p = self.params
        return {
            split: generate_induction_heads(
                p[f"n_{split}"], vocab_size=p["vocab_size"], seq_len=p["seq_len"], seed=self._seed(split)
            )
            for split in SPLITS
        }

    def _load(self) -> dict[str, dict[str, torch.Tensor]]:
        if self._splits is None:
            self._splits = cached_splits("induction_heads", self.params, self._build, self.cache_dir)
        return self._splits

    def dataset(self, split: str, seq_len: int | None = None) -> ArrayDataset:
        """The examples of ``split``, at the training length or at ``seq_len`` tokens.

        A split drawn at another length uses the split's own seed and size, so the test set at
        length 1024 is as reproducible as the one at the training length.
        """
        if split not in SPLITS:
            raise KeyError(f"induction_heads: split must be one of {SPLITS}, got {split!r}")
        if seq_len is None or seq_len == self.seq_len:
            return ArrayDataset(self._load()[split])
        key = (split, int(seq_len))
        if key not in self._other_lengths:
            p = self.params
            params = {**p, "seq_len": int(seq_len), "split": split}

            def build() -> dict[str, dict[str, torch.Tensor]]:
                return {split: generate_induction_heads(
                    p[f"n_{split}"], vocab_size=p["vocab_size"], seq_len=int(seq_len),
                    seed=self._seed(split),
                )}

            self._other_lengths[key] = cached_splits("induction_heads", params, build, self.cache_dir)[split]
        return ArrayDataset(self._other_lengths[key])

    def describe(self) -> str:
        p = self.params
        splits = self._load()
        trigger = p["vocab_size"] - 1
        tokens = splits["test"]["tokens"][:, :-1]
        first = (tokens == trigger).long().argmax(1)
        gap = p["seq_len"] - 1 - first  # tokens between the first trigger and the query
        header = [
            f"induction_heads: {p['vocab_size'] - 2} random symbols, trigger id {trigger}, "
            f"train length {p['seq_len']}, extra test lengths {list(self.spec.eval_seq_lens)}; "
            f"chance accuracy {1 / (p['vocab_size'] - 2):.1%}",
            f"  test distance from first trigger to the query: min {gap.min()}, median "
            f"{gap.median()}, max {gap.max()}",
        ]
        return describe_lm_splits(header, splits)
