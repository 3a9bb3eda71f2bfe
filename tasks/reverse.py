"""Sequence reversal: a ``seq2seq`` task for length curves in the manner of Bahdanau et al. 2014.

The source is a random string of symbols whose length is drawn uniformly from
``[min_len, seq_len]`` (``seq_len`` is the longest source); the target is the same string
reversed, then an end-of-sequence token.
Reversal is the hard direction for an encoder-decoder without attention: the first output
depends on the last input and the last output on the first, so a fixed-size summary must hold
the whole string. Bahdanau et al.'s Figure 2 (quality falls with sentence length without
attention, holds with it) is reproduced by bucketing accuracy by the stored ``length``.

Token ids, shared by source and target (``V = vocab_size``): 0 pad, 1 bos (prepended by native
encoder-decoders; never stored), 2 sep (between source and target for prefix-LM models), 3 eos
(the last real target token, scored like the others, so a decoder learns where to stop), and
symbols ``[4, V - 1]``.

Batch keys: ``source`` (B, seq_len) and ``target`` (B, seq_len + 1), right-padded with 0, and
``length`` (B,), the source length (models ignore it; reports bucket by it).

Worked example (V = 10, seq_len = 5; ``.`` = pad, ``E`` = eos = 3)::

    source   7  4  9  .  .         length 3
    target   9  4  7  E  .  .
"""

from __future__ import annotations

import torch

from tasks.base import GeneratedTask, TaskSpec, smallest_int_dtype

PAD_ID, BOS_ID, SEP_ID, EOS_ID = 0, 1, 2, 3
FIRST_SYMBOL = 4


def check_reverse(*, vocab_size: int, min_len: int, seq_len: int) -> None:
    """Raise a ValueError naming the config key when the knobs cannot make a pair."""
    if vocab_size <= FIRST_SYMBOL:
        raise ValueError(
            f"reverse: task.vocab_size={vocab_size} leaves no symbols after the reserved ids "
            f"pad, bos, sep, eos (0-3); use task.vocab_size >= {FIRST_SYMBOL + 1}"
        )
    if not 1 <= min_len <= seq_len:
        raise ValueError(
            f"reverse: need 1 <= task.min_len <= task.seq_len, got {min_len} and {seq_len}"
        )


def generate_reverse(
    n_examples: int, *, vocab_size: int, min_len: int, seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Draw ``n_examples`` reversal pairs: ``source`` (N, seq_len), ``target`` (N, seq_len + 1),
    ``length`` (N,)."""
    check_reverse(vocab_size=vocab_size, min_len=min_len, seq_len=seq_len)
    g = torch.Generator().manual_seed(seed)
    N = n_examples
    lengths = torch.randint(min_len, seq_len + 1, (N,), generator=g)  # (N,)
    symbols = torch.randint(FIRST_SYMBOL, vocab_size, (N, seq_len), generator=g)
    pos = torch.arange(seq_len)
    real = pos < lengths[:, None]  # (N, seq_len)
    source = torch.where(real, symbols, PAD_ID)
    # target j reads source (length - 1 - j); clamped indices only land on positions masked out
    back = (lengths[:, None] - 1 - pos).clamp(min=0)  # (N, seq_len)
    target = torch.full((N, seq_len + 1), PAD_ID, dtype=torch.long)
    target[:, :seq_len] = torch.where(real, source.gather(1, back), PAD_ID)
    target[torch.arange(N), lengths] = EOS_ID
    dtype = smallest_int_dtype(vocab_size)
    return {
        "source": source.to(dtype),
        "target": target.to(dtype),
        "length": lengths.to(smallest_int_dtype(seq_len)),
    }


class Reverse(GeneratedTask):
    """Reverse a random string: ``seq2seq``, scored by token accuracy over the real target tokens.

    Args:
        vocab_size: V, shared by source and target; ids 0-3 are pad, bos, sep, eos, symbols
            are [4, V - 1].
        min_len: shortest source.
        seq_len: longest source (targets are one longer, for eos).
        n_train, n_val, n_test, seed, cache_dir: see :class:`tasks.base.GeneratedTask`.
    """

    name = "reverse"

    def __init__(self, *, vocab_size: int, min_len: int, seq_len: int, n_train: int, n_val: int,
                 n_test: int, seed: int, cache_dir: str | None = None):
        knobs = dict(vocab_size=vocab_size, min_len=min_len, seq_len=seq_len)
        check_reverse(**knobs)  # a bad configuration fails now, not at the first dataset() call
        spec = TaskSpec(kind="seq2seq", vocab_size=vocab_size, n_outputs=vocab_size, seq_len=seq_len,
                        pad_id=PAD_ID, target_len=seq_len + 1, bos_id=BOS_ID, sep_id=SEP_ID)
        super().__init__(spec, generate_reverse, knobs, n_train=n_train, n_val=n_val, n_test=n_test,
                         seed=seed, cache_dir=cache_dir)

    def headline(self) -> list[str]:
        n_symbols = self.spec.vocab_size - FIRST_SYMBOL
        return [
            f"reverse: strings of {n_symbols} symbols, length uniform in [{self.knobs['min_len']}, "
            f"{self.spec.seq_len}], target = reversed source + eos; chance accuracy "
            f"{1 / n_symbols:.1%} on symbols",
        ]

    def describe(self) -> str:
        """:meth:`headline`, then source lengths, scored target tokens and symbol balance per split."""
        lines = self.headline()
        for split, arrays in self.splits().items():
            length = arrays["length"].long()
            symbols = arrays["source"][arrays["source"] != PAD_ID].long()
            counts = torch.bincount(symbols, minlength=self.spec.vocab_size)[FIRST_SYMBOL:]
            share = counts.double() / max(symbols.numel(), 1)
            lines.append(
                f"  {split}: {len(length)} examples, source length min {length.min()} mean "
                f"{length.double().mean():.1f} max {length.max()}, {length.sum() + len(length)} "
                f"scored target tokens; symbol share min {share.min():.1%} max {share.max():.1%}"
            )
        return "\n".join(lines)
