"""The model and task contracts, checked for every yaml that exists (timm-style discovery):
a new architecture or task is covered the moment its yaml lands.

Models are built at tiny sizes from their own yaml; inputs are random tokens of the task's shape,
so no data needs to be downloaded or generated here (each task's own tests cover its data).
"""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from architectures.layers import SCORE_POSITIONALS, UnsupportedTask
from harness.api import compose_config
from harness.config import CONF_DIR, instantiate_without_name
from tasks.base import TaskSpec, random_batch

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def takes_score_positions(model_name: str) -> bool:
    """Whether the model's mixer takes ``positional`` (rope, alibi, t5, xpos): softmax attention."""
    target = OmegaConf.select(OmegaConf.load(CONF_DIR / "model" / f"{model_name}.yaml"), "mixer._target_")
    return target is not None and "positional" in inspect.signature(get_class(target)).parameters


SCORE_MODELS = [m for m in MODELS if takes_score_positions(m)]

# Tiny sizes: the shared ones through `size` (what every model reads unless its yaml fixes a
# size), and these keys wherever a model yaml sets them itself.
TINY_SIZE = ["size.d_model=32", "size.n_layers=2", "size.n_heads=2"]
TINY_MODEL = {"d_model": 32, "d_hidden": 32, "n_layers": 2, "d_ff": 64, "d_state": 8,
              "mixer.n_heads": 2, "n_heads": 2, "seg_len": 16, "mem_len": 16,
              "mixer.block_size": 8, "mixer.window": 16, "mixer.w": 16, "mixer.n_features": 32, "mixer.k": 16,
              "mixer.chunk_size": 8, "mixer.d_state": 8, "mixer.chunk_len": 8, "mixer.stride": 8, "mixer.c": 2}
TINY_TASK = {"n_train": 16, "n_val": 8, "n_test": 8}  # seq_len kept: some tasks fix it

# Hand-made specs for the invariance tests (no data needed).
SPECS = {
    "classify": TaskSpec(kind="classify", vocab_size=20, n_outputs=5, seq_len=40),
    "pair": TaskSpec(kind="pair", vocab_size=20, n_outputs=2, seq_len=40),
    "lm": TaskSpec(kind="lm", vocab_size=20, n_outputs=20, seq_len=40),
    "seq2seq": TaskSpec(kind="seq2seq", vocab_size=20, n_outputs=20, seq_len=24, target_len=16,
                        bos_id=1, sep_id=2),
}


def tiny_overrides(group: str, name: str, table: dict) -> list[str]:
    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    out = []
    for key, value in table.items():
        current = OmegaConf.select(node, key, default=None, throw_on_resolution_failure=False)
        if current is None or isinstance(current, str):
            continue
        if key == "d_ff" and current == 0:
            continue  # a model without feed-forward (e.g. Mamba) keeps none
        out.append(f"{group}.{key}={value}")
    return out


@functools.lru_cache(maxsize=None)
def composed(*overrides: str):
    """``compose_config(overrides)``, once per distinct overrides: composing takes longer than
    building and running a tiny model, and the tests share compositions (none mutates one)."""
    return compose_config(list(overrides))


def tiny_model(model_name: str) -> list[str]:
    return [f"model={model_name}", *TINY_SIZE, *tiny_overrides("model", model_name, TINY_MODEL)]


def tiny_task(task_name: str) -> list[str]:
    return [f"task={task_name}", *tiny_overrides("task", task_name, TINY_TASK)]


def build_for_spec(model_name: str, spec: TaskSpec, *overrides: str) -> torch.nn.Module:
    cfg = composed(*tiny_model(model_name), "task=mqar", f"task.seq_len={spec.seq_len}", *overrides)
    torch.manual_seed(0)
    return instantiate_without_name(cfg.model, spec=spec).eval()


def out_shape(spec: TaskSpec, batch_size: int, seq_len: int) -> tuple[int, ...]:
    if spec.kind in ("classify", "pair"):
        return (batch_size, spec.n_outputs)
    if spec.kind == "lm":
        return (batch_size, seq_len, spec.n_outputs)
    return (batch_size, spec.target_len, spec.n_outputs)


def pair_config(model_name: str, task_name: str):
    """``model=<model_name> task=<task_name>`` at tiny sizes, from one composition per model and
    one per task rather than one per pair: the model's config with the task's node put in. That is
    the config Hydra composes for the pair, since a model or task yaml writes only its own package
    and an interpolation such as ``${task.seq_len}`` resolves in the pair (checked below)."""
    cfg = copy.deepcopy(composed(*tiny_model(model_name)))
    cfg.task = composed(*tiny_task(task_name)).task
    return cfg


def test_a_pair_config_is_what_hydra_composes_for_the_pair():
    pair = compose_config([*tiny_model("linformer"), *tiny_task("text")])  # linformer reads task.seq_len
    assert OmegaConf.to_container(pair_config("linformer", "text"), resolve=True) == \
        OmegaConf.to_container(pair, resolve=True)


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_model_task_pair_composes_and_runs(model_name, task_name):
    cfg = pair_config(model_name, task_name)
    assert cfg.model.name == model_name and cfg.task.name == task_name
    task = instantiate_without_name(cfg.task)  # building a task must not load any data yet
    spec = task.spec
    try:
        model = instantiate_without_name(cfg.model, spec=spec).eval()
    except UnsupportedTask as e:
        assert str(e), "an unsupported pairing must say why"
        return
    seq_len = min(spec.seq_len, 64)
    batch = random_batch(spec, 2, seq_len=seq_len, padded=not spec.causal)
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == out_shape(spec, 2, seq_len)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_batch_independence(model_name, kind):
    """A sample's output does not depend on the other samples in its batch."""
    spec = SPECS[kind]
    try:
        model = build_for_spec(model_name, spec)
    except UnsupportedTask:
        return
    batch = random_batch(spec, 4, seed=1, padded=kind != "lm")
    with torch.no_grad():
        together = model(batch)
        alone = model({k: v[:1] for k, v in batch.items()})
    torch.testing.assert_close(together[:1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("kind", ["classify", "pair"])
def test_padding_invariance(model_name, kind, overrides=()):
    """Extra pad tokens on the right do not change a prediction."""
    spec = SPECS[kind]
    try:
        model = build_for_spec(model_name, spec, *overrides)
    except UnsupportedTask:
        return
    short = random_batch(spec, 2, seed=2, seq_len=24, padded=True)
    longer = {k: torch.nn.functional.pad(v, (0, 16), value=spec.pad_id) if v.ndim == 2 else v
              for k, v in short.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(short), model(longer), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_a_cls_token_is_prepended_and_pooled(positional):
    """model.pooling=cls_token (LRA's CLS token): padding still changes nothing, learned positions
    cover the extra token, and the prediction reads the token (changing it changes the output)."""
    overrides = ("model.pooling=cls_token", f"model.positional={positional}")
    for kind in ("classify", "pair"):
        test_padding_invariance("transformer", kind, overrides=overrides)
    model = build_for_spec("transformer", SPECS["classify"], *overrides)
    batch = random_batch(SPECS["classify"], 2, seed=3, padded=True)
    with torch.no_grad():
        before = model(batch)
        model.cls.add_(torch.randn_like(model.cls))  # (a uniform shift would vanish in LayerNorm)
        assert not torch.allclose(model(batch), before)
    with pytest.raises(ValueError, match="model.pooling must be one of"):
        build_for_spec("transformer", SPECS["classify"], "model.pooling=CLS")


@pytest.mark.parametrize("model_name", MODELS)
def test_causality_lm(model_name, overrides=()):
    """Changing token t leaves every output before t unchanged."""
    spec = SPECS["lm"]
    try:
        model = build_for_spec(model_name, spec, *overrides)
    except UnsupportedTask:
        return
    batch = random_batch(spec, 2, seed=3)
    t = 25
    changed = {k: v.clone() for k, v in batch.items()}
    changed["tokens"][:, t:] = (changed["tokens"][:, t:] % (spec.vocab_size - 2)) + 1
    with torch.no_grad():
        a, b = model(batch), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t:], b[:, t:]), "the changed tokens must matter"


@pytest.mark.parametrize("model_name", MODELS)
def test_causality_seq2seq(model_name):
    """A target position's logits do not depend on later target tokens (teacher forcing)."""
    spec = SPECS["seq2seq"]
    try:
        model = build_for_spec(model_name, spec)
    except UnsupportedTask:
        return
    batch = random_batch(spec, 2, seed=4)
    j = 6
    changed = {k: v.clone() for k, v in batch.items()}
    changed["target"][:, j:] = (changed["target"][:, j:] % (spec.vocab_size - 3)) + 3
    with torch.no_grad():
        a, b = model(batch), model(changed)
    # logits at j predict target[j] from target[:j]: positions <= j are unaffected
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positional", SCORE_POSITIONALS)
@pytest.mark.parametrize("model_name", SCORE_MODELS)
def test_causality_and_padding_with_score_positions(model_name, positional):
    """The same invariances with every position inside attention, for every softmax mixer; a mixer
    whose attention cannot take one (a score bias on LSH buckets or sorted blocks) refuses it by
    name when it is built."""
    assert {"transformer", "sparse_transformer"} <= set(SCORE_MODELS)
    try:
        test_causality_lm(model_name, overrides=(f"model.positional={positional}",))
        test_padding_invariance(model_name, "classify", overrides=(f"model.positional={positional}",))
    except ValueError as e:
        assert f"model.positional={positional} is not available for" in str(e), e


def test_the_api_build_docstring_example_runs():
    import doctest

    import harness.api

    result = doctest.testmod(harness.api, raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0, "see the doctest output above"
