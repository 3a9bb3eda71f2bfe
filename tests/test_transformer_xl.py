"""Transformer-XL: segment recurrence against a full-length recomputation, rel-shift against
explicit relative indexing, stop-gradient memory, causality, padding and batch independence."""

from __future__ import annotations

import math

import pytest
import torch

from architectures.layers import UnsupportedTask, sinusoidal_positions
from architectures.transformer_xl import TransformerXL, rel_shift, window_mask
from tasks.base import TaskSpec

V = 23
LM = TaskSpec(kind="lm", vocab_size=V, n_outputs=V, seq_len=16)
CLASSIFY = TaskSpec(kind="classify", vocab_size=V, n_outputs=3, seq_len=24)
PAIR = TaskSpec(kind="pair", vocab_size=V, n_outputs=2, seq_len=12)
SEQ2SEQ = TaskSpec(kind="seq2seq", vocab_size=V, n_outputs=V, seq_len=8, target_len=6, bos_id=1, sep_id=2)


def make(spec=LM, seed=0, **overrides) -> TransformerXL:
    torch.manual_seed(seed)
    kwargs = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, seg_len=4, mem_len=4)
    kwargs.update(overrides)
    return TransformerXL(spec=spec, **kwargs).eval()


def tokens_(B, L, seed=1, low=1):
    return torch.randint(low, V, (B, L), generator=torch.Generator().manual_seed(seed))


def full_context_reference(model: TransformerXL, tokens: torch.Tensor) -> torch.Tensor:
    """Recompute every layer over the whole sequence: no memory, no rel-shift.

    Each query sees the window the segment loop gives it (window_mask, with the model's current
    same_length); relative positions come from an explicit distance matrix t - p, clamped at the
    model's current clamp_len, indexing the sinusoidal table.
    """
    B, L = tokens.shape
    allowed = window_mask(L, model.seg_len, model.mem_len, model.same_length)  # (L, L)
    dist = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).clamp_min(0)  # (L, L)
    if model.clamp_len > 0:
        dist = dist.clamp(max=model.clamp_len)
    x = model.embed(tokens)  # (B, L, D)
    D = x.shape[-1]
    R = sinusoidal_positions(L, D).to(x)  # row d: distance d
    for block in model.blocks:
        a = block.attn
        H, hd = a.n_heads, a.head_dim
        h = block.norm1(x) if block.prenorm else x
        q = a.q(h).view(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        k, v = a.kv(h).view(B, L, 2, H, hd).permute(2, 0, 3, 1, 4)
        r = a.r(R).view(L, H, hd)[dist]  # (L, L, H, hd): W_r R[t - p]
        content = torch.einsum("bhtd,bhpd->bhtp", q + a.u[:, None], k)
        position = torch.einsum("bhtd,tphd->bhtp", q + a.v[:, None], r)
        scores = ((content + position) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
        y = torch.softmax(scores, -1) @ v  # (B, H, L, hd)
        y = a.out(y.transpose(1, 2).reshape(B, L, D))
        if block.prenorm:
            x = x + y
            x = x + block.ffn(block.norm2(x))
        else:  # post-norm (the reference's default): norm after each residual add
            x = block.norm1(x + y)
            x = block.norm2(x + block.ffn(x))
    return model.head(model.norm(x))


# The reference's options (kimiyoung/transformer-xl), all at once: the tests that compare the
# segment-parallel model with the plain versions run with ours and with these.
REFERENCE = dict(prenorm=False, ffn_activation="relu", embed_scale=True, init="txl_reference", head="txl_reference")
OPTIONS = [pytest.param({}, id="ours"), pytest.param(REFERENCE, id="reference")]


def test_window_mask_literal():
    # seg_len 2, mem_len 2: segment s sees the previous segment and itself, causally
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(window_mask(5, 2, 2), expected)
    assert torch.equal(window_mask(4, 2, 0), torch.block_diag(*[torch.ones(2, 2)] * 2).bool().tril())


def test_rel_shift_equals_explicit_indexing():
    B, H, S, K = 2, 3, 5, 9
    M = K - S
    x = torch.randn(B, H, S, K)  # column j: distance K - 1 - j
    y = rel_shift(x)
    for i in range(S):
        for j in range(M + i + 1):  # beyond M + i is the masked future
            assert torch.equal(y[:, :, i, j], x[:, :, i, K - 1 - (M + i - j)])


def test_rel_shift_scores_match_distance_table():
    torch.manual_seed(0)
    S, K, d = 4, 7, 6
    M = K - S
    q, table = torch.randn(S, d), torch.randn(K, d)  # table[d]: embedding of distance d
    shifted = rel_shift((q @ table.flip(0).T)[None, None])[0, 0]
    for i in range(S):
        for j in range(M + i + 1):
            torch.testing.assert_close(shifted[i, j], q[i] @ table[M + i - j])


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("seg_len,mem_len,L", [(4, 4, 12), (4, 6, 11), (3, 8, 10), (4, 0, 9), (16, 4, 10)])
def test_recurrence_equals_full_context_reference(seg_len, mem_len, L, options):
    model = make(seg_len=seg_len, mem_len=mem_len, **options).double()
    tokens = tokens_(2, L)
    with torch.no_grad():
        torch.testing.assert_close(model({"tokens": tokens}), full_context_reference(model, tokens))


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("seg_len,mem_len", [(4, 4), (3, 7), (4, 2), (5, 0)])
def test_parallel_segments_equal_the_segment_by_segment_loop(seg_len, mem_len, options):
    """One call runs a layer's segments in parallel; the paper feeds one segment at a time with
    the cached memory. Outputs and parameter gradients must agree."""
    model = make(seg_len=seg_len, mem_len=mem_len, **options).double()
    tokens = tokens_(2, 14)
    model({"tokens": tokens}).square().sum().backward()
    whole = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    outs, mems = [], None
    for chunk in tokens.split(seg_len, dim=1):
        out = model({"tokens": chunk}, mems=mems)
        out.square().sum().backward()  # memory is detached: each segment's loss stays local
        outs.append(out.detach())
        mems = model.last_mems
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(outs, 1), model({"tokens": tokens}))
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[k], msg=k)


def test_memory_is_detached():
    model = make(seg_len=4, mem_len=4)
    tokens = tokens_(2, 8)
    seen = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen["emb"] = output

    handle = model.embed.register_forward_hook(keep)
    model({"tokens": tokens})[:, 4:].sum().backward()
    grad = seen["emb"].grad
    assert torch.equal(grad[:, :4], torch.zeros_like(grad[:, :4])), "gradient leaked into segment 1"
    assert grad[:, 4:].abs().sum() > 0
    assert model.blocks[0].attn.u.grad.abs().sum() > 0 and model.blocks[0].attn.v.grad.abs().sum() > 0
    # the same loss through the non-detached reference does reach segment 1: the check can fail
    seen.clear()
    full_context_reference(model, tokens)[:, 4:].sum().backward()
    handle.remove()
    assert seen["emb"].grad[:, :4].abs().sum() > 0


def test_segment_two_reads_segment_one_through_memory():
    model = make(seg_len=4, mem_len=4)
    a, b = tokens_(1, 8, seed=1), tokens_(1, 8, seed=1)
    b[:, 1] = (b[:, 1] % (V - 1)) + 1 if b[0, 1] != V - 1 else 1
    with torch.no_grad():
        assert not torch.allclose(model({"tokens": a})[:, 4:], model({"tokens": b})[:, 4:])


def test_lm_causality():
    model = make(seg_len=3, mem_len=5)
    tokens = tokens_(2, 13)
    with torch.no_grad():
        ref = model({"tokens": tokens})
        for t in (0, 4, 7, 12):
            changed = tokens.clone()
            changed[:, t] = torch.where(changed[:, t] == 5, 6, 5)
            out = model({"tokens": changed})
            torch.testing.assert_close(out[:, :t], ref[:, :t])
            assert not torch.allclose(out[:, t], ref[:, t])


def test_no_memory_equals_independent_segments_and_differs_from_memory():
    with_mem, without = make(mem_len=4), make(mem_len=0)
    without.load_state_dict(with_mem.state_dict())
    tokens = tokens_(2, 12)
    with torch.no_grad():
        out0 = without({"tokens": tokens})
        for s in range(0, 12, 4):
            torch.testing.assert_close(out0[:, s:s + 4], without({"tokens": tokens[:, s:s + 4]}))
        out = with_mem({"tokens": tokens})
        torch.testing.assert_close(out[:, :4], out0[:, :4])  # segment 1 has no memory either way
        assert not torch.allclose(out[:, 4:], out0[:, 4:], atol=1e-4)
    assert without.last_mems is None


def test_memory_carried_across_calls_equals_one_long_call():
    model = make(seg_len=4, mem_len=6)
    tokens = tokens_(3, 16)
    with torch.no_grad():
        whole = model({"tokens": tokens})
        first = model({"tokens": tokens[:, :8]})
        assert [tuple(m.shape) for m in model.last_mems] == [(3, 6, 16)] * 2
        second = model({"tokens": tokens[:, 8:]}, mems=model.last_mems)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    with pytest.raises(ValueError, match="last_mems"):
        model({"tokens": tokens[:2]}, mems=model.last_mems)


def test_lm_batch_independence():
    model = make(seg_len=3, mem_len=3)
    tokens = tokens_(4, 10)
    with torch.no_grad():
        out = model({"tokens": tokens})
        for i in range(4):
            torch.testing.assert_close(out[i:i + 1], model({"tokens": tokens[i:i + 1]}))


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_classify_padding_invariance_and_batch_independence(pooling):
    model = make(CLASSIFY, seg_len=4, mem_len=4, pooling=pooling)
    lengths = [10, 3, 17]
    rows = [tokens_(1, n, seed=n)[0] for n in lengths]
    batch = torch.zeros(3, 24, dtype=torch.long)  # pad id 0, on the right
    for i, row in enumerate(rows):
        batch[i, :len(row)] = row
    with torch.no_grad():
        out = model({"tokens": batch})
        assert out.shape == (3, 3)
        for i, row in enumerate(rows):
            alone = model({"tokens": row[None]})
            torch.testing.assert_close(out[i:i + 1], alone)
            padded = torch.cat([row, torch.zeros(7, dtype=torch.long)])[None]
            torch.testing.assert_close(model({"tokens": padded}), alone)


def test_classify_reads_beyond_the_first_segment():
    model = make(CLASSIFY, seg_len=4, mem_len=4, pooling="last")
    a = tokens_(1, 12)
    b = a.clone()
    b[0, 5] = 7 if a[0, 5] != 7 else 8
    with torch.no_grad():
        assert not torch.allclose(model({"tokens": a}), model({"tokens": b}))


def test_pair_and_seq2seq_shapes_and_seq2seq_causality():
    model = make(PAIR)
    with torch.no_grad():
        out = model({"tokens": tokens_(2, 12), "tokens2": tokens_(2, 12, seed=5)})
    assert out.shape == (2, 2)

    model = make(SEQ2SEQ, seg_len=5, mem_len=5)
    source = tokens_(2, 8, low=3)
    source[1, 5:] = 0  # right padding
    target = tokens_(2, 6, seed=3, low=3)
    with torch.no_grad():
        out = model({"source": source, "target": target})
        assert out.shape == (2, 6, V)
        changed = target.clone()
        changed[:, 3] = torch.where(changed[:, 3] == 4, 5, 4)
        out2 = model({"source": source, "target": changed})
    # logits[:, j] predicts target[:, j] from target[:, :j]: position 3 feeds logits 4 onwards
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


def test_errors_name_the_config_key():
    with pytest.raises(UnsupportedTask, match="sep_id"):
        make(TaskSpec(kind="seq2seq", vocab_size=V, n_outputs=V, seq_len=8, target_len=4, bos_id=1))
    with pytest.raises(ValueError, match="model.n_heads"):
        make(n_heads=3)
    with pytest.raises(ValueError, match="model.mem_len"):
        make(mem_len=-1)
    with pytest.raises(ValueError, match="model.seg_len"):
        make(seg_len=0)
    with pytest.raises(ValueError, match="lm tasks"):
        make(CLASSIFY)({"tokens": tokens_(1, 4)}, mems=[])


def test_builds_through_harness_api(tmp_path):
    from harness.api import build

    common = ["model=transformer_xl", "task=mqar", "task.seq_len=64", "task.n_pairs=4", "task.n_train=4",
              "task.n_val=4", "task.n_test=4", f"task.cache_dir={tmp_path}", "model.seg_len=16"]
    built = build(common)
    assert isinstance(built.model, TransformerXL)
    batch = {k: v.long() for k, v in built.task.dataset("train")[[0, 1]].items()}
    with torch.no_grad():
        out = built.model(batch)
    assert out.shape == (2, 64, built.task.spec.n_outputs)
    assert built.model.mem_len == 64 and len(built.model.last_mems) == built.cfg.model.n_layers
    ablation = build(common + ["model.mem_len=0"])
    assert ablation.model.mem_len == 0


# -- issue 14: shared u/v, attention dropout, clamp/same_length, evaluation lengths, stream mode --------

def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_u_and_v_shared_across_layers_by_default_as_the_reference():
    shared, untied = make(n_layers=3), make(n_layers=3, untie_r=True)
    first = shared.blocks[0].attn
    assert all(b.attn.u is first.u and b.attn.v is first.v for b in shared.blocks)
    assert len({id(b.attn.u) for b in untied.blocks} | {id(b.attn.v) for b in untied.blocks}) == 6
    # u and v are (heads, head size) = d_model numbers each; two layers' pairs fewer when shared
    assert n_params(untied) - n_params(shared) == 2 * 2 * 16
    # the one shared pair gets every layer's gradient
    shared.train()
    shared({"tokens": tokens_(2, 8)}).sum().backward()
    grad_all = first.u.grad.clone()
    shared.zero_grad()
    shared.blocks[1].attn.u = torch.nn.Parameter(first.u.detach().clone())  # untie the second layer only
    shared({"tokens": tokens_(2, 8)}).sum().backward()
    assert not torch.allclose(first.u.grad, grad_all)


def test_attention_dropout_is_its_own_option_off_by_default():
    from omegaconf import OmegaConf

    assert OmegaConf.load("conf/model/transformer_xl.yaml").dropatt == 0.0
    model = make(dropout=0.1)
    assert all(b.attn.dropout == 0.0 for b in model.blocks)  # residual dropout does not reach attention
    assert all(b.attn.dropout == 0.3 for b in make(dropatt=0.3).blocks)
    # attention dropout alone makes training outputs random; eval mode turns it off
    noisy = make(dropatt=0.5).train()
    tokens = tokens_(2, 8)
    assert not torch.allclose(noisy({"tokens": tokens}), noisy({"tokens": tokens}))
    noisy.eval()
    torch.testing.assert_close(noisy({"tokens": tokens}), noisy({"tokens": tokens}))


@pytest.mark.parametrize("seg_len,mem_len,clamp_len,same_length,L",
                         [(4, 4, 2, False, 12), (4, 6, -1, True, 13), (3, 2, 3, True, 10), (2, 5, 1, True, 9)])
@pytest.mark.parametrize("options", OPTIONS)
def test_clamp_len_and_same_length_equal_the_full_context_reference(seg_len, mem_len, clamp_len, same_length, L,
                                                                    options):
    model = make(seg_len=seg_len, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length, **options).double()
    tokens = tokens_(2, L)
    with torch.no_grad():
        out = model({"tokens": tokens})
        torch.testing.assert_close(out, full_context_reference(model, tokens))
        if same_length or clamp_len > 0:  # the options change something
            plain = make(seg_len=seg_len, mem_len=mem_len, **options).double()
            assert not torch.allclose(out, plain({"tokens": tokens}))


def test_same_length_query_sees_its_last_mem_len_positions():
    # seg_len 2, mem_len 2: every query sees itself and the one before
    assert torch.equal(window_mask(5, 2, 2, same_length=True), torch.ones(5, 5, dtype=torch.bool).tril() &
                       torch.ones(5, 5, dtype=torch.bool).triu(-1))


def test_evaluation_lengths_apply_in_eval_mode_only():
    lengths = dict(eval_seg_len=2, eval_mem_len=6, eval_clamp_len=3, eval_same_length=True)
    model = make(seg_len=4, mem_len=4, **lengths).double()
    trained_like = make(seg_len=4, mem_len=4).double()
    evaluated_like = make(seg_len=2, mem_len=6, clamp_len=3, same_length=True).double()
    for other in (trained_like, evaluated_like):
        other.load_state_dict(model.state_dict())
    tokens = tokens_(2, 12)
    with torch.no_grad():
        model.train(), trained_like.train()
        assert (model.seg_len, model.mem_len, model.clamp_len, model.same_length) == (4, 4, -1, False)
        torch.testing.assert_close(model({"tokens": tokens}), trained_like({"tokens": tokens}))
        model.eval(), evaluated_like.eval()
        assert (model.seg_len, model.mem_len, model.clamp_len, model.same_length) == (2, 6, 3, True)
        assert all((b.seg_len, b.mem_len) == (2, 6) for b in model.blocks)
        out = model({"tokens": tokens})
        torch.testing.assert_close(out, evaluated_like({"tokens": tokens}))
        torch.testing.assert_close(out, full_context_reference(model, tokens))
        assert len(model.last_mems) == 2 and model.last_mems[0].shape[1] == 6
        model.train()
        torch.testing.assert_close(model({"tokens": tokens}), trained_like({"tokens": tokens}))
    # the no-memory ablation evaluates with its training lengths whatever the eval_* keys say
    ablation = make(seg_len=4, mem_len=0, **lengths).eval()
    assert (ablation.seg_len, ablation.mem_len, ablation.clamp_len, ablation.same_length) == (4, 0, -1, False)


def test_stream_mode_carries_memory_across_calls_like_one_concatenated_stream():
    b1, b2, b3 = tokens_(2, 8, seed=1), tokens_(2, 8, seed=2), tokens_(2, 8, seed=3)
    stream = make(seg_len=4, mem_len=6, stream=True).double().train()  # dropout 0: deterministic
    plain = make(seg_len=4, mem_len=6).double().train()
    plain.load_state_dict(stream.state_dict())
    with torch.no_grad():
        first = stream({"tokens": b1})
        torch.testing.assert_close(first, plain({"tokens": b1}))  # nothing carried yet
        second, third = stream({"tokens": b2}), stream({"tokens": b3})
        whole = plain({"tokens": torch.cat([b1, b2, b3], dim=1)})  # (B, 24, V)
        torch.testing.assert_close(second, whole[:, 8:16])
        torch.testing.assert_close(third, whole[:, 16:])
        assert not torch.allclose(second, plain({"tokens": b2}), atol=1e-4)  # the memory mattered


def test_stream_mode_empties_the_evaluation_memory_and_keeps_the_training_memory():
    b1, b2, e1, e2 = (tokens_(2, 8, seed=s) for s in range(1, 5))
    stream = make(seg_len=4, mem_len=4, stream=True).double().train()
    plain = make(seg_len=4, mem_len=4).double()
    plain.load_state_dict(stream.state_dict())
    with torch.no_grad():
        stream({"tokens": b1})
        for _ in range(2):  # every evaluation starts from an empty memory
            stream.eval()
            torch.testing.assert_close(stream({"tokens": e1}), plain.eval()({"tokens": e1}))
            torch.testing.assert_close(stream({"tokens": e2}), plain({"tokens": torch.cat([e1, e2], 1)})[:, 8:])
        stream.train()  # training resumes from the training memory
        torch.testing.assert_close(stream({"tokens": b2}), plain.train()({"tokens": torch.cat([b1, b2], 1)})[:, 8:])
        stream({"tokens": b2[:1]})  # another batch size: no memory to continue, starts empty
        stream.reset_memory()
        torch.testing.assert_close(stream({"tokens": b2}), plain({"tokens": b2}))
