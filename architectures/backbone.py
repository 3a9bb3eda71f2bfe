"""The shared backbone: embedding, positions, residual blocks of mixer + feed-forward (pre-norm,
or post-norm), final norm and the task head.

Architectures plug in only their sequence mixer, built as
``mixer(d_model, causal=..., layer_idx=i)`` from a Hydra ``_partial_`` config, with the
contract ``forward(x (B, L, D), mask (B, L) bool or None) -> (B, L, D)``; ``mask`` is True at
real tokens. A mixer class may also declare ``init_model(model, *, n_layers, d_ff)``, called once
the whole model is built (heads tied): the model-level init of its official code. The model maps a task batch (see :mod:`tasks.base`) to logits:

=========  =====================
kind       logits
=========  =====================
classify   (B, n_outputs)
pair       (B, n_outputs)
lm         (B, L, n_outputs)
seq2seq    (B, Lt, n_outputs)
=========  =====================

``seq2seq`` runs as a prefix language model on ``source + [sep] + target[:-1]``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from architectures.layers import (
    SCORE_POSITIONALS,
    ClassifierHead,
    FeedForward,
    PairHead,
    TiedDropout,
    UnsupportedTask,
    ValueEncoder,
    make_norm,
    pool,
    prefix_lm_layout,
    sinusoidal_positions,
)
from architectures.lra import HEADS, INITS, LRADenseHead, LRADualHead, head_width, lra_released_init
from architectures.reversible import reversible_stack
from tasks.base import TaskSpec

# none / sinusoidal / learned act on the embedding; the SCORE_POSITIONALS (rope, alibi, t5, xpos)
# act inside attention and are handed to the mixer as ``positional=<name>``
POSITIONALS = ("none", "sinusoidal", "learned", *SCORE_POSITIONALS)
ENCODERS = ("embedding", "linear")  # a vector per token id; the id read as a value (S4's pixel encoder)
POOLINGS = ("mean", "cls", "last", "cls_token", "mean_all")  # cls: the first token; cls_token: a prepended
# learned one; mean_all: every position, padding included (LRA's jnp.mean on fixed-length inputs)
EMBEDDING_POSITIONALS = ("none", "sinusoidal", "learned")


def run_block(block: nn.Module, *args, checkpointed: bool) -> torch.Tensor:
    """``block(*args)``; with ``checkpointed`` (``trainer.activation_checkpointing``) and gradients
    on, its activations are dropped after the forward and recomputed in the backward pass
    (non-reentrant ``torch.utils.checkpoint``, which restores the RNG state: dropout repeats)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class Block(nn.Module):
    """Residual block of mixer and feed-forward. Pre-norm (the default): x + mixer(norm(x)), then
    x + ffn(norm(x)). Post-norm (``prenorm=False``, the original Transformer's and some of the S4
    repository's LRA configs): norm(x + mixer(x)), then norm(x + ffn(x))."""

    def __init__(self, d_model: int, mixer: nn.Module, *, d_ff: int, dropout: float, norm: str,
                 ffn_activation: str = "gelu", prenorm: bool = True, tie_dropout: bool = False):
        super().__init__()
        self.prenorm = prenorm
        self.norm1 = make_norm(norm, d_model)
        self.mixer = mixer
        # a block without feed-forward (d_ff=0, e.g. Mamba) has no second norm either, so that
        # every parameter gets a gradient (DDP requires it)
        self.norm2 = make_norm(norm, d_model) if d_ff > 0 else None
        self.ffn = FeedForward(d_model, d_ff=d_ff, dropout=dropout, activation=ffn_activation) if d_ff > 0 else None
        self.dropout = TiedDropout(dropout) if tie_dropout else nn.Dropout(dropout)  # on each branch's output

    def f(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The pre-norm mixer branch (F of a reversible block)."""
        return self.dropout(self.mixer(self.norm1(x), mask))

    def g(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-norm feed-forward branch (G of a reversible block)."""
        return self.dropout(self.ffn(self.norm2(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not self.prenorm:
            x = self.norm1(x + self.dropout(self.mixer(x, mask)))
            return x if self.ffn is None else self.norm2(x + self.dropout(self.ffn(x)))
        x = x + self.f(x, mask)
        if self.ffn is not None:
            x = x + self.g(x)
        return x


def input_length(spec: TaskSpec) -> int:
    """The longest sequence the backbone will see for this task."""
    if spec.kind == "seq2seq":
        return spec.seq_len + spec.target_len
    return max((spec.seq_len, *spec.eval_seq_lens))


class SequenceModel(nn.Module):
    """A stack of mixer blocks on the shared backbone, with the head for ``spec.kind``.

    Args:
        spec: the task's :class:`tasks.base.TaskSpec`.
        mixer: a callable ``mixer(d_model, causal=..., layer_idx=...) -> nn.Module``.
        d_model: width of the residual stream.
        n_layers: number of blocks.
        d_ff: feed-forward width; 0 removes the feed-forward (e.g. for Mamba blocks).
        dropout: dropout on residual branches and embeddings.
        norm: ``layernorm``, ``rmsnorm`` or ``batchnorm`` (over batch and length, as the S4
            repository's ``norm: batch``: :class:`architectures.layers.ChannelBatchNorm`).
        prenorm: pre-norm blocks and a final norm (the default), or post-norm blocks and no
            final norm (``False``; the S4 repository's ``prenorm: false``, :class:`Block`).
        positional: ``none``, ``sinusoidal`` or ``learned`` on the embedding; ``rope``, ``alibi``,
            ``t5`` or ``xpos`` inside attention (passed to the mixer, which must take a
            ``positional`` argument: softmax attention does, kernelised and recurrent mixers not).
        pooling: ``mean``, ``cls`` (the first token) or ``last`` for ``classify`` and ``pair``;
            ``cls_token``: a learned vector (zeros at init) prepended to the embedded tokens before
            the positions are added, and pooled from the top (LRA's ``classifier_pool='CLS'``); or
            ``mean_all``: the mean over every position, padding included (LRA's ``jnp.mean(encoded,
            axis=1)``; the same for an example whatever its batch, since LRA's tasks pad to a
            fixed length).
        tie_embeddings: share the input embedding with the ``lm`` output layer when sizes match.
        reversible: reversible residual blocks (:mod:`architectures.reversible`) that recompute
            their activations in the backward pass instead of keeping them.
        init: ``default`` (PyTorch's initialisers) or ``lra_released``: LRA's released init
            (:func:`architectures.lra.lra_released_init`: N(0, 1) embeddings, xavier-uniform
            kernels, bias-free attention projections), before a mixer's own ``init_model``.
        head: ``default`` (classify: hidden width d_model; pair: [u, v, u * v, u - v]),
            ``lra_released``: LRA's released heads (hidden width d_ff; pair: [u, v] through two
            hidden layers, :class:`architectures.lra.LRADualHead`), or ``lra_dense`` (classify
            only): the released Sinkhorn encoder's one Dense, :class:`architectures.lra.LRADenseHead`.
        ffn_activation: ``gelu`` (exact), ``gelu_tanh`` (the approximation flax's gelu computes,
            LRA's released models) or ``relu``.

    ``activation_checkpointing`` (set by the trainer from ``trainer.activation_checkpointing``,
    harness.compile) recomputes each block in the backward pass instead (:func:`run_block`).
    """

    activation_checkpointing = False

    def __init__(
        self,
        *,
        spec: TaskSpec,
        mixer: Callable[..., nn.Module],
        d_model: int,
        n_layers: int,
        d_ff: int,
        dropout: float = 0.0,
        norm: str = "layernorm",
        prenorm: bool = True,
        positional: str = "sinusoidal",
        pooling: str = "mean",
        tie_embeddings: bool = False,
        reversible: bool = False,
        init: str = "default",
        head: str = "default",
        ffn_activation: str = "gelu",
        encoder: str = "embedding",
        input_mean: float = 0.0,
        input_std: float = 1.0,
        tie_dropout: bool = False,
        input_dropout: float | None = None,
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"model.encoder must be one of {ENCODERS}, got {encoder!r}")
        if encoder == "linear" and spec.kind not in ("classify", "pair"):
            raise ValueError(f"model.encoder=linear reads token ids as values (pixels) for classify and pair tasks; "
                             f"this task is {spec.kind}: use model.encoder=embedding")
        if init not in INITS:
            raise ValueError(f"model.init must be one of {INITS}, got {init!r}")
        if head not in HEADS:
            raise ValueError(f"model.head must be one of {HEADS}, got {head!r}")
        if head == "lra_dense" and spec.kind != "classify":
            raise ValueError(f"model.head=lra_dense is the one-Dense classifier of LRA's released Sinkhorn encoder, "
                             f"for classify tasks; this task is {spec.kind}: use default or lra_released")
        if positional not in POSITIONALS:
            raise ValueError(f"model.positional must be one of {POSITIONALS}, got {positional!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}")
        if spec.kind == "seq2seq" and spec.sep_id is None:
            raise UnsupportedTask("a decoder-only model needs the task's sep_id for seq2seq")
        if reversible and not prenorm:
            raise ValueError("model.reversible=true needs pre-norm blocks (its F and G are the pre-norm "
                             "branches): set model.prenorm=true or model.reversible=false")
        if reversible and d_ff <= 0:
            raise ValueError("model.reversible=true pairs each block's mixer (F) with its feed-forward (G); "
                             f"model.d_ff={d_ff} leaves G empty: set model.d_ff > 0 or model.reversible=false")
        self.spec = spec
        self.reversible = reversible
        self.pooling = pooling
        self.positional = positional
        self.embed = nn.Embedding(spec.vocab_size, d_model) if encoder == "embedding" else \
            ValueEncoder(d_model, mean=input_mean, std=input_std)
        # LRA's CLS token: zeros at init (lra_benchmarks/models/transformer/transformer.py)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) \
            if pooling == "cls_token" and spec.kind in ("classify", "pair") else None
        self.max_len = input_length(spec) + (self.cls is not None)
        if positional == "learned":
            self.pos_embed = nn.Embedding(self.max_len, d_model)
        self.dropout = nn.Dropout(dropout if input_dropout is None else input_dropout)
        extra = {}
        if positional in SCORE_POSITIONALS:
            check_takes_positional(mixer, positional)
            extra = {"positional": positional}
        extra.update(input_length_kwargs(mixer, self.max_len))
        # position 0 is the pooled CLS position: prepended (cls_token) or the first token (cls)
        pools_first = pooling in ("cls", "cls_token") and spec.kind in ("classify", "pair")
        extra.update(cls_token_kwargs(mixer, pools_first))
        self.blocks = nn.ModuleList(
            Block(d_model, build_mixer(mixer, d_model, causal=spec.causal, layer_idx=i, **extra),
                  d_ff=d_ff, dropout=dropout, norm=norm, ffn_activation=ffn_activation, prenorm=prenorm,
                  tie_dropout=tie_dropout)
            for i in range(n_layers)
        )
        # post-norm blocks end normalised; the S4 repository adds a final norm only after pre-norm ones
        self.norm = make_norm(norm, d_model) if prenorm else nn.Identity()
        if spec.kind == "classify" and head == "lra_dense":
            self.head = LRADenseHead(d_model, spec.n_outputs)
        elif spec.kind == "classify":
            self.head = ClassifierHead(d_model, spec.n_outputs,
                                       d_hidden=head_width(d_model, d_ff) if head == "lra_released" else None)
        elif spec.kind == "pair" and head == "lra_released":
            self.head = LRADualHead(d_model, spec.n_outputs, d_hidden=head_width(d_model, d_ff))
        elif spec.kind == "pair":
            self.head = PairHead(d_model, spec.n_outputs)
        else:
            self.head = nn.Linear(d_model, spec.n_outputs, bias=False)
            if tie_embeddings and spec.n_outputs == spec.vocab_size:
                self.head.weight = self.embed.weight
        # a mixer family may re-initialise the whole model as its official code does (after tying,
        # as there): ``MixerClass.init_model(model, n_layers=..., d_ff=...)``, e.g. Mamba's _init_weights
        # modules with state to update once per training call (not per block recomputation)
        self.per_call_modules = [m for m in self.modules() if hasattr(m, "before_training_forward")]
        if init == "lra_released":
            lra_released_init(self)
        init_model = getattr(getattr(mixer, "func", mixer), "init_model", None)
        if init_model is not None:
            init_model(self, n_layers=n_layers, d_ff=d_ff)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Tokens (B, L) -> final hidden states (B, L, D), or (B, 1 + L, D) with a CLS token
        first (``mask`` then covers it too: :meth:`padding_mask`)."""
        x = self.embed(tokens)  # (B, L, D)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)  # (B, 1 + L, D)
        L = x.shape[1]
        if self.positional == "sinusoidal":
            x = x + sinusoidal_positions(L, x.shape[-1]).to(x)
        elif self.positional == "learned":
            if L > self.max_len:
                raise ValueError(f"learned positions cover {self.max_len} tokens, got a sequence of {L}")
            x = x + self.pos_embed.weight[:L]
        x = self.dropout(x)
        if self.reversible:
            return self.norm(reversible_stack(self.blocks, x, mask))
        for block in self.blocks:
            x = run_block(block, x, mask, checkpointed=self.activation_checkpointing)
        return self.norm(x)

    def padding_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        # lm batches are never padded (tasks.base), and their pad id may be a real token there
        if self.spec.kind == "lm":
            return None
        mask = tokens != self.spec.pad_id
        if self.cls is not None:  # the CLS token is real (LRA copies the first token's mask, always real)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)  # (B, 1 + L)
        # no mask at all when nothing is padded (images, Pathfinder): lets SDPA use its fused kernels
        return None if bool(mask.all()) else mask

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.training:  # once per model call, e.g. Performer's feature redraw
            for module in self.per_call_modules:
                module.before_training_forward()
        kind = self.spec.kind
        if kind == "seq2seq":
            tokens, target_pos = prefix_lm_layout(
                batch["source"], batch["target"], pad_id=self.spec.pad_id, sep_id=self.spec.sep_id
            )
            h = self.encode(tokens, tokens != self.spec.pad_id)  # (B, Ls + Lt, D)
            h = h.gather(1, target_pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, Lt, D)
            return self.head(h)
        tokens = batch["tokens"]
        mask = self.padding_mask(tokens)
        h = self.encode(tokens, mask)
        if kind == "lm":
            return self.head(h)  # (B, L, V)
        pooling = "cls" if self.cls is not None else self.pooling  # the CLS token is first
        pooled = pool(h, mask, pooling)
        if kind == "classify":
            return self.head(pooled)
        tokens2 = batch["tokens2"]
        mask2 = self.padding_mask(tokens2)
        pooled2 = pool(self.encode(tokens2, mask2), mask2, pooling)
        return self.head(pooled, pooled2)


def input_length_kwargs(mixer: Callable[..., nn.Module], max_len: int) -> dict:
    """``{"max_len": <longest input>}`` for a mixer whose yaml leaves ``max_len: null``: one with
    a parameter per position (the Synthesizer's), sized by what only the backbone knows (seq2seq
    packs source and target; lm tasks may be evaluated longer)."""
    keywords = getattr(mixer, "keywords", {})
    return {"max_len": max_len} if "max_len" in keywords and keywords["max_len"] is None else {}


def cls_token_kwargs(mixer: Callable[..., nn.Module], pools_first: bool) -> dict:
    """``{"cls_token": <position 0 is pooled>}`` for a mixer whose constructor takes ``cls_token``:
    whether the backbone pools position 0, a prepended CLS token (``pooling=cls_token``) or the
    first token (``cls``), on a classify or pair task, which only it knows; LRA's released Sparse
    Transformer pattern treats that position apart (its ``use_cls_token``)."""
    try:
        params = inspect.signature(mixer).parameters
    except (TypeError, ValueError):  # a callable without a signature takes no such keyword
        return {}
    return {"cls_token": pools_first} if "cls_token" in params else {}


def check_takes_positional(mixer: Callable[..., nn.Module], positional: str) -> None:
    """Refuse, before building anything, a score-level position for a mixer without scores."""
    try:
        params = inspect.signature(mixer).parameters
    except (TypeError, ValueError):  # a callable without a signature: let the mixer decide
        return
    if "positional" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    name = getattr(getattr(mixer, "func", mixer), "__name__", repr(mixer))
    raise ValueError(
        f"model.positional={positional} acts on attention scores, and the mixer {name} has none "
        f"(kernelised, projected or recurrent); use model.positional=one of {EMBEDDING_POSITIONALS} "
        f"for this model, or one of {SCORE_POSITIONALS} with a softmax-attention model (transformer, "
        "local, longformer, bigbird, sparse_transformer)"
    )


def build_mixer(mixer: Callable[..., nn.Module], d_model: int, **kwargs) -> nn.Module:
    """Call the mixer factory, turning a wrong hyper-parameter into an error naming the config."""
    try:
        return mixer(d_model, **kwargs)
    except TypeError as e:
        raise TypeError(f"model.mixer could not be built with {sorted(kwargs)}: {e}") from e
