"""Sinkhorn attention as LRA's released code computes it (``sinkhorn`` with ``variant:
lra_released``).

Read at google-research/long-range-arena cd31e5c, ``lra_benchmarks/models/sinkhorn_transformer/
sinkhorn_attention.py`` (``SinkhornAttention.apply``, ``local_dot_product_attention``) and
``sinkhorn_transformer.py`` (``SinkhornTransformerBlock``: ``bias=False``, ``attention_axis=(1,)``,
``broadcast_dropout=False``, no ``dropout_rng``; the encoder's padding mask is ``inputs > 0``).
For the non-causal encoder, with b = ``block_size`` and nb = L / b (b must divide L: the release
reshapes, it does not pad), it computes:

* Slots. The projections q, k, v (B, L, H, hd) are reshaped to (B, b, nb, H, hd) (lines
  343-348): the block size first, so position p = s * nb + j sits at slot (s, j), and attention
  runs over axis 1, s, for each fixed j. What the code calls block j is the *strided* group of
  positions j, nb + j, 2 nb + j, ..., not a contiguous block.
* Local attention (line 466): the query at (s, j) attends to the b keys at (s', j), softmax of
  q.k / sqrt(hd).
* Sorted keys. The sorting network, a bias-free Dense hd -> max_num_blocks (25, never changed by
  a config) on each group's key sum, cut to nb columns and row-softmaxed, gives the permutation
  (B, nb, H, nb') (lines 355-380). But ``einsum('bskhd,bnhl->bsnhd', block_key, permutation)``
  (line 382) sums k and l separately: sorted_key[s, n] = (sum_k key[s * nb + k]) * (sum_l
  permutation[n, l]), and a softmax row sums to 1. So every group's sorted key at slot s is the
  sum of the nb *contiguous* keys s * nb ... s * nb + nb - 1, whatever the network says, and the
  network gets no gradient (up to rounding). Values alike (line 383).
* Sorted attention (line 479): the query at (s, j) attends to the b sorted keys s' in a second
  softmax; the output is local + sorted (line 492), then the projection ``out``.
* Padding (lines 401-420). The (B, L) mask is cut *contiguously*, (B * nb, b), into
  mask[n, s, t] = real[n * b + s] & real[n * b + t] (flax's ``make_padding_mask``), and
  ``bias[:, :, None]`` (line 146) adds it to the local weights (B, nb, H, b, b) of group j = n: the
  mask of contiguous block n lands on strided group n. Whether the query at s * nb + j may see the
  key at s' * nb + j is decided by positions j * b + s and j * b + s', not by those two. The sorted
  mask ``einsum('bksj,bnhl->bnsj', mask, permutation) > 0`` (line 418) allows (s, s') where some
  contiguous block k has both k * b + s and k * b + s' real, the same for every group.
* Masking is a bias, 0 or -1e10, added in float32 (lines 447-463). 1e10 is a multiple of 1024
  there, so it swallows any score under 512: a masked score is exactly -1e10, and a row with every
  key masked gets equal weights over its b keys (not zeros), while autodiff still passes the
  scores' gradient through the addition. :func:`add_mask_bias` does both in any dtype.
* Attention dropout (``attention_dropout_rate``) on the weights of both softmaxes in training,
  element by element (``broadcast_dropout=False``), independent draws (each call makes its own
  rng). None in evaluation.
* Causal: the release marks its causal masking untested (TODO, line 390), and the causal masks it
  builds are (L, L) (``_make_causal_mask(key, attention_axis)``, lines 378 and 399), which do not
  fit the (b, b) block weights; this variant refuses causal tasks.

So in the release a real token at s * nb + j attends uniformly over its group whenever position
j * b + s is padding, and pad keys are visible wherever the shifted block is real. We follow it:
this is the model that produced LRA's Sinkhorn numbers. ``variant: paper``
(architectures/sinkhorn.py) is the paper's attention.

:func:`released_sinkhorn_attention` is the blocked kernel, O(L * b) memory;
:func:`sinkhorn_released_reference` builds the two (L, L) masks from positions and runs plain
softmax attention twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_BIAS = -1e10  # the release's bias on masked attention weights (lax.select(mask > 0, 0, -1e10))


def add_mask_bias(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``scores + (0 where allowed, else -1e10)`` as the release computes it in float32: a masked
    score becomes exactly -1e10 (so a row with nothing allowed gets uniform weights) and keeps the
    gradient of the addition. In float64 the plain addition would keep the scores' differences."""
    masked = scores - scores.detach() + MASK_BIAS  # value -1e10, gradient 1 to the score
    return torch.where(allowed, scores, masked)


def strided_groups(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, L, d) -> (B, H, nb, b, d) with [..., j, s, :] = x[..., s * nb + j, :]: the release's
    (B, b, nb, H, d) reshape, groups first."""
    B, H, L, d = x.shape
    return x.view(B, H, block_size, L // block_size, d).transpose(2, 3)  # (B, H, b, nb, d) -> (B, H, nb, b, d)


def from_groups(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`strided_groups`: (B, H, nb, b, d) -> (B, H, L, d)."""
    B, H, nb, b, d = y.shape
    return y.transpose(2, 3).reshape(B, H, b * nb, d)  # (B, H, b, nb, d) -> (B, H, L, d)


def released_permutation(k: torch.Tensor, sortnet: nn.Linear, block_size: int) -> torch.Tensor:
    """The release's softmax sort (B, H, nb, min(nb, max_blocks)) from k (B, H, L, hd): the
    sorting network on each strided group's key sum, cut to nb columns, row softmax."""
    nb = k.shape[2] // block_size
    summary = strided_groups(k, block_size).sum(3)  # (B, H, nb, hd): block_key.sum(axis=1)
    return torch.softmax(sortnet(summary)[..., :nb], -1)  # (B, H, nb, nb')


def sorted_keys(x: torch.Tensor, permutation: torch.Tensor, block_size: int) -> torch.Tensor:
    """The release's ``einsum('bskhd,bnhl->bsnhd', block_x, permutation)`` in our layout, with k
    and l summed separately as that einsum does: (B, H, nb, b, d), [..., j, s, :] = (sum of x at
    positions s * nb ... s * nb + nb - 1) * (row sum of permutation[j], 1 up to rounding).

    Args:
        x: (B, H, L, d) keys or values.
        permutation: (B, H, nb, nb').
    """
    B, H, L, d = x.shape
    chunk_sums = x.view(B, H, block_size, L // block_size, d).sum(3)  # (B, H, b, d): sum over k
    row_sums = permutation.sum(-1)  # (B, H, nb): sum over l
    return row_sums[..., None, None] * chunk_sums[:, :, None]  # (B, H, nb, b, d)


def released_masks(key_real: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's padding masks from key_real (B, L): local (B, 1, nb, b, b), [j, s, s'] =
    real[j * b + s] & real[j * b + s'] (contiguous block j on strided group j), and sorted
    (B, 1, 1, b, b): some contiguous block has both offsets real, for every group."""
    B, L = key_real.shape
    blocks = key_real.view(B, L // block_size, block_size)  # (B, nb, b): contiguous, as (B * nb, b)
    pairs = blocks[:, :, :, None] & blocks[:, :, None, :]  # (B, nb, b, b): make_padding_mask
    return pairs[:, None], pairs.any(1)[:, None, None]  # heads (and groups) broadcast


def grouped_attention(q, k, v, allowed: torch.Tensor, dropout: float) -> torch.Tensor:
    """Softmax attention within each group, q (B, H, nb, b, hd) over k, v (B, H, nb, b, hd),
    masked as the release masks (:func:`add_mask_bias`); dropout on the weights."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, nb, b, b)
    weights = F.dropout(torch.softmax(add_mask_bias(scores, allowed), -1), dropout)
    return weights @ v  # (B, H, nb, b, hd)


def released_sinkhorn_attention(
    q, k, v, permutation: torch.Tensor, *, key_real: torch.Tensor, block_size: int, dropout: float = 0.0,
) -> torch.Tensor:
    """Local plus sorted attention, two softmaxes summed, as the release (module docstring).

    Args:
        q, k, v: (B, H, L, hd), L a multiple of ``block_size``.
        permutation: (B, H, nb, nb') the sort (only its row sums reach the output).
        key_real: (B, L) True at real tokens.
        dropout: attention-weight dropout (0 in evaluation).

    Returns:
        (B, H, L, hd); equals :func:`sinkhorn_released_reference`.
    """
    local_ok, sorted_ok = released_masks(key_real, block_size)
    qg, kg, vg = (strided_groups(t, block_size) for t in (q, k, v))  # (B, H, nb, b, hd)
    local = grouped_attention(qg, kg, vg, local_ok, dropout)
    k_sorted, v_sorted = (sorted_keys(t, permutation, block_size) for t in (k, v))  # (B, H, nb, b, hd)
    return from_groups(local + grouped_attention(qg, k_sorted, v_sorted, sorted_ok, dropout))  # (B, H, L, hd)


def sinkhorn_released_reference(q, k, v, *, key_real: torch.Tensor, block_size: int) -> torch.Tensor:
    """The plain version, from positions: two dense softmax attentions over (L, L), summed.

    Position p is slot (s, j) = (p // nb, p % nb). A query sees the keys of its own group (same
    j; -inf elsewhere). Local keys are k itself, allowed where positions j * b + s and j * b + s'
    are real; sorted keys are, at every position of chunk s', the sum of k over that chunk
    (positions with p // nb = s'), allowed where some contiguous block k has k * b + s and
    k * b + s' real. Masked pairs take the release's -1e10 (:func:`add_mask_bias`). Same
    arguments as :func:`released_sinkhorn_attention`, without the permutation (its rows sum to 1)
    and without dropout.
    """
    B, H, L, hd = q.shape
    b, nb = block_size, L // block_size
    p = torch.arange(L, device=q.device)
    s, j = p // nb, p % nb  # each position's slot
    same_group = j[:, None] == j[None, :]  # (L, L)
    local_ok = key_real[:, j * b + s][:, :, None] & key_real[:, j[:, None] * b + s[None, :]]  # (B, L, L)
    blocks = key_real.view(B, nb, b)  # (B, nb, b): contiguous block k, offset t
    sorted_ok = (blocks[:, :, s, None] & blocks[:, :, None, s]).any(1)  # (B, L, L)
    same_chunk = (s[:, None] == s[None, :]).to(k.dtype)  # (L, L)
    k_sorted, v_sorted = same_chunk @ k, same_chunk @ v  # (B, H, L, hd): each position holds its chunk's sum

    def attention(keys, values, allowed):
        scores = q @ keys.transpose(-2, -1) / math.sqrt(hd)  # (B, H, L, L)
        scores = add_mask_bias(scores, allowed[:, None]).masked_fill(~same_group, float("-inf"))
        return torch.softmax(scores, -1) @ values  # (B, H, L, hd)

    return attention(k, v, local_ok) + attention(k_sorted, v_sorted, sorted_ok)
