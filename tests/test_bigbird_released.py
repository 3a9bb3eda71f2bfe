"""BigBird with pattern=lra_released (architectures/bigbird_released.py): the random blocks are
the ones LRA's released get_block_rand_mask draws, the block pattern is its first-and-last-global,
window-of-3 pattern per head, and the blocked kernel equals dense attention under that mask on
the release's padded sequence (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from architectures.attention import MultiHeadAttention, dense_attention
from architectures.bigbird_released import (
    pad_as_released,
    released_block_mask,
    released_key_blocks,
    released_length,
    released_random_blocks,
)
from architectures.sparse import BigBirdAttention

# lra_benchmarks/models/bigbird/bigbird_attention.py (cd31e5c), run verbatim with numpy:
#   onp.random.seed(0); [get_block_rand_mask(40, 40, 4, 4, 2, last_idx=40) for _ in range(2)]
RELEASED_TABLES = np.array([
    [[8, 5], [5, 7], [7, 5], [8, 6], [3, 7], [3, 8], [4, 2], [1, 2]],
    [[8, 5], [5, 8], [1, 5], [2, 7], [3, 1], [4, 3], [4, 1], [6, 3]],
])


def bigbird(**kwargs) -> BigBirdAttention:
    kwargs = {"block_size": 4, "n_window_blocks": 3, "n_global_blocks": 2, "n_random_blocks": 2, "seed": 0,
              "pattern": "lra_released", **kwargs}
    return BigBirdAttention(16, causal=kwargs.pop("causal", False), n_heads=2, **kwargs)


def test_random_blocks_are_the_released_draws():
    tables = released_random_blocks(10, block_size=4, n_random_blocks=2, n_heads=2, seed=0)
    np.testing.assert_array_equal(tables, RELEASED_TABLES)
    # past 1024 tokens the release draws only among the blocks of the first 1024 (last_idx)
    long = released_random_blocks(17, block_size=64, n_random_blocks=3, n_heads=4, seed=1)
    assert long.max() == 15 and long.min() >= 1


def test_block_pattern_first_and_last_global_window_of_three_random_per_head():
    mask = released_block_mask(released_key_blocks(RELEASED_TABLES))  # (H, 10, 10)
    assert mask[:, [0, 9]].all() and mask[:, :, [0, 9]].all()  # global rows and columns
    rows = {h: {i: set(torch.nonzero(mask[h, i]).flatten().tolist()) for i in range(10)} for h in range(2)}
    assert rows[0][1] == {0, 1, 2, 9, 8, 5}  # block 1: 0, 1, 2, the last, random 8 and 5
    assert rows[0][4] == {3, 4, 5, 0, 9, 8, 6}  # window 3-5, the globals, random 8 and 6
    assert rows[0][8] == {0, 7, 8, 9, 1, 2}  # block nb - 2: 0, nb - 3, nb - 2, the last, random 1, 2
    assert rows[1][3] == {2, 3, 4, 0, 9, 1, 5}  # head 1 draws its own random blocks
    assert rows[0][3] != rows[1][3]


@pytest.mark.parametrize("L", [37, 40])  # 40: a multiple of the block, so the release appends a whole block
def test_equals_dense_attention_on_the_released_padded_sequence(L):
    torch.manual_seed(0)
    mixer = bigbird()
    x = torch.randn(2, L, 16, requires_grad=True)
    real = torch.ones(2, L, dtype=torch.bool)
    real[1, L - 9:] = False
    y = mixer(x, real)
    q, k, v = mixer.project(x)
    q, k, v, key_real = pad_as_released(q, k, v, real, 4)
    assert q.shape[2] == released_length(L, 4) == (40 if L == 37 else 44) and key_real[:, L:].all()
    blocks = released_block_mask(mixer.released_key_blocks(q.shape[2] // 4))  # (H, nb, nb)
    allowed = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)[None] & key_real[:, None, None, :]
    ref = mixer.merge(dense_attention(q, k, v, allowed)[:, :, :L] * real[:, None, :, None])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g, g_ref = (torch.autograd.grad(t.square().sum(), x)[0] for t in (y, ref))
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    # pad queries output zeros before the output projection, as the release's `* seq_m_pad`
    torch.testing.assert_close(y[1, L - 9:], mixer.out.bias.expand(9, -1))


def test_appended_positions_take_a_share_of_the_softmax():
    torch.manual_seed(0)
    mixer = bigbird(n_random_blocks=1)
    x = torch.randn(1, 32, 16)
    q, k, v = mixer.project(x)
    qp, kp, vp, key_real = pad_as_released(q, k, v, None, 4)  # 4 zero positions appended
    blocks = released_block_mask(mixer.released_key_blocks(9))
    allowed = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)[None]
    with_zeros = dense_attention(qp, kp, vp, allowed)[:, :, :32]
    without = dense_attention(qp, kp, vp, allowed & (torch.arange(36) < 32))[:, :, :32]
    torch.testing.assert_close(mixer(x), mixer.merge(with_zeros), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_zeros, without, atol=1e-4)


def test_causal_falls_back_to_dense_causal_attention_and_the_errors():
    torch.manual_seed(0)
    mixer = bigbird(causal=True)
    x = torch.randn(1, 24, 16)
    torch.testing.assert_close(mixer(x), MultiHeadAttention.forward(mixer, x))
    with pytest.raises(ValueError, match="n_global_blocks=2"):
        bigbird(n_global_blocks=1)
    with pytest.raises(ValueError, match="model.mixer.pattern"):
        bigbird(pattern="released")
    with pytest.raises(ValueError, match="n_random_blocks=3"):
        bigbird(n_random_blocks=3)(torch.randn(1, 20, 16))  # 6 blocks leave block 2 one candidate
