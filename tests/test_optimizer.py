"""The optimiser and protocol keys of `trainer` (schedule, eps, decay, test_weights): LRA's rsqrt
schedule to the formula of its release, weight decay on every parameter or on matrices only, the
keys validated, and lra_table1 set to the release's protocol."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from harness.api import compose_config
from harness.config import result_config
from harness.records import config_hash
from harness.trainer import lr_multiplier, param_groups
from harness.validation import ConfigError, check_config


def lra_learning_rate(step: int, *, base: float, warmup: int) -> float:
    """train_utils.create_learning_rate_scheduler('constant * linear_warmup * rsqrt_decay')."""
    return base * min(1.0, step / warmup) / math.sqrt(max(step, warmup))


@pytest.mark.parametrize("warmup", [175, 1000, 8000])
def test_the_rsqrt_schedule_is_lras(warmup):
    """With trainer.lr at the peak, base / sqrt(warmup), the multiplied lr is LRA's at every step."""
    base = 0.05
    cfg = OmegaConf.create({"schedule": "rsqrt", "warmup_steps": warmup, "steps": 20000, "min_lr_ratio": 0.0})
    peak = base / math.sqrt(warmup)
    for step in (0, 1, warmup // 2, warmup - 1, warmup, 2 * warmup, 5 * warmup + 7):
        assert peak * lr_multiplier(cfg, step) == pytest.approx(lra_learning_rate(step, base=base, warmup=warmup))
    cosine = OmegaConf.create({"warmup_steps": 10, "steps": 100, "min_lr_ratio": 0.1})
    assert lr_multiplier(cosine, 100) == pytest.approx(0.1)  # the default schedule is unchanged


def test_decay_all_reaches_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    matrices = {len(g["params"]): g["weight_decay"] for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    assert sorted(matrices.items()) == [(1, 0.1), (3, 0.0)]  # the weight / the bias, norm weight and bias
    every = param_groups(model, lr=1e-3, weight_decay=0.1, decay="all")
    assert len(every) == 1 and every[0]["weight_decay"] == 0.1 and len(every[0]["params"]) == 4


def test_the_keys_are_validated_and_hashed_only_when_changed():
    cfg = compose_config(["model=transformer", "task=mqar"])
    for key, bad in (("schedule", "linear"), ("test_weights", "final"), ("decay", "some"), ("eps", 0)):
        wrong = cfg.copy()
        wrong.trainer[key] = bad
        with pytest.raises(ConfigError, match=f"trainer.{key}"):
            check_config(wrong)
    before = config_hash(result_config(cfg))
    older = OmegaConf.create(OmegaConf.to_container(cfg))  # a config of before: no struct flag
    for key in ("schedule", "eps", "decay", "test_weights"):
        del older.trainer[key]
    assert config_hash(result_config(older)) == before  # records from before these keys keep their hash
    changed = cfg.copy()
    changed.trainer.schedule = "rsqrt"
    assert config_hash(result_config(changed)) != before


def test_lra_table1_trains_as_the_release():
    cfg = compose_config(["experiment=lra_table1", "model=transformer", "task=retrieval"])
    t = cfg.trainer
    assert (t.schedule, t.eps, t.decay, t.grad_clip, t.test_weights) == ("rsqrt", 1e-9, "all", None, "last")
    # retrieval: warm-up 8000 over 5000 steps, ending at 0.05 * 5000 / 8000 / sqrt(8000) = 3.5e-4
    assert t.lr * lr_multiplier(t, t.steps) == pytest.approx(lra_learning_rate(5000, base=0.05, warmup=8000), rel=1e-3)
