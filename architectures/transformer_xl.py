"""Transformer-XL (Dai et al. 2019, arXiv 1901.02860; kimiyoung/transformer-xl).

Two ideas on top of a causal Transformer:

* **Segment-level recurrence.** The sequence is read in segments of ``seg_len`` tokens. Each
  layer caches the hidden states that *entered* it for the last ``mem_len`` positions, with
  the gradient stopped, and the next segment's queries attend over ``[memory; segment]``.
  The context therefore grows with depth (about ``n_layers * mem_len`` tokens) while the cost
  stays O(L * (seg_len + mem_len)), never L x L. ``mem_len = 0`` is the no-recurrence
  ablation: segments are processed independently.
* **Relative positional attention.** No absolute positions anywhere; the score of query i
  on key j is ``(q_i + u) . k_j + (q_i + v) . W_r R[i - j]``, with R the sinusoidal embedding
  of the distance and u, v learned per-head biases (the paper's terms (a)+(c) and (b)+(d)).
  The second term is computed for all distances at once and aligned with :func:`rel_shift`.

Which window a query sees: query t of segment s attends to keys p with
``max(0, s * seg_len - mem_len) <= p <= t``. :func:`window_mask` writes that out over the full
length; the tests recompute every layer over the full sequence with this mask and explicit
relative distances (no memory, no rel-shift) and compare.

How one call runs: within a call, segment s's memory at layer l is layer l's (detached) input
at the ``mem_len`` positions before s, all known once layer l-1 is done. So each layer runs all
its segments at once, as a batch of (seg_len queries x [mem_len + seg_len] keys) windows,
instead of the paper's loop of one segment per step: same outputs, same gradients (the tests
check both against feeding one segment per call with ``mems``), n_layers steps instead of
n_segments x n_layers. Attention goes through ``scaled_dot_product_attention`` with the
position term as an additive bias.

Task kinds (same outside contract as :class:`architectures.backbone.SequenceModel`):

* ``lm``: one call reads the whole (B, L) batch as L / seg_len segments; memory starts empty
  unless ``mems`` is given. After every ``lm`` call ``self.last_mems`` holds the detached
  memory, so contiguous streaming (char_lm, as in the paper's training and evaluation) is
  ``model(batch, mems=model.last_mems)`` on consecutive chunks of one stream.
* ``classify`` / ``pair``: the sequence is read the same way, causally within
  ``[memory; segment]`` as in the paper (a bidirectional segment would not be Transformer-XL
  any more), and the final hidden states are pooled over real tokens (``mean``/``cls``/
  ``last``). Padding is on the right and attention is causal, so real tokens never see pads;
  trailing all-pad columns of a batch are dropped before reading. ``cls`` pools token 0,
  which under causal attention has seen only itself; prefer ``last`` or ``mean``.
* ``seq2seq``: a prefix LM on ``source + [sep] + target[:-1]`` (:func:`prefix_lm_layout`).

Deviations from the reference code, all to share the backbone's pieces: pre-norm blocks (the
reference's ``pre_lnorm`` option) with ``make_norm``, the shared GELU ``FeedForward``, a plain
embedding without the sqrt(d_model) scale, and u, v initialised N(0, 0.02) like its weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.backbone import run_block
from architectures.layers import (
    ClassifierHead,
    FeedForward,
    PairHead,
    UnsupportedTask,
    make_norm,
    pool,
    prefix_lm_layout,
    sinusoidal_positions,
)
from tasks.base import TaskSpec


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Align position scores from "column j = distance K-1-j" to "column j = key j".

    ``x`` is (B, H, S, K): S queries that are the last S of K keys (so query i sits at key
    position M + i, M = K - S), scored against relative embeddings ordered by decreasing
    distance K-1, ..., 0. The result ``y[..., i, j] = x[..., i, j + S - 1 - i]``: query i's
    score for distance M + i - j. Entries with j > M + i (the future) are garbage and must be
    masked. The trick: pad one zero column, view the (S, K+1) block as (K+1, S), drop the first
    row; each row ends up shifted left by one more than the row above.
    """
    B, H, S, K = x.shape
    padded = torch.cat([x.new_zeros(B, H, S, 1), x], dim=-1)  # (B, H, S, K+1)
    padded = padded.view(B, H, K + 1, S)
    return padded[:, :, 1:].reshape(B, H, S, K)  # (B, H, S, K)


def window_mask(L: int, seg_len: int, mem_len: int, device=None) -> torch.Tensor:
    """(L, L) bool: True where query t may attend key p under segment recurrence.

    The plain full-length description of what the segment loop computes: key p is visible
    from query t in segment ``s = t // seg_len`` iff ``s * seg_len - mem_len <= p <= t``.
    """
    t = torch.arange(L, device=device)[:, None]
    p = torch.arange(L, device=device)[None, :]
    first = (t // seg_len) * seg_len - mem_len
    return (p <= t) & (p >= first)


def segment_mask(n_segments: int, seg_len: int, mem_len: int, mem_given: int, device=None) -> torch.Tensor:
    """(n, S, W + S) bool: which of [W memory slots; S segment tokens] each query of each segment sees.

    Memory slot j of segment s holds position ``s * seg_len - mem_len + j`` (counted from this
    call's first token); it exists if that is not before the ``mem_given`` positions of memory
    handed in from a previous call. Within the segment, attention is causal.
    """
    S, W = seg_len, mem_len
    slot = torch.arange(n_segments, device=device)[:, None] * S - W + torch.arange(W, device=device)  # (n, W)
    memory_ok = (slot >= -mem_given)[:, None, :].expand(n_segments, S, W)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril().expand(n_segments, S, S)
    return torch.cat([memory_ok, causal], dim=-1)  # (n, S, W + S)


class RelativeAttention(nn.Module):
    """Multi-head attention over ``[memory; segment]`` with relative positions (Dai et al. §3.3).

    Args:
        d_model: model width.
        n_heads: number of heads; ``d_model`` must divide evenly.
        dropout: attention-weight dropout in training.
    """

    def __init__(self, d_model: int, *, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} is not divisible by the head count {n_heads} "
                             "(size.n_heads for every model, model.n_heads for this one)")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.r = nn.Linear(d_model, d_model, bias=False)  # W_r: projects the distance embeddings
        self.u = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.02)  # content bias
        self.v = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.02)  # position bias
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor, distances: torch.Tensor
    ) -> torch.Tensor:
        """Attend from segments to their ``[memory; segment]`` context.

        Args:
            x: (N, S, D) the segments' queries, N = B * n (batch-major).
            context: (N, K, D) each segment's memory followed by the segment itself, so query i
                sits at context position K - S + i.
            allowed: (n, S, K) :func:`segment_mask`, the same for every batch row.
            distances: (>= K, D) the sinusoidal embedding of distance d in row d.
        """
        N, S, D = x.shape
        K = context.shape[1]
        H, hd = self.n_heads, self.head_dim
        q = self.q(x).view(N, S, H, hd).transpose(1, 2)  # (N, H, S, hd)
        k, v = self.kv(context).view(N, K, 2, H, hd).permute(2, 0, 3, 1, 4)  # 2 x (N, H, K, hd)
        # distances K-1 ... 0, the order rel_shift expects
        r = self.r(distances[:K].flip(0).to(x)).view(K, H, hd).transpose(0, 1)  # (H, K, hd)
        position = rel_shift((q + self.v[:, None].to(q.dtype)) @ r.transpose(-2, -1))  # (N, H, S, K)
        # masking also hides rel_shift's garbage above the diagonal (the future)
        n = allowed.shape[0]
        position = position.view(N // n, n, H, S, K).masked_fill(~allowed[:, None], float("-inf"))
        bias = (position.view(N, H, S, K) / math.sqrt(hd)).to(q.dtype)
        # SDPA adds the bias to the scaled content scores: ((q + u) k^T + (q + v) (W_r R)^T) / sqrt(hd)
        y = F.scaled_dot_product_attention(
            q + self.u[:, None].to(q.dtype), k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )  # (N, H, S, hd)
        return self.out(y.transpose(1, 2).reshape(N, S, D))  # (N, S, D)


class XLBlock(nn.Module):
    """Pre-norm block over all segments at once: x + attn(norm([mem; x])), then x + ffn(norm(x)).

    Within one call every segment's memory is the block input at the ``mem_len`` positions
    before it, which is all known once the layer below is done: so the segments of a layer run
    in parallel, and the result equals the paper's segment-by-segment loop (tested).
    """

    def __init__(
        self, d_model: int, *, n_heads: int, d_ff: int, dropout: float, norm: str, seg_len: int, mem_len: int
    ):
        super().__init__()
        self.seg_len = seg_len
        self.mem_len = mem_len
        self.norm1 = make_norm(norm, d_model)
        self.attn = RelativeAttention(d_model, n_heads=n_heads, dropout=dropout)
        self.norm2 = make_norm(norm, d_model)
        self.ffn = FeedForward(d_model, d_ff=d_ff, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mem: torch.Tensor | None, allowed: torch.Tensor, distances: torch.Tensor,
        older: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: x (B, L, D) the block input, L a multiple of seg_len; mem (B, M0, D) memory from a
        previous call (detached) or None; allowed (n, S, W + S) :func:`segment_mask`, or
        (n, S, P + W + S) with ``older`` (B * n, P, D): context rows before each segment's memory
        (the Compressive Transformer's compressed memory), normed and attended like memory."""
        B, L, D = x.shape
        S, W = self.seg_len, self.mem_len
        n = L // S
        h = self.norm1(x).reshape(B * n, S, D)  # (B*n, S, D): one row per segment
        context = h
        if W > 0:
            # stop-gradient: memory is the detached block input; W zero rows in front stand for
            # the positions before the start (masked), so segment s's memory starts at row M0 + s*S
            past = x.detach() if mem is None else torch.cat([mem, x.detach()], dim=1)  # (B, M0 + L, D)
            M0 = past.shape[1] - L
            past = F.pad(past, (0, 0, W, 0))  # (B, W + M0 + L, D)
            windows = past[:, M0 : M0 + (n - 1) * S + W].unfold(1, W, S)  # (B, n, D, W)
            windows = windows.transpose(2, 3).reshape(B * n, W, D)  # (B*n, W, D)
            context = torch.cat([self.norm1(windows), h], dim=1)  # (B*n, W + S, D)
        if older is not None:
            context = torch.cat([self.norm1(older), context], dim=1)  # (B*n, P + W + S, D)
        y = self.attn(h, context, allowed, distances).view(B, L, D)
        x = x + self.dropout(y)
        return x + self.dropout(self.ffn(self.norm2(x)))


class TransformerXL(nn.Module):
    """Transformer-XL with its own segment-recurrent backbone and the shared task heads.

    Args:
        spec: the task's :class:`tasks.base.TaskSpec`.
        d_model: width of the residual stream.
        n_layers: number of blocks.
        n_heads: attention heads per block.
        d_ff: feed-forward width.
        dropout: dropout on embeddings, residual branches and attention weights.
        seg_len: tokens per segment (the paper's ``tgt_len``).
        mem_len: cached positions per layer; 0 turns recurrence off.
        pooling: ``mean``, ``cls`` or ``last`` for ``classify`` and ``pair``.
        norm: ``layernorm`` or ``rmsnorm``.

    ``activation_checkpointing`` (``trainer.activation_checkpointing``) recomputes each block in
    the backward pass (architectures.backbone.run_block); memories are detached block inputs,
    the same either way.
    """

    activation_checkpointing = False

    def __init__(
        self,
        *,
        spec: TaskSpec,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        seg_len: int,
        mem_len: int,
        pooling: str = "mean",
        norm: str = "layernorm",
    ):
        super().__init__()
        if seg_len < 1:
            raise ValueError(f"model.seg_len must be >= 1, got {seg_len}")
        if mem_len < 0:
            raise ValueError(f"model.mem_len must be >= 0 (0 turns recurrence off), got {mem_len}")
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"model.pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        if spec.kind == "seq2seq" and spec.sep_id is None:
            raise UnsupportedTask("transformer_xl runs seq2seq as a prefix LM and needs the task's sep_id")
        self.spec = spec
        self.seg_len = seg_len
        self.mem_len = mem_len
        self.pooling = pooling
        self.embed = nn.Embedding(spec.vocab_size, d_model)
        # a query sees at most mem_len + seg_len keys: one table of distances serves every segment
        self.register_buffer("distances", sinusoidal_positions(seg_len + mem_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            XLBlock(d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, norm=norm, seg_len=seg_len, mem_len=mem_len)
            for _ in range(n_layers)
        )
        self.norm = make_norm(norm, d_model)
        if spec.kind == "classify":
            self.head = ClassifierHead(d_model, spec.n_outputs)
        elif spec.kind == "pair":
            self.head = PairHead(d_model, spec.n_outputs)
        else:
            self.head = nn.Linear(d_model, spec.n_outputs, bias=False)
        self.last_mems: list[torch.Tensor] | None = None

    def encode(
        self, tokens: torch.Tensor, mems: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Tokens (B, L) -> final hidden states (B, L, D), read in segments of ``seg_len``.

        Args:
            tokens: input ids.
            mems: per-layer memory (B, M0, D) to start from, e.g. a previous call's
                ``last_mems``; None starts empty.

        Returns:
            The hidden states and, per layer, the last ``mem_len`` positions that entered it
            (detached; None if ``mem_len`` is 0).
        """
        B, L = tokens.shape
        S, W = self.seg_len, self.mem_len
        if W == 0:
            mems = None
        elif mems is not None:
            M0 = mems[0].shape[1] if mems else 0
            if len(mems) != len(self.blocks) or any(m.shape[0] != B or m.shape[1] != M0 for m in mems) or M0 > W:
                raise ValueError(
                    f"mems must be a list of {len(self.blocks)} tensors of batch size {B} and at most "
                    f"model.mem_len={W} positions (a previous call's model.last_mems on the same batch "
                    f"size), got {[tuple(m.shape) for m in mems]}"
                )
        n = -(-L // S)
        x = self.dropout(self.embed(tokens))  # (B, L, D)
        # round up to whole segments; the zero tail lies in the future of every real token
        x = F.pad(x, (0, 0, 0, n * S - L))  # (B, n*S, D)
        allowed = segment_mask(n, S, W, 0 if mems is None else mems[0].shape[1], device=x.device)
        new_mems = []
        for i, block in enumerate(self.blocks):
            mem = None if mems is None else mems[i]
            if W > 0:
                entered = x[:, :L] if mem is None else torch.cat([mem, x[:, :L]], dim=1)
                new_mems.append(entered[:, -W:].detach())
            x = run_block(block, x, mem, allowed, self.distances, checkpointed=self.activation_checkpointing)
        return self.norm(x[:, :L]), (new_mems if W > 0 else None)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode a right-padded batch and pool its real tokens: (B, D)."""
        mask = tokens != self.spec.pad_id  # (B, L)
        # causal attention + right padding: the all-pad tail changes no real token, skip it
        keep = max(int(mask.sum(1).max()), 1)
        tokens, mask = tokens[:, :keep], mask[:, :keep]
        h, _ = self.encode(tokens)
        return pool(h, mask, self.pooling)

    def forward(self, batch: dict[str, torch.Tensor], mems: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Map a task batch to logits (see :mod:`architectures.backbone` for the shapes).

        Args:
            batch: the task's batch dict.
            mems: ``lm`` only: memory carried over from the previous chunk of the same streams
                (``model.last_mems``); None starts with an empty memory.
        """
        kind = self.spec.kind
        if kind == "lm":
            h, self.last_mems = self.encode(batch["tokens"], mems)
            return self.head(h)  # (B, L, V)
        if mems is not None:
            raise ValueError(f"mems can only be carried across batches for lm tasks, not {kind}")
        if kind == "seq2seq":
            tokens, target_pos = prefix_lm_layout(
                batch["source"], batch["target"], pad_id=self.spec.pad_id, sep_id=self.spec.sep_id
            )
            h, _ = self.encode(tokens)  # (B, Ls + Lt, D); causal, so trailing pads are harmless
            h = h.gather(1, target_pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, Lt, D)
            return self.head(h)
        pooled = self.pooled(batch["tokens"])
        if kind == "classify":
            return self.head(pooled)
        return self.head(pooled, self.pooled(batch["tokens2"]))
