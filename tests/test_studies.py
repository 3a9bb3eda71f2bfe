

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


# ---- Mamba selective copying / induction heads, Zoology MQAR (issue 10, items 2, 3, 4) ----
import numpy as _np
import pytest as _pytest

from harness.api import build as _build

_MZ_ROOT = _Path(__file__).resolve().parents[1]
_MZ_STUDIES = ["mamba_selective_copying", "mamba_induction_heads", "zoology_mqar"]


def _mz_sweep_params(experiment: str) -> dict[str, list[str]]:
    text = (_MZ_ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    params = _yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    return {k: [v.strip() for v in str(values).split(",")] for k, values in params.items()}


@_pytest.mark.parametrize("experiment", [s + v for s in _MZ_STUDIES for v in ("", "_cpu")])
def test_mamba_zoology_experiments_compose_every_swept_model_and_length(experiment):
    params = _mz_sweep_params(experiment)
    for model in params["model"]:
        for seq_len in params.get("task.seq_len", [None]):
            overrides = [f"experiment={experiment}", f"model={model}", f"task={params['task'][0]}"]
            cfg = _compose_config(overrides + ([f"task.seq_len={seq_len}"] if seq_len else []))
            assert (cfg.sweep.name, cfg.model.name) == (experiment, model)
            task = _OmegaConf.to_container(cfg.task, resolve=True)
            if experiment.startswith("zoology_mqar"):  # Zoology's (64, 4), (128, 8), (256, 16)
                assert task["n_pairs"] == int(seq_len) // 16 and isinstance(task["n_pairs"], int)


def test_mamba_zoology_full_experiments_use_the_papers_settings():
    sc = _compose_config(["experiment=mamba_selective_copying", "model=mamba", "task=selective_copying"])
    assert (sc.task.seq_len, sc.task.vocab_size, sc.task.n_tokens) == (4096, 16, 16)
    assert (sc.model.n_layers, sc.model.d_model) == (2, 64)
    assert (sc.trainer.steps, sc.trainer.batch_size, sc.trainer.lr) == (400_000, 64, 1e-4)
    ih = _compose_config(["experiment=mamba_induction_heads", "model=transformer", "task=induction_heads"])
    assert ih.task.seq_len == 256 and max(ih.task.eval_seq_lens) == 2**14
    assert (ih.model.positional, ih.model.d_model, ih.model.d_ff) == ("learned", 128, 0)
    assert (ih.trainer.batch_size, ih.trainer.steps, ih.trainer.weight_decay) == (8, 204_800, 0.0)
    assert _mz_sweep_params("mamba_induction_heads")["trainer.lr"] == ["2e-4", "1e-3"]
    zq = _mz_sweep_params("zoology_mqar")
    assert zq["task.seq_len"] == ["64", "128", "256"]
    assert zq["model.d_model"] == ["64", "128", "256", "512"]
    assert [float(x) for x in zq["trainer.lr"]] == _pytest.approx(_np.logspace(-4, -2, 4), rel=1e-4)
    mq = _compose_config(["experiment=zoology_mqar", "model=transformer", "task=mqar"])
    assert (mq.task.vocab_size, mq.model.d_ff, mq.model.mixer.n_heads) == (8192, 0, 1)
    assert "64" in _mz_sweep_params("zoology_mqar_cpu")["model.d_model"]  # the claims' width


def test_mamba_induction_heads_models_match_the_papers_parameter_counts():
    counts = {}
    for model in ("mamba", "transformer"):
        built = _build(["experiment=mamba_induction_heads_cpu", f"model={model}",
                        "task=induction_heads", "task.eval_seq_lens=[]"])
        counts[model] = sum(p.numel() for name, p in built.model.named_parameters()
                            if not name.startswith("pos_embed"))
    # Table 11: Mamba 74K, MHA-Abs 137K parameters (positions aside); ours within 15%.
    assert counts["mamba"] == _pytest.approx(74_000, rel=0.15)
    assert counts["transformer"] == _pytest.approx(137_000, rel=0.15)


def test_mamba_zoology_claims_load_and_are_scoped_to_both_variants():
    for study in _MZ_STUDIES:
        claims = _load_claims(_MZ_ROOT / "results/published" / f"claims_{study}.yaml")
        assert claims
        for claim in claims:
            assert set(claim["where"]["config.sweep.name"]) == {study, f"{study}_cpu"}
