"""Sparse Sinkhorn attention (architectures/sinkhorn.py): Sinkhorn balancing, and the blocked
kernel against dense attention over the keys a (hard or soft) block permutation implies."""

from __future__ import annotations

import pytest
import torch

from architectures.attention import dense_attention
from architectures.layers import UnsupportedTask
from architectures.sinkhorn import (
    SinkhornAttention,
    sinkhorn,
    sinkhorn_attention_reference,
    sinkhorn_block_attention,
)

B, H, L, HD, BLOCK = 2, 2, 32, 8, 8
N = L // BLOCK


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, HD, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def padded_real():
    real = torch.ones(B, L, dtype=torch.bool)
    real[1, 19:] = False  # the second example: 2 full blocks, one partial, one of padding
    return real


def block_valid(real, causal):
    has_real = real.view(B, 1, N, BLOCK).any(-1)
    valid = has_real[..., :, None] & has_real[..., None, :]
    return valid & torch.ones(N, N, dtype=torch.bool).tril(-1) if causal else valid


def test_sinkhorn_balancing_gives_a_doubly_stochastic_matrix_over_the_real_blocks():
    logits = torch.randn(B, H, N, N, dtype=torch.float64)
    valid = block_valid(padded_real(), causal=False)
    p = sinkhorn(logits, valid, n_iters=50)
    torch.testing.assert_close(p.sum(-1)[0], torch.ones(H, N, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-2)[0], torch.ones(H, N, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-1)[1], torch.tensor([1.0, 1, 1, 0], dtype=torch.float64).expand(H, N))
    torch.testing.assert_close(p.sum(-2)[1], torch.tensor([1.0, 1, 1, 0], dtype=torch.float64).expand(H, N))
    rows_only = sinkhorn(logits, valid, n_iters=0)
    torch.testing.assert_close(rows_only[0], torch.softmax(logits[0], -1))
    assert not torch.allclose(rows_only.sum(-2)[0], torch.ones(H, N, dtype=torch.float64))


def test_a_hard_permutation_equals_dense_attention_over_own_and_sorted_blocks():
    q, k, v = qkv()
    real = torch.ones(B, L, dtype=torch.bool)
    sigma = torch.tensor([2, 0, 3, 1])  # query block i is shown key block sigma[i]
    perm = torch.zeros(B, H, N, N, dtype=torch.float64)
    perm[:, :, torch.arange(N), sigma] = 1.0
    y = sinkhorn_block_attention(q, k, v, perm, block_size=BLOCK, causal=False, key_real=real)
    block = torch.arange(L) // BLOCK
    allowed = (block[None, :] == block[:, None]) | (block[None, :] == sigma[block][:, None])  # (L, L)
    torch.testing.assert_close(y, dense_attention(q, k, v, allowed))


@pytest.mark.parametrize("causal", [False, True])
def test_a_soft_permutation_equals_dense_attention_over_the_implied_keys(causal):
    q, k, v = qkv(1)
    real = padded_real() if not causal else torch.ones(B, L, dtype=torch.bool)
    logits = torch.randn(B, H, N, N, dtype=torch.float64, requires_grad=True)
    perm = sinkhorn(logits, block_valid(real, causal), n_iters=0 if causal else 5)
    y = sinkhorn_block_attention(q, k, v, perm, block_size=BLOCK, causal=causal, key_real=real)
    ref = sinkhorn_attention_reference(q, k, v, perm, block_size=BLOCK, causal=causal, key_real=real)
    keep = real[:, None, :, None]
    torch.testing.assert_close(y * keep, ref * keep, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w * keep).sum(), [q, k, v, logits], retain_graph=True)
    ref_grads = torch.autograd.grad((ref * w * keep).sum(), [q, k, v, logits])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert grads[-1].abs().sum() > 0, "the sorting logits must get a gradient"


def test_the_causal_variant_never_looks_ahead():
    torch.manual_seed(0)
    mixer = SinkhornAttention(32, causal=True, n_heads=2, block_size=8, max_blocks=16, sinkhorn_iters=0,
                              temperature=0.75).eval()
    x = torch.randn(2, 40, 32)
    t = 21  # inside the third block
    changed = x.clone()
    changed[:, t:] += torch.randn(2, 40 - t, 32)
    a, b = mixer(x), mixer(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_causal_sinkhorn_balancing_is_declared_unsupported_with_a_reason():
    with pytest.raises(UnsupportedTask, match="sinkhorn_iters=0"):
        SinkhornAttention(32, causal=True, n_heads=2, block_size=8, max_blocks=16, sinkhorn_iters=5,
                          temperature=0.75)


def test_too_many_blocks_name_the_key():
    mixer = SinkhornAttention(32, causal=False, n_heads=2, block_size=8, max_blocks=2, sinkhorn_iters=1,
                              temperature=1.0)
    with pytest.raises(ValueError, match="model.mixer.max_blocks"):
        mixer(torch.randn(1, 40, 32))
