"""H3 (Fu, Dao, Saab, Thomas, Rudra & Re 2023, "Hungry Hungry Hippos: Towards Language Modeling
with State Space Models", ICLR 2023, arXiv 2212.14052), after HazyResearch/safari's
``src/models/sequence/h3.py``:

    q, k, v = W_q x, W_k x, W_v x                                   (B, L, D) each
    k <- shift_SSM(k) + D_k k          a short causal convolution: a shift state matrix (N taps)
    per head h (D / head_dim heads): kv = k_h v_h^T                  (B, d1, d2, L) outer products
    y_h = diag_SSM(kv) + D_h kv        S4D-Lin kernel, ZOH, one kernel per head, FFT convolution
    out = W_o (sum_d1 q_h[d1] y_h[d1, :])                            (B, L, D)

The shift SSM: x_t = shift(x_{t-1}) + B u_t, y_t = C . x_t, whose kernel is the cross-correlation
K[m] = sum_i B_i C_{i+m}, m < N (B starts as e_1, so K starts as C). The diagonal SSM is
:class:`architectures.ssm.S4DKernel` (S4D-Lin, what safari's H3 config ``mode: diag,
measure: diag-lin`` builds). Both convolutions are causal, so H3 is used causally on every task.
:func:`causal_conv_reference` is the direct sum the FFT convolution must equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from architectures.ssm import S4DKernel, kernel_convolution


def causal_conv_reference(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s<=t} K[..., t-s] u[..., s] as a plain sum over lags; u (..., L), K broadcastable."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for m in range(min(L, K.shape[-1])):
        y[..., m:] += K[..., m:m + 1] * u[..., : L - m]
    return y


class H3(nn.Module):
    """The H3 mixer: (B, L, D) -> (B, L, D).

    Args:
        d_model: width D.
        causal: the task forbids looking ahead (H3 is causal either way).
        layer_idx: position in the stack (unused).
        d_state: N, the shift SSM's number of taps and the diagonal SSM's state size (N / 2 modes).
        head_dim: size of each head's k v^T outer product (1 in the paper's synthetic runs).
        dt_min, dt_max: initial step-size range of the diagonal SSM.
        ssm_lr: learning rate of the SSM parameters (dt, A, the shift B), no weight decay.
    """

    def __init__(self, d_model: int, *, causal: bool, layer_idx: int = 0, d_state: int, head_dim: int,
                 dt_min: float, dt_max: float, ssm_lr: float):
        super().__init__()
        if d_model % head_dim:
            raise ValueError(f"model.mixer.head_dim={head_dim} must divide d_model={d_model}")
        self.head_dim, self.n_heads, self.d_state = head_dim, d_model // head_dim, d_state
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, d_model) for _ in range(3))
        # shift SSM (safari's SSKernelShift): B = e_1, C like a Conv1d weight (kaiming uniform)
        self.shift_B = nn.Parameter(torch.zeros(d_model, d_state).index_fill_(1, torch.tensor([0]), 1.0))
        self.shift_C = nn.Parameter(torch.empty(d_model, d_state))
        nn.init.kaiming_uniform_(self.shift_C, a=math.sqrt(5))
        self.shift_B._optim = {"lr": ssm_lr, "weight_decay": 0.0}
        self.shift_D = nn.Parameter(torch.randn(d_model))
        self.kernel = S4DKernel(self.n_heads, d_state=d_state, channels=1, dt_min=dt_min, dt_max=dt_max, ssm_lr=ssm_lr)
        self.D = nn.Parameter(torch.randn(self.n_heads))
        self.output_linear = nn.Linear(d_model, d_model)

    def shift_kernel(self) -> torch.Tensor:
        """K[m] = sum_i B_i C_{i+m}, m < N; (D, N)."""
        N = self.d_state
        B_f, C_f = torch.fft.rfft(self.shift_B, n=2 * N), torch.fft.rfft(self.shift_C, n=2 * N)
        return torch.fft.irfft(B_f.conj() * C_f, n=2 * N)[..., :N]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, convolve=None) -> torch.Tensor:
        """``convolve(u (..., C, L), K (C, L)) -> (..., C, L)``, the causal convolution (FFT by default)."""
        batch, L, _ = x.shape
        convolve = convolve or (lambda u_, K_: kernel_convolution(u_, K_[None], bidirectional=False))
        q, k, v = (proj(x).transpose(1, 2).float() for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, D, L)
        K_shift = self.shift_kernel()  # (D, N)
        k = convolve(k, K_shift[:, :L]) + self.shift_D[:, None] * k
        h, p = self.n_heads, self.head_dim
        # channel c = h * head_dim + d (safari's '(h d1)')
        kv = k.view(batch, h, p, 1, L) * v.view(batch, h, 1, p, L)  # (B, H, d1, d2, L)
        kv = kv.permute(0, 2, 3, 1, 4)  # (B, d1, d2, H, L)
        y = convolve(kv.reshape(batch, p * p, h, L), self.kernel(L)[0])
        y = y.view(batch, p, p, h, L) + self.D[:, None] * kv  # (B, d1, d2, H, L)
        y = (q.view(batch, h, p, L).permute(0, 2, 1, 3).unsqueeze(2) * y).sum(1)  # (B, d2, H, L)
        y = y.reshape(batch, p * h, L).transpose(1, 2)  # (B, L, D): channel d2 * H + h, as safari's '(d h)'
        return self.output_linear(y.to(x.dtype))

    def step(self, x_t: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One token: x_t (B, D); state (shift (B, D, N) real, diag (B, d1, d2, H, n) complex) or None."""
        batch = x_t.shape[0]
        h, p = self.n_heads, self.head_dim
        dtA, C_eff = self.kernel.discretize()  # (H, n), (1, H, n): ZOH input weight folded into C_eff
        if state is None:
            state = (x_t.new_zeros(batch, x_t.shape[1], self.d_state, dtype=torch.float32),
                     torch.zeros(batch, p, p, h, dtA.shape[-1], dtype=dtA.dtype, device=x_t.device))
        shift_state, diag_state = state
        q, k, v = (proj(x_t).float() for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, D)
        shift_state = torch.roll(shift_state, 1, dims=-1)
        shift_state[..., 0] = 0  # shift the taps along
        shift_state = shift_state + self.shift_B * k.unsqueeze(-1)
        k = (shift_state * self.shift_C).sum(-1) + self.shift_D * k  # (B, D)
        kv = k.view(batch, h, p, 1) * v.view(batch, h, 1, p)  # (B, H, d1, d2)
        kv = kv.permute(0, 2, 3, 1)  # (B, d1, d2, H)
        diag_state = torch.exp(dtA) * diag_state + kv.unsqueeze(-1)  # (B, d1, d2, H, n)
        y = 2 * (C_eff[0] * diag_state).sum(-1).real + self.D * kv  # (B, d1, d2, H)
        y = (q.view(batch, h, p).transpose(1, 2).unsqueeze(2) * y).sum(1)  # (B, d2, H)
        return self.output_linear(y.reshape(batch, p * h).to(x_t.dtype)), (shift_state, diag_state)
