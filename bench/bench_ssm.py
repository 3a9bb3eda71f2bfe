"""Timings for the state-space mixers (a measurement, not a test).

1. ``scan``: Mamba's selective scan, forward + backward, ours (chunked, plain PyTorch) beside
   mambapy's Blelloch parallel scan (``mambapy.pscan``) on the same shapes, when mambapy imports.
2. ``s4d``: S4D's kernel generation (naive Vandermonde vs the blocked form we use) beside the FFT
   convolution that applies it, over sequence lengths.

mambapy is not a dependency of seq-arena; run part 1 from a throwaway venv, e.g.::

    python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install torch==2.13.0 mambapy numpy
    PYTHONPATH=/work/main /tmp/benchvenv/bin/python bench/bench_ssm.py scan
    PYTHONPATH=/work/main /tmp/benchvenv/bin/python bench/bench_ssm.py s4d
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from architectures.ssm import S4DKernel, selective_scan_torch


def timeit(fn, *, warmup: int = 1, repeats: int = 5) -> tuple[float, float]:
    """Median and IQR of ``fn()`` wall time in ms, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return _median_iqr(times)


def mambapy_selective_scan(x, delta, A, B, C, D):
    """mambapy's MambaBlock.selective_scan (pscan mode), copied: (B, L, ED) layout."""
    from mambapy.pscan import pscan

    deltaA = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, ED, N)
    deltaB = delta.unsqueeze(-1) * B.unsqueeze(2)  # (B, L, ED, N)
    BX = deltaB * (x.unsqueeze(-1))  # (B, L, ED, N)
    hs = pscan(deltaA, BX)
    y = (hs @ C.unsqueeze(-1)).squeeze(3)  # (B, L, ED)
    return y + D * x


def bench_scan(args) -> None:
    device = args.device
    batch, dim, N = args.batch, 2 * args.d_model, args.d_state
    print(f"selective scan fwd+bwd, batch {batch}, d_inner {dim}, d_state {N}, device {device}, "
          f"threads {torch.get_num_threads()}")
    print("| L | ours ms (IQR) | mambapy pscan ms (IQR) | ours / mambapy (median of per-round ratios) |")
    print("|---|---|---|---|")
    for L in args.lengths:
        g = torch.Generator().manual_seed(0)
        u = torch.randn(batch, dim, L, generator=g).to(device)
        delta = F.softplus(torch.randn(batch, dim, L, generator=g) - 4).to(device)
        A = -torch.arange(1, N + 1).float().repeat(dim, 1).to(device)
        Bm, Cm = (torch.randn(batch, N, L, generator=g).to(device) for _ in range(2))
        D = torch.ones(dim, device=device)
        leaves = [t.requires_grad_() for t in (u, delta, Bm, Cm)]

        def ours():
            out = selective_scan_torch(u, delta, A, Bm, Cm, D)
            torch.autograd.grad(out.sum(), leaves)

        try:
            import mambapy  # noqa: F401
        except ImportError:
            ms, iqr = timeit(ours, repeats=args.repeats)
            print(f"| {L} | {ms:.0f} ({iqr:.0f}) | mambapy not installed | - |")
            continue
        # mambapy's layout is (B, L, ED); transposes are part of its own block, so not timed
        x_l, delta_l = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (u, delta))
        B_l, C_l = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (Bm, Cm))

        def theirs():
            out = mambapy_selective_scan(x_l, delta_l, A, B_l, C_l, D)
            torch.autograd.grad(out.sum(), [x_l, delta_l, B_l, C_l])

        # interleaved, one call of each per round, so a change in machine load hits both alike
        rounds = [(timeit(ours, warmup=0, repeats=1)[0], timeit(theirs, warmup=0, repeats=1)[0])
                  for _ in range(args.repeats + 2)][2:]  # two warm-up rounds (first touch of memory)
        ms, iqr = _median_iqr([r[0] for r in rounds])
        ms2, iqr2 = _median_iqr([r[1] for r in rounds])
        ratio = statistics.median(r[0] / r[1] for r in rounds)
        print(f"| {L} | {ms:.0f} ({iqr:.0f}) | {ms2:.0f} ({iqr2:.0f}) | {ratio:.2f} |")


def _median_iqr(times: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def naive_vandermonde(dtA: torch.Tensor, C_eff: torch.Tensor, L: int) -> torch.Tensor:
    """The S4 repo's kernel: materialise exp(dtA * l) for every l, (H, N/2, L) complex."""
    powers = torch.exp(dtA.unsqueeze(-1) * torch.arange(L, device=dtA.device))  # (H, n, L)
    return 2 * torch.einsum("chn,hnl->chl", C_eff, powers).real  # (c, H, L)


def bench_s4d(args) -> None:
    device = args.device
    H, batch = args.d_model, args.batch
    print(f"S4D kernel and FFT convolution (forward only), H {H}, d_state {args.s4d_state}, "
          f"batch {batch}, device {device}, threads {torch.get_num_threads()}")
    print("| L | kernel naive ms | kernel blocked ms | FFT conv ms | max abs diff naive-blocked |")
    print("|---|---|---|---|---|")
    kernel = S4DKernel(H, d_state=args.s4d_state, channels=1, dt_min=1e-3, dt_max=1e-1, ssm_lr=1e-3).to(device)
    for L in args.s4d_lengths:
        u = torch.randn(batch, H, L, device=device)
        with torch.no_grad():
            dtA, C_eff = kernel.discretize()
            t_naive, _ = timeit(lambda: naive_vandermonde(dtA, C_eff, L), repeats=args.repeats)
            t_block, _ = timeit(lambda: kernel(L, use_cache=False), repeats=args.repeats)
            K = kernel(L, use_cache=False)[0]  # (H, L)
            diff = (naive_vandermonde(dtA, C_eff, L)[0] - K).abs().max().item()

            def conv():
                k_f = torch.fft.rfft(K, n=2 * L)
                return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * k_f, n=2 * L)[..., :L]

            t_conv, _ = timeit(conv, repeats=args.repeats)
        print(f"| {L} | {t_naive:.1f} | {t_block:.1f} | {t_conv:.1f} | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["scan", "s4d"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--s4d-state", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--s4d-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_scan(args) if args.what == "scan" else bench_s4d(args)


if __name__ == "__main__":
    main()
