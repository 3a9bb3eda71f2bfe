"""Config values checked before anything is built: a typed schema per node (pydantic), so that a
bad value is reported by its key, its value and what is allowed, not by torch or a ZeroDivisionError
deep inside a run.

    trainer.batch_size=0: Input should be greater than 0
    trainer.lr='abc': Input should be a valid number, unable to parse string as a number

Only keys that every run reads, or that a model family shares, are typed here; a model's own
knobs are checked by its constructor, whose errors name ``model.<key>`` as well. Unknown extra
keys are allowed (a study may add its own).
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from omegaconf import DictConfig, OmegaConf
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from architectures.layers import NORMS
from harness.measure import PRECISIONS
from harness.runtime import ALLOCATORS

Probability = pydantic.confloat(ge=0.0, lt=1.0)
Beta = pydantic.confloat(ge=0.0, lt=1.0)


class Schema(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")


class TrainerSchema(Schema):
    steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat = pydantic.Field(allow_inf_nan=False)
    weight_decay: NonNegativeFloat
    betas: tuple[Beta, Beta]
    warmup_steps: NonNegativeInt
    min_lr_ratio: pydantic.confloat(ge=0.0, le=1.0)
    grad_clip: NonNegativeFloat | None
    eval_every: PositiveInt
    eval_batches: PositiveInt | None
    eval_batch_size: PositiveInt | None
    log_every: PositiveInt
    checkpoint_every: PositiveInt
    time_limit_s: PositiveFloat | None
    device: str
    threads: PositiveInt | None
    allocator: Literal[ALLOCATORS] = "tuned"
    precision: Literal[PRECISIONS]
    progress: bool
    devices: PositiveInt = 1
    ddp_timing: bool = False
    compile: bool = False
    activation_checkpointing: bool = False
    schedule: Literal["cosine", "rsqrt"] = "cosine"
    eps: PositiveFloat = 1e-8
    decay: Literal["matrices", "all"] = "matrices"
    test_weights: Literal["best", "last"] = "best"


class MixerSchema(Schema):
    n_heads: PositiveInt | None = None
    dropout: Probability | None = None
    d_state: PositiveInt | None = None
    window: PositiveInt | None = None
    block_size: PositiveInt | None = None
    chunk_size: PositiveInt | None = None
    n_features: PositiveInt | None = None
    k: PositiveInt | None = None


class ModelSchema(Schema):
    name: str
    d_model: PositiveInt | None = None
    d_hidden: PositiveInt | None = None
    n_layers: PositiveInt | None = None
    n_heads: PositiveInt | None = None
    d_ff: NonNegativeInt | None = None
    dropout: Probability | None = None
    norm: Literal[NORMS] | None = None
    prenorm: bool | None = None
    mem_len: NonNegativeInt | None = None
    seg_len: PositiveInt | None = None
    mixer: MixerSchema | None = None


class TaskSchema(Schema):
    name: str
    seq_len: PositiveInt | None = None
    n_train: PositiveInt | None = None
    n_val: PositiveInt | None = None
    n_test: PositiveInt | None = None


class LoggerSchema(Schema):
    name: Literal["wandb", "none"]
    mode: Literal["offline", "online", "disabled"] | None = None
    timeout_s: PositiveFloat | None = None


MATCHING_RULES = ("none", "equal_width", "as_published")


class MatchingSchema(Schema):
    """How a study matches the models it compares (conf/study/none.yaml)."""
    rule: Literal[MATCHING_RULES]


SCHEMAS: dict[str, type[Schema]] = {
    "trainer": TrainerSchema, "model": ModelSchema, "task": TaskSchema, "logger": LoggerSchema,
    "matching": MatchingSchema,
}


class ConfigError(ValueError):
    """One or more config values are out of range or of the wrong type; the message names each."""


def config_problems(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """``key=value: what is allowed`` for every bad value of the nodes in :data:`SCHEMAS` and
    ``seed`` (an empty list: the config is fine)."""
    resolved = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    problems = []
    for node, schema in SCHEMAS.items():
        if node not in resolved:
            continue
        try:
            schema.model_validate(resolved[node])
        except pydantic.ValidationError as e:
            problems += [describe(node, err) for err in e.errors()]
    if "seed" in resolved and (isinstance(resolved["seed"], bool) or not isinstance(resolved["seed"], int)):
        problems.append(f"seed={resolved['seed']!r}: a seed is an integer")
    return problems + matching_problems(resolved)


def matching_problems(resolved: dict[str, Any]) -> list[str]:
    """A model off the study's width under ``matching.rule=equal_width``."""
    rule = (resolved.get("matching") or {}).get("rule")
    width, size = (resolved.get("model") or {}).get("d_model"), (resolved.get("size") or {}).get("d_model")
    if rule != "equal_width" or width is None or size is None or width == size:
        return []
    return [f"model.d_model={width!r}: the study's matching.rule=equal_width gives every model its width "
            f"size.d_model={size!r}; set the width through size.d_model, or another matching.rule "
            f"(none, as_published)"]


def describe(node: str, err: dict) -> str:
    key = ".".join([node, *(str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained-")))])
    return f"{key}={err['input']!r}: {err['msg']}"


def check_config(cfg: DictConfig | dict[str, Any]) -> None:
    """Raise :class:`ConfigError` listing every bad value (see :func:`config_problems`)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("bad config value(s):\n" + "\n".join(f"  {p}" for p in problems))
