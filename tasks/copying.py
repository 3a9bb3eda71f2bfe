"""The copy memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016, arXiv 1511.06464).

A sequence opens with ``n_tokens`` data tokens, then a long run of blanks, then a delimiter,
then ``n_tokens`` more blanks. At those last blanks the model must output the data tokens in
their original order; nothing else is scored. The data sit at fixed positions, so the task
tests memory over ``delay = seq_len - 2 * n_tokens`` steps, not selection (see
:mod:`tasks.selective_copying` for the variant with scattered tokens).

Token ids (``V = vocab_size``): 0 is the blank, ``V - 1`` the delimiter, data tokens are drawn
uniformly from ``[1, V - 2]``. Arjovsky et al. use ``V = 10`` (8 data symbols), ``n_tokens = 10``
and ``seq_len = T + 20`` with ``T`` in {100, 200, 300, 500}; their ``T`` is our ``delay``
(``T - 1`` blanks and the delimiter between the data and the answers).

Worked example (V = 10, n_tokens = 3, seq_len = 10; ``-`` = ignored)::

    tokens   4  7  2  0  0  0  9  0  0  0
    targets  -  -  -  -  -  -  -  4  7  2

A model that only guesses scores ``1 / (V - 2)`` on the scored positions.
"""

from __future__ import annotations

import torch

from tasks.base import (
    IGNORE_INDEX, ArrayDataset, describe_lm_splits, generated_splits, smallest_int_dtype, TaskSpec,
)



def check_copying(*, vocab_size: int, n_tokens: int, seq_len: int) -> None:
    """Raise a ValueError naming the config key when the knobs cannot make a sequence."""
    if vocab_size < 3:
        raise ValueError(f"copying: task.vocab_size={vocab_size} leaves no data tokens; use >= 3")
    if seq_len < 2 * n_tokens + 1:
        raise ValueError(
            f"copying: task.seq_len={seq_len} cannot hold {n_tokens} data tokens, a delimiter and "
            f"{n_tokens} answer slots; use task.seq_len >= {2 * n_tokens + 1}"
        )


def generate_copying(
    n_examples: int, *, vocab_size: int, n_tokens: int, seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Draw ``n_examples`` copy-memory sequences; ``tokens`` and ``targets`` of (N, seq_len)."""
    check_copying(vocab_size=vocab_size, n_tokens=n_tokens, seq_len=seq_len)
    g = torch.Generator().manual_seed(seed)
    N, M = n_examples, n_tokens
    data = torch.randint(1, vocab_size - 1, (N, M), generator=g)  # (N, M)
    tokens = torch.zeros(N, seq_len, dtype=torch.long)
    tokens[:, :M] = data
    tokens[:, seq_len - M - 1] = vocab_size - 1  # the delimiter: "start answering now"
    targets = torch.full((N, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, seq_len - M:] = data
    dtype = smallest_int_dtype(vocab_size)
    return {"tokens": tokens.to(dtype), "targets": targets.to(dtype)}


class Copying:
    """The copy memory task as an ``lm`` task scored by accuracy at the answer positions.

    Args:
        vocab_size: V; 0 is the blank, V - 1 the delimiter, data tokens come from [1, V - 2].
        n_tokens: data tokens to remember and copy (M).
        seq_len: total tokens per sequence; the delay between data and answer is seq_len - 2M.
        n_train, n_val, n_test: examples per split (each split drawn with its own seed).
        seed: data seed; the data are a pure function of the parameters and this seed.
        cache_dir: where generated data are cached (``None``: ``results/cache``).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        n_tokens: int,
        seq_len: int,
        n_train: int,
        n_val: int,
        n_test: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        self.params = dict(
            vocab_size=vocab_size, n_tokens=n_tokens, seq_len=seq_len,
            n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
        )
        # fail on a bad configuration now, not when the harness first asks for data
        check_copying(vocab_size=vocab_size, n_tokens=n_tokens, seq_len=seq_len)
        self.seq_len = seq_len
        self.spec = TaskSpec(kind="lm", vocab_size=vocab_size, n_outputs=vocab_size, seq_len=seq_len)
        self.cache_dir = cache_dir
        self._splits: dict | None = None

    def _load(self) -> dict[str, dict[str, torch.Tensor]]:
        if self._splits is None:
            p = self.params
            self._splits = generated_splits("copying", p, generate_copying, self.cache_dir, vocab_size=p["vocab_size"], n_tokens=p["n_tokens"], seq_len=p["seq_len"])
        return self._splits

    def dataset(self, split: str) -> ArrayDataset:
        return ArrayDataset(self._load()[split])

    def describe(self) -> str:
        p = self.params
        header = [
            f"copying: {p['n_tokens']} data tokens from {p['vocab_size'] - 2} symbols, copied after "
            f"a delay of {p['seq_len'] - 2 * p['n_tokens']} tokens (seq_len {p['seq_len']}); "
            f"chance accuracy {1 / (p['vocab_size'] - 2):.1%}",
        ]
        return describe_lm_splits(header, self._load())
