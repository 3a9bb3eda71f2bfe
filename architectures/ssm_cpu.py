"""The fused selective scan for CPU: a small C++ extension (``csrc/selective_scan_cpu.cpp``), built
at first use with ``torch.utils.cpp_extension`` and cached (in ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``).

It plays the part mamba-ssm's CUDA kernel plays on GPUs: one pass over time per (batch, channel)
row with the (N,) state in a local buffer, so forward and backward read and write only
(batch, D, L)-sized tensors and B, C, never a (batch, D, L, N) one. The backward recomputes the
states chunk by chunk from the states saved at chunk boundaries, as the CUDA kernel does.

Building needs a C++ compiler (g++ or clang++) and ninja (a pip package, a dependency of seq-arena).
When either is missing the build fails once, :func:`extension` warns once and returns None, and
:func:`architectures.ssm.selective_scan` falls back to the chunked PyTorch scan.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import torch

SOURCE = pathlib.Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"

_extension = None  # the built module, once loaded
_unavailable: str | None = None  # why it could not be built, once tried


def _build():
    """Compile (or load from the cache) the extension; raises when there is no toolchain."""
    from torch.utils import cpp_extension

    try:  # the pip package's ninja, which is not on PATH when the venv is not activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cpp_extension.load(
        name="seq_arena_selective_scan_cpu",
        sources=[str(SOURCE)],
        # OpenMP: at::parallel_for runs serially without it. No trapping math and no errno: the exp
        # polynomial's floor and the loops over the state vectorise (5x), IEEE results unchanged.
        extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,  # the library registers torch.ops.seq_arena_scan.forward / backward
        verbose=False,
    )
    _register_fake_kernels()
    return torch.ops.seq_arena_scan


def _register_fake_kernels() -> None:
    """Output shapes of the two ops, so torch.compile can trace through them (trainer.compile)."""

    @torch.library.register_fake("seq_arena_scan::forward")
    def _(u, delta, A, B, C):
        batch, dim, L = u.shape
        return [torch.empty_like(u), u.new_empty(batch, dim, A.shape[1]),
                u.new_empty(batch, dim, -(-L // 64), A.shape[1])]  # y, last state, checkpoints (kChunk = 64)

    @torch.library.register_fake("seq_arena_scan::backward")
    def _(grad_y, grad_last, u, delta, A, B, C, checkpoints):
        return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C)]


def extension():
    """The compiled ops (``torch.ops.seq_arena_scan``), or None (after one warning) when they cannot be built."""
    global _extension, _unavailable
    if _extension is None and _unavailable is None:
        try:
            _extension = _build()
        except Exception as error:  # a missing compiler or ninja surfaces as several exception types
            _unavailable = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            warnings.warn(
                f"selective_scan: the fused CPU scan ({SOURCE.name}) could not be built ({_unavailable}); "
                "using the chunked PyTorch scan, which is slower and keeps (batch, D, L, N) tensors. "
                "It needs a C++ compiler (g++) and ninja (pip install ninja).",
                stacklevel=3,
            )
    return _extension


class FusedSelectiveScan(torch.autograd.Function):
    """y = C_t . h_t, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, by the C++ kernel.

    Inputs: u, delta (batch, D, L); A (D, N); B, C (batch, G, L, N); all fp32 and contiguous.
    Outputs: y (batch, D, L) and the last state (batch, D, N).
    Saved for the backward: the inputs and the state at every 64th step (batch, D, L / 64, N).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        y, last, checkpoints = _extension.forward(u, delta, A, B, C)
        ctx.save_for_backward(u, delta, A, B, C, checkpoints)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, checkpoints = ctx.saved_tensors
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y.contiguous()
        grad_last = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if grad_last is None else grad_last.contiguous()
        return tuple(_extension.backward(grad_y, grad_last, u, delta, A, B, C, checkpoints))
