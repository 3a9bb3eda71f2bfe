"""LSH attention (Reformer, Kitaev et al. 2020), the `reformer` mixer.

Queries and keys share one projection; a key is its query scaled to unit length. Each of
``n_hashes`` rounds hashes every query with angular LSH, ``h(x) = argmax([xR; -xR])`` for a
random rotation R of ``n_buckets / 2`` columns, sorts the positions by (bucket, position), cuts
the sorted order into chunks of ``chunk_len`` and lets each query attend in sorted order:

* bidirectional: the keys of its own chunk and of the chunk before (the paper's Fig. 2d);
* causal: the keys of its own bucket at or before it, at most ``chunk_len`` back in sorted
  order (so they lie in its chunk or the one before). Plain chunking is not causal: where a
  query's chunk starts depends on how many *later* tokens fell into lower buckets.

A token never attends to itself unless nothing else is allowed: its own score gets -1e5 (as in
trax), so a softmax that has any other key gives it no weight. The rounds are combined by the
softmax over all (round, key) pairs, i.e. a key found in k rounds counts k times (the paper's
multi-round attention without de-duplication, as in trax).

The random rotations are fixed per layer (drawn from ``seed`` and the layer index), as in LRA's
released code, so evaluation is deterministic and a reversible block recomputes the same
buckets. Padding sorts last (its own bucket), so it never moves a real token's chunk.

:func:`lsh_attention` is the chunked O(L * chunk_len) kernel; :func:`lsh_attention_reference`
builds the dense (L, L) mask the same buckets imply and runs dense softmax attention: the two
are tested equal in values and gradients.

``variant: lra_released`` is the LSH attention of LRA's released code instead
(``lra_benchmarks/models/reformer/reformer_attention.py`` and ``reformer.py``, read at
google-research/long-range-arena cd31e5c), the model behind LRA's Reformer rows:

* the block's input is padded with ``10 - L % 10`` zero rows (``extra_len = chunk_len - qlength %
  chunk_len`` with ReformerAttention's default chunk_len 10, which ReformerBlock leaves; so
  always at least one row) before the bias-free query and value projections;
* one hashing round (the LRA configs' n_hashes 1) with rotations drawn once, from
  ``PRNGKey(0)`` in every layer and head (here: from ``seed`` alone);
* the bucket-sorted sequence is cut into ``n_hashes * n_buckets`` chunks (not chunks of a given
  length) and each chunk attends to itself and to the chunk before, chunk 0 to the *last* chunk
  (``look_one_back`` wraps around);
* the keys are the queries themselves (``length_norm=False``), a token may attend to itself,
  and the scores are *multiplied* by sqrt(head dim);
* no padding mask (the task's padding and the appended zero rows are keys like any other), no
  attention dropout (the released function takes dropout_rate and applies none), and no output
  projection (the heads' outputs are concatenated and returned).

:func:`lsh_attention_lra_released` is that computation on chunks and
:func:`lsh_attention_lra_released_reference` the dense softmax under the same chunk rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.attention import dense_attention
from architectures.layers import RotaryEmbedding, UnsupportedTask, refuse_score_bias
from architectures.lra import check_mixer_variant

SELF_SCORE = -1e5  # added to a query's own score: it attends to itself only when nothing else is allowed
RELEASED_PAD_MULTIPLE = 10  # the released ReformerAttention pads its input to a multiple of its chunk_len 10


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor, key_real: torch.Tensor | None) -> torch.Tensor:
    """Angular LSH of x (B, H, L, hd) under rotations (R, hd, n_buckets / 2) -> (B, H, R, L).

    Padding (``key_real`` False) gets bucket ``n_buckets``, after every real bucket.
    """
    rotated = torch.einsum("bhld,rdk->bhrlk", x, rotations.to(x.dtype))  # (B, H, R, L, nb/2)
    buckets = torch.cat([rotated, -rotated], -1).argmax(-1)  # (B, H, R, L)
    if key_real is not None:
        buckets = buckets.masked_fill(~key_real[:, None, None, :], 2 * rotations.shape[-1])
    return buckets


def sort_by_bucket(buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions sorted by (bucket, position) and each position's rank; both (B, H, R, L)."""
    L = buckets.shape[-1]
    pos = torch.arange(L, device=buckets.device)
    order = torch.argsort(buckets * L + pos, dim=-1)  # (B, H, R, L)
    rank = torch.argsort(order, dim=-1)
    return order, rank


def lsh_attention(
    qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, *, chunk_len: int, causal: bool,
    key_real: torch.Tensor | None = None, dropout: float = 0.0,
) -> torch.Tensor:
    """Chunked multi-round LSH attention: qk, v (B, H, L, hd), buckets (B, H, R, L) -> (B, H, L, hd)."""
    B, H, L, hd = qk.shape
    R = buckets.shape[2]
    c = chunk_len
    pad = -L % c
    if key_real is None:
        key_real = torch.ones(B, L, dtype=torch.bool, device=qk.device)
    if pad:  # pad positions sort after every real token (a bucket past all others)
        qk, v = F.pad(qk, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        key_real = F.pad(key_real, (0, pad), value=False)
        buckets = F.pad(buckets, (0, pad), value=int(buckets.max()) + 1)
    Lp, n = L + pad, (L + pad) // c
    order, _ = sort_by_bucket(buckets)  # (B, H, R, Lp)
    k = F.normalize(qk, dim=-1)  # shared QK: the key is the unit-length query

    def sort(x):  # (B, H, Lp, d) -> (B, H, R, n, c, d) in each round's sorted order
        idx = order.reshape(B, H, R * Lp, 1).expand(-1, -1, -1, x.shape[-1])
        return x.gather(2, idx).view(B, H, R, n, c, x.shape[-1])

    def with_previous(x, fill):  # (..., n, c, d) -> (..., n, 2c, d): the chunk before, then the chunk
        prev = torch.cat([torch.full_like(x[..., :1, :, :], fill), x[..., :-1, :, :]], -3)
        return torch.cat([prev, x], -2)

    sq, sk, sv = sort(qk), sort(k), sort(v)  # (B, H, R, n, c, hd)
    spos = order.view(B, H, R, n, c, 1).float()  # sorted positions
    sreal = key_real[:, None, None, :].expand(B, H, R, Lp).gather(3, order).view(B, H, R, n, c, 1).float()
    sbucket = buckets.gather(3, order).view(B, H, R, n, c, 1).float()
    rank = torch.arange(Lp, device=qk.device, dtype=torch.float32).view(n, c, 1)
    kk, kv = with_previous(sk, 0.0), with_previous(sv, 0.0)  # (B, H, R, n, 2c, hd)
    kpos, kreal = with_previous(spos, -1.0)[..., 0], with_previous(sreal, 0.0)[..., 0]  # (B, H, R, n, 2c)
    krank = with_previous(rank, -1.0)[..., 0]  # (n, 2c); -1: chunk 0 has no chunk before
    allowed = (kreal > 0)[..., None, :] & (krank >= 0)[:, None, :]  # (B, H, R, n, 1 or c, 2c)
    if causal:
        kbucket = with_previous(sbucket, -1.0)[..., 0]
        back = rank - krank[:, None, :]  # (n, c, 2c): how far back in sorted order
        allowed = allowed & (sbucket == kbucket[..., None, :]) & (back >= 0) & (back < c)

    scores = torch.einsum("bhrnid,bhrnjd->bhrnij", sq, kk) / math.sqrt(hd)  # (B, H, R, n, c, 2c)
    scores = scores + SELF_SCORE * (spos == kpos[..., None, :])
    # softmax per round as numerator and denominator against the row's max, so that a row with
    # no allowed key (padding) stays finite; the rounds are merged below
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)  # (B, H, R, n, c, 2c); 0 where not allowed
    den = e.sum(-1, keepdim=True)  # (B, H, R, n, c, 1)
    if dropout > 0:
        e = F.dropout(e, dropout)
    num = e @ kv  # (B, H, R, n, c, hd)

    def unsort(x):  # (B, H, R, n, c, d) -> (B, H, R, Lp, d) in position order
        d = x.shape[-1]
        out = torch.empty_like(x).view(B, H, R, Lp, d)
        return out.scatter(3, order[..., None].expand(-1, -1, -1, -1, d), x.reshape(B, H, R, Lp, d))

    num, den, row_max = unsort(num), unsort(den), unsort(row_max)  # (B, H, R, Lp, .)
    top = row_max.amax(2, keepdim=True)
    scale = torch.exp(row_max - top)  # (B, H, R, Lp, 1)
    y = (num * scale).sum(2) / (den * scale).sum(2).clamp_min(torch.finfo(num.dtype).tiny)
    return y[:, :, :L]  # (B, H, L, hd)


def lsh_allowed_counts(buckets: torch.Tensor, *, chunk_len: int, causal: bool) -> torch.Tensor:
    """In how many rounds query i may attend key j under these buckets: (B, H, L, L).

    The dense form of :func:`lsh_attention`'s rule (before padding and the self score)."""
    L = buckets.shape[-1]
    c = chunk_len
    _, rank = sort_by_bucket(buckets)  # (B, H, R, L)
    ri, rj = rank[..., :, None], rank[..., None, :]  # (B, H, R, L, 1), (B, H, R, 1, L)
    if causal:
        same = buckets[..., :, None] == buckets[..., None, :]
        allowed = same & (ri - rj >= 0) & (ri - rj < c)
    else:
        ci, cj = ri // c, rj // c
        allowed = (cj == ci) | (cj == ci - 1)
    return allowed.sum(2)  # (B, H, L, L)


def lsh_attention_reference(
    qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, *, chunk_len: int, causal: bool,
    key_real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense softmax attention under the mask the buckets imply (each key weighted by the number
    of rounds that allow it), with the shared-QK keys and the self score; (B, H, L, hd)."""
    L, hd = qk.shape[-2:]
    k = F.normalize(qk, dim=-1)
    counts = lsh_allowed_counts(buckets, chunk_len=chunk_len, causal=causal).to(qk.dtype)
    if key_real is not None:
        counts = counts * key_real[:, None, None, :]
    scores = qk @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, L, L)
    scores = scores + SELF_SCORE * torch.eye(L, device=qk.device) + counts.log()  # log 0 = -inf
    has_key = (counts > 0).any(-1, keepdim=True)  # a pad query may have none: zeros, finite gradients
    weights = torch.softmax(scores.masked_fill(~has_key, 0.0), -1) * has_key
    return weights @ v


def released_chunks(qk: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released sort of qk (B, H, L, hd) under one round of ``rotations`` (1, hd, nb / 2):
    each position's sorted order (B, H, L) and its chunk (B, H, L) of ``n_buckets`` chunks."""
    L = qk.shape[-2]
    n_chunks = 2 * rotations.shape[-1]
    buckets = lsh_buckets(qk.detach(), rotations, None)  # (B, H, 1, L)
    order, rank = sort_by_bucket(buckets)  # (B, H, 1, L)
    return order[:, :, 0], rank[:, :, 0] // (L // n_chunks)


def lsh_attention_lra_released(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """LRA's released LSH attention: qk, v (B, H, L, hd), L a multiple of the bucket count ->
    (B, H, L, hd). Chunks of the sorted order attend to themselves and to the chunk before
    (chunk 0 to the last), scores q.q * sqrt(hd), no mask."""
    B, H, L, hd = qk.shape
    n, c = 2 * rotations.shape[-1], L // (2 * rotations.shape[-1])  # n_buckets chunks of c
    order, _ = released_chunks(qk, rotations)  # (B, H, L)

    def sort(x):  # (B, H, L, d) -> (B, H, n, c, d) in sorted order
        return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1])).view(B, H, n, c, x.shape[-1])

    def look_one_back(x):  # (B, H, n, c, d) -> (B, H, n, 2c, d): the chunk, then the one before (wrapping)
        return torch.cat([x, x.roll(1, dims=2)], -2)

    sq, sv = sort(qk), sort(v)
    scores = sq @ look_one_back(sq).transpose(-2, -1) * math.sqrt(hd)  # (B, H, n, c, 2c)
    y = torch.softmax(scores, -1) @ look_one_back(sv)  # (B, H, n, c, hd)
    out = torch.empty_like(y).view(B, H, L, hd)
    return out.scatter(2, order[..., None].expand(-1, -1, -1, hd), y.reshape(B, H, L, hd))


def lsh_attention_lra_released_reference(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Dense softmax attention under the released chunk rule: query i attends key j where j's
    chunk is i's or the one before it, modulo the chunk count (at least 2); (B, H, L, hd)."""
    n_chunks = 2 * rotations.shape[-1]
    _, chunk = released_chunks(qk, rotations)  # (B, H, L)
    ci, cj = chunk[..., :, None], chunk[..., None, :]
    allowed = (cj == ci) | (cj == (ci - 1) % n_chunks)  # (B, H, L, L)
    # scores q.q * sqrt(hd) = (hd q).q / sqrt(hd): dense_attention with the queries scaled by hd
    return dense_attention(qk * qk.shape[-1], qk, v, allowed)


class LSHAttention(nn.Module):
    """Multi-head LSH attention with a shared query-key projection: (B, L, D) -> (B, L, D).

    Args:
        d_model: model width.
        causal: attend only to the past (and the present).
        layer_idx: position in the stack; with ``seed`` it fixes this layer's rotations.
        n_heads: number of heads.
        chunk_len: length of the chunks of the sorted sequence (paper: 64).
        n_buckets: hash buckets per round, even (paper: about 2 L / chunk_len).
        n_hashes: hashing rounds (paper: 1 to 8).
        seed: seed of the random rotations.
        dropout: attention-weight dropout in training.
        positional: ``rope`` rotates the shared queries/keys by their positions (a score bias or
            xPos's different scaling of queries and keys cannot act on a shared projection).
        variant: ``paper`` (above) or ``lra_released``: LRA's released LSH attention (module
            docstring), which takes ``chunk_len: null`` (it cuts ``n_buckets`` chunks), one
            hashing round, no dropout, and has no output projection.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, chunk_len: int | None,
        n_buckets: int, n_hashes: int, seed: int = 0, dropout: float = 0.0, positional: str = "none",
        variant: str = "paper",
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} is not divisible by model.mixer.n_heads={n_heads}")
        if n_buckets < 2 or n_buckets % 2:
            raise ValueError(f"model.mixer.n_buckets must be even and >= 2 (argmax over [xR; -xR]), got {n_buckets}")
        check_mixer_variant(variant)
        if variant == "lra_released":
            check_released_settings(causal=causal, chunk_len=chunk_len, n_hashes=n_hashes, dropout=dropout)
        elif chunk_len is None or chunk_len < 1 or n_hashes < 1:
            raise ValueError(f"model.mixer.chunk_len and n_hashes must be >= 1, got {chunk_len} and {n_hashes}")
        refuse_score_bias(positional, "reformer (shared query-key LSH attention)", allowed=("rope",))
        self.causal, self.n_heads, self.dropout = causal, n_heads, dropout
        self.chunk_len, self.variant, self.n_buckets = chunk_len, variant, n_buckets
        hd = d_model // n_heads
        self.qk = nn.Linear(d_model, d_model)  # shared query-key projection
        self.v = nn.Linear(d_model, d_model)
        # the query/key/value/output projections and the kernels each fuses, for init=lra_released
        # (architectures/lra.py); the released attention has no output projection
        self.released_projections = {"qk": 1, "v": 1}
        if variant == "paper":
            self.out = nn.Linear(d_model, d_model)
            self.released_projections["out"] = 1
        self.rotary = RotaryEmbedding(hd) if positional == "rope" else None
        # the release draws one rotation for every layer (PRNGKey(0)); the paper variant one per layer
        generator = torch.Generator().manual_seed(seed * 1_000_003 + (layer_idx if variant == "paper" else 0))
        self.register_buffer("rotations", torch.randn(n_hashes, hd, n_buckets // 2, generator=generator),
                             persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.variant == "lra_released":
            return self.forward_released(x)
        B, L, D = x.shape
        qk = self.qk(x).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, H, L, hd)
        v = self.v(x).view(B, L, self.n_heads, -1).transpose(1, 2)
        if self.rotary is not None:
            qk = self.rotary.rotate(qk)
        buckets = lsh_buckets(qk.detach(), self.rotations, mask)  # (B, H, R, L)
        y = lsh_attention(qk, v, buckets, chunk_len=self.chunk_len, causal=self.causal, key_real=mask,
                          dropout=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, D))

    def forward_released(self, x: torch.Tensor) -> torch.Tensor:
        """LRA's released attention: zero rows appended, no mask, no output projection."""
        B, L, D = x.shape
        x = F.pad(x, (0, 0, 0, RELEASED_PAD_MULTIPLE - L % RELEASED_PAD_MULTIPLE))  # (B, Lp, D), Lp > L
        Lp = x.shape[1]
        if Lp % self.n_buckets:
            raise ValueError(f"reformer variant=lra_released cuts the padded length {Lp} (the input's {L} "
                             f"padded to a multiple of {RELEASED_PAD_MULTIPLE}) into model.mixer.n_buckets="
                             f"{self.n_buckets} chunks, which does not divide it (the release's reshape fails too)")
        qk = self.qk(x).view(B, Lp, self.n_heads, -1).transpose(1, 2)  # (B, H, Lp, hd)
        v = self.v(x).view(B, Lp, self.n_heads, -1).transpose(1, 2)
        if self.rotary is not None:
            qk = self.rotary.rotate(qk)
        y = lsh_attention_lra_released(qk, v, self.rotations)  # (B, H, Lp, hd)
        return y.transpose(1, 2).reshape(B, Lp, D)[:, :L]


def check_released_settings(*, causal: bool, chunk_len: int | None, n_hashes: int, dropout: float) -> None:
    """Refuse what LRA's released LSH attention does not do, naming the key."""
    if causal:
        raise UnsupportedTask("reformer variant=lra_released is LRA's encoder attention; its causal mask is "
                              "unimplemented in the release (a TODO), so it serves classification tasks only")
    if chunk_len is not None:
        raise ValueError(f"reformer variant=lra_released cuts the sorted sequence into model.mixer.n_buckets "
                         f"chunks; set model.mixer.chunk_len=null (got {chunk_len})")
    if n_hashes != 1:
        raise ValueError(f"reformer variant=lra_released hashes once (LRA's configs); model.mixer.n_hashes must "
                         f"be 1, got {n_hashes}")
    if dropout:
        raise ValueError(f"reformer variant=lra_released applies no attention dropout (the release takes the rate "
                         f"and ignores it); model.mixer.dropout must be 0, got {dropout}")
