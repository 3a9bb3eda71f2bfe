"""Sparse Transformer with pattern=lra_released (architectures/sparse_transformer.py): LRA's released
merged Fixed1Pattern | Fixed2Pattern (the first and the last c positions of every block as summaries),
causal on every task, with the CLS token's row and column all ones and the pattern counted after it;
the blocked kernel equals dense attention under that mask (values and gradients, float64)."""

from __future__ import annotations

import pytest
import torch

from architectures.attention import dense_attention
from architectures.sparse_transformer import (
    SparseTransformerAttention,
    released_attention,
    sparse_transformer_mask,
)
from harness.api import build_model, compose_config
from tasks.base import TaskSpec
from tests.test_sparse import LargestTensor, assert_same_values_and_gradients, keys_ok, qkv, right_padding

B, H, D = 3, 2, 8


def released(*, cls_token: bool, causal: bool = False, **kwargs) -> SparseTransformerAttention:
    """A classification-mode (causal=False) mixer unless told otherwise: the release is causal anyway."""
    kwargs = {"stride": 5, "c": 2, **kwargs}
    return SparseTransformerAttention(D, causal=causal, n_heads=H, pattern="lra_released", cls_token=cls_token,
                                      **kwargs)


def rows(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


def test_mask_by_hand_first_and_last_c_of_every_block_causal():
    # l = 3, c = 1: summaries at offsets 0 and 2 of each block, i.e. positions 0, 2, 3, 5, 6
    mask = sparse_transformer_mask(7, pattern="lra_released", stride=3, c=1, causal=False)
    assert rows(mask) == [
        [0],
        [0, 1],
        [0, 1, 2],
        [0, 2, 3],  # own block {3}, earlier summaries 0 and 2
        [0, 2, 3, 4],
        [0, 2, 3, 4, 5],
        [0, 2, 3, 5, 6],  # own block {6}, summaries 0, 2, 3, 5 (4 is neither)
    ]
    assert not mask.triu(1).any()  # causal although the mixer is a classifier's
    # the paper's fixed pattern has no first-of-block summary: 0 and 3 are missing from row 6
    assert rows(sparse_transformer_mask(7, pattern="fixed", stride=3, c=1, causal=True))[6] == [2, 5, 6]


def test_mask_by_hand_with_the_cls_token():
    # the CLS token at 0, then the 7 tokens above at positions 1 .. 7 (the pattern counted from 1)
    mask = sparse_transformer_mask(8, pattern="lra_released", stride=3, c=1, causal=False, cls_token=True)
    assert rows(mask) == [
        [0, 1, 2, 3, 4, 5, 6, 7],  # the CLS token attends to every key, the future included
        [0, 1],
        [0, 1, 2],
        [0, 1, 2, 3],
        [0, 1, 3, 4],
        [0, 1, 3, 4, 5],
        [0, 1, 3, 4, 5, 6],
        [0, 1, 3, 4, 6, 7],
    ]
    assert mask[:, 0].all()  # and every query attends to it
    body = sparse_transformer_mask(7, pattern="lra_released", stride=3, c=1, causal=False)
    assert torch.equal(mask[1:, 1:], body)


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("L,stride,c", [(29, 5, 2), (36, 6, 1), (17, 4, 4), (1, 3, 1)])
def test_kernel_equals_dense_with_the_released_mask(cls_token, L, stride, c):
    q, k, v = (t.double().requires_grad_() for t in qkv(L, seed=L + stride))
    key_real = right_padding(L, seed=stride)
    key_real[:, 0] = True  # the CLS token is real (the backbone's mask)
    y = released_attention(q, k, v, stride=stride, c=c, cls_token=cls_token, key_real=key_real)
    allowed = sparse_transformer_mask(L, pattern="lra_released", stride=stride, c=c, causal=False,
                                      cls_token=cls_token)[None, None]
    ref = dense_attention(q, k, v, allowed & keys_ok(key_real))
    assert_same_values_and_gradients(y, ref, (q, k, v))


@pytest.mark.parametrize("positional", ["alibi", "t5"])
@pytest.mark.parametrize("cls_token", [False, True])
def test_score_bias_sees_the_true_distances(cls_token, positional):
    torch.manual_seed(0)
    L = 23
    mixer = released(cls_token=cls_token, positional=positional).double()
    if positional == "t5":
        with torch.no_grad():
            mixer.score_bias.table.normal_()
    key_real = torch.arange(L) < torch.tensor([[L], [15], [9]])
    q, k, v = mixer.project(torch.randn(B, L, D, dtype=torch.float64))
    pos = torch.arange(L)
    allowed = sparse_transformer_mask(L, pattern="lra_released", stride=5, c=2, causal=False, cls_token=cls_token)
    ref = dense_attention(q, k, v, allowed & keys_ok(key_real), mixer.relative_bias(pos[:, None], pos[None, :]))
    torch.testing.assert_close(mixer.attend(q, k, v, key_real, 0.0), ref)


@pytest.mark.parametrize("cls_token", [False, True])
def test_classifier_mixer_is_causal_as_released(cls_token):
    torch.manual_seed(0)
    L, t = 31, 17
    mixer = released(cls_token=cls_token)
    x = torch.randn(B, L, D)
    x2 = x.clone()
    x2[:, t:] = torch.randn(B, L - t, D)
    y, y2 = mixer(x, None), mixer(x2, None)
    first = 1 if cls_token else 0  # the CLS token sees the whole sequence
    torch.testing.assert_close(y[:, first:t], y2[:, first:t], atol=0, rtol=0)
    assert not torch.allclose(y[:, t:], y2[:, t:])
    if cls_token:
        assert not torch.allclose(y[:, 0], y2[:, 0])


def test_cls_row_is_full_attention_and_every_token_reads_the_cls_token():
    torch.manual_seed(0)
    L = 26
    mixer = released(cls_token=True).double()
    x = torch.randn(B, L, D, dtype=torch.float64)
    key_real = torch.arange(L) < torch.tensor([[L], [20], [12]])
    q, k, v = mixer.project(x)
    y = mixer.attend(q, k, v, key_real, 0.0)
    torch.testing.assert_close(y[:, :, 0], dense_attention(q, k, v, keys_ok(key_real))[:, :, 0])
    x2 = x.clone()
    x2[:, 0] = torch.randn(B, D, dtype=torch.float64)
    y2 = mixer.attend(*mixer.project(x2), key_real, 0.0)
    assert ((y2 - y).abs().amax((1, 3)) > 1e-6).all()  # every query of every example moved
    # without the CLS token, position 0 is an ordinary token: later blocks see it only as a summary
    plain = released(cls_token=False).double()
    assert plain.attend(q, k, v, key_real, 0.0)[:, :, 0].allclose(v[:, :, 0])  # it sees only itself


def test_extra_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    mixer = released(cls_token=True)
    x = torch.randn(1, 21, D)
    padded = torch.cat([x, torch.randn(1, 30, D)], 1)
    mask = torch.arange(51)[None] < 21
    torch.testing.assert_close(mixer(padded, mask)[:, :21], mixer(x, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls_token", [False, True])
def test_cost_is_not_quadratic(cls_token):
    """At L = 2048 with l = 32 nothing near an L x L tensor is built, forward or backward."""
    L = 2048
    mixer = released(cls_token=cls_token, stride=32, c=4)
    x = torch.randn(1, L, D, requires_grad=True)
    with LargestTensor() as probe:
        mixer(x, None).sum().backward()
    assert probe.numel < L * L // 4, probe.numel


@pytest.mark.parametrize("task,pooling,expected", [
    ("classify", "cls_token", True), ("pair", "cls_token", True), ("classify", "mean", False),
    ("pair", "cls", True),  # the release's dual encoders pool the first document token as the CLS
    ("lm", "cls_token", False),  # an lm task gets no CLS token
])
def test_the_backbone_tells_the_mixer_about_its_cls_token(task, pooling, expected):
    cfg = compose_config(["model=sparse_transformer", "model.mixer.pattern=lra_released", "model.mixer.stride=4",
                          "model.mixer.c=1", "size.d_model=16", "size.n_layers=1", f"size.pooling={pooling}"])
    spec = TaskSpec(kind=task, vocab_size=20, n_outputs=20 if task == "lm" else 2, seq_len=24)
    model = build_model(cfg, type("Task", (), {"spec": spec})())
    assert model.blocks[0].mixer.cls_token is expected
    tokens = torch.randint(1, 20, (2, 24))
    batch = {"tokens": tokens, "tokens2": tokens} if task == "pair" else {"tokens": tokens}
    assert torch.isfinite(model(batch)).all()


def test_bad_values_name_the_config_key_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"model\.mixer\.pattern.*'strided', 'fixed', 'lra_released'"):
        SparseTransformerAttention(D, causal=False, n_heads=H, pattern="released", stride=4, c=1)
    with pytest.raises(ValueError, match=r"model\.mixer\.c must be in \[1, model\.mixer\.stride=4\]"):
        released(cls_token=False, stride=4, c=5)
    with pytest.raises(ValueError, match=r"model\.mixer\.stride"):
        released(cls_token=False, stride=0, c=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("cls_token", [False, True])
def test_flex_attention_matches_portable_path(cls_token):
    torch.manual_seed(0)
    L = 300
    mixer = SparseTransformerAttention(16 * H, causal=False, n_heads=H, pattern="lra_released", stride=24, c=6,
                                       cls_token=cls_token).cuda()
    x = torch.randn(B, L, 16 * H, device="cuda")
    mask = right_padding(L, seed=6).cuda()
    mask[:, 0] = True
    fast = mixer(x, mask)
    q, k, v = mixer.project(x)
    portable = mixer.merge(mixer.attend(q, k, v, mask, 0.0))
    real = mask[..., None]
    torch.testing.assert_close(fast * real, portable * real, atol=2e-4, rtol=2e-4)
