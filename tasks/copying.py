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

from tasks.base import IGNORE_INDEX, GeneratedTask, TaskSpec, smallest_int_dtype


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


class Copying(GeneratedTask):
    """The copy memory task as an ``lm`` task scored by accuracy at the answer positions.

    Args:
        vocab_size: V; 0 is the blank, V - 1 the delimiter, data tokens come from [1, V - 2].
        n_tokens: data tokens to remember and copy (M).
        seq_len: total tokens per sequence; the delay between data and answer is seq_len - 2M.
        n_train, n_val, n_test, seed, cache_dir: see :class:`tasks.base.GeneratedTask`.
    """

    name = "copying"
    # the knobs' check and the generator: selective copying (a subclass) swaps in its own
    check_knobs = staticmethod(check_copying)
    generator = staticmethod(generate_copying)

    def __init__(self, *, vocab_size: int, n_tokens: int, seq_len: int, n_train: int, n_val: int,
                 n_test: int, seed: int, cache_dir: str | None = None):
        knobs = dict(vocab_size=vocab_size, n_tokens=n_tokens, seq_len=seq_len)
        self.check_knobs(**knobs)  # a bad configuration fails now, not at the first dataset() call
        spec = TaskSpec(kind="lm", vocab_size=vocab_size, n_outputs=vocab_size, seq_len=seq_len)
        super().__init__(spec, self.generator, knobs, n_train=n_train, n_val=n_val, n_test=n_test,
                         seed=seed, cache_dir=cache_dir)

    def headline(self) -> list[str]:
        V, M, L = self.spec.vocab_size, self.knobs["n_tokens"], self.spec.seq_len
        return [
            f"copying: {M} data tokens from {V - 2} symbols, copied after a delay of {L - 2 * M} "
            f"tokens (seq_len {L}); chance accuracy {1 / (V - 2):.1%}",
        ]
