"""Sparse Transformer attention (Child et al. 2019, arXiv 1904.10509), the `sparse_transformer` mixer.

Two factorised patterns of stride ``l`` (the paper's l; it takes l close to sqrt(L)), each the
union of two sets of keys A and B per query i, merged into one softmax in every head (the
paper's "merged head" integration, which LRA's released code also uses):

* ``strided``: A, the previous ``l`` positions (``i - l < j <= i``); B, every l-th position
  before i (``(i - j) mod l == 0``). Bidirectional: A is ``|i - j| < l`` and B every l-th
  position on both sides.
* ``fixed``: A, the query's own block of ``l`` positions (``j // l == i // l``); B, the
  "summary" positions, the last ``c`` of every block (``j mod l >= l - c``). Causal: past keys
  only. Bidirectional: the same sets on both sides.

:func:`sparse_transformer_mask` writes the pattern out as a dense (L, L) mask, the reference
these kernels equal (with :func:`architectures.attention.dense_attention`).

Portable kernels (the CPU path), O(L * (l + L / l)) time and memory:

* ``fixed`` is the machinery of :mod:`architectures.sparse` as is: query blocks of ``l`` gather
  their own key block, and the summary positions join every block as extra keys (like
  Longformer's global tokens), the ones inside the query's own block counted once.
* ``strided`` is not block-sparse in any ordering (B is a different residue class for every
  query of a block), so its two parts are computed apart, exactly, and merged by their
  log-sum-exp: A as blocked window attention, B as attention within each residue class
  ``j mod l`` (a dense (L/l, L/l) problem per class). A and B share only j = i, which B leaves
  out.

On CUDA the pattern is a FlexAttention ``mask_mod`` like the other sparse mixers.
"""

from __future__ import annotations

import math

import torch

from architectures.sparse import SparseAttention, attend_gathered, gather_blocks, pad_to_blocks

PATTERNS = ("strided", "fixed")


def strided_allowed(i: torch.Tensor, j: torch.Tensor, stride: int, causal: bool) -> torch.Tensor:
    """True where key ``j`` is in query ``i``'s strided pattern (broadcasting positions)."""
    allowed = ((i - j).abs() < stride) | ((i - j) % stride == 0)
    return allowed & (j <= i) if causal else allowed


def fixed_allowed(i: torch.Tensor, j: torch.Tensor, stride: int, c: int, causal: bool) -> torch.Tensor:
    """True where key ``j`` is in query ``i``'s fixed pattern (broadcasting positions)."""
    allowed = (i // stride == j // stride) | (j % stride >= stride - c)
    return allowed & (j <= i) if causal else allowed


def sparse_transformer_mask(L: int, *, pattern: str, stride: int, c: int, causal: bool, device=None) -> torch.Tensor:
    """Dense (L, L) mask of the pattern: True where query i may attend key j."""
    i = torch.arange(L, device=device)[:, None]
    if pattern == "strided":
        return strided_allowed(i, i.T, stride, causal)
    return fixed_allowed(i, i.T, stride, c, causal)


def fixed_attention(q, k, v, *, stride: int, c: int, causal: bool, key_real=None, dropout: float = 0.0,
                    score_bias=None) -> torch.Tensor:
    """Blocked ``fixed`` attention: (B, H, L, hd) three times -> (B, H, L, hd); equals
    ``dense_attention`` with ``sparse_transformer_mask(pattern="fixed") & key_real`` (and the
    ``score_bias`` of the distances, as in :func:`architectures.sparse.attend_gathered`)."""
    L = q.shape[2]
    b = stride
    key_real, q, k, v = pad_to_blocks(b, key_real, q, k, v)
    B, nb = q.shape[0], q.shape[2] // b
    blocks = torch.arange(nb, device=q.device)[:, None].expand(B, nb, 1)  # (B, nb, 1): its own block
    qpos = torch.arange(nb * b, device=q.device).view(nb, b, 1)
    summary = (torch.arange(nb, device=q.device)[:, None] * b + torch.arange(b - c, b, device=q.device)).flatten()
    # (B, nb, b, G): summary keys outside the query's own block (inside it they are gathered already)
    allowed = key_real[:, summary][:, None, None, :] & (summary // b != qpos // b)
    if causal:
        allowed = allowed & (summary <= qpos)
    extra = (k[:, :, summary], v[:, :, summary], allowed, summary)
    rule = (lambda i, j: j <= i) if causal else (lambda i, j: j >= 0)
    return attend_gathered(q, k, v, key_real, blocks, qpos, b, rule, dropout, extra, score_bias)[:, :, :L]


def attend_with_lse(q, k, v, allowed, bias=None, dropout: float = 0.0):
    """Explicit softmax attention that also returns each query's log-sum-exp of scores.

    q (..., Lq, hd), k, v (..., S, hd), allowed and bias broadcastable to (..., Lq, S) ->
    out (..., Lq, hd) and lse (..., Lq). A query with no allowed key outputs zeros, and its lse
    is a very negative finite number (so that merging parts never divides 0 by 0 or back-
    propagates NaN).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Lq, S)
    if bias is not None:
        scores = scores + bias
    has_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~(allowed | ~has_key), float("-inf"))  # a keyless row keeps finite scores
    lse = torch.logsumexp(scores, -1, keepdim=True)
    weights = torch.exp(scores - lse)
    if dropout:
        weights = torch.nn.functional.dropout(weights, dropout)
    out = (weights @ v) * has_key
    lse = lse.masked_fill(~has_key, torch.finfo(lse.dtype).min / 4)
    return out, lse.squeeze(-1)


def strided_attention(q, k, v, *, stride: int, causal: bool, key_real=None, dropout: float = 0.0,
                      score_bias=None) -> torch.Tensor:
    """``strided`` attention: (B, H, L, hd) three times -> (B, H, L, hd); equals
    ``dense_attention`` with ``sparse_transformer_mask(pattern="strided") & key_real``."""
    B, H, L, hd = q.shape
    l = stride
    key_real, q, k, v = pad_to_blocks(l, key_real, q, k, v)
    nb = q.shape[2] // l
    # A: query block m (l queries) gathers key blocks m - 1, m (and m + 1 when bidirectional)
    offsets = torch.arange(-1, 1 if causal else 2, device=q.device)
    blocks = torch.arange(nb, device=q.device)[:, None] + offsets
    blocks = blocks.masked_fill((blocks < 0) | (blocks >= nb), -1).expand(B, -1, -1)  # (B, nb, m)
    batch = torch.arange(B, device=q.device)[:, None, None]
    kpos = blocks[..., None] * l + torch.arange(l, device=q.device)  # (B, nb, m, l)
    real = key_real.view(B, nb, l)[batch, blocks.clamp(min=0)]
    kpos = kpos.masked_fill((blocks[..., None] < 0) | ~real, -1).flatten(2)[:, :, None, :]  # (B, nb, 1, S)
    qpos = torch.arange(nb * l, device=q.device).view(nb, l, 1)
    near = (kpos >= 0) & ((qpos - kpos).abs() < l)  # (B, nb, l, S)
    if causal:
        near = near & (kpos <= qpos)
    bias = None if score_bias is None else score_bias(kpos - qpos).flatten(0, 1)  # (B * nb, H, l, S)
    q_blocks = q.view(B, H, nb, l, hd).transpose(1, 2).reshape(B * nb, H, l, hd)
    y_a, lse_a = attend_with_lse(q_blocks, gather_blocks(k, blocks, l), gather_blocks(v, blocks, l),
                                 near.flatten(0, 1)[:, None], bias, dropout)  # (B * nb, H, l, hd), (B * nb, H, l)
    y_a = y_a.view(B, nb, H, l, hd).transpose(1, 2).reshape(B, H, nb * l, hd)
    lse_a = lse_a.view(B, nb, H, l).transpose(1, 2).reshape(B, H, nb * l)
    # B: residue class r holds positions r, r + l, r + 2l, ...: row m of class r is position m * l + r
    def by_residue(x):  # (B, H, nb * l, ...) -> (B, H, l, nb, ...)
        return x.view(B, H, nb, l, *x.shape[3:]).transpose(2, 3)

    pos = torch.arange(nb * l, device=q.device).view(nb, l).T  # (l, nb)
    qpos_r, kpos_r = pos[:, :, None], pos[:, None, :]  # (l, nb, 1), (l, 1, nb)
    stride_keys = (kpos_r < qpos_r) if causal else (kpos_r != qpos_r)  # j = i is in A already
    allowed = key_real.view(B, nb, l).transpose(1, 2)[:, None, :, None, :] & stride_keys  # (B, 1, l, nb, nb)
    bias = None if score_bias is None else score_bias(kpos_r - qpos_r).transpose(0, 1)  # (H, l, nb, nb)
    y_b, lse_b = attend_with_lse(by_residue(q), by_residue(k), by_residue(v), allowed, bias, dropout)
    y_b = y_b.transpose(2, 3).reshape(B, H, nb * l, hd)
    lse_b = lse_b.transpose(2, 3).reshape(B, H, nb * l)
    # one softmax over A and B: weight each part by its share of the total exp-sum
    lse = torch.logaddexp(lse_a, lse_b)
    y = y_a * torch.exp(lse_a - lse)[..., None] + y_b * torch.exp(lse_b - lse)[..., None]
    return y[:, :, :L]


class SparseTransformerAttention(SparseAttention):
    """Factorised sparse attention of Child et al. 2019, the ``sparse_transformer`` mixer.

    Args:
        d_model: model width.
        causal: attend only to the past (and the present).
        layer_idx: position in the stack (unused).
        n_heads: number of heads.
        pattern: ``strided`` or ``fixed`` (see the module docstring).
        stride: the paper's ``l``: window and stride (strided), block length (fixed).
        c: the paper's ``c``: summary positions at the end of each block (``fixed`` only).
        dropout: attention-weight dropout in training.
        positional: ``none``, or ``rope``, ``xpos``, ``alibi`` or ``t5`` (see :class:`MultiHeadAttention`).
        qkv_dim: width of queries, keys and values over the heads (see :class:`MultiHeadAttention`).
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, pattern: str, stride: int,
        c: int, dropout: float = 0.0, positional: str = "none", qkv_dim: int | None = None,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, dropout=dropout,
                         positional=positional, qkv_dim=qkv_dim)
        if pattern not in PATTERNS:
            raise ValueError(f"model.mixer.pattern must be one of {PATTERNS}, got {pattern!r}")
        if stride < 1:
            raise ValueError(f"model.mixer.stride must be at least 1, got {stride}")
        if pattern == "fixed" and not 1 <= c <= stride:
            raise ValueError(f"model.mixer.c must be in [1, model.mixer.stride={stride}] for the fixed pattern, got {c}")
        self.pattern, self.stride, self.c = pattern, stride, c

    def attend(self, q, k, v, key_real, dropout):
        if self.pattern == "fixed":
            return fixed_attention(q, k, v, stride=self.stride, c=self.c, causal=self.causal, key_real=key_real,
                                   dropout=dropout, score_bias=self.score_bias)
        return strided_attention(q, k, v, stride=self.stride, causal=self.causal, key_real=key_real,
                                 dropout=dropout, score_bias=self.score_bias)

    def mask_mod(self, key_real):
        pattern, stride, c, causal = self.pattern, self.stride, self.c, self.causal

        def mask_mod(b, h, i, j):
            if pattern == "strided":
                return strided_allowed(i, j, stride, causal) & key_real[b, j]
            return fixed_allowed(i, j, stride, c, causal) & key_real[b, j]

        return mask_mod
