"""Mamba's selective scan on CPU: the fused C++ kernel against the chunked PyTorch scan (a
measurement, not a test), forward + backward, in the quickstart-speed layout's scan shape
(batch 4, d_model 64 so d_inner 128, d_state 16, B and C input-dependent (batch, N, L)).

    flock /tmp/arena-cpu.lock python bench/bench_scan_cpu.py                  # the table
    flock /tmp/arena-cpu.lock python bench/bench_scan_cpu.py --candidates     # + numba
    python bench/bench_scan_cpu.py --lengths 128 --compile                    # + torch.compile (minutes)

Each round calls every implementation once (interleaved, so a change in machine load hits all
alike); the table gives medians over rounds, the median of per-round ratios, and what autograd
saves for the backward. ``--candidates`` adds a tool the fused path was chosen against: the
same fused algorithm in numba (bench/scan_numba.py; numba is not a dependency). ``--compile`` times
``torch.compile`` of the chunked scan at the shortest length only: its chunk loops are unrolled
into the graph, so compiling takes minutes.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

from architectures import ssm_cpu
from architectures.ssm import selective_scan_fused, selective_scan_torch


def scan_inputs(L: int, batch: int, dim: int, N: int) -> list[torch.Tensor]:
    """u, delta (pre-softplus), A, B, C, D, z, delta_bias as the Mamba mixer passes them: u, delta,
    z (batch, dim, L) as views of (batch, L, dim) tensors."""
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(batch, L, dim, generator=g).transpose(1, 2) for _ in range(3))
    A = -torch.arange(1, N + 1).float().repeat(dim, 1)
    B, C = (torch.randn(batch, N, L, generator=g) for _ in range(2))
    D, delta_bias = torch.ones(dim), torch.full((dim,), -4.0)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def step_fn(scan, leaves):
    """One forward + backward of ``scan`` on ``leaves``; returns a callable and the bytes autograd saves."""
    def step():
        out = scan(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
        torch.autograd.grad(out.sum(), leaves)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scan(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return step, sum(unique.values())


def numba_scan():
    """The fused algorithm in numba, for comparison (bench-only; imports numba)."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from scan_numba import numba_selective_scan

    return numba_selective_scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-inner", type=int, default=128)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--candidates", action="store_true", help="also the numba kernel")
    parser.add_argument("--compile", action="store_true", help="also torch.compile of the chunked scan")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the table's IQR needs two rounds), got {args.rounds}")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if ssm_cpu.extension() is None:
        sys.exit(f"the fused CPU scan did not build: {ssm_cpu._unavailable}")
    print(f"fused extension ready in {time.perf_counter() - t0:.1f} s (build, or load from the cache)")
    scans = {"fused C++": selective_scan_fused, "chunked PyTorch": selective_scan_torch}
    if args.candidates:
        try:
            import numba

            numba.set_num_threads(args.threads)
            scans["fused numba"] = numba_scan()
        except ImportError:
            print("numba not installed: no numba column")
    print(f"selective scan forward + backward, batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, "
          f"{args.threads} threads; ms median over {args.rounds} rounds (IQR), saved-for-backward MiB")
    names = list(scans)
    print("| L | " + " | ".join(f"{n} ms | {n} MiB" for n in names) + " | chunked / fused |")
    print("|---|" + "---|---|" * len(names) + "---|")
    for L in args.lengths:
        leaves = scan_inputs(L, args.batch, args.d_inner, args.d_state)
        steps, saved = {}, {}
        for name, scan in scans.items():
            steps[name], saved[name] = step_fn(scan, leaves)
            steps[name]()  # warm-up: first touch of memory, numba's compile or cache load
        times = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                t = time.perf_counter()
                steps[name]()
                times[name].append(1e3 * (time.perf_counter() - t))
        cells = []
        for name in names:
            q = statistics.quantiles(times[name], n=4)
            cells.append(f"{statistics.median(times[name]):.1f} ({q[2] - q[0]:.1f}) | {saved[name] / 2**20:.1f}")
        ratio = statistics.median(c / f for c, f in zip(times["chunked PyTorch"], times["fused C++"]))
        print(f"| {L} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    if args.compile:
        compiled_candidate(args)


def compiled_candidate(args) -> None:
    """torch.compile of the chunked scan at the shortest length: compile time, then step time."""
    L = args.lengths[0]
    leaves = scan_inputs(L, args.batch, args.d_inner, args.d_state)
    compiled = torch.compile(selective_scan_torch)
    t = time.perf_counter()

    def run():
        out = compiled(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True)
        torch.autograd.grad(out.sum(), leaves)

    run()
    first = time.perf_counter() - t
    times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - t))
    print(f"torch.compile(selective_scan_torch) at L={L}: first call (compile) {first:.0f} s, "
          f"then {statistics.median(times):.1f} ms per forward + backward")


if __name__ == "__main__":
    main()
