"""Transformer-XL's reference options (kimiyoung/transformer-xl, pytorch/mem_transformer.py and
train.py): the whole model against a line-by-line transcription of the reference's forward, the
ReLU feed-forward, the embedding scale, the tied softmax, the reference init's statistics, the
extra dropout sites, and the config hashes of before the options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from architectures.layers import FeedForward
from architectures.transformer_xl import ScaledEmbedding
from tests.test_transformer_xl import CLASSIFY, LM, REFERENCE, make, tokens_

# -- a transcription of the reference (time-major: (T, B, D), as mem_transformer.py) -----------


def reference_pos_emb(pos_seq: torch.Tensor, d_model: int) -> torch.Tensor:
    """PositionalEmbedding.forward (mem_transformer.py:21-31): [sin | cos], (K, 1, D)."""
    inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0, dtype=pos_seq.dtype) / d_model))
    sinusoid_inp = torch.outer(pos_seq, inv_freq)
    return torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)[:, None, :]


def reference_rel_shift(x: torch.Tensor) -> torch.Tensor:
    """RelMultiHeadAttn._rel_shift (mem_transformer.py:194-207), zero_triu False."""
    zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1)
    x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])
    return x_padded[1:].view_as(x)


def reference_layer(block, w, r, r_w_bias, r_r_bias, attn_mask, mems, r_net_weight):
    """RelPartialLearnableDecoderLayer.forward with pre_lnorm False (mem_transformer.py:218-291,
    53-67), with the weights of our ``block``: qkv_net = [q; kv], o_net = out (bias-free, as
    init txl_reference leaves it), r_net the reference's layout of our W_r."""
    a = block.attn
    n_head, d_head = a.n_heads, a.head_dim
    qlen, rlen, bsz = w.size(0), r.size(0), w.size(1)
    qkv_weight = torch.cat([a.q.weight, a.kv.weight], 0)
    cat = torch.cat([mems, w], 0) if mems is not None else w
    w_heads = F.linear(cat, qkv_weight)
    r_head_k = F.linear(r, r_net_weight)
    w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)
    w_head_q = w_head_q[-qlen:]
    klen = w_head_k.size(0)
    w_head_q = w_head_q.view(qlen, bsz, n_head, d_head)
    w_head_k = w_head_k.view(klen, bsz, n_head, d_head)
    w_head_v = w_head_v.view(klen, bsz, n_head, d_head)
    r_head_k = r_head_k.view(rlen, n_head, d_head)
    AC = torch.einsum("ibnd,jbnd->ijbn", (w_head_q + r_w_bias, w_head_k))
    BD = reference_rel_shift(torch.einsum("ibnd,jnd->ijbn", (w_head_q + r_r_bias, r_head_k)))
    attn_score = (AC + BD) * (1 / d_head ** 0.5)
    attn_score = attn_score.masked_fill(attn_mask[:, :, :, None], -float("inf"))
    attn_prob = F.softmax(attn_score, dim=1)
    attn_vec = torch.einsum("ijbn,jbnd->ibnd", (attn_prob, w_head_v)).reshape(qlen, bsz, n_head * d_head)
    output = block.norm1(w + a.out(attn_vec))  # residual connection + layer normalization
    return block.norm2(output + block.ffn.down(F.relu(block.ffn.up(output))))  # PositionwiseFF


def reference_forward(model, dec_inp, mems, *, mem_len, same_length, clamp_len):
    """MemTransformerLM._forward (mem_transformer.py:642-735) and the softmax's logits
    (ProjectedAdaptiveLogSoftmax without cutoffs: F.linear(hidden, weight, bias)), in eval mode."""
    qlen, bsz = dec_inp.size()
    D = model.embed.embedding_dim
    word_emb = F.embedding(dec_inp, model.embed.weight) * D ** 0.5  # AdaptiveEmbedding, emb_scale
    mlen = mems[0].size(0) if mems is not None else 0
    klen = mlen + qlen
    all_ones = torch.ones(qlen, klen)
    if same_length:
        mask_len = klen - mem_len
        mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
        dec_attn_mask = (torch.triu(all_ones, 1 + mlen) + torch.tril(all_ones, -mask_shift_len)).bool()[:, :, None]
    else:
        dec_attn_mask = torch.triu(all_ones, diagonal=1 + mlen).bool()[:, :, None]
    pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=word_emb.dtype)
    if clamp_len > 0:
        pos_seq.clamp_(max=clamp_len)
    pos_emb = reference_pos_emb(pos_seq, D)
    # ours interleaves sin and cos (sinusoidal_positions); the reference concatenates them: the
    # same W_r with its input columns reordered
    order = torch.stack([torch.arange(D // 2), D // 2 + torch.arange(D // 2)], 1).reshape(-1)
    hids, core_out = [word_emb], word_emb
    for i, block in enumerate(model.blocks):
        r_net_weight = torch.zeros_like(block.attn.r.weight)
        r_net_weight[:, order] = block.attn.r.weight
        core_out = reference_layer(block, core_out, pos_emb, model.blocks[0].attn.u, model.blocks[0].attn.v,
                                   dec_attn_mask, None if mems is None else mems[i], r_net_weight)
        hids.append(core_out)
    new_mems = None
    if mems is not None:  # _update_mems, ext_len 0
        end_idx = mlen + qlen
        beg_idx = max(0, end_idx - mem_len)
        new_mems = [torch.cat([m, h], 0)[beg_idx:end_idx].detach() for m, h in zip(mems, hids)]
    logits = F.linear(core_out, model.embed.weight, model.head.bias)
    return logits, new_mems


@pytest.mark.parametrize("seg_len,mem_len,same_length,clamp_len", [(4, 4, False, -1), (3, 5, False, -1),
                                                                     (4, 6, True, 3), (2, 3, True, -1)])
def test_the_reference_options_equal_a_transcription_of_the_reference_forward(seg_len, mem_len, same_length,
                                                                                clamp_len):
    """Our model (one call, segments in parallel) against MemTransformerLM fed one segment at a
    time from empty memories (train.py's loop: mems = ret[1:])."""
    model = make(seg_len=seg_len, mem_len=mem_len, same_length=same_length, clamp_len=clamp_len,
                 **REFERENCE).double()
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):  # away from the init, so a swapped norm shows
                norm.bias.normal_(0, 0.3)
        model.head.bias.normal_(0, 0.3)
    tokens = tokens_(2, 13)
    with torch.no_grad():
        ours = model({"tokens": tokens})  # (B, L, V)
        mems = [torch.empty(0, 2, 16, dtype=torch.double) for _ in range(len(model.blocks) + 1)]
        outs = []
        for chunk in tokens.T.split(seg_len, dim=0):  # (T, B), time-major
            logits, mems = reference_forward(model, chunk, mems, mem_len=mem_len, same_length=same_length,
                                             clamp_len=clamp_len)
            outs.append(logits)
    torch.testing.assert_close(ours, torch.cat(outs, 0).transpose(0, 1))
    # our memories are the layer inputs, as the reference's hids[:-1]
    for ours_mem, ref_mem in zip(model.last_mems, mems[:-1]):
        torch.testing.assert_close(ours_mem, ref_mem.transpose(0, 1))


# -- the options one at a time ------------------------------------------------------------------


def test_post_norm_blocks_have_no_final_norm_and_pre_norm_blocks_keep_theirs():
    assert isinstance(make(prenorm=False).norm, nn.Identity)
    assert isinstance(make().norm, nn.LayerNorm)
    assert not torch.allclose(make(prenorm=False)({"tokens": tokens_(2, 8)}), make()({"tokens": tokens_(2, 8)}))


def test_relu_feed_forward_is_the_references_positionwise_ff():
    model = make(ffn_activation="relu", dropout=0.0)
    ffn = model.blocks[0].ffn
    assert isinstance(ffn, FeedForward) and ffn.activation == "relu"
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ffn(x), ffn.down(torch.relu(ffn.up(x))))
    with pytest.raises(ValueError, match="model.ffn_activation"):
        make(ffn_activation="swish")


def test_embed_scale_multiplies_the_embedding_by_sqrt_d_model():
    scaled, plain = make(embed_scale=True), make()
    assert isinstance(scaled.embed, ScaledEmbedding) and type(plain.embed) is nn.Embedding
    tokens = tokens_(2, 5)
    torch.testing.assert_close(scaled.embed(tokens), scaled.embed.weight[tokens] * math.sqrt(16))
    torch.testing.assert_close(plain.embed(tokens), plain.embed.weight[tokens])


def test_reference_head_is_the_embedding_tied_softmax_with_a_bias():
    model = make(head="txl_reference")
    assert model.head.weight is model.embed.weight and model.head.bias is not None
    assert make().head.bias is None and make().head.weight is not make().embed.weight
    with pytest.raises(ValueError, match="model.head=txl_reference"):
        make(CLASSIFY, head="txl_reference")
    with pytest.raises(ValueError, match="model.init"):
        make(init="xavier")


def test_reference_init_statistics():
    """train.py weights_init (init normal, init_std 0.02): Linear N(0, 0.02) with zero biases,
    embedding N(0, 0.02), LayerNorm weight N(1, 0.02) and zero bias, u and v N(0, 0.02)."""
    model = make(d_model=128, d_ff=512, n_heads=4, init="txl_reference", head="txl_reference")

    def close(value, target, tol):
        return abs(float(value.detach()) - target) < tol

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert close(module.weight.std(), 0.02, 0.002) and close(module.weight.mean(), 0.0, 0.002), name
            assert module.bias is None or not module.bias.any(), name
        elif isinstance(module, nn.LayerNorm):
            assert close(module.weight.mean(), 1.0, 0.01) and close(module.weight.std(), 0.02, 0.006), name
            assert not module.bias.any(), name
    assert close(model.embed.weight.std(), 0.02, 0.002)
    assert all(block.attn.out.bias is None for block in model.blocks)  # o_net: bias=False
    u, v = model.blocks[0].attn.u, model.blocks[0].attn.v
    assert close(u.std(), 0.02, 0.005) and close(v.std(), 0.02, 0.005)
    # ours: PyTorch's initialisers (N(0, 1) embedding, ones for the norms)
    default = make(d_model=128, d_ff=512, n_heads=4)
    assert close(default.embed.weight.std(), 1.0, 0.05) and bool((default.norm.weight == 1).all())


def test_distance_and_output_dropout_are_the_references_extra_dropout_sites():
    """The reference drops out the distance embeddings (mem_transformer.py:671) and the last
    layer's output (:731) besides the embedding; ours drops out the embedding only."""

    def dropout_inputs(**options):
        model = make(dropout=0.1, **options).train()
        shapes = []
        model.dropout.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
        model({"tokens": tokens_(2, 8)})
        return shapes

    assert dropout_inputs() == [(2, 8, 16)]  # the embedding
    assert dropout_inputs(distance_dropout=True, output_dropout=True) == [(2, 8, 16), (8, 16), (2, 8, 16)]


# -- configs --------------------------------------------------------------------------------------


def test_the_yaml_defaults_are_ours_and_the_new_keys_keep_old_hashes():
    from omegaconf import OmegaConf

    from harness.api import compose_config
    from harness.config import result_config
    from harness.records import config_hash

    new_keys = ("prenorm", "ffn_activation", "embed_scale", "init", "head", "distance_dropout", "output_dropout")
    yaml = OmegaConf.load("conf/model/transformer_xl.yaml")
    assert [yaml[k] for k in new_keys] == [True, "gelu", False, "default", "default", False, False]
    for base in (["model=transformer_xl", "task=mqar"], ["experiment=txl_memory_cpu"]):
        cfg = compose_config(base)
        before = config_hash(result_config(cfg))
        older = OmegaConf.create(OmegaConf.to_container(cfg))  # a config of before these keys
        for key in new_keys:
            del older.model[key]
        assert config_hash(result_config(older)) == before
    base = ["model=transformer_xl", "task=mqar"]
    before = config_hash(result_config(compose_config(base)))
    for override in ("model.prenorm=false", "model.ffn_activation=relu", "model.embed_scale=true",
                     "model.init=txl_reference", "model.head=txl_reference", "model.distance_dropout=true",
                     "model.output_dropout=true"):
        assert config_hash(result_config(compose_config([*base, override]))) != before, override


@pytest.mark.parametrize("txl_size,sizes,train,evaluation", [
    # run_enwik8_base.sh: n_layer 12, d_model 512, n_head 8, d_inner 2048, dropout 0.1, dropatt 0.0,
    # tgt_len = mem_len 512, batch 22, warmup 0; eval tgt_len 80, mem_len 2100, clamp_len 820
    ("base", (12, 512, 8, 2048, 0.1, 0.0), (512, 512, 22, 0), (80, 2100, 820)),
    # run_enwik8_large.sh: n_layer 24, d_model 1024, n_head 8 (d_head 128), d_inner 3072, dropout and
    # dropatt 0.15, tgt_len = mem_len 768, batch 64, warmup 4000; eval tgt_len 128, mem_len 3800, clamp_len 1000
    ("large", (24, 1024, 8, 3072, 0.15, 0.15), (768, 768, 64, 4000), (128, 3800, 1000)),
])
def test_txl_enwik8_composes_the_reference_scripts_at_both_sizes(txl_size, sizes, train, evaluation):
    from harness.api import compose_config
    from harness.validation import config_problems

    cfg = compose_config(["experiment=txl_enwik8", f"txl_size={txl_size}", "task.path=/data/enwik8"])
    m, t = cfg.model, cfg.trainer
    assert config_problems(cfg) == []
    assert (m.name, cfg.task.name, cfg.task.source, cfg.sweep.name) == ("transformer_xl", "char_lm", "file", "txl_enwik8")
    assert (m.n_layers, m.d_model, m.n_heads, m.d_ff, m.dropout, m.dropatt) == sizes
    assert (m.seg_len, m.mem_len, t.batch_size, t.warmup_steps) == train and cfg.task.seq_len == m.seg_len
    assert (m.eval_seg_len, m.eval_mem_len, m.eval_clamp_len, m.eval_same_length) == (*evaluation, True)
    assert m.stream and not m.untie_r and m.clamp_len == -1 and not m.same_length
    # train.py: adam lr 2.5e-4, 400000 steps, cosine to 0, clip 0.25, 10 evaluation streams
    assert (t.lr, t.steps, t.min_lr_ratio, t.grad_clip, t.weight_decay, t.eval_batch_size) == \
        (2.5e-4, 400000, 0.0, 0.25, 0.0, 10)
    options = {k: m[k] for k in REFERENCE}
    assert options == REFERENCE and m.distance_dropout and m.output_dropout
