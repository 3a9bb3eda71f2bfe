"""The LSTM family (`lstm`, `lstm_bahdanau`, `lstm_luong`, `lstm_attn_readout`): attention weights
(global and Luong's local windows), greedy decoding, token-by-token steps, causality, padding and
batch independence, the papers' models on seq2seq only, and building from yaml."""

from __future__ import annotations

import pytest
import torch

from architectures.layers import UnsupportedTask
from architectures.recurrent import RecurrentModel
from architectures.recurrent_attention import AdditiveScore, BilinearScore
from tasks.base import TaskSpec

V, L, LT = 13, 9, 6
PAD, BOS, SEP = 0, 1, 2

# (attention, score) on seq2seq: RNNenc, RNNsearch, and Luong's decoder with each of its scores
CONFIGS = [("none", None), ("bahdanau", None), ("luong", "dot"), ("luong", "general"), ("luong", "concat")]
IDS = [a if s is None else f"{a}-{s}" for a, s in CONFIGS]
# ... and on the kinds without a decoder: the plain LSTM and the read-out with each of its scores
READOUT = [("none", None), ("readout", "additive"), ("readout", "dot"), ("readout", "general")]
READOUT_IDS = [a if s is None else f"{a}-{s}" for a, s in READOUT]


def cases(kinds, *, attentive: bool = False) -> list:
    """(kind, attention, score) for each kind with the configurations that run it."""
    out = []
    for kind in kinds:
        configs = CONFIGS if kind == "seq2seq" else READOUT
        for attention, score in configs[1:] if attentive else configs:
            out.append(pytest.param(kind, attention, score, id=f"{kind}-{attention}" + (f"-{score}" if score else "")))
    return out


def spec_for(kind: str) -> TaskSpec:
    if kind == "seq2seq":
        return TaskSpec(kind="seq2seq", vocab_size=V, n_outputs=V, seq_len=L, target_len=LT, bos_id=BOS, sep_id=SEP)
    return TaskSpec(kind=kind, vocab_size=V, n_outputs=V if kind == "lm" else 3, seq_len=L)


def make_model(kind: str, attention: str, score: str | None, *, n_layers: int = 1, pooling: str | None = None,
               **kwargs):
    torch.manual_seed(0)
    pooling = pooling or ("attention" if attention == "readout" else "final")
    model = RecurrentModel(spec=spec_for(kind), d_model=8, d_hidden=8, n_layers=n_layers,
                           attention=attention, score=score, pooling=pooling, **kwargs)
    return model.eval()


def padded_tokens(lengths: list[int], width: int = L, seed: int = 1) -> torch.Tensor:
    """Random real tokens (ids 3..V-1) with right padding after each length."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, V, (len(lengths), width), generator=g)
    for i, n in enumerate(lengths):
        tokens[i, n:] = PAD
    return tokens


def make_batch(kind: str, lengths=(9, 5, 2), width: int = L) -> dict[str, torch.Tensor]:
    tokens = padded_tokens(list(lengths), width)
    if kind == "classify":
        return {"tokens": tokens}
    if kind == "pair":
        return {"tokens": tokens, "tokens2": padded_tokens(list(lengths)[::-1], width, seed=2)}
    if kind == "lm":
        return {"tokens": padded_tokens([width] * len(lengths), width)}
    return {"source": tokens, "target": padded_tokens([LT, 4, 3], LT, seed=3)}


def run(model, batch):
    with torch.no_grad():
        return model(batch)


# --- attention weights ------------------------------------------------------------------------


@pytest.mark.parametrize("kind,attention,score", cases(["classify", "pair", "seq2seq"], attentive=True))
def test_attention_weights_sum_to_one_and_skip_padding(kind, attention, score):
    model = make_model(kind, attention, score)
    batch = make_batch(kind)
    run(model, batch)
    w = model.last_attention
    if kind == "classify":
        real = batch["tokens"] != PAD  # (B, L)
    elif kind == "pair":
        real = torch.stack([batch["tokens"], batch["tokens2"]], 1) != PAD  # (B, 2, L)
    else:
        real = (batch["source"] != PAD)[:, None].expand(-1, LT, -1)  # (B, Lt, Ls)
    assert w.shape == real.shape
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert torch.all(w[~real] == 0)
    assert torch.all(w[real] > 0)


@pytest.mark.parametrize("attention,score", READOUT[1:], ids=READOUT_IDS[1:])
def test_lm_attention_is_causal_and_normalised(attention, score):
    model = make_model("lm", attention, score)
    run(model, make_batch("lm"))
    w = model.last_attention  # (B, L, L)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    assert torch.all(w[:, future] == 0)
    assert torch.all(w[:, ~future] > 0)


def test_scores_match_their_formulas():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    add = AdditiveScore(4, 6, d_attn=7)
    ref = torch.empty(2, 3, 5)
    for b in range(2):
        for i in range(3):
            for j in range(5):  # v^T tanh(W q_i + U k_j)
                ref[b, i, j] = add.v.weight[0] @ torch.tanh(add.W.weight @ q[b, i] + add.U.weight @ k[b, j] + add.U.bias)
    torch.testing.assert_close(add(q, add.keys(k)), ref)
    general = BilinearScore(4, 6, general=True)
    ref = torch.einsum("bid,de,bje->bij", q, general.W.weight, k)  # q^T W k
    torch.testing.assert_close(general(q, general.keys(k)), ref)
    with pytest.raises(ValueError, match="dot needs equal"):
        BilinearScore(4, 6, general=False)


@pytest.mark.parametrize("attention,score,first_changed", [("bahdanau", None, 2), ("luong", "general", 1)])
def test_seq2seq_query_is_previous_or_current_state(attention, score, first_changed):
    """Target token 0 is fed at step 1. Luong's query at step 1 is h_1, which has read it; Bahdanau's
    is s_0, which has not (its step 1 weights change only from step 2 on)."""
    model = make_model("seq2seq", attention, score)
    batch = make_batch("seq2seq")
    run(model, batch)
    w0 = model.last_attention
    batch["target"] = batch["target"].clone()
    batch["target"][:, 0] = (batch["target"][:, 0] - 3 + 1) % (V - 3) + 3
    run(model, batch)
    w1 = model.last_attention
    torch.testing.assert_close(w1[:, :first_changed], w0[:, :first_changed])
    assert not torch.allclose(w1[:, first_changed], w0[:, first_changed])


# --- Luong's local attention --------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2])
def test_luong_local_m_reads_the_window_around_the_target_step(window):
    """local-m: p_t = t (kept within the source); weights only at |s - p_t| <= D, summing to one."""
    model = make_model("seq2seq", "luong", "general", alignment="local-m", window=window)
    batch = make_batch("seq2seq")
    run(model, batch)
    w = model.last_attention  # (B, Lt, Ls)
    last = (batch["source"] != PAD).sum(1) - 1  # (B,)
    p = torch.arange(LT)[None].minimum(last[:, None])  # (B, Lt)
    inside = ((torch.arange(L)[None, None] - p[..., None]).abs() <= window) & (batch["source"] != PAD)[:, None]
    assert torch.all(w[~inside] == 0) and torch.all(w[inside] > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


def test_luong_local_p_is_the_window_softmax_times_a_gaussian():
    """local-p at the first step, recomputed from the paper's equations 9 and 10: p_t = S sigmoid(v_p^T
    tanh(W_p h_t)), softmax over the window, times exp(-(s - p_t)^2 / (2 (D/2)^2)); and p_t learns."""
    D = 2
    model = make_model("seq2seq", "luong", "general", alignment="local-p", window=D)
    source = make_batch("seq2seq")["source"]
    dec = model.decoder
    state = model.start_decoder(source)
    emb = model.embed(torch.full_like(source[:, 0], BOS))
    _, _, weights = dec.step(emb, state)
    lstm_state, feed, memory, keys, mask, _ = state
    h, _ = dec.cell(torch.cat([emb, feed], -1), lstm_state)
    last = (mask.sum(1) - 1).float()
    p = last * torch.sigmoid(dec.v_p(torch.tanh(dec.W_p(h)))).squeeze(-1)  # (B,)
    distance = torch.arange(L)[None] - p[:, None]  # (B, Ls)
    window = mask & (distance.abs() <= D)
    softmax = torch.softmax(dec.score(h[:, None], keys)[:, 0].masked_fill(~window, float("-inf")), -1)
    torch.testing.assert_close(weights, softmax * torch.exp(-distance.square() / (2 * (D / 2) ** 2)))
    assert torch.all((p >= 0) & (p <= last))
    model.train()
    model(make_batch("seq2seq")).sum().backward()
    assert dec.v_p.weight.grad.abs().sum() > 0 and dec.W_p.weight.grad.abs().sum() > 0


# --- seq2seq decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention,score", CONFIGS, ids=IDS)
def test_greedy_decoding_matches_teacher_forced_argmax(attention, score):
    model = make_model("seq2seq", attention, score, n_layers=2)
    source = make_batch("seq2seq")["source"]
    tokens = model.generate(source, LT)
    assert tokens.shape == (3, LT) and tokens.dtype == torch.long
    logits = run(model, {"source": source, "target": tokens})
    assert logits.shape == (3, LT, V)
    assert torch.equal(logits.argmax(-1), tokens)


@pytest.mark.parametrize("attention,score", CONFIGS, ids=IDS)
def test_seq2seq_teacher_forcing_never_reads_the_token_it_predicts(attention, score):
    model = make_model("seq2seq", attention, score)
    batch = make_batch("seq2seq")
    ref = run(model, batch)
    for j in range(LT):
        changed = dict(batch, target=batch["target"].clone())
        changed["target"][:, j:] = (changed["target"][:, j:] - 3 + 1) % (V - 3) + 3
        out = run(model, changed)
        torch.testing.assert_close(out[:, : j + 1], ref[:, : j + 1])
        if j + 1 < LT:
            assert not torch.allclose(out[:, j + 1], ref[:, j + 1])


# --- language modelling -----------------------------------------------------------------------


@pytest.mark.parametrize("attention,score", READOUT, ids=READOUT_IDS)
def test_lm_step_equals_forward(attention, score):
    model = make_model("lm", attention, score, n_layers=2)
    tokens = make_batch("lm")["tokens"]
    ref = run(model, {"tokens": tokens})
    state, outs = None, []
    with torch.no_grad():
        for t in range(L):
            logits, state = model.step(tokens[:, t], state)
            outs.append(logits)
    torch.testing.assert_close(torch.stack(outs, 1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention,score", READOUT, ids=READOUT_IDS)
def test_lm_is_causal(attention, score):
    model = make_model("lm", attention, score)
    tokens = make_batch("lm")["tokens"]
    ref = run(model, {"tokens": tokens})
    for t in (0, 4, L - 1):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] - 3 + 1) % (V - 3) + 3
        out = run(model, {"tokens": changed})
        torch.testing.assert_close(out[:, :t], ref[:, :t])
        assert not torch.allclose(out[:, t], ref[:, t])


# --- padding and batch independence -------------------------------------------------------------


@pytest.mark.parametrize("kind,attention,score", cases(["classify", "pair", "seq2seq"]))
def test_padding_changes_nothing(kind, attention, score):
    model = make_model(kind, attention, score)
    batch = make_batch(kind)
    ref = run(model, batch)
    wider = {k: torch.nn.functional.pad(v, (0, 4), value=PAD) if k != "target" else v for k, v in batch.items()}
    torch.testing.assert_close(run(model, wider), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["final", "mean", "last", "cls"])
def test_plain_poolings_are_padding_invariant(pooling):
    model = make_model("classify", "none", None, pooling=pooling)
    batch = make_batch("classify")
    ref = run(model, batch)
    wider = {"tokens": torch.nn.functional.pad(batch["tokens"], (0, 3), value=PAD)}
    torch.testing.assert_close(run(model, wider), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,attention,score", cases(["classify", "pair", "lm", "seq2seq"]))
def test_batch_independence(kind, attention, score):
    model = make_model(kind, attention, score)
    batch = make_batch(kind)
    ref = run(model, batch)
    for i in range(3):
        one = run(model, {k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(one[0], ref[i], atol=1e-6, rtol=1e-5)


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lstm", "lstm_attn_readout"])
def test_builds_from_yaml(name, tmp_path):
    from harness.api import build

    built = build([f"model={name}", "task=mqar", "task.seq_len=32", "task.n_pairs=4", "task.vocab_size=32",
                   "task.n_train=8", "task.n_val=4", "task.n_test=4", f"task.cache_dir={tmp_path}",
                   "model.d_model=8", "model.d_hidden=8"])
    batch = {k: v.long() for k, v in built.task.dataset("train")[[0, 1]].items()}
    logits = built.model(batch)
    assert logits.shape == (2, 32, 32)
    logits.logsumexp(-1).sum().backward()  # trains: gradients reach the embedding
    assert built.model.embed.weight.grad.abs().sum() > 0


def test_the_papers_models_are_encoder_decoders():
    """lstm_bahdanau and lstm_luong run seq2seq only; the read-out runs everything else."""
    for kind in ("lm", "classify", "pair"):
        for attention in ("bahdanau", "luong"):
            with pytest.raises(UnsupportedTask, match="seq2seq tasks only.*lstm_attn_readout"):
                RecurrentModel(spec=spec_for(kind), d_model=8, d_hidden=8, n_layers=1, attention=attention,
                               score="dot" if attention == "luong" else None)
    with pytest.raises(UnsupportedTask, match="no decoder"):
        RecurrentModel(spec=spec_for("seq2seq"), d_model=8, d_hidden=8, n_layers=1, attention="readout",
                       score="additive")


def test_config_errors_name_the_key():
    spec = spec_for("classify")
    s2s = spec_for("seq2seq")
    with pytest.raises(ValueError, match="model.alignment"):
        RecurrentModel(spec=s2s, d_model=8, d_hidden=8, n_layers=1, attention="bahdanau", alignment="local-m")
    with pytest.raises(ValueError, match="model.alignment must be one of"):
        RecurrentModel(spec=s2s, d_model=8, d_hidden=8, n_layers=1, attention="luong", score="dot", alignment="local")
    with pytest.raises(ValueError, match="model.window"):
        RecurrentModel(spec=s2s, d_model=8, d_hidden=8, n_layers=1, attention="luong", score="dot",
                       alignment="local-p", window=0)
    with pytest.raises(ValueError, match="model.score must be one of.*read-out"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="readout", score="concat",
                       pooling="attention")
    with pytest.raises(ValueError, match="model.attention"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="luong-ish")
    with pytest.raises(ValueError, match="model.score"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="bahdanau", score="dot")
    with pytest.raises(ValueError, match="model.score"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="readout", score=None, pooling="attention")
    with pytest.raises(ValueError, match="model.pooling=attention"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="none", pooling="attention")
    with pytest.raises(ValueError, match="step\\(\\) runs causal"):
        make_model("classify", "none", None).step(torch.zeros(2, dtype=torch.long))
