"""Performer (architectures.performer): FAVOR+ features, the chunked bidirectional form against
the plain quadratic form (values and gradients), softmax exactness across head sizes, redraw,
and LRA's generalized ReLU kernel. The mixer's causal, padding and step behaviour is checked
with the other linear attention mixers in test_linear.py."""

from __future__ import annotations

import pytest
import torch

from architectures.attention import dense_attention
from architectures.layers import UnsupportedTask
from architectures.linear import quadratic_linear_attention
from architectures.performer import (
    PerformerAttention,
    favor_attention,
    favor_features,
    orthogonal_random_features,
    released_favor_attention,
    released_favor_features,
    released_favor_reference,
    released_projection,
    relu_features,
)

D, H = 16, 2
TINY64 = torch.finfo(torch.float64).tiny


def padding_mask(lengths, L):
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)


def reference_favor(q, k, v, w, mask=None):
    """FAVOR+ attention through the full L x L matrix of feature products."""
    phi_q = favor_features(q, w, is_query=True)
    phi_k = favor_features(k, w, is_query=False, mask=mask)
    return quadratic_linear_attention(phi_q, phi_k, v, causal=False, mask=mask, eps=torch.finfo(q.dtype).tiny)


@pytest.mark.parametrize("rows", [5, 16, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_favor_equals_quadratic_values_and_gradients(rows, padded):
    g = torch.Generator().manual_seed(rows)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = orthogonal_random_features(24, 8).double()
    mask = padding_mask([37, 20], 37) if padded else None
    want = reference_favor(q, k, v, w, mask)
    got = favor_attention(q, k, v, w, mask, rows=rows)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_out = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g_out), torch.autograd.grad(want, (q, k, v), g_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_favor_keeps_no_feature_sized_tensor_for_backward():
    """What the backward pass holds is O(L hd) and the (m, hd + 1) key summary, never (B, H, L, m) features."""
    B, L, hd, m = 2, 64, 8, 256
    q, k, v = (torch.randn(B, H, L, hd, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        favor_attention(q, k, v, orthogonal_random_features(m, hd), rows=16).sum().backward()
    assert saved and max(saved) <= B * H * max(L, m) * (hd + 1) < B * H * L * m, saved
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_mixer_equals_the_quadratic_form_with_parameter_gradients():
    torch.manual_seed(0)
    mixer = PerformerAttention(D, causal=False, n_heads=H, n_features=32).double().eval()
    x = torch.randn(2, 24, D, dtype=torch.float64, requires_grad=True)
    mask = padding_mask([24, 15], 24)

    def reference(x):
        q, k, v = mixer.qkv(x).view(2, 24, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        y = reference_favor(q, k, v, mixer.projection, mask)
        return mixer.out(y.transpose(1, 2).reshape(2, 24, D))

    params = [x, mixer.qkv.weight, mixer.qkv.bias]
    got, want = mixer(x, mask), reference(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # runs in float32 inside, finite
        low = mixer.float()(x.float().detach(), mask)
    assert torch.isfinite(low).all()


@pytest.mark.parametrize("hd", [16, 32, 64, 128, 256])
def test_favor_estimates_softmax_attention_at_every_head_size(hd):
    """FAVOR+ in float32 with 8192 features is softmax attention to 0.01 mean and 0.1 max absolute
    error (outputs are about 0.1 in size), at every head size. Before the key stabiliser was
    taken as the reference takes it, keys underflowed from head size 128 on (at 256 every feature
    was 0 and the output 0). Queries and keys span 4 directions with |x'| = 1 (x' = x / hd^(1/4)),
    logits q . k / sqrt(hd) of spread 0.5: FAVOR+'s variance grows as exp(|q' + k'|^2), so
    random full-rank unit-variance inputs would need astronomically many features at hd 256."""
    g = torch.Generator().manual_seed(hd)
    L, rank = 64, 4
    basis, _ = torch.linalg.qr(torch.randn(hd, rank, generator=g, dtype=torch.float64))  # (hd, rank)

    def draw():
        c = torch.randn(1, 1, L, rank, generator=g, dtype=torch.float64)
        return (c / c.norm(dim=-1, keepdim=True)) @ basis.T * hd ** 0.25  # (1, 1, L, hd)

    q, k = draw(), draw()
    v = torch.randn(1, 1, L, hd, generator=g, dtype=torch.float64)
    exact = dense_attention(q, k, v).float()
    torch.manual_seed(hd)
    w = orthogonal_random_features(8192, hd)
    approx = favor_attention(q.float(), k.float(), v.float(), w)
    err = (approx - exact).abs()
    assert err.mean() < 0.01 and err.max() < 0.1, (err.mean().item(), err.max().item())
    phi_k = favor_features(k.float(), w, is_query=False)
    assert phi_k.max() == 1.0 and (phi_k >= torch.finfo(torch.float32).tiny).float().mean() > 0.99


def test_estimate_improves_with_features():
    """More features, smaller error (about 1/sqrt(m))."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, H, 32, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = 0.5 * q, 0.5 * k  # moderate logits, as after a layer norm and projection
    exact = dense_attention(q, k, v)
    errors = {}
    for m in (16, 1024):
        errs = [(reference_favor(q, k, v, orthogonal_random_features(m, 16).double()) - exact).abs().mean()
                for _ in range(5)]
        errors[m] = torch.stack(errs).mean().item()
    assert errors[1024] < 0.5 * errors[16], errors
    assert errors[1024] < 0.05, errors


def test_orthogonal_features_are_orthogonal_within_a_block():
    w = orthogonal_random_features(40, 16)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), rtol=0, atol=1e-5)
    assert w.shape == (40, 16)


def test_redraw_is_on_by_default_every_training_call():
    """The authors' code (google-research/performer fast_attention, redraw_features=True) draws a
    fresh projection on every call; here on every training call, evaluation keeps the last one."""
    from harness.api import compose_config

    assert compose_config(["model=performer"]).model.mixer.redraw_every == 1
    torch.manual_seed(0)
    mixer = PerformerAttention(D, causal=False, n_heads=H, n_features=8).train()
    x = torch.randn(1, 5, D)
    seen = []
    for _ in range(3):
        mixer.before_training_forward()  # what the backbone calls once per training forward
        mixer(x)
        seen.append(mixer.projection.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    mixer.eval()
    y = mixer(x)
    assert torch.equal(mixer.projection, seen[-1]) and torch.equal(mixer(x), y)


def test_redraw_happens_only_at_the_configured_step():
    torch.manual_seed(0)
    mixer = PerformerAttention(D, causal=False, n_heads=H, n_features=8, redraw_every=3)
    x = torch.randn(1, 5, D)
    seen = []
    mixer.train()
    for _ in range(7):
        mixer.before_training_forward()
        mixer(x)
        seen.append(mixer.projection.clone())
    changed = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # calls 3 and 6 (0-based) redraw
    assert int(mixer.forward_calls) == 7
    mixer.eval()
    mixer(x)
    assert torch.equal(mixer.projection, seen[-1]) and int(mixer.forward_calls) == 7
    assert "forward_calls" in mixer.state_dict() and "projection" in mixer.state_dict()

    never = PerformerAttention(D, causal=False, n_heads=H, n_features=8, redraw_every=0).train()
    before = never.projection.clone()
    for _ in range(5):
        never(x)
    assert torch.equal(never.projection, before)


def test_relu_kernel_is_lras_generalized_attention():
    """LRA's released default: phi(x) = relu(x) + 1e-3 on the raw head, no projection, no redraw."""
    torch.manual_seed(0)
    mixer = PerformerAttention(D, causal=False, n_heads=H, kernel="relu").double().train()
    q, k = torch.randn(2, 1, H, 4, 8, dtype=torch.float64)
    phi_q, phi_k = mixer.feature_maps(q, k)
    torch.testing.assert_close(phi_q, q.clamp_min(0) + 1e-3, rtol=0, atol=0)
    assert torch.equal(phi_k, relu_features(k))
    before = mixer.projection.clone()
    for _ in range(3):
        mixer(torch.randn(1, 6, D, dtype=torch.float64))
    assert torch.equal(mixer.projection, before)


def test_kernel_is_validated():
    with pytest.raises(ValueError, match="model.mixer.kernel='cos' is not one of softmax, relu"):
        PerformerAttention(D, causal=False, n_heads=H, kernel="cos")


# --- variant=lra_released (LRA's fork of the authors' FAVOR, as its ListOps config runs it) ---

def test_released_favor_in_linear_time_equals_the_quadratic_weights():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    projection = orthogonal_random_features(2, 8, generator=g).double()  # ListOps: 2 features
    y, ref = released_favor_attention(q, k, v, projection), released_favor_reference(q, k, v, projection)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_released_features_add_the_stabiliser_after_the_exponential():
    """The fork's features, written out for one query and one key set by hand."""
    x = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    xs = x * 2 ** -0.25
    dash, half = xs @ w.T, (xs * xs).sum(-1, keepdim=True) / 2
    q = released_favor_features(x, w, is_query=True)
    torch.testing.assert_close(q, (torch.exp(dash - half - dash.amax(-1, keepdim=True)) + 1e-6) / 2 ** 0.5)
    keys = released_favor_features(x, w, is_query=False)
    torch.testing.assert_close(keys, (torch.exp(dash - half - dash.max()) + 1e-6) / 2 ** 0.5)
    assert keys.min() > 1e-6 / 2 ** 0.5 * 0.999  # no feature below the stabiliser


def test_released_mixer_redraws_on_every_call_in_evaluation_too_seeded_by_the_queries():
    torch.manual_seed(0)
    mixer = PerformerAttention(16, causal=False, n_heads=2, n_features=2, mask_padding=False,
                               variant="lra_released").eval()
    x, other = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    torch.testing.assert_close(mixer(x), mixer(x))  # the same batch, the same draw

    def heads(t):  # (B, L, 16) -> q, k, v (B, H, L, hd)
        return mixer.qkv(t).view(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = heads(x)
    assert not torch.equal(released_projection(q, 2), released_projection(heads(other)[0], 2))  # another draw
    y = released_favor_attention(q, k, v, released_projection(q, 2))
    torch.testing.assert_close(mixer(x), mixer.out(y.transpose(1, 2).reshape(2, 12, 16)))
    assert mixer.redraw_every == 0  # the per-call draw replaces the training-step schedule


def test_released_variant_refusals_name_the_key():
    with pytest.raises(ValueError, match="model.mixer.variant"):
        PerformerAttention(16, causal=False, n_heads=2, variant="fork")
    with pytest.raises(ValueError, match="model.mixer.redraw_every"):
        PerformerAttention(16, causal=False, n_heads=2, redraw_every=0, mask_padding=False, variant="lra_released")
    with pytest.raises(ValueError, match="model.mixer.mask_padding"):
        PerformerAttention(16, causal=False, n_heads=2, variant="lra_released")
    with pytest.raises(UnsupportedTask, match="bidirectional"):
        PerformerAttention(16, causal=True, n_heads=2, mask_padding=False, variant="lra_released")
    PerformerAttention(16, causal=True, n_heads=2, kernel="relu", variant="lra_released")  # relu: LRA's already
