"""The shared backbone's norms and their placement: pre-norm (the default), post-norm blocks
(``model.prenorm=false``) and BatchNorm over batch and length (``model.norm=batchnorm``), as the
S4 repository's LRA configs use them (conf/study/s4_lra.yaml)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from architectures.attention import MultiHeadAttention
from architectures.backbone import Block, SequenceModel
from architectures.layers import ChannelBatchNorm, make_norm
from harness.api import compose_config
from harness.config import result_config
from harness.records import config_hash
from tasks.base import TaskSpec, random_batch

SPEC = TaskSpec(kind="classify", vocab_size=20, n_outputs=5, seq_len=24)
MIXER = functools.partial(MultiHeadAttention, n_heads=2)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
@pytest.mark.parametrize("d_ff", [0, 32])
def test_a_post_norm_block_normalises_after_each_residual_add(norm, d_ff):
    torch.manual_seed(0)
    block = Block(16, MIXER(16, causal=False), d_ff=d_ff, dropout=0.0, norm=norm, prenorm=False)
    x, mask = torch.randn(3, 10, 16), torch.ones(3, 10, dtype=torch.bool)
    want = block.norm1(x + block.mixer(x, mask))
    if d_ff:
        want = block.norm2(want + block.ffn(want))
    torch.testing.assert_close(block(x, mask), want)
    pre = Block(16, block.mixer, d_ff=d_ff, dropout=0.0, norm=norm)  # the same mixer, pre-norm
    assert not torch.allclose(pre(x, mask), want)


def test_post_norm_models_have_no_final_norm_and_pre_norm_ones_do():
    post = SequenceModel(spec=SPEC, mixer=MIXER, d_model=16, n_layers=2, d_ff=0, norm="batchnorm", prenorm=False)
    pre = SequenceModel(spec=SPEC, mixer=MIXER, d_model=16, n_layers=2, d_ff=0, norm="batchnorm")
    assert isinstance(post.norm, nn.Identity) and isinstance(pre.norm, ChannelBatchNorm)
    out = post(random_batch(SPEC, 4, seed=0))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert all(p.grad is not None for p in post.parameters())


def test_batchnorm_normalises_each_channel_over_batch_and_length_then_uses_running_statistics():
    norm = make_norm("batchnorm", 6)
    x = torch.randn(4, 9, 6) * 3 + 2
    mean, var = x.mean(dim=(0, 1)), x.var(dim=(0, 1), unbiased=False)
    torch.testing.assert_close(norm(x), (x - mean) / torch.sqrt(var + norm.eps))
    norm.eval()  # running statistics: an example's output no longer depends on the rest of the batch
    torch.testing.assert_close(norm(x)[:1], norm(x[:1]))


def test_reversible_blocks_refuse_post_norm_naming_the_key():
    with pytest.raises(ValueError, match="model.prenorm"):
        SequenceModel(spec=SPEC, mixer=MIXER, d_model=16, n_layers=2, d_ff=32, reversible=True, prenorm=False)


def test_an_unknown_norm_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ValueError, match="model.norm must be one of .*batchnorm"):
        make_norm("groupnorm", 8)


def test_the_new_keys_keep_old_hashes_and_count_when_set():
    cfg = compose_config(["model=s4d", "task=mqar"])
    before = config_hash(result_config(cfg))
    older = OmegaConf.create(OmegaConf.to_container(cfg))  # a config of before model.prenorm and dt_lr
    del older.model.prenorm, older.model.mixer.dt_lr
    assert config_hash(result_config(older)) == before
    for override in ("model.prenorm=false", "model.norm=batchnorm", "model.mixer.dt_lr=0.01"):
        assert config_hash(result_config(compose_config(["model=s4d", "task=mqar", override]))) != before
