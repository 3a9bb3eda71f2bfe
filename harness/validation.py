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


MATCHING_RULES = ("none", "equal_size", "as_published")
# The keys an equal_size study gives every model: model.<key> must be size.<key>.
EQUAL_SIZE_KEYS = ("d_model", "n_layers")


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
    """A model off the study's width or depth under ``matching.rule=equal_size``."""
    if (resolved.get("matching") or {}).get("rule") != "equal_size":
        return []
    model, size = resolved.get("model") or {}, resolved.get("size") or {}
    return [f"model.{key}={model[key]!r}: the study's matching.rule=equal_size gives every model "
            f"size.{key}={size[key]!r}; set it through size.{key}, or another matching.rule "
            f"(none, as_published)"
            for key in EQUAL_SIZE_KEYS
            if model.get(key) is not None and size.get(key) is not None and model[key] != size[key]]


def describe(node: str, err: dict) -> str:
    key = ".".join([node, *(str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained-")))])
    return f"{key}={err['input']!r}: {err['msg']}"


def check_config(cfg: DictConfig | dict[str, Any]) -> None:
    """Raise :class:`ConfigError` listing every bad value (see :func:`config_problems`)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("bad config value(s):\n" + "\n".join(f"  {p}" for p in problems))
