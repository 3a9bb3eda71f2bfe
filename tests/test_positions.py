"""Positions inside attention (`model.positional=rope|xpos|alibi|t5`) against explicit references:
slopes and buckets as the papers give them, the mixers' scores against a dense attention with an
explicitly built (L, L) bias or rotation, the sparse mixers against dense attention with the same
mask and bias (values and gradients), and the refusal by mixers that have no scores."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from architectures.attention import MultiHeadAttention, dense_attention
from architectures.layers import AlibiBias, T5RelativeBias, XPos, alibi_slopes, t5_relative_bucket
from architectures.sparse import BigBirdAttention, LocalAttention, LongformerAttention
from architectures.sparse_transformer import SparseTransformerAttention, sparse_transformer_mask
from harness.config import instantiate_without_name
from tests.test_contract import SPECS, composed, tiny_model

B, H, D = 2, 2, 16


def test_alibi_slopes_follow_the_paper():
    # powers of 2: the geometric sequence from 2^(-8/n); otherwise the closest power of 2 plus
    # every other slope of the next one (Press et al. 2022; the official get_slopes)
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0 ** -i for i in (2, 4, 6, 8)]))
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0 ** -i for i in (2, 4, 6, 8, 1, 3)]))
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(
        [2.0 ** -i for i in range(1, 9)] + [2.0 ** -i for i in (0.5, 1.5, 2.5, 3.5)]))


def bucket_by_hand(relative: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5's _relative_position_bucket for one key-minus-query distance, in plain Python."""
    ret, n = 0, -relative
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_the_reference_code(bidirectional):
    distance = torch.arange(-300, 301)
    got = t5_relative_bucket(distance, bidirectional=bidirectional)
    assert got.tolist() == [bucket_by_hand(d, bidirectional) for d in distance.tolist()]
    # a few by hand: bidirectional keeps 16 buckets per side, exact below 8, the last at >= 128
    if bidirectional:
        assert [bucket_by_hand(d, True) for d in (0, -1, 1, -8, -127, -128, -1000, 1000)] == \
            [0, 1, 17, 8, 15, 15, 15, 31]
    else:
        assert [bucket_by_hand(d, False) for d in (0, -1, 5, -16, -128, -1000)] == [0, 1, 0, 16, 31, 31]


def explicit_bias(kind: str, module, L: int) -> torch.Tensor:
    """The (H, L, L) score bias written out entry by entry from the papers' definitions."""
    bias = torch.zeros(H, L, L, dtype=torch.float64)
    for h in range(H):
        for i in range(L):
            for j in range(L):
                if kind == "alibi":
                    bias[h, i, j] = -alibi_slopes(H)[h] * abs(i - j)
                else:
                    bucket = bucket_by_hand(j - i, module.score_bias.bidirectional)
                    bias[h, i, j] = module.score_bias.table[bucket, h]
    return bias


def heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], H, -1).transpose(1, 2)  # (B, H, L, hd)


@pytest.mark.parametrize("kind", ["alibi", "t5"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_bias_attention_equals_explicit_bias_matrix(kind, causal, padded):
    torch.manual_seed(0)
    L = 19
    mixer = MultiHeadAttention(D, causal=causal, n_heads=H, positional=kind).double()
    with torch.no_grad():
        if kind == "t5":
            mixer.score_bias.table.normal_()  # large enough to matter
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    mask = (torch.arange(L) < torch.tensor([[L], [11]])) if padded else None
    y = mixer(x, mask)
    # the reference: plain q, k, v, an (L, L) bias written out entry by entry, the boolean mask
    q, k, v = (heads(t) for t in mixer.qkv(x).chunk(3, -1))
    allowed = torch.ones(L, L, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if padded:
        allowed = allowed & mask[:, None, None, :]
    ref = mixer.merge(dense_attention(q, k, v, allowed, explicit_bias(kind, mixer, L)))
    real = mask[..., None] if padded else torch.ones(1, L, 1, dtype=torch.bool)
    torch.testing.assert_close(y * real, ref * real)
    params = [x, *mixer.parameters()]
    g, g_ref = (torch.autograd.grad((out * real).square().sum(), params, allow_unused=True) for out in (y, ref))
    for a, b in zip(g, g_ref):
        if kind == "t5" and b is None:
            continue
        torch.testing.assert_close(a, b)
    if kind == "t5":
        assert g[-1].abs().sum() > 0, "the T5 table must get a gradient"


def explicit_rotary_scores(q, k, *, xpos: bool) -> torch.Tensor:
    """Scores q_n . k_m of RoPE / xPos written in their relative form: per frequency pair f,
    Re(q_f[n] conj(k_f[m]) e^{i (n - m) theta_f}), times zeta_f^((n - m) / 512) for xPos."""
    hd = q.shape[-1]
    L = q.shape[-2]
    theta = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    zeta = (torch.arange(0, hd, 2, dtype=torch.float64) + 0.4 * hd) / (1.4 * hd)
    qc = torch.complex(q[..., 0::2], q[..., 1::2])  # (B, H, L, hd/2)
    kc = torch.complex(k[..., 0::2], k[..., 1::2])
    n = torch.arange(L, dtype=torch.float64)
    rel = n[:, None] - n[None, :]  # (L, L): n - m
    phase = torch.polar(torch.ones_like(rel)[..., None].expand(L, L, hd // 2).contiguous(),
                        rel[..., None] * theta)  # (L, L, hd/2)
    decay = zeta ** (rel[..., None] / 512) if xpos else torch.ones(L, L, hd // 2, dtype=torch.float64)
    pair = qc[..., :, None, :] * kc[..., None, :, :].conj() * phase  # (B, H, L, L, hd/2)
    return (pair.real * decay).sum(-1)


@pytest.mark.parametrize("kind", ["rope", "xpos"])
@pytest.mark.parametrize("L", [5, 40, 400])
def test_rotations_give_the_explicit_relative_scores(kind, L):
    torch.manual_seed(0)
    mixer = MultiHeadAttention(D, causal=True, n_heads=H, positional=kind).double()
    x = torch.randn(1, L, D, dtype=torch.float64)
    q, k, _ = mixer.project(x)  # rotated (and scaled, for xPos)
    q0, k0, _ = (heads(t) for t in mixer.qkv(x).chunk(3, -1))
    # the rotation tables are float32 buffers: single-precision tolerance
    torch.testing.assert_close(q @ k.transpose(-2, -1), explicit_rotary_scores(q0, k0, xpos=kind == "xpos"),
                               atol=1e-5, rtol=1e-5)


def test_xpos_decays_with_distance():
    rot = XPos(8)
    ones = torch.ones(1, 1, 600, 8)
    q, k = rot(ones, ones)
    # a key at the query's own position scores |q|^2 (no rotation, no scale); far keys decay
    assert q[0, 0, 599] @ k[0, 0, 599] == pytest.approx(8.0, rel=1e-5)
    assert (rot.zeta < 1).all() and rot.zeta[0] == pytest.approx(0.4 / 1.4)


# ------------------------------------------------------- sparse mixers with a bias vs dense


def sparse_mixer(name: str, causal: bool, positional: str):
    common = dict(causal=causal, n_heads=H, positional=positional)
    if name == "local":
        return LocalAttention(D, window=7, **common)
    if name == "longformer":
        return LongformerAttention(D, window=6, n_global=2, **common)
    if name == "bigbird":
        return BigBirdAttention(D, block_size=4, n_window_blocks=3, n_global_blocks=1, n_random_blocks=1,
                                seed=3, **common)
    return SparseTransformerAttention(D, pattern=name.split(":")[1], stride=5, c=2, **common)


def sparse_dense_mask(name: str, mixer, L: int, key_real: torch.Tensor) -> torch.Tensor:
    from architectures.sparse import bigbird_mask, longformer_mask

    if name == "bigbird":
        blocks = mixer.random_blocks(key_real, key_real.shape[0], L)
        allowed = bigbird_mask(L, block_size=4, n_window_blocks=3, n_global_blocks=1, random_blocks=blocks,
                               causal=mixer.causal)[:, None]
    elif name.startswith("sparse_transformer"):
        allowed = sparse_transformer_mask(L, pattern=name.split(":")[1], stride=5, c=2, causal=mixer.causal)
    else:
        allowed = longformer_mask(L, mixer.window, mixer.n_global, mixer.causal)
    return allowed & key_real[:, None, None, :]


@pytest.mark.parametrize("positional", ["alibi", "t5"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["local", "longformer", "bigbird", "sparse_transformer:strided",
                                  "sparse_transformer:fixed"])
def test_sparse_mixers_with_bias_equal_dense(name, causal, positional):
    torch.manual_seed(0)
    L = 29
    mixer = sparse_mixer(name, causal, positional).double()
    if positional == "t5":
        with torch.no_grad():
            mixer.score_bias.table.normal_()
    x = torch.randn(B, L, D, dtype=torch.float64)
    key_real = torch.arange(L) < torch.tensor([[L], [17]])
    q, k, v = (t.detach().requires_grad_() for t in mixer.project(x))
    y = mixer.attend(q, k, v, key_real, 0.0)
    pos = torch.arange(L)
    ref = dense_attention(q, k, v, sparse_dense_mask(name, mixer, L, key_real),
                          mixer.relative_bias(pos[:, None], pos[None, :]))
    real = key_real[:, None, :, None]
    torch.testing.assert_close(y * real, ref * real)
    params = [q, k, v, *([mixer.score_bias.table] if positional == "t5" else [])]
    g = torch.autograd.grad((y * real).square().sum(), params)
    g_ref = torch.autograd.grad((ref * real).square().sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------- through the backbone


@pytest.mark.parametrize("model_name", ["linear_transformer", "performer", "linformer", "s4d", "mamba"])
@pytest.mark.parametrize("positional", ["alibi", "t5", "xpos", "rope"])
def test_mixers_without_scores_refuse_naming_the_key(model_name, positional):
    cfg = composed(*tiny_model(model_name), f"model.positional={positional}")
    with pytest.raises(ValueError, match=r"model\.positional=" + positional + r".*(none|sinusoidal)"):
        instantiate_without_name(cfg.model, spec=SPECS["classify"])


def test_the_refusal_names_the_allowed_values():
    cfg = composed(*tiny_model("performer"), "model.positional=alibi")
    with pytest.raises(ValueError) as e:
        instantiate_without_name(cfg.model, spec=SPECS["classify"])
    for allowed in ("none", "sinusoidal", "learned", "rope", "alibi", "t5", "xpos"):
        assert allowed in str(e.value)


def test_unknown_positional_names_the_key():
    cfg = composed(*tiny_model("transformer"))
    cfg = OmegaConf.merge(cfg, {"model": {"positional": "absolute"}})
    with pytest.raises(ValueError, match="model.positional"):
        instantiate_without_name(cfg.model, spec=SPECS["lm"])


@pytest.mark.parametrize("positional", ["alibi", "t5", "xpos"])
def test_transformer_extrapolates_without_a_table(positional):
    """A score position has no length limit: the model runs beyond the length it was built for."""
    cfg = composed(*tiny_model("transformer"), f"model.positional={positional}")
    model = instantiate_without_name(cfg.model, spec=SPECS["lm"]).eval()
    tokens = torch.randint(1, 20, (1, 3 * SPECS["lm"].seq_len))
    with torch.no_grad():
        assert torch.isfinite(model({"tokens": tokens})).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("positional", ["alibi", "t5"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["local", "longformer", "bigbird"])
def test_flex_attention_with_a_bias_matches_portable_path(name, causal, positional):
    """On CUDA the bias is a FlexAttention score_mod; it must equal the blocked path's bias."""
    torch.manual_seed(0)
    L, d = 200, 16 * H  # FlexAttention: head size >= 16
    common = dict(causal=causal, n_heads=H, positional=positional)
    mixer = {"local": lambda: LocalAttention(d, window=40, **common),
             "longformer": lambda: LongformerAttention(d, window=40, n_global=3, **common),
             "bigbird": lambda: BigBirdAttention(d, block_size=32, n_window_blocks=3, n_global_blocks=1,
                                                 n_random_blocks=1, seed=0, **common)}[name]().cuda()
    if positional == "t5":
        with torch.no_grad():
            mixer.score_bias.table.normal_()
    x = torch.randn(B, L, d, device="cuda")
    mask = (torch.arange(L, device="cuda") < torch.tensor([[L], [150]], device="cuda"))
    fast = mixer(x, mask)
    q, k, v = mixer.project(x)
    portable = mixer.merge(mixer.attend(q, k, v, mask, 0.0))
    real = mask[..., None]
    torch.testing.assert_close(fast * real, portable * real, atol=2e-4, rtol=2e-4)
