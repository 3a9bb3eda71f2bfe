"""Config plumbing shared by the entry points: where the configs live, resolvers, building."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

def data_folder(in_checkout: str, in_package: str) -> Path:
    """A folder of data files: the checkout's own (``<repo>/<in_checkout>``, so that edits show
    at once), or, in an installed wheel, the copy packed inside ``harness/`` (pyproject.toml maps
    ``conf/`` to ``harness/conf`` and ``results/published/`` to ``harness/published``)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / in_checkout).is_dir():
        return checkout / in_checkout
    return here / in_package


CONF_DIR = data_folder("conf", "conf")
PUBLISHED_DIR = data_folder("results/published", "published")  # papers' numbers and claims

# What a result depends on: the resolved model, task, trainer and bench nodes and the seed. Every
# other top-level node (a study's size tables, `size`, data-folder tables, logger, sweep, hydra)
# matters only through the values it interpolates into these, so it stays out of config_hash
# and out of what makes two runs different settings.
RESULT_KEYS = ("model", "task", "trainer", "bench", "seed")
# trainer.allocator changes speed, not what is learnt; arena-bench puts it back in its hash
NON_RESULT_TRAINER_KEYS = ("device", "progress", "log_every", "checkpoint_every", "time_limit_s", "allocator")
# Trainer keys added after records existed: hashed only when set away from these values, so the
# records of before keep their config_hash (and a sweep does not rerun them).
LATER_TRAINER_DEFAULTS = {"compile": False, "activation_checkpointing": False, "schedule": "cosine",
                          "eps": 1e-8, "decay": "matrices", "test_weights": "best"}
# Model keys added the same way (LRA's released details, architectures/lra.py): the shared
# backbone's init, head, feed-forward activation and norm placement (S4's LRA configs), the
# attention mixers' qkv_dim, BigBird's pattern, the kernelised mixers' mask_padding, S4/S4D's dt_lr,
# S4D's train_B, the paper-or-released variant of Reformer, Sinkhorn and Performer, the
# Transformer's attention implementation, and the S4
# repository's pixel pipeline (linear encoder, tied and input dropout); Transformer-XL's reference
# options (its embedding scale and two more dropout sites; it reuses init, head, ffn_activation, prenorm)
LATER_MODEL_DEFAULTS = {"init": "default", "head": "default", "ffn_activation": "gelu", "prenorm": True,
                        "encoder": "embedding", "input_mean": 0.0, "input_std": 1.0, "tie_dropout": False,
                        "input_dropout": None, "embed_scale": False, "distance_dropout": False,
                        "output_dropout": False}
LATER_MIXER_DEFAULTS = {"qkv_dim": None, "pattern": "itc", "mask_padding": True, "dt_lr": None,
                        "train_B": False, "variant": "paper", "implementation": "sdpa"}
LATER_TASK_DEFAULTS = {"grayscale": "lra"}  # Image's conversion (the S4 repository's: pil)
NON_RESULT_TASK_KEYS = ("cache_dir",)  # generated data are cached under a key of their own
# Where a task reads its data: part of a run's identity (other data, another result), compared
# as absolute paths, since a relative one means another folder when run from elsewhere.
DATA_PATH_KEYS = ("data_dir", "path")
# bench.rounds and the paired timing of lengths: how precisely, not what, is measured; a record with
# fewer rounds than asked for is measured again (harness.bench.run_bench_claimed), one without the
# paired times asked for gets them (harness.bench.finish_paired)
NON_RESULT_BENCH_KEYS = ("timeout_s", "rounds", "paired_cycles", "paired_steps")


def run_dirname(overrides: str) -> str:
    """A folder name from a job's overrides: never empty, no path separators, at most 200 bytes
    (a long one keeps its start and gets a hash of the whole, so it stays unique)."""
    name = (overrides or "defaults").replace("/", "_")
    if len(name.encode()) > 200:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[:180].decode(errors="ignore") + "-" + digest
    return name


def model_names(search_path: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every option of the ``model`` config group, sorted: the yamls of ``conf/model/`` and of any
    config directory on Hydra's search path (``--config-dir``, or ``hydra.searchpath`` given as
    ``search_path``). Without an initialised Hydra, the yamls of ``conf/model/``."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    overrides = [f"hydra.searchpath=[{','.join(search_path)}]"] if search_path else []
    return sorted(GlobalHydra.instance().config_loader().get_group_options("model", overrides=overrides))


def sweep_models(exclude=None, *, _root_) -> str:
    """The sweep axis of a study over all models, comma-separated: every model name but those in
    ``exclude`` (``sweep.exclude_models``: a mapping of name to the reason it is left out)."""
    search_path = OmegaConf.select(_root_, "hydra.searchpath", default=None) or []
    names = model_names(list(search_path))
    excluded = dict(exclude or {})
    unknown = sorted(set(excluded) - set(names))
    if unknown:
        raise ValueError(f"sweep.exclude_models names {', '.join(unknown)}, which are not models; "
                         f"models are: {', '.join(names)}")
    return ",".join(name for name in names if name not in excluded)


def register_resolvers() -> None:
    """Resolvers used in conf/: ``arena_dirname`` names a run folder from its overrides;
    ``arena_models`` is the all-models sweep axis; ``arena_step_tag`` marks a compiled or
    checkpointed bench folder; ``arena_mul`` and ``arena_csv`` are helpers."""
    if not OmegaConf.has_resolver("arena_dirname"):
        OmegaConf.register_new_resolver("arena_dirname", run_dirname)
    if not OmegaConf.has_resolver("arena_mul"):
        # widths that follow d_model: d_ff: ${arena_mul:${.d_model},4}
        OmegaConf.register_new_resolver("arena_mul", lambda a, b: int(a * b))
    if not OmegaConf.has_resolver("arena_models"):
        # hydra.sweeper.params.model: ${arena_models:${sweep.exclude_models}}
        OmegaConf.register_new_resolver("arena_models", sweep_models)
    if not OmegaConf.has_resolver("arena_step_tag"):
        # bench folders: ...-fp32${arena_step_tag:${trainer.compile},${trainer.activation_checkpointing}}
        OmegaConf.register_new_resolver("arena_step_tag", step_tag)
    if not OmegaConf.has_resolver("arena_csv"):
        # a list as a sweep string: ${arena_csv:${quickstart.seeds}} -> "0,1,2"
        OmegaConf.register_new_resolver("arena_csv", lambda values: ",".join(str(v) for v in values))


def step_tag(compile: bool, activation_checkpointing: bool) -> str:
    """A bench folder's suffix for how the step runs: ``-compiled``, ``-ckpt``, both, or nothing at
    the defaults (so the folders of before keep their names)."""
    return ("-compiled" if compile else "") + ("-ckpt" if activation_checkpointing else "")


def instantiate_without_name(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` a model or task node, dropping its ``name`` label.

    ``kwargs`` (e.g. the task spec) are passed to the constructor as they are: building a
    partial first keeps Hydra from turning a dataclass argument into a config node.
    """
    from hydra.utils import instantiate

    container = OmegaConf.to_container(node, resolve=True)
    container.pop("name", None)
    factory = instantiate(OmegaConf.create(container), _partial_=True)
    return factory(**kwargs)


def result_config(cfg: DictConfig) -> dict:
    """The resolved config minus what does not change results (see ``RESULT_KEYS``)."""
    resolved = copy.deepcopy(OmegaConf.to_container(cfg, resolve=True))
    kept = {key: resolved[key] for key in RESULT_KEYS if key in resolved}
    for node, keys in (("trainer", NON_RESULT_TRAINER_KEYS), ("task", NON_RESULT_TASK_KEYS),
                       ("bench", NON_RESULT_BENCH_KEYS)):
        for key in keys:
            kept.get(node, {}).pop(key, None)
    trainer = kept.get("trainer", {})
    for node, defaults in ((trainer, LATER_TRAINER_DEFAULTS), (kept.get("model", {}), LATER_MODEL_DEFAULTS),
                           (kept.get("model", {}).get("mixer") or {}, LATER_MIXER_DEFAULTS),
                           (kept.get("task", {}), LATER_TASK_DEFAULTS)):
        for key, default in defaults.items():
            if key in node and node[key] == default:
                del node[key]
    task = kept.get("task", {})
    for key in DATA_PATH_KEYS:
        if isinstance(task.get(key), str):
            task[key] = os.path.abspath(os.path.expanduser(task[key]))
    return kept
