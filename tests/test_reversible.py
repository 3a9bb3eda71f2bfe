"""Reversible residual blocks (architectures/reversible.py, ``model.reversible=true``): the
recomputing backward pass against the same two-stream computation under plain autograd, and
activation memory that does not grow with depth."""

from __future__ import annotations

import functools

import pytest
import torch

import architectures.backbone as backbone
from architectures.attention import MultiHeadAttention
from architectures.lsh import LSHAttention
from architectures.reversible import reversible_reference
from tasks.base import TaskSpec, random_batch

SPEC = TaskSpec(kind="classify", vocab_size=20, n_outputs=5, seq_len=40)
MIXERS = {
    "transformer": functools.partial(MultiHeadAttention, n_heads=2, dropout=0.1),
    "reformer": functools.partial(LSHAttention, n_heads=2, chunk_len=8, n_buckets=4, n_hashes=2, dropout=0.1),
}


def model(mixer: str, n_layers: int = 3, dropout: float = 0.1, reversible: bool = True, spec=SPEC):
    torch.manual_seed(0)
    return backbone.SequenceModel(spec=spec, mixer=MIXERS[mixer], d_model=32, n_layers=n_layers, d_ff=64,
                                  dropout=dropout, reversible=reversible)


def loss_and_grads(m, batch, monkeypatch=None, seed=7):
    m.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for both computations
    out = m(batch)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_reversible_gradients_equal_the_explicit_two_stream_computation(mixer, monkeypatch):
    m = model(mixer).train()
    batch = random_batch(SPEC, 3, seed=1, padded=True)
    out, grads = loss_and_grads(m, batch)
    monkeypatch.setattr(backbone, "reversible_stack", reversible_reference)  # every activation kept
    ref_out, ref_grads = loss_and_grads(m, batch)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(m.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_dropout_is_replayed_not_redrawn(monkeypatch):
    """The comparison above is meaningful: another dropout draw changes the gradients."""
    m = model("transformer").train()
    batch = random_batch(SPEC, 3, seed=1, padded=True)
    _, a = loss_and_grads(m, batch, seed=7)
    _, b = loss_and_grads(m, batch, seed=8)
    assert not torch.allclose(a["embed.weight"], b["embed.weight"], atol=1e-4)


def test_the_no_grad_path_is_the_same_function():
    m = model("transformer").eval()  # no dropout draws: the two calls must agree exactly
    batch = random_batch(SPEC, 2, seed=2, padded=True)
    with torch.no_grad():
        evaluated = m(batch)
    torch.testing.assert_close(m(batch), evaluated)


def saved_activation_bytes(m, batch) -> int:
    """Bytes autograd keeps for the backward pass of one forward (parameters excluded)."""
    params = {p.data_ptr() for p in m.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(batch).sum()
    return total


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_activation_memory_does_not_grow_with_depth(mixer):
    batch = random_batch(SPEC, 2, seed=3, padded=True)
    plain = [saved_activation_bytes(model(mixer, n, reversible=False).train(), batch) for n in (2, 8)]
    rev = [saved_activation_bytes(model(mixer, n).train(), batch) for n in (2, 8)]
    assert plain[1] > 3 * plain[0]  # the plain backbone keeps every layer's activations
    assert rev[1] == rev[0] < plain[0]


def test_a_block_without_feed_forward_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.d_ff"):
        backbone.SequenceModel(spec=SPEC, mixer=MIXERS["transformer"], d_model=32, n_layers=2, d_ff=0,
                               reversible=True)
