"""The Mamba block (Gu & Dao 2023, arXiv 2312.00752) as a sequence mixer, after state-spaces/mamba's
``mamba_simple.Mamba``.

    x (B, L, D) -> in_proj -> [x | z]  (B, L, 2E)         E = expand * D
    x -> causal depthwise conv1d (d_conv) -> SiLU
    x -> x_proj -> [dt (R) | B (N) | C (N)];  dt -> dt_proj (R -> E, bias = inverse softplus of dt0)
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, delta_softplus)   (y *= SiLU(z) inside)
    out = out_proj(y)

Model-level init (:meth:`Mamba.init_model`, which the shared backbone calls once the model is
built): state-spaces/mamba ``mamba_ssm/models/mixer_seq_simple.py`` ``_init_weights``, applied to
the whole model as ``MixerModel`` and ``MambaLMHeadModel`` do: embeddings N(0, 0.02), every Linear
bias zeroed except dt_proj's (marked ``_no_reinit`` there and here), and each residual branch's
output projection re-drawn with PyTorch's default and divided by sqrt(n_residuals_per_layer *
n_layers) (GPT-2's scheme; 1 residual per layer without feed-forward, 2 with). The yaml ties the
embedding to the LM head (``tie_embeddings: true`` as ``MambaConfig``).

The block is causal, as in the paper. With ``bidirectional: true`` on a non-causal task
(classify/pair) the same block (same weights) also runs on each sequence reversed within its
real length, and the two outputs are summed. Either way right padding cannot reach real tokens:
a causal pass never looks right, and the reversed pass keeps the pads at the end.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures import ssm_cpu
from architectures.layers import FeedForward
from architectures.ssm import SCAN_IMPLEMENTATIONS, selective_scan, time_major_BC


def reversal_order(mask: torch.Tensor | None, batch: int, L: int, device: torch.device) -> torch.Tensor:
    """The step order (B, L) int64 that reads each sequence reversed over its real tokens (mask
    (B, L), or None: all real), leaving right pads in place: step t is position order[b, t].

    A reversal is its own inverse: position order[b, t] holds step t, and step order[b, t] is t.
    """
    t = torch.arange(L, device=device)  # (L,)
    if mask is None:
        return (L - 1 - t).expand(batch, L).contiguous()
    lengths = mask.long().sum(1, keepdim=True)  # (B, 1)
    return torch.where(t < lengths, lengths - 1 - t, t)  # (B, L)


def steps_in_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) read in the step order (B, L): out[b, t] = x[b, order[b, t]]."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def positions_of_steps(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`steps_in_order`: y (B, L, ...) by step, put back by position."""
    return steps_in_order(y, order.argsort(1))


def reverse_within_length(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reverse each sequence of x (B, L, ...) over its real tokens, leaving right pads in place.

    Its own inverse: applying it twice gives x back.
    """
    return steps_in_order(x, reversal_order(mask, x.shape[0], x.shape[1], x.device))


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[b, t, e] = bias[e] + sum_k weight[e, 0, k] x[b, t - (K-1) + k, e], zero before the start.

    Channels last: x (B, L, E), any strides. Equal to ``F.conv1d(x.transpose(1, 2), weight, bias,
    padding=K - 1, groups=E)[..., :L].transpose(1, 2)`` (mamba-ssm's fallback for its causal-conv1d
    kernel) as K shifted multiply-adds: on CPU the depthwise convolution's backward (oneDNN / the
    slow-path im2col) took two thirds of a Mamba training step at 4K tokens, this takes a few
    elementwise passes over (B, L, E).
    """
    K, L = weight.shape[-1], x.shape[1]
    taps = weight[:, 0].T  # (K, E)
    xp = F.pad(x, (0, 0, K - 1, 0))  # (B, L + K - 1, E)
    y = xp[:, :L] * taps[0] if bias is None else torch.addcmul(bias, xp[:, :L], taps[0])  # (B, L, E)
    for k in range(1, K):
        y = torch.addcmul(y, xp[:, k:k + L], taps[k])
    return y


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, fused: bool,
              order: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(causal_depthwise_conv1d(x, weight, bias)), x (B, L, E) channels-last; with a step
    order (B, L), the convolution runs along it (step t is position order[b, t]) and the result is
    by position, like x.

    With ``fused``, fp32 CPU tensors outside autocast go to the C++ kernel (one pass each way,
    keeping only x for the backward, and reading in the order without a reordered copy) when the
    extension builds; everything else to PyTorch.
    """
    if fused and x.stride(-1) == 1 and ssm_cpu.serves(x):
        return ssm_cpu.CausalConvSiLU.apply(x, weight, bias, order)
    if order is not None:
        return positions_of_steps(conv_silu(steps_in_order(x, order), weight, bias, fused=False), order)
    return F.silu(causal_depthwise_conv1d(x, weight, bias))


class Mamba(nn.Module):
    """The Mamba mixer: (B, L, D) -> (B, L, D).

    Args:
        d_model: model width D.
        causal: the task forbids looking ahead.
        layer_idx: position in the stack (unused).
        d_state: SSM state size N per channel (16 in the paper).
        d_conv: width of the causal depthwise convolution (4).
        expand: inner width E = expand * d_model (2).
        dt_rank: rank R of the dt projection; None for ceil(d_model / 16).
        dt_min, dt_max: initial dt is log-uniform in [dt_min, dt_max] (1e-3, 1e-1).
        dt_init_floor: lower clamp of the initial dt (1e-4).
        conv_bias: bias in the convolution (True in the paper's code).
        bias: biases in in_proj and out_proj (False).
        bidirectional: on non-causal tasks, also run the block on the reversed sequence and sum.
        scan: which selective scan runs (``auto``, ``fused``, ``chunked``, ``reference``); see
            :func:`architectures.ssm.selective_scan`.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, d_state: int, d_conv: int, expand: int,
        dt_rank: int | None = None, dt_min: float, dt_max: float, dt_init_floor: float,
        conv_bias: bool = True, bias: bool = False, bidirectional: bool = False, scan: str = "auto",
    ):
        super().__init__()
        if scan not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"model.mixer.scan (conf/model/mamba.yaml) must be one of {SCAN_IMPLEMENTATIONS}, got {scan!r}")
        self.scan_implementation = scan
        E = expand * d_model
        self.d_inner, self.d_state, self.d_conv = E, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.bidirectional = bidirectional and not causal
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        # dt init: weights U(-R^-1/2, R^-1/2); bias = softplus^-1(dt0), dt0 log-uniform in [dt_min, dt_max]
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True  # init_model keeps it (mamba_simple.py marks it so)
        # S4D-real init: A_n = -(n + 1), stored as log for positivity
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.A_log._optim = {"weight_decay": 0.0}
        self.D._optim = {"weight_decay": 0.0}

    @staticmethod
    def init_model(model: nn.Module, *, n_layers: int, d_ff: int, initializer_range: float = 0.02) -> None:
        """The official model-level init (mixer_seq_simple.py ``_init_weights``, see the module docstring).

        Args:
            model: the whole model, built and tied.
            n_layers: number of blocks (the n_layer of the 1/sqrt rescale).
            d_ff: feed-forward width; 0 (Mamba's blocks) means one residual branch per block.
            initializer_range: std of the embeddings (0.02).
        """
        n_residuals = 1 if d_ff == 0 else 2  # the official n_residuals_per_layer
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=initializer_range)
            # the official names: out_proj (the mixer's output) and fc2 (its MLP's output, our FeedForward.down)
            out = module.out_proj if isinstance(module, Mamba) else module.down if isinstance(module, FeedForward) else None
            if out is not None:
                nn.init.kaiming_uniform_(out.weight, a=math.sqrt(5))  # PyTorch's Linear default, drawn again
                with torch.no_grad():
                    out.weight /= math.sqrt(n_residuals * n_layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        xz = self.in_proj(x)  # (B, L, 2E)
        if not self.bidirectional:
            return self.out_proj(self.ssm(xz))
        # The reversed pass runs the same block on reverse(x). in_proj and out_proj act token by
        # token, so it shares in_proj's output, read in reversed order, and the two passes share
        # one out_proj of their sum.
        y = self.ssm(xz, orders=(None, reversal_order(mask, *xz.shape[:2], xz.device)))  # (B, L, E)
        out = self.out_proj(y)  # (B, L, D)
        return out if self.out_proj.bias is None else out + self.out_proj.bias  # one bias per pass

    def ssm(self, xz: torch.Tensor, orders: tuple[torch.Tensor | None, ...] = (None,)) -> torch.Tensor:
        """From in_proj's output xz (B, L, 2E) to the gated scan output (B, L, E), by position: one
        causal pass per step order in ``orders`` (None: left to right; (B, L): that order, e.g.
        the reversed pass), summed."""
        A = -torch.exp(self.A_log.float())  # (E, N)
        weights = (self.conv1d.weight, self.conv1d.bias, self.x_proj.weight)
        if self.scan_implementation in ("auto", "fused") and ssm_cpu.serves(xz):
            return RecomputedScanInputs.apply(xz, *weights, self.dt_proj.weight, A, self.D, self.dt_proj.bias, orders,
                                              self)
        passes = [self.causal_pass(xz, weights, A) if order is None
                  else positions_of_steps(self.causal_pass(steps_in_order(xz, order), weights, A), order)
                  for order in orders]  # the PyTorch scans run on a reordered copy
        return passes[0] if len(passes) == 1 else sum(passes)

    def causal_pass(self, xz, weights, A):
        """One left-to-right pass by the PyTorch scans (``scan``: chunked or reference): (B, L, E)."""
        u, dt_low, B, C, z = self.scan_inputs(xz, *weights)
        dt = F.linear(dt_low.transpose(1, 2), self.dt_proj.weight).transpose(1, 2)  # (B, E, L); bias below
        y = selective_scan(
            u, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            scan=self.scan_implementation,
        )  # (B, E, L)
        return y.transpose(1, 2)  # (B, L, E)

    def scan_inputs(self, xz, conv_weight, conv_bias, x_proj_weight, order=None):
        """From xz (B, L, 2E) to the scan's u and z (B, E, L), dt_low (B, R, L), the input of
        dt_proj, and B, C (B, N, L): transposed views of (B, L, .) tensors, which the fused kernel
        reads in place (and answers in the same (B, L, E) layout). With a step order (B, L), the
        convolution runs along it; everything stays by position."""
        xs, z = xz.split(self.d_inner, dim=-1)  # (B, L, E) views
        fused = self.scan_implementation in ("auto", "fused")
        u = conv_silu(xs, conv_weight, conv_bias, fused=fused, order=order)  # (B, L, E)
        dt_low, B, C = F.linear(u, x_proj_weight).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u.transpose(1, 2), dt_low.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2), z.transpose(1, 2)

    def step(self, x_t: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One token: x_t (B, D); state (conv (B, E, d_conv), ssm (B, E, N)) or None."""
        if self.bidirectional:
            raise RuntimeError("Mamba.step needs a causal block; this one is bidirectional (a non-causal task)")
        if state is None:
            state = (x_t.new_zeros(x_t.shape[0], self.d_inner, self.d_conv),
                     x_t.new_zeros(x_t.shape[0], self.d_inner, self.d_state, dtype=torch.float32))
        conv_state, ssm_state = state
        xs, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, E) each
        conv_state = torch.cat([conv_state[..., 1:], xs.unsqueeze(-1)], dim=-1)  # last d_conv inputs
        xs = (conv_state * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xs = xs + self.conv1d.bias
        xs = F.silu(xs)
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).float()  # (B, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        ssm_state = torch.exp(dt.unsqueeze(-1) * A) * ssm_state + (dt * xs).unsqueeze(-1) * B.unsqueeze(1)
        y = (ssm_state * C.unsqueeze(1)).sum(-1) + self.D * xs  # (B, E)
        y = y * F.silu(z)
        return self.out_proj(y.to(x_t.dtype)), (conv_state, ssm_state)


def kernel_BC(B: torch.Tensor, C: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixer's B, C (B, N, L) as the scan kernel takes them, for u (B, E, L): time_major_BC's views."""
    return tuple(time_major_BC(X, *u.shape, name) for X, name in ((B, "B"), (C, "C")))


class RecomputedScanInputs(torch.autograd.Function):
    """:meth:`Mamba.ssm` by the fused CPU kernels, keeping for the backward only xz and the scan's
    checkpoints: the convolution and x_proj outputs are recomputed in the backward, as mamba-ssm's
    ``mamba_inner_fn`` does on CUDA (checkpoint_lvl 1), and dt_proj runs inside the kernel (R
    multiply-adds per channel and step), so delta (B, L, E) is never stored.

    Forward inputs: xz (B, L, 2E); the convolution's weight and bias and x_proj's weight; dt_proj's
    weight (E, R); A (E, N); D and dt_proj's bias (E,); the step orders of the passes (None or
    (B, L) each; the kernels read a reversed pass in its order, so no reordered copy of xz is made
    or kept); the mixer (for :meth:`Mamba.scan_inputs`). Returns the sum of the passes' gated scan
    outputs (B, L, E), by position.

    The backward is written out rather than differentiated through :meth:`Mamba.scan_inputs`, so
    that the kernels add every pass's dz and the convolution's dx straight into the two halves of
    one dxz (B, L, 2E), and x_proj's input gradient adds into du in place: few (B, L, E) tensors
    are alive at the step's memory peak.
    """

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, orders, mixer):
        out, checkpoints = None, []
        for order in orders:
            u, dt_low, B, C, z = mixer.scan_inputs(xz, conv_weight, conv_bias, x_proj_weight, order)
            y, _, chunk_states = ssm_cpu.extension().forward(
                u, dt_low, A, *kernel_BC(B, C, u), D, z, dt_bias, True, dt_proj_weight, order)  # y (B, E, L)
            out = y if out is None else out.add_(y)
            checkpoints.append(chunk_states)
        ctx.sizes, ctx.orders = (mixer.d_inner, mixer.dt_rank, mixer.d_state), orders
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, *checkpoints)
        return out.transpose(1, 2)  # (B, L, E)

    @staticmethod
    def backward(ctx, grad_out):
        xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, dt_bias, *checkpoints = ctx.saved_tensors
        E, R, N = ctx.sizes
        ops = ssm_cpu.extension()
        xs, z = xz.split(E, dim=-1)  # (B, L, E) views
        taps = conv_weight[:, 0].contiguous()  # (E, K)
        grad_out = ssm_cpu.channels_last(grad_out.transpose(1, 2))  # (B, E, L)
        dxz = torch.zeros_like(xz)  # (B, L, 2E): every pass adds its dx (convolution) and dz here
        sums = None  # the weights' gradients, summed over the passes
        grad_last = xz.new_zeros(xz.shape[0], E, N)  # no gradient reaches the last state
        for order, chunk_states in zip(ctx.orders, checkpoints, strict=True):
            u = ops.conv_silu_forward(xs, taps, conv_bias, order)  # (B, L, E), recomputed
            x_dbl = F.linear(u, x_proj_weight)  # (B, L, R + 2N)
            dt_low, B, C = (t.transpose(1, 2) for t in x_dbl.split([R, N, N], dim=-1))  # (B, R|N|N, L) views
            du, ddt_low, _, dA, dB, dC, dD, dbias, ddt_proj = ops.backward(
                grad_out, grad_last, u.transpose(1, 2), dt_low, A, *kernel_BC(B, C, u.transpose(1, 2)), D,
                z.transpose(1, 2), dt_bias, True, chunk_states, dt_proj_weight, order, dxz[..., E:].transpose(1, 2))
            d_x_dbl = torch.cat([ddt_low.transpose(1, 2), dB[:, 0], dC[:, 0]], dim=-1)  # (B, L, R + 2N)
            dx_proj = d_x_dbl.flatten(0, 1).T @ u.flatten(0, 1)  # (R + 2N, E)
            del u
            du = du.transpose(1, 2)  # (B, L, E), contiguous
            du.view(-1, E).addmm_(d_x_dbl.view(-1, R + 2 * N), x_proj_weight)  # + x_proj's input gradient
            _, dtaps, dconv_bias = ops.conv_silu_backward(xs, taps, conv_bias, du, order, dxz[..., :E])
            grads = (dtaps.unsqueeze(1), dconv_bias, dx_proj, ddt_proj, dA, dD, dbias)
            sums = grads if sums is None else tuple(a + b for a, b in zip(sums, grads, strict=True))
        dconv_weight, dconv_bias, dx_proj, ddt_proj, dA, dD, dbias = sums
        return (dxz, dconv_weight, dconv_bias if conv_bias is not None else None, dx_proj, ddt_proj, dA, dD, dbias,
                None, None)
