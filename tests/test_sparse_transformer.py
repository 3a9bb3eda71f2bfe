"""Sparse Transformer (`sparse_transformer`): the strided and fixed patterns equal dense attention
with the pattern's mask (values and gradients), causal and bidirectional, with right padding."""

from __future__ import annotations

import pytest
import torch

from architectures.attention import dense_attention
from architectures.sparse_transformer import (
    SparseTransformerAttention,
    fixed_attention,
    sparse_transformer_mask,
    strided_attention,
)
from tests.test_sparse import LargestTensor, assert_same_values_and_gradients, keys_ok, qkv, right_padding

B, H, D = 3, 2, 8


def test_masks_follow_the_paper():
    # strided, l = 3, causal: the previous 3 positions and every 3rd before
    m = sparse_transformer_mask(10, pattern="strided", stride=3, c=1, causal=True)
    assert m[9].nonzero().flatten().tolist() == [0, 3, 6, 7, 8, 9]
    # fixed, l = 4, c = 1: own block, plus the last position of each earlier block
    m = sparse_transformer_mask(10, pattern="fixed", stride=4, c=1, causal=True)
    assert m[9].nonzero().flatten().tolist() == [3, 7, 8, 9]
    m = sparse_transformer_mask(10, pattern="fixed", stride=4, c=2, causal=False)
    assert m[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 6, 7]
    assert not torch.equal(m, m.T)  # summaries are seen by all, but do not see all


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L", [1, 7, 33, 100])
@pytest.mark.parametrize("stride,c", [(1, 1), (4, 1), (5, 3), (16, 16), (120, 4)])
def test_pattern_equals_dense_with_its_mask(pattern, causal, L, stride, c):
    q, k, v = (t.double().requires_grad_() for t in qkv(L, seed=L + stride))
    key_real = right_padding(L, seed=stride)
    kernel = fixed_attention if pattern == "fixed" else strided_attention
    kwargs = {"c": c} if pattern == "fixed" else {}
    y = kernel(q, k, v, stride=stride, causal=causal, key_real=key_real, **kwargs)
    allowed = sparse_transformer_mask(L, pattern=pattern, stride=stride, c=c, causal=causal)[None, None]
    ref = dense_attention(q, k, v, allowed & keys_ok(key_real))
    assert_same_values_and_gradients(y, ref, (q, k, v))


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_causal_mixer_does_not_look_ahead(pattern):
    torch.manual_seed(0)
    L, t = 41, 23
    mixer = SparseTransformerAttention(D, causal=True, n_heads=H, pattern=pattern, stride=6, c=2)
    x = torch.randn(B, L, D)
    x2 = x.clone()
    x2[:, t:] = torch.randn(B, L - t, D)
    torch.testing.assert_close(mixer(x, None)[:, :t], mixer(x2, None)[:, :t], atol=0, rtol=0)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
def test_extra_padding_does_not_change_real_tokens(pattern, causal):
    torch.manual_seed(0)
    mixer = SparseTransformerAttention(D, causal=causal, n_heads=H, pattern=pattern, stride=5, c=2)
    x = torch.randn(1, 21, D)
    padded = torch.cat([x, torch.randn(1, 30, D)], 1)
    mask = torch.arange(51)[None] < 21
    torch.testing.assert_close(mixer(padded, mask)[:, :21], mixer(x, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_cost_is_not_quadratic(pattern):
    """At L = 2048 with l = 32 nothing near an L x L tensor is built, forward or backward."""
    L = 2048
    mixer = SparseTransformerAttention(D, causal=True, n_heads=H, pattern=pattern, stride=32, c=4)
    x = torch.randn(1, L, D, requires_grad=True)
    with LargestTensor() as probe:
        mixer(x, None).sum().backward()
    assert probe.numel < L * L // 4, probe.numel


def test_bad_hyperparameters_name_the_config_key():
    with pytest.raises(ValueError, match="model.mixer.pattern"):
        SparseTransformerAttention(D, causal=True, n_heads=H, pattern="axial", stride=4, c=1)
    with pytest.raises(ValueError, match="model.mixer.c"):
        SparseTransformerAttention(D, causal=True, n_heads=H, pattern="fixed", stride=4, c=5)
    with pytest.raises(ValueError, match="model.mixer.stride"):
        SparseTransformerAttention(D, causal=True, n_heads=H, pattern="strided", stride=0, c=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("positional", ["none", "alibi", "t5"])
def test_flex_attention_matches_portable_path(pattern, causal, positional):
    torch.manual_seed(0)
    L = 300
    mixer = SparseTransformerAttention(16 * H, causal=causal, n_heads=H, pattern=pattern, stride=24, c=6,
                                       positional=positional).cuda()
    x = torch.randn(B, L, 16 * H, device="cuda")
    mask = right_padding(L, seed=6).cuda()
    fast = mixer(x, mask)
    q, k, v = mixer.project(x)
    portable = mixer.merge(mixer.attend(q, k, v, mask, 0.0))
    real = mask[..., None]
    torch.testing.assert_close(fast * real, portable * real, atol=2e-4, rtol=2e-4)
