"""Sparse attention (`local`, `longformer`, `bigbird`) against dense attention with the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from architectures.attention import MultiHeadAttention, dense_attention
from architectures.backbone import SequenceModel
from architectures.sparse import (
    BigBirdAttention,
    LocalAttention,
    LongformerAttention,
    bigbird_attention,
    bigbird_mask,
    bigbird_random_blocks,
    longformer_mask,
    sliding_window_attention,
    sliding_window_mask,
)
from tasks.base import TaskSpec

B, H, HD, D = 3, 2, 4, 8


def qkv(L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, B, H, L, HD, generator=g).unbind(0)


def right_padding(L: int, seed: int = 0) -> torch.Tensor:
    """(B, L) True at real tokens: example 0 full, the others random lengths >= 1."""
    lengths = torch.randint(1, L + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = L
    return torch.arange(L) < lengths[:, None]


def keys_ok(key_real: torch.Tensor) -> torch.Tensor:
    return key_real[:, None, None, :]  # (B, 1, 1, L)


def assert_same_values_and_gradients(y: torch.Tensor, ref: torch.Tensor, inputs) -> None:
    """y equals ref, and so do their gradients with respect to ``inputs`` under one random cotangent."""
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs)):
        torch.testing.assert_close(a, b)


def example_random_blocks(key_real, L, *, block_size, causal, **pattern) -> torch.Tensor:
    """Each example's random table drawn for its real blocks, as BigBirdAttention does."""
    nb = -(-L // block_size)
    tables = []
    for n in (-(-key_real.sum(1) // block_size)).tolist():
        table = bigbird_random_blocks(n, causal=causal, generator=torch.Generator().manual_seed(7), **pattern)
        tables.append(F.pad(table, (0, 0, 0, nb - n), value=-1))
    return torch.stack(tables)


# ------------------------------------------------------------------ attention cores vs dense


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L", [1, 7, 33, 64, 100])
@pytest.mark.parametrize("window", [1, 4, 17, 40])
def test_sliding_window_equals_dense(causal, L, window):
    q, k, v = qkv(L)
    key_real = right_padding(L)
    y = sliding_window_attention(q, k, v, window=window, causal=causal, key_real=key_real)
    allowed = sliding_window_mask(L, window, causal)[None, None] & keys_ok(key_real)
    torch.testing.assert_close(y, dense_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L,window,n_global", [(1, 4, 1), (5, 2, 3), (37, 8, 1), (64, 17, 3), (90, 1, 2)])
def test_longformer_equals_dense(causal, L, window, n_global):
    q, k, v = qkv(L, seed=1)
    key_real = right_padding(L, seed=1)
    y = sliding_window_attention(q, k, v, window=window, causal=causal, key_real=key_real, n_global=n_global)
    allowed = longformer_mask(L, window, n_global, causal)[None, None] & keys_ok(key_real)
    torch.testing.assert_close(y, dense_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L", [5, 16, 50, 131])
@pytest.mark.parametrize("block_size,n_window_blocks,n_global_blocks,n_random_blocks",
                         [(4, 3, 2, 3), (8, 1, 0, 2), (16, 5, 1, 0), (4, 3, 0, 1)])
def test_bigbird_equals_dense(causal, L, block_size, n_window_blocks, n_global_blocks, n_random_blocks):
    q, k, v = qkv(L, seed=2)
    key_real = right_padding(L, seed=2)
    pattern = dict(n_window_blocks=n_window_blocks, n_global_blocks=n_global_blocks)
    random_blocks = example_random_blocks(key_real, L, block_size=block_size, causal=causal,
                                          n_random_blocks=n_random_blocks, **pattern)
    y = bigbird_attention(q, k, v, block_size=block_size, random_blocks=random_blocks, causal=causal,
                          key_real=key_real, **pattern)
    mask = bigbird_mask(L, block_size=block_size, random_blocks=random_blocks, causal=causal, **pattern)
    torch.testing.assert_close(y, dense_attention(q, k, v, mask[:, None] & keys_ok(key_real)), atol=1e-5, rtol=1e-5)


def test_bigbird_random_blocks_follow_the_pattern():
    for causal in (True, False):
        table = bigbird_random_blocks(20, n_window_blocks=3, n_global_blocks=2, n_random_blocks=3, causal=causal,
                                      generator=torch.Generator().manual_seed(0))
        assert (table[:2] == -1).all()  # global query blocks see everything already
        for q, row in enumerate(table[2:].tolist(), start=2):
            picked = [k for k in row if k >= 0]
            assert len(set(picked)) == len(picked)
            assert all(k >= 2 and abs(k - q) > 1 and (k < q or not causal) for k in picked)
            assert len(picked) == min(3, len([k for k in range(2, q if causal else 20) if abs(k - q) > 1]))


# ----------------------------------------------------------------------------- the mixers


def make(name: str, causal: bool, layer_idx: int = 0, window: int = 6, d_model: int = D, block_size: int = 4):
    common = dict(causal=causal, layer_idx=layer_idx, n_heads=H)
    if name == "local":
        return LocalAttention(d_model, window=window, **common)
    if name == "longformer":
        return LongformerAttention(d_model, window=window, n_global=2, **common)
    return BigBirdAttention(d_model, block_size=block_size, n_window_blocks=3, n_global_blocks=1, n_random_blocks=2,
                            seed=3, **common)


def dense_mask(mixer, L: int, mask: torch.Tensor) -> torch.Tensor:
    if isinstance(mixer, BigBirdAttention):
        random_blocks = mixer.random_blocks(mask, mask.shape[0], L)
        allowed = bigbird_mask(L, block_size=4, n_window_blocks=3, n_global_blocks=1, random_blocks=random_blocks,
                               causal=mixer.causal)[:, None]
    else:
        allowed = longformer_mask(L, mixer.window, mixer.n_global, mixer.causal)[None, None]
    return allowed & keys_ok(mask)


@pytest.mark.parametrize("name", ["local", "longformer", "bigbird"])
@pytest.mark.parametrize("causal", [True, False])
def test_mixer_equals_dense_reference_and_has_finite_grads(name, causal):
    torch.manual_seed(0)
    L = 23
    mixer = make(name, causal)
    x = torch.randn(B, L, D, requires_grad=True)
    mask = right_padding(L, seed=4)
    y = mixer(x, mask)
    q, k, v = mixer.project(x)
    ref = mixer.merge(dense_attention(q, k, v, dense_mask(mixer, L, mask)))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()  # pad queries included: no NaN anywhere
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in mixer.parameters())


@pytest.mark.parametrize("causal", [True, False])
def test_local_with_window_covering_the_sequence_is_full_attention(causal):
    torch.manual_seed(0)
    L = 19
    full = MultiHeadAttention(D, causal=causal, n_heads=H)
    local = LocalAttention(D, causal=causal, n_heads=H, window=L if causal else 2 * L)
    local.load_state_dict(full.state_dict())
    x = torch.randn(B, L, D)
    mask = right_padding(L, seed=5)
    torch.testing.assert_close(local(x, None), full(x, None), atol=1e-5, rtol=1e-5)
    real = mask[..., None]  # MultiHeadAttention lets pad queries see themselves: compare real ones
    torch.testing.assert_close(local(x, mask) * real, full(x, mask) * real, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,window", [(True, 5), (False, 5), (False, 6)])
def test_local_receptive_field_of_a_stack(causal, window):
    """Changing token t moves exactly the outputs within n_layers windows of t (an even window
    reaches window // 2 after a query and one less before it, so t reaches further back)."""
    n_layers, L, t = 3, 60, 30
    kind = "lm" if causal else "classify"
    spec = TaskSpec(kind=kind, vocab_size=11, n_outputs=11, seq_len=L)
    torch.manual_seed(0)
    mixer = lambda d, **kw: LocalAttention(d, n_heads=H, window=window, **kw)  # noqa: E731
    model = SequenceModel(spec=spec, mixer=mixer, d_model=D, n_layers=n_layers, d_ff=16).eval()
    tokens = torch.randint(1, 11, (1, L))
    changed = tokens.clone()
    changed[0, t] = tokens[0, t] % 10 + 1
    moved = (model.encode(tokens, None) - model.encode(changed, None)).abs().amax(-1)[0] > 1e-6  # (L,)
    pos = torch.arange(L)
    if causal:
        expected = (pos >= t) & (pos <= t + n_layers * (window - 1))
    else:  # query p reads keys p - (window - window // 2 - 1) .. p + window // 2
        expected = (pos >= t - n_layers * (window // 2)) & (pos <= t + n_layers * (window - window // 2 - 1))
    assert torch.equal(moved, expected), moved.nonzero().flatten().tolist()


@pytest.mark.parametrize("window", [4, 5, 512])
def test_a_window_has_window_keys_as_lras_longformer_builds_it(window):
    """Bidirectional: window // 2 keys after the query, the rest before it and itself (LRA's
    _build_sliding_window_mask: right_size = window // 2, left_size = window - right_size)."""
    L = 2 * window + 3
    allowed = sliding_window_mask(L, window, causal=False)
    i = L // 2
    keys = allowed[i].nonzero().flatten() - i
    right = window // 2
    assert keys.tolist() == list(range(-(window - right - 1), right + 1)) and len(keys) == window


@pytest.mark.parametrize("name", ["local", "longformer", "bigbird"])
def test_causal_mixers_do_not_look_ahead(name):
    torch.manual_seed(0)
    L, t = 29, 17
    mixer = make(name, causal=True)
    x = torch.randn(B, L, D)
    x2 = x.clone()
    x2[:, t:] = torch.randn(B, L - t, D)
    torch.testing.assert_close(mixer(x, None)[:, :t], mixer(x2, None)[:, :t], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["local", "longformer", "bigbird"])
@pytest.mark.parametrize("causal", [True, False])
def test_extra_padding_does_not_change_real_tokens(name, causal):
    """Batching a sequence with longer ones (more right padding) leaves its outputs alone."""
    torch.manual_seed(0)
    mixer = make(name, causal)
    x = torch.randn(1, 21, D)
    padded = torch.cat([x, torch.randn(1, 30, D)], 1)
    mask = torch.arange(51)[None] < 21
    torch.testing.assert_close(mixer(padded, mask)[:, :21], mixer(x, None), atol=1e-5, rtol=1e-5)


def test_bigbird_pattern_is_fixed_by_seed_and_layer():
    a, b = make("bigbird", False, layer_idx=0), make("bigbird", False, layer_idx=0)
    c = make("bigbird", False, layer_idx=1)
    assert torch.equal(a.random_table(30), b.random_table(30))
    assert not torch.equal(a.random_table(30), c.random_table(30))


def test_bad_hyperparameters_name_the_config_key():
    with pytest.raises(ValueError, match="model.mixer.window"):
        LocalAttention(D, causal=True, n_heads=H, window=0)
    with pytest.raises(ValueError, match="model.mixer.n_window_blocks"):
        BigBirdAttention(D, causal=True, n_heads=H, block_size=4, n_window_blocks=2, n_global_blocks=1,
                         n_random_blocks=1, seed=0)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


@pytest.mark.parametrize("name", ["local", "longformer", "bigbird"])
def test_cost_is_not_quadratic(name):
    """Forward and backward at L = 2048 never build anything near an L x L tensor."""
    L = 2048
    mixer = make(name, causal=name != "local", window=32)
    x = torch.randn(1, L, D, requires_grad=True)
    with LargestTensor() as probe:
        mixer(x, torch.ones(1, L, dtype=torch.bool)).sum().backward()
    assert probe.numel < L * L // 8, probe.numel


@pytest.mark.parametrize("name", ["local", "longformer", "bigbird"])
def test_model_builds_through_the_api(name, tmp_path):
    from harness.api import build

    size = "model.mixer.block_size=8" if name == "bigbird" else "model.mixer.window=8"
    built = build([f"model={name}", "task=mqar", "task.n_train=4", "task.n_val=2", "task.n_test=2",
                   "task.seq_len=64", f"task.cache_dir={tmp_path}", "model.d_model=16", size])
    batch = {k: v.long() for k, v in built.task.dataset("train")[[0, 1]].items()}
    assert built.model(batch).shape == (2, 64, built.task.spec.n_outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("name", ["local", "longformer", "bigbird"])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_attention_matches_portable_path(name, causal):
    torch.manual_seed(0)
    L = 300
    mixer = make(name, causal, window=64, d_model=16 * H, block_size=32).cuda()  # FlexAttention: head size >= 16
    x = torch.randn(B, L, 16 * H, device="cuda")
    mask = right_padding(L, seed=6).cuda()
    fast = mixer(x, mask)
    q, k, v = mixer.project(x)
    portable = mixer.merge(mixer.attend(q, k, v, mask, 0.0))
    real = mask[..., None]
    torch.testing.assert_close(fast * real, portable * real, atol=2e-4, rtol=2e-4)
