"""Linear attention mixers: linear_transformer, performer, linformer.

Every efficient form is checked against :func:`quadratic_linear_attention` (or dense softmax
attention for Performer's estimate) with the same features.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from architectures import linear
from architectures.attention import dense_attention
from architectures.backbone import SequenceModel
from architectures.layers import UnsupportedTask
from architectures.linear import (
    LinearAttention,
    LinformerAttention,
    chunked_causal_linear_attention,
    elu_feature_map,
    global_linear_attention,
    quadratic_linear_attention,
)
from architectures.performer import PerformerAttention
from tasks.base import TaskSpec

D, H = 16, 2


def random_qkv(B=2, L=37, hd=8, F=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, hd, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, L, hd, generator=g, dtype=torch.float64)
    return q, k, v


def padding_mask(lengths, L):
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)


def reference_forward(mixer: LinearAttention, x, mask=None):
    """The mixer's forward with the quadratic reference in place of the linear-cost forms."""
    B, L, Dm = x.shape
    q, k, v = mixer.qkv(x).view(B, L, 3, mixer.n_heads, Dm // mixer.n_heads).permute(2, 0, 3, 1, 4)
    phi_q, phi_k = mixer.feature_maps(q, k, mask)
    y = quadratic_linear_attention(phi_q, phi_k, v, mixer.causal, mask, eps=mixer.eps(x.dtype))
    return mixer.out(y.transpose(1, 2).reshape(B, L, Dm))


def make_mixer(name, causal, **kw):
    torch.manual_seed(0)
    if name == "linear_transformer":
        m = LinearAttention(D, causal=causal, n_heads=H, **kw)
    elif name == "performer_relu":
        m = PerformerAttention(D, causal=causal, n_heads=H, kernel="relu", **kw)
    else:
        m = PerformerAttention(D, causal=causal, n_heads=H, n_features=32, **kw)
    return m.double().eval()


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 64])
def test_chunked_causal_equals_quadratic(chunk_size):
    q, k, v = random_qkv(L=37)
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    want = quadratic_linear_attention(phi_q, phi_k, v, causal=True)
    got = chunked_causal_linear_attention(phi_q, phi_k, v, chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_global_with_padding_equals_quadratic_with_masked_keys():
    q, k, v = random_qkv(L=20)
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    mask = padding_mask([20, 13], 20)
    want = quadratic_linear_attention(phi_q, phi_k, v, causal=False, mask=mask)
    torch.testing.assert_close(global_linear_attention(phi_q, phi_k, v, mask), want, rtol=1e-10, atol=1e-10)
    # and the masked keys really are excluded: the second sequence cut to 13 tokens agrees
    short = quadratic_linear_attention(phi_q[1:, :, :13], phi_k[1:, :, :13], v[1:, :, :13], causal=False)
    torch.testing.assert_close(want[1:, :, :13], short, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear_transformer", "performer", "performer_relu"])
@pytest.mark.parametrize("chunk_size", [4, 7, 64])
def test_causal_mixer_equals_quadratic(name, chunk_size):
    mixer = make_mixer(name, causal=True, chunk_size=chunk_size)
    x = torch.randn(2, 30, D, dtype=torch.float64)
    torch.testing.assert_close(mixer(x), reference_forward(mixer, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["linear_transformer", "performer", "performer_relu"])
def test_bidirectional_mixer_with_padding(name):
    mixer = make_mixer(name, causal=False)
    x = torch.randn(2, 24, D, dtype=torch.float64)
    mask = padding_mask([24, 15], 24)
    y = mixer(x, mask)
    torch.testing.assert_close(y, reference_forward(mixer, x, mask), rtol=1e-9, atol=1e-9)
    # pad content and pad count do not change real positions
    x2 = x.clone()
    x2[1, 15:] = 100.0
    torch.testing.assert_close(mixer(x2, mask)[1, :15], y[1, :15], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mixer(x[1:, :15])[0], y[1, :15], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["linear_transformer", "performer", "performer_relu"])
def test_causality(name):
    mixer = make_mixer(name, causal=True, chunk_size=8)
    x = torch.randn(1, 40, D, dtype=torch.float64)
    y = mixer(x)
    for t in (0, 7, 8, 21, 39):
        x2 = x.clone()
        x2[:, t:] += 10 * torch.randn_like(x2[:, t:])
        y2 = mixer(x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(y2[:, t], y[:, t])


@pytest.mark.parametrize("name", ["linear_transformer", "performer", "performer_relu"])
def test_step_equals_forward(name):
    mixer = make_mixer(name, causal=True, chunk_size=8)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    want = mixer(x)
    state, outs = None, []
    for t in range(x.shape[1]):
        y_t, state = mixer.step(x[:, t], state)
        outs.append(y_t)
    torch.testing.assert_close(torch.stack(outs, 1), want, rtol=1e-9, atol=1e-9)


def test_linformer_rejects_causal():
    with pytest.raises(UnsupportedTask, match="bidirectional"):
        LinformerAttention(D, causal=True, n_heads=H, seq_len=16, k=4)


def test_linformer_padding_and_length_invariance():
    torch.manual_seed(0)
    mixer = LinformerAttention(D, causal=False, n_heads=H, seq_len=32, k=8).double().eval()
    x = torch.randn(2, 20, D, dtype=torch.float64)
    mask = padding_mask([20, 11], 20)
    y = mixer(x, mask)
    x2 = x.clone()
    x2[1, 11:] = -50.0
    torch.testing.assert_close(mixer(x2, mask)[1, :11], y[1, :11], rtol=1e-10, atol=1e-10)
    # the same sequence, unpadded or padded further, gives the same real outputs
    torch.testing.assert_close(mixer(x[1:, :11])[0], y[1, :11], rtol=1e-10, atol=1e-10)
    longer = torch.cat([x[1:, :11], torch.randn(1, 21, D, dtype=torch.float64)], 1)
    torch.testing.assert_close(mixer(longer, padding_mask([11], 32))[0, :11], y[1, :11], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="model.mixer.seq_len=32"):
        mixer(torch.randn(1, 33, D, dtype=torch.float64))


def test_linformer_projects_with_the_first_columns_and_shares_one_matrix_when_asked():
    torch.manual_seed(0)
    for share in (False, True):
        mixer = LinformerAttention(D, causal=False, n_heads=H, seq_len=40, k=4, share_kv=share, block=16).double()
        E = torch.cat(list(mixer.proj_k), 1)  # (k, seq_len) whole
        assert E.shape == (4, 40) and [p.shape[1] for p in mixer.proj_k] == [16, 16, 8]
        Fm = E if share else torch.cat(list(mixer.proj_v), 1)
        assert (mixer.proj_v is None) == share
        x = torch.randn(2, 21, D, dtype=torch.float64)
        q, k, v = mixer.qkv(x).view(2, 21, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        y = dense_attention(q, E[:, :21] @ k, Fm[:, :21] @ v)
        torch.testing.assert_close(mixer(x), mixer.out(y.transpose(1, 2).reshape(2, 21, D)), rtol=1e-12, atol=1e-12)
    n_proj = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("proj"))  # noqa: E731
    assert n_proj(LinformerAttention(D, causal=False, n_heads=H, seq_len=40, k=4, share_kv=True)) == 4 * 40


def test_linformer_built_long_pays_only_for_the_length_it_runs_at():
    """Built for 1024 positions and run at 40, only the blocks that hold columns 0..39 get a
    gradient; AdamW keeps no state for the others and neither moves nor decays them."""
    grads = {}
    for seq_len in (48, 1024):
        torch.manual_seed(0)
        mixer = LinformerAttention(D, causal=False, n_heads=H, seq_len=seq_len, k=4, block=16)
        before = [p.detach().clone() for p in mixer.proj_k]
        opt = torch.optim.AdamW(mixer.parameters(), lr=0.1, weight_decay=0.5)
        mixer(torch.randn(2, 40, D)).square().sum().backward()
        grads[seq_len] = sum(p.grad.numel() for p in mixer.parameters() if p.grad is not None)
        opt.step()
        used = [p.grad is not None for p in mixer.proj_k]
        assert used == [True] * 3 + [False] * (len(used) - 3)
        for p, b, u in zip(mixer.proj_k, before, used):
            assert (p in opt.state) == u and torch.equal(p, b) != u
    assert grads[48] == grads[1024]


def test_linformer_classify_model_is_padding_invariant():
    spec = TaskSpec(kind="classify", vocab_size=12, n_outputs=3, seq_len=24)
    torch.manual_seed(0)
    model = SequenceModel(
        spec=spec, mixer=partial(LinformerAttention, n_heads=H, seq_len=spec.seq_len, k=8),
        d_model=D, n_layers=2, d_ff=32,
    ).double().eval()
    tokens = torch.randint(1, 12, (1, 24))
    tokens[0, 17:] = spec.pad_id
    shorter = tokens[:, :17]
    torch.testing.assert_close(model({"tokens": tokens}), model({"tokens": shorter}), rtol=1e-10, atol=1e-10)


def build_mqar(name, tmp_path):
    from harness.api import build  # hydra is not needed by the rest of this file

    return build([f"model={name}", "task=mqar", "task.n_train=8", "task.n_val=4", "task.n_test=4",
                  f"task.cache_dir={tmp_path}"])


@pytest.mark.parametrize("name", ["linear_transformer", "performer"])
def test_builds_for_mqar(name, tmp_path):
    built = build_mqar(name, tmp_path)
    batch = {k: v.long() for k, v in built.task.dataset("train")[[0, 1]].items()}
    logits = built.model(batch)
    assert logits.shape == (2, built.task.spec.seq_len, built.task.spec.n_outputs)
    assert torch.isfinite(logits).all()
    assert all(b.mixer.causal for b in built.model.blocks)


def test_linformer_unsupported_for_mqar(tmp_path):
    with pytest.raises(UnsupportedTask, match="not\\s+lm"):
        build_mqar("linformer", tmp_path)


def test_linformer_seq_len_follows_the_task():
    from harness.api import compose_config

    cfg = compose_config(["model=linformer", "task=mqar", "task.seq_len=512"])
    assert cfg.model.mixer.seq_len == 512


@pytest.mark.skipif(
    not torch.cuda.is_available() or linear.chunk_linear_attn is None,
    reason="needs CUDA and flash-linear-attention",
)
@pytest.mark.parametrize("name", ["linear_transformer", "performer"])
def test_fla_kernel_matches_portable_path(name):
    q, k, v = (t.float().cuda() for t in random_qkv(B=2, L=200, hd=D // H))
    mixer = make_mixer(name, causal=True).float().cuda()
    phi_q, phi_k = mixer.feature_maps(q, k)
    eps = mixer.eps(q.dtype)
    want = chunked_causal_linear_attention(phi_q, phi_k, v, 64, eps)
    got = linear.fla_causal_linear_attention(phi_q, phi_k, v, eps)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    # and through the module, with gradients
    x = torch.randn(2, 200, D, device="cuda", requires_grad=True)
    y_fast = mixer(x)
    y_fast.square().sum().backward()
    g_fast, x.grad = x.grad.clone(), None
    saved, linear.chunk_linear_attn = linear.chunk_linear_attn, None
    try:
        y_ref = mixer(x)
        y_ref.square().sum().backward()
    finally:
        linear.chunk_linear_attn = saved
    torch.testing.assert_close(y_fast, y_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(g_fast, x.grad, rtol=5e-3, atol=5e-3)
