"""State-space mixers: the selective scan against a sequential recurrence, S4D's kernel against its
recurrence, step() against forward, causality and padding invariance, and building from yaml."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_an_lm_step_reaches_every_parameter

from architectures.backbone import SequenceModel
from architectures.mamba import Mamba, reverse_within_length
from architectures.ssm import S4D, s4d_init, selective_scan, selective_scan_reference, selective_scan_torch
from harness.api import build
from tasks.base import TaskSpec

SMALL = ["model.d_model=16", "model.n_layers=2", "task.n_train=8", "task.n_val=4", "task.n_test=4",
         "task.seq_len=32", "task.n_pairs=2", "task.vocab_size=32"]
S4D_KW = dict(d_state=8, dt_min=1e-3, dt_max=1e-1, ssm_lr=1e-3)
MAMBA_KW = dict(d_state=4, d_conv=4, expand=2, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4)


def recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t; y_t = C_t . x_t; written out for the test."""
    u, delta = u.double(), delta.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    x = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(L):
        Bt = B.double() if B.dim() == 2 else B[:, None, :, t].double()  # (D, N) or (B, 1, N)
        Ct = C.double() if C.dim() == 2 else C[:, None, :, t].double()
        x = torch.exp(delta[:, :, t, None] * A.double()) * x + (delta[:, :, t] * u[:, :, t])[..., None] * Bt
        ys.append((x * Ct).sum(-1))
    y = torch.stack(ys, -1)  # (B, D, L)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, x


def scan_inputs(L, *, fixed_BC=False, batch=2, dim=3, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, L, generator=g)
    delta = torch.randn(batch, dim, L, generator=g) * 0.5
    A = -torch.rand(dim, N, generator=g) * 2 - 0.1
    shape = (dim, N) if fixed_BC else (batch, N, L)
    B, C = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    extras = dict(D=torch.randn(dim, generator=g), z=torch.randn(batch, dim, L, generator=g),
                  delta_bias=torch.randn(dim, generator=g) * 0.1)
    return (u, delta.abs(), A, B, C), extras


@pytest.mark.parametrize("L", [1, 16, 37, 64, 300])
@pytest.mark.parametrize("fixed_BC", [False, True])
@pytest.mark.parametrize("options", [(), ("D",), ("z", "delta_bias"), ("D", "z", "delta_bias", "softplus")])
def test_selective_scan_equals_recurrence(L, fixed_BC, options):
    args, extras = scan_inputs(L, fixed_BC=fixed_BC)
    kw = {k: v for k, v in extras.items() if k in options}
    soft = "softplus" in options
    want_y, want_state = recurrence(*args, **kw, delta_softplus=soft)
    out, state = selective_scan(*args, **kw, delta_softplus=soft, return_last_state=True)
    assert out.shape == args[0].shape and state.shape == (2, 3, 4)
    torch.testing.assert_close(out.double(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), want_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(selective_scan(*args, **kw, delta_softplus=soft), out)  # without the state


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_chunk_size_does_not_change_result(chunk_size):
    args, extras = scan_inputs(50)
    want, _ = recurrence(*args, **extras, delta_softplus=True)
    got = selective_scan_torch(*args, **extras, delta_softplus=True, chunk_size=chunk_size)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixed_BC", [False, True])
def test_selective_scan_gradients_equal_reference(fixed_BC):
    args, extras = scan_inputs(45, fixed_BC=fixed_BC)
    leaves = [t.clone().requires_grad_() for t in (*args, *extras.values())]
    leaves2 = [t.clone().requires_grad_() for t in leaves]
    names = list(extras)

    def run(fn, ts, **kw):
        out, state = fn(*ts[:5], **dict(zip(names, ts[5:])), delta_softplus=True, return_last_state=True, **kw)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g)).sum() + (state * torch.randn(state.shape, generator=g)).sum()
        return torch.autograd.grad(loss, ts)

    for got, want in zip(run(selective_scan_torch, leaves, chunk_size=8), run(selective_scan_reference, leaves2)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_selective_scan_grouped_B_C_and_dtype():
    args, extras = scan_inputs(20, dim=4)
    u, delta, A, B, C = args
    B4, C4 = B.view(2, 1, 4, 20).repeat(1, 2, 1, 1), C.view(2, 1, 4, 20).repeat(1, 2, 1, 1)  # 2 groups
    torch.testing.assert_close(selective_scan(u, delta, A, B4, C4), selective_scan(u, delta, A, B, C))
    out = selective_scan(u.double(), delta, A, B, C)
    assert out.dtype == torch.float64  # like selective_scan_ref: computed in fp32, returned in u's dtype


def test_selective_scan_long_sequence_with_strong_decay_is_stable():
    # cumulative decay sum(delta * A) reaches -1e5: an exp of the negated cumsum would overflow
    args, _ = scan_inputs(2000, batch=1, dim=2, N=2)
    u, delta, A, B, C = args
    A = torch.full_like(A, -16.0)
    delta = delta + 3.0
    want, _ = recurrence(u, delta, A, B, C)
    got = selective_scan(u, delta, A, B, C)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_selective_scan_rejects_complex_A():
    args, _ = scan_inputs(8)
    u, delta, A, B, C = args
    with pytest.raises(ValueError, match="real A"):
        selective_scan(u, delta, A.to(torch.cfloat), B, C)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selective_scan_cuda_matches_portable_path():
    args, extras = scan_inputs(300, dim=8, N=16)
    want = selective_scan_torch(*args, **extras, delta_softplus=True)
    got = selective_scan(*(t.cuda() for t in args), **{k: v.cuda() for k, v in extras.items()}, delta_softplus=True)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- S4D


@pytest.mark.parametrize("init", ["lin", "inv", "legs"])
def test_s4d_kernel_equals_its_recurrence(init):
    layer = S4D(6, causal=False, bidirectional=True, init=init, **S4D_KW)
    L = 70
    with torch.no_grad():
        K = layer.kernel(L)  # (2, H, L)
        dtA, C_eff = layer.kernel.discretize()
        # impulse response of x_l = exp(dtA) x_{l-1} + [l == 0]; K[l] = 2 Re(C_eff . x_l)
        x = torch.ones_like(dtA)
        want = []
        for _ in range(L):
            want.append(2 * (C_eff * x).sum(-1).real)
            x = torch.exp(dtA) * x
        torch.testing.assert_close(K, torch.stack(want, -1), rtol=1e-4, atol=1e-5)


def test_s4d_inits_are_the_s4_repositorys():
    """S4D-Lin and -Inv by their formulas; S4D-LegS's modes are eigenvalues of HiPPO-LegS's normal
    part (-1/2 + i lam, one per conjugate pair); Inv approximates LegS's fastest modes."""
    N = 16
    n = torch.arange(N // 2, dtype=torch.float32)
    torch.testing.assert_close(s4d_init("lin", N), math.pi * n)
    torch.testing.assert_close(s4d_init("inv", N), N / math.pi * (N / (2 * n + 1) - 1))
    lam = s4d_init("legs", N)
    k = torch.arange(N, dtype=torch.float64)
    r = (2 * k + 1).sqrt()
    S = -torch.tril(r[:, None] * r[None, :], -1) - torch.diag(k + 1) + (k + 0.5).sqrt()[:, None] * (k + 0.5).sqrt()[None]
    eig = torch.linalg.eigvals(S)
    assert torch.allclose(eig.real, torch.full_like(eig.real, -0.5), atol=1e-6)  # normal part: real -1/2
    torch.testing.assert_close(lam.double().sort().values, eig.imag[eig.imag > 0].sort().values, rtol=1e-5, atol=1e-6)
    big_legs, big_inv = s4d_init("legs", 64).sort().values, s4d_init("inv", 64).sort().values
    assert ((big_legs[-4:] - big_inv[-4:]).abs() / big_legs[-4:]).max() < 0.1  # the fastest modes
    with pytest.raises(ValueError, match="model.mixer.init must be one of"):
        s4d_init("legt", N)


def test_s4d_bidirectional_convolution_is_the_two_sided_sum():
    H, L = 3, 11
    layer = S4D(H, causal=False, bidirectional=True, **S4D_KW).eval()
    u = torch.randn(2, L, H)
    with torch.no_grad():
        K0, K1 = layer.kernel(L)  # (H, L) each
        y = torch.zeros(2, H, L)
        for t in range(L):
            for s in range(L):
                k = K0[:, t - s] if s <= t else K1[:, s - t - 1]
                y[:, :, t] += k * u[:, s]
        y = y + u.transpose(1, 2) * layer.D[:, None]
        torch.testing.assert_close(layer(u), layer.project(y.transpose(1, 2)), rtol=1e-4, atol=1e-5)


def test_s4d_kernel_cache_is_reused_and_invalidated():
    layer = S4D(4, causal=True, bidirectional=True, **S4D_KW)
    with torch.no_grad():
        k1 = layer.kernel(32)
        assert layer.kernel(32) is k1
        layer.kernel.log_dt.add_(0.1)  # an optimizer step bumps the parameter's version
        k2 = layer.kernel(32)
        assert k2 is not k1 and not torch.allclose(k1, k2)
    assert layer.kernel(32).requires_grad  # with autograd on, never the cached tensor


def test_s4d_ssm_parameters_carry_optimizer_settings():
    layer = S4D(4, causal=True, bidirectional=True, **{**S4D_KW, "ssm_lr": 5e-4})
    marked = {name for name, p in layer.named_parameters() if getattr(p, "_optim", None)}
    assert marked == {"kernel.log_dt", "kernel.log_A_real", "kernel.A_imag"}
    assert layer.kernel.log_dt._optim == {"lr": 5e-4, "weight_decay": 0.0}
    # S4's LRA configs with lr: {dt: null}: dt at another lr (the optimizer's), still no decay
    layer = S4D(4, causal=True, bidirectional=True, **{**S4D_KW, "ssm_lr": 5e-4}, dt_lr=0.01)
    assert layer.kernel.log_dt._optim == {"lr": 0.01, "weight_decay": 0.0}
    assert layer.kernel.A_imag._optim == {"lr": 5e-4, "weight_decay": 0.0}


def test_s4d_trained_B_gives_the_kernel_of_C_times_B_and_trains_at_the_ssm_lr():
    torch.manual_seed(0)
    plain = S4D(4, causal=False, bidirectional=True, **S4D_KW)
    assert plain.kernel.B is None  # the default: B = 1, folded into C
    trained = S4D(4, causal=False, bidirectional=True, **{**S4D_KW, "ssm_lr": 5e-4}, train_B=True)
    trained.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(torch.view_as_complex(trained.kernel.B), torch.ones(4, S4D_KW["d_state"] // 2, dtype=torch.cfloat))
    torch.testing.assert_close(trained.kernel(32), plain.kernel(32))  # B = 1 at init: the same kernels
    B = torch.randn(4, S4D_KW["d_state"] // 2, dtype=torch.cfloat)
    with torch.no_grad():
        trained.kernel.B.copy_(torch.view_as_real(B))
        plain.kernel.C.copy_(torch.view_as_real(torch.view_as_complex(plain.kernel.C) * B))
    torch.testing.assert_close(trained.kernel(32), plain.kernel(32), rtol=1e-5, atol=1e-6)
    trained(torch.randn(2, 32, 4)).sum().backward()
    assert trained.kernel.B.grad is not None and trained.kernel.B.grad.abs().sum() > 0
    assert trained.kernel.B._optim == {"lr": 5e-4, "weight_decay": 0.0}


# --------------------------------------------------------------------------- both mixers


def make_mixer(name, d_model=8, causal=True, bidirectional=False):
    if name == "s4d":
        return S4D(d_model, causal=causal, bidirectional=bidirectional, **S4D_KW)
    return Mamba(d_model, causal=causal, bidirectional=bidirectional, **MAMBA_KW)


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_step_equals_forward(name):
    torch.manual_seed(0)
    mixer = make_mixer(name).eval()
    x = torch.randn(2, 23, 8)
    with torch.no_grad():
        want = mixer(x)
        state, ys = None, []
        for t in range(x.shape[1]):
            y, state = mixer.step(x[:, t], state)
            ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_step_refuses_bidirectional(name):
    mixer = make_mixer(name, causal=False, bidirectional=True)
    with pytest.raises(RuntimeError, match="bidirectional"):
        mixer.step(torch.randn(1, 8), None)


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_causal_mixer_ignores_the_future(name):
    torch.manual_seed(0)
    mixer = make_mixer(name).eval()
    x = torch.randn(2, 40, 8)
    x2 = x.clone()
    x2[:, 25:] = torch.randn(2, 15, 8)
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y[:, :25], y2[:, :25])
    assert not torch.allclose(y[:, 25:], y2[:, 25:])


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_bidirectional_mixer_sees_the_future(name):
    torch.manual_seed(0)
    mixer = make_mixer(name, causal=False, bidirectional=True).eval()
    x = torch.randn(1, 30, 8)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(mixer(x)[:, 0], mixer(x2)[:, 0])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scan", ["fused", "reference"])  # the kernels read the reversed order; PyTorch a copy
def test_bidirectional_mamba_is_the_block_run_both_ways_and_summed(bias, scan):
    """The shared in_proj / out_proj of the two passes change no value or gradient."""
    torch.manual_seed(0)
    mixer = Mamba(8, causal=False, bidirectional=True, bias=bias, **{**MAMBA_KW, "scan": scan})
    x = torch.randn(2, 21, 8, requires_grad=True)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, 13:] = False

    def one_pass(inputs):
        return mixer.out_proj(mixer.ssm(mixer.in_proj(inputs)))

    want = one_pass(x) + reverse_within_length(one_pass(reverse_within_length(x, mask)), mask)
    got = mixer(x, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    leaves = (x, *mixer.parameters())
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_reverse_within_length_keeps_pads_and_is_an_involution():
    x = torch.arange(10.0).view(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    r = reverse_within_length(x, mask)
    assert r[0, :, 0].tolist() == [2, 1, 0, 3, 4] and r[1, :, 0].tolist() == [9, 8, 7, 6, 5]
    assert torch.equal(reverse_within_length(r, mask), x)


@pytest.mark.parametrize("name", ["s4d", "mamba"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_classify_logits_do_not_depend_on_padding(name, bidirectional):
    torch.manual_seed(0)
    spec = TaskSpec(kind="classify", vocab_size=12, n_outputs=3, seq_len=24)
    kw = S4D_KW if name == "s4d" else MAMBA_KW
    mixer = partial(S4D if name == "s4d" else Mamba, bidirectional=bidirectional, **kw)
    model = SequenceModel(spec=spec, mixer=mixer, d_model=8, n_layers=2, d_ff=0, positional="none").eval()
    tokens = torch.randint(1, 12, (2, 24))
    tokens[0, 15:] = 0  # right padding; row 1 has none
    with torch.no_grad():
        batched = model({"tokens": tokens})
        alone = model({"tokens": tokens[:1, :15]})
        row1 = model({"tokens": tokens[1:]})
    torch.testing.assert_close(batched[:1], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[1:], row1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_models_build_from_yaml_and_train_one_step(name):
    built = build([f"model={name}", "task=mqar", *SMALL])
    assert (built.model.blocks[0].ffn is None) and built.model.positional == "none"
    assert_an_lm_step_reaches_every_parameter(built, seq_len=32)


def test_mamba_block_follows_the_paper_init():
    m = Mamba(64, causal=True, **MAMBA_KW)
    assert m.d_inner == 128 and m.dt_rank == 4 and m.x_proj.out_features == 4 + 2 * 4
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    torch.testing.assert_close(-torch.exp(m.A_log[0]), -torch.arange(1.0, 5.0))
    assert torch.equal(m.D, torch.ones(128)) and m.A_log._optim == {"weight_decay": 0.0}
