"""Synthesizer attention (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention in Transformer
Models"), the `synthesizer` mixer: attention weights synthesised without query-key dot products.

* ``mode: dense``: each token predicts its own row of logits over positions,
  ``B_i = W2 relu(W1 x_i + b1) + b2`` with ``W2`` of ``max_len`` outputs, cut to the sequence.
* ``mode: random``: one learned (``max_len``, ``max_len``) logit matrix ``R`` per head, shared by
  every input; ``factorized: true`` learns it as ``R1 R2^T`` of rank ``k`` (the paper's
  factorised random synthesizer).
* ``dot_product: true`` adds the usual ``q k^T / sqrt(d)`` logits to the synthetic ones (the
  paper's mixtures, e.g. "R+V"); LRA's released Synthesizer runs random + dot product, since its
  training scripts never turn the dot product off (``ignore_dot_product=False``).

Then ``softmax(logits + mask) V``. Causal tasks mask the future as any attention does; padding
masks keys. :func:`synthetic_attention` is the whole computation written out, and the plain
reference is :func:`architectures.attention.dense_attention`'s formula with the extra logits;
``tests/test_synthesizer.py`` checks the mixer against an explicit formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.attention import attention_width, padding_and_causal_mask
from architectures.layers import attention_positions, refuse_score_bias

MODES = ("dense", "random")


def synthetic_attention(
    logits: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(logits) V where ``allowed``; logits (B or 1, H, L, L), v (B, H, L, hd) -> (B, H, L, hd).

    A query with no allowed key outputs zeros.
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, -1).nan_to_num(0.0)
    return F.dropout(weights, dropout) @ v


class SynthesizerAttention(nn.Module):
    """Dense or random Synthesizer attention: (B, L, D) -> (B, L, D).

    Args:
        d_model: model width.
        causal: attend only to the past (and the present).
        layer_idx: position in the stack (unused).
        n_heads: number of heads.
        mode: ``dense`` or ``random``.
        max_len: the longest sequence (synthetic logits have one column per position).
        factorized: ``random`` only: learn R as R1 R2^T of rank ``k``.
        k: rank of the factorised random matrix.
        dot_product: add the dot-product logits (the paper's "+V" mixtures; LRA's rows).
        dropout: attention-weight dropout in training.
        positional: ``rope`` or ``xpos`` rotate queries and keys (only with ``dot_product``).
        qkv_dim: total width of queries, keys and values over the heads (LRA's ``qkv_dim``; the
            dense mode's hidden projection too); None: ``d_model``.
    """

    # the query/key/value/output projections and the kernels each fuses, for init=lra_released
    # (architectures/lra.py)
    released_projections = {"qk": 2, "v": 1, "out": 1}

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, n_heads: int, mode: str, max_len: int,
        factorized: bool = False, k: int = 32, dot_product: bool = False, dropout: float = 0.0,
        positional: str = "none", qkv_dim: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.mixer.mode must be one of {MODES}, got {mode!r}")
        if factorized and mode != "random":
            raise ValueError("model.mixer.factorized=true is the factorised *random* synthesizer; "
                             f"with mode={mode!r} set factorized=false")
        width = attention_width(d_model, qkv_dim, n_heads)
        refuse_score_bias(positional, "synthesizer", allowed=("rope", "xpos") if dot_product else ())
        rotary, _ = attention_positions(positional, head_dim=width // n_heads, n_heads=n_heads, causal=causal)
        self.causal, self.n_heads, self.mode, self.max_len = causal, n_heads, mode, max_len
        self.factorized, self.dot_product, self.dropout = factorized, dot_product, dropout
        hd, self.qkv_dim = width // n_heads, width
        self.v = nn.Linear(d_model, width)
        self.out = nn.Linear(width, d_model)
        if dot_product:
            self.qk = nn.Linear(d_model, 2 * width)
        self.rotary = rotary
        if mode == "dense":
            # per head: hd -> hd -> max_len, applied to the token's head slice of a qkv_dim projection
            self.dense_in = nn.Linear(d_model, width)
            self.dense_out = nn.Parameter(torch.randn(n_heads, hd, max_len) / math.sqrt(hd))
            self.dense_bias = nn.Parameter(torch.zeros(n_heads, max_len))
        elif factorized:
            self.random1 = nn.Parameter(torch.randn(n_heads, max_len, k) / math.sqrt(k))
            self.random2 = nn.Parameter(torch.randn(n_heads, max_len, k) / math.sqrt(k))
        else:
            self.random = nn.Parameter(torch.randn(n_heads, max_len, max_len) / math.sqrt(max_len))

    @torch.no_grad()
    def lra_released_init_(self) -> None:
        """LRA's released synthetic logits (synthesizer_attention.py): ``self.param('random',
        (heads, max_length, max_length), kernel_init)`` with the block's xavier_uniform, whose
        fans over a 3-d shape count the leading axis as receptive field: fan_in = max_len x heads,
        fan_out = max_len x heads (factorised: (heads, max_len, k) and (heads, k, max_len))."""
        H, L = self.n_heads, self.max_len
        if self.mode == "random" and not self.factorized:
            bound = math.sqrt(6 / (2 * L * H))
            self.random.uniform_(-bound, bound)
        elif self.factorized:
            k = self.random1.shape[-1]
            bound = math.sqrt(6 / (L * H + k * H))  # both factors: fans L x H and k x H
            self.random1.uniform_(-bound, bound)
            self.random2.uniform_(-bound, bound)

    def synthetic_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The synthetic logits for x (B, L, D): (B, H, L, L) for dense, (1, H, L, L) for random."""
        B, L, D = x.shape
        if self.mode == "dense":
            h = F.relu(self.dense_in(x)).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, H, L, hd)
            out, bias = self.dense_out[:, :, :L], self.dense_bias[:, None, :L]  # (H, hd, L), (H, 1, L)
            return torch.einsum("bhid,hdj->bhij", h, out) + bias  # (B, H, L, L)
        if self.factorized:
            return (self.random1[:, :L] @ self.random2[:, :L].transpose(-2, -1))[None]  # (1, H, L, L)
        return self.random[None, :, :L, :L]  # (1, H, L, L)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        if L > self.max_len:
            raise ValueError(f"synthesizer was built for model.mixer.max_len={self.max_len} positions but got a "
                             f"sequence of {L}; set model.mixer.max_len to the longest input")
        logits = self.synthetic_logits(x)
        if self.dot_product:
            q, k = self.qk(x).view(B, L, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, hd) each
            if self.rotary is not None:
                q, k = self.rotary(q, k)
            logits = logits + q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        v = self.v(x).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, H, L, hd)
        allowed = padding_and_causal_mask(mask, L, self.causal, x.device)
        y = synthetic_attention(logits, v, allowed, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, self.qkv_dim))
