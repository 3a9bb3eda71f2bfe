"""The LSTM family: `lstm`, `lstm_bahdanau`, `lstm_luong` and `lstm_attn_readout` (one model,
``attention`` knob).

These keep their own backbone (embedding -> torch.nn.LSTM -> task head) rather than the shared
mixer blocks, but map a task batch to logits exactly like :class:`architectures.backbone.SequenceModel`.
The encoder is always one nn.LSTM call (cuDNN / oneDNN kernels), never a Python time loop.

=========  =====================================================================================
kind       what the model is
=========  =====================================================================================
classify   BiLSTM over the real tokens (packed, so padding changes nothing), pooled to one vector
           (``pooling``: ``final`` = [forward final; backward final] state, ``mean``/``last``/
           ``cls`` as in :func:`architectures.layers.pool`, or ``attention`` = attention over
           the BiLSTM states with the final state as query, then ``tanh(W_c [context; final])``).
pair       the same encoder on both sequences, LRA's :class:`architectures.layers.PairHead`.
lm         unidirectional LSTM. With the read-out (``attention=readout``), step t also attends
           over its own states h_1..h_t (all queries at once under a causal mask) and predicts
           from ``tanh(W_c [context_t; h_t])``. :meth:`RecurrentModel.step` runs it token by token.
seq2seq    BiLSTM encoder and an LSTM decoder from :mod:`architectures.recurrent_attention`:
           RNNenc (no attention, fixed summary), RNNsearch (Bahdanau) or Luong's decoder
           (global, local-m or local-p). :meth:`RecurrentModel.generate` decodes greedily.
=========  =====================================================================================

The names mean the papers' models: ``lstm_bahdanau`` and ``lstm_luong`` are encoder-decoders and
run ``seq2seq`` tasks only (elsewhere they are recorded as ``unsupported``); the LSTM with an
attention read-out over its own states, or attention pooling, is ``lstm_attn_readout``, and it has
no decoder, so it does not run ``seq2seq``.

Attention weights of the last forward pass are kept, detached, in ``model.last_attention``:
classify (B, L); pair (B, 2, L); lm (B, L, L); seq2seq (B, Lt, Ls); None without attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from architectures.layers import ClassifierHead, PairHead, UnsupportedTask, pool
from architectures.recurrent_attention import (
    BahdanauDecoder,
    LuongDecoder,
    SummaryDecoder,
    attend,
    make_score,
)
from tasks.base import TaskSpec

ATTENTIONS = ("none", "bahdanau", "luong", "readout")
DECODER_ATTENTIONS = ("bahdanau", "luong")  # the papers' encoder-decoders: seq2seq only
POOLINGS = ("final", "attention", "mean", "last", "cls")


class RecurrentModel(nn.Module):
    """An LSTM with no attention, Bahdanau's additive attention or Luong's attention.

    Args:
        spec: the task's :class:`tasks.base.TaskSpec`.
        d_model: token embedding size.
        d_hidden: LSTM size per direction; also the attention hidden size of additive scores.
        n_layers: LSTM layers of the encoder (and of the seq2seq decoder).
        dropout: on embeddings, between LSTM layers and before the output layer.
        attention: ``none``, ``bahdanau`` (seq2seq: query = previous decoder state, additive
            score), ``luong`` (seq2seq: query = current decoder state, ``score``, input feeding)
            or ``readout`` (lm: causal attention over the LSTM's own states; classify/pair:
            attention pooling).
        score: Luong's ``dot``, ``general`` or ``concat`` with ``attention=luong``; the read-out's
            ``additive``, ``dot`` or ``general`` with ``attention=readout``.
        pooling: how ``classify``/``pair`` reduce the BiLSTM states (see the module docstring).
        alignment: Luong's ``global``, ``local-m`` or ``local-p`` attention (``attention=luong``).
        window: D, the half-width of Luong's local window.
    """

    def __init__(
        self,
        *,
        spec: TaskSpec,
        d_model: int,
        d_hidden: int,
        n_layers: int,
        dropout: float = 0.0,
        attention: str = "none",
        score: str | None = None,
        pooling: str = "final",
        alignment: str = "global",
        window: int = 10,
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"model.attention must be one of {ATTENTIONS}, got {attention!r}")
        if score is not None and attention not in ("luong", "readout"):
            raise ValueError(f"model.score={score!r} is Luong's or the read-out's; set model.attention=luong "
                             f"or readout, or model.score=null")
        if alignment != "global" and attention != "luong":
            raise ValueError(f"model.alignment={alignment!r} is Luong's local attention; set model.attention=luong")
        if attention in DECODER_ATTENTIONS and spec.kind != "seq2seq":
            raise UnsupportedTask(
                f"attention={attention} is the paper's encoder-decoder and runs seq2seq tasks only, not "
                f"{spec.kind!r}; the LSTM with an attention read-out over its own states (lm) or attention "
                f"pooling (classify, pair) is the model lstm_attn_readout"
            )
        if attention == "readout" and spec.kind == "seq2seq":
            raise UnsupportedTask("attention=readout (lstm_attn_readout) has no decoder; the seq2seq models "
                                  "are lstm (RNNenc), lstm_bahdanau (RNNsearch) and lstm_luong")
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "attention" and attention == "none":
            raise ValueError("model.pooling=attention needs model.attention=readout (the model lstm_attn_readout)")
        if spec.kind == "seq2seq" and spec.n_outputs > spec.vocab_size:
            raise UnsupportedTask(
                f"the LSTM encoder-decoder shares one embedding for source and target, but the task's "
                f"output vocabulary ({spec.n_outputs}) is larger than its input vocabulary ({spec.vocab_size})"
            )
        self.spec = spec
        self.attention = attention
        self.pooling = pooling
        self.last_attention: torch.Tensor | None = None
        self.embed = nn.Embedding(spec.vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.bidirectional = spec.kind != "lm"
        self.encoder = nn.LSTM(d_model, d_hidden, n_layers, batch_first=True,
                               dropout=dropout if n_layers > 1 else 0.0, bidirectional=self.bidirectional)
        d_enc = 2 * d_hidden if self.bidirectional else d_hidden
        kind = spec.kind
        if kind in ("classify", "pair"):
            if pooling == "attention":
                self.score = make_score(attention, score, d_enc, d_enc, d_attn=d_hidden)
                self.combine = nn.Linear(2 * d_enc, d_enc, bias=False)
            head = ClassifierHead if kind == "classify" else PairHead
            self.head = head(d_enc, spec.n_outputs, d_hidden=d_hidden)
        elif kind == "lm":
            if attention != "none":
                self.score = make_score(attention, score, d_hidden, d_hidden, d_attn=d_hidden)
                self.combine = nn.Linear(2 * d_hidden, d_hidden, bias=False)
            self.head = nn.Linear(d_hidden, spec.n_outputs)
        else:
            sizes = dict(d_model=d_model, d_hidden=d_hidden, n_layers=n_layers, n_outputs=spec.n_outputs, dropout=dropout)
            if attention == "none":
                self.decoder = SummaryDecoder(d_summary=d_enc, **sizes)
            elif attention == "bahdanau":
                self.decoder = BahdanauDecoder(d_memory=d_enc, **sizes)
            else:
                self.decoder = LuongDecoder(d_memory=d_enc, score=score, alignment=alignment, window=window, **sizes)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, L) -> LSTM states (B, L, d_enc), zero at padding, and final state (B, d_enc).

        With a mask the sequences are packed: the LSTM stops at each one's last real token, and
        the backward direction starts there, so right padding changes nothing.
        """
        x = self.dropout(self.embed(tokens))  # (B, L, D)
        if mask is None:
            states, (h_n, _) = self.encoder(x)
        else:
            lengths = mask.sum(1).clamp_min(1).cpu()  # pack needs host lengths
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            states, (h_n, _) = self.encoder(packed)
            states, _ = pad_packed_sequence(states, batch_first=True, total_length=tokens.shape[1])
        # h_n: (n_layers * directions, B, H); the top layer's directions come last
        final = torch.cat([h_n[-2], h_n[-1]], -1) if self.bidirectional else h_n[-1]
        return states, final

    def summarize(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B, L) -> pooled (B, d_enc) and attention weights (B, L) or None."""
        mask = tokens != self.spec.pad_id
        states, final = self.encode(tokens, mask)
        if self.pooling == "final":
            return final, None
        if self.pooling == "attention":
            keys = self.score.keys(states)
            context, weights = attend(self.score, final[:, None], keys, states, mask[:, None])  # (B, 1, d_enc)
            return torch.tanh(self.combine(torch.cat([context[:, 0], final], -1))), weights[:, 0]
        return pool(states, mask, self.pooling), None

    def attend_causally(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lm: queries h (B, Lq, H) that end the key sequence attend over all keys up to themselves."""
        Lq, Lk = h.shape[1], keys.shape[1]
        # query i sits at key position Lk - Lq + i and may see keys 0..that position
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=h.device).tril(Lk - Lq)[None]  # (1, Lq, Lk)
        context, weights = attend(self.score, h, keys, values, allowed)
        return torch.tanh(self.combine(torch.cat([context, h], -1))), weights  # (B, Lq, H)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kind = self.spec.kind
        if kind == "seq2seq":
            return self.forward_seq2seq(batch["source"], batch["target"])
        if kind == "lm":
            # lm batches are never padded (tasks.base), and their pad id may be a real token
            h, _ = self.encode(batch["tokens"], None)  # (B, L, H)
            if self.attention != "none":
                h, weights = self.attend_causally(h, self.score.keys(h), h)
                self.last_attention = weights.detach()
            return self.head(self.dropout(h))  # (B, L, V)
        pooled, weights = self.summarize(batch["tokens"])
        if kind == "classify":
            self.last_attention = None if weights is None else weights.detach()
            return self.head(self.dropout(pooled))  # (B, n_outputs)
        pooled2, weights2 = self.summarize(batch["tokens2"])
        self.last_attention = None if weights is None else torch.stack([weights, weights2], 1).detach()
        return self.head(self.dropout(pooled), self.dropout(pooled2))

    def step(self, token: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """lm only: one token (B,) -> logits (B, V) and the new state; ``state=None`` starts.

        The state holds the LSTM's (h, c) and, with attention, the keys and states seen so far.
        """
        if self.spec.kind != "lm":
            raise ValueError(f"step() runs causal language models; this model serves {self.spec.kind!r}")
        lstm_state, keys, values = state if state is not None else (None, None, None)
        x = self.dropout(self.embed(token))[:, None]  # (B, 1, D)
        h, lstm_state = self.encoder(x, lstm_state)  # (B, 1, H)
        if self.attention != "none":
            k = self.score.keys(h)
            keys = k if keys is None else torch.cat([keys, k], 1)  # (B, t, A)
            values = h if values is None else torch.cat([values, h], 1)  # (B, t, H)
            h, _ = self.attend_causally(h, keys, values)
        return self.head(self.dropout(h[:, 0])), (lstm_state, keys, values)

    def start_decoder(self, source: torch.Tensor) -> tuple:
        mask = source != self.spec.pad_id
        memory, final = self.encode(source, mask)  # (B, Ls, 2H), (B, 2H)
        return self.decoder.start(memory, mask, final)

    def forward_seq2seq(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the decoder reads [bos, target[:-1]]; logits[:, j] predict target[:, j]."""
        bos = torch.full_like(target[:, :1], self.spec.bos_id)
        fed = torch.cat([bos, target[:, :-1]], 1)  # (B, Lt)
        logits, _, weights = self.decoder(self.dropout(self.embed(fed)), self.start_decoder(source))
        self.last_attention = None if weights is None else weights.detach()
        return logits  # (B, Lt, V)

    @torch.no_grad()
    def generate(self, source: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding: source (B, Ls) -> (B, max_len) tokens, each the argmax given the ones before."""
        if self.spec.kind != "seq2seq":
            raise ValueError(f"generate() decodes seq2seq tasks; this model serves {self.spec.kind!r}")
        state = self.start_decoder(source)
        token = torch.full_like(source[:, 0], self.spec.bos_id)  # (B,)
        out = []
        for _ in range(max_len):
            logits, state, _ = self.decoder.step(self.dropout(self.embed(token)), state)
            token = logits.argmax(-1)
            out.append(token)
        return torch.stack(out, 1)
