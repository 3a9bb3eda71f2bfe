"""Block-local attention, the ``block_local`` mixer: LRA's "Local Attention" baseline.

The sequence is cut into groups of ``block_size`` positions and each query attends to the keys
of its own group only: O(L * block_size) time and memory. Two groupings:

* ``contiguous``: groups of consecutive positions, ``[0, b)``, ``[b, 2b)``, ... (the local
  attention the LRA paper describes, after Parmar et al. 2018).
* ``lra_released``: what LRA's released code computes (``lra_benchmarks/models/local/
  local_attention.py``, the code behind Table 1). It pads the length to ``n * block_size`` with
  ``n = L // block_size + 1`` (a whole extra block when L divides evenly) and reshapes the
  queries, keys and values to ``(batch, block_size, n, heads, head_dim)`` before attending over
  axis 1. A row-major reshape puts position ``i`` at ``(i // n, i % n)``, so group ``g`` holds the
  positions ``g, g + n, g + 2n, ...``: each query attends to the ``block_size`` positions congruent
  to it modulo ``n``, a strided pattern, not a local one. Its padding mask is reshaped the other way,
  ``(batch * n, block_size)``, so group ``g`` is masked with the padding of the consecutive
  positions ``[g * block_size, (g + 1) * block_size)``, combined as the product of the query's
  and the key's mask values (1 real, 0 padding, -1e9 for the appended positions, so two appended
  positions may attend to each other), and masked scores get -1e10 rather than -inf (a row with
  every key masked attends uniformly). The appended positions are zero inputs to bias-free
  projections, so their queries, keys and values are zero vectors; here q, k and v are padded
  with zeros after the projection, which is the same thing. ``lra_released`` reproduces all of
  this, so that the published row is set beside the model that produced it.

In causal mode a query sees the keys of its group at or before it (both groupings keep order
within a group). :func:`block_local_mask` builds the equivalent dense (L, L) pattern for the
exact reference (:func:`architectures.attention.dense_attention`).
"""

from __future__ import annotations

import math

import torch

from architectures.attention import MultiHeadAttention

GROUPINGS = ("contiguous", "lra_released")
MASKED_SCORE = -1e10  # LRA's masked-score bias


def n_groups(L: int, block_size: int, grouping: str) -> int:
    """Groups after padding: ceil(L / b), or the released code's L // b + 1."""
    return L // block_size + 1 if grouping == "lra_released" else math.ceil(L / block_size)


def group_positions(L: int, block_size: int, grouping: str, device=None) -> torch.Tensor:
    """(n, block_size) positions of the padded sequence in each group (>= L: appended)."""
    n = n_groups(L, block_size, grouping)
    pos = torch.arange(n * block_size, device=device)
    if grouping == "contiguous":
        return pos.view(n, block_size)
    return pos.view(block_size, n).T  # (n, block_size): group g = g, g + n, g + 2n, ...


def group_allowed(real: torch.Tensor, block_size: int, grouping: str, causal: bool) -> torch.Tensor:
    """Which (query, key) pairs of each group attend: real (B, L) bool -> (B, n, bs, bs) bool."""
    B, L = real.shape
    n = n_groups(L, block_size, grouping)
    if grouping == "contiguous":
        key_real = torch.zeros(B, n * block_size, dtype=torch.bool, device=real.device)
        key_real[:, :L] = real
        allowed = key_real.view(B, n, 1, block_size).expand(B, n, block_size, block_size)
    else:
        # the released mask: values 1 real, 0 padding, -1e9 appended (here -1), reshaped
        # consecutively (B, n, bs) whatever the grouping of q and k, product > 0 attends
        sign = torch.full((B, n * block_size), -1.0, device=real.device)
        sign[:, :L] = real.float()
        sign = sign.view(B, n, block_size)
        allowed = (sign[..., :, None] * sign[..., None, :]) > 0  # (B, n, bs, bs)
    if causal:
        allowed = allowed & torch.ones(block_size, block_size, dtype=torch.bool, device=real.device).tril()
    return allowed


def block_local_mask(L: int, block_size: int, grouping: str, causal: bool, real: torch.Tensor | None = None) -> torch.Tensor:
    """The dense pattern (B, P, P) (True: attends) over the padded sequence of P positions, for
    the exact reference on q, k, v padded with zeros to P (under ``lra_released`` a real query
    may attend appended positions, whose zero keys still take a share of the softmax).

    A query with no allowed key attends uniformly under ``lra_released`` (scores of -1e10), which
    a boolean mask cannot say; the reference test uses inputs without such rows.
    """
    real = torch.ones(1, L, dtype=torch.bool) if real is None else real
    groups = group_positions(L, block_size, grouping)  # (n, bs)
    allowed = group_allowed(real, block_size, grouping, causal)  # (B, n, bs, bs)
    P = groups.numel()
    dense = torch.zeros(real.shape[0], P, P, dtype=torch.bool)
    q = groups[:, :, None].expand_as(allowed[0])  # (n, bs, bs)
    k = groups[:, None, :].expand_as(allowed[0])
    dense[:, q, k] = allowed
    return dense


class BlockLocalAttention(MultiHeadAttention):
    """Attention within groups of ``block_size`` positions (see the module docstring).

    Args:
        d_model: model width.
        causal: attend only to the past (and the present) within the group.
        layer_idx: position in the stack (unused).
        n_heads: number of heads.
        block_size: positions per group (LRA: 50).
        grouping: ``contiguous`` or ``lra_released``.
        dropout: attention-weight dropout in training.
        positional: ``none``, or ``rope``, ``xpos``, ``alibi`` or ``t5`` (see :class:`MultiHeadAttention`).
        qkv_dim: width of queries, keys and values over the heads (see :class:`MultiHeadAttention`).
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, block_size: int = 50,
        grouping: str = "contiguous", dropout: float = 0.0, positional: str = "none",
        qkv_dim: int | None = None,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, dropout=dropout,
                         positional=positional, qkv_dim=qkv_dim)
        if block_size < 1:
            raise ValueError(f"model.mixer.block_size must be at least 1, got {block_size}")
        if grouping not in GROUPINGS:
            raise ValueError(f"model.mixer.grouping must be one of {GROUPINGS}, got {grouping!r}")
        self.block_size = block_size
        self.grouping = grouping

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x)  # (B, H, L, hd)
        B, H, L, hd = q.shape
        bs = self.block_size
        groups = group_positions(L, bs, self.grouping, device=x.device)  # (n, bs)
        n = groups.shape[0]
        real = mask if mask is not None else torch.ones(B, L, dtype=torch.bool, device=x.device)
        allowed = group_allowed(real, bs, self.grouping, self.causal)[:, None]  # (B, 1, n, bs, bs)

        def grouped(t: torch.Tensor) -> torch.Tensor:
            t = torch.nn.functional.pad(t, (0, 0, 0, n * bs - L))  # (B, H, n * bs, hd), zeros appended
            return t[:, :, groups]  # (B, H, n, bs, hd)

        qg, kg, vg = grouped(q), grouped(k), grouped(v)
        scores = qg @ kg.transpose(-1, -2) / math.sqrt(hd)  # (B, H, n, bs, bs)
        bias = self.relative_bias(groups[:, :, None], groups[:, None, :])  # (n, H, bs, bs) or None
        if bias is not None:
            scores = scores + bias.transpose(0, 1).to(scores.dtype)
        if self.grouping == "lra_released":
            weights = torch.softmax(scores.masked_fill(~allowed, MASKED_SCORE), -1)
        else:  # a query with no real key in its group (padding) gets zeros
            weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        if self.training and self.dropout:
            weights = torch.nn.functional.dropout(weights, self.dropout)
        y = weights @ vg  # (B, H, n, bs, hd)
        order = groups.reshape(-1).argsort()  # sequence position -> its place in the groups
        y = y.reshape(B, H, n * bs, hd)[:, :, order[:L]]  # (B, H, L, hd), in sequence order
        return self.merge(y)
