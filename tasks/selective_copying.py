"""Selective copying (Gu & Dao 2023, arXiv 2312.00752, section 4.1.1 and appendix E.1).

The layout follows the generator the Mamba authors built on, ``torch_copying_data(...,
variable=True)`` in the S4 repository (state-spaces/s4, ``src/dataloaders/datasets/copying.py``):
the first ``seq_len - n_tokens`` positions hold noise (token 0) with ``n_tokens`` data tokens
at random distinct positions, in increasing order of position; the last ``n_tokens`` positions
hold a marker token, and at the i-th marker the model must output the i-th data token. Unlike
:mod:`tasks.copying`, the spacing of the data varies per example, so a model has to decide from
content, not from position, what to keep (the argument for input-dependent "selective" state).

Token ids (``V = vocab_size``): 0 is the noise token, ``V - 1`` the marker, data tokens are drawn
uniformly from ``[1, V - 2]`` (S4's ``randint(1, A - 1)``). Mamba's setting is ``V = 16``,
``n_tokens = 16``, sequence length 4096; here ``seq_len`` counts every token, markers included
(S4 counts the noise tokens ``L`` separately: its sequences are ``L + 2M`` long).

Worked example (V = 8, n_tokens = 3, seq_len = 10; ``-`` = ignored)::

    tokens   0  5  0  0  2  0  6  7  7  7
    targets  -  -  -  -  -  -  -  5  2  6

A model that only guesses scores ``1 / (V - 2)`` on the scored positions.
"""

from __future__ import annotations

import torch

from tasks.base import IGNORE_INDEX, smallest_int_dtype
from tasks.copying import Copying

ROWS_PER_BLOCK = 1024


def check_selective_copying(*, vocab_size: int, n_tokens: int, seq_len: int) -> None:
    """Raise a ValueError naming the config key when the knobs cannot make a sequence."""
    if vocab_size < 3:
        raise ValueError(
            f"selective_copying: task.vocab_size={vocab_size} leaves no data tokens; use >= 3"
        )
    context = seq_len - n_tokens
    if context < n_tokens:
        raise ValueError(
            f"selective_copying: task.seq_len={seq_len} leaves {context} positions for "
            f"{n_tokens} data tokens before the {n_tokens} markers; use task.seq_len >= "
            f"{2 * n_tokens}"
        )


def generate_selective_copying(
    n_examples: int, *, vocab_size: int, n_tokens: int, seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Draw ``n_examples`` selective-copying sequences; ``tokens``, ``targets`` of (N, seq_len)."""
    check_selective_copying(vocab_size=vocab_size, n_tokens=n_tokens, seq_len=seq_len)
    context = seq_len - n_tokens
    g = torch.Generator().manual_seed(seed)
    N, M = n_examples, n_tokens
    dtype = smallest_int_dtype(vocab_size)
    data = torch.randint(1, vocab_size - 1, (N, M), generator=g).to(dtype)  # (N, M)
    tokens = torch.zeros(N, seq_len, dtype=dtype)
    tokens[:, context:] = vocab_size - 1
    targets = torch.full((N, seq_len), IGNORE_INDEX, dtype=dtype)
    targets[:, context:] = data
    # M distinct positions per example among the first seq_len - M, sorted: the top M of
    # i.i.d. uniforms is a uniform M-subset, like S4's randperm(L + M)[:M].sort(). Rows go in
    # blocks so that the paper's length (4096) x 20k examples never needs a (N, L) float table.
    for start in range(0, N, ROWS_PER_BLOCK):
        rows = slice(start, min(start + ROWS_PER_BLOCK, N))
        scores = torch.rand(rows.stop - rows.start, context, generator=g)  # (n, L - M)
        positions = scores.topk(M, dim=1).indices.sort(dim=1).values  # (n, M)
        tokens[rows].scatter_(1, positions, data[rows])
    return {"tokens": tokens, "targets": targets}


class SelectiveCopying(Copying):
    """Mamba's selective copying as an ``lm`` task scored by accuracy at the marker positions:
    the copying task's knobs and spec, with the data scattered among noise.

    Args:
        vocab_size: V; 0 is noise, V - 1 the marker, data tokens come from [1, V - 2].
        n_tokens: data tokens to find and copy (M; Mamba: 16).
        seq_len: total tokens per sequence, the M markers included (Mamba: 4096).
        n_train, n_val, n_test, seed, cache_dir: see :class:`tasks.base.GeneratedTask`.
    """

    name = "selective_copying"
    check_knobs = staticmethod(check_selective_copying)
    generator = staticmethod(generate_selective_copying)

    def headline(self) -> list[str]:
        V, M, L = self.spec.vocab_size, self.knobs["n_tokens"], self.spec.seq_len
        # how far back the model must reach: from the first data token to its marker
        first = (self.splits()["test"]["tokens"][:, : L - M] != 0).long().argmax(1)
        reach = L - M - first
        return [
            f"selective_copying: {M} data tokens from {V - 2} symbols scattered in {L - M} noise "
            f"positions, then {M} markers (seq_len {L}); chance accuracy {1 / (V - 2):.1%}",
            f"  test distance from first data token to the first marker: min {reach.min()}, "
            f"median {reach.median()}, max {reach.max()}",
        ]
