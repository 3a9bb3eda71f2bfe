"""A candidate for Mamba's fused CPU scan, kept for bench/bench_scan_cpu.py --candidates: the same
algorithm as architectures/csrc/selective_scan_cpu.cpp in numba (``@njit(parallel=True)`` over
rows). numba is not a dependency of seq-arena; ``pip install numba`` to run it.
"""
import math

import numba
import numpy as np
import torch

from architectures.ssm import _finish, _prepare_delta, _time_major_BC

K = 64

@numba.njit(parallel=True, fastmath=True, cache=True)
def fwd(u, delta, A, B, C, y, ck, last):
    bsz, D, L = u.shape
    N = A.shape[1]
    G = B.shape[1]
    per = D // G
    for row in numba.prange(bsz * D):
        b = row // D; d = row % D; g = d // per
        h = np.zeros(N, np.float32)
        for t in range(L):
            if t % K == 0:
                ck[b, d, t // K, :] = h
            dt = delta[b, d, t]; du = dt * u[b, d, t]
            acc = np.float32(0.0)
            for n in range(N):
                h[n] = math.exp(dt * A[d, n]) * h[n] + du * B[b, g, t, n]
                acc += h[n] * C[b, g, t, n]
            y[b, d, t] = acc
        last[b, d, :] = h

@numba.njit(parallel=True, fastmath=True, cache=True)
def bwd(gy, gl, u, delta, A, B, C, ck, du_o, dd_o, dA, dB, dC):
    bsz, D, L = u.shape
    N = A.shape[1]
    G = B.shape[1]
    per = D // G
    nch = (L + K - 1) // K
    for bg in numba.prange(bsz * G):  # one task per (b, g): channels of a group share dB, dC rows
        b = bg // G; g = bg % G
        hbuf = np.empty((K + 1, N), np.float32); abuf = np.empty((K, N), np.float32)
        lam = np.empty(N, np.float32)
        for d in range(g * per, (g + 1) * per):
            lam[:] = gl[b, d]
            for c in range(nch - 1, -1, -1):
                t0 = c * K; T = min(K, L - t0)
                hbuf[0] = ck[b, d, c]
                for k in range(T):
                    dt = delta[b, d, t0 + k]; du = dt * u[b, d, t0 + k]
                    for n in range(N):
                        a = math.exp(dt * A[d, n]); abuf[k, n] = a
                        hbuf[k + 1, n] = a * hbuf[k, n] + du * B[b, g, t0 + k, n]
                for k in range(T - 1, -1, -1):
                    t = t0 + k
                    dt = delta[b, d, t]; ut = u[b, d, t]; gg = gy[b, d, t]; du = dt * ut
                    ddu = np.float32(0.0); ddA = np.float32(0.0)
                    for n in range(N):
                        l = lam[n] + gg * C[b, g, t, n]
                        dC[b, g, t, n] += gg * hbuf[k + 1, n]
                        dB[b, g, t, n] += l * du
                        ddu += l * B[b, g, t, n]
                        s = l * hbuf[k, n] * abuf[k, n]
                        ddA += s * A[d, n]
                        dA[b, d, n] += s * dt
                        lam[n] = l * abuf[k, n]
                    du_o[b, d, t] = ddu * dt
                    dd_o[b, d, t] = ddu * ut + ddA

class NumbaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        bsz, D, L = u.shape; N = A.shape[1]
        y = torch.empty_like(u); last = u.new_empty(bsz, D, N); ck = u.new_empty(bsz, D, (L + K - 1) // K, N)
        fwd(u.numpy(), delta.numpy(), A.numpy(), B.numpy(), C.numpy(), y.numpy(), ck.numpy(), last.numpy())
        ctx.save_for_backward(u, delta, A, B, C, ck)
        return y, last

    @staticmethod
    def backward(ctx, gy, gl):
        u, delta, A, B, C, ck = ctx.saved_tensors
        gy = gy.contiguous(); gl = torch.zeros(u.shape[0], u.shape[1], A.shape[1]) if gl is None else gl.contiguous()
        du = torch.empty_like(u); dd = torch.empty_like(u); dA = torch.zeros(u.shape[0], *A.shape)
        dB = torch.zeros_like(B); dC = torch.zeros_like(C)
        bwd(gy.numpy(), gl.numpy(), u.numpy(), delta.numpy(), A.numpy(), B.numpy(), C.numpy(), ck.numpy(),
            du.numpy(), dd.numpy(), dA.numpy(), dB.numpy(), dC.numpy())
        return du, dd, dA.sum(0), dB, dC


def numba_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """selective_scan_fused's contract, by the numba kernels."""
    batch, dim, L = u.shape
    u, delta = _prepare_delta(u, delta, A, delta_bias, delta_softplus)
    Bt, Ct = (_time_major_BC(X, batch, dim, L, name) for X, name in ((B, "B"), (C, "C")))
    y, _ = NumbaScan.apply(u.contiguous(), delta.contiguous(), A.float().contiguous(), Bt, Ct)
    return _finish(y, u, D, z)
