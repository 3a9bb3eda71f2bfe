"""Sparse softmax attention mixers: sliding window (`local`), Longformer and BigBird.

Multi-head softmax attention (:class:`MultiHeadAttention`'s projections) where a query sees
only some keys:

* ``local``: a sliding window of ``window`` keys. Causal: keys ``i - window < j <= i``.
  Bidirectional: ``i - (window - window // 2 - 1) <= j <= i + window // 2``, i.e. ``window // 2``
  keys after the query and the rest before it and itself, as LRA's released Longformer builds
  its window (symmetric for an odd window).
* ``longformer`` (Beltagy et al. 2020): the window plus ``n_global`` global tokens (the first
  positions) that attend to every key and are attended by every query. In causal mode a global
  token, like every query, sees only the past.
* ``bigbird`` (Zaheer et al. 2020): attention between blocks of ``block_size`` tokens: the
  ``n_window_blocks`` blocks around the query block, the first ``n_global_blocks`` blocks (global
  both ways) and ``n_random_blocks`` random blocks per query block. The random pattern is fixed
  per layer (a ``torch.Generator`` seeded from ``seed`` and ``layer_idx``) and drawn from the
  sequence's real (unpadded) blocks, so padding never changes a real token's output. In causal
  mode a query block sees only blocks at or before it, and its random blocks come from the past.
  ``pattern: lra_released`` is the pattern of LRA's released code instead (the first and the
  last block of the padded sequence global, random blocks per head; its kernel lives in
  :mod:`architectures.bigbird_released`).

The portable path chunks queries into blocks, gathers only the key blocks each needs and runs
SDPA on the blocks: O(L * window) time and memory, never an L x L mask. A score bias that
depends on the key-minus-query distance (``model.positional=alibi|t5``) is computed for the
gathered pairs only (``score_bias``), and on CUDA as a FlexAttention ``score_mod``. ``sliding_window_mask``, ``longformer_mask``
and ``bigbird_mask`` build the equivalent dense masks for the exact reference,
:func:`architectures.attention.dense_attention`. On CUDA the same patterns run as a compiled
FlexAttention block mask (it has no CPU backward, so CPU never reaches it).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from architectures.attention import MultiHeadAttention

BIGBIRD_PATTERNS = ("itc", "lra_released")  # the paper's ITC pattern; LRA's released one

# ----------------------------------------------------------------------------- dense references


def in_window(i: torch.Tensor, j: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """True where key position ``j`` lies in query position ``i``'s window (broadcasting)."""
    if causal:
        return (j <= i) & (j > i - window)
    # LRA's Longformer window (_build_sliding_window_mask): window // 2 keys after the query, the
    # rest before it and itself, so exactly ``window`` keys (an odd window is symmetric)
    return (j - i <= window // 2) & (i - j <= window - window // 2 - 1)


def sliding_window_mask(L: int, window: int, causal: bool, device=None) -> torch.Tensor:
    """Dense (L, L) mask of ``local`` attention: True where query i may attend key j."""
    i = torch.arange(L, device=device)[:, None]
    return in_window(i, i.T, window, causal)


def longformer_mask(L: int, window: int, n_global: int, causal: bool, device=None) -> torch.Tensor:
    """Dense (L, L) mask of ``longformer`` attention: the window plus global rows and columns."""
    i = torch.arange(L, device=device)[:, None]
    j = i.T
    allowed = in_window(i, j, window, causal) | (i < n_global) | (j < n_global)
    return allowed & (j <= i) if causal else allowed


def bigbird_block_mask(n_window_blocks: int, n_global_blocks: int, random_blocks: torch.Tensor) -> torch.Tensor:
    """Block-level BigBird pattern (..., nb, nb) from random key blocks (..., nb, r), -1 = none."""
    nb = random_blocks.shape[-2]
    q = torch.arange(nb, device=random_blocks.device)[:, None]
    blocks = ((q - q.T).abs() <= (n_window_blocks - 1) // 2) | (q < n_global_blocks) | (q.T < n_global_blocks)
    is_random = (random_blocks[..., None] == torch.arange(nb, device=random_blocks.device)).any(-2)
    return blocks | is_random  # (..., nb, nb)


def bigbird_mask(
    L: int, *, block_size: int, n_window_blocks: int, n_global_blocks: int, random_blocks: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Dense (..., L, L) mask of ``bigbird`` attention for random key blocks (..., ceil(L / b), r)."""
    blocks = bigbird_block_mask(n_window_blocks, n_global_blocks, random_blocks)
    allowed = blocks.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :L, :L]
    return allowed & torch.ones(L, L, dtype=torch.bool, device=allowed.device).tril() if causal else allowed


def bigbird_random_blocks(
    n_blocks: int, *, n_window_blocks: int, n_global_blocks: int, n_random_blocks: int, causal: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw each query block's random key blocks: (n_blocks, n_random_blocks), -1 where none.

    Candidates are the blocks that are neither global nor in the window (and, if causal, before
    the query block); global query blocks see everything and get none.
    """
    half = (n_window_blocks - 1) // 2
    table = torch.full((n_blocks, n_random_blocks), -1, dtype=torch.long)
    for q in range(n_global_blocks, n_blocks):
        candidates = torch.tensor([k for k in range(n_global_blocks, q if causal else n_blocks) if abs(k - q) > half],
                                  dtype=torch.long)
        pick = candidates[torch.randperm(len(candidates), generator=generator)[:n_random_blocks]]
        table[q, : len(pick)] = pick
    return table


# ------------------------------------------------------------------------------ blocked kernels


def attend(q, k, v, allowed: torch.Tensor, dropout: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention where ``allowed`` (broadcastable to (..., Lq, S)) is True, through SDPA,
    whose fused kernels keep no (Lq, S) weights for the backward pass. They would give NaN to a
    query with no allowed key, so such a query sees every key and its output is zeroed.
    ``bias`` (broadcastable to (..., H, Lq, S)) is added to the scores where allowed."""
    has_key = allowed.any(-1, keepdim=True)
    attn_mask = allowed | ~has_key
    if bias is not None:
        attn_mask = bias.to(q.dtype).masked_fill(~attn_mask, float("-inf"))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    return y * has_key


def pad_to_blocks(block_size: int, key_real: torch.Tensor | None, *xs: torch.Tensor):
    """Right-pad (B, H, L, hd) tensors to a multiple of ``block_size``; the key mask pads False."""
    B, _, L, _ = xs[0].shape
    pad = -L % block_size
    if key_real is None:
        key_real = torch.ones(B, L, dtype=torch.bool, device=xs[0].device)
    return F.pad(key_real, (0, pad), value=False), *(F.pad(x, (0, 0, 0, pad)) for x in xs)


def gather_blocks(x: torch.Tensor, key_blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """x (B, H, Lp, d) -> (B * nq, H, m * b, d): for each query block its key blocks (B, nq, m),
    concatenated; -1 (no block) reads block 0, which the caller masks out."""
    B, H, Lp, d = x.shape
    _, nq, m = key_blocks.shape
    blocks = x.view(B, H, Lp // block_size, block_size, d).transpose(1, 2)  # (B, nb, H, b, d)
    batch = torch.arange(B, device=x.device)[:, None, None]
    picked = blocks[batch, key_blocks.clamp(min=0)]  # (B, nq, m, H, b, d)
    return picked.transpose(2, 3).reshape(B * nq, H, m * block_size, d)


def attend_gathered(q, k, v, key_real, key_blocks, qpos, block_size, rule, dropout, extra=None,
                    score_bias=None) -> torch.Tensor:
    """Attention of query blocks to the key blocks each one gathers.

    Args:
        q: (B, H, nq * b, hd) the queries; k, v: (B, H, Lp, hd); key_real: (B, Lp) bool.
        key_blocks: (B, nq, m) the key blocks of each query block, -1 for none.
        qpos: (nq, b, 1) the queries' token positions.
        rule: ``rule(qpos, kpos)``, which token pairs inside the gathered blocks are allowed.
        extra: optional ``(k_extra, v_extra, allowed_extra)``, (B, H, G, hd) twice and
            (B, nq, b, G): keys every query block sees (Longformer's global tokens), which sit
            at positions 0 .. G - 1 unless ``extra_pos`` (G,) is given as a fourth element.
        score_bias: optional ``score_bias(distance)``, key-minus-query distances (..., b, S) to
            a bias (..., H, b, S) added to the scores (ALiBi, T5).

    Returns:
        (B, H, nq * b, hd)
    """
    B, H, _, hd = q.shape
    nq, b, _ = qpos.shape
    batch = torch.arange(B, device=q.device)[:, None, None]
    kpos = key_blocks[..., None] * block_size + torch.arange(block_size, device=q.device)  # (B, nq, m, bk)
    real = key_real.view(B, -1, block_size)[batch, key_blocks.clamp(min=0)]  # (B, nq, m, bk)
    kpos = kpos.masked_fill((key_blocks[..., None] < 0) | ~real, -1).flatten(2)[:, :, None, :]  # (B, nq, 1, S)
    allowed = (kpos >= 0) & rule(qpos, kpos)  # (B, nq, b or 1, S); -1 marks a missing or pad key
    bias = None if score_bias is None else score_bias(kpos - qpos)  # (B, nq, H, b, S)
    k_sel, v_sel = gather_blocks(k, key_blocks, block_size), gather_blocks(v, key_blocks, block_size)
    if extra is not None:
        k_extra, v_extra, allowed_extra = extra[:3]
        G = k_extra.shape[2]
        k_sel = torch.cat([k_sel, k_extra[:, None].expand(-1, nq, -1, -1, -1).reshape(B * nq, H, G, hd)], 2)
        v_sel = torch.cat([v_sel, v_extra[:, None].expand(-1, nq, -1, -1, -1).reshape(B * nq, H, G, hd)], 2)
        allowed = torch.cat([allowed.expand(B, nq, b, -1), allowed_extra.expand(B, nq, b, G)], -1)
        if bias is not None:
            gpos = extra[3] if len(extra) > 3 else torch.arange(G, device=q.device)
            g_bias = score_bias(gpos - qpos)  # (nq, H, b, G)
            bias = torch.cat([bias, g_bias.expand(B, -1, -1, -1, -1)], -1)
    q_blocks = q.view(B, H, nq, b, hd).transpose(1, 2).reshape(B * nq, H, b, hd)
    bias = None if bias is None else bias.flatten(0, 1)  # (B * nq, H, b, S)
    y = attend(q_blocks, k_sel, v_sel, allowed.flatten(0, 1)[:, None], dropout, bias)  # (B * nq, H, b, hd)
    return y.view(B, nq, H, b, hd).transpose(1, 2).reshape(B, H, nq * b, hd)


def global_rows(q, k, v, key_real, causal: bool, dropout: float, score_bias=None) -> torch.Tensor:
    """The first G queries (B, H, G, hd) attend to every real key (every past one if causal)."""
    G, Lp = q.shape[2], k.shape[2]
    allowed = key_real[:, None, None, :]  # (B, 1, 1, Lp)
    distance = torch.arange(Lp, device=q.device) - torch.arange(G, device=q.device)[:, None]  # (G, Lp)
    if causal:
        allowed = allowed & (distance <= 0)
    return attend(q, k, v, allowed, dropout, None if score_bias is None else score_bias(distance))


def window_block_size(window: int, L: int) -> int:
    """Query block for a window: half the window (so a block gathers about 1.5 windows of keys),
    at least 16 to keep the matmuls from being tiny, at most the sequence."""
    return max(1, min(max(window // 2, 16), L))


def sliding_window_attention(
    q, k, v, *, window: int, causal: bool, key_real: torch.Tensor | None = None, n_global: int = 0,
    dropout: float = 0.0, score_bias=None,
) -> torch.Tensor:
    """Blocked sliding-window attention, plus Longformer's global tokens when ``n_global > 0``.

    q, k, v (B, H, L, hd) and key_real (B, L) (True at real tokens, or None) -> (B, H, L, hd).
    Equals ``dense_attention`` with ``longformer_mask(L, window, n_global, causal) & key_real``
    in O(L * window) time and memory; ``score_bias`` as in :func:`attend_gathered`.
    """
    B, _, L, _ = q.shape
    b = window_block_size(window, L)
    key_real, q, k, v = pad_to_blocks(b, key_real, q, k, v)
    nb = q.shape[2] // b
    reach = min(nb - 1, math.ceil((window - 1) / b) if causal else math.ceil((window // 2) / b))
    offsets = torch.arange(-reach, (0 if causal else reach) + 1, device=q.device)
    blocks = torch.arange(nb, device=q.device)[:, None] + offsets  # (nb, m)
    blocks = blocks.masked_fill((blocks < 0) | (blocks >= nb), -1).expand(B, -1, -1)
    qpos = torch.arange(nb * b, device=q.device).view(nb, b, 1)
    G = min(n_global, L)
    extra = None
    if G:
        gpos = torch.arange(G, device=q.device)
        # a global key inside the window is already gathered: count it once
        g_allowed = key_real[:, None, None, :G] & ~in_window(qpos, gpos, window, causal)  # (B, nb, b, G)
        extra = (k[:, :, :G], v[:, :, :G], g_allowed & (gpos <= qpos) if causal else g_allowed)
    y = attend_gathered(q, k, v, key_real, blocks, qpos, b, lambda i, j: in_window(i, j, window, causal),
                        dropout, extra, score_bias)[:, :, :L]
    if G:
        y = torch.cat([global_rows(q[:, :, :G], k, v, key_real, causal, dropout, score_bias), y[:, :, G:]], 2)
    return y


def bigbird_attention(
    q, k, v, *, block_size: int, n_window_blocks: int, n_global_blocks: int, random_blocks: torch.Tensor,
    causal: bool, key_real: torch.Tensor | None = None, dropout: float = 0.0, score_bias=None,
) -> torch.Tensor:
    """Blocked BigBird attention; equals ``dense_attention`` with :func:`bigbird_mask` (and the
    ``score_bias`` of the distances, as in :func:`attend_gathered`).

    q, k, v (B, H, L, hd), key_real (B, L) or None and each example's random key blocks
    ``random_blocks`` (B, ceil(L / block_size), r), -1 = none -> (B, H, L, hd). Global query
    blocks attend densely (O(g * b * L)); every other query block gathers its window, global and
    random key blocks (O(L * b * (n_window_blocks + n_global_blocks + r))).
    """
    B, _, L, _ = q.shape
    b = block_size
    key_real, q, k, v = pad_to_blocks(b, key_real, q, k, v)
    nb = q.shape[2] // b
    g = min(n_global_blocks, nb)
    half = (n_window_blocks - 1) // 2
    qb = torch.arange(g, nb, device=q.device)[:, None]  # the non-global query blocks
    window = qb + torch.arange(-half, half + 1, device=q.device)
    glob = torch.arange(g, device=q.device).expand(nb - g, g)
    blocks = torch.cat([torch.cat([window, glob], 1).expand(B, -1, -1), random_blocks[:, g:].to(q.device)], 2)
    invalid = (blocks < 0) | (blocks >= nb)
    if causal:
        invalid = invalid | (blocks > qb)
    blocks = blocks.masked_fill(invalid, -1)  # (B, nb - g, m)
    # a block listed twice (a neighbour that is also global) must be counted once
    m = blocks.shape[-1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=q.device).tril(-1)
    blocks = blocks.masked_fill(((blocks[..., :, None] == blocks[..., None, :]) & earlier).any(-1), -1)
    qpos = torch.arange(g * b, nb * b, device=q.device).view(nb - g, b, 1)
    y = attend_gathered(q[:, :, g * b:], k, v, key_real, blocks, qpos, b,
                        (lambda i, j: j <= i) if causal else (lambda i, j: j >= 0), dropout,
                        score_bias=score_bias)
    y = torch.cat([global_rows(q[:, :, : g * b], k, v, key_real, causal, dropout, score_bias), y], 2)
    return y[:, :, :L]


# -------------------------------------------------------------------------- CUDA: FlexAttention


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_sparse_attention(q, k, v, mask_mod, score_bias=None) -> torch.Tensor:
    """FlexAttention with a block mask from ``mask_mod(b, h, q_idx, kv_idx)``; CUDA only.
    ``score_bias`` (distance -> (..., H, Lq, S) bias) becomes a ``score_mod`` reading a
    (H, 2L - 1) table of every distance."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, _, L, _ = q.shape
    # compiled, the mask is evaluated block by block instead of as one L x L tensor
    block_mask = create_block_mask(mask_mod, B, None, L, L, device=q.device, _compile=True)
    score_mod = None
    if score_bias is not None:
        table = score_bias(torch.arange(1 - L, L, device=q.device)[None])[:, 0].to(q.dtype)  # (H, 2L - 1)

        def score_mod(score, b, h, i, j):
            return score + table[h, j - i + L - 1]

    return compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask)


# ----------------------------------------------------------------------------------- the mixers


class SparseAttention(MultiHeadAttention):
    """Multi-head attention in which each query sees only some keys; subclasses say which,
    once as a blocked portable kernel (:meth:`attend`) and once as a FlexAttention
    ``mask_mod`` (:meth:`mask_mod`)."""

    def attend(self, q, k, v, key_real: torch.Tensor | None, dropout: float) -> torch.Tensor:
        """(B, H, L, hd) three times, key_real (B, L) or None -> (B, H, L, hd); adds
        ``self.score_bias`` of the distances to the scores when set (ALiBi, T5)."""
        raise NotImplementedError

    def mask_mod(self, key_real: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x)  # (B, H, L, hd)
        dropout = self.dropout if self.training else 0.0
        if x.is_cuda and dropout == 0.0:  # FlexAttention has no attention dropout
            key_real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            y = flex_sparse_attention(q, k, v, self.mask_mod(key_real), self.score_bias)
        else:
            y = self.attend(q, k, v, mask, dropout)
        return self.merge(y)


class LocalAttention(SparseAttention):
    """Sliding-window attention, the ``local`` mixer (see the module docstring for the window).

    Args:
        d_model: model width.
        causal: attend only to the past (and the present).
        layer_idx: position in the stack (unused).
        n_heads: number of heads.
        window: keys per query: causal ``i - window < j <= i``; bidirectional
            ``i - (window - window // 2 - 1) <= j <= i + window // 2``.
        dropout: attention-weight dropout in training.
        positional: ``none``, or ``rope``, ``xpos``, ``alibi`` or ``t5`` (see :class:`MultiHeadAttention`).
        qkv_dim: width of queries, keys and values over the heads (see :class:`MultiHeadAttention`).
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, window: int,
        dropout: float = 0.0, positional: str = "none", qkv_dim: int | None = None,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, dropout=dropout,
                         positional=positional, qkv_dim=qkv_dim)
        if window < 1:
            raise ValueError(f"model.mixer.window must be at least 1, got {window}")
        self.window = window
        self.n_global = 0

    def attend(self, q, k, v, key_real, dropout):
        return sliding_window_attention(q, k, v, window=self.window, causal=self.causal, key_real=key_real,
                                        n_global=self.n_global, dropout=dropout, score_bias=self.score_bias)

    def mask_mod(self, key_real):
        window, n_global, causal = self.window, self.n_global, self.causal

        def mask_mod(b, h, i, j):
            allowed = in_window(i, j, window, causal) | (i < n_global) | (j < n_global)
            return allowed & (j <= i) & key_real[b, j] if causal else allowed & key_real[b, j]

        return mask_mod


class LongformerAttention(LocalAttention):
    """Sliding window plus ``n_global`` global tokens (the first positions), the ``longformer``
    mixer. Arguments as :class:`LocalAttention`, plus ``n_global``."""

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, window: int, n_global: int,
        dropout: float = 0.0, positional: str = "none", qkv_dim: int | None = None,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, window=window,
                         dropout=dropout, positional=positional, qkv_dim=qkv_dim)
        if n_global < 0:
            raise ValueError(f"model.mixer.n_global must be >= 0, got {n_global}")
        self.n_global = n_global


class BigBirdAttention(SparseAttention):
    """Block-sparse window + global + random attention, the ``bigbird`` mixer.

    Args:
        d_model, causal, n_heads, dropout, positional, qkv_dim: as :class:`LocalAttention`.
        layer_idx: position in the stack; with ``seed`` it fixes this layer's random blocks.
        block_size: tokens per block.
        n_window_blocks: odd number of blocks around (and including) the query block.
        n_global_blocks: leading blocks that attend everywhere and are attended by all.
        n_random_blocks: random key blocks per query block.
        seed: seed of the random pattern.
        pattern: ``itc`` (the paper's pattern, above) or ``lra_released``: LRA's released BigBird
            (:mod:`architectures.bigbird_released`: the first and last block of the padded
            sequence global, a window of 3 blocks, random blocks drawn per head as its code
            draws them); it needs ``n_window_blocks`` 3 and ``n_global_blocks`` 2.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, block_size: int,
        n_window_blocks: int, n_global_blocks: int, n_random_blocks: int, seed: int, dropout: float = 0.0,
        positional: str = "none", qkv_dim: int | None = None, pattern: str = "itc",
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, dropout=dropout,
                         positional=positional, qkv_dim=qkv_dim)
        if pattern not in BIGBIRD_PATTERNS:
            raise ValueError(f"model.mixer.pattern must be one of {BIGBIRD_PATTERNS}, got {pattern!r}")
        if pattern == "lra_released" and (n_window_blocks, n_global_blocks) != (3, 2):
            raise ValueError("model.mixer.pattern=lra_released is LRA's fixed pattern: a window of 3 blocks and 2 "
                             "global blocks (the first and the last); set model.mixer.n_window_blocks=3 and "
                             f"n_global_blocks=2 (got {n_window_blocks} and {n_global_blocks})")
        if pattern == "lra_released" and positional in ("alibi", "t5"):
            raise ValueError(f"model.positional={positional} is not available with model.mixer.pattern=lra_released "
                             "(its blocked kernel adds no score bias); use none, sinusoidal, learned, rope or xpos")
        self.pattern = pattern
        if block_size < 1:
            raise ValueError(f"model.mixer.block_size must be at least 1, got {block_size}")
        if n_window_blocks < 1 or n_window_blocks % 2 == 0:
            raise ValueError(f"model.mixer.n_window_blocks must be odd (self + neighbours), got {n_window_blocks}")
        if min(n_global_blocks, n_random_blocks) < 0:
            raise ValueError("model.mixer.n_global_blocks and n_random_blocks must be >= 0, got "
                             f"{n_global_blocks} and {n_random_blocks}")
        self.block_size, self.n_window_blocks = block_size, n_window_blocks
        self.n_global_blocks, self.n_random_blocks = n_global_blocks, n_random_blocks
        self.seed, self.layer_idx = seed, layer_idx
        self._random_tables: dict[int, torch.Tensor] = {}

    def released_key_blocks(self, n_blocks: int) -> torch.Tensor:
        """LRA's released pattern for ``n_blocks`` padded blocks: (H, n_blocks - 2, 5 + r) key blocks,
        drawn once per length with this layer's seed (the release seeds with the layer index)."""
        from architectures import bigbird_released as released  # it builds on this module's kernels

        key = ("released", n_blocks)
        if key not in self._random_tables:
            self._random_tables[key] = released.released_key_blocks(released.released_random_blocks(
                n_blocks, block_size=self.block_size, n_random_blocks=self.n_random_blocks, n_heads=self.n_heads,
                seed=self.seed * 1_000_003 + self.layer_idx))
        return self._random_tables[key]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pattern == "itc":
            return super().forward(x, mask)
        if self.causal:  # the release falls back to dense causal attention
            return MultiHeadAttention.forward(self, x, mask)
        from architectures import bigbird_released as released  # it builds on this module's kernels

        q, k, v = self.project(x)  # (B, H, L, hd)
        L = q.shape[2]
        q, k, v, key_real = released.pad_as_released(q, k, v, mask, self.block_size)  # (B, H, Lp, hd), (B, Lp)
        key_blocks = self.released_key_blocks(q.shape[2] // self.block_size)
        dropout = self.dropout if self.training else 0.0
        if x.is_cuda and dropout == 0.0:  # FlexAttention has no attention dropout
            blocks = released.released_block_mask(key_blocks).to(x.device)  # (H, nb, nb)
            b = self.block_size

            def mask_mod(bi, h, i, j):
                return blocks[h, i // b, j // b] & key_real[bi, j]

            y = flex_sparse_attention(q, k, v, mask_mod)
        else:
            y = released.released_bigbird_attention(q, k, v, key_blocks=key_blocks, key_real=key_real,
                                           block_size=self.block_size, dropout=dropout)
        y = y[:, :, :L]
        if mask is not None:  # the release zeroes the outputs of pad queries
            y = y * mask[:, None, :, None]
        return self.merge(y)

    def random_table(self, n_blocks: int) -> torch.Tensor:
        """This layer's random key blocks (n_blocks, n_random_blocks) for a sequence of n_blocks."""
        if n_blocks not in self._random_tables:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.layer_idx)
            self._random_tables[n_blocks] = bigbird_random_blocks(
                n_blocks, n_window_blocks=self.n_window_blocks, n_global_blocks=self.n_global_blocks,
                n_random_blocks=self.n_random_blocks, causal=self.causal, generator=generator)
        return self._random_tables[n_blocks]

    def random_blocks(self, key_real: torch.Tensor | None, B: int, L: int) -> torch.Tensor:
        """(B, ceil(L / block_size), r): each example's table, drawn for its real blocks only, so
        that padding an example never changes which real blocks it attends to."""
        nb = -(-L // self.block_size)
        n_real = [nb] * B if key_real is None else (-(-key_real.sum(1) // self.block_size)).tolist()
        tables = [F.pad(self.random_table(n), (0, 0, 0, nb - n), value=-1) for n in n_real]
        return torch.stack(tables)

    def attend(self, q, k, v, key_real, dropout):
        B, _, L, _ = q.shape
        return bigbird_attention(
            q, k, v, block_size=self.block_size, n_window_blocks=self.n_window_blocks,
            n_global_blocks=self.n_global_blocks, random_blocks=self.random_blocks(key_real, B, L),
            causal=self.causal, key_real=key_real, dropout=dropout, score_bias=self.score_bias)

    def mask_mod(self, key_real):
        B, L = key_real.shape
        random_blocks = self.random_blocks(key_real, B, L).to(key_real.device)
        blocks = bigbird_block_mask(self.n_window_blocks, self.n_global_blocks, random_blocks)  # (B, nb, nb)
        b, causal = self.block_size, self.causal

        def mask_mod(bi, h, i, j):
            allowed = blocks[bi, i // b, j // b] & key_real[bi, j]
            return allowed & (j <= i) if causal else allowed

        return mask_mod

