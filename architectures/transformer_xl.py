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
  of the distance and u, v learned per-head biases (the paper's terms (a)+(c) and (b)+(d)),
  one pair shared by all layers as in the reference (``untie_r: true`` gives each layer its own).
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
  ``model(batch, mems=model.last_mems)`` on consecutive chunks of one stream. ``stream=True``
  does that inside the model, call after call (the trainer then feeds each batch row the next
  window of its own stream: the paper's training and evaluation).
* ``classify`` / ``pair``: the sequence is read the same way, causally within
  ``[memory; segment]`` as in the paper (a bidirectional segment would not be Transformer-XL
  any more), and the final hidden states are pooled over real tokens (``mean``/``cls``/
  ``last``). Padding is on the right and attention is causal, so real tokens never see pads;
  trailing all-pad columns of a batch are dropped before reading. ``cls`` pools token 0,
  which under causal attention has seen only itself; prefer ``last`` or ``mean``.
* ``seq2seq``: a prefix LM on ``source + [sep] + target[:-1]`` (:func:`prefix_lm_layout`).

Training and evaluation lengths: as the reference's ``reset_length`` around ``evaluate``, eval mode
(``model.eval()``) reads with ``eval_seg_len``, ``eval_mem_len``, ``eval_clamp_len`` and
``eval_same_length`` (kimiyoung/transformer-xl ``pytorch/run_enwik8_base.sh eval``: tgt_len 80,
mem_len 2100, clamp_len 820, same_length), training mode with the training ones.

The reference's model, option by option (kimiyoung/transformer-xl ``pytorch/mem_transformer.py``
and ``pytorch/train.py``; the defaults are ours, which share the backbone's pieces):

* ``prenorm``: true (ours) normalises each sublayer's input, ``x + attn(norm([mem; x]))``, and the
  final hidden states; false is the reference's default (``pre_lnorm`` False): post-norm,
  ``norm(x + attn([mem; x]))`` then ``norm(x + ffn(x))`` (mem_transformer.py:221-226, 288-289,
  62-65), and no final norm (its ``_forward`` has none). Either way the memory of a layer is the
  (detached) input of that layer (``hids``, mem_transformer.py:673-678, 619-640).
* ``ffn_activation``: the shared ``FeedForward``'s gelu, or its relu, the reference's
  ``PositionwiseFF`` (Linear, ReLU, Dropout, Linear, Dropout; mem_transformer.py:42-47).
* ``embed_scale``: multiply the embedding by sqrt(d_model) (``AdaptiveEmbedding.emb_scale``,
  mem_transformer.py:445, 491; enwik8 has no cutoffs, div_val 1).
* ``init``: default (PyTorch's initialisers, u and v N(0, 0.02)) or txl_reference (train.py
  ``weights_init`` with init normal, init_std 0.02: Linear weights and embeddings N(0, 0.02),
  biases 0, norm weights N(1, 0.02), u and v N(0, 0.02); train.py:210-256).
* ``head``: default (an untied bias-free Linear) or txl_reference: the softmax weight tied to the
  embedding, with a bias (``ProjectedAdaptiveLogSoftmax`` without cutoffs, ``tie_weight`` True;
  mem_transformer.py:562-567, proj_adaptive_softmax.py:45, 84).
* ``distance_dropout``, ``output_dropout``: the reference's two dropout sites besides the embedding
  and the residual branches: on the distance embeddings (mem_transformer.py:671, one mask per call,
  shared by all layers) and on the last layer's output (:731).

``init: txl_reference`` also removes the attention's output bias (the reference's ``o_net`` has
none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

INITS = ("default", "txl_reference")
HEADS = ("default", "txl_reference")
INIT_STD = 0.02  # the reference's init_std (train.py --init_std)


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


def window_mask(L: int, seg_len: int, mem_len: int, same_length: bool = False, device=None) -> torch.Tensor:
    """(L, L) bool: True where query t may attend key p under segment recurrence.

    The plain full-length description of what the segment loop computes: key p is visible
    from query t in segment ``s = t // seg_len`` iff ``s * seg_len - mem_len <= p <= t``; with
    ``same_length`` (and ``mem_len > 0``) also ``t - p < mem_len``: every query sees the same
    number of keys, its last ``mem_len`` positions, wherever it sits in its segment.
    """
    t = torch.arange(L, device=device)[:, None]
    p = torch.arange(L, device=device)[None, :]
    first = (t // seg_len) * seg_len - mem_len
    allowed = (p <= t) & (p >= first)
    if same_length and mem_len > 0:
        allowed = allowed & (t - p < mem_len)
    return allowed


def segment_mask(
    n_segments: int, seg_len: int, mem_len: int, mem_given: int, same_length: bool = False, device=None
) -> torch.Tensor:
    """(n, S, W + S) bool: which of [W memory slots; S segment tokens] each query of each segment sees.

    Memory slot j of segment s holds position ``s * seg_len - mem_len + j`` (counted from this
    call's first token); it exists if that is not before the ``mem_given`` positions of memory
    handed in from a previous call. Within the segment, attention is causal. ``same_length``
    (the reference's flag, with ``mem_len > 0``) keeps only keys at distance < W: query i sits at
    context index W + i, so context index c is kept iff ``W + i - c < W``, i.e. ``c > i``.
    """
    S, W = seg_len, mem_len
    slot = torch.arange(n_segments, device=device)[:, None] * S - W + torch.arange(W, device=device)  # (n, W)
    memory_ok = (slot >= -mem_given)[:, None, :].expand(n_segments, S, W)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril().expand(n_segments, S, S)
    allowed = torch.cat([memory_ok, causal], dim=-1)  # (n, S, W + S)
    if same_length and W > 0:
        i = torch.arange(S, device=device)[:, None]  # (S, 1)
        c = torch.arange(W + S, device=device)[None, :]  # (1, W + S)
        allowed = allowed & (c > i)
    return allowed


class RelativeAttention(nn.Module):
    """Multi-head attention over ``[memory; segment]`` with relative positions (Dai et al. §3.3).

    Args:
        d_model: model width.
        n_heads: number of heads; ``d_model`` must divide evenly.
        dropout: attention-weight dropout in training (the reference's ``dropatt``).

    ``u`` and ``v`` are this layer's own; :class:`TransformerXL` replaces them with one pair shared
    by every layer unless ``untie_r`` (the reference's ``r_w_bias``, ``r_r_bias``).
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


class ScaledEmbedding(nn.Embedding):
    """An embedding times a constant: the reference's ``AdaptiveEmbedding`` without cutoffs scales
    by sqrt(d_model) (its ``emb_scale``). The weight stays unscaled, so a tied softmax reads it
    as the reference's does."""

    def __init__(self, vocab_size: int, d_model: int, *, scale: float):
        super().__init__(vocab_size, d_model)
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * self.scale


class XLBlock(nn.Module):
    """One layer over all segments at once.

    Pre-norm (``prenorm``, ours): x + attn(norm([mem; x])), then x + ffn(norm(x)). Post-norm (the
    reference's default): norm(x + attn([mem; x])), then norm(x + ffn(x)). Within one call every
    segment's memory is the block input at the ``mem_len`` positions before it, which is all known
    once the layer below is done: so the segments of a layer run in parallel, and the result equals
    the paper's segment-by-segment loop (tested).
    """

    def __init__(
        self, d_model: int, *, n_heads: int, d_ff: int, dropout: float, norm: str, seg_len: int, mem_len: int,
        dropatt: float = 0.0, prenorm: bool = True, ffn_activation: str = "gelu",
    ):
        super().__init__()
        self.seg_len = seg_len  # the model sets both for training or evaluation (TransformerXL.train)
        self.mem_len = mem_len
        self.prenorm = prenorm
        self.norm1 = make_norm(norm, d_model)
        self.attn = RelativeAttention(d_model, n_heads=n_heads, dropout=dropatt)
        self.norm2 = make_norm(norm, d_model)
        self.ffn = FeedForward(d_model, d_ff=d_ff, dropout=dropout, activation=ffn_activation)
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
        # what attention reads: the normed input (pre-norm) or the input itself (post-norm)
        norm_in = self.norm1 if self.prenorm else nn.Identity()
        h = norm_in(x).reshape(B * n, S, D)  # (B*n, S, D): one row per segment
        context = h
        if W > 0:
            # stop-gradient: memory is the detached block input; W zero rows in front stand for
            # the positions before the start (masked), so segment s's memory starts at row M0 + s*S
            past = x.detach() if mem is None else torch.cat([mem, x.detach()], dim=1)  # (B, M0 + L, D)
            M0 = past.shape[1] - L
            past = F.pad(past, (0, 0, W, 0))  # (B, W + M0 + L, D)
            windows = past[:, M0 : M0 + (n - 1) * S + W].unfold(1, W, S)  # (B, n, D, W)
            windows = windows.transpose(2, 3).reshape(B * n, W, D)  # (B*n, W, D)
            context = torch.cat([norm_in(windows), h], dim=1)  # (B*n, W + S, D)
        if older is not None:
            context = torch.cat([norm_in(older), context], dim=1)  # (B*n, P + W + S, D)
        y = self.attn(h, context, allowed, distances).view(B, L, D)
        if self.prenorm:
            x = x + self.dropout(y)
            return x + self.dropout(self.ffn(self.norm2(x)))
        # the reference's pre_lnorm False: LayerNorm after each residual add (mem_transformer.py:289, 65)
        x = self.norm1(x + self.dropout(y))
        return self.norm2(x + self.dropout(self.ffn(x)))


@dataclass(frozen=True)
class Lengths:
    """The lengths a Transformer-XL reads with (the reference's ``reset_length`` plus its masks).

    ``seg_len`` (the reference's ``tgt_len``), ``mem_len``, ``clamp_len`` (distances beyond it use
    the embedding of ``clamp_len``; <= 0: no clamp) and ``same_length`` (every query sees its last
    ``mem_len`` positions; see :func:`segment_mask`).
    """

    seg_len: int
    mem_len: int
    clamp_len: int
    same_length: bool


class TransformerXL(nn.Module):
    """Transformer-XL with its own segment-recurrent backbone and the shared task heads.

    Args:
        spec: the task's :class:`tasks.base.TaskSpec`.
        d_model: width of the residual stream.
        n_layers: number of blocks.
        n_heads: attention heads per block.
        d_ff: feed-forward width.
        dropout: dropout on embeddings and residual branches (the reference's ``dropout``).
        dropatt: dropout on the attention weights (the reference's ``dropatt``; 0.0 in its
            enwik8/text8 scripts and the default of its ``train.py``).
        untie_r: one pair of biases u, v per layer; False (the reference) shares one pair across
            all layers (``r_w_bias``, ``r_r_bias`` of ``MemTransformerLM``).
        seg_len: tokens per segment (the paper's ``tgt_len``).
        mem_len: cached positions per layer; 0 turns recurrence off.
        clamp_len: distances beyond it share the embedding of ``clamp_len``; <= 0 never clamps.
        same_length: every query attends to the same number of keys, its last ``mem_len``.
        eval_seg_len, eval_mem_len, eval_clamp_len, eval_same_length: the same, in eval mode
            (``model.eval()``); None keeps the training value. They apply only to a model with
            memory: ``mem_len = 0`` (the ablation) evaluates with its training lengths.
        stream: ``lm`` only: carry the memory from one call to the next (detached), one memory for
            training and one for evaluation, the latter emptied at every switch to eval mode: the
            paper's training over consecutive segments of ``batch_size`` streams. The caller must
            feed consecutive batches (the trainer's stream order, :meth:`tasks.char_lm.CharLM.stream_indices`).
        pooling: ``mean``, ``cls`` or ``last`` for ``classify`` and ``pair``.
        norm: ``layernorm`` or ``rmsnorm``.
        prenorm: pre-norm blocks and a final norm (ours); False: the reference's post-norm blocks,
            no final norm.
        ffn_activation: ``gelu`` (the shared feed-forward), ``gelu_tanh``, or ``relu`` (the reference's).
        embed_scale: multiply the embedding by sqrt(d_model), as the reference.
        init: ``default`` or ``txl_reference`` (:func:`txl_reference_init`).
        head: ``default`` or ``txl_reference``: ``lm``/``seq2seq`` logits through the embedding
            weight (tied) plus a bias, the reference's softmax.
        distance_dropout: apply ``dropout`` to the distance embeddings too (the reference).
        output_dropout: apply ``dropout`` to the final hidden states too (the reference).

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
        dropatt: float = 0.0,
        untie_r: bool = False,
        seg_len: int,
        mem_len: int,
        clamp_len: int = -1,
        same_length: bool = False,
        eval_seg_len: int | None = None,
        eval_mem_len: int | None = None,
        eval_clamp_len: int | None = None,
        eval_same_length: bool | None = None,
        stream: bool = False,
        pooling: str = "mean",
        norm: str = "layernorm",
        prenorm: bool = True,
        ffn_activation: str = "gelu",
        embed_scale: bool = False,
        init: str = "default",
        head: str = "default",
        distance_dropout: bool = False,
        output_dropout: bool = False,
    ):
        super().__init__()
        for key, value in (("seg_len", seg_len), ("eval_seg_len", eval_seg_len)):
            if value is not None and value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        for key, value in (("mem_len", mem_len), ("eval_mem_len", eval_mem_len)):
            if value is not None and value < 0:
                raise ValueError(f"model.{key} must be >= 0 (0 turns recurrence off), got {value}")
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"model.pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        if init not in INITS:
            raise ValueError(f"model.init must be one of {INITS} for transformer_xl, got {init!r}")
        if head not in HEADS:
            raise ValueError(f"model.head must be one of {HEADS} for transformer_xl, got {head!r}")
        if head == "txl_reference" and spec.kind not in ("lm", "seq2seq"):
            raise ValueError(f"model.head=txl_reference is the reference's softmax tied to the embedding, for lm "
                             f"and seq2seq tasks; this task is {spec.kind}: use model.head=default")
        if spec.kind == "seq2seq" and spec.sep_id is None:
            raise UnsupportedTask("transformer_xl runs seq2seq as a prefix LM and needs the task's sep_id")
        self.spec = spec
        self.pooling = pooling
        self.stream = stream
        self.train_lengths = Lengths(seg_len, mem_len, clamp_len, same_length)
        # without memory (the ablation) the evaluation lengths would only shorten the context:
        # the reference's train.py keeps it (ext_len) where it lengthens mem_len for a model with memory
        self.eval_lengths = self.train_lengths if mem_len == 0 else Lengths(
            seg_len if eval_seg_len is None else eval_seg_len,
            mem_len if eval_mem_len is None else eval_mem_len,
            clamp_len if eval_clamp_len is None else eval_clamp_len,
            same_length if eval_same_length is None else eval_same_length,
        )
        if embed_scale:
            self.embed = ScaledEmbedding(spec.vocab_size, d_model, scale=math.sqrt(d_model))
        else:
            self.embed = nn.Embedding(spec.vocab_size, d_model)
        # a query sees at most mem_len + seg_len keys: one table of distances serves every segment
        longest = max(n.seg_len + n.mem_len for n in (self.train_lengths, self.eval_lengths))
        self.register_buffer("distances", sinusoidal_positions(longest, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.distance_dropout, self.output_dropout = distance_dropout, output_dropout
        self.blocks = nn.ModuleList(
            XLBlock(d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, dropatt=dropatt, norm=norm,
                    seg_len=seg_len, mem_len=mem_len, prenorm=prenorm, ffn_activation=ffn_activation)
            for _ in range(n_layers)
        )
        if not untie_r:  # the reference: one u (r_w_bias) and one v (r_r_bias) for all layers
            for block in self.blocks[1:]:
                block.attn.u = self.blocks[0].attn.u
                block.attn.v = self.blocks[0].attn.v
        # post-norm blocks end in a norm already: the reference has no final one
        self.norm = make_norm(norm, d_model) if prenorm else nn.Identity()
        if spec.kind == "classify":
            self.head = ClassifierHead(d_model, spec.n_outputs)
        elif spec.kind == "pair":
            self.head = PairHead(d_model, spec.n_outputs)
        elif head == "txl_reference":
            if spec.n_outputs != spec.vocab_size:
                raise ValueError(f"model.head=txl_reference ties the softmax to the embedding and needs as many "
                                 f"outputs as tokens; this task has {spec.n_outputs} outputs and "
                                 f"{spec.vocab_size} tokens: use model.head=default")
            self.head = nn.Linear(d_model, spec.n_outputs)
            self.head.weight = self.embed.weight  # tie_weight (mem_transformer.py:565-567)
        else:
            self.head = nn.Linear(d_model, spec.n_outputs, bias=False)
        self.last_mems: list[torch.Tensor] | None = None
        self.carried: dict[bool, list | None] = {True: None, False: None}  # stream memory, by self.training
        self.use_lengths(self.train_lengths)
        if init == "txl_reference":
            txl_reference_init(self)

    # -- training and evaluation lengths, carried memory ---------------------------------------
    def use_lengths(self, lengths: Lengths) -> None:
        self.seg_len, self.mem_len = lengths.seg_len, lengths.mem_len
        self.clamp_len, self.same_length = lengths.clamp_len, lengths.same_length
        for block in self.blocks:
            block.seg_len, block.mem_len = lengths.seg_len, lengths.mem_len

    def train(self, mode: bool = True):
        """Switch dropout and the lengths (training or ``eval_*``, as the reference's
        ``reset_length`` around its ``evaluate``); entering eval mode empties the evaluation memory."""
        super().train(mode)
        self.use_lengths(self.train_lengths if mode else self.eval_lengths)
        if not mode:
            self.carried[False] = None
        return self

    def reset_memory(self) -> None:
        """Forget the carried memories (stream mode): the next call starts with an empty memory."""
        self.carried = {True: None, False: None}

    def carried_memory(self, batch_size: int) -> list | None:
        """The memory the previous call of this mode left, if it was on the same batch size."""
        mems = self.carried[self.training]
        if mems is None or _batch_of(mems[0]) != batch_size:
            return None
        return mems

    def distance_table(self, K: int) -> torch.Tensor:
        """(K, D): row d embeds distance min(d, clamp_len) (the reference clamps ``pos_seq``)."""
        if self.clamp_len <= 0 or self.clamp_len >= K - 1:
            return self.distances[:K]
        return self.distances[torch.arange(K, device=self.distances.device).clamp(max=self.clamp_len)]

    # -- reading -------------------------------------------------------------------------------
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
        allowed = segment_mask(n, S, W, 0 if mems is None else mems[0].shape[1], self.same_length, device=x.device)
        distances = self.distance_table(S + W)  # (S + W, D)
        if self.distance_dropout:  # the reference drops out pos_emb once per forward, for all layers
            distances = self.dropout(distances)
        new_mems = []
        for i, block in enumerate(self.blocks):
            mem = None if mems is None else mems[i]
            if W > 0:
                entered = x[:, :L] if mem is None else torch.cat([mem, x[:, :L]], dim=1)
                new_mems.append(entered[:, -W:].detach())
            x = run_block(block, x, mem, allowed, distances, checkpointed=self.activation_checkpointing)
        h = self.norm(x[:, :L])
        if self.output_dropout:
            h = self.dropout(h)
        return h, (new_mems if W > 0 else None)

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
                (``model.last_mems``); None starts with an empty memory, or in stream mode with
                the memory the previous call of this mode left.
        """
        kind = self.spec.kind
        if kind == "lm":
            tokens = batch["tokens"]
            if mems is None and self.stream:
                mems = self.carried_memory(tokens.shape[0])
            h, self.last_mems = self.encode(tokens, mems)
            if self.stream:
                self.carried[self.training] = self.last_mems
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


def txl_reference_init(model: nn.Module, std: float = INIT_STD) -> None:
    """The reference's ``weights_init`` (train.py:210-256, init normal, init_std 0.02): Linear
    weights N(0, std) and biases 0, embeddings N(0, std), norm weights N(1, std) and biases 0, the
    biases u, v (``r_w_bias``, ``r_r_bias``) N(0, std). A tied softmax weight is the embedding's.
    The attention's output projection loses its bias (``o_net``: ``bias=False``)."""
    for module in model.modules():
        if isinstance(module, RelativeAttention):
            module.out.register_parameter("bias", None)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            nn.init.normal_(module.weight, 1.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RelativeAttention):
            nn.init.normal_(module.u, 0.0, std)
            nn.init.normal_(module.v, 0.0, std)


def _batch_of(memory) -> int:
    """Batch size of one layer's carried memory (a tensor, or the Compressive Transformer's pair)."""
    return (memory[0] if isinstance(memory, (tuple, list)) else memory).shape[0]
