"""Multi-query associative recall (MQAR), as in Zoology (Arora et al. 2023, arXiv 2312.04927).

A sequence starts with ``n_pairs`` key-value pairs, keys drawn from ``[1, V/2)`` and values
from ``[V/2, V)``, all keys distinct. The rest of the sequence holds random filler tokens,
among which every key is asked again exactly once, at a gap after the context drawn from a
power law (``power_a``; small gaps are likelier). The model must output, at each query, the
value that was paired with that key. Nothing else is scored.

Worked example (V = 16, seq_len = 12, n_pairs = 2; ``.`` = filler, ``-`` = ignored)::

    tokens   3 12  5  9  .  .  5  .  .  3  .  .
    targets  -  -  -  -  -  -  9  -  -  12 -  -

Differences from Zoology's generator, all harmless: filler tokens avoid id 0 (our pad id,
which Zoology never uses for keys either), keys and values are sampled with a vectorised
random permutation, and query gaps with the Gumbel top-k trick (the same distribution as
``numpy.random.choice(replace=False, p=...)``).
"""

from __future__ import annotations

import torch

from tasks.base import IGNORE_INDEX, GeneratedTask, TaskSpec, smallest_int_dtype


def check_mqar(*, vocab_size: int, seq_len: int, n_pairs: int) -> None:
    """Raise a ValueError naming the config key when the knobs cannot make a sequence."""
    n_keys = vocab_size // 2 - 1
    if n_pairs > n_keys:
        raise ValueError(
            f"mqar: task.n_pairs={n_pairs} needs {n_pairs} distinct keys, but task.vocab_size="
            f"{vocab_size} has {n_keys} ([1, vocab_size/2)); raise task.vocab_size or lower task.n_pairs"
        )
    if n_pairs > (seq_len - 2 * n_pairs) // 2:
        raise ValueError(
            f"mqar: task.seq_len={seq_len} is too short for task.n_pairs={n_pairs}: the context "
            f"takes {2 * n_pairs} tokens and every key is queried again after it (at least "
            f"{4 * n_pairs} tokens in all); raise task.seq_len or lower task.n_pairs"
        )


def generate_mqar(
    n_examples: int, *, vocab_size: int, seq_len: int, n_pairs: int, power_a: float, seed: int
) -> dict[str, torch.Tensor]:
    """Draw ``n_examples`` MQAR sequences; returns ``tokens`` and ``targets`` of (N, seq_len)."""
    check_mqar(vocab_size=vocab_size, seq_len=seq_len, n_pairs=n_pairs)
    context = 2 * n_pairs
    space = (seq_len - context) // 2  # query slots sit at even offsets after the context
    n_keys = vocab_size // 2 - 1
    g = torch.Generator().manual_seed(seed)
    N = n_examples

    # distinct keys in [1, V/2) and values in [V/2, V) per example: random permutations
    keys = torch.rand(N, n_keys, generator=g).argsort(dim=1)[:, :n_pairs] + 1  # (N, P)
    n_values = vocab_size - vocab_size // 2
    values = torch.rand(N, n_values, generator=g).argsort(dim=1)[:, :n_pairs] + vocab_size // 2

    # query gaps without replacement, p(gap = i) proportional to a * i^(a-1), i = 1..space
    log_p = torch.log(power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1))
    gumbel = -torch.log(-torch.log(torch.rand(N, space, generator=g, dtype=torch.float64)))
    gaps = (log_p + gumbel).topk(n_pairs, dim=1).indices  # (N, P), distinct slots

    tokens = torch.randint(1, vocab_size, (N, seq_len), generator=g)
    tokens[:, 0:context:2] = keys
    tokens[:, 1:context:2] = values
    query_pos = context + 2 * gaps  # (N, P)
    tokens.scatter_(1, query_pos, keys)
    targets = torch.full((N, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    dtype = smallest_int_dtype(vocab_size)
    return {"tokens": tokens.to(dtype), "targets": targets.to(dtype)}


class MQAR(GeneratedTask):
    """Zoology's MQAR as an ``lm`` task scored by accuracy at the query positions.

    Args:
        vocab_size: V; keys come from [1, V/2), values from [V/2, V); 0 is reserved.
        seq_len: tokens per sequence.
        n_pairs: key-value pairs in the context (and queries per sequence).
        power_a: exponent of the power law over query gaps (Zoology: 0.01).
        n_train, n_val, n_test, seed, cache_dir: see :class:`tasks.base.GeneratedTask`.
    """

    name = "mqar"

    def __init__(self, *, vocab_size: int, seq_len: int, n_pairs: int, power_a: float, n_train: int,
                 n_val: int, n_test: int, seed: int, cache_dir: str | None = None):
        check_mqar(vocab_size=vocab_size, seq_len=seq_len, n_pairs=n_pairs)  # a bad configuration fails now
        spec = TaskSpec(kind="lm", vocab_size=vocab_size, n_outputs=vocab_size, seq_len=seq_len)
        knobs = dict(vocab_size=vocab_size, seq_len=seq_len, n_pairs=n_pairs, power_a=power_a)
        super().__init__(spec, generate_mqar, knobs, n_train=n_train, n_val=n_val, n_test=n_test,
                         seed=seed, cache_dir=cache_dir)

    def headline(self) -> list[str]:
        k = self.knobs
        return [f"mqar: vocab {k['vocab_size']}, seq_len {k['seq_len']}, {k['n_pairs']} key-value "
                f"pairs, power_a {k['power_a']}, seed {self.seed}"]
