"""The LSTM family (`lstm`, `lstm_bahdanau`, `lstm_luong`): attention weights, greedy decoding,
token-by-token steps, causality, padding and batch independence, and building from yaml."""

from __future__ import annotations

import pytest
import torch

from architectures.recurrent import RecurrentModel
from architectures.recurrent_attention import AdditiveScore, BilinearScore
from tasks.base import TaskSpec

V, L, LT = 13, 9, 6
PAD, BOS, SEP = 0, 1, 2

# (attention, score): the plain LSTM, Bahdanau, and Luong with each of its scores
CONFIGS = [("none", None), ("bahdanau", None), ("luong", "dot"), ("luong", "general"), ("luong", "concat")]
ATTENTIVE = CONFIGS[1:]
IDS = [a if s is None else f"{a}-{s}" for a, s in CONFIGS]


def spec_for(kind: str) -> TaskSpec:
    if kind == "seq2seq":
        return TaskSpec(kind="seq2seq", vocab_size=V, n_outputs=V, seq_len=L, target_len=LT, bos_id=BOS, sep_id=SEP)
    return TaskSpec(kind=kind, vocab_size=V, n_outputs=V if kind == "lm" else 3, seq_len=L)


def make_model(kind: str, attention: str, score: str | None, *, n_layers: int = 1, pooling: str | None = None):
    torch.manual_seed(0)
    pooling = pooling or ("final" if attention == "none" else "attention")
    model = RecurrentModel(spec=spec_for(kind), d_model=8, d_hidden=8, n_layers=n_layers,
                           attention=attention, score=score, pooling=pooling)
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


@pytest.mark.parametrize("attention,score", ATTENTIVE, ids=IDS[1:])
@pytest.mark.parametrize("kind", ["classify", "pair", "seq2seq"])
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


@pytest.mark.parametrize("attention,score", ATTENTIVE, ids=IDS[1:])
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


@pytest.mark.parametrize("attention,score", CONFIGS, ids=IDS)
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


@pytest.mark.parametrize("attention,score", CONFIGS, ids=IDS)
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


@pytest.mark.parametrize("attention,score", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["classify", "pair", "seq2seq"])
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


@pytest.mark.parametrize("attention,score", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["classify", "pair", "lm", "seq2seq"])
def test_batch_independence(kind, attention, score):
    model = make_model(kind, attention, score)
    batch = make_batch(kind)
    ref = run(model, batch)
    for i in range(3):
        one = run(model, {k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(one[0], ref[i], atol=1e-6, rtol=1e-5)


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lstm", "lstm_bahdanau", "lstm_luong"])
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


def test_config_errors_name_the_key():
    spec = spec_for("classify")
    with pytest.raises(ValueError, match="model.attention"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="luong-ish")
    with pytest.raises(ValueError, match="model.score"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="bahdanau", score="dot")
    with pytest.raises(ValueError, match="model.score"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="luong", score=None, pooling="attention")
    with pytest.raises(ValueError, match="model.pooling=attention"):
        RecurrentModel(spec=spec, d_model=8, d_hidden=8, n_layers=1, attention="none", pooling="attention")
    with pytest.raises(ValueError, match="step\\(\\) runs causal"):
        make_model("classify", "none", None).step(torch.zeros(2, dtype=torch.long))
