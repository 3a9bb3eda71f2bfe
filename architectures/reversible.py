"""Reversible residual layers (RevNet, Gomez et al. 2017; as used by Reformer, Kitaev et al. 2020).

``model.reversible=true`` turns the backbone's blocks into reversible ones. The residual stream is
kept twice, ``(x1, x2)``, both starting from the embedding, and each block maps

    y1 = x1 + F(x2),    F = dropout(mixer(norm1(.)))
    y2 = x2 + G(y1),    G = dropout(ffn(norm2(.)))

whose inputs can be recomputed from its outputs: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``. So
the forward pass keeps no per-layer activations: :class:`ReversibleStack` runs the blocks without
building a graph and, in the backward pass, walks them from the top, rebuilding each block's
input and its local graph one block at a time. Activation memory is one block's, whatever the
depth. The stack's output is the mean of the two streams, ``(y1 + y2) / 2``, as in
lucidrains/reformer-pytorch (trax concatenates them instead).

Randomness inside a block (dropout) must draw the same numbers when the block is recomputed, so
each block's F and G record the RNG state (and autocast setting) they ran with and the backward
pass replays it.

:func:`reversible_reference` is the same two-stream computation with ordinary autograd (every
activation kept): the exact reference that the recomputing backward is tested against.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RNGState:
    """The CPU (and, when the tensor is on CUDA, that device's) RNG state and the autocast setting
    at one point, to run a function again exactly as it ran then."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = torch.is_autocast_enabled(device.type)
        self.autocast_dtype = torch.get_autocast_dtype(device.type)


def run_recorded(fn, x, *args):
    """``fn(x, *args)`` and the state it started from."""
    state = RNGState(x.device)
    return fn(x, *args), state


def replayed(fn, state: RNGState, x, *args):
    """``fn(x, *args)`` from the recorded RNG state and autocast setting; the global RNG is
    restored afterwards, so training continues with the numbers it would have drawn."""
    devices = [state.device] if state.cuda is not None else []
    with torch.random.fork_rng(devices=devices), \
            torch.autocast(state.device.type, dtype=state.autocast_dtype, enabled=state.autocast):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda, state.device)
        return fn(x, *args)


class ReversibleStack(torch.autograd.Function):
    """Reversible blocks with activations recomputed in the backward pass.

    ``apply(x, mask, blocks, *params)``: x (B, L, D) -> (B, L, D). ``blocks`` provide
    ``f(x, mask)`` and ``g(x)``; ``params`` are all their parameters, listed so that autograd
    knows the output depends on them (their gradients are returned from :meth:`backward`).
    """

    @staticmethod
    def forward(ctx, x, mask, blocks, *params):
        states = []
        x1, x2 = x, x
        with torch.no_grad():
            for block in blocks:
                f, f_state = run_recorded(block.f, x2, mask)
                x1 = x1 + f
                g, g_state = run_recorded(block.g, x1)
                x2 = x2 + g
                states.append((f_state, g_state))
        ctx.blocks, ctx.mask, ctx.states, ctx.params = blocks, mask, states, params
        ctx.save_for_backward(x1, x2)
        return (x1 + x2) / 2

    @staticmethod
    def backward(ctx, grad_out):
        y1, y2 = ctx.saved_tensors
        dy1 = dy2 = grad_out / 2
        params = ctx.params
        grads = [torch.zeros_like(p) for p in params]
        index = {id(p): i for i, p in enumerate(params)}
        for block, (f_state, g_state) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            block_params = [p for p in block.parameters() if p.requires_grad]
            # G: y2 = x2 + G(y1)
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_(True)
                g = replayed(block.g, g_state, y1)
                dg = torch.autograd.grad(g, [y1, *block_params], dy2, allow_unused=True)
            with torch.no_grad():
                x2 = y2 - g
                dy1 = dy1 + dg[0]
            # F: y1 = x1 + F(x2)
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_(True)
                f = replayed(block.f, f_state, x2, ctx.mask)
                df = torch.autograd.grad(f, [x2, *block_params], dy1, allow_unused=True)
            with torch.no_grad():
                x1 = y1 - f
                dy2 = dy2 + df[0]
            for p, a, b in zip(block_params, dg[1:], df[1:]):
                for d in (a, b):
                    if d is not None:
                        grads[index[id(p)]] += d
            y1, y2 = x1.detach(), x2.detach()
        return (dy1 + dy2, None, None, *grads)


def reversible_stack(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Run ``blocks`` reversibly on x (B, L, D) -> (B, L, D); recompute activations when training."""
    if not torch.is_grad_enabled():
        return reversible_reference(blocks, x, mask)
    params = [p for p in blocks.parameters() if p.requires_grad]
    return ReversibleStack.apply(x, mask, blocks, *params)


def reversible_reference(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The same two-stream computation as :class:`ReversibleStack`, keeping every activation."""
    x1, x2 = x, x
    for block in blocks:
        x1 = x1 + block.f(x2, mask)
        x2 = x2 + block.g(x1)
    return (x1 + x2) / 2
