"""Loss and metric per task kind, and evaluation over a split.

=========  ==========================================  =====================================
kind       loss                                        metric
=========  ==========================================  =====================================
classify   cross-entropy on ``label``                  accuracy
pair       cross-entropy on ``label``                  accuracy
lm         cross-entropy on ``targets`` (-100 ignored)  accuracy at scored positions, or bpc
seq2seq    cross-entropy on ``target`` (pads ignored)   token accuracy on real target tokens
=========  ==========================================  =====================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tasks.base import IGNORE_INDEX, TaskSpec


def targets_of(batch: dict[str, torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    """The tensor the logits are scored against, with ignored positions set to -100."""
    if spec.kind in ("classify", "pair"):
        return batch["label"]
    if spec.kind == "lm":
        return batch["targets"]
    target = batch["target"]
    return target.masked_fill(target == spec.pad_id, IGNORE_INDEX)


def loss_and_counts(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], spec: TaskSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over scored positions, number of correct argmax predictions, and count scored."""
    target = targets_of(batch, spec)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_target = target.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_target, ignore_index=IGNORE_INDEX)
    scored = flat_target != IGNORE_INDEX
    correct = (flat_logits.argmax(-1) == flat_target) & scored
    return loss, correct.sum(), scored.sum()


def auxiliary_loss(model) -> torch.Tensor | None:
    """A model's own training loss beside the task's, left by its last forward in ``aux_loss``
    (e.g. the Compressive Transformer's attention-reconstruction loss), or None. The trainer adds
    it to the task loss; the recorded train loss is the task loss alone."""
    return getattr(model, "aux_loss", None)


def metric_value(metric: str, *, loss_sum: float, correct: int, count: int) -> float:
    """The task metric from summed loss (nats), correct predictions and scored positions."""
    if count == 0:
        return float("nan")
    if metric == "accuracy":
        return correct / count
    if metric == "bpc":
        return loss_sum / count / math.log(2)
    raise ValueError(f"unknown metric {metric!r}; expected 'accuracy' or 'bpc'")


@torch.no_grad()
def evaluate(model, batches, spec: TaskSpec, to_device, autocast) -> dict[str, float]:
    """Average loss and the task metric over ``batches`` (an iterable of batch dicts)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = to_device(batch)
        with autocast():
            logits = model(batch)
        loss, n_correct, n_scored = loss_and_counts(logits, batch, spec)
        loss_sum += loss.item() * n_scored.item()
        correct += n_correct.item()
        count += n_scored.item()
    model.train(was_training)
    return {
        "loss": loss_sum / max(count, 1),
        "metric": metric_value(spec.metric, loss_sum=loss_sum, correct=correct, count=count),
        "count": count,
        "correct": correct,
    }


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens a batch feeds the model (both documents for pairs, source and target)."""
    return sum(batch[k].numel() for k in ("tokens", "tokens2", "source", "target") if k in batch)
