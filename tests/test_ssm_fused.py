"""Mamba's fused CPU selective scan (architectures/ssm_cpu.py, csrc/selective_scan_cpu.cpp) against
the chunked PyTorch scan and the sequential reference, and the dispatch between them.

The extension is built at first use (about 20 s of one core, then cached in ~/.cache/torch_extensions);
these tests fail rather than skip when it cannot be built, so a broken toolchain shows.
"""

import pytest
import torch

from architectures import ssm_cpu
from architectures.mamba import Mamba
from architectures.ssm import selective_scan, selective_scan_fused, selective_scan_reference, selective_scan_torch


@pytest.fixture(scope="module", autouse=True)
def built():
    assert ssm_cpu.extension() is not None, f"the fused CPU scan did not build: {ssm_cpu._unavailable}"


def scan_leaves(L, layout, *, batch=2, dim=4, N=3, seed=0):
    """u, delta, A, B, C, D, z, delta_bias with B, C in one of the mixer's layouts."""
    g = torch.Generator().manual_seed(seed)
    BC_shape = {"(B,N,L)": (batch, N, L), "(B,G,N,L)": (batch, 2, N, L), "(D,N)": (dim, N)}[layout]
    return [
        torch.randn(batch, dim, L, generator=g),  # u
        torch.randn(batch, dim, L, generator=g),  # delta, before bias and softplus
        -torch.rand(dim, N, generator=g) * 2 - 0.1,  # A
        torch.randn(*BC_shape, generator=g),  # B
        torch.randn(*BC_shape, generator=g),  # C
        torch.randn(dim, generator=g),  # D
        torch.randn(batch, dim, L, generator=g),  # z
        torch.randn(dim, generator=g) * 0.1,  # delta_bias
    ]


def values_and_grads(fn, leaves):
    leaves = [t.clone().requires_grad_() for t in leaves]
    out, last = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7], delta_softplus=True,
                   return_last_state=True)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
    return [out, last, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("L", [1, 37, 64, 65, 130])  # the kernel checkpoints every 64 steps
@pytest.mark.parametrize("layout", ["(B,N,L)", "(B,G,N,L)", "(D,N)"])
@pytest.mark.parametrize("dim", [4, 32])  # one channel per lane; blocks of 16 lanes
def test_fused_equals_chunked_equals_reference_values_and_gradients(L, layout, dim):
    leaves = scan_leaves(L, layout, dim=dim)
    names = ["out", "last state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"]
    want = values_and_grads(selective_scan_reference, leaves)
    for fn in (selective_scan_fused, selective_scan_torch):
        for name, got, ref in zip(names, values_and_grads(fn, leaves), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{fn.__name__} {name}: {m}")


def test_fused_is_the_cpu_default_and_keeps_no_state_sized_tensor():
    leaves = scan_leaves(100, "(B,N,L)")
    assert torch.equal(selective_scan(*leaves[:5]), selective_scan_fused(*leaves[:5]))
    leaves = [t.requires_grad_() for t in leaves[:5]]
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        selective_scan_fused(*leaves)
    batch, dim, L, N = 2, 4, 100, 3
    assert max(sizes) < batch * dim * L * N  # the chunked scan saves several (B, D, L, N) tensors


def test_fused_kernel_is_stable_under_strong_decay():
    u, delta, A, B, C = scan_leaves(3000, "(B,N,L)", batch=1, dim=2, N=2)[:5]
    A = torch.full_like(A, -16.0)
    delta = delta.abs() + 3.0  # exp(delta A) underflows to ~0 at every step
    got = selective_scan_fused(u, delta, A, B, C)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, selective_scan_reference(u, delta, A, B, C), rtol=1e-4, atol=1e-5)


def test_unavailable_extension_falls_back_to_the_chunked_scan_with_one_warning(monkeypatch):
    def no_compiler():
        raise RuntimeError("g++: command not found")

    monkeypatch.setattr(ssm_cpu, "_build", no_compiler)
    monkeypatch.setattr(ssm_cpu, "_extension", None)
    monkeypatch.setattr(ssm_cpu, "_unavailable", None)
    leaves = scan_leaves(20, "(B,N,L)")[:5]
    with pytest.warns(UserWarning, match="could not be built.*g\\+\\+: command not found.*chunked PyTorch scan"):
        out = selective_scan(*leaves, scan="fused")
    assert torch.equal(out, selective_scan_torch(*leaves))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        selective_scan(*leaves)
    with pytest.raises(RuntimeError, match="fused CPU scan is unavailable"):
        selective_scan_fused(*leaves)


def test_scan_option_is_validated():
    leaves = scan_leaves(5, "(B,N,L)")[:5]
    with pytest.raises(ValueError, match="must be one of .*'auto', 'fused', 'chunked', 'reference'.*'fast'"):
        selective_scan(*leaves, scan="fast")
    with pytest.raises(ValueError, match="model.mixer.scan .*mamba.yaml"):
        Mamba(8, causal=True, d_state=4, d_conv=4, expand=2, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4, scan="cuda")


@pytest.mark.parametrize("conv_bias,d_model", [(True, 8), (False, 8), (True, 40)])  # dt_rank 1, 1, 3
def test_mamba_mixer_is_the_same_with_every_scan_and_under_bf16_autocast(conv_bias, d_model):
    """fused: dt_proj inside the kernel, the scan's inputs recomputed in the backward (RecomputedScanInputs)."""
    results = {}
    for scan in ("fused", "chunked", "reference"):
        torch.manual_seed(0)
        mixer = Mamba(d_model, causal=True, d_state=4, d_conv=4, expand=2, dt_min=1e-3, dt_max=0.1,
                      dt_init_floor=1e-4, conv_bias=conv_bias, scan=scan)
        x = torch.randn(2, 70, d_model, requires_grad=True)
        y = mixer(x)
        y.square().sum().backward()
        results[scan] = [y, x.grad, *(p.grad for p in mixer.parameters())]
    for scan in ("fused", "chunked"):
        for got, want in zip(results[scan], results["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 inputs are upcast to fp32 for the scan
        y = mixer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    torch.testing.assert_close(y.float(), results["reference"][0], rtol=0.05, atol=0.05)


def test_causal_depthwise_conv1d_equals_torch_conv1d():
    from architectures.mamba import causal_depthwise_conv1d

    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 12, 11)[:, ::2].transpose(1, 2).requires_grad_()  # (B, L, E), strided as in_proj's split
    want = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    got = causal_depthwise_conv1d(x, conv.weight, conv.bias)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, (x, conv.weight, conv.bias), g)
    grads_got = torch.autograd.grad(got, (x, conv.weight, conv.bias), g)
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(causal_depthwise_conv1d(x, conv.weight, None), want - conv.bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels", [6, 70])  # one block of 64 channels, and a second partial one
@pytest.mark.parametrize("width", [4, 3])  # the kernel's K = 4 (Mamba's) and any other
def test_fused_conv_silu_equals_pytorch_values_and_gradients(bias, channels, width):
    from architectures.mamba import conv_silu

    conv = torch.nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1, bias=bias)
    x = torch.randn(2, 11, 2 * channels)[..., :channels].requires_grad_()  # strided over L, as in_proj's split
    leaves = [x, conv.weight] + ([conv.bias] if bias else [])
    want = conv_silu(x, conv.weight, conv.bias, fused=False)
    got = conv_silu(x, conv.weight, conv.bias, fused=True)
    assert got.grad_fn is not None and "CausalConvSiLU" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order_kind", ["reversed within length", "any permutation"])
def test_fused_conv_silu_along_a_step_order_equals_pytorch_on_a_reordered_copy(order_kind):
    """The bidirectional Mamba's reversed pass: the kernel reads x in the order, no reordered copy."""
    from architectures.mamba import conv_silu, reversal_order

    conv = torch.nn.Conv1d(20, 20, 4, groups=20, padding=3)
    x = torch.randn(3, 13, 40)[..., :20].requires_grad_()  # (B, L, E), strided as in_proj's split
    if order_kind == "any permutation":
        order = torch.stack([torch.randperm(13, generator=torch.Generator().manual_seed(b)) for b in range(3)])
    else:
        order = reversal_order(torch.arange(13) < torch.tensor([[13], [9], [1]]), 3, 13, x.device)
    leaves = [x, conv.weight, conv.bias]
    want = conv_silu(x, conv.weight, conv.bias, fused=False, order=order)
    got = conv_silu(x, conv.weight, conv.bias, fused=True, order=order)
    assert "CausalConvSiLU" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernels_refuse_an_order_that_is_not_a_permutation():
    ext = ssm_cpu.extension()
    x, w = torch.randn(1, 5, 3), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="causal_conv1d_cpu: order row 0 is not a permutation"):
        ext.conv_silu_forward(x, w, None, torch.tensor([[0, 1, 2, 2, 4]]))
    with pytest.raises(RuntimeError, match="causal_conv1d_cpu: order must be a contiguous int64 \\(batch, L\\)"):
        ext.conv_silu_forward(x, w, None, torch.tensor([[0, 1, 2, 3]]))
    u, delta = (ssm_cpu.channels_last(t) for t in scan_leaves(5, "(B,N,L)", batch=1, dim=3)[:2])  # (1, 3, 5)
    A, B = -torch.rand(3, 2), torch.randn(1, 1, 5, 2)  # B, C (batch, G, L, N)
    with pytest.raises(RuntimeError, match="selective_scan_cpu: order row 0 is not a permutation"):
        ext.forward(u, delta, A, B, B, None, None, None, False, None, torch.tensor([[4, 3, 2, 1, 5]]))
