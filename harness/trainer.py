"""The training loop: AdamW, linear warm-up then cosine decay, gradient clipping, evaluation on
val every N steps, best-val weights kept, resumable checkpoints.

The data order is a pure function of (seed, step), so a resumed run sees exactly the batches
the uninterrupted run would have seen, and with the RNG states restored it computes the same
numbers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from harness.compile import StepCompiler, set_activation_checkpointing
from harness.measure import PeakMemory, StepTimer, autocast
from harness.distributed import World, all_sum, gather
from harness.objectives import auxiliary_loss, evaluate, loss_and_counts, metric_value, tokens_in
from harness.records import CHECKPOINT_FILE, METRICS_FILE, atomic_torch_save, atomic_write_text
from tasks.base import disk_full_error, set_aside

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class TimeLimit(Exception):
    """``trainer.time_limit_s`` ran out."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, decay: str = "matrices") -> list[dict]:
    """AdamW groups: decay on matrices (``decay="matrices"``; none on biases/norms/1-D parameters)
    or on every parameter (``"all"``, as flax's Adam in LRA's release), and one group per
    ``param._optim`` setting (S4-style: SSM parameters with their own lr and no decay)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        settings = {"lr": lr, "weight_decay": weight_decay if p.ndim >= 2 or decay == "all" else 0.0}
        settings.update(getattr(p, "_optim", {}))
        key = tuple(sorted(settings.items()))
        groups.setdefault(key, {**settings, "params": []})["params"].append(p)
    return list(groups.values())


def warmup_rsqrt(step: int, *, warmup_steps: int) -> float:
    """LR multiplier of LRA's release (``constant * linear_warmup * rsqrt_decay``, train_utils
    ``create_learning_rate_scheduler``): min(1, step / warm-up) * sqrt(warm-up / max(step, warm-up)),
    i.e. 1 at the end of warm-up, where ``trainer.lr`` is the schedule's peak (base / sqrt(warm-up))."""
    if warmup_steps <= 0:
        return 1.0 / math.sqrt(max(step, 1))
    return min(1.0, step / warmup_steps) * math.sqrt(warmup_steps / max(step, warmup_steps))


def lr_multiplier(cfg, step: int) -> float:
    """``trainer.schedule``: ``cosine`` (warm-up, cosine decay to min_lr_ratio) or ``rsqrt`` (LRA)."""
    if cfg.get("schedule", "cosine") == "rsqrt":
        return warmup_rsqrt(step, warmup_steps=cfg.warmup_steps)
    return warmup_cosine(step, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear from 0 to 1 over warm-up, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, *, n_examples: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the training batch at ``step``: epochs are seeded permutations, last partial
    batch dropped."""
    per_epoch = n_examples // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"trainer.batch_size={batch_size} is larger than the training split ({n_examples} examples)"
        )
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=g)
    return order[i * batch_size:(i + 1) * batch_size]


def rng_state() -> dict:
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_weights: dict | None = None
    last_train_loss: float | None = None
    last_val: dict | None = None  # the latest evaluation's loss and metric (not checkpointed)
    step_times_ms: list[float] = field(default_factory=list)


class Trainer:
    """Trains one model on one task into ``run_dir`` (checkpoint.pt, metrics.jsonl).

    ``metrics.jsonl`` gets a ``train`` line (loss, lr, tokens/s) every ``trainer.log_every``
    steps and a ``val`` line at each evaluation; the logger gets the same values as
    ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``val/loss``, ``val/<metric>``.

    Args:
        model, task: built from the config.
        trainer_cfg: the ``trainer`` config node.
        seed: the run's seed (also orders the data).
        device: where to train.
        run_dir: the run's output directory.
        logger: a harness.loggers logger.
    """

    def __init__(self, *, model, task, trainer_cfg, seed: int, device: torch.device, run_dir: Path, logger,
                 world: World = World()):
        self.world = world
        self.model = model.to(device)  # the model itself: evaluation, checkpoints, best weights
        set_activation_checkpointing(model, trainer_cfg.get("activation_checkpointing", False))
        # what the training step calls: DDP averages the gradients over the ranks
        self.step_model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if world.distributed else self.model
        if trainer_cfg.batch_size % world.size:
            raise ValueError(f"trainer.batch_size={trainer_cfg.batch_size} is the global batch; it must divide "
                             f"among the {world.size} processes (a multiple of {world.size})")
        self.task = task
        self.spec = task.spec
        self.cfg = trainer_cfg
        self.seed = seed
        self.device = device
        self.run_dir = run_dir
        self.logger = logger
        self.train_set = task.dataset("train")
        self.val_set = task.dataset("val")
        self.stream = self.check_stream(model, task)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay,
                         decay=trainer_cfg.get("decay", "matrices")),
            lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas), eps=trainer_cfg.get("eps", 1e-8),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(trainer_cfg, s))
        self.state = TrainState()
        self.timer = StepTimer(device)
        self.memory = PeakMemory(device)
        self.resumed_from: int | None = None
        # trainer.compile: the training step's forward and loss (evaluation runs the eager model)
        self.compiler = StepCompiler(self.forward_loss, enabled=trainer_cfg.get("compile", False))

    # -- data -------------------------------------------------------------------------------
    @staticmethod
    def check_stream(model, task) -> bool:
        """True for a model that carries its memory from one batch to the next (``model.stream``,
        Transformer-XL on ``lm``): the data then comes in the task's stream order."""
        if not (getattr(model, "stream", False) and task.spec.kind == "lm"):
            return False
        if not hasattr(task, "stream_indices"):
            raise ValueError(
                f"model.stream=true carries the memory from one batch to the next, which needs a task whose "
                f"windows are consecutive pieces of one text (task=char_lm); task {type(task).__name__} has no "
                "stream order: set model.stream=false")
        return True

    def train_indices(self, step: int) -> torch.Tensor:
        """This rank's rows of the training batch at ``step``: a seeded shuffle, or in stream mode
        row r the next window of stream r (the model's memory emptied when the streams start over).
        The carried memory is not checkpointed: a resumed stream run starts it empty at its step."""
        n, size = len(self.train_set), self.cfg.batch_size
        if self.stream:
            idx = self.task.stream_indices(step, n_windows=n, batch_size=size)
            if int(idx[0]) == 0:  # every stream back at its first window: no memory from the streams' ends
                self.model.reset_memory()
        else:
            idx = batch_indices(step, n_examples=n, batch_size=size, seed=self.seed)
        share = size // self.world.size
        return idx[self.world.rank * share:(self.world.rank + 1) * share]  # this rank's part of the batch

    def stream_eval_batches(self, dataset, limit: int | None, size: int):
        """Stream order over a whole split (its first ``limit`` batches): each rank scores its share
        of the streams; the model empties its evaluation memory when evaluation starts."""
        if size % self.world.size:
            raise ValueError(f"stream evaluation splits the {size} streams of a batch among {self.world.size} "
                             "processes: set trainer.eval_batch_size to a multiple of the process count")
        n_batches = len(dataset) // size
        share = size // self.world.size
        for step in range(n_batches if limit is None else min(limit, n_batches)):
            idx = self.task.stream_indices(step, n_windows=len(dataset), batch_size=size)
            yield dataset[idx[self.world.rank * share:(self.world.rank + 1) * share]]

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True).long() if not v.is_floating_point()
                else v.to(self.device) for k, v in batch.items()}

    def eval_batches(self, dataset, limit: int | None):
        """Batches over the whole split, or over a fixed random subset of ``limit`` batches (the
        same subset at every evaluation; a split stored in label order must not bias it)."""
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        if self.stream:
            yield from self.stream_eval_batches(dataset, limit, size)
            return
        order = torch.arange(len(dataset))
        if limit is not None and limit * size < len(dataset):
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit * size]
        for n, i in enumerate(range(0, len(order), size)):
            if n % self.world.size == self.world.rank:  # under DDP each rank scores its share
                yield dataset[order[i:i + size]]

    def evaluate(self, dataset, limit: int | None) -> dict[str, float]:
        """Loss and metric over ``dataset`` (summed over the ranks under DDP)."""
        result = evaluate(self.model, self.eval_batches(dataset, limit), self.spec, self.to_device, self.autocast)
        if not self.world.distributed:
            return result
        loss_sum, correct, count = all_sum([result["loss"] * result["count"], result["correct"], result["count"]],
                                           self.world)
        return {"loss": loss_sum / max(count, 1), "count": count, "correct": correct,
                "metric": metric_value(self.spec.metric, loss_sum=loss_sum, correct=correct, count=count)}

    def autocast(self):
        return autocast(self.device, self.cfg.precision)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.world.is_main:
            return
        s = self.state
        atomic_torch_save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "step": s.step,
            "best_metric": s.best_metric, "best_step": s.best_step, "best_weights": s.best_weights,
            "last_train_loss": s.last_train_loss,
        }, self.run_dir / CHECKPOINT_FILE)

    def maybe_resume(self) -> None:
        """Continue from ``checkpoint.pt`` when there is one. A checkpoint that cannot be loaded
        (truncated, garbage, or of another model) is moved aside, with a warning naming it, and
        the run starts from scratch; so does ``metrics.jsonl``, which then holds no line."""
        path = self.run_dir / CHECKPOINT_FILE
        if not path.exists():
            self.truncate_metrics_after(0)  # lines of an attempt killed before its first checkpoint
            self.check_ranks_agree(0)
            return
        fresh = {"model": copy.deepcopy(self.model.state_dict()), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng_state()}
        try:
            ckpt = torch.load(path, weights_only=True, map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            state = TrainState(step=ckpt["step"], best_metric=ckpt["best_metric"],
                               best_step=ckpt["best_step"], best_weights=ckpt["best_weights"],
                               last_train_loss=ckpt["last_train_loss"])
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, the run can start over
            self.model.load_state_dict(fresh["model"])
            self.optimizer.load_state_dict(fresh["optimizer"])
            self.scheduler.load_state_dict(fresh["scheduler"])
            set_rng_state(fresh["rng"])
            if self.world.is_main:
                aside = set_aside(path)
                reason = str(exc).splitlines()[0] if str(exc) else ""
                log.warning("%s cannot be resumed from (%s: %s); moved to %s, training starts from step 0",
                            path, type(exc).__name__, reason[:200], aside.name)
            self.truncate_metrics_after(0)
            self.check_ranks_agree(0)
            return
        self.state = state
        self.resumed_from = state.step
        self.truncate_metrics_after(state.step)
        self.check_ranks_agree(state.step)

    def check_ranks_agree(self, step: int) -> None:
        steps = gather(step, self.world)
        if len(set(steps)) > 1:
            raise RuntimeError(f"the ranks start from different steps {steps}: {self.run_dir / CHECKPOINT_FILE} "
                               f"changed while they read it; rerun")

    def truncate_metrics_after(self, step: int) -> None:
        """Keep only the metric lines up to ``step``, so a resumed run never repeats one. A line
        cut by a kill is dropped; a file holding anything else than metric lines (garbage, another
        program's output) is moved aside with a warning, and its good lines kept."""
        path = self.run_dir / METRICS_FILE
        if not self.world.is_main or not path.exists():
            return
        kept, bad = [], []
        raw_lines = path.read_bytes().splitlines()
        for line_no, raw in enumerate(raw_lines, 1):
            try:
                line = json.loads(raw.decode("utf-8"))
                keep = line["step"] <= step
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                if line_no < len(raw_lines) or not raw.strip():  # the last line may be a torn write
                    bad.append(line_no)
                continue
            if keep:
                kept.append(json.dumps(line))
        if bad:
            aside = set_aside(path)
            log.warning("%s: line(s) %s are not metric lines; moved to %s, its %d good line(s) kept",
                        path, ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else ""),
                        aside.name, len(kept))
        if bad or len(kept) < len(raw_lines):  # rewrite only when a line goes
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write_metrics(self, line: dict) -> None:
        if not self.world.is_main:
            return
        path = self.run_dir / METRICS_FILE
        try:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:
            full = disk_full_error(path, exc)
            raise (full or exc) from exc

    # -- the loop -----------------------------------------------------------------------------
    def is_better(self, value: float) -> bool:
        best = self.state.best_metric
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value > best if self.spec.higher_is_better else value < best

    def validate(self, elapsed_s: float, tokens_per_s: float | None) -> dict:
        result = self.evaluate(self.val_set, self.cfg.eval_batches)
        s = self.state
        if self.is_better(result["metric"]):
            s.best_metric, s.best_step = result["metric"], s.step
            s.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        line = {"step": s.step, "split": "val", "loss": result["loss"], "metric_name": self.spec.metric,
                "metric": result["metric"], "elapsed_s": elapsed_s, "tokens_per_s": tokens_per_s}
        self.write_metrics(line)
        s.last_val = {"loss": result["loss"], "metric": result["metric"]}
        self.logger.log({"val/loss": result["loss"], f"val/{self.spec.metric}": result["metric"]},
                        step=s.step)
        return result

    def log_train(self, elapsed_s: float, tokens_per_s: float | None) -> None:
        """The training loss, learning rate and speed at this step: metrics.jsonl and the logger."""
        s = self.state
        lr = self.scheduler.get_last_lr()[0]
        self.write_metrics({"step": s.step, "split": "train", "loss": s.last_train_loss, "lr": lr,
                            "elapsed_s": elapsed_s, "tokens_per_s": tokens_per_s})
        self.logger.log({"train/loss": s.last_train_loss, "train/lr": lr,
                         "train/tokens_per_s": tokens_per_s}, step=s.step)

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training forward: task loss, scored positions and the model's auxiliary loss (or
        None). What ``trainer.compile`` compiles."""
        with self.autocast():
            logits = self.step_model(batch)
        loss, _, scored = loss_and_counts(logits, batch, self.spec)
        return loss, scored, auxiliary_loss(self.model)

    def backward(self, forward, batch: dict[str, torch.Tensor]) -> float:
        """Zero the gradients, run ``forward`` (:meth:`forward_loss`, compiled or not) and the
        backward pass; returns the training loss to report."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, scored, aux = forward(batch)
        if self.world.distributed:
            # the mean over the global batch: each rank's loss weighted by its share of the scored
            # positions (DDP then averages the gradients, hence the world size)
            loss_sum, total = all_sum([loss.item() * scored.item(), scored.item()], self.world)
            loss = loss * scored * self.world.size / max(total, 1)
            reported = torch.tensor(loss_sum / max(total, 1))
        else:
            reported = loss.detach()
        if not torch.isfinite(reported):
            raise Diverged(f"training loss became {reported.item()} at step {self.state.step}")
        if aux is not None and not torch.isfinite(aux):
            raise Diverged(f"the model's auxiliary loss (aux_loss) became {aux.item()} at step {self.state.step}")
        (loss if aux is None else loss + aux).backward()
        return reported.item()

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        reported = self.compiler.run(lambda forward: self.backward(forward, batch), keep=(Diverged,))
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return reported

    def fit(self, progress_bar) -> None:
        """Train up to ``trainer.steps``, validating and checkpointing on the way."""
        cfg, s = self.cfg, self.state
        start = time.perf_counter()
        self.memory.start()
        self.model.train()
        last_val = None
        while s.step < cfg.steps:
            batch = self.to_device(self.train_set[self.train_indices(s.step)])
            self.timer.start()
            s.last_train_loss = self.train_step(batch)
            self.timer.stop()
            s.step += 1
            elapsed = time.perf_counter() - start
            tokens_per_s = self.timer.summary(tokens_in(batch))["tokens_per_s"]
            evaluated = s.step % cfg.eval_every == 0 or s.step == cfg.steps
            if s.step % cfg.log_every == 0 or s.step == cfg.steps:
                self.log_train(elapsed, tokens_per_s)
            if evaluated:
                last_val = self.validate(elapsed, tokens_per_s)["metric"]
                self.save_checkpoint()
            elif s.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            progress_bar.update(s.step, loss=s.last_train_loss, val=last_val, tokens_per_s=tokens_per_s,
                                evaluated=evaluated)
            if cfg.time_limit_s is not None and elapsed > cfg.time_limit_s:
                raise TimeLimit(f"trainer.time_limit_s={cfg.time_limit_s} reached at step {s.step}")

    def test(self) -> dict[str, float]:
        """Metrics on test (and any extra test lengths) with the best-val weights, or with the
        last ones under ``trainer.test_weights=last`` (LRA's release tests its last checkpoint)."""
        if self.state.best_weights is not None and self.cfg.get("test_weights", "best") == "best":
            self.model.load_state_dict(self.state.best_weights)
        metric = self.spec.metric
        out = {}
        result = self.evaluate(self.task.dataset("test"), None)
        out[f"test_{metric}"] = result["metric"]
        out["test_loss"] = result["loss"]
        for length in self.spec.eval_seq_lens:
            data = self.task.dataset("test", seq_len=length)
            r = self.evaluate(data, None)
            out[f"test_{metric}_len{length}"] = r["metric"]
        return out

    def summary_metrics(self) -> dict:
        s = self.state
        return {f"val_{self.spec.metric}": s.best_metric, "best_step": s.best_step, "steps": s.step,
                "final_train_loss": s.last_train_loss}

