"""BigBird's attention pattern as LRA's released code builds it (``bigbird`` with
``pattern: lra_released``).

Read at google-research/long-range-arena cd31e5c, ``lra_benchmarks/models/bigbird/
bigbird_attention.py`` (``sparse_dot_product_attention``, ``get_block_rand_mask``,
``band_start_block_rand_multi_attention_pad``) and ``bigbird.py``:

* The input is padded to whole blocks *before* the projections with ``extra_len = block_size -
  L % block_size`` positions, so always at least one (a whole block when ``L`` is a multiple).
  The padding mask is padded with the value -1e9, which a boolean mask reads as True: the
  appended positions count as real keys. With the release's bias-free projections
  (``model.init=lra_released``) their keys and values are zero vectors, so each takes a share
  exp(0) of every softmax that sees it and adds nothing to the output. The task's own padding
  (token 0) is masked with -10000 and pad queries output zeros.
* The ``nb`` blocks of the padded length: the first and the *last* block are global (they attend
  to every key and every query attends to them); block 1 attends to blocks 0, 1, 2 and nb - 1;
  block nb - 2 to 0, nb - 3, nb - 2 and nb - 1; every block i in between to its window i - 1,
  i, i + 1 and to blocks 0 and nb - 1. Every non-global block also attends to ``r`` random
  blocks.
* The random blocks are drawn per head, by numpy's global generator seeded with the layer index
  (``connectivity_seed=lyr``), head after head, query block after query block, and the same at
  every call (a fixed pattern per layer and head). Candidates exclude the window and the global
  blocks, and, past 1024 tokens, every block after token 1024 (``last_idx=min(L, 1024)``).
  :func:`released_random_blocks` repeats those draws with ``numpy.random.RandomState(seed)``,
  which gives the same numbers.

So the last global block is the padded sequence's last block, not the last real one: on
ListOps and Text, mostly padding plus the appended zero keys. We follow the release (the model
that produced LRA's numbers), which makes the pattern depend on the padded length (fixed per
task in LRA, as here) and lets the appended positions take a share of every softmax; the
default ``pattern: itc`` keeps BigBird's paper pattern and padding invariance. Causal tasks: the
release falls back to dense causal attention, and so does this pattern.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from architectures.sparse import attend, attend_gathered

RANDOM_BLOCK_HORIZON = 1024  # last_idx=min(seq_length, 1024): random blocks come from the first 1024 tokens


def released_length(L: int, block_size: int) -> int:
    """The padded length: ``L + block_size - L % block_size`` (at least one appended position)."""
    return L + block_size - L % block_size


def released_random_blocks(n_blocks: int, *, block_size: int, n_random_blocks: int, n_heads: int,
                           seed: int) -> np.ndarray:
    """Each head's random key blocks (n_heads, n_blocks - 2, r) for query blocks 1 .. n_blocks - 2,
    drawn as ``get_block_rand_mask`` draws them after ``numpy.random.seed(seed)``."""
    if n_blocks < 4:  # the release's band needs blocks 0, 1, nb - 2 and nb - 1 to be distinct
        raise ValueError(f"bigbird pattern=lra_released needs at least 4 blocks of model.mixer.block_size="
                         f"{block_size}, got {n_blocks}; use a longer sequence or smaller blocks")
    rng = np.random.RandomState(seed)
    r = n_random_blocks
    length = n_blocks * block_size
    horizon = min(length, RANDOM_BLOCK_HORIZON)
    last = horizon // block_size - 1 if horizon > 2 * block_size else n_blocks - 1
    a = np.arange(1, n_blocks - 1)  # a[j] = block j + 1
    tables = np.zeros((n_heads, n_blocks - 2, r), dtype=np.int64)
    for h in range(n_heads):
        for i in range(1, n_blocks - 1):
            start, end = i - 2, i
            if i == 1:
                candidates = a[2:last]
            elif i == 2:
                candidates = a[3:last]
            elif i == n_blocks - 3:
                candidates = a[:last - 4]
            elif i == n_blocks - 2:
                candidates = a[:last - 3]
            elif start > last:
                candidates = a[:last]
            elif end + 1 == last:
                candidates = a[:start]
            else:
                candidates = np.concatenate((a[:start], a[end + 1:last]))
            picked = rng.permutation(candidates)[:r]
            if len(picked) < r:  # the release would repeat a block (numpy broadcasting) or fail
                raise ValueError(
                    f"bigbird pattern=lra_released: {n_blocks} blocks of {block_size} leave query block {i} only "
                    f"{len(picked)} random candidates for model.mixer.n_random_blocks={r}; use a longer "
                    "sequence, a smaller model.mixer.block_size or fewer random blocks")
            tables[h, i - 1] = picked
    return tables


def released_key_blocks(random_blocks: np.ndarray) -> torch.Tensor:
    """The key blocks of every non-global query block (H, n_blocks - 2, 5 + r) from the random
    blocks (H, n_blocks - 2, r): five fixed slots (block i's window i - 1, i, i + 1 and the
    global blocks 0 and nb - 1; blocks 1 and nb - 2 list their four as the release does, the
    fifth slot -1), then the random blocks."""
    H, n, r = random_blocks.shape
    nb = n + 2
    i = torch.arange(1, nb - 1)[:, None]  # (nb - 2, 1)
    fixed = torch.cat([i - 1, i, i + 1, torch.zeros_like(i), torch.full_like(i, nb - 1)], 1)  # (nb - 2, 5)
    fixed[0] = torch.tensor([0, 1, 2, nb - 1, -1])  # block 1: blocks 0, 1, 2 and the last
    fixed[-1] = torch.tensor([0, nb - 3, nb - 2, nb - 1, -1])  # block nb - 2
    return torch.cat([fixed.expand(H, -1, -1), torch.from_numpy(random_blocks)], 2)  # (H, nb - 2, 5 + r)


def released_block_mask(keys: torch.Tensor) -> torch.Tensor:
    """The block-level pattern (H, nb, nb) from :func:`released_key_blocks` (H, nb - 2, m): True
    where query block i attends key block j."""
    H, n, _ = keys.shape
    nb = n + 2
    mask = torch.zeros(H, nb, nb, dtype=torch.bool)
    mask[:, [0, nb - 1]] = True  # the global query blocks
    rows = torch.arange(1, nb - 1)[None, :, None].expand_as(keys)
    valid = keys >= 0
    mask[torch.arange(H)[:, None, None].expand_as(keys)[valid], rows[valid], keys[valid]] = True
    return mask


def released_bigbird_attention(q, k, v, *, key_blocks: torch.Tensor, key_real: torch.Tensor,
                               block_size: int, dropout: float = 0.0) -> torch.Tensor:
    """BigBird attention on the padded sequence, per head.

    Args:
        q, k, v: (B, H, Lp, hd), Lp a multiple of ``block_size`` (the release's padded length).
        key_blocks: (H, nb - 2, m) the key blocks of query blocks 1 .. nb - 2 (-1: none).
        key_real: (B, Lp) True at keys that count (real tokens and the appended positions).

    Returns:
        (B, H, Lp, hd); equals ``dense_attention`` under :func:`released_block_mask` expanded to
        tokens and ``key_real``.
    """
    B, H, Lp, hd = q.shape
    b = block_size
    nb = Lp // b
    # heads folded into the batch: each (example, head) gathers its own random blocks
    fold = (lambda t: t.reshape(B * H, 1, Lp, hd))
    blocks = key_blocks.to(q.device).expand(B, -1, -1, -1).reshape(B * H, nb - 2, -1)  # (B * H, nb - 2, m)
    real = key_real.repeat_interleave(H, 0)  # (B * H, Lp)
    qpos = torch.arange(b, (nb - 1) * b, device=q.device).view(nb - 2, b, 1)
    middle = attend_gathered(fold(q)[:, :, b:(nb - 1) * b], fold(k), fold(v), real, blocks, qpos, b,
                             lambda i, j: j >= 0, dropout)  # (B * H, 1, (nb - 2) * b, hd)
    middle = middle.view(B, H, (nb - 2) * b, hd)
    glob = torch.cat([q[:, :, :b], q[:, :, -b:]], 2)  # (B, H, 2b, hd): the first and the last block
    y_glob = attend(glob, k, v, key_real[:, None, None, :], dropout)  # (B, H, 2b, hd)
    return torch.cat([y_glob[:, :, :b], middle, y_glob[:, :, b:]], 2)


def pad_as_released(q, k, v, mask: torch.Tensor | None, block_size: int):
    """Append the release's ``block_size - L % block_size`` positions to q, k, v (B, H, L, hd) as
    zero vectors, and return them with the key mask (B, Lp), True at the appended positions."""
    B, _, L, _ = q.shape
    extra = released_length(L, block_size) - L
    real = mask if mask is not None else torch.ones(B, L, dtype=torch.bool, device=q.device)
    real = F.pad(real, (0, extra), value=True)  # the release's -1e9 padding of a boolean mask
    return (*(F.pad(t, (0, 0, 0, extra)) for t in (q, k, v)), real)
