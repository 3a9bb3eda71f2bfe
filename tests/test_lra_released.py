"""LRA's released model details as backbone options (architectures/lra.py): the init, the heads,
attention-weight dropout from `size`, qkv_dim != d_model, and that none of them changes the hash
of a config that does not set it."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from architectures.attention import MultiHeadAttention, dense_attention
from architectures.backbone import SequenceModel
from architectures.linear import LinearAttention, LinformerAttention
from architectures.lra import TRUNCATED_NORMAL_STD, LRADualHead
from architectures.performer import PerformerAttention
from architectures.sparse import LocalAttention, sliding_window_mask
from architectures.synthesizer import SynthesizerAttention
from harness.api import build_model, compose_config
from harness.config import result_config
from harness.records import config_hash
from tasks.base import TaskSpec

CLASSIFY = TaskSpec(kind="classify", vocab_size=50, n_outputs=5, seq_len=24)
PAIR = TaskSpec(kind="pair", vocab_size=50, n_outputs=2, seq_len=24)


def transformer(spec: TaskSpec, **kwargs) -> SequenceModel:
    def mixer(d_model, **kw):
        return MultiHeadAttention(d_model, n_heads=4, **kw)
    return SequenceModel(spec=spec, mixer=mixer, d_model=64, n_layers=2, d_ff=128, **kwargs)


def test_released_init_draws_lra_kernels_and_drops_attention_biases():
    torch.manual_seed(0)
    model = transformer(CLASSIFY, init="lra_released", positional="learned")
    for block in model.blocks:
        mha = block.mixer
        assert mha.qkv.bias is None and mha.out.bias is None  # nn.SelfAttention(bias=False)
        # one xavier draw per query / key / value kernel (64 x 64): bound sqrt(6 / 128); PyTorch's
        # default bound is 1 / sqrt(64) and one draw over the fused 64 x 192 sqrt(6 / 256)
        limit = math.sqrt(6 / 128)
        for part in mha.qkv.weight.chunk(3):
            assert 0.95 * limit < part.abs().max() <= limit
        for linear in (block.ffn.up, block.ffn.down):
            bound = math.sqrt(6 / (linear.in_features + linear.out_features))
            assert 0.95 * bound < linear.weight.abs().max() <= bound
            assert 0 < linear.bias.abs().max() < 1e-5  # normal(stddev=1e-6)
    assert abs(model.pos_embed.weight.std().item() - 0.02) < 0.003
    assert abs(model.embed.weight.std().item() - 1.0) < 0.05
    first = model.head.mlp[0]
    std = math.sqrt(1 / first.in_features) / TRUNCATED_NORMAL_STD
    assert first.weight.abs().max() <= 2 * std and abs(first.weight.std().item() - 0.88 * std) < 0.1 * std
    assert not first.bias.any()
    x = {"tokens": torch.randint(1, 50, (2, 24))}
    model(x).sum().backward()  # the bias-free projections train


def test_default_init_is_unchanged():
    model = transformer(CLASSIFY)
    assert model.blocks[0].mixer.qkv.bias is not None
    assert model.blocks[0].mixer.qkv.weight.abs().max() <= 1 / 8  # PyTorch's kaiming-uniform bound


def test_released_heads():
    clf = transformer(CLASSIFY, head="lra_released")
    assert clf.head.mlp[0].out_features == 128  # mlp_dim = d_ff, not d_model
    pair = transformer(PAIR, head="lra_released")
    assert isinstance(pair.head, LRADualHead)
    widths = [(m.in_features, m.out_features) for m in pair.head.mlp if isinstance(m, torch.nn.Linear)]
    assert widths == [(128, 128), (128, 64), (64, 2)]  # [u, v] -> mlp_dim -> mlp_dim // 2 -> classes
    u, v = torch.randn(3, 64), torch.randn(3, 64)
    expected = pair.head.mlp(torch.cat([u, v], -1))
    torch.testing.assert_close(pair.head(u, v), expected)
    batch = {"tokens": torch.randint(1, 50, (2, 24)), "tokens2": torch.randint(1, 50, (2, 24))}
    assert pair(batch).shape == (2, 2)
    with pytest.raises(ValueError, match="model.head"):
        transformer(CLASSIFY, head="nli")
    with pytest.raises(ValueError, match="model.init"):
        transformer(CLASSIFY, init="flax")


REFORMER_RELEASED = ["model.mixer.variant=lra_released", "model.mixer.chunk_len=null", "model.mixer.n_hashes=1",
                     "model.mixer.n_buckets=10", "model.mixer.dropout=0", "model.reversible=false"]


@pytest.mark.parametrize("name,extra", [(name, []) for name in ("linformer", "performer", "reformer", "synthesizer",
                                                                "sinkhorn", "bigbird", "block_local",
                                                                "linear_transformer", "s4d")]
                         + [("reformer", REFORMER_RELEASED)], ids=lambda v: "released" if v else None)
def test_every_lra_model_builds_and_trains_with_the_released_options(name, extra):
    cfg = compose_config([f"model={name}", "task=mqar", "size.d_model=32", "size.n_layers=1", "size.init=lra_released",
                          "size.head=lra_released", "size.attention_dropout=0.1", *extra])
    spec = TaskSpec(kind="classify", vocab_size=20, n_outputs=3, seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg, type("Task", (), {"spec": spec})())
    model.train()
    model({"tokens": torch.randint(1, 20, (2, 64))}).sum().backward()
    for name_, linear in model.blocks[0].mixer.named_children():
        if name_ in getattr(model.blocks[0].mixer, "released_projections", {}):
            assert linear.bias is None


@pytest.mark.parametrize("causal,positional", [(False, "none"), (True, "alibi")])
def test_explicit_attention_equals_sdpa_and_holds_the_weights(causal, positional):
    """implementation=explicit (LRA's flax dot_product_attention: the (B, H, L, L) weights held)
    gives SDPA's values and gradients, with padding, causality and a score bias."""
    from tests.test_sparse import LargestTensor

    torch.manual_seed(0)
    fused = MultiHeadAttention(32, causal=causal, n_heads=4, positional=positional).double()
    explicit = MultiHeadAttention(32, causal=causal, n_heads=4, positional=positional,
                                  implementation="explicit").double()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 48, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[1, 40:] = False
    keep = mask[..., None]  # pad queries' outputs are never read
    ys = [m(x, mask) * keep for m in (fused, explicit)]
    torch.testing.assert_close(ys[1], ys[0])
    grads = [torch.autograd.grad(y.square().sum(), x)[0] for y in ys]
    torch.testing.assert_close(grads[1], grads[0])
    with LargestTensor() as probe:
        explicit(x.detach(), mask)
    assert probe.numel >= 2 * 4 * 48 * 48  # the weights are materialised
    with pytest.raises(ValueError, match="model.mixer.implementation"):
        MultiHeadAttention(32, causal=False, n_heads=4, implementation="flash")
    lra = compose_config(["experiment=lra_table1", "model=transformer", "task=text"]).model.mixer
    assert lra.implementation == "explicit"
    assert compose_config(["model=transformer", "task=mqar"]).model.mixer.implementation == "sdpa"


def test_attention_dropout_comes_from_size():
    cfg = compose_config(["model=transformer", "task=mqar", "size.attention_dropout=0.1"])
    assert cfg.model.mixer.dropout == 0.1
    mha = MultiHeadAttention(16, causal=False, n_heads=2, dropout=0.5).train()
    x = torch.randn(1, 8, 16)
    assert not torch.allclose(mha(x), mha(x))  # weights dropped in training
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))


@pytest.mark.parametrize("make", ["mha", "local"])
def test_qkv_dim_narrower_than_d_model_equals_the_dense_reference(make):
    torch.manual_seed(0)
    if make == "mha":
        mixer, allowed = MultiHeadAttention(32, causal=False, n_heads=4, qkv_dim=16), None
    else:
        mixer = LocalAttention(32, causal=False, n_heads=4, window=5, qkv_dim=16)
        allowed = sliding_window_mask(12, 5, False)
    assert mixer.qkv.weight.shape == (48, 32) and mixer.out.weight.shape == (32, 16)
    x = torch.randn(2, 12, 32, requires_grad=True)
    y = mixer(x)
    q, k, v = mixer.project(x)
    assert q.shape == (2, 4, 12, 4)  # head size qkv_dim / n_heads
    ref = mixer.merge(dense_attention(q, k, v, allowed))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g, g_ref = (torch.autograd.grad(t.square().sum(), x)[0] for t in (y, ref))
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="qkv_dim"):
        MultiHeadAttention(32, causal=False, n_heads=4, qkv_dim=18)


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:  # (B, L, W) -> (B, H, L, W / H)
    return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


@pytest.mark.parametrize("kind", ["linear_transformer", "performer_relu", "linformer", "synthesizer"])
def test_the_kernelised_mixers_attend_at_qkv_dim_as_the_release(kind):
    """qkv_dim 16 of width 32 (LRA's image and pathfinder configs: half the width): the heads split
    the 16, and each mixer equals its attention written out densely on those heads."""
    torch.manual_seed(0)
    H, L = 4, 12
    make = {"linear_transformer": lambda: LinearAttention(32, causal=False, n_heads=H, qkv_dim=16),
            "performer_relu": lambda: PerformerAttention(32, causal=False, n_heads=H, kernel="relu", qkv_dim=16),
            "linformer": lambda: LinformerAttention(32, causal=False, n_heads=H, seq_len=L, k=5, qkv_dim=16),
            "synthesizer": lambda: SynthesizerAttention(32, causal=False, n_heads=H, mode="random", max_len=L,
                                                        dot_product=True, qkv_dim=16)}
    mixer = make[kind]().double()
    assert mixer.out.weight.shape == (32, 16)
    x = torch.randn(2, L, 32, dtype=torch.float64, requires_grad=True)
    if kind == "synthesizer":
        q, k = (heads(t, H) for t in mixer.qk(x).chunk(2, -1))
        v = heads(mixer.v(x), H)
        scores = mixer.random[None, :, :L, :L] + q @ k.transpose(-2, -1) / math.sqrt(4)  # head size 16 / 4
        ref = torch.softmax(scores, -1) @ v
    else:
        q, k, v = (heads(t, H) for t in mixer.qkv(x).chunk(3, -1))  # (B, H, L, 4)
        if kind == "linformer":
            E = mixer.columns(mixer.proj_k, L)
            ref = dense_attention(q, E @ k, mixer.columns(mixer.proj_v, L) @ v)
        else:
            phi = (lambda t: torch.nn.functional.elu(t) + 1) if kind == "linear_transformer" \
                else (lambda t: torch.relu(t) + 1e-3)
            weights = phi(q) @ phi(k).transpose(-2, -1)  # (B, H, L, L)
            ref = (weights / (weights.sum(-1, keepdim=True) + mixer.eps(torch.float64))) @ v
    ref = mixer.out(ref.transpose(1, 2).reshape(2, L, 16))
    y = mixer(x)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(*(torch.autograd.grad(t.square().sum(), x)[0] for t in (y, ref)), rtol=1e-9, atol=1e-9)
    own = {"linformer": {"seq_len": L}, "synthesizer": {"mode": "random", "max_len": L}}.get(kind, {})
    with pytest.raises(ValueError, match="model.mixer.qkv_dim"):
        type(mixer)(32, causal=False, n_heads=H, qkv_dim=18, **own)  # 18 heads of 4.5


def test_the_new_keys_keep_old_hashes_and_count_when_set():
    cfg = compose_config(["model=transformer", "task=mqar"])
    before = config_hash(result_config(cfg))
    older = OmegaConf.create(OmegaConf.to_container(cfg))  # a config of before these keys
    del older.model.init, older.model.head, older.model.ffn_activation, older.model.mixer.qkv_dim
    assert config_hash(result_config(older)) == before
    for override in ("size.init=lra_released", "size.head=lra_released", "size.qkv_dim=32",
                     "size.ffn_activation=gelu_tanh", "size.attention_dropout=0.1"):
        assert config_hash(result_config(compose_config(["model=transformer", "task=mqar", override]))) != before


def test_lra_table1_uses_the_released_details():
    image = compose_config(["experiment=lra_table1", "model=transformer", "task=image"])
    m = image.model
    assert (m.init, m.head, m.positional, m.mixer.qkv_dim, m.mixer.dropout) == \
        ("lra_released", "lra_released", "learned", 64, 0.2)  # base_cifar10_config, transformer_base
    assert image.trainer.schedule == "cosine"  # constant * linear_warmup * cosine_decay
    listops = compose_config(["experiment=lra_table1", "model=transformer", "task=listops"])
    assert (listops.model.mixer.dropout, listops.model.mixer.qkv_dim, listops.trainer.schedule) == (0.1, None, "rsqrt")
    bird = compose_config(["experiment=lra_table1", "model=bigbird", "task=text"]).model.mixer
    assert (bird.pattern, bird.block_size, bird.dropout) == ("lra_released", 64, 0.0)
    local = compose_config(["experiment=lra_table1", "model=block_local", "task=pathfinder"]).model.mixer
    assert (local.grouping, local.block_size) == ("lra_released", 64)
    # the released dual encoders prepend no CLS token and pool the first document token
    retrieval = compose_config(["experiment=lra_table1", "model=transformer", "task=retrieval"]).model
    assert (retrieval.pooling, retrieval.head) == ("cls", "lra_released")
    sink = compose_config(["experiment=lra_table1", "model=sinkhorn", "task=listops"]).model
    assert (sink.mixer.variant, sink.mixer.block_size, sink.mixer.max_blocks, sink.pooling, sink.head) == \
        ("lra_released", 50, 25, "mean_all", "lra_dense")
    sparse = compose_config(["experiment=lra_table1", "model=sparse_transformer", "task=text"]).model.mixer
    assert (sparse.pattern, sparse.stride, sparse.c) == ("lra_released", 50, 10)
    reformer = compose_config(["experiment=lra_table1", "model=reformer", "task=image"]).model
    assert (reformer.mixer.variant, reformer.d_model, reformer.n_layers) == ("lra_released", 64, 4)


def test_the_released_sinkhorn_read_out_is_the_mean_over_every_position_and_one_dense():
    torch.manual_seed(0)

    def mixer(d_model, **kw):
        return MultiHeadAttention(d_model, n_heads=2, **kw)
    model = SequenceModel(spec=CLASSIFY, mixer=mixer, d_model=16, n_layers=1, d_ff=32, pooling="mean_all",
                          head="lra_dense", init="lra_released")
    assert [type(m) for m in model.head.modules()] == [type(model.head), torch.nn.Linear]
    tokens = torch.randint(1, 50, (2, 24))
    tokens[1, 20:] = 0  # right padding: part of the mean, as jnp.mean(encoded, axis=1)
    h = model.encode(tokens, tokens != 0)  # (B, L, D), normed
    torch.testing.assert_close(model({"tokens": tokens}), model.head.logits(h.mean(1)))
    assert torch.equal(model.head.logits.bias, torch.zeros(5))  # flax Dense: zero bias, lecun kernel
    with pytest.raises(ValueError, match="model.head=lra_dense.*classify"):
        SequenceModel(spec=PAIR, mixer=mixer, d_model=16, n_layers=1, d_ff=32, head="lra_dense")


def test_lra_speed_runs_the_lra_table1_models():
    mixers = {m: compose_config(["experiment=lra_speed", f"model={m}", "task.seq_len=2048"], config_name="bench")
              .model.mixer for m in ("block_local", "longformer", "performer", "linformer", "reformer")}
    assert mixers["block_local"].grouping == "lra_released"
    assert (mixers["longformer"].window, mixers["longformer"].n_global) == (512, 0)
    assert mixers["performer"].kernel == "relu"
    assert (mixers["linformer"].k, mixers["linformer"].share_kv) == (16, True)
    assert (mixers["reformer"].variant, mixers["reformer"].chunk_len) == ("lra_released", None)
    t = compose_config(["experiment=lra_speed", "model=transformer"], config_name="bench")
    assert (t.model.init, t.model.head, t.model.mixer.dropout, t.model.d_model, t.task.name) == \
        ("lra_released", "lra_released", 0.1, 256, "text")


def test_ffn_activation_gelu_tanh_is_flax_gelu():
    from architectures.layers import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(8, d_ff=16, activation="gelu_tanh")
    x = torch.randn(4, 8) * 3
    h = ffn.up(x)
    flax_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # jax.nn.gelu
    torch.testing.assert_close(ffn(x), ffn.down(flax_gelu))
    exact = FeedForward(8, d_ff=16)
    exact.load_state_dict(ffn.state_dict())
    assert not torch.allclose(exact(x), ffn(x))
    cfg = compose_config(["experiment=lra_table1", "model=transformer", "task=text"])
    assert cfg.model.ffn_activation == "gelu_tanh"
    with pytest.raises(ValueError, match="model.ffn_activation"):
        FeedForward(8, d_ff=16, activation="swish")


def test_released_init_draws_the_synthesizers_logits_as_flax_xavier():
    from architectures.synthesizer import SynthesizerAttention

    def mixer(d_model, **kw):
        return SynthesizerAttention(d_model, n_heads=4, mode="random", max_len=kw.pop("max_len", 64),
                                    dot_product=True, **kw)
    torch.manual_seed(0)
    spec = TaskSpec(kind="classify", vocab_size=50, n_outputs=5, seq_len=64)
    model = SequenceModel(spec=spec, mixer=mixer, d_model=32, n_layers=1, d_ff=64, pooling="mean",
                          init="lra_released")
    random = model.blocks[0].mixer.random  # (heads, max_len, max_len)
    bound = math.sqrt(6 / (2 * 64 * 4))  # flax fans: max_len x heads each way
    assert 0.95 * bound < random.abs().max() <= bound  # ours by default: N(0, 1 / max_len), far wider


@pytest.mark.parametrize("kernel", ["linear", "relu", "softmax"])
def test_mask_padding_false_lets_padding_keys_in_as_the_release(kernel):
    from architectures.linear import LinearAttention
    from architectures.performer import PerformerAttention

    def make(mask_padding):
        torch.manual_seed(0)
        if kernel == "linear":
            return LinearAttention(16, causal=False, n_heads=2, mask_padding=mask_padding)
        return PerformerAttention(16, causal=False, n_heads=2, kernel=kernel, n_features=64, redraw_every=0,
                                  mask_padding=mask_padding)
    released, ours = make(False), make(True)
    x = torch.randn(2, 10, 16)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, 6:] = False
    torch.testing.assert_close(released(x, real), ours(x, None))  # as if nothing were padded
    assert not torch.allclose(released(x, real)[1, :6], ours(x, real)[1, :6])
    torch.testing.assert_close(released(x, real)[0], ours(x, real)[0])  # an unpadded row: the same
    cfg = compose_config(["experiment=lra_table1", "model=performer", "task=text"])
    assert cfg.model.mixer.mask_padding is False


def test_linformer_as_released_sees_the_cls_token_no_padding_mask_and_gain_one():
    cfg = compose_config(["experiment=lra_table1", "model=linformer", "task=listops", "size.d_model=32",
                          "size.n_layers=1", "task.seq_len=64"])
    spec = TaskSpec(kind="classify", vocab_size=20, n_outputs=10, seq_len=64)
    torch.manual_seed(0)
    model = build_model(cfg, type("Task", (), {"spec": spec})())
    mixer = model.blocks[0].mixer
    assert mixer.seq_len == 65 and not mixer.mask_padding  # 64 tokens + the CLS token
    E = torch.cat(list(mixer.proj_k), 1)  # (16, 65)
    bound = math.sqrt(6 / (16 + 65))  # xavier_uniform, gain 1
    assert 0.95 * bound < E.abs().max() <= bound
    tokens = torch.randint(1, 20, (2, 64))
    tokens[1, 40:] = 0
    assert model({"tokens": tokens}).shape == (2, 10)
