"""S4 (DPLR), H3, Hyena and Mamba-2 against their exact references: S4's generating-function kernel
against the materialised discretised state matrix unrolled in time, the FFT convolutions of H3 and
Hyena against direct causal convolution, SSD's chunked algorithm against the sequential recurrence
(values and gradients), step() against forward, and building each from its yaml."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_an_lm_step_reaches_every_parameter
from omegaconf import OmegaConf

from architectures.h3 import H3, causal_conv_reference
from architectures.hyena import Hyena
from architectures.mamba import reverse_within_length
from architectures.mamba2 import Mamba2, ssd, ssd_by_selective_scan, ssd_chunked, ssd_reference
from architectures.s4 import S4, DPLRKernel, cauchy, cauchy_reference, hippo_legs_nplr
from architectures.ssm import kernel_convolution
from harness.api import build, compose_config

S4_KW = dict(d_state=8, l_max=32, dt_min=1e-2, dt_max=1e-1, ssm_lr=1e-3)
H3_KW = dict(d_state=6, head_dim=2, dt_min=1e-3, dt_max=1e-1, ssm_lr=1e-3)
HYENA_KW = dict(l_max=32, order=2, filter_order=16, short_filter_order=3, emb_dim=3, num_inner_mlps=2, w=1.0,
                fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2, filter_lr=1e-3, filter_wd=0.0)
MAMBA2_KW = dict(d_state=8, d_conv=4, expand=2, head_dim=8, n_groups=2, chunk_size=8, A_init_min=1.0,
                 A_init_max=16.0, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4)
SMALL = ["model.d_model=16", "model.n_layers=2", "task.n_train=8", "task.n_val=4", "task.n_test=4",
         "task.seq_len=32", "task.n_pairs=2", "task.vocab_size=32"]


# --------------------------------------------------------------------------- S4


def forward_and_steps(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal layer's output on x (B, L, D) in one call, and stacked from step() token by token."""
    with torch.no_grad():
        want, state, ys = layer(x), None, []
        for t in range(x.shape[1]):
            y, state = layer.step(x[:, t], state)
            ys.append(y)
    return want, torch.stack(ys, 1)


def legs(N: int) -> torch.Tensor:
    """HiPPO-LegS's A written out: -sqrt(2n+1) sqrt(2k+1) below the diagonal, -(n+1) on it."""
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    return torch.tril(-r[:, None] * r[None, :], -1) - torch.diag(n + 1)


def test_nplr_form_is_unitarily_equivalent_to_hippo_legs():
    N = 8
    Lam, P, B = hippo_legs_nplr(N)
    Lam, P = torch.cat([Lam, Lam.conj()]).cdouble(), torch.cat([P, P.conj()]).cdouble()
    A = torch.diag(Lam) - P[:, None] * P.conj()[None, :]
    got = torch.linalg.eigvals(A)
    want = torch.linalg.eigvals(legs(N).cdouble())  # -1 .. -N
    # LegS is far from normal, so its eigenvalues move by ~1e-3 under the float32 rounding of the
    # returned parameters; a wrong construction moves them by O(1)
    torch.testing.assert_close(got[torch.argsort(got.real)], want[torch.argsort(want.real)], rtol=0, atol=1e-2)
    assert torch.allclose(Lam.real, torch.full_like(Lam.real, -0.5)) and (Lam.imag[: N // 2] <= 0).all()


def unrolled_kernel(kernel: DPLRKernel, L: int) -> torch.Tensor:
    """K[l] = C dA^l dB from the raw parameters in float64, with the dense bilinear matrices."""
    with torch.no_grad():
        dt, Lam, B, P, Ct = (t.cdouble() for t in kernel.params())
        conj = lambda x: torch.cat([x, x.conj()], -1)
        A = torch.diag_embed(conj(Lam)) - torch.einsum("rhm,rhn->hmn", conj(P), conj(P).conj())
        eye = torch.eye(A.shape[-1], dtype=A.dtype)
        dA = torch.linalg.inv(eye - dt[:, None, None] / 2 * A) @ (eye + dt[:, None, None] / 2 * A)
        dB = torch.linalg.solve(eye - dt[:, None, None] / 2 * A, dt[:, None] * conj(B))
        # C~ = C (I - dA^l_max) for the trained C~; the true C is recovered from it
        C = torch.einsum("chm,hmn->chn", conj(Ct), torch.linalg.inv(eye - torch.linalg.matrix_power(dA, kernel.l_max)))
        x, out = dB, []
        for _ in range(L):
            out.append(torch.einsum("chn,hn->ch", C, x))
            x = torch.einsum("hmn,hn->hm", dA, x)
        K = torch.stack(out, -1)
        assert K.imag.abs().max() < 1e-8
        return K.real


@pytest.mark.parametrize("L", [1, 20, 32, 70])  # shorter than l_max, equal, and doubled twice
@pytest.mark.parametrize("n_ssm", [1, None])
def test_s4_kernel_equals_the_unrolled_discretised_recurrence(L, n_ssm):
    torch.manual_seed(0)
    kernel = DPLRKernel(4, channels=2, rank=1, n_ssm=n_ssm, **{k: v for k, v in S4_KW.items()})
    with torch.no_grad():
        kernel.B.add_(0.1 * torch.randn_like(kernel.B))  # away from the init's exact values
        kernel.P.add_(0.1 * torch.randn_like(kernel.P))
        got = kernel(L)
    assert got.shape == (2, 4, L)
    torch.testing.assert_close(got.double(), unrolled_kernel(kernel, L), rtol=1e-4, atol=1e-5)


def test_s4_kernel_with_rank_2_correction():
    torch.manual_seed(0)
    kernel = DPLRKernel(3, channels=1, rank=2, n_ssm=None, **S4_KW)
    with torch.no_grad():
        kernel.P.add_(0.2 * torch.randn_like(kernel.P))  # a live second column
        got = kernel(24)
    torch.testing.assert_close(got.double(), unrolled_kernel(kernel, 24), rtol=1e-4, atol=1e-5)


def test_chunked_cauchy_equals_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 4, 5, dtype=torch.cfloat, generator=g).requires_grad_()
    w = torch.complex(-torch.rand(4, 5, generator=g), torch.randn(4, 5, generator=g)).requires_grad_()
    omega = torch.exp(-2j * math.pi / 40 * torch.arange(21))
    a, b = (2 * (1 - omega)).cfloat(), (1 + omega).cfloat()
    want = cauchy_reference(v, w, a, b)
    got = cauchy(v, w, a, b, chunk=4)  # 6 chunks, the last one short
    torch.testing.assert_close(got, want)
    weights = torch.randn(want.shape, dtype=torch.cfloat, generator=g)
    grads_want = torch.autograd.grad((want * weights).real.sum(), (v, w))
    grads_got = torch.autograd.grad((got * weights).real.sum(), (v, w))
    for x, y in zip(grads_got, grads_want):
        torch.testing.assert_close(x, y)


def test_s4_step_equals_forward():
    torch.manual_seed(0)
    layer = S4(6, causal=True, bidirectional=False, **S4_KW).eval()
    x = torch.randn(2, 40, 6)  # longer than l_max: the doubled kernel
    want, got = forward_and_steps(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_s4_kernel_prefix_does_not_depend_on_length_and_gradients_flow():
    torch.manual_seed(0)
    kernel = DPLRKernel(3, channels=1, rank=1, n_ssm=1, **S4_KW)
    K = kernel(100)  # 4 l_max: through the dense path that recomputes C~
    torch.testing.assert_close(K[..., :32], kernel(32), rtol=1e-4, atol=1e-5)
    K.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in kernel.parameters())


def test_s4_parameters_carry_optimizer_settings():
    layer = S4(4, causal=True, bidirectional=False, **{**S4_KW, "ssm_lr": 5e-4})
    marked = {name for name, p in layer.named_parameters() if getattr(p, "_optim", None)}
    assert marked == {f"kernel.{n}" for n in ("log_dt", "log_A_real", "A_imag", "B", "P")}
    assert layer.kernel.P._optim == {"lr": 5e-4, "weight_decay": 0.0}
    assert layer.kernel.log_dt._optim == {"lr": 5e-4, "weight_decay": 0.0}
    layer = S4(4, causal=True, bidirectional=False, **{**S4_KW, "ssm_lr": 5e-4}, dt_lr=0.01)
    assert layer.kernel.log_dt._optim == {"lr": 0.01, "weight_decay": 0.0}
    assert layer.kernel.P._optim == {"lr": 5e-4, "weight_decay": 0.0}


def test_s4_refuses_an_n_ssm_that_does_not_divide_d_model():
    with pytest.raises(ValueError, match="model.mixer.n_ssm"):
        S4(6, causal=True, bidirectional=False, n_ssm=4, **S4_KW)


# --------------------------------------------------------------------------- H3 and Hyena


def test_kernel_convolution_equals_direct_causal_convolution():
    g = torch.Generator().manual_seed(0)
    u, K = torch.randn(2, 3, 50, generator=g), torch.randn(3, 50, generator=g)
    torch.testing.assert_close(kernel_convolution(u, K[None], bidirectional=False), causal_conv_reference(u, K),
                               rtol=1e-4, atol=1e-4)


def direct(u, K):
    return causal_conv_reference(u, K)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_h3_fft_convolutions_equal_direct_convolution(head_dim):
    torch.manual_seed(0)
    layer = H3(8, causal=True, **{**H3_KW, "head_dim": head_dim}).eval()
    x = torch.randn(2, 29, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x, convolve=direct), rtol=1e-4, atol=1e-4)


def test_h3_shift_kernel_is_the_shift_ssm_impulse_response():
    torch.manual_seed(0)
    layer = H3(4, causal=True, **H3_KW)
    with torch.no_grad():
        layer.shift_B.add_(0.3 * torch.randn_like(layer.shift_B))  # B away from e_1
        state, want = torch.zeros(4, 6), []
        for t in range(6):  # x_t = shift(x_{t-1}) + B [t == 0], K[t] = C . x_t
            state = F.pad(state, (1, -1)) + layer.shift_B * float(t == 0)
            want.append((layer.shift_C * state).sum(-1))
        torch.testing.assert_close(layer.shift_kernel(), torch.stack(want, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_h3_step_equals_forward(head_dim):
    torch.manual_seed(0)
    layer = H3(8, causal=True, **{**H3_KW, "head_dim": head_dim}).eval()
    x = torch.randn(2, 17, 8)
    want, got = forward_and_steps(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_hyena_fft_convolution_equals_direct_convolution(order):
    torch.manual_seed(0)
    layer = Hyena(8, causal=True, **{**HYENA_KW, "order": order}).eval()
    x = torch.randn(2, 40, 8)  # longer than l_max: the filter extends
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x, convolve=direct), rtol=1e-4, atol=1e-4)


def test_hyena_filter_is_windowed_and_does_not_depend_on_the_input_length():
    torch.manual_seed(0)
    layer = Hyena(8, causal=True, **HYENA_KW)
    with torch.no_grad():
        short, long = layer.filter_fn(10, "cpu"), layer.filter_fn(64, "cpu")
        assert short.shape == (8, 10)
        torch.testing.assert_close(long[:, :10], short)
        z, t = layer.filter_fn.positions(64, "cpu")
        assert z.shape == (64, 3) and t[31, 0] == 1.0  # time in units of l_max
        # the fastest channel's window exp(-t |alpha|) reaches target (1e-2) at t = fast_decay_pct
        # (0.3), the slowest at slow_decay_pct (1.5)
        alpha = layer.filter_fn.deltas.abs()
        assert math.isclose(math.exp(-0.3 * alpha[-1].item()), 1e-2, rel_tol=1e-4)
        assert math.isclose(math.exp(-1.5 * alpha[0].item()), 1e-2, rel_tol=1e-4)
    marked = {n for n, p in layer.named_parameters() if getattr(p, "_optim", None)}
    assert marked and all(n.startswith("filter_fn.") for n in marked)


# --------------------------------------------------------------------------- Mamba-2 (SSD)


def ssd_inputs(L, *, b=2, nh=4, P=3, N=5, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, nh, P, generator=g)
    dt = torch.rand(b, L, nh, generator=g) * 0.5
    A = -torch.rand(nh, generator=g) * 2 - 0.1
    B, C = torch.randn(b, L, G, N, generator=g), torch.randn(b, L, G, N, generator=g)
    return x, dt, A, B, C


@pytest.mark.parametrize("L,chunk_size", [(32, 8), (37, 8), (37, 1), (5, 16), (64, 64), (50, 7)])
def test_ssd_chunked_equals_recurrence_values_and_gradients(L, chunk_size):
    inputs = [t.requires_grad_() for t in ssd_inputs(L)]
    h0 = torch.randn(2, 4, 3, 5, requires_grad=True)
    want_y, want_h = ssd_reference(*inputs, initial_state=h0)
    got_y, got_h = ssd_chunked(*inputs, chunk_size=chunk_size, initial_state=h0)
    torch.testing.assert_close(got_y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_h, want_h, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(1)
    wy, wh = torch.randn(want_y.shape, generator=g), torch.randn(want_h.shape, generator=g)
    leaves = [*inputs, h0]
    grads_want = torch.autograd.grad((want_y * wy).sum() + (want_h * wh).sum(), leaves)
    grads_got = torch.autograd.grad((got_y * wy).sum() + (got_h * wh).sum(), leaves)
    for got, want in zip(grads_got, grads_want):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_ssd_long_sequence_with_strong_decay_is_stable():
    x, dt, A, B, C = ssd_inputs(600, b=1, nh=2, P=2, N=2, G=1)
    A = torch.full_like(A, -16.0)
    dt = dt + 3.0  # cumulative log-decay reaches -3e4: a difference of cumsums would overflow exp
    want, _ = ssd_reference(x, dt, A, B, C)
    got = ssd(x, dt, A, B, C, chunk_size=64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("L", [1, 37, 130])
def test_ssd_by_the_fused_selective_scan_equals_recurrence_values_and_gradients(L):
    inputs = [t.requires_grad_() for t in ssd_inputs(L, nh=4, P=8, N=5, G=2)]  # 16 channels per group: a lane block
    want_y, _ = ssd_reference(*inputs)
    got_y = ssd_by_selective_scan(*inputs)
    torch.testing.assert_close(got_y, want_y.flatten(-2), rtol=1e-4, atol=1e-4)
    w = torch.randn(want_y.shape, generator=torch.Generator().manual_seed(1))
    grads_want = torch.autograd.grad((want_y * w).sum(), inputs)
    grads_got = torch.autograd.grad((got_y * w.flatten(-2)).sum(), inputs)
    for got, want in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mamba2_mixer_is_the_same_with_every_scan(bidirectional):
    """fused (D, dt bias and softplus, gate in the kernel), chunked and reference: values and every gradient."""
    results = {}
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, 15:] = False
    for scan in ("fused", "chunked", "reference"):
        torch.manual_seed(0)
        layer = Mamba2(16, causal=not bidirectional, bidirectional=bidirectional, scan=scan, **MAMBA2_KW)
        x = torch.randn(2, 21, 16, requires_grad=True)
        y = layer(x, mask)
        y.square().sum().backward()
        results[scan] = [y, x.grad, *(p.grad for p in layer.parameters())]
    for scan in ("fused", "chunked"):
        for got, want in zip(results[scan], results["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bidirectional_mamba2_is_the_block_run_both_ways_and_summed():
    torch.manual_seed(0)
    layer = Mamba2(16, causal=False, bidirectional=True, bias=True, **MAMBA2_KW)
    x = torch.randn(2, 21, 16)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, 13:] = False

    def one_pass(inputs):
        return layer.out_proj(layer.ssd_and_norm(layer.in_proj(inputs)))

    want = one_pass(x) + reverse_within_length(one_pass(reverse_within_length(x, mask)), mask)
    torch.testing.assert_close(layer(x, mask), want, rtol=1e-5, atol=1e-6)


def test_mamba2_step_equals_forward():
    torch.manual_seed(0)
    layer = Mamba2(16, causal=True, **MAMBA2_KW).eval()
    x = torch.randn(2, 21, 16)
    want, got = forward_and_steps(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mamba2_follows_mamba_ssm_init_and_refuses_bad_heads():
    m = Mamba2(32, causal=True, **MAMBA2_KW)
    assert m.n_heads == 8 and m.in_proj.out_features == 2 * 64 + 2 * 2 * 8 + 8
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert ((-torch.exp(m.A_log) <= -1) & (-torch.exp(m.A_log) >= -16)).all()
    assert m.A_log._optim == {"weight_decay": 0.0}
    with pytest.raises(ValueError, match="model.mixer.head_dim"):
        Mamba2(18, causal=True, **MAMBA2_KW)  # 36 channels, heads of 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ssd_cuda_matches_portable_path():
    pytest.importorskip("mamba_ssm")
    x, dt, A, B, C = ssd_inputs(300, nh=4, P=16, N=16, G=1)
    want, _ = ssd_chunked(x, dt, A, B, C, chunk_size=64)
    got = ssd(*(t.cuda() for t in (x, dt, A, B, C)), chunk_size=64)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- all four


@pytest.mark.parametrize("name", ["s4", "h3", "hyena", "mamba2"])
def test_models_build_from_yaml_and_train_one_step(name):
    built = build([f"model={name}", "task=mqar", *SMALL, "model.mixer.head_dim=8"] if name == "mamba2"
                  else [f"model={name}", "task=mqar", *SMALL])
    assert built.model.positional == "none"
    assert_an_lm_step_reaches_every_parameter(built, seq_len=32)


# state-spaces/s4 configs/experiment/lra/s4-{listops,imdb,aan,cifar,pathfinder,pathx}.yaml
@pytest.mark.parametrize("model,task,d_model,d_state,n_ssm,dt_min,lr,prenorm,dt_lr", [
    ("s4", "listops", 256, 4, 1, 1e-3, 0.01, False, 0.01), ("s4", "text", 256, 4, 1, 1e-3, 0.01, True, 0.01),
    ("s4", "image", 512, 64, 1, 1e-3, 0.01, False, 1e-3), ("s4", "pathx", 256, 64, None, 1e-4, 0.001, True, 1e-3),
    ("s4d", "listops", 256, 4, None, 1e-3, 0.01, False, 0.01), ("s4d", "pathx", 256, 64, None, 1e-4, 0.001, True, 1e-3)])
def test_s4_lra_study_uses_the_s4_repository_configs(model, task, d_model, d_state, n_ssm, dt_min, lr, prenorm,
                                                      dt_lr):
    cfg = compose_config(["experiment=s4_lra", f"model={model}", f"task={task}"])
    OmegaConf.resolve(cfg)
    mixer = cfg.model.mixer
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.d_ff) == (d_model, 6, 0)
    assert (mixer.d_state, mixer.dt_min, mixer.bidirectional) == (d_state, dt_min, True)
    assert (cfg.trainer.lr, cfg.trainer.weight_decay, mixer.ssm_lr, mixer.dt_lr) == (lr, 0.05, 1e-3, dt_lr)
    assert (cfg.model.norm, cfg.model.prenorm) == ("batchnorm", prenorm)
    assert mixer.get("train_B", False) == (model == "s4d")  # the repository trains S4D's B
    if model == "s4":
        assert mixer.n_ssm == n_ssm and mixer.l_max == cfg.task.seq_len
