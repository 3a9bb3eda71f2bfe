"""Hyena (Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon & Re 2023, "Hyena Hierarchy:
Towards Larger Convolutional Language Models", ICML 2023, arXiv 2302.10866), after
HazyResearch/safari's ``standalone_hyena.py`` (``HyenaOperator``, ``HyenaFilter``):

    x (B, L, D) -> in_proj -> (B, (order+1) D, L) -> short causal depthwise conv (3 taps)
      -> split into x_0 .. x_{order-1}, v
    for i = order-1 .. 1:  v <- h_i * (v . x_i) + bias_i (v . x_i)       long causal FFT convolution
    y = out_proj(v . x_0)

The long filters h (length L, one per channel and order) are implicit: an FFN of positional features
(t, and sin/cos at ``(emb_dim - 1) / 2`` frequencies), with sine activations of frequency ``w``
(shared across the FFN's layers, as there), times an exponential window exp(-t |alpha_c|), alpha
spread over channels from log(target)/slow_decay_pct to log(target)/fast_decay_pct.
Positions are measured in units of ``l_max`` (t = l / (l_max - 1)), so the filter's first L taps
do not depend on the input length and longer inputs extend the same filter. The FFN and the bias
carry ``_optim`` (lr ``filter_lr``, weight decay ``filter_wd``) as the standalone filter does.

Chosen where the standalone differs: its positional features are a parameter table of l_max rows
trained at lr 1e-5; here they are computed (fixed), which lets any input length through.
Hyena has no finite-state recurrence (its filters are as long as the input), so no ``step()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.ssm import kernel_convolution


class Sin(nn.Module):
    """sin(freq * x) with a trainable frequency per feature (initialised at w)."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """The implicit long filters: positions -> FFN -> exponential window; (channels, L).

    Args:
        channels: number of filters (d_model * (order - 1)).
        l_max: the length positions are normalised by.
        emb_dim: positional features (odd, >= 3: t plus (emb_dim - 1) / 2 sin/cos pairs).
        filter_order: width of the FFN.
        num_inner_mlps: hidden layers of the FFN after the first.
        w: initial frequency of the sine activations.
        fast_decay_pct, slow_decay_pct, target: the window's decay range (exp(-t |alpha|) reaches
            ``target`` at t = fast_decay_pct for the fastest channel, slow_decay_pct for the slowest).
        filter_lr, filter_wd: optimiser settings of the FFN and the bias.
    """

    def __init__(self, channels: int, *, l_max: int, emb_dim: int, filter_order: int, num_inner_mlps: int,
                 w: float, fast_decay_pct: float, slow_decay_pct: float, target: float,
                 filter_lr: float, filter_wd: float):
        super().__init__()
        if emb_dim % 2 == 0 or emb_dim < 3:
            raise ValueError(f"model.mixer.emb_dim must be odd and >= 3 (time, sine, cosine), got {emb_dim}")
        self.l_max, self.bands = l_max, (emb_dim - 1) // 2
        act = Sin(filter_order, w)  # one module: the standalone shares the frequencies across layers
        layers = [nn.Linear(emb_dim, filter_order), act]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(filter_order, filter_order), act]
        layers.append(nn.Linear(filter_order, channels, bias=False))
        self.implicit_filter = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.randn(channels))
        max_decay, min_decay = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, channels))
        for p in (*self.implicit_filter.parameters(), self.bias):
            p._optim = {"lr": filter_lr, "weight_decay": filter_wd}

    def positions(self, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Features z (L, emb_dim) and normalised time t (L, 1) of positions 0 .. L-1."""
        pos = torch.arange(L, device=device, dtype=torch.float32)[:, None]  # (L, 1)
        t = pos / max(self.l_max - 1, 1)
        f = torch.linspace(1e-4, self.bands - 1, self.bands, device=device)[None]  # (1, bands)
        angle = f * (2 * math.pi * pos / self.l_max)  # (L, bands)
        return torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=-1), t  # exp(-i f w): cos, -sin

    def forward(self, L: int, device: torch.device) -> torch.Tensor:
        z, t = self.positions(L, device)
        h = self.implicit_filter(z) * torch.exp(-t * self.deltas.abs())  # (L, channels)
        return h.transpose(0, 1)  # (channels, L)


class Hyena(nn.Module):
    """The Hyena operator as a mixer: (B, L, D) -> (B, L, D); causal.

    Args:
        d_model: width D.
        causal: the task forbids looking ahead (Hyena is causal either way).
        layer_idx: position in the stack (unused).
        l_max: the length the filters' positions are normalised by (the task's length).
        order: depth N of the recurrence (2 in the paper's experiments).
        filter_order: width of the filter FFN (64).
        short_filter_order: taps of the short depthwise convolution (3).
        dropout: dropout on the gated products.
        **filter_args: :class:`HyenaFilter`'s knobs.
    """

    def __init__(self, d_model: int, *, causal: bool, layer_idx: int = 0, l_max: int, order: int,
                 filter_order: int, short_filter_order: int, dropout: float = 0.0, **filter_args):
        super().__init__()
        if order < 2:
            raise ValueError(f"model.mixer.order must be at least 2, got {order}")
        self.d_model, self.order = d_model, order
        inner = d_model * (order + 1)
        self.in_proj = nn.Linear(d_model, inner)
        self.short_filter = nn.Conv1d(inner, inner, short_filter_order, padding=short_filter_order - 1, groups=inner)
        self.filter_fn = HyenaFilter(d_model * (order - 1), l_max=l_max, filter_order=filter_order, **filter_args)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                convolve=None) -> torch.Tensor:
        """``convolve(u (B, D, L), K (D, L)) -> (B, D, L)``, the long causal convolution (FFT by default)."""
        L = x.shape[1]
        u = self.in_proj(x).transpose(1, 2)  # (B, (order+1) D, L)
        u = self.short_filter(u)[..., :L]  # causal: the first L outputs
        *xs, v = u.float().split(self.d_model, dim=1)  # order tensors x_i and v, (B, D, L) each
        K = self.filter_fn(L, x.device).view(self.order - 1, self.d_model, L)  # (order-1, D, L)
        bias = self.filter_fn.bias.view(self.order - 1, self.d_model)
        convolve = convolve or (lambda u_, K_: kernel_convolution(u_, K_[None], bidirectional=False))
        for o, x_i in enumerate(reversed(xs[1:])):
            v = self.dropout(v * x_i)
            v = convolve(v, K[o]) + bias[o, :, None] * v
        y = (v * xs[0]).transpose(1, 2)  # (B, L, D)
        return self.out_proj(y.to(x.dtype))
