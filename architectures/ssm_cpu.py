"""Mamba's fused CPU kernels: a small C++ extension (``csrc/selective_scan_cpu.cpp`` and
``csrc/causal_conv1d_cpu.cpp``), built at first use with ``torch.utils.cpp_extension`` and cached
(in ``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, under a name carrying the
sources' hash).

The selective scan plays the part mamba-ssm's CUDA kernel plays on GPUs: one pass over time per
block of channels with the states in a local buffer, so forward and backward read and write only
(batch, L, D)-sized tensors and B, C, never a (batch, D, L, N) one. The backward recomputes the
states chunk by chunk from the states saved at chunk boundaries, as the CUDA kernel does. The
causal depthwise convolution with SiLU plays the part of the causal-conv1d package.

Building needs a C++ compiler (g++ or clang++) and ninja (a pip package, a dependency of seq-arena).
When either is missing the build fails once, :func:`extension` warns once and returns None, and
:func:`architectures.ssm.selective_scan` falls back to the chunked PyTorch scan.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import warnings

import torch

CSRC = pathlib.Path(__file__).parent / "csrc"
SOURCES = (CSRC / "selective_scan_cpu.cpp", CSRC / "causal_conv1d_cpu.cpp")  # and the headers beside them

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
        # One cache entry per version of the source and per environment (its build.ninja names
        # the interpreter's torch), so that checkouts of different versions, or venvs, sharing
        # the cache do not rebuild over each other.
        name=f"seq_arena_selective_scan_cpu_{_source_hash()}",
        sources=[str(path) for path in SOURCES],
        # OpenMP: at::parallel_for runs serially without it. No trapping math and no errno: the exp
        # polynomial's floor and the loops over the state vectorise (5x), IEEE results unchanged.
        extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,  # the library registers torch.ops.seq_arena_scan.forward / backward
        verbose=False,
    )
    _register_fake_kernels()
    return torch.ops.seq_arena_scan


def _source_hash() -> str:
    """12 hex digits of the SHA-256 of the sources, the headers, this interpreter's prefix and
    torch's version."""
    digest = hashlib.sha256(f"{sys.prefix}\0{torch.__version__}".encode())
    for path in (*SOURCES, *sorted(CSRC.glob("*.h"))):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _register_fake_kernels() -> None:
    """Output shapes of the two ops, so torch.compile can trace through them (trainer.compile)."""

    @torch.library.register_fake("seq_arena_scan::forward")
    def _(u, delta, A, B, C, D, z, delta_bias, softplus, delta_proj=None, order=None):
        batch, dim, L = u.shape
        return [new_channels_last(u), u.new_empty(batch, dim, A.shape[1]),
                u.new_empty(batch, dim, -(-L // 64), A.shape[1])]  # out, last state, checkpoints (kChunk = 64)

    @torch.library.register_fake("seq_arena_scan::backward")
    def _(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, softplus, checkpoints, delta_proj=None,
          order=None, dz_out=None):
        batch, dim, L = u.shape
        dz = new_channels_last(u) if z is not None and dz_out is None else u.new_empty(0)
        rank = 0 if delta_proj is None else delta_proj.shape[1]
        ddelta = new_channels_last(u) if delta_proj is None else u.new_empty(batch, L, rank).transpose(1, 2)
        return (new_channels_last(u), ddelta, dz, torch.empty_like(A), u.new_empty(batch, B.shape[1], L, A.shape[1]),
                u.new_empty(batch, C.shape[1], L, A.shape[1]), u.new_empty(dim), u.new_empty(dim),
                u.new_empty(dim, rank))

    @torch.library.register_fake("seq_arena_scan::conv_silu_forward")
    def _(x, w, bias, order=None):
        return x.new_empty(x.shape)

    @torch.library.register_fake("seq_arena_scan::conv_silu_backward")
    def _(x, w, bias, grad_y, order=None, dx_out=None):
        return x.new_empty(x.shape if dx_out is None else 0), torch.empty_like(w), w.new_empty(w.shape[0])


def new_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A new tensor the size of x (batch, D, L), as the kernels allocate their outputs: a view of a
    contiguous (batch, L, D) one (never x's own strides: x may be a slice of a wider tensor)."""
    return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (batch, D, L) as the kernel reads and writes it: a view of a (batch, L, D) tensor (no copy
    when x is one already)."""
    return x if x.stride(1) == 1 else x.transpose(1, 2).contiguous().transpose(1, 2)


def serves(x: torch.Tensor) -> bool:
    """Whether the fused kernels take x: an fp32 CPU tensor outside autocast, with the extension built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and extension() is not None)


def extension():
    """The compiled ops (``torch.ops.seq_arena_scan``), or None (after one warning) when they cannot be built."""
    global _extension, _unavailable
    if _extension is None and _unavailable is None:
        try:
            _extension = _build()
        except Exception as error:  # a missing compiler or ninja surfaces as several exception types
            _unavailable = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            warnings.warn(
                f"selective_scan: the fused CPU scan ({SOURCES[0].name}) could not be built ({_unavailable}); "
                "using the chunked PyTorch scan, which is slower and keeps (batch, D, L, N) tensors. "
                "It needs a C++ compiler (g++) and ninja (pip install ninja).",
                stacklevel=3,
            )
    return _extension


class FusedSelectiveScan(torch.autograd.Function):
    """mamba-ssm's ``selective_scan_fn`` by the C++ kernel, per channel d:

        dt_t = softplus(delta_t + delta_bias_d),  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,
        out_t = (C_t . h_t + D_d u_t) SiLU(z_t)        (softplus, D, z and delta_bias optional)

    Inputs (fp32): u, delta, z (batch, D, L), channels-last (unit stride over D: transposed views
    of (batch, L, D) activations); A (D, N), D and delta_bias (D,) contiguous; B, C (batch, G, L, N)
    with unit stride over N. Outputs: out (batch, D, L, channels-last) and the last state (batch, D, N).
    Saved for the backward: the inputs and the state at every 64th step (batch, D, L / 64, N).
    order: None, or the step order (batch, L) int64 (step t of row b is position order[b, t]).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, order=None):
        out, last, checkpoints = _extension.forward(u, delta, A, B, C, D, z, delta_bias, softplus, None, order)
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints, order)
        return out, last

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        u, delta, A, B, C, D, z, delta_bias, checkpoints, order = ctx.saved_tensors
        grad_out = torch.zeros_like(u) if grad_out is None else channels_last(grad_out)
        grad_last = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if grad_last is None else grad_last.contiguous()
        du, ddelta, dz, dA, dB, dC, dD, dbias, _ = _extension.backward(
            grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, checkpoints, None, order)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                dbias if delta_bias is not None else None, None, None)


class CausalConvSiLU(torch.autograd.Function):
    """SiLU(causal depthwise conv1d) by the C++ kernel (csrc/causal_conv1d_cpu.cpp), channels-last:
    x (batch, L, C) with unit stride over C, weight (C, 1, K), bias (C,) or None -> (batch, L, C);
    order (batch, L) int64 or None: the convolution runs along each row's order of positions (see
    the kernel). Saves only its inputs: the backward recomputes the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, order=None):
        taps = weight[:, 0].contiguous()  # (C, K)
        ctx.save_for_backward(x, taps, bias, order)
        return _extension.conv_silu_forward(x, taps, bias, order)

    @staticmethod
    def backward(ctx, grad_y):
        x, taps, bias, order = ctx.saved_tensors
        dx, dtaps, dbias = _extension.conv_silu_backward(x, taps, bias, grad_y.contiguous(), order)
        return dx, dtaps.unsqueeze(1), dbias if bias is not None else None, None
