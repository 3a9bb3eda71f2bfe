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


NORMS = ("layernorm", "rmsnorm", "batchnorm")


class ChannelBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of (B, L, D) inputs: statistics over batch and length, pads
    included, running statistics in evaluation. The S4 repository's ``norm: batch``
    (src/models/nn/normalization.py: ``nn.BatchNorm1d`` on the transposed input, affine, running
    statistics), which its LRA configs use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, L, D) -> (B, D, L) -> back


def make_norm(kind: str, d_model: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d_model)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model)
    if kind == "batchnorm":
        return ChannelBatchNorm(d_model)
    raise ValueError(f"model.norm must be one of {NORMS}, got {kind!r}")


# gelu_tanh: jax.nn.gelu's default approximation (flax, LRA); relu: the original Transformer's and
# Transformer-XL's reference PositionwiseFF
FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear (or SwiGLU with ``gated=True``).

    ``activation``: ``gelu`` (the exact erf form), ``gelu_tanh`` (the tanh approximation, which
    jax.nn.gelu computes by default and so flax models such as LRA's released ones use) or ``relu``
    (Transformer-XL's reference ``PositionwiseFF``).
    """

    def __init__(self, d_model: int, *, d_ff: int, dropout: float = 0.0, gated: bool = False,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in FFN_ACTIVATIONS:
            raise ValueError(f"model.ffn_activation must be one of {FFN_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.gated = gated
        self.up = nn.Linear(d_model, 2 * d_ff if gated else d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down(self.dropout(h))


def sinusoidal_positions(length: int, d_model: int, offset: int = 0) -> torch.Tensor:
    """The fixed sin/cos table of Vaswani et al.; (length, d_model)."""
    position = torch.arange(offset, offset + length, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table


# ------------------------------------------------------------------ positions inside attention
# `model.positional` values that act on attention scores rather than on the embedding: the
# backbone hands them to the mixer, which builds them with :func:`attention_positions`.
SCORE_POSITIONALS = ("rope", "alibi", "t5", "xpos")

# Knobs of the score positions, as the papers and their code set them.
T5_NUM_BUCKETS = 32  # T5 (Raffel et al. 2020): relative_attention_num_buckets
T5_MAX_DISTANCE = 128  # T5: distances beyond this share the last bucket
XPOS_SCALE_BASE = 512  # xPos (Sun et al. 2022): the decay exponent is distance / scale_base
XPOS_GAMMA = 0.4  # xPos: zeta_i = (2i / d + gamma) / (1 + gamma)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) applied to queries and keys of one head size."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head size, got {head_dim}")
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def rotate(self, x: torch.Tensor, offset: int = 0, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` (B, H, L, hd) by its positions ``offset .. offset + L - 1``; each rotated
        pair is multiplied by ``scale`` (L, hd/2) when given."""
        L = x.shape[-2]
        t = torch.arange(offset, offset + L, device=x.device, dtype=self.inv_freq.dtype)
        angles = torch.outer(t, self.inv_freq)  # (L, hd/2)
        cos, sin = angles.cos(), angles.sin()
        if scale is not None:
            cos, sin = cos * scale, sin * scale
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate queries and keys (B, H, L, hd) by their positions: q_i . k_j depends on i - j."""
        return self.rotate(q), self.rotate(k)


class XPos(RotaryEmbedding):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"; microsoft/torchscale XPOS):
    rotary embedding whose rotated pair i is scaled by ``zeta_i ** (n / scale_base)`` on the
    query at position n and by its inverse on the key at m, so the score of the pair decays as
    ``zeta_i ** ((n - m) / scale_base)``, with ``zeta_i = (2i / hd + gamma) / (1 + gamma)`` < 1.

    The positions are centred on the sequence before scaling (as torchscale does): the scores
    are unchanged and the factors stay within ``zeta ** (+-L / (2 scale_base))``. The paper is
    a causal LM; in bidirectional attention the same formula up-weights keys after the query,
    as torchscale's encoder does.
    """

    def __init__(self, head_dim: int, *, scale_base: float = XPOS_SCALE_BASE, gamma: float = XPOS_GAMMA):
        super().__init__(head_dim)
        self.scale_base = scale_base
        zeta = (torch.arange(0, head_dim, 2).float() + gamma * head_dim) / ((1 + gamma) * head_dim)
        self.register_buffer("zeta", zeta, persistent=False)  # (hd/2,)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = q.shape[-2]
        centred = torch.arange(L, device=q.device, dtype=self.zeta.dtype) - L // 2
        scale = self.zeta ** (centred[:, None] / self.scale_base)  # (L, hd/2)
        return self.rotate(q, scale=scale), self.rotate(k, scale=1.0 / scale)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al. 2022, section 3; ofirpress/attention_with_linear_biases).

    For n a power of 2: the geometric sequence starting at and multiplied by ``2 ** (-8 / n)``
    (8 heads: 1/2, 1/4, ..., 1/256). Otherwise the slopes of the largest power of 2 below n,
    then every other slope of twice that power, as the official code does.
    """
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return torch.tensor(power_of_2(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest])


class AlibiBias(nn.Module):
    """ALiBi (Press et al. 2022): the score of query i on key j gets ``-m_h * |i - j|`` (head h's
    slope m_h; no position embedding anywhere). The paper is causal, where |i - j| = i - j; the
    symmetric form serves bidirectional attention."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)  # (H,)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        """Key minus query position (..., Lq, S) -> additive score bias (..., H, Lq, S)."""
        return -self.slopes[:, None, None] * distance.abs().unsqueeze(-3).to(self.slopes.dtype)


def t5_relative_bucket(
    distance: torch.Tensor, *, bidirectional: bool, num_buckets: int = T5_NUM_BUCKETS,
    max_distance: int = T5_MAX_DISTANCE,
) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance (mesh_tensorflow ``_relative_position_bucket``).

    Bidirectional: half the buckets for keys after the query, half for keys before; causal: all
    for the past (a future key, masked anyway, shares bucket 0). Within a half, distances below
    ``num_buckets / 4`` (bidirectional; ``/ 2`` causal) get one bucket each, larger ones share
    logarithmically wider buckets up to ``max_distance``, beyond which all share the last one.
    """
    n = -distance  # query minus key: > 0 for keys in the past
    bucket = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


class T5RelativeBias(nn.Module):
    """T5's relative position bias (Raffel et al. 2020, section 2.1): a learned scalar per head
    and distance bucket (:func:`t5_relative_bucket`) added to the attention score.

    T5 computes the bias in the first layer and shares it with the others; here each attention
    layer learns its own table (a few hundred parameters), the choice of many later models.
    The table starts at N(0, 0.02) like the other weights here.
    """

    def __init__(self, n_heads: int, *, causal: bool, num_buckets: int = T5_NUM_BUCKETS,
                 max_distance: int = T5_MAX_DISTANCE):
        super().__init__()
        self.bidirectional = not causal
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.table = nn.Parameter(torch.randn(num_buckets, n_heads) * 0.02)  # (buckets, H)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        """Key minus query position (..., Lq, S) -> additive score bias (..., H, Lq, S)."""
        bucket = t5_relative_bucket(distance, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                    max_distance=self.max_distance)
        return self.table[bucket].movedim(-1, -3)  # (..., Lq, S, H) -> (..., H, Lq, S)


def attention_positions(
    positional: str, *, head_dim: int, n_heads: int, causal: bool
) -> tuple[RotaryEmbedding | None, nn.Module | None]:
    """What an attention mixer builds for ``model.positional``: a rotation of queries and keys
    (``rope``, ``xpos``) and/or an additive score bias from the distance (``alibi``, ``t5``).
    ``none`` (and the embedding-level ``sinusoidal`` / ``learned``) give neither."""
    if positional in ("none", "sinusoidal", "learned"):
        return None, None
    if positional == "rope":
        return RotaryEmbedding(head_dim), None
    if positional == "xpos":
        return XPos(head_dim), None
    if positional == "alibi":
        return None, AlibiBias(n_heads)
    if positional == "t5":
        return None, T5RelativeBias(n_heads, causal=causal)
    raise ValueError(f"model.positional must be one of none, sinusoidal, learned, {', '.join(SCORE_POSITIONALS)}; "
                     f"got {positional!r}")


def refuse_score_bias(positional: str, mixer: str, *, allowed: tuple[str, ...] = ("rope", "xpos")) -> None:
    """For a mixer that can rotate queries and keys but adds no bias to its scores (its attention
    is not the dense or blocked one that :func:`attention_positions`' biases plug into)."""
    if positional not in ("none", "sinusoidal", "learned", *allowed):
        raise ValueError(f"model.positional={positional} is not available for {mixer}; use one of none, "
                         f"sinusoidal, learned, {', '.join(allowed)}")


def pool(x: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Pool (B, L, D) to (B, D) over real tokens only (``mean_all``: over every position).

    Args:
        x: hidden states.
        mask: (B, L) True at real tokens (padding on the right), or None.
        how: ``mean`` over real tokens, ``cls`` (first token), ``last`` real token, or
            ``mean_all`` over every position, padding included (LRA's released MEAN pooling).
    """
    if how == "cls":
        return x[:, 0]
    if how == "mean_all":
        return x.mean(1)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if how == "mean":
        weights = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if how == "last":
        last = mask.long().sum(1).clamp_min(1) - 1  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), last]
    raise ValueError(f"model.pooling must be 'mean', 'cls', 'last' or 'mean_all', got {how!r}")


class ValueEncoder(nn.Module):
    """The S4 repository's linear encoder of pixel inputs: each token id read as a value,
    standardised, ``(id - mean) / std``, then ``Linear(1, d_model)``: (B, L) -> (B, L, D)."""

    def __init__(self, d_model: int, *, mean: float, std: float):
        super().__init__()
        if std <= 0:
            raise ValueError(f"model.input_std must be > 0, got {std}")
        self.mean, self.std = mean, std
        self.linear = nn.Linear(1, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        values = (tokens.to(self.linear.weight.dtype) - self.mean) / self.std  # (B, L)
        return self.linear(values.unsqueeze(-1))  # (B, L, 1) -> (B, L, D)


class TiedDropout(nn.Module):
    """Dropout with one mask per example and channel, shared along the sequence (the S4
    repository's ``DropoutNd(tie=True)``, its ``tie_dropout``): x (B, L, D) -> (B, L, D)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, x.shape[-1], device=x.device) >= self.p  # (B, 1, D)
        return x * keep / (1 - self.p)


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
