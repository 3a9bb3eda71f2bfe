"""Shared building blocks: norms, feed-forward, positional encodings, pooling and task heads.

Every architecture uses these, so that models differ only where they really differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class UnsupportedTask(Exception):
    """Raised by a model or mixer that cannot serve a task kind (e.g. Linformer for ``lm``).

    The harness records the run with status ``unsupported`` and this message as the reason.
    """


def make_norm(kind: str, d_model: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d_model)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model)
    raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear (or SwiGLU with ``gated=True``)."""

    def __init__(self, d_model: int, *, d_ff: int, dropout: float = 0.0, gated: bool = False):
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(d_model, 2 * d_ff if gated else d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.down(self.dropout(h))


def sinusoidal_positions(length: int, d_model: int, offset: int = 0) -> torch.Tensor:
    """The fixed sin/cos table of Vaswani et al.; (length, d_model)."""
    position = torch.arange(offset, offset + length, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) applied to queries and keys of one head size."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head size, got {head_dim}")
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape (B, H, L, hd) by its positions ``offset .. offset + L - 1``."""
        L = x.shape[-2]
        t = torch.arange(offset, offset + L, device=x.device, dtype=self.inv_freq.dtype)
        angles = torch.outer(t, self.inv_freq)  # (L, hd/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)


def pool(x: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Pool (B, L, D) to (B, D) over real tokens only.

    Args:
        x: hidden states.
        mask: (B, L) True at real tokens (padding on the right), or None.
        how: ``mean`` over real tokens, ``cls`` (first token), or ``last`` real token.
    """
    if how == "cls":
        return x[:, 0]
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if how == "mean":
        weights = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if how == "last":
        last = mask.long().sum(1).clamp_min(1) - 1  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), last]
    raise ValueError(f"model.pooling must be 'mean', 'cls' or 'last', got {how!r}")


class ClassifierHead(nn.Module):
    """LRA's classifier: pooled vector -> Linear -> ReLU -> Linear."""

    def __init__(self, d_model: int, n_classes: int, *, d_hidden: int | None = None):
        super().__init__()
        d_hidden = d_hidden or d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, d_hidden), nn.ReLU(), nn.Linear(d_hidden, n_classes))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)  # (B, n_classes)


class PairHead(nn.Module):
    """LRA's retrieval head: MLP over [x1, x2, x1 * x2, x1 - x2] of two pooled encodings."""

    def __init__(self, d_model: int, n_classes: int, *, d_hidden: int | None = None):
        super().__init__()
        d_hidden = d_hidden or d_model
        self.mlp = nn.Sequential(nn.Linear(4 * d_model, d_hidden), nn.ReLU(), nn.Linear(d_hidden, n_classes))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([x1, x2, x1 * x2, x1 - x2], dim=-1))  # (B, n_classes)


def prefix_lm_layout(
    source: torch.Tensor, target: torch.Tensor, *, pad_id: int, sep_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a seq2seq batch for a decoder-only model: ``source + [sep] + target[:-1]``, then pads.

    The source's own right padding is squeezed out, so a recurrent model never reads pads
    between source and target.

    Returns:
        tokens: (B, Ls + Lt) input ids, right-padded with ``pad_id``.
        target_pos: (B, Lt) the position whose output predicts each target token.
    """
    B, Ls = source.shape
    Lt = target.shape[1]
    src_len = (source != pad_id).long().sum(1)  # (B,)
    tokens = torch.full((B, Ls + Lt), pad_id, dtype=source.dtype, device=source.device)
    ar_s = torch.arange(Ls, device=source.device)
    tokens[:, :Ls] = torch.where(ar_s < src_len[:, None], source, pad_id)
    batch = torch.arange(B, device=source.device)
    tokens[batch, src_len] = sep_id
    # target token j is fed at position src_len + 1 + j and predicted at src_len + j
    target_pos = src_len[:, None] + torch.arange(Lt, device=source.device)  # (B, Lt)
    fed = (target_pos + 1)[:, :-1]
    tokens.scatter_(1, fed, target[:, :-1])
    return tokens, target_pos
