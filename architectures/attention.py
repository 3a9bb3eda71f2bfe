"""Vanilla multi-head softmax attention (Vaswani et al. 2017), the `transformer` mixer.

The fast path is ``torch.nn.functional.scaled_dot_product_attention``, which picks flash,
memory-efficient, cuDNN or math kernels by itself. :func:`dense_attention` is the plain
exact version: every efficient attention in this package is tested against it.

Positions inside attention (``model.positional``, see :func:`architectures.layers.attention_positions`):
``rope`` and ``xpos`` rotate queries and keys in :meth:`MultiHeadAttention.project`; ``alibi``
and ``t5`` add a bias that depends on the key-minus-query distance to the scores. Every mixer
built on :class:`MultiHeadAttention` (the sparse ones too) takes all four.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.layers import attention_positions


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, dropout: float = 0.0,
) -> torch.Tensor:
    """Exact softmax attention with an explicit boolean mask; the reference implementation.

    Args:
        q, k, v: (B, H, L, hd) / (B, H, S, hd).
        allowed: broadcastable to (B, H, L, S); True where query i may attend key j.
            A query with no allowed key outputs zeros (never NaN).
        bias: broadcastable to (B, H, L, S); added to the scaled scores (ALiBi, T5).
        dropout: dropout on the attention weights (pass 0 in evaluation).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, S)
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dropout > 0:
        weights = F.dropout(weights, dropout)
    return weights @ v  # (B, H, L, hd)


def padding_and_causal_mask(mask: torch.Tensor | None, L: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, L, L) mask allowing real keys and, if causal, only the past."""
    allowed = None
    if causal:
        allowed = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]
    if mask is not None:
        key_ok = mask[:, None, None, :]  # (B, 1, 1, L)
        allowed = key_ok if allowed is None else allowed & key_ok
    return allowed


def attention_width(d_model: int, qkv_dim: int | None, n_heads: int) -> int:
    """The width of queries, keys and values over the heads (``qkv_dim``, else ``d_model``),
    checked against the head count."""
    width = qkv_dim or d_model
    if width % n_heads:
        raise ValueError(f"the attention width {width} (model.mixer.qkv_dim, else model.d_model) is not divisible "
                         f"by the head count {n_heads} (size.n_heads for every model, model.mixer.n_heads for "
                         "this one)")
    return width


IMPLEMENTATIONS = ("sdpa", "explicit")  # PyTorch's fused kernels; softmax(q k^T) v written out


class MultiHeadAttention(nn.Module):
    """Multi-head softmax attention mixer: (B, L, D) -> (B, L, D).

    Args:
        d_model: model width.
        causal: attend only to the past (and the present).
        layer_idx: position of this layer in the stack (unused; part of the mixer contract).
        n_heads: number of heads; ``d_model`` must divide evenly.
        dropout: attention-weight dropout in training.
        positional: ``none`` or a position inside attention, ``rope``, ``xpos``, ``alibi`` or
            ``t5`` (set by ``model.positional``; the backbone passes only these).
        qkv_dim: total width of queries, keys and values over the heads (LRA's ``qkv_dim``; its
            image and pathfinder configs use ``emb_dim / 2``); None: ``d_model``. The output
            projection maps it back to ``d_model``.
        implementation: ``sdpa`` (PyTorch's fused kernels, which never hold the (L, L) weights)
            or ``explicit``: the weights computed and held, as the attention of LRA's release
            (flax's ``dot_product_attention``) does; the same values, the memory and time of
            that code (LRA's Table 2). Read by this class's own forward only.
    """

    # the query/key/value/output projections and the kernels each fuses, for init=lra_released
    # (architectures/lra.py)
    released_projections = {"qkv": 3, "out": 1}

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, dropout: float = 0.0,
        positional: str = "none", qkv_dim: int | None = None, implementation: str = "sdpa",
    ):
        super().__init__()
        qkv_dim = attention_width(d_model, qkv_dim, n_heads)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"model.mixer.implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        self.causal = causal
        self.n_heads = n_heads
        self.head_dim = qkv_dim // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * qkv_dim)
        self.out = nn.Linear(qkv_dim, d_model)
        # rotary: a rotation of q and k (rope, xpos); score_bias: distance -> (H, Lq, S) bias (alibi, t5)
        self.rotary, self.score_bias = attention_positions(
            positional, head_dim=self.head_dim, n_heads=n_heads, causal=causal)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split x (B, L, D) into rotated q, k and v of shape (B, H, L, hd)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        return q, k, v

    def relative_bias(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor | None:
        """The score bias (..., H, Lq, S) of queries at ``qpos`` (..., Lq, 1) on keys at
        ``kpos`` (..., 1 or Lq, S), or None without ALiBi / T5."""
        return None if self.score_bias is None else self.score_bias(kpos - qpos)

    def self_attention_bias(self, L: int, device) -> torch.Tensor | None:
        """The (H, L, L) score bias of L tokens attending to each other, or None: a Toeplitz
        matrix (entry (i, j) depends on j - i only), built from the bias of the 2L - 1 distances
        so that the bias and its backward cost O(L) evaluations, not O(L^2) (T5's buckets)."""
        if self.score_bias is None:
            return None
        values = self.score_bias(torch.arange(1 - L, L, device=device)[None])[:, 0]  # (H, 2L - 1): distance -(L-1) ..
        # row i is values[L - 1 - i : 2L - 1 - i]: a sliding window of the flipped vector, flipped back
        return values.flip(-1).unfold(-1, L, 1).flip(-1)  # (H, L, L), [h, i, j] = values[h, j - i + L - 1]

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, L, hd = y.shape
        return self.out(y.transpose(1, 2).reshape(B, L, H * hd))  # (B, L, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        L = x.shape[1]
        dropout = self.dropout if self.training else 0.0
        bias = self.self_attention_bias(L, x.device)  # (H, L, L) or None
        if self.implementation == "explicit":  # the (B, H, L, L) weights held, as flax's dot_product_attention
            allowed = padding_and_causal_mask(mask, L, self.causal, x.device)
            return self.merge(dense_attention(q, k, v, allowed, bias, dropout))
        if mask is None and bias is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:
            # padding is on the right, so with a causal mask every real query keeps >= 1 key;
            # a pad query attending nothing gets zeros from dense_attention's nan_to_num, and
            # here we let pads see themselves to keep SDPA free of all-masked rows.
            allowed = padding_and_causal_mask(mask, L, self.causal, x.device)
            if mask is not None:
                allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device)
            attn_mask = allowed
            if bias is not None:  # an additive mask: the bias where allowed, -inf elsewhere
                bias = bias.to(q.dtype)[None]  # (1, H, L, L)
                attn_mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.merge(y)
