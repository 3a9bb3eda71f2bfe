"""Block-local attention (architectures/block_local.py): both groupings equal the exact dense
reference on the padded sequence, the released grouping is the strided pattern LRA's code
computes, padding and causality, and the mixer's errors."""

from __future__ import annotations

import pytest
import torch

from architectures.attention import dense_attention
from architectures.block_local import (
    BlockLocalAttention,
    block_local_mask,
    group_allowed,
    group_positions,
)


def reference(mixer: BlockLocalAttention, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Dense softmax attention over q, k, v padded with zeros, under block_local_mask."""
    q, k, v = mixer.project(x)  # (B, H, L, hd)
    B, H, L, hd = q.shape
    allowed = block_local_mask(L, mixer.block_size, mixer.grouping, mixer.causal, real)  # (B, P, P)
    pad = allowed.shape[-1] - L
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    return mixer.merge(dense_attention(q, k, v, allowed[:, None])[:, :, :L])


@pytest.mark.parametrize("grouping", ["contiguous", "lra_released"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [12, 14])
def test_equals_the_dense_reference(grouping, causal, L):
    torch.manual_seed(0)
    mixer = BlockLocalAttention(16, causal=causal, n_heads=2, block_size=4, grouping=grouping)
    x = torch.randn(2, L, 16, requires_grad=True)
    y = mixer(x)
    ref = reference(mixer, x, None)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g, g_ref = torch.autograd.grad(y.square().sum(), x)[0], torch.autograd.grad(ref.square().sum(), x)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_the_released_grouping_is_strided():
    """L = 7, blocks of 3: the released code pads to 9 = 3 x 3 and groups i mod 3 together."""
    assert group_positions(7, 3, "lra_released").tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert group_positions(7, 3, "contiguous").tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert group_positions(6, 3, "lra_released").shape == (3, 3)  # a whole extra block when L divides
    # its mask comes from consecutive positions: group 2 reads signs of positions 6, 7, 8 =
    # (real, appended, appended), so position 2 sees itself only and position 5 sees itself and 8
    allowed = group_allowed(torch.ones(1, 7, dtype=torch.bool), 3, "lra_released", causal=False)[0, 2]
    assert allowed.tolist() == [[True, False, False], [False, True, True], [False, True, True]]
    dense = block_local_mask(7, 3, "lra_released", causal=False)[0]
    assert dense[5].nonzero().flatten().tolist() == [5, 8] and dense[0].nonzero().flatten().tolist() == [0, 3, 6]


def test_contiguous_padding_changes_nothing_real():
    torch.manual_seed(0)
    mixer = BlockLocalAttention(16, causal=False, n_heads=2, block_size=4, grouping="contiguous")
    x = torch.randn(1, 10, 16)
    wider = torch.cat([x, torch.randn(1, 5, 16)], 1)
    real = torch.arange(15)[None] < 10
    torch.testing.assert_close(mixer(wider, real)[:, :10], mixer(x), atol=1e-6, rtol=1e-5)


def test_a_released_row_with_every_key_masked_attends_uniformly():
    """L = 7, blocks of 3, the last two tokens padding. Position 2 sits in group 2 (positions 2, 5,
    8) at slot 0, whose mask value is that of consecutive position 6: padding, 0. Its whole row is
    masked (-1e10 everywhere), so it averages its group's values, the appended 8's zero included,
    as the released code does (never NaN)."""
    torch.manual_seed(0)
    mixer = BlockLocalAttention(8, causal=False, n_heads=1, block_size=3, grouping="lra_released")
    x = torch.randn(1, 7, 8)
    real = torch.tensor([[True] * 5 + [False] * 2])
    assert not group_allowed(real, 3, "lra_released", causal=False)[0, 2, 0].any()
    y = mixer(x, real)
    _, _, v = mixer.project(x)  # (1, 1, 7, 8)
    mean = (v[0, 0, 2] + v[0, 0, 5] + 0.0) / 3  # positions 2, 5 and the appended 8
    torch.testing.assert_close(y[0, 2], mixer.out(mean), atol=1e-6, rtol=1e-5)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="model.mixer.grouping must be one of"):
        BlockLocalAttention(8, causal=False, n_heads=1, grouping="strided")
    with pytest.raises(ValueError, match="model.mixer.block_size"):
        BlockLocalAttention(8, causal=False, n_heads=1, block_size=0)
