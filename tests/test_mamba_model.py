"""Mamba at the model level (issue 14): the official init (state-spaces/mamba
mamba_ssm/models/mixer_seq_simple.py ``_init_weights``), tied embeddings, and the bidirectional
choice shared with the other SSM families."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from architectures.backbone import SequenceModel
from architectures.mamba import Mamba
from tasks.base import TaskSpec

V = 256
LM = TaskSpec(kind="lm", vocab_size=V, n_outputs=V, seq_len=16)
CLASSIFY = TaskSpec(kind="classify", vocab_size=V, n_outputs=3, seq_len=16)
MIXER = dict(d_state=4, d_conv=4, expand=2, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4)


def make(spec=LM, *, n_layers=4, d_ff=0, d_model=32, seed=0, **mixer):
    torch.manual_seed(seed)
    return SequenceModel(spec=spec, mixer=functools.partial(Mamba, **{**MIXER, **mixer}), d_model=d_model,
                         n_layers=n_layers, d_ff=d_ff, norm="rmsnorm", positional="none", tie_embeddings=True)


def test_embedding_is_normal_with_std_0_02():
    weight = make().embed.weight  # 256 x 32 draws
    assert abs(weight.mean().item()) < 0.002 and 0.018 < weight.std().item() < 0.022


@pytest.mark.parametrize("n_layers,d_ff", [(4, 0), (3, 64)])
def test_residual_outputs_rescaled_by_one_over_sqrt_n_residuals_n_layers(n_layers, d_ff):
    model = make(n_layers=n_layers, d_ff=d_ff)
    n_residuals = 1 if d_ff == 0 else 2  # the official n_residuals_per_layer
    for block in model.blocks:
        outs = [block.mixer.out_proj] + ([block.ffn.down] if d_ff else [])
        for out in outs:  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), then / sqrt(k n)
            bound = 1 / math.sqrt(out.in_features) / math.sqrt(n_residuals * n_layers)
            assert out.weight.abs().max() <= bound and out.weight.abs().max() > 0.9 * bound


def test_linear_biases_zeroed_but_dt_bias_kept():
    model = make(CLASSIFY, bias=True, d_ff=64)
    for block in model.blocks:
        m = block.mixer
        assert not m.in_proj.bias.any() and not m.out_proj.bias.any()
        assert not block.ffn.up.bias.any() and not block.ffn.down.bias.any()
        dt = F.softplus(m.dt_proj.bias)  # still the dt init: log-uniform in [dt_min, dt_max]
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0
        assert m.conv1d.bias.any()  # a Conv1d, which the official init leaves alone
    assert all(not layer.bias.any() for layer in model.head.mlp if isinstance(layer, torch.nn.Linear))


def test_yaml_ties_the_lm_head_and_the_model_still_learns_through_it():
    assert OmegaConf.load("conf/model/mamba.yaml").tie_embeddings is True
    model = make()
    assert model.head.weight is model.embed.weight
    tokens = torch.randint(0, V, (2, 8))
    model({"tokens": tokens}).sum().backward()
    assert model.embed.weight.grad.abs().sum() > 0


def test_bidirectional_is_the_same_choice_as_s4d_and_s4():
    choice = {name: OmegaConf.load(f"conf/model/{name}.yaml").mixer.bidirectional for name in ("mamba", "s4d", "s4")}
    assert len(set(choice.values())) == 1, choice
    assert choice["mamba"] is True
    # on a causal task the block stays causal whatever the key says; on classify it reads both ways
    assert not make(bidirectional=True).blocks[0].mixer.bidirectional
    assert make(CLASSIFY, bidirectional=True).blocks[0].mixer.bidirectional
