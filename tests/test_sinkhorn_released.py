"""Sinkhorn with variant=lra_released (architectures/sinkhorn_released.py): the blocked kernel equals
the dense reference built from positions (values and gradients), the sorted keys are contiguous
chunk sums that the sorting network cannot change, the padding mask is the release's shifted
one (a hand-made example), masking is the release's float32 -1e10 addition, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from architectures.layers import UnsupportedTask
from architectures.sinkhorn import SinkhornAttention
from architectures.sinkhorn_released import (
    MASK_BIAS,
    add_mask_bias,
    released_masks,
    released_sinkhorn_attention,
    sinkhorn_released_reference,
    sorted_keys,
)
from harness.api import build_model, compose_config
from tasks.base import TaskSpec


def released(**kwargs) -> SinkhornAttention:
    kwargs = {"block_size": 4, "max_blocks": 25, "sinkhorn_iters": 0, "temperature": 1.0,
              "variant": "lra_released", **kwargs}
    return SinkhornAttention(16, causal=kwargs.pop("causal", False), n_heads=2, **kwargs)


@pytest.mark.parametrize("L, block_size", [(24, 4), (20, 5)])  # nb = 6 groups of 4; nb = 4 groups of 5
def test_blocked_equals_the_dense_reference_values_and_gradients(L, block_size):
    torch.manual_seed(0)
    mixer = released(block_size=block_size).double()
    x = torch.randn(2, L, 16, dtype=torch.float64, requires_grad=True)
    real = torch.ones(2, L, dtype=torch.bool)
    real[1, L - 7:] = False
    assert not released_masks(real, block_size)[0].any(-1).all(), "some query must have every key masked"
    y = mixer(x, real)
    q, k, v = mixer.project(x)
    ref = mixer.merge(sinkhorn_released_reference(q, k, v, key_real=real, block_size=block_size))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    wrt = [x, mixer.qkv.weight, mixer.out.weight]
    grads = torch.autograd.grad((y * w).sum(), wrt)
    ref_grads = torch.autograd.grad((ref * w).sum(), wrt)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    everything = torch.ones(2, L, dtype=torch.bool)  # no mask: every token real
    ref_all = mixer.merge(sinkhorn_released_reference(q, k, v, key_real=everything, block_size=block_size))
    torch.testing.assert_close(mixer(x), ref_all, rtol=1e-10, atol=1e-10)


def test_sorted_keys_are_contiguous_chunk_sums_whatever_the_sort():
    torch.manual_seed(0)
    B, H, L, hd, b = 2, 2, 12, 3, 3
    nb = L // b
    k = torch.randn(B, H, L, hd, dtype=torch.float64)
    chunks = torch.stack([k[:, :, s * nb:(s + 1) * nb].sum(2) for s in range(b)], 2)  # (B, H, b, hd)
    for _ in range(2):
        perm = torch.softmax(3 * torch.randn(B, H, nb, nb, dtype=torch.float64), -1)
        ours = sorted_keys(k, perm, b)  # (B, H, nb, b, hd)
        torch.testing.assert_close(ours, chunks[:, :, None].expand(B, H, nb, b, hd))
        block_key = k.transpose(1, 2).reshape(B, b, nb, H, hd)  # the release's (bs, block_size, nb, H, hd)
        release = torch.einsum("bskhd,bnhl->bsnhd", block_key, perm.transpose(1, 2))  # (B, b, nb, H, hd)
        torch.testing.assert_close(ours, release.permute(0, 3, 2, 1, 4))
    mixer = released(block_size=b, max_blocks=25).double()
    assert mixer.sortnet.bias is None and mixer.sortnet.weight.shape == (25, 8)  # the release's bias-free Dense
    x = torch.randn(2, L, 16, dtype=torch.float64)
    real = torch.ones(2, L, dtype=torch.bool)
    real[1, 9:] = False
    y = mixer(x, real)
    y.square().sum().backward()
    assert mixer.sortnet.weight.grad.abs().max() < 1e-12 < mixer.qkv.weight.grad.abs().max()
    with torch.no_grad():
        mixer.sortnet.weight.normal_(std=10.0)
    torch.testing.assert_close(mixer(x, real), y, rtol=1e-12, atol=1e-12)


# L = 6, b = 3, nb = 2: position p is slot (s, j) = (p // 2, p % 2); group j = 0 holds positions
# 0, 2, 4 and group 1 positions 1, 3, 5; the sorted key of slot s is the sum of chunk s = positions
# 2s, 2s + 1. Group j reads contiguous block j (positions 3j, 3j + 1, 3j + 2) at offsets s, s'.
# LOCAL: query -> the keys it may see (empty: all masked, uniform over its group);
# SORTED: query -> the chunks it may see (some block real at both offsets).
HAND_MADE = {
    # the last position padding: group 1 reads block 1 = (real, real, pad): slot s = 2 is masked
    "last_pad": ([1, 1, 1, 1, 1, 0],
                 {0: {0, 2, 4}, 2: {0, 2, 4}, 4: {0, 2, 4}, 1: {1, 3}, 3: {1, 3}, 5: set()},
                 {p: {0, 1, 2} for p in range(6)}),  # block 0 is all real
    # two real tokens: group 0 reads block 0 = (real, real, pad), so query 0 sees pad key 2 and
    # pad query 2 sees keys 0 and 2; group 1 reads the all-pad block 1, so real token 1 attends
    # uniformly to 1, 3 and 5
    "two_tokens": ([1, 1, 0, 0, 0, 0],
                   {0: {0, 2}, 2: {0, 2}, 4: set(), 1: set(), 3: set(), 5: set()},
                   {0: {0, 1}, 1: {0, 1}, 2: {0, 1}, 3: {0, 1}, 4: set(), 5: set()}),
}


def by_hand(q, k, v, local: dict, sorted_: dict, nb: int) -> torch.Tensor:
    """One head (L, hd): each query's two softmaxes over the keys the dicts allow, summed."""
    L, hd = q.shape
    chunk_k = torch.stack([k[s * nb:(s + 1) * nb].sum(0) for s in range(L // nb)])  # (b, hd)
    chunk_v = torch.stack([v[s * nb:(s + 1) * nb].sum(0) for s in range(L // nb)])

    def attend(query, keys, values, allowed: set, every: list):
        idx = sorted(allowed) or every  # nothing allowed: equal weights on every key of the row
        weights = torch.softmax(query @ keys[idx].T / math.sqrt(hd), -1) if allowed else \
            torch.full((len(idx),), 1 / len(idx), dtype=q.dtype)
        return weights @ values[idx]

    rows = [attend(q[p], k, v, local[p], list(range(p % nb, L, nb)))
            + attend(q[p], chunk_k, chunk_v, sorted_[p], list(range(L // nb))) for p in range(L)]
    return torch.stack(rows)  # (L, hd)


@pytest.mark.parametrize("case", HAND_MADE)
def test_the_padding_mask_is_the_contiguous_block_on_the_strided_group(case):
    tokens, local, sorted_ = HAND_MADE[case]
    L, b, nb = 6, 3, 2
    real = torch.tensor(tokens, dtype=torch.bool)[None]
    local_ok, sorted_ok = released_masks(real, b)  # (1, 1, nb, b, b), (1, 1, 1, b, b)
    for p in range(L):
        s, j = divmod(p, nb)
        assert {t * nb + j for t in range(b) if local_ok[0, 0, j, s, t]} == local[p], p
        assert {t for t in range(b) if sorted_ok[0, 0, 0, s, t]} == sorted_[p], p
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, 2, dtype=torch.float64) for _ in range(3))
    expected = by_hand(q[0, 0], k[0, 0], v[0, 0], local, sorted_, nb)
    perm = torch.softmax(torch.randn(1, 1, nb, nb, dtype=torch.float64), -1)
    torch.testing.assert_close(released_sinkhorn_attention(q, k, v, perm, key_real=real, block_size=b)[0, 0], expected)
    torch.testing.assert_close(sinkhorn_released_reference(q, k, v, key_real=real, block_size=b)[0, 0], expected)


def test_masking_is_the_releases_float32_addition_of_minus_1e10():
    torch.manual_seed(0)
    scores = (10 * torch.randn(4, 5)).requires_grad_()
    allowed = torch.rand(4, 5) > 0.4
    allowed[2] = False  # a row with nothing allowed
    ours = add_mask_bias(scores, allowed)
    release = scores + torch.where(allowed, 0.0, MASK_BIAS)  # float32, as flax adds the bias
    assert torch.equal(ours, release)
    weights = torch.softmax(ours, -1)
    assert torch.equal(weights[2], torch.full((5,), 0.2))  # uniform, not NaN
    w = torch.randn(4, 5)
    g, g_release = (torch.autograd.grad((torch.softmax(t, -1) * w).sum(), scores, retain_graph=True)[0]
                    for t in (ours, release))
    torch.testing.assert_close(g, g_release)
    assert g[2].abs().sum() > 0  # the masked row still passes gradient to its scores, as autodiff of the addition
    double = add_mask_bias(scores.detach().double(), allowed)
    assert torch.equal(torch.softmax(double, -1)[2], torch.full((5,), 0.2, dtype=torch.float64))


def test_attention_dropout_on_both_softmaxes_in_training_only(monkeypatch):
    torch.manual_seed(0)
    mixer = released(dropout=0.5)
    x = torch.randn(2, 16, 16)
    rates = []
    dropout = torch.nn.functional.dropout

    def recording(t, p=0.5, *args, **kwargs):
        rates.append(p)
        return dropout(t, p, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "dropout", recording)
    train = mixer.train()(x)
    assert rates == [0.5, 0.5]
    assert not torch.allclose(train, mixer(x))
    rates.clear()
    evaluated = mixer.eval()(x)
    assert rates == [0.0, 0.0]
    torch.testing.assert_close(evaluated, mixer(x))


def test_refusals_name_the_config_keys():
    with pytest.raises(UnsupportedTask, match="variant=lra_released has no causal form"):
        released(causal=True)
    with pytest.raises(ValueError, match=r"model.mixer.block_size=4 does not divide the sequence length L=18"):
        released()(torch.randn(1, 18, 16))
    with pytest.raises(ValueError, match=r"model.mixer.variant must be one of \('paper', 'lra_released'\)"):
        released(variant="released")
    # the release slices its 25 sorting outputs to nb, so more blocks than max_blocks is not an error
    assert released(block_size=2, max_blocks=4)(torch.randn(1, 20, 16)).shape == (1, 20, 16)


def test_paper_is_the_default_and_hydra_builds_the_released_variant():
    paper = SinkhornAttention(16, causal=False, n_heads=2, block_size=4, max_blocks=8, sinkhorn_iters=5,
                              temperature=0.75)
    assert paper.variant == "paper" and paper.sortnet.bias is not None
    assert compose_config(["model=sinkhorn", "task=mqar"]).model.mixer.variant == "paper"
    cfg = compose_config(["model=sinkhorn", "task=mqar", "model.mixer.variant=lra_released",
                          "model.mixer.block_size=8", "model.mixer.max_blocks=25", "size.d_model=32",
                          "size.n_layers=1", "size.init=lra_released", "size.head=lra_released",
                          "size.attention_dropout=0.1"])
    spec = TaskSpec(kind="classify", vocab_size=20, n_outputs=3, seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg, type("Task", (), {"spec": spec})())
    mixer = model.blocks[0].mixer
    assert mixer.variant == "lra_released"
    # the release's query, key, value and out kernels (no biases) and its sorting kernel (hd x 25)
    assert sum(p.numel() for p in mixer.parameters()) == 4 * 32 * 32 + mixer.head_dim * 25
    tokens = torch.randint(1, 20, (2, 64))
    tokens[1, 40:] = 0  # padding
    model.train()
    model({"tokens": tokens}).sum().backward()
    assert torch.isfinite(mixer.qkv.weight.grad).all() and mixer.qkv.weight.grad.abs().sum() > 0
