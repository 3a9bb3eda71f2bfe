"""``trainer.compile`` and ``trainer.activation_checkpointing``: how a training step runs, shared
by ``arena-train`` (harness.trainer) and ``arena-bench``'s measured step (harness.bench_worker).

``trainer.compile=true`` runs the step's forward and loss under ``torch.compile`` (inductor:
Triton kernels on CUDA, generated C++ on the CPU, which needs a C++ compiler); AOTAutograd
compiles the matching backward. The optimizer step stays eager. Only the training step is
compiled: evaluation runs the eager model, so its other batch sizes and lengths never recompile
the step. A model that cannot be compiled (dynamo cannot trace it, inductor cannot lower it, no
C++ compiler on the CPU) falls back to eager with a warning naming the reason, and the record
says so (``env.compile``: requested, applied, fallback).

``trainer.activation_checkpointing=true`` recomputes each block of the model's block stack in
the backward pass (``torch.utils.checkpoint``, non-reentrant: the RNG state is restored for the
recomputation, so dropout draws the same masks). A model says it has such a stack by an
``activation_checkpointing`` attribute read by its block loop (the shared backbone,
Transformer-XL, the Compressive Transformer); others (the LSTM family, one ``nn.LSTM``) refuse.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch
import torch.nn as nn

from architectures.layers import UnsupportedTask
from harness.records import is_out_of_memory

log = logging.getLogger(__name__)

T = TypeVar("T")


def failure_reason(exc: BaseException) -> str:
    """``Type: first line`` of an exception; a dynamo wrapper's first line ending in ``:`` (e.g.
    ``backend='inductor' raised:``) is joined with the line that says what was raised."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}"[:300]


class StepCompiler:
    """A training step's forward, compiled when ``enabled``, with a fallback to eager.

    Args:
        forward: the part of the step to compile (forward and loss; no ``backward`` call).
        enabled: ``trainer.compile``.
    """

    def __init__(self, forward: Callable, *, enabled: bool):
        self.eager = forward
        self.requested = bool(enabled)
        self.compiled = torch.compile(forward) if enabled else None
        self.fallback: str | None = None

    def run(self, step: Callable[[Callable], T], *, keep: tuple[type[BaseException], ...] = ()) -> T:
        """``step(forward)``: the step with the compiled forward (or the eager one). Compilation
        happens lazily, in the forward or the backward of a step, so the whole ``step`` is the
        unit that falls back: on a failure it is rerun with the eager forward (it must start by
        zeroing the gradients and must not step the optimizer). Out-of-memory errors and the
        types in ``keep`` (e.g. a diverged loss) are not compile failures and propagate."""
        if self.compiled is None:
            return step(self.eager)
        try:
            return step(self.compiled)
        except keep:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raised, eager may still run
            if is_out_of_memory(exc):
                raise
            self.fallback = failure_reason(exc)
            self.compiled = None
            log.warning("trainer.compile=true: the training step could not be compiled (%s); it runs eager",
                        self.fallback)
            return step(self.eager)

    def status(self) -> dict:
        """What the record keeps in ``env.compile``."""
        return {"requested": self.requested, "applied": self.requested and self.fallback is None,
                "fallback": self.fallback}


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn on block recomputation (``trainer.activation_checkpointing``) for ``model``.

    Raises:
        UnsupportedTask: the model has no block stack to recompute (recorded as ``unsupported``).
    """
    if not enabled:
        return
    if not hasattr(model, "activation_checkpointing"):
        cls = type(model)
        raise UnsupportedTask(
            f"trainer.activation_checkpointing=true recomputes each block of a block stack in the backward "
            f"pass; {cls.__module__}.{cls.__name__} has none to recompute (its layers run as one "
            f"module): set trainer.activation_checkpointing=false for this model")
    if getattr(model, "reversible", False):
        log.warning("trainer.activation_checkpointing=true with model.reversible=true: reversible blocks already "
                    "recompute their activations in the backward pass; checkpointing adds nothing")
    model.activation_checkpointing = True
