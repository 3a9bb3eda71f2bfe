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

from tasks.base import IGNORE_INDEX, GeneratedTask, TaskSpec, smallest_int_dtype


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


class InductionHeads(GeneratedTask):
    """Mamba's induction-heads task as an ``lm`` task scored by accuracy at the last position.

    Args:
        vocab_size: V; 0 is unused, V - 1 the trigger, random tokens come from [1, V - 2]
            (Mamba: 16).
        seq_len: training length (Mamba: 256).
        eval_seq_lens: extra test lengths for length extrapolation (Mamba: 2^6 to 2^20); the
            harness evaluates ``dataset("test", seq_len=L)`` for each.
        n_train, n_val, n_test, seed, cache_dir: see :class:`tasks.base.GeneratedTask`.
            Every extra test length gets ``n_test`` examples.
    """

    name = "induction_heads"

    def __init__(self, *, vocab_size: int, seq_len: int, eval_seq_lens: list[int] | tuple[int, ...] = (),
                 n_train: int, n_val: int, n_test: int, seed: int, cache_dir: str | None = None):
        for length in (seq_len, *eval_seq_lens):
            check_induction_heads(vocab_size=vocab_size, seq_len=length)
        spec = TaskSpec(kind="lm", vocab_size=vocab_size, n_outputs=vocab_size, seq_len=seq_len,
                        eval_seq_lens=tuple(int(length) for length in eval_seq_lens))
        # eval_seq_lens is not a knob: it chooses which test sets exist, not their content
        knobs = dict(vocab_size=vocab_size, seq_len=seq_len)
        super().__init__(spec, generate_induction_heads, knobs, n_train=n_train, n_val=n_val,
                         n_test=n_test, seed=seed, cache_dir=cache_dir)

    def headline(self) -> list[str]:
        V, L = self.spec.vocab_size, self.spec.seq_len
        trigger = V - 1
        first = (self.splits()["test"]["tokens"][:, :-1] == trigger).long().argmax(1)
        gap = L - 1 - first  # tokens between the first trigger and the query
        return [
            f"induction_heads: {V - 2} random symbols, trigger id {trigger}, train length {L}, "
            f"extra test lengths {list(self.spec.eval_seq_lens)}; chance accuracy {1 / (V - 2):.1%}",
            f"  test distance from first trigger to the query: min {gap.min()}, median "
            f"{gap.median()}, max {gap.max()}",
        ]
