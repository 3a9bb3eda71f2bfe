"""Linear-complexity attention: Linear Transformer and Linformer mixers, and the linear attention
Performer (architectures.performer) builds on.

Kernelised attention replaces softmax(q k^T) with phi(q) phi(k)^T for a positive feature
map phi, so that attention can be regrouped as phi(q) (phi(K)^T V): O(L F d) instead of
O(L^2 d), and never an L x L matrix.

* bidirectional: one global key-value summary phi(K)^T V and key sum, padding keys excluded
  (:func:`global_linear_attention`);
* causal: the chunked form (:func:`chunked_causal_linear_attention`): exact quadratic attention
  with a causal mask inside each chunk, plus a running key-value state over earlier chunks;
  on CUDA with flash-linear-attention installed, its Triton ``chunk_linear_attn`` kernel.

:func:`quadratic_linear_attention` is the plain exact version both forms are tested against.
Linformer (Wang et al. 2020) instead projects keys and values along the length to ``k`` rows
and keeps softmax; it sees the whole sequence by construction, so it is bidirectional only.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.attention import attention_width
from architectures.layers import UnsupportedTask

try:  # Triton kernels (GPU only); the portable path below computes the same thing
    from fla.ops.linear_attn import chunk_linear_attn
except ImportError:
    chunk_linear_attn = None

EPS = 1e-6  # added to the normaliser, as in Katharopoulos et al.


# ----------------------------------------------------------------------------------------------
# Attention given features: the exact reference and its two linear-cost forms.


def quadratic_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, causal: bool,
    mask: torch.Tensor | None = None, eps: float = EPS,
) -> torch.Tensor:
    """Exact kernelised attention through the full L x L matrix; the reference implementation.

    y_i = sum_j a_ij v_j / (sum_j a_ij + eps) with a_ij = phi_q_i . phi_k_j over allowed j.

    Args:
        phi_q, phi_k: (B, H, L, F) non-negative features of queries and keys.
        v: (B, H, L, hd) values.
        causal: query i sees keys j <= i only.
        mask: (B, L) True at real tokens; padding keys are excluded.
    """
    scores = phi_q @ phi_k.transpose(-2, -1)  # (B, H, L, L)
    if causal:
        scores = scores.tril()
    if mask is not None:
        scores = scores * mask[:, None, None, :].to(scores.dtype)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)  # (B, H, L, hd)


def global_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
    mask: torch.Tensor | None = None, eps: float = EPS,
) -> torch.Tensor:
    """Bidirectional linear attention through the global summary phi(K)^T V; shapes as above."""
    if mask is not None:
        phi_k = phi_k * mask[:, None, :, None].to(phi_k.dtype)  # padding keys weigh nothing
    kv = phi_k.transpose(-2, -1) @ v  # (B, H, F, hd)
    z = phi_k.sum(-2).unsqueeze(-1)  # (B, H, F, 1)
    return (phi_q @ kv) / (phi_q @ z + eps)  # (B, H, L, hd)


def chunked_causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64, eps: float = EPS,
) -> torch.Tensor:
    """Causal linear attention in chunks: quadratic within a chunk, running state across chunks.

    Costs O(L C F + L F hd) time and keeps one (F, hd) state per chunk for the backward pass.
    A length that ``chunk_size`` does not divide is zero-padded: zero key features add
    nothing to the state, and the padded queries are cut off.
    """
    B, H, L, Fdim = phi_q.shape
    hd = v.shape[-1]
    pad = (-L) % chunk_size
    if pad:
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    N = (L + pad) // chunk_size
    q = phi_q.view(B, H, N, chunk_size, Fdim)
    k = phi_k.view(B, H, N, chunk_size, Fdim)
    vc = v.view(B, H, N, chunk_size, hd)
    kv = k.transpose(-2, -1) @ vc  # (B, H, N, F, hd) each chunk's own summary
    z = k.sum(-2)  # (B, H, N, F)
    # state seen by chunk n: the sum over chunks before n (exclusive prefix sum)
    kv_before = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1].cumsum(2)], dim=2)
    z_before = torch.cat([torch.zeros_like(z[:, :, :1]), z[:, :, :-1].cumsum(2)], dim=2)
    scores = (q @ k.transpose(-2, -1)).tril()  # (B, H, N, C, C) causal within the chunk
    num = scores @ vc + q @ kv_before  # (B, H, N, C, hd)
    den = scores.sum(-1) + (q @ z_before.unsqueeze(-1)).squeeze(-1)  # (B, H, N, C)
    y = num / (den.unsqueeze(-1) + eps)
    return y.reshape(B, H, N * chunk_size, hd)[:, :, :L]


_FLA_HEAD_FIRST = chunk_linear_attn is not None and "head_first" in inspect.signature(chunk_linear_attn).parameters


def fla_causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """The same as :func:`chunked_causal_linear_attention` with flash-linear-attention's kernel.

    The kernel computes the unnormalised numerator; the denominator is formed here so that
    ``eps`` is exactly the portable path's.
    """
    q, k, vt = (t.transpose(1, 2).to(v.dtype).contiguous() for t in (phi_q, phi_k, v))  # (B, L, H, F)
    extra = {"head_first": False} if _FLA_HEAD_FIRST else {}
    num, _ = chunk_linear_attn(q, k, vt, scale=1.0, normalize=False, **extra)  # (B, L, H, hd)
    with torch.autocast(v.device.type, enabled=False):  # a running sum: keep it in float32
        den = (q.float() * k.float().cumsum(1)).sum(-1, keepdim=True)  # (B, L, H, 1)
        y = num.float() / (den + eps)
    return y.to(v.dtype).transpose(1, 2)  # (B, H, L, hd)


def linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, causal: bool,
    mask: torch.Tensor | None, chunk_size: int, eps: float = EPS,
) -> torch.Tensor:
    """Dispatch to the global (bidirectional) or chunked (causal) form; (B, H, L, hd).

    The portable forms run in at least float32, autocast off: their sums run over the whole
    sequence, which bfloat16 accumulators would round away (the fla kernel accumulates in
    float32 by itself).
    """
    if causal and mask is not None:  # padding is on the right: this only matters for the pads
        phi_k = phi_k * mask[:, None, :, None].to(phi_k.dtype)
    if causal and chunk_linear_attn is not None and phi_q.is_cuda:
        return fla_causal_linear_attention(phi_q, phi_k, v, eps)
    low = v.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(v.device.type, enabled=False):
        args = [t.float() if low else t for t in (phi_q, phi_k, v)]
        if causal:
            y = chunked_causal_linear_attention(*args, chunk_size, eps)
        else:
            y = global_linear_attention(*args, mask, eps)
    return y.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Feature maps.


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, smooth, dimension-preserving."""
    return F.elu(x) + 1.0


# ----------------------------------------------------------------------------------------------
# Mixers.


class LinearAttention(nn.Module):
    """Linear Transformer attention (Katharopoulos et al. 2020), the ``linear_transformer`` mixer.

    Args:
        d_model: model width.
        causal: attend only to the past (chunked form) instead of the whole sequence.
        layer_idx: position in the stack (unused; part of the mixer contract).
        n_heads: number of heads; ``d_model`` must divide evenly.
        chunk_size: chunk length of the causal form (speed only; results are identical).
        mask_padding: leave padding keys out of the sums (true); false lets them in, as LRA's
            released linear attention and FAVOR do (they take no padding mask: linear_attention
            has none, performer's dot_product_attention ignores its bias).
        qkv_dim: total width of queries, keys and values over the heads (LRA's ``qkv_dim``);
            None: ``d_model``.
    """

    # the query/key/value/output projections and the kernels each fuses, for init=lra_released
    # (architectures/lra.py)
    released_projections = {"qkv": 3, "out": 1}

    def __init__(self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, chunk_size: int = 64,
                 mask_padding: bool = True, qkv_dim: int | None = None):
        super().__init__()
        self.mask_padding = mask_padding
        self.qkv_dim = attention_width(d_model, qkv_dim, n_heads)
        if chunk_size < 1:
            raise ValueError(f"model.mixer.chunk_size must be >= 1, got {chunk_size}")
        self.causal = causal
        self.n_heads = n_heads
        self.chunk_size = chunk_size
        self.qkv = nn.Linear(d_model, 3 * self.qkv_dim)
        self.out = nn.Linear(self.qkv_dim, d_model)

    def feature_maps(
        self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q), phi(k) (B, H, L, F) from q, k (B, H, L, hd); ``mask`` (B, L) marks real keys."""
        return elu_feature_map(q), elu_feature_map(k)

    def eps(self, dtype: torch.dtype) -> float:
        """What the normaliser adds to its denominator."""
        return EPS

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        y = self.attend(q, k, v, mask if self.mask_padding else None)  # (B, H, L, hd)
        return self.out(y.transpose(1, 2).reshape(B, L, self.qkv_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q, k, v (B, H, L, hd) through the feature maps; (B, H, L, hd)."""
        phi_q, phi_k = self.feature_maps(q, k, mask)  # (B, H, L, F)
        return linear_attention(phi_q, phi_k, v, causal=self.causal, mask=mask, chunk_size=self.chunk_size,
                                eps=self.eps(v.dtype))

    def step(self, x_t: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One token of the causal recurrence: state = (sum phi(k) v^T (B, H, F, hd), sum phi(k) (B, H, F))."""
        B = x_t.shape[0]
        q, k, v = self.qkv(x_t).view(B, 3, self.n_heads, -1).unbind(1)  # (B, H, hd)
        phi_q, phi_k = (t.squeeze(2) for t in self.feature_maps(q.unsqueeze(2), k.unsqueeze(2)))  # (B, H, F)
        if state is None:
            state = (phi_k.new_zeros(*phi_k.shape, v.shape[-1]), torch.zeros_like(phi_k))
        kv, z = state
        kv = kv + phi_k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, F, hd)
        z = z + phi_k
        num = (phi_q.unsqueeze(-2) @ kv).squeeze(-2)  # (B, H, hd)
        y = num / ((phi_q * z).sum(-1, keepdim=True) + self.eps(x_t.dtype))
        return self.out(y.reshape(B, self.qkv_dim)), (kv, z)


class LinformerAttention(nn.Module):
    """Linformer attention (Wang et al. 2020), the ``linformer`` mixer; bidirectional only.

    Keys and values are projected along the length, (L, hd) -> (k, hd), by learned matrices
    E and F (one pair per layer, shared by the heads; one matrix for both with ``share_kv``, as
    LRA's released code does), then softmax attention runs over the k projected rows: O(L k)
    instead of O(L^2).

    A shorter input than ``seq_len`` behaves as if zero-padded to it, so only the first L columns
    of E and F are used. To pay only for those, each projection is kept in blocks of ``block``
    columns, one parameter each: a run at length L touches ceil(L / block) blocks, and the others
    get no gradient, so AdamW neither keeps state for them nor moves or decays them (slicing one
    (k, seq_len) weight would build a full-size gradient every step and decay every column).

    Args:
        d_model: model width.
        causal: must be False: every projected row mixes all positions, so no mask can keep
            the future out; raises :class:`UnsupportedTask` otherwise.
        layer_idx: position in the stack (unused; part of the mixer contract).
        n_heads: number of heads.
        seq_len: the longest input (the projections have one column per position).
        k: projected length (the paper's default 256; LRA's released code 16).
        share_kv: one projection for keys and values (LRA's released code; the paper's
            "key-value sharing").
        dropout: attention-weight dropout in training.
        block: columns per projection parameter (speed and memory only; results are identical).
        max_len: when given, the longest input instead of ``seq_len`` (a yaml ``max_len: null``
            is filled by the backbone, which counts a prepended CLS token).
        mask_padding: zero padding keys and values before the projection (true); false lets
            them in, as LRA's released Linformer does (it masks nothing).
        qkv_dim: total width of queries, keys and values over the heads (LRA's ``qkv_dim``);
            None: ``d_model``.
    """

    # the query/key/value/output projections and the kernels each fuses, for init=lra_released
    # (architectures/lra.py)
    released_projections = {"qkv": 3, "out": 1}

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, seq_len: int, k: int = 256,
        share_kv: bool = False, dropout: float = 0.0, block: int = 128, max_len: int | None = None,
        mask_padding: bool = True, qkv_dim: int | None = None,
    ):
        super().__init__()
        seq_len = max_len or seq_len
        self.mask_padding = mask_padding
        if causal:
            raise UnsupportedTask(
                "linformer projects keys and values along the whole sequence, so every position "
                "would see the future: it serves bidirectional tasks (classify, pair) only, not "
                "lm or seq2seq"
            )
        self.qkv_dim = attention_width(d_model, qkv_dim, n_heads)
        if min(seq_len, k, block) < 1:
            raise ValueError(f"model.mixer.seq_len, k and block must be >= 1, got {seq_len}, {k}, {block}")
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.block = block
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * self.qkv_dim)
        self.out = nn.Linear(self.qkv_dim, d_model)
        self.proj_k = self.length_projection(k, seq_len)  # E
        self.proj_v = None if share_kv else self.length_projection(k, seq_len)  # F

    def length_projection(self, k: int, seq_len: int) -> nn.ParameterList:
        """A (k, seq_len) matrix, initialised whole, stored as blocks of ``self.block`` columns."""
        weight = torch.empty(k, seq_len)
        nn.init.xavier_uniform_(weight, gain=1 / math.sqrt(2))  # as fairseq's Linformer
        return nn.ParameterList(nn.Parameter(w.clone()) for w in weight.split(self.block, dim=1))

    @torch.no_grad()
    def lra_released_init_(self) -> None:
        """LRA's released projection (linformer_attention.py): one (max_len, k) kernel drawn by
        the block's xavier_uniform, gain 1 (ours by default: fairseq's gain 1 / sqrt(2))."""
        for projection in (self.proj_k, self.proj_v):
            if projection is not None:
                weight = torch.empty(projection[0].shape[0], self.seq_len)
                nn.init.xavier_uniform_(weight)
                for part, w in zip(projection, weight.split(self.block, dim=1)):
                    part.copy_(w)

    def columns(self, projection: nn.ParameterList, L: int) -> torch.Tensor:
        """The first L columns (k, L), from the blocks that hold them and no others."""
        used = list(projection[: -(-L // self.block)])
        return (used[0] if len(used) == 1 else torch.cat(used, dim=1))[:, :L]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        if L > self.seq_len:
            raise ValueError(
                f"linformer was built for model.mixer.seq_len={self.seq_len} positions but got a "
                f"sequence of {L}; set model.mixer.seq_len to the longest input"
            )
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        if mask is not None and self.mask_padding:  # zero pad keys/values: they add nothing to the projection
            keep = mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        E = self.columns(self.proj_k, L)  # (k, L)
        Fm = E if self.proj_v is None else self.columns(self.proj_v, L)
        k = E @ k  # (B, H, k, hd)
        v = Fm @ v  # (B, H, k, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, self.qkv_dim))
