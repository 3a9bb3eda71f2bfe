"""Synthesizer attention (architectures/synthesizer.py) against its formulas written out."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from architectures.backbone import SequenceModel
from architectures.synthesizer import SynthesizerAttention
from tasks.base import TaskSpec

D, H, L = 32, 2, 12


def mixer(causal=False, **kw):
    torch.manual_seed(0)
    return SynthesizerAttention(D, causal=causal, n_heads=H, max_len=20, **kw).eval()


def explicit(m, x, logits, causal, key_real=None):
    """softmax(logits + mask) V, then the output projection, head by head."""
    B = x.shape[0]
    v = (x @ m.v.weight.T + m.v.bias).view(B, L, H, -1).transpose(1, 2)
    allowed = torch.ones(B, 1, L, L, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    if key_real is not None:
        allowed = allowed & key_real[:, None, None, :]
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    y = (weights @ v).transpose(1, 2).reshape(B, L, D)
    return y @ m.out.weight.T + m.out.bias


@pytest.mark.parametrize("causal", [False, True])
def test_random_plus_dot_product_is_R_plus_qk(causal):
    m = mixer(causal, mode="random", dot_product=True)
    x = torch.randn(2, L, D)
    q, k = (x @ m.qk.weight.T + m.qk.bias).view(2, L, 2, H, -1).permute(2, 0, 3, 1, 4)
    logits = m.random[None, :, :L, :L] + q @ k.transpose(-2, -1) / math.sqrt(D // H)
    torch.testing.assert_close(m(x), explicit(m, x, logits, causal))


def test_factorized_random_is_R1_R2T_and_ignores_the_input_for_the_weights():
    m = mixer(mode="random", factorized=True, k=4)
    x = torch.randn(2, L, D)
    key_real = torch.ones(2, L, dtype=torch.bool)
    key_real[1, 9:] = False
    logits = (m.random1[:, :L] @ m.random2[:, :L].transpose(-2, -1))[None]
    torch.testing.assert_close(m(x, key_real), explicit(m, x, logits.expand(2, -1, -1, -1), False, key_real))


def test_dense_is_a_two_layer_mlp_of_each_token_over_positions():
    m = mixer(mode="dense")
    x = torch.randn(2, L, D)
    h = F.relu(x @ m.dense_in.weight.T + m.dense_in.bias).view(2, L, H, -1)  # (B, L, H, hd)
    logits = torch.stack([h[:, :, i] @ m.dense_out[i, :, :L] + m.dense_bias[i, :L] for i in range(H)], 1)
    torch.testing.assert_close(m(x), explicit(m, x, logits, False))


def test_the_backbone_sizes_max_len_to_the_longest_input():
    spec = TaskSpec(kind="seq2seq", vocab_size=20, n_outputs=20, seq_len=24, target_len=16, bos_id=1, sep_id=2)
    partial = functools.partial(SynthesizerAttention, n_heads=H, mode="random", max_len=None)
    model = SequenceModel(spec=spec, mixer=partial, d_model=D, n_layers=1, d_ff=64)
    assert model.blocks[0].mixer.max_len == 40
    with pytest.raises(ValueError, match="model.mixer.max_len"):
        mixer(mode="random")(torch.randn(1, 21, D))


def test_bad_combinations_name_the_key():
    with pytest.raises(ValueError, match="model.mixer.mode"):
        mixer(mode="mixed")
    with pytest.raises(ValueError, match="factorized"):
        mixer(mode="dense", factorized=True)
