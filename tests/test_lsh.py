"""Reformer's LSH attention (architectures/lsh.py) against dense attention under the mask its
buckets imply, in values and gradients; and the variant of LRA's released code."""

from __future__ import annotations

import pytest
import torch

from architectures.attention import dense_attention
from architectures.layers import UnsupportedTask
from architectures.lsh import (
    LSHAttention,
    lsh_allowed_counts,
    lsh_attention,
    lsh_attention_lra_released,
    lsh_attention_lra_released_reference,
    lsh_attention_reference,
    lsh_buckets,
    released_chunks,
)


def inputs(B=2, H=2, L=37, hd=8, n_hashes=3, n_buckets=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, L, hd, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, L, hd, generator=g, dtype=torch.float64, requires_grad=True)
    rotations = torch.randn(n_hashes, hd, n_buckets // 2, generator=g, dtype=torch.float64)
    real = torch.ones(B, L, dtype=torch.bool)
    real[-1, L - 5:] = False  # the last example is right-padded
    return qk, v, rotations, real


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,chunk_len", [(37, 8), (64, 16), (5, 8)])
def test_lsh_attention_equals_dense_attention_under_the_bucket_mask(causal, L, chunk_len):
    qk, v, rotations, real = inputs(L=L)
    buckets = lsh_buckets(qk.detach(), rotations, real)
    y = lsh_attention(qk, v, buckets, chunk_len=chunk_len, causal=causal, key_real=real)
    ref = lsh_attention_reference(qk, v, buckets, chunk_len=chunk_len, causal=causal, key_real=real)
    keep = real[:, None, :, None]  # pad queries' outputs are never used
    torch.testing.assert_close(y * keep, ref * keep, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w * keep).sum(), [qk, v])
    ref_grads = torch.autograd.grad((ref * w * keep).sum(), [qk, v])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_the_bucket_mask_is_sparse_so_the_comparison_means_something(causal):
    qk, v, rotations, real = inputs(L=64)
    buckets = lsh_buckets(qk.detach(), rotations, real)
    counts = lsh_allowed_counts(buckets, chunk_len=8, causal=causal)
    frac = (counts > 0).float().mean().item()
    assert 0.05 < frac < 0.6, frac
    assert counts.max() > 1, "with 3 rounds some keys must be found more than once"
    y = lsh_attention(qk, v, buckets, chunk_len=8, causal=causal, key_real=real)
    allowed = torch.ones(64, 64, dtype=torch.bool).tril() if causal else None
    assert not torch.allclose(y, dense_attention(qk, v, v, allowed), atol=1e-3)


def test_a_token_attends_to_itself_only_when_it_has_nothing_else():
    qk, v, rotations, _ = inputs(B=1, L=12, n_hashes=1)
    buckets = torch.zeros(1, 2, 1, 12, dtype=torch.long)  # one bucket, one chunk: every key allowed
    y = lsh_attention(qk, v, buckets, chunk_len=16, causal=False)
    no_self = ~torch.eye(12, dtype=torch.bool)
    k = torch.nn.functional.normalize(qk, dim=-1)
    torch.testing.assert_close(y, dense_attention(qk, k, v, no_self), rtol=1e-8, atol=1e-8)
    # causal: the first token has only itself
    y = lsh_attention(qk, v, buckets, chunk_len=16, causal=True)
    torch.testing.assert_close(y[:, :, 0], v[:, :, 0])


def test_rounds_with_the_same_buckets_give_the_one_round_result():
    qk, v, rotations, real = inputs(n_hashes=1)
    one = lsh_buckets(qk.detach(), rotations, real)
    y1 = lsh_attention(qk, v, one, chunk_len=8, causal=False, key_real=real)
    y3 = lsh_attention(qk, v, one.repeat(1, 1, 3, 1), chunk_len=8, causal=False, key_real=real)
    torch.testing.assert_close(y1, y3)


def test_the_causal_key_set_never_depends_on_later_tokens():
    """Plain chunking would fail this: a later token moving to a lower bucket shifts every chunk."""
    qk, v, rotations, _ = inputs(B=1, L=48, n_hashes=2)
    buckets = lsh_buckets(qk.detach(), rotations, None)
    t = 30
    changed = buckets.clone()
    changed[..., t:] = (changed[..., t:] + 1) % 4
    a = lsh_allowed_counts(buckets, chunk_len=8, causal=True)[..., :t, :t]
    b = lsh_allowed_counts(changed, chunk_len=8, causal=True)[..., :t, :t]
    assert torch.equal(a, b)
    assert not torch.equal(lsh_allowed_counts(buckets, chunk_len=8, causal=False)[..., :t, :t],
                           lsh_allowed_counts(changed, chunk_len=8, causal=False)[..., :t, :t])


def test_the_mixer_hashes_with_fixed_rotations_per_layer():
    a = LSHAttention(32, causal=False, layer_idx=0, n_heads=2, chunk_len=8, n_buckets=4, n_hashes=2)
    b = LSHAttention(32, causal=False, layer_idx=0, n_heads=2, chunk_len=8, n_buckets=4, n_hashes=2)
    c = LSHAttention(32, causal=False, layer_idx=1, n_heads=2, chunk_len=8, n_buckets=4, n_hashes=2)
    assert torch.equal(a.rotations, b.rotations) and not torch.equal(a.rotations, c.rotations)
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(a(x), a(x))


def test_an_odd_bucket_count_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.mixer.n_buckets"):
        LSHAttention(32, causal=False, n_heads=2, chunk_len=8, n_buckets=5, n_hashes=1)


# --- variant=lra_released (LRA's reformer_attention.py) ---

def released(**kwargs) -> LSHAttention:
    kwargs = {"n_heads": 2, "chunk_len": None, "n_buckets": 10, "n_hashes": 1, "variant": "lra_released", **kwargs}
    return LSHAttention(32, causal=False, **kwargs)


@pytest.mark.parametrize("L,n_buckets", [(40, 4), (30, 10)])
def test_released_chunks_equal_dense_attention_under_the_released_chunk_rule(L, n_buckets):
    qk, v, rotations, _ = inputs(L=L, n_hashes=1, n_buckets=n_buckets)
    y = lsh_attention_lra_released(qk, v, rotations)
    ref = lsh_attention_lra_released_reference(qk, v, rotations)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [qk, v])
    ref_grads = torch.autograd.grad((ref * w).sum(), [qk, v])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_released_chunk_zero_looks_back_to_the_last_chunk_and_no_further():
    qk, v, rotations, _ = inputs(B=1, H=1, L=40, n_hashes=1, n_buckets=4)  # 4 chunks of 10
    qk = 0.1 * qk  # small queries: scores times sqrt(d) would otherwise give a token only itself
    _, chunk = released_chunks(qk, rotations)
    chunk = chunk[0, 0]
    query = int(torch.nonzero(chunk == 0)[0])
    last, middle = int(torch.nonzero(chunk == 3)[0]), int(torch.nonzero(chunk == 2)[0])
    y = lsh_attention_lra_released(qk, v, rotations)[0, 0, query]
    for key, reached in ((last, True), (middle, False)):
        moved = v.detach().clone()
        moved[0, 0, key] += 1.0
        changed = lsh_attention_lra_released(qk, moved, rotations)[0, 0, query]
        assert (not torch.allclose(changed, y)) == reached


def test_released_keys_are_the_unnormalised_queries_scaled_up_by_sqrt_d():
    """One chunk pair covers the sequence (2 chunks): dense attention with scores q.q * sqrt(hd)."""
    qk, v, rotations, _ = inputs(B=1, L=8, hd=4, n_hashes=1, n_buckets=2)
    y = lsh_attention_lra_released(qk, v, rotations)
    torch.testing.assert_close(y, dense_attention(qk * 4.0, qk, v), rtol=1e-10, atol=1e-10)  # sqrt(4) * sqrt(4)


def test_released_mixer_pads_with_zero_rows_ignores_the_mask_and_has_no_output_projection():
    torch.manual_seed(0)
    mixer = released()
    assert not hasattr(mixer, "out") and set(mixer.released_projections) == {"qk", "v"}
    x = torch.randn(2, 20, 32)
    padded = torch.cat([x, torch.zeros(2, 10, 32)], 1)  # 20 % 10 == 0: the release still appends 10 rows
    qk = mixer.qk(padded).view(2, 30, 2, 16).transpose(1, 2)
    v = mixer.v(padded).view(2, 30, 2, 16).transpose(1, 2)
    expected = lsh_attention_lra_released(qk, v, mixer.rotations).transpose(1, 2).reshape(2, 30, 32)[:, :20]
    torch.testing.assert_close(mixer(x), expected)
    real = torch.ones(2, 20, dtype=torch.bool)
    real[1, 15:] = False
    torch.testing.assert_close(mixer(x, real), mixer(x))  # the release masks no padding


def test_released_rotations_are_the_same_in_every_layer():
    assert torch.equal(released(layer_idx=0).rotations, released(layer_idx=3).rotations)


@pytest.mark.parametrize("override,key", [({"chunk_len": 64}, "model.mixer.chunk_len"),
                                          ({"n_hashes": 2}, "model.mixer.n_hashes"),
                                          ({"dropout": 0.1}, "model.mixer.dropout"),
                                          ({"variant": "trax"}, "model.mixer.variant")])
def test_released_settings_the_release_lacks_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        released(**override)


def test_released_causal_is_unsupported_and_a_length_the_chunks_do_not_divide_is_refused():
    with pytest.raises(UnsupportedTask, match="causal"):
        LSHAttention(32, causal=True, n_heads=2, chunk_len=None, n_buckets=10, n_hashes=1, variant="lra_released")
    with pytest.raises(ValueError, match="model.mixer.n_buckets=4"):
        released(n_buckets=4)(torch.randn(1, 25, 32))  # padded to 30
