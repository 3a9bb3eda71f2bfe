"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", ICML 2024, arXiv 2405.21060): the SSD layer, after
state-spaces/mamba's ``mamba_ssm/modules/mamba2_simple.py`` and ``ssd_minimal.py``.

    x (B, L, D) -> in_proj -> [z (E) | x (E) | B (G N) | C (G N) | dt (nh)]      E = expand D
    [x | B | C] -> causal depthwise conv1d (d_conv) -> SiLU
    dt = softplus(dt + dt_bias);  A_h = -exp(A_log_h), a scalar per head (A = a_h I)
    y = SSD(x, dt, A, B, C) + D x        heads of head_dim P channels, groups of B/C shared by heads
    out = out_proj(RMSNorm(y * SiLU(z)))                                (norm_before_gate = False)

SSD, per head: h_t = exp(dt_t a) h_{t-1} + dt_t x_t B_t^T (P x N),  y_t = h_t C_t.
:func:`ssd_reference` is that recurrence step by step; :func:`ssd_chunked` is the chunked algorithm
of the paper (section 6; ``ssd_minimal_discrete``): inside each chunk of T positions the quadratic
(attention-like) form with the decay mask exp(segsum), then chunk states passed from chunk to chunk
by a loop over chunks (linear in L; ``ssd_minimal`` uses an nc x nc matrix there). A length that is
not a multiple of T is padded with dt = 0, which leaves the state unchanged. On CUDA tensors
:func:`ssd` calls mamba-ssm's ``mamba_chunk_scan_combined`` when that package imports.

On CPU the mixer runs SSD by the fused selective scan (:func:`ssd_by_selective_scan`): SSD is the
selective scan whose A is one scalar per head, so each of the E = nh P channels is a Mamba channel
with its head's dt and A, and the C++ kernel of :mod:`architectures.ssm_cpu` computes it (with the
dt bias and softplus, the D skip and the SiLU(z) gate) without materialising anything of size
(B, L, E, N) or (chunk x chunk); the chunked algorithm costs chunk_size multiply-adds per position
and head on top (``model.mixer.scan`` picks; all paths are tested equal).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures import ssm_cpu
from architectures.mamba import conv_silu, positions_of_steps, reversal_order, steps_in_order
from architectures.ssm import SCAN_IMPLEMENTATIONS, selective_scan_fused

try:  # the fused Triton/CUDA kernels; absent on CPU-only machines
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _cuda_chunk_scan
except ImportError:  # pragma: no cover - depends on the machine
    _cuda_chunk_scan = None


def _heads(X: torch.Tensor, n_heads: int) -> torch.Tensor:
    """B or C (b, l, G, N) -> (b, l, nh, N): group g serves heads g*nh/G .. (g+1)*nh/G - 1."""
    return X.repeat_interleave(n_heads // X.shape[2], dim=2)


def ssd_reference(x, dt, A, B, C, initial_state=None):
    """The SSD recurrence, one position at a time: the documentation of the semantics.

    Args:
        x: (b, l, nh, P) inputs.
        dt: (b, l, nh) step sizes (after softplus).
        A: (nh,) negative scalars.
        B, C: (b, l, G, N), G dividing nh.
        initial_state: (b, nh, P, N) or None.

    Returns:
        y (b, l, nh, P) and the final state (b, nh, P, N), in float32.
    """
    x, dt, A = x.float(), dt.float(), A.float()
    B, C = _heads(B.float(), x.shape[2]), _heads(C.float(), x.shape[2])
    b, L, nh, P = x.shape
    h = x.new_zeros(b, nh, P, B.shape[-1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)  # (b, nh)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, dim=1), h


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums, (..., T) -> (..., T, T): out[i, j] = a[j+1] + ... + a[i] for j <= i, else -inf.

    exp(segsum(a)) is the decay from position j to i inside a chunk; computed from a masked
    cumulative sum (not a difference of cumsums), so it is exact however strong the decay.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # (..., T, T): [i, j] = a_i
    a = a.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1), 0)
    out = torch.cumsum(a, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device)), -torch.inf)


def ssd_chunked(x, dt, A, B, C, *, chunk_size: int, initial_state=None):
    """SSD by chunks of ``chunk_size`` positions; same arguments and results as :func:`ssd_reference`."""
    b, L, nh, P = x.shape
    T = chunk_size
    nc = -(-L // T)
    pad = nc * T - L
    x, dt, A = x.float(), dt.float(), A.float()
    B, C = _heads(B.float(), nh), _heads(C.float(), nh)
    if pad:  # dt = 0 at the pads: decay 1 and no input, the state passes through unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    x, B, C = (t.reshape(b, nc, T, nh, -1) for t in (x, B, C))  # (b, c, T, nh, P|N)
    dt = dt.reshape(b, nc, T, nh)
    a = (dt * A).permute(0, 3, 1, 2)  # (b, nh, c, T): log-decay per position
    a_cum = torch.cumsum(a, dim=-1)  # (b, nh, c, T)
    xdt = x * dt[..., None]  # (b, c, T, nh, P)
    # 1. inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + .. + a_i) dt_j x_j
    decay = torch.exp(segsum(a))  # (b, nh, c, T, T)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay  # (b, nh, c, T, T)
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)  # (b, c, T, nh, P)
    # 2. each chunk's own final state, from a zero entering state
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, nh, c, T): decay from j to the chunk's end
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)  # (b, c, nh, P, N)
    # 3. states entering each chunk, passed along chunk by chunk (linear in the number of chunks)
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, nh, c)
    state = x.new_zeros(b, nh, P, B.shape[-1]) if initial_state is None else initial_state.float()
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # (b, c, nh, P, N)
    # 4. the entering state's contribution: y_i += exp(a_1 + .. + a_i) C_i h_enter
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))
    return y.reshape(b, nc * T, nh, P)[:, :L], state


def ssd(x, dt, A, B, C, *, chunk_size: int):
    """SSD output (b, l, nh, P): mamba-ssm's fused kernel on CUDA when installed, else :func:`ssd_chunked`.

    Sequences shorter than ``chunk_size`` are one chunk of their own length (no padding).
    """
    chunk_size = min(chunk_size, x.shape[1])
    if x.is_cuda and _cuda_chunk_scan is not None:
        return _cuda_chunk_scan(x, dt, A, B, C, chunk_size)
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size)[0]


def ssd_by_selective_scan(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, order=None):
    """SSD by the fused CPU selective scan, each head's P channels as Mamba channels sharing its dt and A.

    Args:
        x: (b, l, nh, P) inputs; dt: (b, l, nh) step sizes (before bias and softplus when given);
        A: (nh,); B, C: (b, l, G, N), G dividing nh (group g serves heads g nh/G .. (g+1) nh/G - 1,
        as :func:`ssd_reference`).
        D: (nh,) skip, z: (b, l, nh P) gate, dt_bias: (nh,), dt_softplus: as the selective scan's.
        order: None, or the step order (b, l) of the pass (see :func:`selective_scan_fused`).

    Returns:
        (b, l, nh P): y (+ D x) (times SiLU(z)), in float32.
    """
    b, L, nh, P = x.shape

    def per_channel(v):  # (nh,) -> (E,)
        return None if v is None else v.float().repeat_interleave(P)

    u = x.reshape(b, L, nh * P).transpose(1, 2)  # (b, E, L), a view of (b, L, E)
    delta = dt.repeat_interleave(P, dim=-1).transpose(1, 2)  # (b, E, L), a view of (b, L, E)
    A = per_channel(A)[:, None].expand(-1, B.shape[-1])  # (E, N): the head's scalar for every state entry
    B, C = (X.permute(0, 2, 3, 1) for X in (B, C))  # (b, G, N, L) views
    y = selective_scan_fused(u, delta, A, B, C, per_channel(D), None if z is None else z.transpose(1, 2),
                             per_channel(dt_bias), dt_softplus, order=order)  # (b, E, L), a view of (b, L, E)
    return y.transpose(1, 2)


class Mamba2(nn.Module):
    """The Mamba-2 mixer: (B, L, D) -> (B, L, D).

    Args:
        d_model: model width D.
        causal: the task forbids looking ahead.
        layer_idx: position in the stack (unused).
        d_state: state size N per head (128 in mamba2_simple; 64 in the paper's smaller models).
        d_conv: width of the causal depthwise convolution (4).
        expand: inner width E = expand * d_model (2).
        head_dim: channels P per head (mamba-ssm's ``headdim``, 64); E / P heads.
        n_groups: groups of B and C shared by heads (mamba-ssm's ``ngroups``, 1).
        chunk_size: chunk length T of the SSD algorithm (256 in mamba-ssm).
        A_init_min, A_init_max: -A is drawn uniformly in this range (mamba-ssm's A_init_range (1, 16)).
        dt_min, dt_max, dt_init_floor: initial dt, log-uniform in [dt_min, dt_max], clamped below.
        conv_bias: bias in the convolution (True).
        bias: biases in in_proj and out_proj (False).
        bidirectional: on non-causal tasks, also run the block on the reversed sequence and sum.
        scan: how SSD runs: ``auto`` (the fused selective scan for fp32 CPU tensors when its extension
            builds, else :func:`ssd`), ``fused``, ``chunked`` (:func:`ssd`) or ``reference``
            (:func:`ssd_reference`, step by step; for checking).
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, d_state: int, d_conv: int, expand: int,
        head_dim: int, n_groups: int, chunk_size: int, A_init_min: float, A_init_max: float, dt_min: float,
        dt_max: float, dt_init_floor: float, conv_bias: bool = True, bias: bool = False, bidirectional: bool = False,
        scan: str = "auto",
    ):
        super().__init__()
        if scan not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"model.mixer.scan (conf/model/mamba2.yaml) must be one of {SCAN_IMPLEMENTATIONS}, "
                             f"got {scan!r}")
        self.scan_implementation = scan
        E = expand * d_model
        if E % head_dim:
            raise ValueError(f"model.mixer.head_dim={head_dim} must divide expand * d_model = {E}")
        nh = E // head_dim
        if nh % n_groups:
            raise ValueError(f"model.mixer.n_groups={n_groups} must divide the {nh} heads")
        self.d_inner, self.d_state, self.d_conv, self.head_dim = E, d_state, d_conv, head_dim
        self.n_heads, self.n_groups, self.chunk_size = nh, n_groups, chunk_size
        self.bidirectional = bidirectional and not causal
        conv_dim = E + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, 2 * E + 2 * n_groups * d_state + nh, bias=bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias)
        dt = torch.exp(torch.rand(nh) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(nh).uniform_(A_init_min, A_init_max)))
        self.D = nn.Parameter(torch.ones(nh))
        for p in (self.dt_bias, self.A_log, self.D):
            p._optim = {"weight_decay": 0.0}
        self.norm = nn.RMSNorm(E // n_groups, eps=1e-5)  # per group (group_size = E / G)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        zxbcdt = self.in_proj(x)  # (B, L, 2E + 2GN + nh)
        if not self.bidirectional:
            return self.out_proj(self.ssd_and_norm(zxbcdt))
        # The reversed pass runs the same block on reverse(x): in_proj and out_proj act token by
        # token, so it shares in_proj's output, read in reversed order, and one out_proj of the two
        # passes' sum (as the Mamba mixer).
        order = reversal_order(mask, *zxbcdt.shape[:2], zxbcdt.device)  # (B, L)
        y = self.ssd_and_norm(zxbcdt) + self.ssd_and_norm(zxbcdt, order)  # (B, L, E)
        out = self.out_proj(y)  # (B, L, D)
        return out if self.out_proj.bias is None else out + self.out_proj.bias  # one bias per pass

    def split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_proj's output (..., 2E + 2GN + nh) -> z (..., E), xBC (..., E + 2GN), dt (..., nh)."""
        E, GN = self.d_inner, self.n_groups * self.d_state
        return zxbcdt.split([E, E + 2 * GN, self.n_heads], dim=-1)

    def gate_and_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm(y * SiLU(z)), normalised per group; y, z (..., E); in z's dtype."""
        return self.norm_groups(y * F.silu(z.float())).to(z.dtype)

    def norm_groups(self, y: torch.Tensor) -> torch.Tensor:
        return self.norm(y.unflatten(-1, (self.n_groups, -1))).flatten(-2)  # (..., G, E/G) -> (..., E)

    def ssd_and_norm(self, zxbcdt: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """One causal pass from in_proj's output (B, L, 2E + 2GN + nh) to RMSNorm(y * SiLU(z)) (B, L, E),
        along the step order (B, L) when one is given (the reversed pass), by position either way."""
        batch, L, _ = zxbcdt.shape
        fused = self.scan_implementation == "fused" or (self.scan_implementation == "auto" and ssm_cpu.serves(zxbcdt))
        if order is not None and not fused:  # the PyTorch paths run on a reordered copy
            return positions_of_steps(self.ssd_and_norm(steps_in_order(zxbcdt, order)), order)
        z, xBC, dt = self.split(zxbcdt)
        fused_conv = self.scan_implementation in ("auto", "fused")
        xBC = conv_silu(xBC, self.conv1d.weight, self.conv1d.bias, fused=fused_conv, order=order)  # (B, L, E + 2GN)
        xs, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        xs = xs.unflatten(-1, (self.n_heads, self.head_dim))  # (B, L, nh, P)
        A = -torch.exp(self.A_log.float())  # (nh,)
        groups = (batch, L, self.n_groups, self.d_state)
        B, C = B.reshape(groups), C.reshape(groups)
        if fused:  # the D skip, dt's bias and softplus and the gate inside the kernel
            y = ssd_by_selective_scan(xs, dt, A, B, C, D=self.D, z=z, dt_bias=self.dt_bias, dt_softplus=True,
                                      order=order)
            return self.norm_groups(y).to(z.dtype)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, nh)
        if self.scan_implementation == "reference":
            y = ssd_reference(xs, dt, A, B, C)[0]
        else:
            y = ssd(xs, dt, A, B, C, chunk_size=self.chunk_size)  # (B, L, nh, P)
        y = y + xs.float() * self.D.float()[:, None]
        return self.gate_and_norm(y.flatten(-2), z)

    def step(self, x_t: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One token: x_t (B, D); state (conv (B, E + 2GN, d_conv), ssm (B, nh, P, N)) or None."""
        if self.bidirectional:
            raise RuntimeError("Mamba2.step needs a causal block; this one is bidirectional (a non-causal task)")
        batch = x_t.shape[0]
        z, xBC, dt = self.split(self.in_proj(x_t))
        if state is None:
            state = (x_t.new_zeros(batch, xBC.shape[-1], self.d_conv),
                     x_t.new_zeros(batch, self.n_heads, self.head_dim, self.d_state, dtype=torch.float32))
        conv_state, ssm_state = state
        conv_state = torch.cat([conv_state[..., 1:], xBC.unsqueeze(-1)], dim=-1)  # the last d_conv inputs
        xBC = (conv_state * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xs, B, C = F.silu(xBC).split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], -1)
        xs = xs.view(batch, self.n_heads, self.head_dim).float()  # (B, nh, P)
        B, C = (_heads(t.view(batch, 1, self.n_groups, self.d_state), self.n_heads)[:, 0].float() for t in (B, C))
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, nh)
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))  # (B, nh)
        ssm_state = decay[..., None, None] * ssm_state + (dt[..., None] * xs)[..., None] * B[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", ssm_state, C) + xs * self.D.float()[:, None]  # (B, nh, P)
        return self.out_proj(self.gate_and_norm(y.flatten(-2), z)), (conv_state, ssm_state)
