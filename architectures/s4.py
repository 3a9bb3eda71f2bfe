"""S4 (Gu, Goel & Re 2022, "Efficiently Modeling Long Sequences with Structured State Spaces", ICLR
2022, arXiv 2111.00396): the state matrix in normal-plus-low-rank form A = Lambda - P P^*, HiPPO-LegS
initialisation, bilinear discretisation, and the kernel computed from its generating function at the
roots of unity with a Cauchy kernel and the Woodbury identity, as the state-spaces/s4 repository's
standalone layer (models/s4/s4.py, ``SSMKernelDPLR``, ``FFTConv``, ``S4Block``) does.

    x (B, L, H) -> FFT convolution with K (one SSM per channel, N = d_state) + D x -> GELU
      -> dropout -> Linear(H, 2H) -> GLU                                   (as the S4D layer)

Kernel (Lemma/Algorithm 1 of the paper). With dA = (I - dt/2 A)^-1 (I + dt/2 A) and
dB = (I - dt/2 A)^-1 dt B (bilinear), K[l] = C dA^l dB for l < Lk. The parameter ``C`` is the
repository's C~ = C (I - dA^Lk) for the kernel length Lk = ``l_max`` (the true output matrix C is a
function of it), so that the truncated generating function at z = omega^k, omega = exp(-2 pi i / Lk),

    sum_{l<Lk} K[l] omega^{kl} = C~ (I - dA omega^k)^-1 dB
                               = 2/(1+omega^k) C~ (s_k - dt A)^-1 dt B,  s_k = 2 (1-omega^k)/(1+omega^k),

needs only the resolvent of a diagonal matrix (a Cauchy kernel) and a rank-r Woodbury correction;
one inverse FFT gives K. Here the factor 2/(1+omega) is folded into the Cauchy denominators
(sum v / (2(1-omega) - w (1+omega))), which removes the 0/0 the repository meets at omega = -1.

Inputs longer than ``l_max`` use a kernel of the next length l_max * 2^k, with C~ recomputed
exactly from the dense discretised matrices (the repository doubles its C~ in place instead); the
first l_max entries of every such kernel are the same numbers, so the model is one SSM whatever the
input length. Only the portable PyTorch Cauchy path exists: the repository's pykeops / CUDA Cauchy
kernels are not used (the portable path processes the FFT nodes in chunks, recomputed in the
backward pass, so its memory is O(H N + H L) rather than O(H N L)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from architectures.ssm import kernel_convolution


def _conj(x: torch.Tensor) -> torch.Tensor:
    """Half of the conjugate pairs (..., n) -> all of them (..., 2n)."""
    return torch.cat([x, x.conj()], dim=-1)


def hippo_legs_nplr(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in NPLR form, diagonalised: (Lambda (N/2,), P (N/2,), B (N/2,)), complex64.

    LegS: A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); B_n = sqrt(2n+1).
    With P_n = sqrt(n + 1/2), A + P P^T = -I/2 + S with S skew-symmetric, so A = V (Lambda - V^*P
    (V^*P)^*) V^* with Lambda = -1/2 + i eig(-i S). One of each conjugate pair of eigenvalues is
    kept (the negative imaginary ones, as the S4 repository's ``nplr``), and B's imaginary part is
    clipped to [-2, 2] as there (``B_clip``).
    """
    if N % 2:
        raise ValueError(f"model.mixer.d_state must be even (conjugate pairs), got {N}")
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    A = torch.where(n[:, None] > n[None, :], -r[:, None] * r[None, :], torch.zeros(()))
    A = A - torch.diag(n + 1)
    B = r
    P = torch.sqrt(n + 0.5)
    S = A + P[:, None] * P[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)  # skew-symmetric
    W_im, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # S = V diag(i W_im) V^*
    order = torch.argsort(W_im)[: N // 2]  # negative imaginary halves of the pairs
    Lam = -0.5 + 1j * W_im[order]
    V = V[:, order]  # (N, N/2)
    B = V.conj().T @ B.to(V.dtype)
    P = V.conj().T @ P.to(V.dtype)
    B = torch.complex(B.real, B.imag.clamp(-2.0, 2.0))
    return Lam.to(torch.complex64), P.to(torch.complex64), B.to(torch.complex64)


def cauchy_reference(v: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_n v_n / (a - w_n b) over n and the conjugate partners; v (..., H, n), w (H, n), a, b (M,).

    The plain version (the S4 repository's ``cauchy_naive`` with its 2/(1+omega) folded in):
    materialises the (H, 2n, M) Cauchy matrix 1 / (a - w b), once for all leading rows of v, and
    multiplies. Returns (..., H, M).
    """
    v, w = _conj(v), _conj(w)
    cauchy_matrix = 1 / (a - w.unsqueeze(-1) * b)  # (H, 2n, M), shared by every leading row of v
    return torch.einsum("...hn,hnm->...hm", v, cauchy_matrix)  # one bmm per channel h


def cauchy(v: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
           chunk: int | None = None) -> torch.Tensor:
    """:func:`cauchy_reference` over chunks of the M nodes, each recomputed in the backward pass.

    Peak memory is one chunk's (H, 2n, chunk) matrix instead of the whole (H, 2n, M).
    """
    chunk = chunk or max(1, (1 << 21) // (w.numel() * 2))  # about 2M entries of the Cauchy matrix
    if a.shape[0] <= chunk:
        return cauchy_reference(v, w, a, b)
    parts = []
    for start in range(0, a.shape[0], chunk):
        a_c, b_c = a[start:start + chunk], b[start:start + chunk]
        if torch.is_grad_enabled() and (v.requires_grad or w.requires_grad):
            parts.append(checkpoint(cauchy_reference, v, w, a_c, b_c, use_reentrant=False))
        else:
            parts.append(cauchy_reference(v, w, a_c, b_c))
    return torch.cat(parts, dim=-1)


class DPLRKernel(nn.Module):
    """S4's convolution kernel from the NPLR/DPLR parameters; (c, H, L) for any L.

    Parameters (n = d_state / 2 complex modes; S = n_ssm independent copies of A, B, P, each serving
    H / S channels; dt per channel): log_dt (H,), log_A_real and A_imag (S, n) with
    Lambda = -exp(log_A_real) + i A_imag, B (S, n), P (rank, S, n), C = C~ (c, H, n), complex ones
    stored as real views. dt, Lambda, B and P carry ``_optim`` (lr ``ssm_lr``, no weight decay),
    as the S4 repository's ``lr: {dt, A, B}`` and ``wd: 0``; dt's lr is ``dt_lr`` where given (its
    ListOps, Text and Retrieval configs leave dt at the optimizer's lr: ``lr: {dt: null}``).

    Args:
        d_model: number of channels H.
        d_state: state size N (N / 2 complex modes).
        channels: kernels per channel (2 for a bidirectional layer).
        l_max: kernel length Lk that C~ refers to (the task's length).
        rank: rank of the low-rank part (1 for LegS).
        n_ssm: independent copies of (A, B, P); None for one per channel.
        dt_min, dt_max: log dt drawn uniformly in [log dt_min, log dt_max].
        ssm_lr: learning rate of dt, A, B and P.
        dt_lr: learning rate of dt instead of ``ssm_lr`` (None: ``ssm_lr``).
    """

    def __init__(self, d_model: int, *, d_state: int, channels: int, l_max: int, rank: int, n_ssm: int | None,
                 dt_min: float, dt_max: float, ssm_lr: float, dt_lr: float | None = None):
        super().__init__()
        H, S = d_model, n_ssm or d_model
        if H % S:
            raise ValueError(f"model.mixer.n_ssm={S} must divide d_model={H}")
        if l_max < 1:
            raise ValueError(f"model.mixer.l_max must be a positive length, got {l_max}")
        self.l_max, self.repeat = l_max, H // S
        Lam, P, B = hippo_legs_nplr(d_state)
        P = torch.cat([P[None], torch.zeros(rank - 1, *P.shape, dtype=P.dtype)])  # rank > 1: zero columns
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.log(-Lam.real).repeat(S, 1))  # (S, n)
        self.A_imag = nn.Parameter(Lam.imag.repeat(S, 1))
        self.B = nn.Parameter(torch.view_as_real(B.repeat(S, 1)).clone())  # (S, n, 2)
        self.P = nn.Parameter(torch.view_as_real(P[:, None].repeat(1, S, 1)).clone())  # (r, S, n, 2)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, H, d_state // 2, dtype=torch.cfloat)))
        for p in (self.log_A_real, self.A_imag, self.B, self.P):
            p._optim = {"lr": ssm_lr, "weight_decay": 0.0}
        self.log_dt._optim = {"lr": ssm_lr if dt_lr is None else dt_lr, "weight_decay": 0.0}
        self._cache: tuple | None = None

    def params(self) -> tuple[torch.Tensor, ...]:
        """dt (H,), Lambda (H, n), B (H, n), P (r, H, n), C~ (c, H, n); complex, copies repeated to H."""
        Lam = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        rep = lambda x: x.repeat_interleave(self.repeat, dim=-2)  # (.., S, n) -> (.., H, n)
        return (torch.exp(self.log_dt), rep(Lam), rep(torch.view_as_complex(self.B)),
                rep(torch.view_as_complex(self.P)), torch.view_as_complex(self.C))

    def discretize(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dense bilinear SSM over all N states: dA (H, N, N), dB (H, N), dC (c, H, N).

        dC is the true output matrix, C~ (I - dA^l_max)^-1. With ``length``, the C~ of that kernel
        length is returned as the third value instead, C (I - dA^length), in the same (c, H, N).
        """
        dt, Lam, B, P, Ct = self.params()
        Pf = _conj(P)  # (r, H, N)
        A = torch.diag_embed(_conj(Lam)) - torch.einsum("rhm,rhn->hmn", Pf, Pf.conj())  # (H, N, N)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        half = dt[:, None, None] / 2 * A
        dA = torch.linalg.solve(eye - half, eye + half)  # (H, N, N)
        dB = torch.linalg.solve(eye - half, (dt[:, None] * _conj(B)).unsqueeze(-1)).squeeze(-1)  # (H, N)
        # row vectors: C (I - dA^L) = C~  <=>  (I - dA^L)^T C^T = C~^T
        dC = torch.linalg.solve((eye - torch.linalg.matrix_power(dA, self.l_max)).transpose(-1, -2),
                                _conj(Ct).unsqueeze(-1)).squeeze(-1)  # (c, H, N)
        if length is not None:
            dC = torch.einsum("chm,hmn->chn", dC, eye - torch.linalg.matrix_power(dA, length))
        return dA, dB, dC

    def forward(self, L: int, use_cache: bool = True) -> torch.Tensor:
        """The kernels (c, H, L). Without autograd the last one is reused until a parameter changes."""
        key = (L, self.C.device, *(p._version for p in self.parameters()))
        if use_cache and not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        Lk = self.l_max * 2 ** max(0, math.ceil(math.log2(L / self.l_max)))  # l_max, or doubled to cover L
        dt, Lam, B, P, Ct = self.params()
        if Lk != self.l_max:
            Ct = self.discretize(Lk)[2][..., : Lam.shape[-1]]  # C~ for length Lk, one of each pair
        omega = torch.exp(-2j * math.pi / Lk * torch.arange(Lk // 2 + 1, dtype=torch.float64))
        a, b = (2 * (1 - omega)).to(Ct.device, torch.cfloat), (1 + omega).to(Ct.device, torch.cfloat)  # (M,)
        r = P.shape[0]
        left = torch.cat([B.unsqueeze(0), P])  # (1 + r, H, n): B, then the low-rank columns
        right = torch.cat([Ct, P.conj()])  # (c + r, H, n): C~, then Q = conj(P)
        v = left.unsqueeze(1) * right.unsqueeze(0) * dt[:, None]  # (1 + r, c + r, H, n)
        g = cauchy(v, dt[:, None] * Lam, a, b)  # (1 + r, c + r, H, M); resolvent r = (1 + omega) g
        # g[a, b'] = right_b' R dt left_a with R = (s - dt Lambda)^-1, divided by (1 + omega)
        g00, g01, g10, g11 = g[0, :-r], g[0, -r:], g[1:, :-r], g[1:, -r:]  # (c|r, H, M), (r, c|r, H, M)
        # Woodbury, with A = Lambda - P P^*:
        # C~ (s - dtA)^-1 dtB = C~ R dtB - sum_ij (C~ R dtP_i) [(I + P^* R dtP)^-1]_ij (P_j^* R dtB)
        eye = torch.eye(r, dtype=g.dtype, device=g.device)
        inner = eye[:, :, None, None] + b * g11.transpose(0, 1)  # (r, r, H, M): [i, j] = 1 + P_i^* R dt P_j
        inner = torch.linalg.inv(inner.permute(2, 3, 0, 1))  # (H, M, r, r)
        corr = torch.einsum("ichm,hmij,jhm->chm", g10, inner, g01)  # (c, H, M)
        k_f = 2 * (g00 - b * corr)  # (c, H, M); the factor 2/(1+omega) is folded into g
        K = torch.fft.irfft(k_f, n=Lk)[..., :L]  # (c, H, L)
        if not torch.is_grad_enabled():
            self._cache = (key, K)
        return K


class S4(nn.Module):
    """The S4 layer as a mixer: FFT convolution with the DPLR kernel, skip D, GELU, GLU projection.

    Bidirectional on non-causal tasks when ``bidirectional`` is set (two kernels, the second run
    backwards in time, as the repository's ``bidirectional: true``); pads (``mask`` False) are
    zeroed first so a backward kernel never carries them into real positions.

    Args:
        d_model: width H; one SSM per channel.
        causal: the task forbids looking ahead.
        layer_idx: position in the stack (unused).
        d_state: state size N (N / 2 complex modes).
        l_max: the kernel length C~ refers to (the task's sequence length).
        rank: rank of the low-rank correction.
        n_ssm: independent copies of (A, B, P); None for one per channel.
        dt_min, dt_max: range of the initial step size.
        ssm_lr: learning rate of dt, A, B and P.
        dt_lr: learning rate of dt instead of ``ssm_lr`` (None: ``ssm_lr``).
        bidirectional: use a backward kernel too when ``causal`` is False.
        dropout: dropout after the GELU.
    """

    def __init__(
        self, d_model: int, *, causal: bool, layer_idx: int = 0, d_state: int, l_max: int, rank: int = 1,
        n_ssm: int | None = None, dt_min: float, dt_max: float, ssm_lr: float, bidirectional: bool,
        dropout: float = 0.0, dt_lr: float | None = None,
    ):
        super().__init__()
        self.bidirectional = bidirectional and not causal
        self.kernel = DPLRKernel(d_model, d_state=d_state, channels=2 if self.bidirectional else 1, l_max=l_max,
                                 rank=rank, n_ssm=n_ssm, dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr,
                                 dt_lr=dt_lr)
        self.D = nn.Parameter(torch.randn(d_model))
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(d_model, 2 * d_model)  # then GLU back to d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        u = x.transpose(1, 2).float()  # (B, H, L)
        y = kernel_convolution(u, self.kernel(x.shape[1]), bidirectional=self.bidirectional)
        y = y + u * self.D.unsqueeze(-1)  # (B, H, L)
        return self.project(y.transpose(1, 2).to(x.dtype))

    def project(self, y: torch.Tensor) -> torch.Tensor:
        return F.glu(self.output_linear(self.dropout(F.gelu(y))), dim=-1)

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token with the dense discretised SSM: x_t (B, H), state (B, H, N) complex or None.

        O(N^2) per channel and step (the repository's ``dense`` step mode).
        """
        if self.bidirectional:
            raise RuntimeError("S4.step needs a causal layer; this one is bidirectional (a non-causal task)")
        dA, dB, dC = self.kernel.discretize()
        if state is None:
            state = torch.zeros(*x_t.shape, dA.shape[-1], dtype=dA.dtype, device=x_t.device)
        state = torch.einsum("hmn,bhn->bhm", dA, state) + dB * x_t.unsqueeze(-1)  # (B, H, N)
        y = torch.einsum("hn,bhn->bh", dC[0], state).real + self.D * x_t  # (B, H)
        return self.project(y.to(x_t.dtype)), state
