"""Sparse Sinkhorn attention (Tay et al. 2020, "Sparse Sinkhorn Attention", ICML), the `sinkhorn`
mixer.

The sequence is cut into blocks of ``block_size``. A sorting network reads each key block's
summary (the sum of its keys over real tokens) and outputs one row of logits over the blocks,
``R = sortnet(summary) / temperature``; Sinkhorn balancing (``sinkhorn_iters`` rounds of row then
column normalisation, in the log domain) turns R into a doubly stochastic, soft permutation P.
Query block i then attends, in one softmax, to

* its own block (the paper's local attention), and
* its *sorted* block, ``sum_j P[i, j] K_j`` and ``sum_j P[i, j] V_j`` token slot by token slot:
  the keys the learned sort brought next to it.

``sinkhorn_iters: 0`` sorts with a row softmax instead of Sinkhorn balancing, which is what LRA's
released code runs (``sort_activation='softmax'``, its default).

Padding: blocks with no real token take no part in the balancing (their rows and columns are
masked out), pad keys and values are zeroed before mixing, and a sorted slot is a key only where
some real token contributes to it, so right padding never changes a real token's output.

Causal (``lm``, ``seq2seq``): the paper's causal Sinkhorn balancing normalises each column over
the query blocks that may use it, which includes later blocks, so a block's sort would depend on
the future. The causal variant here is the one LRA's code writes for softmax sorting: a block's
summary is its first key (all a block's first query may see), it sorts over strictly earlier
blocks only, with a row softmax, and its local block is causally masked. A causal model with
``sinkhorn_iters > 0`` raises :class:`UnsupportedTask` saying so.

:func:`sinkhorn_block_attention` is the blocked kernel, O(L * block_size) for the attention plus
O(L^2 / block_size) for the sort; :func:`sinkhorn_attention_reference` gives every query its
explicit key set for the same permutation and runs :func:`dense_attention`.

``variant: lra_released`` runs LRA's released computation instead (architectures/
sinkhorn_released.py): strided groups, two softmaxes summed, every sorted key the sum of a
contiguous chunk whatever the sort, and the release's shifted padding mask. ``variant: paper``
(the default) is everything above.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.attention import MultiHeadAttention, dense_attention
from architectures.layers import UnsupportedTask, refuse_score_bias
from architectures.lra import check_mixer_variant
from architectures.sinkhorn_released import released_permutation, released_sinkhorn_attention
from architectures.sparse import attend



def masked_logsumexp(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp of x over ``valid`` entries along ``dim`` (keepdim); finite (and with finite
    gradients) even where nothing is valid."""
    x = x.masked_fill(~valid, float("-inf"))
    top = x.amax(dim, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(x - top).sum(dim, keepdim=True)
    return top + torch.log(total.clamp_min(torch.finfo(x.dtype).tiny))


def sinkhorn(logits: torch.Tensor, valid: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Soft permutation from logits (..., n, n) over ``valid`` entries: ``n_iters`` rounds of row
    then column normalisation in the log domain (0: one row softmax). Invalid entries are 0."""
    log_p = logits
    log_p = log_p - masked_logsumexp(log_p, valid, -1)
    for _ in range(n_iters):
        log_p = log_p - masked_logsumexp(log_p, valid, -2)
        log_p = log_p - masked_logsumexp(log_p, valid, -1)
    return torch.exp(log_p.masked_fill(~valid, float("-inf")))


def blocks_of(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B, H, n * b, d) -> (B, H, n, b, d)."""
    B, H, L, d = x.shape
    return x.view(B, H, L // b, b, d)


def sinkhorn_block_attention(
    q, k, v, perm: torch.Tensor, *, block_size: int, causal: bool, key_real: torch.Tensor, dropout: float = 0.0,
) -> torch.Tensor:
    """Local-block plus sorted-block attention for a soft permutation of the key blocks.

    Args:
        q, k, v: (B, H, L, hd) with L a multiple of ``block_size``.
        perm: (B, H, n, n) row i: the weights of key blocks j in query block i's sorted block.
        key_real: (B, L) True at real tokens.

    Returns:
        (B, H, L, hd)
    """
    B, H, L, hd = q.shape
    b = block_size
    real = key_real[:, None, :, None].to(k.dtype)  # (B, 1, L, 1)
    qb, kb, vb = blocks_of(q, b), blocks_of(k * real, b), blocks_of(v * real, b)  # (B, H, n, b, hd)
    realb = blocks_of(real.expand(B, 1, L, 1), b)[..., 0]  # (B, 1, n, b)
    k_sorted = torch.einsum("bhij,bhjsd->bhisd", perm, kb)  # (B, H, n, b, hd)
    v_sorted = torch.einsum("bhij,bhjsd->bhisd", perm, vb)
    sorted_real = torch.einsum("bhij,bxjs->bhis", perm, realb) > 0  # (B, H, n, b): some real mass
    local_ok = realb[..., None, :] > 0  # (B, 1, n, 1, b)
    if causal:
        local_ok = local_ok & torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
    allowed = torch.cat([local_ok.expand(B, H, -1, b, b), sorted_real[..., None, :].expand(-1, -1, -1, b, -1)], -1)
    keys, values = torch.cat([kb, k_sorted], -2), torch.cat([vb, v_sorted], -2)  # (B, H, n, 2b, hd)
    n = L // b
    y = attend(qb.reshape(B, H * n, b, hd), keys.reshape(B, H * n, 2 * b, hd), values.reshape(B, H * n, 2 * b, hd),
               allowed.reshape(B, H * n, b, 2 * b), dropout)  # (B, H * n, b, hd)
    return y.reshape(B, H, L, hd)


def sinkhorn_attention_reference(q, k, v, perm, *, block_size: int, causal: bool, key_real: torch.Tensor):
    """Each query block's explicit keys (its own block's tokens, then the permuted mix of blocks,
    slot by slot) and dense attention over them; one block at a time. Same arguments as
    :func:`sinkhorn_block_attention`."""
    B, H, L, hd = q.shape
    b = block_size
    out = []
    for i in range(L // b):
        rows = slice(i * b, (i + 1) * b)
        real = key_real[:, None, :, None].to(k.dtype)
        mixed_k = sum(perm[:, :, i, j, None, None] * (k * real)[:, :, j * b:(j + 1) * b] for j in range(L // b))
        mixed_v = sum(perm[:, :, i, j, None, None] * (v * real)[:, :, j * b:(j + 1) * b] for j in range(L // b))
        slot_real = sum(perm[:, :, i, j, None] * key_real[:, None, j * b:(j + 1) * b] for j in range(L // b)) > 0
        local_ok = key_real[:, None, None, rows].expand(B, H, b, b)
        if causal:
            local_ok = local_ok & torch.ones(b, b, dtype=torch.bool, device=q.device).tril()
        allowed = torch.cat([local_ok, slot_real[:, :, None, :].expand(B, H, b, b)], -1)
        keys = torch.cat([k[:, :, rows], mixed_k], 2)
        values = torch.cat([v[:, :, rows] * real[:, :, rows], mixed_v], 2)
        out.append(dense_attention(q[:, :, rows], keys, values, allowed))
    return torch.cat(out, 2)


class SinkhornAttention(MultiHeadAttention):
    """Sparse Sinkhorn attention: (B, L, D) -> (B, L, D) (see the module docstring).

    Args:
        d_model, causal, n_heads, dropout, qkv_dim: as :class:`MultiHeadAttention`.
        positional: ``rope`` or ``xpos`` (rotations, as :class:`MultiHeadAttention`); the sorted
            blocks' scores take no distance bias.
        layer_idx: position in the stack (unused).
        block_size: tokens per block.
        max_blocks: the sorting network's outputs: the most blocks a sequence may have.
        sinkhorn_iters: Sinkhorn balancing rounds (0: a row softmax, LRA's released default).
        temperature: divides the sorting logits.
        variant: ``paper`` (the module docstring) or ``lra_released``, LRA's released computation
            (architectures/sinkhorn_released.py), which ignores ``sinkhorn_iters`` and
            ``temperature`` (its softmax sort reaches the output only through row sums of 1) and
            needs ``block_size`` to divide the length; its sorting network has no bias, as the
            release's, and 25 outputs there (``max_blocks: 25`` for its parameter count).
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, block_size: int, max_blocks: int,
        sinkhorn_iters: int, temperature: float, dropout: float = 0.0, positional: str = "none",
        qkv_dim: int | None = None, variant: str = "paper",
    ):
        check_mixer_variant(variant)  # lra_released: sinkhorn_released.py
        if causal and variant == "lra_released":
            raise UnsupportedTask(
                "model.mixer.variant=lra_released has no causal form: LRA's released Sinkhorn attention marks its "
                "causal masking untested (TODO) and builds (L, L) causal masks that do not fit its (b, b) block "
                "weights; use model.mixer.variant=paper with model.mixer.sinkhorn_iters=0 for causal tasks")
        if causal and sinkhorn_iters > 0:
            raise UnsupportedTask(
                "causal Sinkhorn balancing normalises each column over later query blocks, so a block's sort "
                "would see the future; set model.mixer.sinkhorn_iters=0 for the causal softmax sort")
        refuse_score_bias(positional, "sinkhorn (attention over sorted blocks)")
        super().__init__(d_model, causal=causal, layer_idx=layer_idx, n_heads=n_heads, dropout=dropout,
                         positional=positional, qkv_dim=qkv_dim)
        if block_size < 1 or max_blocks < 1 or sinkhorn_iters < 0 or temperature <= 0:
            raise ValueError("model.mixer: block_size and max_blocks must be >= 1, sinkhorn_iters >= 0 and "
                             f"temperature > 0; got {block_size}, {max_blocks}, {sinkhorn_iters}, {temperature}")
        self.block_size, self.max_blocks = block_size, max_blocks
        self.sinkhorn_iters, self.temperature = sinkhorn_iters, temperature
        self.variant = variant
        # shared by the heads, as in LRA's code, whose sorting Dense has no bias (bias=False)
        self.sortnet = nn.Linear(self.head_dim, max_blocks, bias=variant == "paper")

    def permutation(self, k: torch.Tensor, key_real: torch.Tensor) -> torch.Tensor:
        """The soft permutation (B, H, n, n) of the key blocks, from k (B, H, n * b, hd)."""
        B, H, L, hd = k.shape
        n = L // self.block_size
        if n > self.max_blocks:
            raise ValueError(f"a sequence of {L} tokens has {n} blocks of model.mixer.block_size="
                             f"{self.block_size}, more than model.mixer.max_blocks={self.max_blocks}")
        kb = blocks_of(k, self.block_size)  # (B, H, n, b, hd)
        block_real = key_real.view(B, 1, n, self.block_size)  # (B, 1, n, b)
        if self.causal:
            summary = kb[..., 0, :]  # a block's first key: all its first query may see
        else:
            summary = (kb * block_real[..., None]).sum(-2)  # (B, H, n, hd)
        logits = self.sortnet(summary)[..., :n] / self.temperature  # (B, H, n, n)
        has_real = block_real.any(-1)  # (B, 1, n)
        valid = has_real[..., :, None] & has_real[..., None, :]  # (B, 1, n, n)
        if self.causal:
            valid = valid & torch.ones(n, n, dtype=torch.bool, device=k.device).tril(-1)
        return sinkhorn(logits, valid, self.sinkhorn_iters)

    def released_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``variant: lra_released`` (architectures/sinkhorn_released.py)."""
        B, L, _ = x.shape
        b = self.block_size
        if L % b:
            raise ValueError(
                f"model.mixer.block_size={b} does not divide the sequence length L={L}: LRA's released Sinkhorn "
                "attention (model.mixer.variant=lra_released) reshapes the sequence into blocks and does not pad; "
                "pick a block size that divides L (model.pooling=cls_token adds one token to the task's length)")
        q, k, v = self.project(x)  # (B, H, L, hd)
        key_real = mask if mask is not None else torch.ones(B, L, dtype=torch.bool, device=x.device)
        # computed although only its row sums (1) reach the output, so the sorting network's
        # parameters take part, with the release's (rounding-level) gradient
        perm = released_permutation(k, self.sortnet, b)  # (B, H, nb, nb')
        y = released_sinkhorn_attention(q, k, v, perm, key_real=key_real, block_size=b,
                                        dropout=self.dropout if self.training else 0.0)
        return self.merge(y)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.variant == "lra_released":
            return self.released_forward(x, mask)
        B, L, _ = x.shape
        q, k, v = self.project(x)  # (B, H, L, hd)
        b = self.block_size
        pad = -L % b
        key_real = mask if mask is not None else torch.ones(B, L, dtype=torch.bool, device=x.device)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        key_real = F.pad(key_real, (0, pad), value=False)
        perm = self.permutation(k, key_real)
        y = sinkhorn_block_attention(q, k, v, perm, block_size=b, causal=self.causal, key_real=key_real,
                                     dropout=self.dropout if self.training else 0.0)
        return self.merge(y[:, :, :L])
