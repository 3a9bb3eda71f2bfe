"""Compressive Transformer: cmem_len 0 is Transformer-XL; with nothing compressed (rate 1, identity
f_c) the compressed memory equals recomputing the same context (a longer plain memory, which the
Transformer-XL tests check against the full-length recomputation); streaming across calls equals
one call; the attention-reconstruction loss trains f_c and nothing else."""

from __future__ import annotations

import pytest
import torch

from architectures.compressive_transformer import CompressiveTransformer
from architectures.transformer_xl import TransformerXL
from harness.objectives import auxiliary_loss, loss_and_counts
from tests.test_transformer_xl import CLASSIFY, LM, PAIR, full_context_reference, tokens_

XL = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, seg_len=4)


def make(spec=LM, seed=0, **overrides) -> CompressiveTransformer:
    torch.manual_seed(seed)
    kwargs = dict(XL, mem_len=4, cmem_len=4, compression_rate=2, compression="conv")
    kwargs.update(overrides)
    return CompressiveTransformer(spec=spec, **kwargs).eval()


def twin_xl(model: torch.nn.Module, spec, mem_len: int) -> TransformerXL:
    xl = TransformerXL(spec=spec, **XL, mem_len=mem_len).eval()
    xl.load_state_dict(model.state_dict())  # strict: the same parameters, nothing more
    return xl


@pytest.mark.parametrize("spec", [LM, CLASSIFY])
def test_cmem_len_0_is_transformer_xl(spec):
    model = make(spec, cmem_len=0)
    xl = twin_xl(model, spec, mem_len=4)
    batch = {"tokens": tokens_(2, 19)}
    torch.testing.assert_close(model(batch), xl(batch), atol=0, rtol=0)


@pytest.mark.parametrize("L", [4, 13, 32])
@pytest.mark.parametrize("mem_len,cmem_len", [(4, 4), (4, 8), (8, 4)])
def test_uncompressed_memory_equals_recomputing_the_same_context(L, mem_len, cmem_len):
    """Rate 1 and f_c = identity (mean of one position): the compressed slots hold exactly the
    positions before the memory, so the model equals Transformer-XL with mem_len + cmem_len, and
    the full-length recomputation with that window; values and gradients."""
    model = make(mem_len=mem_len, cmem_len=cmem_len, compression_rate=1, compression="mean")
    xl = twin_xl(model, LM, mem_len=mem_len + cmem_len)
    tokens = tokens_(2, L)
    out = model({"tokens": tokens})
    torch.testing.assert_close(out, xl({"tokens": tokens}), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, full_context_reference(xl, tokens), atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    g_xl = torch.autograd.grad(xl({"tokens": tokens}).square().sum(), list(xl.parameters()))
    for a, b in zip(g, g_xl):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compression", ["conv", "max"])
def test_streaming_equals_one_call(compression):
    """Feeding a stream chunk by chunk with model.last_mems equals reading it in one call."""
    model = make(compression=compression, mem_len=4, cmem_len=4, compression_rate=2)
    tokens = tokens_(2, 32)
    whole = model({"tokens": tokens})
    parts, mems = [], None
    for chunk in tokens.split(8, dim=1):
        parts.append(model({"tokens": chunk}, mems=mems))
        mems = model.last_mems
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)
    assert [tuple(m.shape) for m in mems[0]] == [(2, 4, 16), (2, 4, 16)]


def test_compressed_memory_reaches_further_back_than_the_memory():
    """A token older than seg_len + mem_len changes a later output only through the compressed memory."""
    model = make(mem_len=4, cmem_len=4, compression_rate=2)
    tokens = tokens_(1, 24)
    changed = tokens.clone()
    changed[0, 1] = tokens[0, 1] % (23 - 1) + 1
    with torch.no_grad():
        moved = (model({"tokens": tokens}) - model({"tokens": changed})).abs().amax(-1)[0]  # (L,)
        xl = twin_xl(make(cmem_len=0, mem_len=4), LM, mem_len=4)
        moved_xl = (xl({"tokens": tokens}) - xl({"tokens": changed})).abs().amax(-1)[0]
    # a 2-layer XL sees back 2 * mem_len + (position in segment); the compressed memory 2 * 8 more
    assert moved_xl[16:].max() == 0 and moved[16:].max() > 1e-6


def test_reconstruction_loss_trains_the_compression_only():
    model = make(mem_len=4, cmem_len=4, compression_rate=2).train()
    batch = {"tokens": tokens_(2, 24), "targets": tokens_(2, 24, seed=5)}
    logits = model(batch)
    aux = auxiliary_loss(model)
    assert aux is not None and torch.isfinite(aux) and aux > 0
    task, _, _ = loss_and_counts(logits, batch, LM)
    names = [n for n, _ in model.named_parameters()]
    g_aux = dict(zip(names, torch.autograd.grad(aux, list(model.parameters()), retain_graph=True, allow_unused=True)))
    g_task = dict(zip(names, torch.autograd.grad(task, list(model.parameters()), allow_unused=True)))
    for name in names:
        in_compression = name.startswith("compressions.")
        assert (g_aux[name] is not None and g_aux[name].abs().sum() > 0) == in_compression, name
        assert g_task[name] is None or not in_compression, name
    model.eval()
    model(batch)
    assert model.aux_loss is None, "evaluation computes no reconstruction"


def test_reconstruction_loss_is_zero_when_compression_is_lossless():
    model = make(mem_len=4, cmem_len=4, compression_rate=1).train()
    for conv in (c.conv for c in model.compressions):
        with torch.no_grad():
            conv.weight.copy_(torch.eye(16)[:, :, None])
            conv.bias.zero_()
    model({"tokens": tokens_(2, 24)})
    assert model.aux_loss.item() == pytest.approx(0.0, abs=1e-10)


def test_a_pair_task_sums_both_documents_reconstruction():
    model = make(PAIR).train()
    a, b = tokens_(2, 12, seed=1), tokens_(2, 12, seed=2)
    model({"tokens": a, "tokens2": a})
    one = model.aux_loss
    model({"tokens": a, "tokens2": b})
    assert one is not None and model.aux_loss is not None and not torch.allclose(one, model.aux_loss)


def test_bad_hyperparameters_name_the_config_key():
    with pytest.raises(ValueError, match="model.compression_rate"):
        make(compression_rate=3)  # does not divide seg_len 4
    with pytest.raises(ValueError, match="model.mem_len > 0"):
        make(mem_len=0)
    with pytest.raises(ValueError, match="model.compression must"):
        make(compression="dilated")
    with pytest.raises(ValueError, match="model.cmem_len"):
        make(cmem_len=-1)
