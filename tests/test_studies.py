

# ---- Bahdanau length curve, Transformer-XL memory, LRA Table 1 (issue 10, items 1, 5, 6) ----
from pathlib import Path as _Path

import yaml as _yaml
from omegaconf import OmegaConf as _OmegaConf

from hydra import compose as _compose, initialize_config_dir as _initialize_config_dir

from harness.api import compose_config as _compose_config
from harness.config import CONF_DIR as _CONF_DIR, register_resolvers as _register_resolvers
from harness.claims import load_claims as _load_claims

_ROOT = _Path(__file__).resolve().parents[1]


def _sweep_overrides(experiment: str) -> list[list[str]]:
    """Overrides that give every value the experiment's multirun sweeps at least once (the
    i-th combination takes value i modulo each axis' length; the full product is slow)."""
    text = (_ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    params = _yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    axes = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    return [[axis[i % len(axis)] for axis in axes] for i in range(max(map(len, axes)))]


def _composed(experiment: str, extra=()) -> list:
    """Compose (as arena-train would) every swept combination, with every value resolved."""
    _register_resolvers()
    cfgs = []
    with _initialize_config_dir(config_dir=str(_CONF_DIR), version_base="1.3"):
        for overrides in _sweep_overrides(experiment):
            cfg = _compose(config_name="config",
                           overrides=[f"experiment={experiment}", *overrides, *extra])
            _OmegaConf.resolve(cfg)  # every interpolation (per-task sizes, min_len) resolves
            cfgs.append(cfg)
    return cfgs


def test_bahdanau_length_curve_experiments_compose():
    for experiment, lengths in [("bahdanau_length_curve", list(range(10, 101, 10))),
                                ("bahdanau_length_curve_cpu", [8, 16, 32, 48])]:
        cfgs = _composed(experiment)
        assert {c.model.name for c in cfgs} == {"lstm", "lstm_bahdanau", "lstm_luong", "transformer"}
        assert sorted({c.task.seq_len for c in cfgs}) == lengths
        for c in cfgs:  # one length per run: every source exactly seq_len long
            assert c.task.name == "reverse" and c.task.min_len == c.task.seq_len
            assert c.sweep.name == experiment
    _load_claims(_ROOT / "results/published/claims_bahdanau_length_curve.yaml")


def test_txl_memory_experiments_compose():
    for experiment, extra in [("txl_memory", ["task.path=/data/enwik8"]), ("txl_memory_cpu", [])]:
        cfgs = _composed(experiment, extra)
        assert sorted(c.model.mem_len for c in cfgs)[0] == 0 and max(c.model.mem_len for c in cfgs) > 0
        for c in cfgs:  # memory only helps within a sequence: at least 4 segments per sequence
            assert c.model.name == "transformer_xl" and c.task.name == "char_lm"
            assert c.task.seq_len % c.model.seg_len == 0 and c.task.seq_len // c.model.seg_len >= 4
    full = _compose_config(["experiment=txl_memory", "task.path=/data/enwik8"])
    assert (full.model.n_layers, full.model.d_model, full.model.seg_len) == (12, 512, 512)
    claims = _load_claims(_ROOT / "results/published/claims_txl_memory.yaml")
    assert claims[0]["where"]["config.sweep.name"] == ["txl_memory", "txl_memory_cpu"]


def test_lra_table1_experiments_compose():
    full = _composed("lra_table1", ["lra_data.lra_release=/d/lra_release"])
    assert len(full) == 13 and {c.task.name for c in full} == {
        "listops", "text", "retrieval", "image", "pathfinder"}
    for c in full:
        if c.task.name == "listops":  # released ListOps config: 6 layers, width 512
            assert (c.model.d_model, c.model.n_layers, c.trainer.steps) == (512, 6, 5000)
            assert c.task.data_dir == "/d/lra_release/listops-1000"
        if c.model.name == "transformer":
            assert c.model.d_ff == c.get("lra_table1_sizes")[c.task.name]["d_ff"]
    mini = _composed("lra_table1_mini")
    assert len(mini) == 13 and {c.task.name for c in mini} == {"listops", "pathfinder"}
    assert {c.task.source for c in mini} == {"generate"}
    assert {c.task.seq_len for c in mini} == {256, 1024}
    _load_claims(_ROOT / "results/published/claims_lra_table1.yaml")
