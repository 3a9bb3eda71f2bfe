"""Attention scores and seq2seq decoders of the LSTM family (`lstm`, `lstm_bahdanau`, `lstm_luong`).

Scores map a query and the keys to one number per (query, key) pair:

* additive (Bahdanau et al. 2014, and Luong's ``concat``): ``v^T tanh(W q + U k)``;
* ``dot`` (Luong et al. 2015): ``q^T k``;
* ``general`` (Luong): ``q^T W k``.

Each score first projects the keys once (``score.keys(k)``), so a decoder that attends at every
step over the same encoder states pays for ``U k`` / ``W k`` once, not per step. :func:`attend`
turns scores into weights that sum to one over allowed keys and are exactly zero elsewhere.

The three decoders share one state layout, nn.LSTM's ``(h, c)`` each (n_layers, B, H), and one
interface: ``forward`` (teacher forcing over all target steps) and ``step`` (one step), which
agree. What differs is the paper:

* :class:`SummaryDecoder` (``lstm``; RNNenc of Cho et al. 2014 as Bahdanau's baseline): no
  attention; the fixed summary of the source is an extra input at every step, so teacher
  forcing runs as one cuDNN call.
* :class:`BahdanauDecoder` (RNNsearch): attends from the PREVIOUS state s_{i-1}, then
  ``s_i = LSTM([E y_{i-1}; c_i], s_{i-1})``, output from ``[s_i; c_i; E y_{i-1}]``.
* :class:`LuongDecoder`: ``h_t = LSTM([E y_{t-1}; h~_{t-1}], h_{t-1})`` (input feeding), attends
  from the CURRENT state h_t, ``h~_t = tanh(W_c [c_t; h_t])``, output from ``h~_t``; over every
  source position (``global``) or a window of 2D+1 around an aligned position p_t (``local-m``:
  p_t = t; ``local-p``: p_t predicted from h_t, weights scaled by a Gaussian around it).

The causal read-out over an LSTM's own states (``lstm_attn_readout`` on ``lm``) and attention
pooling (on ``classify``/``pair``) use the same scores (``model.attention=readout``).

The attentional decoders loop over target steps in Python (the query of step i depends on
step i-1); the encoder never does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

LUONG_SCORES = ("dot", "general", "concat")
READOUT_SCORES = ("additive", "dot", "general")
LUONG_ALIGNMENTS = ("global", "local-m", "local-p")

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (n_layers, B, H)


class AdditiveScore(nn.Module):
    """``v^T tanh(W q + U k)``: Bahdanau's alignment model and Luong's ``concat`` score.

    Luong writes ``concat`` as ``v^T tanh(W_a [q; k])``, which is this with ``W_a = [W, U]``.
    """

    def __init__(self, d_query: int, d_key: int, *, d_attn: int):
        super().__init__()
        self.W = nn.Linear(d_query, d_attn, bias=False)
        self.U = nn.Linear(d_key, d_attn)
        self.v = nn.Linear(d_attn, 1, bias=False)

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        return self.U(k)  # (B, Lk, A)

    def forward(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q (B, Lq, dq), projected keys (B, Lk, A) -> scores (B, Lq, Lk)."""
        # (B, Lq, 1, A) + (B, 1, Lk, A): memory grows as Lq * Lk * A, the price of the tanh
        return self.v(torch.tanh(self.W(q)[:, :, None] + keys[:, None])).squeeze(-1)


class BilinearScore(nn.Module):
    """Luong's ``dot`` (``q^T k``) and ``general`` (``q^T W k``) scores, unscaled as in the paper."""

    def __init__(self, d_query: int, d_key: int, *, general: bool):
        super().__init__()
        if not general and d_query != d_key:
            raise ValueError(f"model.score=dot needs equal query and key sizes, got {d_query} and {d_key}")
        self.W = nn.Linear(d_key, d_query, bias=False) if general else None

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        return k if self.W is None else self.W(k)  # (B, Lk, dq)

    def forward(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return q @ keys.transpose(1, 2)  # (B, Lq, Lk)


def make_score(attention: str, score: str | None, d_query: int, d_key: int, *, d_attn: int) -> nn.Module:
    """The score of ``model.attention`` (``bahdanau``, ``luong`` or ``readout``) and ``model.score``."""
    if attention == "bahdanau":
        return AdditiveScore(d_query, d_key, d_attn=d_attn)
    if attention == "readout":
        if score not in READOUT_SCORES:
            raise ValueError(f"model.score must be one of {READOUT_SCORES} for the attention read-out, got {score!r}")
        if score == "additive":
            return AdditiveScore(d_query, d_key, d_attn=d_attn)
        return BilinearScore(d_query, d_key, general=score == "general")
    if score not in LUONG_SCORES:
        raise ValueError(f"model.score must be one of {LUONG_SCORES} for luong attention, got {score!r}")
    if score == "concat":
        return AdditiveScore(d_query, d_key, d_attn=d_attn)
    return BilinearScore(d_query, d_key, general=score == "general")


def attend(
    score: nn.Module, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``values``, only where ``allowed``.

    Args:
        score: a score module; ``keys`` are its ``score.keys(...)`` projection.
        q: (B, Lq, dq) queries.
        keys: (B, Lk, A) projected keys.
        values: (B, Lk, dv).
        allowed: bool, broadcastable to (B, Lq, Lk); every query must allow one key at least.

    Returns:
        context (B, Lq, dv) and weights (B, Lq, Lk), zero where not allowed, summing to one.
    """
    scores = score(q, keys).masked_fill(~allowed, float("-inf"))  # (B, Lq, Lk)
    weights = torch.softmax(scores, dim=-1)
    return weights @ values, weights  # (B, Lq, dv), (B, Lq, Lk)


def initial_state(init: nn.Linear, final: torch.Tensor, n_layers: int) -> State:
    """Decoder state from the encoder's final state: h_0 = tanh(W final) per layer, c_0 = 0."""
    B = final.shape[0]
    h = torch.tanh(init(final)).view(B, n_layers, -1).transpose(0, 1).contiguous()  # (n_layers, B, H)
    return h, torch.zeros_like(h)


def unroll(step, emb: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """emb (B, Lt, D) of [bos, y_1, ...] -> logits (B, Lt, V), final state, weights (B, Lt, Ls).

    A Python loop over target steps: each step's query depends on the previous step.
    """
    logits, weights = [], []
    for i in range(emb.shape[1]):
        logits_i, state, weights_i = step(emb[:, i], state)
        logits.append(logits_i)
        weights.append(weights_i)
    return torch.stack(logits, 1), state, torch.stack(weights, 1)


class StackedLSTMCell(nn.Module):
    """n_layers LSTMCells for one step, with dropout between layers as nn.LSTM applies it."""

    def __init__(self, d_input: int, d_hidden: int, *, n_layers: int, dropout: float):
        super().__init__()
        self.cells = nn.ModuleList(nn.LSTMCell(d_input if i == 0 else d_hidden, d_hidden) for i in range(n_layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            h, c = cell(x, (state[0][i], state[1][i]))
            hs.append(h)
            cs.append(c)
            x = self.dropout(h) if i + 1 < len(self.cells) else h
        return x, (torch.stack(hs), torch.stack(cs))  # (B, H), (n_layers, B, H) x 2


class SummaryDecoder(nn.Module):
    """RNNenc's decoder: no attention; the source summary is fed with every input token.

    Args:
        d_model: target embedding size.
        d_summary: size of the encoder's final state (2 * d_hidden for a BiLSTM).
        d_hidden: decoder LSTM size.
        n_layers: decoder LSTM layers.
        n_outputs: output vocabulary.
        dropout: between layers and before the output layer.
    """

    def __init__(self, *, d_model: int, d_summary: int, d_hidden: int, n_layers: int, n_outputs: int, dropout: float):
        super().__init__()
        self.n_layers = n_layers
        self.init = nn.Linear(d_summary, n_layers * d_hidden)
        self.lstm = nn.LSTM(d_model + d_summary, d_hidden, n_layers, batch_first=True,
                            dropout=dropout if n_layers > 1 else 0.0)
        self.deep_out = nn.Linear(d_hidden + d_summary + d_model, d_hidden)
        self.out = nn.Linear(d_hidden, n_outputs)
        self.dropout = nn.Dropout(dropout)

    def start(self, memory: torch.Tensor, memory_mask: torch.Tensor, final: torch.Tensor) -> tuple:
        return initial_state(self.init, final, self.n_layers), final

    def forward(self, emb: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple, None]:
        """emb (B, Lt, D) of [bos, y_1, ...] -> logits (B, Lt, V); one nn.LSTM call for all steps."""
        lstm_state, summary = state
        summary = summary[:, None].expand(-1, emb.shape[1], -1)  # (B, Lt, 2H)
        s, lstm_state = self.lstm(torch.cat([emb, summary], -1), lstm_state)  # (B, Lt, H)
        t = torch.tanh(self.deep_out(torch.cat([s, summary, emb], -1)))
        return self.out(self.dropout(t)), (lstm_state, state[1]), None

    def step(self, emb: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple, None]:
        logits, state, _ = self.forward(emb[:, None], state)
        return logits[:, 0], state, None


class BahdanauDecoder(nn.Module):
    """RNNsearch's decoder: the previous state s_{i-1} chooses what to read from the source.

    Args:
        d_model: target embedding size.
        d_memory: size of the encoder annotations h_j (2 * d_hidden for a BiLSTM).
        d_hidden: decoder LSTM size; also the alignment model's hidden size.
        n_layers: decoder LSTM layers; the top layer's state is the query.
        n_outputs: output vocabulary.
        dropout: between layers and before the output layer.
    """

    def __init__(self, *, d_model: int, d_memory: int, d_hidden: int, n_layers: int, n_outputs: int, dropout: float):
        super().__init__()
        self.n_layers = n_layers
        self.init = nn.Linear(d_memory, n_layers * d_hidden)
        self.score = AdditiveScore(d_hidden, d_memory, d_attn=d_hidden)
        self.cell = StackedLSTMCell(d_model + d_memory, d_hidden, n_layers=n_layers, dropout=dropout)
        self.deep_out = nn.Linear(d_hidden + d_memory + d_model, d_hidden)
        self.out = nn.Linear(d_hidden, n_outputs)
        self.dropout = nn.Dropout(dropout)

    def start(self, memory: torch.Tensor, memory_mask: torch.Tensor, final: torch.Tensor) -> tuple:
        # the keys U h_j do not depend on the step: project them once
        return initial_state(self.init, final, self.n_layers), memory, self.score.keys(memory), memory_mask

    def step(self, emb: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        """emb (B, D) of y_{i-1} -> logits (B, V) for y_i, new state, weights (B, Ls)."""
        lstm_state, memory, keys, mask = state
        query = lstm_state[0][-1][:, None]  # s_{i-1}, top layer: (B, 1, H)
        context, weights = attend(self.score, query, keys, memory, mask[:, None])  # (B, 1, 2H), (B, 1, Ls)
        context = context[:, 0]
        s, lstm_state = self.cell(torch.cat([emb, context], -1), lstm_state)  # s_i: (B, H)
        t = torch.tanh(self.deep_out(torch.cat([s, context, emb], -1)))
        return self.out(self.dropout(t)), (lstm_state, memory, keys, mask), weights[:, 0]

    def forward(self, emb: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        return unroll(self.step, emb, state)


class LuongDecoder(nn.Module):
    """Luong's attentional decoder with input feeding: global or local attention.

    Local attention (Luong et al. 2015, section 3.2) reads the source positions s with
    |s - p_t| <= D around an aligned position p_t:

    * ``local-m`` (monotonic): p_t = t, the target step, kept within the source (a window past the
      source's end would be empty; the paper's sentences are of similar length);
    * ``local-p`` (predictive): p_t = S * sigmoid(v_p^T tanh(W_p h_t)) with S the source length
      (here the last position, S = length - 1, as positions count from 0), and the softmax weights
      in the window multiplied by exp(-(s - p_t)^2 / (2 sigma^2)), sigma = D / 2, not renormalised
      (as the paper's equation 10).

    The scores are computed at every position and masked to the window: the same weights as the
    paper's, not its saving in computation.

    Args:
        d_model: target embedding size.
        d_memory: size of the encoder states (2 * d_hidden for a BiLSTM), projected to d_hidden.
        d_hidden: decoder LSTM size (and of the attentional vector h~).
        n_layers: decoder LSTM layers; the top layer's state is the query.
        n_outputs: output vocabulary.
        score: ``dot``, ``general`` or ``concat``.
        dropout: between layers and on h~ before the output layer.
        alignment: ``global``, ``local-m`` or ``local-p``.
        window: D, the half-width of the local window (the paper: 10).
    """

    def __init__(
        self, *, d_model: int, d_memory: int, d_hidden: int, n_layers: int, n_outputs: int, score: str, dropout: float,
        alignment: str = "global", window: int = 10,
    ):
        super().__init__()
        if alignment not in LUONG_ALIGNMENTS:
            raise ValueError(f"model.alignment must be one of {LUONG_ALIGNMENTS}, got {alignment!r}")
        if alignment != "global" and (not isinstance(window, int) or window < 1):
            raise ValueError(f"model.window (D of Luong's local attention) must be a positive integer, got {window!r}")
        self.n_layers = n_layers
        self.alignment = alignment
        self.window = window
        self.init = nn.Linear(d_memory, n_layers * d_hidden)
        # Luong's encoder states have the decoder's size (needed by ``dot``): project ours to it
        self.bridge = nn.Linear(d_memory, d_hidden, bias=False)
        self.score = make_score("luong", score, d_hidden, d_hidden, d_attn=d_hidden)
        self.cell = StackedLSTMCell(d_model + d_hidden, d_hidden, n_layers=n_layers, dropout=dropout)
        self.combine = nn.Linear(2 * d_hidden, d_hidden, bias=False)  # W_c
        self.out = nn.Linear(d_hidden, n_outputs)  # W_s
        self.dropout = nn.Dropout(dropout)
        if alignment == "local-p":
            self.W_p = nn.Linear(d_hidden, d_hidden, bias=False)
            self.v_p = nn.Linear(d_hidden, 1, bias=False)

    def start(self, memory: torch.Tensor, memory_mask: torch.Tensor, final: torch.Tensor) -> tuple:
        lstm_state = initial_state(self.init, final, self.n_layers)
        feed = torch.zeros_like(lstm_state[0][-1])  # h~_0 = 0
        memory = self.bridge(memory)  # (B, Ls, H)
        return lstm_state, feed, memory, self.score.keys(memory), memory_mask, 0

    def aligned_position(self, h: torch.Tensor, mask: torch.Tensor, t: int) -> torch.Tensor:
        """p_t (B,) of local attention at target step t (0-based) from the query h_t (B, H)."""
        last = (mask.sum(1) - 1).clamp_min(0).to(h.dtype)  # the source's last position, (B,)
        if self.alignment == "local-m":
            return last.clamp_max(float(t))
        return last * torch.sigmoid(self.v_p(torch.tanh(self.W_p(h)))).squeeze(-1)

    def step(self, emb: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        """emb (B, D) of y_{t-1} -> logits (B, V) for y_t, new state, weights (B, Ls)."""
        lstm_state, feed, memory, keys, mask, t = state
        h, lstm_state = self.cell(torch.cat([emb, feed], -1), lstm_state)  # h_t: (B, H)
        allowed, gaussian = mask, None
        if self.alignment != "global":
            p = self.aligned_position(h, mask, t)  # (B,)
            distance = torch.arange(mask.shape[1], device=h.device, dtype=h.dtype)[None] - p[:, None]  # (B, Ls)
            allowed = mask & (distance.abs() <= self.window)
            if self.alignment == "local-p":
                sigma = self.window / 2
                gaussian = torch.exp(-distance.square() / (2 * sigma**2))  # (B, Ls)
        _, weights = attend(self.score, h[:, None], keys, memory, allowed[:, None])  # (B, 1, Ls)
        weights = weights[:, 0] if gaussian is None else weights[:, 0] * gaussian  # (B, Ls)
        context = (weights[:, None] @ memory)[:, 0]  # (B, H)
        h_tilde = torch.tanh(self.combine(torch.cat([context, h], -1)))  # (B, H)
        return self.out(self.dropout(h_tilde)), (lstm_state, h_tilde, memory, keys, mask, t + 1), weights

    def forward(self, emb: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        return unroll(self.step, emb, state)
