"""Linear-complexity attention: Linear Transformer, Performer (FAVOR+) and Linformer mixers.

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


def orthogonal_random_features(n_features: int, dim: int, device=None) -> torch.Tensor:
    """FAVOR+'s projection (n_features, dim): blocks of orthonormal rows, each rescaled to the
    norm of an independent Gaussian vector so that every row is marginally N(0, I)."""
    blocks = []
    for _ in range(math.ceil(n_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        blocks.append(q.T)  # rows orthonormal
    w = torch.cat(blocks)[:n_features]  # (m, dim)
    norms = torch.randn(n_features, dim).norm(dim=1, keepdim=True)  # chi(dim) lengths
    return (w * norms).to(device)


def favor_features(x: torch.Tensor, projection: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    """Positive random features with E[phi(q) . phi(k)] proportional to exp(q . k / sqrt(hd)).

    phi(x)_j = exp(w_j . x' - |x'|^2 / 2 - c) with x' = x / hd^(1/4). The constant c only
    stabilises: a query's own max over features (a per-query factor, cancelled by the
    normaliser), and for keys the bound max_j |w_j|^2 / 2 >= w_j . x' - |x'|^2 / 2, which
    holds for every key and depends on no data, so it cancels exactly and keeps causality
    (a max over the sequence's keys, as in the paper's code, would leak the future). The
    1/sqrt(m) factor cancels too and is left out. The bound is loose, so features can be
    small (about 1e-6 to 1e-9 for unit-scale inputs): the Performer's normaliser uses no
    eps beyond a guard against 0 / 0.

    Args:
        x: (B, H, L, hd) queries or keys.
        projection: (m, hd) from :func:`orthogonal_random_features`.
    """
    x = x * x.shape[-1] ** -0.25
    wx = x @ projection.to(x.dtype).T  # (B, H, L, m)
    half_sq = (x * x).sum(-1, keepdim=True) / 2  # (B, H, L, 1)
    if is_query:
        c = wx.amax(-1, keepdim=True).detach()
    else:
        c = (projection * projection).sum(-1).amax() / 2
    return torch.exp(wx - half_sq - c)


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
    """

    def __init__(self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, chunk_size: int = 64):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} is not divisible by the head count {n_heads} "
                             "(size.n_heads for every model, model.mixer.n_heads for this one)")
        if chunk_size < 1:
            raise ValueError(f"model.mixer.chunk_size must be >= 1, got {chunk_size}")
        self.causal = causal
        self.n_heads = n_heads
        self.chunk_size = chunk_size
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def feature_maps(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return elu_feature_map(q), elu_feature_map(k)

    def eps(self, dtype: torch.dtype) -> float:
        """What the normaliser adds to its denominator."""
        return EPS

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        phi_q, phi_k = self.feature_maps(q, k)  # (B, H, L, F)
        y = linear_attention(phi_q, phi_k, v, causal=self.causal, mask=mask, chunk_size=self.chunk_size,
                             eps=self.eps(x.dtype))
        return self.out(y.transpose(1, 2).reshape(B, L, D))

    def step(self, x_t: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One token of the causal recurrence: state = (sum phi(k) v^T (B, H, F, hd), sum phi(k) (B, H, F))."""
        B, D = x_t.shape
        q, k, v = self.qkv(x_t).view(B, 3, self.n_heads, D // self.n_heads).unbind(1)  # (B, H, hd)
        phi_q, phi_k = (t.squeeze(2) for t in self.feature_maps(q.unsqueeze(2), k.unsqueeze(2)))  # (B, H, F)
        if state is None:
            state = (phi_k.new_zeros(*phi_k.shape, v.shape[-1]), torch.zeros_like(phi_k))
        kv, z = state
        kv = kv + phi_k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, F, hd)
        z = z + phi_k
        num = (phi_q.unsqueeze(-2) @ kv).squeeze(-2)  # (B, H, hd)
        y = num / ((phi_q * z).sum(-1, keepdim=True) + self.eps(x_t.dtype))
        return self.out(y.reshape(B, D)), (kv, z)


class PerformerAttention(LinearAttention):
    """Performer attention with FAVOR+ features (Choromanski et al. 2021), the ``performer`` mixer.

    Estimates softmax attention with ``n_features`` positive orthogonal random features per head
    size (shared by the heads of a layer). Everything else is :class:`LinearAttention`.

    Args:
        n_features: random features m (the paper's LRA runs use 256).
        redraw_every: draw a fresh projection every this many training-mode forward calls
            (0 = never). The calls are counted in the ``forward_calls`` buffer, so resuming a
            checkpoint keeps the schedule. A ``pair`` task calls the mixer twice per step.
        Other arguments as for :class:`LinearAttention`.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, n_features: int = 256,
        redraw_every: int = 0, chunk_size: int = 64,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, chunk_size=chunk_size)
        if n_features < 1 or redraw_every < 0:
            raise ValueError(
                f"model.mixer.n_features must be >= 1 and redraw_every >= 0, got {n_features}, {redraw_every}"
            )
        self.n_features = n_features
        self.redraw_every = redraw_every
        self.register_buffer("projection", orthogonal_random_features(n_features, d_model // n_heads))
        self.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def redraw(self) -> None:
        # a new tensor, not an in-place copy: a pending backward may still hold the old one
        old = self.projection
        self.projection = orthogonal_random_features(self.n_features, old.shape[1], old.device).to(old.dtype)

    def feature_maps(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return favor_features(q, self.projection, is_query=True), favor_features(k, self.projection, is_query=False)

    def eps(self, dtype: torch.dtype) -> float:
        # FAVOR+ features are positive and their stabilised scale can be far below 1e-6 (see
        # favor_features), so the usual eps would bias the estimate: guard only against 0 / 0
        return torch.finfo(dtype).tiny

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.redraw_every > 0:
            calls = int(self.forward_calls)
            if calls > 0 and calls % self.redraw_every == 0:
                self.redraw()
            self.forward_calls += 1
        return super().forward(x, mask)


class LinformerAttention(nn.Module):
    """Linformer attention (Wang et al. 2020), the ``linformer`` mixer; bidirectional only.

    Keys and values are projected along the length, (L, hd) -> (k, hd), by learned matrices
    E and F (one pair per layer, shared by the heads), then softmax attention runs over the k
    projected rows: O(L k) instead of O(L^2).

    Args:
        d_model: model width.
        causal: must be False: every projected row mixes all positions, so no mask can keep
            the future out; raises :class:`UnsupportedTask` otherwise.
        layer_idx: position in the stack (unused; part of the mixer contract).
        n_heads: number of heads.
        seq_len: the longest input (the projections have one column per position); shorter
            inputs behave as if zero-padded to it.
        k: projected length (the paper's default 256).
        dropout: attention-weight dropout in training.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, seq_len: int, k: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        if causal:
            raise UnsupportedTask(
                "linformer projects keys and values along the whole sequence, so every position "
                "would see the future: it serves bidirectional tasks (classify, pair) only, not "
                "lm or seq2seq"
            )
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} is not divisible by the head count {n_heads} "
                             "(size.n_heads for every model, model.mixer.n_heads for this one)")
        self.n_heads = n_heads
        self.seq_len = seq_len
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.proj_k = nn.Linear(seq_len, k, bias=False)  # E
        self.proj_v = nn.Linear(seq_len, k, bias=False)  # F
        for proj in (self.proj_k, self.proj_v):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))  # as fairseq's Linformer

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        if L > self.seq_len:
            raise ValueError(
                f"linformer was built for model.mixer.seq_len={self.seq_len} positions but got a "
                f"sequence of {L}; set model.mixer.seq_len to the longest input"
            )
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        if mask is not None:  # zero pad keys/values so they add nothing to the projection
            keep = mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        # a shorter input is zero-padded to seq_len; the padded columns would multiply zeros,
        # so using the first L columns of E and F is the same and cheaper
        E, Fm = self.proj_k.weight[:, :L], self.proj_v.weight[:, :L]  # (k, L)
        k = E @ k  # (B, H, k, hd)
        v = Fm @ v  # (B, H, k, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, D))
