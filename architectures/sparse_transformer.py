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

``strided`` and ``fixed`` are the paper's. ``lra_released`` is the pattern of LRA's released
code (google-research/long-range-arena at cd31e5c, ``lra_benchmarks/models/sparse_transformer/
sparse_attention.py``: ``build_mask`` merging ``Fixed1Pattern(block_size)`` and
``Fixed2Pattern(block_size, c)``; ``utils/train_utils.py`` passes block_size 50, c 10 on every
task), which differs from ``fixed`` in three ways:

* B also holds the *first* position of every block (``j mod l == 0 or j mod l >= l - c``);
* it is causal (``j <= i``) on every task, classification and retrieval included;
* with a CLS token (the release's ``use_cls_token``, set whenever ``classifier_pool='CLS'``,
  whether the encoder prepends a CLS token (classification) or not (the dual encoders of
  retrieval, where the first document token takes its place); here when the backbone pools the
  first position, ``size.pooling=cls_token`` or ``cls``, and passes ``cls_token``), the pattern
  is built for the ``L - 1`` tokens after position 0, counting their positions from 0, and padded
  with a first row and column of ones: position 0 attends to every real key, the future
  included, and every query attends to it.

Padding keys are masked as in every pattern here. The release adds -1e10 to masked scores and
masks pad *queries* too, so a pad query's row is fully masked and (in float32) averages every
value uniformly; no real query and no pooled vector here reads a pad query's output (real
queries never attend pad keys, pooling skips pads), so pad queries keep this module's outputs.

:func:`sparse_transformer_mask` writes the pattern out as a dense (L, L) mask, the reference
these kernels equal (with :func:`architectures.attention.dense_attention`).

Portable kernels (the CPU path), O(L * (l + L / l)) time and memory:

* ``fixed`` and ``lra_released`` are the machinery of :mod:`architectures.sparse` as is: query
  blocks of ``l`` gather their own key block, and the summary positions join every block as
  extra keys (like Longformer's global tokens), the ones inside the query's own block counted
  once. The released CLS token is one more extra key for every query, and its own row attends
  to every key (:func:`architectures.sparse.global_rows`).
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

from architectures.sparse import SparseAttention, attend_gathered, gather_blocks, global_rows, pad_to_blocks

PATTERNS = ("strided", "fixed", "lra_released")  # the paper's two; LRA's released fixed pattern


def strided_allowed(i: torch.Tensor, j: torch.Tensor, stride: int, causal: bool) -> torch.Tensor:
    """True where key ``j`` is in query ``i``'s strided pattern (broadcasting positions)."""
    allowed = ((i - j).abs() < stride) | ((i - j) % stride == 0)
    return allowed & (j <= i) if causal else allowed


def fixed_allowed(i: torch.Tensor, j: torch.Tensor, stride: int, c: int, causal: bool) -> torch.Tensor:
    """True where key ``j`` is in query ``i``'s fixed pattern (broadcasting positions)."""
    allowed = (i // stride == j // stride) | (j % stride >= stride - c)
    return allowed & (j <= i) if causal else allowed


def released_allowed(i: torch.Tensor, j: torch.Tensor, stride: int, c: int, cls_token: bool) -> torch.Tensor:
    """True where key ``j`` is in query ``i``'s pattern as LRA's release builds it (broadcasting
    positions): ``Fixed1Pattern | Fixed2Pattern``, each causal. With ``cls_token`` the pattern
    counts positions from the token after the CLS token, whose row and column are all True."""
    if cls_token:
        return (i == 0) | (j == 0) | released_allowed(i - 1, j - 1, stride, c, cls_token=False)
    same_block = i // stride == j // stride  # Fixed1Pattern
    summary = (j % stride == 0) | (j % stride >= stride - c)  # Fixed2Pattern: first and last c of a block
    return (same_block | summary) & (j <= i)


def sparse_transformer_mask(L: int, *, pattern: str, stride: int, c: int, causal: bool, cls_token: bool = False,
                            device=None) -> torch.Tensor:
    """Dense (L, L) mask of the pattern: True where query i may attend key j. ``lra_released``
    is causal whatever ``causal`` says (as released), and reads ``cls_token`` (a CLS token at 0)."""
    i = torch.arange(L, device=device)[:, None]
    if pattern == "strided":
        return strided_allowed(i, i.T, stride, causal)
    if pattern == "lra_released":
        return released_allowed(i, i.T, stride, c, cls_token)
    return fixed_allowed(i, i.T, stride, c, causal)


def summary_positions(n_blocks: int, stride: int, c: int, first_is_summary: bool, device=None) -> torch.Tensor:
    """The summary positions (G,) of ``n_blocks`` blocks of ``stride``: the last ``c`` of each
    block, and its first too when ``first_is_summary`` (LRA's release), each once, ascending."""
    offsets = torch.arange(stride - c, stride, device=device)
    if first_is_summary and c < stride:
        offsets = torch.cat([offsets.new_zeros(1), offsets])
    return (torch.arange(n_blocks, device=device)[:, None] * stride + offsets).flatten()  # (n_blocks * n_offsets,)


def fixed_attention(q, k, v, *, stride: int, c: int, causal: bool, key_real=None, dropout: float = 0.0,
                    score_bias=None, first_is_summary: bool = False, extra_keys=None) -> torch.Tensor:
    """Blocked ``fixed`` attention: (B, H, L, hd) three times -> (B, H, L, hd); equals
    ``dense_attention`` with ``sparse_transformer_mask(pattern="fixed") & key_real`` (and the
    ``score_bias`` of the distances, as in :func:`architectures.sparse.attend_gathered`).

    ``first_is_summary`` makes the first position of every block a summary too (LRA's released
    ``Fixed2Pattern``). ``extra_keys``, ``(k, v, allowed, positions)`` of shapes (B, H, E, hd)
    twice, (B, 1, 1, E) and (E,), are keys outside the sequence that every query may see besides
    its pattern (the released CLS token, at position -1 of the tokens after it).
    """
    L = q.shape[2]
    b = stride
    key_real, q, k, v = pad_to_blocks(b, key_real, q, k, v)
    B, nb = q.shape[0], q.shape[2] // b
    blocks = torch.arange(nb, device=q.device)[:, None].expand(B, nb, 1)  # (B, nb, 1): its own block
    qpos = torch.arange(nb * b, device=q.device).view(nb, b, 1)
    summary = summary_positions(nb, b, c, first_is_summary, device=q.device)  # (G,)
    # (B, nb, b, G): summary keys outside the query's own block (inside it they are gathered already)
    allowed = key_real[:, summary][:, None, None, :] & (summary // b != qpos // b)
    if causal:
        allowed = allowed & (summary <= qpos)
    extra = (k[:, :, summary], v[:, :, summary], allowed, summary)
    if extra_keys is not None:
        k_e, v_e, allowed_e, pos_e = extra_keys
        allowed_e = allowed_e.expand(B, nb, b, -1)  # (B, nb, b, E)
        extra = (torch.cat([extra[0], k_e], 2), torch.cat([extra[1], v_e], 2),  # (B, H, G + E, hd)
                 torch.cat([allowed.expand(B, nb, b, -1), allowed_e], -1), torch.cat([summary, pos_e]))
    rule = (lambda i, j: j <= i) if causal else (lambda i, j: j >= 0)
    return attend_gathered(q, k, v, key_real, blocks, qpos, b, rule, dropout, extra, score_bias)[:, :, :L]


def released_attention(q, k, v, *, stride: int, c: int, cls_token: bool, key_real=None, dropout: float = 0.0,
                       score_bias=None) -> torch.Tensor:
    """LRA's released pattern: (B, H, L, hd) three times -> (B, H, L, hd); equals
    ``dense_attention`` with ``sparse_transformer_mask(pattern="lra_released") & key_real``.

    Without a CLS token it is the causal ``fixed`` kernel with the first position of every block
    a summary too. With one, the tokens after it run that kernel with the CLS key as an extra key
    for all, and the CLS query attends to every real key (:func:`architectures.sparse.global_rows`).
    """
    run = dict(stride=stride, c=c, causal=True, dropout=dropout, score_bias=score_bias, first_is_summary=True)
    if not cls_token:
        return fixed_attention(q, k, v, key_real=key_real, **run)
    B, _, L, _ = q.shape
    if key_real is None:
        key_real = torch.ones(B, L, dtype=torch.bool, device=q.device)
    y_cls = global_rows(q[:, :, :1], k, v, key_real, False, dropout, score_bias)  # (B, H, 1, hd)
    if L == 1:
        return y_cls
    cls_key = (k[:, :, :1], v[:, :, :1], key_real[:, None, None, :1], torch.tensor([-1], device=q.device))
    y_rest = fixed_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], key_real=key_real[:, 1:], extra_keys=cls_key,
                             **run)  # (B, H, L - 1, hd)
    return torch.cat([y_cls, y_rest], 2)


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
        causal: attend only to the past (and the present); ``lra_released`` is causal either way.
        layer_idx: position in the stack (unused).
        n_heads: number of heads.
        pattern: ``strided`` or ``fixed`` (the paper's), or ``lra_released`` (LRA's released
            code: ``fixed`` with the first position of every block a summary too, always causal;
            see the module docstring).
        stride: the paper's ``l``: window and stride (strided), block length (fixed,
            lra_released: the release's ``block_size``).
        c: the paper's ``c``: summary positions at the end of each block (``fixed`` and
            ``lra_released`` only).
        dropout: attention-weight dropout in training.
        positional: ``none``, or ``rope``, ``xpos``, ``alibi`` or ``t5`` (see :class:`MultiHeadAttention`).
        qkv_dim: width of queries, keys and values over the heads (see :class:`MultiHeadAttention`).
        cls_token: position 0 is the pooled CLS position (``pooling=cls_token`` or ``cls`` on
            classify and pair tasks; the backbone passes it, :func:`architectures.backbone.
            cls_token_kwargs`). Read by ``lra_released`` only: the release's ``use_cls_token``.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, pattern: str, stride: int,
        c: int, dropout: float = 0.0, positional: str = "none", qkv_dim: int | None = None,
        cls_token: bool = False,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, dropout=dropout,
                         positional=positional, qkv_dim=qkv_dim)
        if pattern not in PATTERNS:
            raise ValueError(f"model.mixer.pattern must be one of {PATTERNS}, got {pattern!r}")
        if stride < 1:
            raise ValueError(f"model.mixer.stride must be at least 1, got {stride}")
        if pattern != "strided" and not 1 <= c <= stride:
            raise ValueError(f"model.mixer.c must be in [1, model.mixer.stride={stride}] for the {pattern} pattern, "
                             f"got {c}")
        self.pattern, self.stride, self.c, self.cls_token = pattern, stride, c, cls_token

    def attend(self, q, k, v, key_real, dropout):
        if self.pattern == "lra_released":
            return released_attention(q, k, v, stride=self.stride, c=self.c, cls_token=self.cls_token,
                                      key_real=key_real, dropout=dropout, score_bias=self.score_bias)
        if self.pattern == "fixed":
            return fixed_attention(q, k, v, stride=self.stride, c=self.c, causal=self.causal, key_real=key_real,
                                   dropout=dropout, score_bias=self.score_bias)
        return strided_attention(q, k, v, stride=self.stride, causal=self.causal, key_real=key_real,
                                 dropout=dropout, score_bias=self.score_bias)

    def mask_mod(self, key_real):
        pattern, stride, c, causal, cls_token = self.pattern, self.stride, self.c, self.causal, self.cls_token

        def mask_mod(b, h, i, j):
            if pattern == "lra_released":
                return released_allowed(i, j, stride, c, cls_token) & key_real[b, j]
            if pattern == "strided":
                return strided_allowed(i, j, stride, causal) & key_real[b, j]
            return fixed_allowed(i, j, stride, c, causal) & key_real[b, j]

        return mask_mod
