"""Config plumbing shared by the entry points: where the configs live, resolvers, building."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# The fields of a config that do not change results: excluded from config_hash.
NON_RESULT_KEYS = ("logger", "force", "sweep", "hydra", "quickstart")
NON_RESULT_TRAINER_KEYS = ("device", "progress", "log_every", "checkpoint_every", "time_limit_s")
NON_RESULT_TASK_KEYS = ("cache_dir", "data_dir")


def run_dirname(overrides: str) -> str:
    """A folder name from a job's overrides: never empty, no path separators, at most 200 bytes
    (a long one keeps its start and gets a hash of the whole, so it stays unique)."""
    name = (overrides or "defaults").replace("/", "_")
    if len(name.encode()) > 200:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[:180].decode(errors="ignore") + "-" + digest
    return name


def register_resolvers() -> None:
    """Resolvers used in conf/: ``arena_dirname`` names a run folder from its overrides."""
    if not OmegaConf.has_resolver("arena_dirname"):
        OmegaConf.register_new_resolver("arena_dirname", run_dirname)
    if not OmegaConf.has_resolver("arena_mul"):
        # widths that follow d_model: d_ff: ${arena_mul:${.d_model},4}
        OmegaConf.register_new_resolver("arena_mul", lambda a, b: int(a * b))
    if not OmegaConf.has_resolver("arena_csv"):
        # a list as a sweep string: ${arena_csv:${quickstart.seeds}} -> "0,1,2"
        OmegaConf.register_new_resolver("arena_csv", lambda values: ",".join(str(v) for v in values))


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
    """The resolved config minus what does not change results (paths, logger, run dir)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved = copy.deepcopy(resolved)
    for key in NON_RESULT_KEYS:
        resolved.pop(key, None)
    for key in NON_RESULT_TRAINER_KEYS:
        resolved.get("trainer", {}).pop(key, None)
    for key in NON_RESULT_TASK_KEYS:
        resolved.get("task", {}).pop(key, None)
    return resolved
