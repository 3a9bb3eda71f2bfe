"""State-space sequence mixing: the Mamba selective scan and the S4D layer.

* :func:`selective_scan` has the shapes and semantics of ``selective_scan_ref`` of the mamba-ssm
  package (Gu & Dao 2023). On CUDA it calls mamba-ssm's fused kernel when that package imports;
  everywhere else it runs :func:`selective_scan_torch`, a chunked scan in plain PyTorch.
  :func:`selective_scan_reference` is the sequential recurrence both must equal.
* :class:`S4D` is the diagonal state-space layer of Gu et al. 2022 ("On the Parameterization and
  Initialization of Diagonal State Space Models"), as the S4 repository's standalone ``S4D``
  layer: S4D-Lin init, ZOH discretisation, a convolution kernel applied by FFT, GELU, then a
  GLU output projection.

The Mamba block itself lives in :mod:`architectures.mamba`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures import ssm_cpu

try:  # the fused CUDA kernel; absent on CPU-only machines (it needs nvcc to build)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except ImportError:  # pragma: no cover - depends on the machine
    _cuda_selective_scan = None


# --------------------------------------------------------------------------- selective scan


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """The selective scan as a plain loop over time steps: the documentation of the semantics.

    x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t,  y_t = C_t . x_t,  out = (y + D u) * silu(z).

    Args:
        u, delta: (B, D, L).
        A: (D, N), real (negative for a stable system).
        B, C: (B, N, L) input-dependent, (B, G, N, L) shared by D/G channels each, or (D, N) fixed.
        D: (D,) skip connection, or None.
        z: (B, D, L) gate, or None.
        delta_bias: (D,) added to delta before the optional softplus.
        delta_softplus: apply softplus to delta.
        return_last_state: also return the state after the last step, (B, D, N).
    """
    dtype_in = u.dtype
    u, delta = _prepare_delta(u, delta, A, delta_bias, delta_softplus)
    Bm, Cm = _expand_BC(B, u.shape[1], "B"), _expand_BC(C, u.shape[1], "C")
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))  # (B, D, L, N)
    shape = (*u.shape, A.shape[1])
    dBu = (delta * u).unsqueeze(-1) * Bm.expand(shape)  # (B, D, L, N)
    Cm = Cm.expand(shape)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, D, N)
    ys = []
    for t in range(u.shape[2]):
        x = dA[:, :, t] * x + dBu[:, :, t]
        ys.append((x * Cm[:, :, t]).sum(-1))  # (B, D)
    out = _finish(torch.stack(ys, dim=-1), u, D, z).to(dtype_in)
    return (out, x) if return_last_state else out


def _expand_BC(X: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """B or C in any accepted layout -> broadcastable to (B, D, L, N)."""
    if X.is_complex():
        raise ValueError(f"selective_scan: complex {name} is not supported (A, B, C must be real)")
    if X.dim() == 2:  # fixed (D, N)
        return X.float()[None, :, None, :]  # (1, D, 1, N)
    if X.dim() == 3:  # (B, N, L)
        return X.float().transpose(1, 2)[:, None]  # (B, 1, L, N)
    if X.dim() == 4:  # (B, G, N, L): group g serves channels g*D/G .. (g+1)*D/G - 1
        groups = X.shape[1]
        if dim % groups:
            raise ValueError(f"selective_scan: {name} has {groups} groups, which do not divide D={dim}")
        return X.float().transpose(2, 3).repeat_interleave(dim // groups, dim=1)  # (B, D, L, N)
    raise ValueError(f"selective_scan: {name} must be (D, N), (B, N, L) or (B, G, N, L), got {tuple(X.shape)}")


def _refuse_complex_A(A: torch.Tensor) -> None:
    if A.is_complex():
        raise ValueError("selective_scan: only real A is supported (Mamba's S6 uses real A)")


def _prepare_delta(u, delta, A, delta_bias, delta_softplus):
    """u and delta in fp32, delta with its bias and softplus applied; refuses complex A."""
    _refuse_complex_A(A)
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.float(), delta


def _finish(y, u, D, z):
    out = y if D is None else y + u * D.float()[:, None]
    return out if z is None else out * F.silu(z.float())


def _chunk_scan(a: torch.Tensor, h: torch.Tensor, reverse: bool) -> torch.Tensor:
    """In place, h_t = a_t h_prev + h_t over dim 1 of (nc, T, ...) chunks; prev = t-1 (t+1 if reverse).

    Three passes, each a loop over the T positions of a chunk (all chunks at once) or over the
    nc chunks (all channels at once), never over all nc*T steps:
    1. a local scan inside every chunk from a zero state, keeping the chunk's total decay;
    2. the states at chunk boundaries, carried chunk to chunk;
    3. each chunk's entering state, decayed by the running product of a, added to the local scan.
    Every multiplier is some a in (0, 1], so nothing can overflow however long the sequence.
    """
    nc, T = h.shape[:2]
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    decay = a[:, order[0]].clone()  # (nc, ...) product of a over the chunk so far
    for prev, t in zip(order[:-1], order[1:]):
        h[:, t].addcmul_(a[:, t], h[:, prev])
        decay.mul_(a[:, t])
    enter = torch.zeros_like(decay)  # (nc, ...) the state entering each chunk
    state = torch.zeros_like(decay[0])
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        enter[c] = state
        state = decay[c] * state + h[c, order[-1]]
    carried = enter
    for t in order:
        carried = a[:, t] * carried  # (nc, ...) enter state decayed up to position t
        h[:, t] += carried
    return h


def _dot_n(h: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """sum_n h[..., d, n] X[..., d or 1, n] -> (..., D); X is (nc, T, B, 1, N), (1, 1, 1, D, N) or full."""
    if X.shape[-2] == 1:
        return torch.einsum("...dn,...n->...d", h, X.squeeze(-2))
    if X.shape[:3] == (1, 1, 1):
        return torch.einsum("...dn,dn->...d", h, X[0, 0, 0])
    return (h * X).sum(-1)


def _grad_like(h: torch.Tensor, g: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """The gradient of sum(g * _dot_n(h, X)) with respect to X, in X's shape; g is (..., D)."""
    if X.shape[-2] == 1:
        grad = torch.einsum("...dn,...d->...n", h, g).unsqueeze(-2)
    elif X.shape[:3] == (1, 1, 1):
        grad = torch.einsum("...dn,...d->dn", h, g)[None, None, None]
    else:
        grad = h * g.unsqueeze(-1)
    return grad.sum_to_size(X.shape)


class _ChunkedSelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(delta_t A) h_{t-1} + du_t B_t, over dims (0, 1) = (chunk, position).

    Inputs: delta, du (nc, T, B, D); A (D, N); B, C (nc, T, B, 1, N), (1, 1, 1, D, N) or
    (nc, T, B, D, N). Outputs y (nc, T, B, D) and the last state (B, D, N).

    The backward is the same scan run backwards in time: with lam_t = dL/dh_t (through every
    path), lam_t = g_t + a_{t+1} lam_{t+1}, dL/d(du_t B_t) = lam_t and dL/da_t = lam_t h_{t-1}.
    Only a = exp(delta A) and h are kept, (nc, T, B, D, N) each.
    """

    @staticmethod
    def forward(ctx, delta, du, A, B, C):
        a = torch.exp(delta.unsqueeze(-1) * A)  # (nc, T, B, D, N), in (0, 1] for A <= 0
        h = _chunk_scan(a, du.unsqueeze(-1) * B, reverse=False)  # (nc, T, B, D, N)
        ctx.save_for_backward(delta, du, A, B, C, a, h)
        return _dot_n(h, C), h[-1, -1]

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        delta, du, A, B, C, a, h = ctx.saved_tensors
        grad_y = grad_y.contiguous()  # small; einsum's bmm would copy a strided one batch by batch
        lam = grad_y.unsqueeze(-1) * C  # dL/dh through y, (nc, T, B, D, N)
        lam[-1, -1] += grad_last
        a_flat, h_flat = a.flatten(0, 1), h.flatten(0, 1)  # (L, B, D, N)
        buf = torch.empty_like(a)
        buf_flat = buf.flatten(0, 1)
        buf_flat[:-1] = a_flat[1:]  # a_{t+1}, zero past the end
        buf_flat[-1] = 0
        lam = _chunk_scan(buf, lam, reverse=True)
        buf_flat[0] = 0  # now dL/da_t = lam_t h_{t-1}, times a for dL/d(delta A)
        torch.mul(lam.flatten(0, 1)[1:], h_flat[:-1], out=buf_flat[1:])
        buf.mul_(a)
        grad_delta = torch.einsum("...dn,dn->...d", buf, A)
        grad_A = torch.einsum("...dn,...d->dn", buf, delta)
        return grad_delta, _dot_n(lam, B), grad_A, _grad_like(lam, du, B), _grad_like(h, grad_y, C)


def scan_chunk_size(L: int) -> int:
    """Chunk length for :func:`selective_scan_torch`: about sqrt(L), a power of two, at least 16.

    sqrt(L) balances the loop over positions in a chunk against the loop over chunks.
    """
    return max(16, 2 ** round(math.log2(max(L, 1)) / 2))


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, chunk_size: int | None = None):
    """The selective scan in plain PyTorch (any device), chunked; same semantics as the reference.

    The state is laid out time-major in chunks, (nc, T, B, D, N), so every step of the chunk
    loops reads one contiguous (B, D, N) slab per chunk. The sequence is padded to a multiple of
    the chunk length with delta = 0 and u = 0, which leaves the state unchanged (decay 1, input 0).
    """
    dtype_in = u.dtype
    batch, dim, L = u.shape
    u, delta = _prepare_delta(u, delta, A, delta_bias, delta_softplus)
    T = chunk_size or scan_chunk_size(L)
    nc = -(-L // T)
    pad = (0, nc * T - L)

    def chunked(x):  # (B, D, L) -> (nc, T, B, D)
        return F.pad(x, pad).permute(2, 0, 1).reshape(nc, T, batch, dim).contiguous()

    Bc, Cc = (_chunked_BC(X, nc, T, dim, pad, name) for X, name in ((B, "B"), (C, "C")))
    y, last = _ChunkedSelectiveScan.apply(chunked(delta), chunked(delta * u), A.float(), Bc, Cc)
    y = y.reshape(nc * T, batch, dim)[:L].permute(1, 2, 0)  # (B, D, L)
    out = _finish(y, u, D, z).to(dtype_in)
    return (out, last) if return_last_state else out


def _chunked_BC(X: torch.Tensor, nc: int, T: int, dim: int, pad: tuple[int, int], name: str) -> torch.Tensor:
    """B or C -> (nc, T, B, 1, N), or (1, 1, 1, D, N) when fixed, or (nc, T, B, D, N) when grouped."""
    if X.is_complex():
        raise ValueError(f"selective_scan: complex {name} is not supported (A, B, C must be real)")
    X = X.float()
    if X.dim() == 2:
        return X[None, None, None]  # (1, 1, 1, D, N)
    if X.dim() == 3:
        return F.pad(X, pad).permute(2, 0, 1).reshape(nc, T, X.shape[0], 1, X.shape[1]).contiguous()
    if X.dim() == 4:
        batch, groups, N, _ = X.shape
        if dim % groups:
            raise ValueError(f"selective_scan: {name} has {groups} groups, which do not divide D={dim}")
        X = F.pad(X, pad).permute(3, 0, 1, 2).repeat_interleave(dim // groups, dim=2)  # (Lp, B, D, N)
        return X.reshape(nc, T, batch, dim, N).contiguous()
    raise ValueError(f"selective_scan: {name} must be (D, N), (B, N, L) or (B, G, N, L), got {tuple(X.shape)}")


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, order=None):
    """The selective scan by the fused CPU kernel of :mod:`architectures.ssm_cpu`; same semantics.

    Only (B, D, L)-sized tensors and B, C are read and written. The kernel works channels-last: u,
    delta and z that are transposed views of (B, L, D) tensors (as the Mamba mixer passes them) go
    in without a copy, others are copied once, and the output is such a view. B and C go in
    time-major, (B, G, L, N), as views where their strides allow; a fixed (D, N) B or C is
    broadcast over batch and time (stride 0). With a step order (B, L) int64, step t of row b
    is position order[b, t] (the kernel reads and writes there: a reversed pass without copies).
    Raises RuntimeError when the extension cannot be built; see :func:`selective_scan`.
    """
    if ssm_cpu.extension() is None:
        raise RuntimeError(f"selective_scan: the fused CPU scan is unavailable ({ssm_cpu._unavailable})")
    _refuse_complex_A(A)
    dtype_in = u.dtype
    batch, dim, L = u.shape
    Bt, Ct = (time_major_BC(X, batch, dim, L, name) for X, name in ((B, "B"), (C, "C")))

    def vector(v):  # D, delta_bias (D,)
        return None if v is None else v.float().contiguous()

    channels_last = ssm_cpu.channels_last
    out, last = ssm_cpu.FusedSelectiveScan.apply(
        channels_last(u.float()), channels_last(delta.float()), A.float().contiguous(), Bt, Ct, vector(D),
        None if z is None else channels_last(z.float()), vector(delta_bias), delta_softplus, order)
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out


def time_major_BC(X: torch.Tensor, batch: int, dim: int, L: int, name: str) -> torch.Tensor:
    """B or C -> (B, G, L, N) fp32 with unit stride over N: (B, N, L) gives G = 1, (B, G, N, L)
    gives G groups and a fixed (D, N) gives G = D broadcast over batch and time (views where possible)."""
    if X.is_complex():
        raise ValueError(f"selective_scan: complex {name} is not supported (A, B, C must be real)")
    X = X.float()
    if X.dim() == 2:
        X = X.contiguous()[None, :, None, :].expand(batch, -1, L, -1)  # (B, D, L, N), strides (0, N, 0, 1)
    elif X.dim() == 3:
        X = X.transpose(1, 2).unsqueeze(1)  # (B, 1, L, N)
    elif X.dim() == 4:
        if dim % X.shape[1]:
            raise ValueError(f"selective_scan: {name} has {X.shape[1]} groups, which do not divide D={dim}")
        X = X.transpose(2, 3)  # (B, G, L, N)
    else:
        raise ValueError(f"selective_scan: {name} must be (D, N), (B, N, L) or (B, G, N, L), got {tuple(X.shape)}")
    return X if X.stride(-1) == 1 else X.contiguous()


SCAN_IMPLEMENTATIONS = ("auto", "fused", "chunked", "reference")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, scan: str = "auto"):
    """Mamba's selective scan; shapes and semantics of mamba-ssm's ``selective_scan_ref``.

    ``scan`` picks the implementation (the Mamba mixer's ``model.mixer.scan``):

    * ``auto``: the fused kernel where there is one, else the chunked scan. Fused means
      mamba-ssm's kernel for CUDA tensors when mamba-ssm imports, and :func:`selective_scan_fused`
      for CPU tensors with input-dependent B and C when its extension builds (if it cannot, one
      warning, then the chunked scan).
    * ``fused``: as ``auto``, but also for a fixed (D, N) B or C on CPU.
    * ``chunked``: :func:`selective_scan_torch`, plain PyTorch on any device.
    * ``reference``: :func:`selective_scan_reference`, the sequential loop (slow; for checking).

    See :func:`selective_scan_reference` for the other arguments.

    Returns:
        out (B, D, L) in u's dtype, and with ``return_last_state`` the final state (B, D, N).
    """
    if scan not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"selective_scan: scan (model.mixer.scan) must be one of {SCAN_IMPLEMENTATIONS}, got {scan!r}")
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if scan == "reference":
        return selective_scan_reference(*args)
    if scan != "chunked":
        if u.is_cuda and _cuda_selective_scan is not None:
            return _cuda_selective_scan(*args)
        fixed_BC = B.dim() == 2 or C.dim() == 2
        if u.device.type == "cpu" and (scan == "fused" or not fixed_BC) and ssm_cpu.extension() is not None:
            return selective_scan_fused(*args)
    return selective_scan_torch(*args)


# --------------------------------------------------------------------------- S4D


def kernel_convolution(u: torch.Tensor, K: torch.Tensor, *, bidirectional: bool) -> torch.Tensor:
    """y = K * u by FFT (zero-padded to 2L, so not circular); u (B, H, L), K (c, H, L) -> (B, H, L).

    Causal: y_t = sum_{s<=t} K[0][t-s] u_s. Bidirectional (c = 2, S4 repo style): the second kernel
    runs backwards in time, y_t += sum_{s>t} K[1][s-t-1] u_s.
    """
    L = u.shape[-1]
    if bidirectional:
        K = F.pad(K[0], (0, L)) + F.pad(K[1].flip(-1), (L, 0))  # (H, 2L): causal half, then anti-causal
    else:
        K = K[0]
    return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]


S4D_INITS = ("lin", "inv", "legs")


def s4d_init(init: str, N: int) -> torch.Tensor:
    """The imaginary parts of A (N/2,) of S4D's inits, as the S4 repository's ``dplr`` builds them
    (src/models/sequence/kernels/dplr.py; an S4D run there is ``model.layer.mode=diag
    model.layer.init=diag-<init>``). The real part is -1/2 for all three; for mode n = 0 .. N/2 - 1

    * ``lin``: pi n;
    * ``inv``: (N / pi) (N / (2n + 1) - 1);
    * ``legs``: the eigenvalues of HiPPO-LegS's normal part S = A + P P^T (-1/2 plus a skew
      matrix; P_n = (n + 1/2)^(1/2)), one of each conjugate pair.

    B is 1 for every init, ``dplr``'s default ``B_init='constant'`` (the configs do not set it).
    """
    if init not in S4D_INITS:
        raise ValueError(f"model.mixer.init must be one of {S4D_INITS}, got {init!r}")
    n = torch.arange(N // 2, dtype=torch.float64)
    if init == "lin":
        return (math.pi * n).float()
    if init == "inv":
        return (N / math.pi * (N / (2 * n + 1) - 1)).float()
    k = torch.arange(N, dtype=torch.float64)
    r = (2 * k + 1).sqrt()
    A = -torch.tril(r[:, None] * r[None, :], -1) - torch.diag(k + 1)  # HiPPO-LegS
    P = (k + 0.5).sqrt()
    skew = A + P[:, None] * P[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)  # S + 1/2 I: skew-symmetric
    lam = torch.linalg.eigvalsh(-1j * skew.to(torch.complex128))  # skew v = i lam v
    return lam[lam > 0].float()  # one eigenvalue of each conjugate pair


class S4DKernel(nn.Module):
    """S4D's convolution kernel (Gu et al. 2022), S4D-Lin, -Inv or -LegS init, ZOH discretisation.

    With n = d_state / 2 complex modes (each stands for a conjugate pair, hence the 2 Re below),
    A_n = -exp(log_A_real) + i A_imag (-0.5 + i pi n at init under S4D-Lin; :func:`s4d_init`),
    dt = exp(log_dt):

        K[l] = 2 Re( sum_n C_n (exp(dt A_n) - 1) / A_n * exp(dt A_n l) ),  l = 0 .. L-1.

    The powers exp(dt A l) are never materialised as an (H, n, L) tensor: with l = q Lb + r and
    Lb ~ sqrt(L), exp(dt A l) = exp(dt A Lb q) exp(dt A r), so K is one batched real matmul of an
    (H, Q, 2n) by an (H, 2n, Lb) factor; every exponent has a non-positive real part.

    Args:
        d_model: number of channels H.
        d_state: state size N (N / 2 complex modes).
        channels: independent kernels sharing A and dt (2 for a bidirectional layer).
        dt_min, dt_max: log_dt is drawn uniformly in [log dt_min, log dt_max].
        ssm_lr: learning rate of A and dt (marked with ``_optim``, no weight decay), as in S4.
        init: ``lin``, ``inv`` or ``legs`` (:func:`s4d_init`).
        dt_lr: learning rate of dt instead of ``ssm_lr`` (None: ``ssm_lr``; S4's ``lr: {dt: null}``
            leaves dt at the optimizer's lr).
        train_B: B (H, n) as a parameter, initialised to 1 and trained at ``ssm_lr`` without weight
            decay, as the S4 repository's diagonal kernel (``B_init='constant'``, registered with A's
            lr). False: B = 1, folded into C (the kernel depends only on C B, so this changes only
            how training moves them).
    """

    def __init__(self, d_model: int, *, d_state: int, channels: int, dt_min: float, dt_max: float, ssm_lr: float,
                 init: str = "lin", dt_lr: float | None = None, train_B: bool = False):
        super().__init__()
        if d_state % 2:
            raise ValueError(f"model.mixer.d_state must be even (conjugate pairs), got {d_state}")
        H, n = d_model, d_state // 2
        A_imag = s4d_init(init, d_state)
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.full((H, n), math.log(0.5)))
        self.A_imag = nn.Parameter(A_imag.repeat(H, 1))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, H, n, dtype=torch.cfloat)))  # (c, H, n, 2)
        self.B = nn.Parameter(torch.view_as_real(torch.ones(H, n, dtype=torch.cfloat))) if train_B else None  # (H, n, 2)
        for p in (self.log_A_real, self.A_imag, self.B):
            if p is not None:
                p._optim = {"lr": ssm_lr, "weight_decay": 0.0}
        self.log_dt._optim = {"lr": ssm_lr if dt_lr is None else dt_lr, "weight_decay": 0.0}
        self._cache: tuple | None = None

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """dt A (H, n) and the ZOH-scaled output weights C B (exp(dt A) - 1) / A, (c, H, n); complex."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # (H, n)
        dtA = A * torch.exp(self.log_dt).unsqueeze(-1)  # (H, n)
        C = torch.view_as_complex(self.C)  # (c, H, n)
        if self.B is not None:
            C = C * torch.view_as_complex(self.B)
        return dtA, C * torch.expm1(dtA) / A

    def forward(self, L: int, use_cache: bool = True) -> torch.Tensor:
        """The kernels (c, H, L). Without autograd the last one is reused until a parameter changes."""
        key = (L, self.C.device, *(p._version for p in self.parameters()))
        if use_cache and not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        dtA, C_eff = self.discretize()
        c, H, n = C_eff.shape
        Lb = math.ceil(math.sqrt(L))
        Q = -(-L // Lb)
        steps = torch.arange(max(Lb, Q), device=dtA.device, dtype=torch.float32)
        inner = torch.exp(dtA.unsqueeze(-1) * steps[:Lb])  # (H, n, Lb)
        outer = C_eff.unsqueeze(-1) * torch.exp(dtA.unsqueeze(-1) * (Lb * steps[:Q]))  # (c, H, n, Q)
        # Re(sum_n w v) = sum_n (Re w Re v - Im w Im v): one real matmul over 2n
        left = torch.cat([outer.real, -outer.imag], dim=2).transpose(2, 3)  # (c, H, Q, 2n)
        right = torch.cat([inner.real, inner.imag], dim=1)  # (H, 2n, Lb)
        K = 2 * (left @ right).reshape(c, H, Q * Lb)[..., :L]  # (c, H, L)
        if not torch.is_grad_enabled():
            self._cache = (key, K)
        return K


class S4D(nn.Module):
    """The S4D layer as a mixer: FFT convolution with the S4D kernel, skip D, GELU, GLU projection.

    Bidirectional (S4 repo style) when the task is not causal and ``bidirectional`` is set: a
    second kernel runs backwards in time, y_t = sum_{s<=t} K0[t-s] u_s + sum_{s>t} K1[s-t-1] u_s.
    Pads (right padding, ``mask`` False) are zeroed before the convolution, so a backward kernel
    never carries them into real positions.

    Args:
        d_model: width H; one SSM per channel.
        causal: the task forbids looking ahead.
        layer_idx: position in the stack (unused).
        d_state: state size N per channel (N / 2 complex modes).
        dt_min, dt_max: range of the initial step size.
        ssm_lr: learning rate of A and dt.
        bidirectional: use a backward kernel too when ``causal`` is False.
        dropout: dropout after the GELU.
        init: S4D-Lin, -Inv or -LegS (``lin``, ``inv``, ``legs``; :func:`s4d_init`).
        dt_lr: learning rate of dt instead of ``ssm_lr`` (None: ``ssm_lr``).
        train_B: B as a trained parameter (:class:`S4DKernel`).
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, d_state: int, dt_min: float, dt_max: float,
        ssm_lr: float, bidirectional: bool, dropout: float = 0.0, init: str = "lin", dt_lr: float | None = None,
        train_B: bool = False,
    ):
        super().__init__()
        self.bidirectional = bidirectional and not causal
        self.kernel = S4DKernel(d_model, d_state=d_state, channels=2 if self.bidirectional else 1,
                                dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr, init=init, dt_lr=dt_lr,
                                train_B=train_B)
        self.D = nn.Parameter(torch.randn(d_model))
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(d_model, 2 * d_model)  # then GLU back to d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        L = x.shape[1]
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        u = x.transpose(1, 2).float()  # (B, H, L)
        y = kernel_convolution(u, self.kernel(L), bidirectional=self.bidirectional)
        y = y + u * self.D.unsqueeze(-1)  # (B, H, L)
        return self.project(y.transpose(1, 2).to(x.dtype))

    def project(self, y: torch.Tensor) -> torch.Tensor:
        return F.glu(self.output_linear(self.dropout(F.gelu(y))), dim=-1)

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: x_t (B, H), state (B, H, n) complex or None -> y_t (B, H), state."""
        if self.bidirectional:
            raise RuntimeError("S4D.step needs a causal layer; this one is bidirectional (a non-causal task)")
        dtA, C_eff = self.kernel.discretize()  # C_eff folds in the ZOH input weight (exp(dtA)-1)/A
        if state is None:
            state = torch.zeros(*x_t.shape, dtA.shape[-1], dtype=dtA.dtype, device=x_t.device)
        state = torch.exp(dtA) * state + x_t.unsqueeze(-1)  # (B, H, n)
        y = 2 * (C_eff[0] * state).sum(-1).real + self.D * x_t  # (B, H)
        return self.project(y), state
