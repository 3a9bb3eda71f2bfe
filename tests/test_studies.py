"""The packaged studies (conf/study/, selected by conf/experiment/): every swept combination
composes and resolves, all-models sweeps pick up every model yaml with the study's sizes, and the
full-size studies carry the papers' settings."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_repository import ConfigRepository
from omegaconf import OmegaConf

from harness.api import build, compose_config
from harness.claims import claim_sides, load_claims
from harness.config import CONF_DIR, register_resolvers
from harness.validation import config_problems, matching_problems

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "results" / "published"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# arena-bench's experiments (conf/bench.yaml) are the speed sweeps; the rest are arena-train's.
BENCH_EXPERIMENTS = [e for e in EXPERIMENTS if "speed" in e]
REQUIRED = {e: ["task.path=/data/enwik8"] for e in ("txl_memory", "txl_enwik8")}  # the studies that need a data path
# The attention models' head count, wherever their yaml keeps it.
HEADS = ("mixer.n_heads", "n_heads")


def primary_config(experiment: str) -> str:
    return "bench" if experiment in BENCH_EXPERIMENTS else "config"


# Every yaml file as Hydra loaded it (with its defaults list), by (search path, file): a study
# composes its 13-120 jobs from the same few dozen files, and reading and parsing them again for
# each job was two fifths of the time of composing it. Hydra itself reuses these results within
# one composition (CachingConfigRepository); this reuses them across compositions, in this module
# only, each composition getting its own copy (Hydra changes the configs it loads as it merges).
_LOADED: dict = {}
_load_config = ConfigRepository.load_config


def _load_config_once(self, config_path):
    key = (tuple(source.path for source in self.sources), config_path)
    if key not in _LOADED:
        _LOADED[key] = _load_config(self, config_path)
    return copy.deepcopy(_LOADED[key])


@contextlib.contextmanager
def config_files_loaded_once():
    with mock.patch.object(ConfigRepository, "load_config", _load_config_once):
        yield


@pytest.fixture(autouse=True, scope="module")
def _config_files_loaded_once():
    """The same for the compositions of harness.api (compose_config, build) in this module."""
    with config_files_loaded_once():
        yield


def compose_with_hydra(experiment: str, overrides=(), search_path: Path | None = None):
    """The config arena-train/arena-bench would compose, with its hydra node (the sweep axes)."""
    register_resolvers()
    extra = [f"hydra.searchpath=[file://{search_path}]"] if search_path else []
    with config_files_loaded_once(), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=primary_config(experiment), return_hydra_config=True,
                      overrides=[f"experiment={experiment}", *REQUIRED.get(experiment, []),
                                 *extra, *overrides])
        # resolve the axes while Hydra is initialised: the all-models axis reads its search path
        axes = {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.get("params") or {}).items()}
    return cfg, axes


@functools.cache
def swept(experiment: str) -> list:
    """Every (model, task) job of the experiment's sweep, and every value of its other axes at
    least once (they take their values in turn), composed as the sweep would and with every
    interpolation resolved."""
    _, axes = compose_with_hydra(experiment)
    fixed = {k: v for k, v in axes.items() if k not in ("model", "task")}
    combos = list(itertools.product(axes.get("model", [None]), axes.get("task", [None])))
    cfgs = []
    for i in range(max([len(combos), *map(len, fixed.values())])):
        model, task = combos[i % len(combos)]
        overrides = [f"{k}={v[i % len(v)]}" for k, v in fixed.items()]
        overrides += [f"model={model}"] * (model is not None) + [f"task={task}"] * (task is not None)
        cfg, _ = compose_with_hydra(experiment, overrides)
        cfg = OmegaConf.to_container(cfg)
        cfg.pop("hydra")
        cfg = OmegaConf.create(cfg)
        OmegaConf.resolve(cfg)  # raises on any value that does not resolve
        cfgs.append(cfg)
    return cfgs


def heads(model_cfg) -> int | None:
    for key in HEADS:
        value = OmegaConf.select(model_cfg, key, default=None)
        if value is not None:
            return value
    return None


# The studies that sweep every model: 13 to 65 (model, task) jobs each, 2-10 s of composing
# each, so their job-by-job checks are in the slow tier (the fast tier composes one job of each).
ALL_MODELS_STUDIES = ("quickstart", "quickstart_speed", "lra_table1", "lra_table1_mini",
                      "lra_speed", "lra_speed_cpu", "speed_scaling_cpu")


def tiered(experiments) -> list:
    return [pytest.param(e, marks=pytest.mark.slow) if e in ALL_MODELS_STUDIES else e for e in experiments]


# The all-models studies whose attention models must all get the Transformer's head count (or the
# per-model count their by_model sets: lra_table1's image and pathfinder configs). Checked
# on the same composed jobs as the test below (composing lra_table1 takes most of a minute, and
# xdist workers do not share swept()'s cache).
SAME_HEADS_STUDIES = ("lra_table1", "lra_table1_mini", "quickstart")


@pytest.mark.parametrize("experiment", tiered(e for e in EXPERIMENTS if e != "lr_search"))
def test_every_swept_job_composes_and_resolves(experiment):
    cfgs = swept(experiment)
    assert cfgs
    for cfg in cfgs:
        assert cfg.sweep.name == experiment
        if experiment.startswith("zoology_mqar"):  # Zoology's (64, 4), (128, 8), (256, 16)
            assert cfg.task.n_pairs == cfg.task.seq_len // 16 and isinstance(cfg.task.n_pairs, int)
    if experiment in SAME_HEADS_STUDIES:
        every_attention_model_gets_the_transformers_heads(cfgs)
    # a study that compares models says how it matches them, and its jobs keep to it
    rules = {cfg.matching.rule for cfg in cfgs}
    if len({cfg.model.name for cfg in cfgs}) > 1:
        assert len(rules) == 1 and rules != {"none"}, (experiment, rules)
    assert [p for cfg in cfgs for p in matching_problems(OmegaConf.to_container(cfg, resolve=True))] == []


def test_an_equal_size_study_refuses_a_model_off_its_width_or_depth():
    cfg = compose_config(["experiment=quickstart", "model=mamba", "model.d_model=32"])
    (problem,) = config_problems(cfg)
    assert "model.d_model=32" in problem and "matching.rule=equal_size" in problem and "size.d_model=64" in problem
    (problem,) = config_problems(compose_config(["experiment=quickstart", "model=lstm", "model.n_layers=1"]))
    assert "model.n_layers=1" in problem and "size.n_layers=2" in problem
    assert config_problems(compose_config(["experiment=quickstart", "model=mamba", "size.d_model=32"])) == []
    assert config_problems(compose_config(["model=mamba", "model.d_model=32"])) == []  # no study, no rule


def test_the_lstms_follow_the_studys_depth_and_the_bahdanau_study_keeps_rnnsearchs():
    assert compose_config(["experiment=quickstart", "model=lstm", "size.n_layers=3"]).model.n_layers == 3
    assert compose_config(["experiment=quickstart", "model=lstm_attn_readout"]).model.n_layers == 2
    for model in ("lstm", "lstm_bahdanau", "lstm_luong"):
        assert compose_config(["experiment=bahdanau_length_curve_cpu", f"model={model}"]).model.n_layers == 1


@functools.cache
def all_models_experiments() -> tuple[str, ...]:
    out = []
    for experiment in EXPERIMENTS:
        if experiment == "lr_search":
            continue
        cfg, axes = compose_with_hydra(experiment)
        raw = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False).get("model", "")
        if "arena_models" in str(raw):
            out.append(experiment)
    return tuple(out)


def test_the_all_models_studies_are_the_ones_expected():
    assert set(all_models_experiments()) == set(ALL_MODELS_STUDIES)


TOY_MODEL = """\
# a throwaway attention model, as a contributor would add one: the shared backbone and a mixer
defaults:
  - /backbone@_here_: sequence_model
  - _self_

name: zz_toy
mixer:
  _target_: architectures.attention.MultiHeadAttention
  _partial_: true
  n_heads: ${size.n_heads}
  dropout: 0.0
"""


def test_a_new_model_yaml_joins_every_all_models_study_with_the_studys_sizes(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "zz_toy.yaml").write_text(TOY_MODEL)
    studies = all_models_experiments()
    for experiment in studies:
        _, axes = compose_with_hydra(experiment, search_path=tmp_path)
        assert "zz_toy" in axes["model"], experiment
        assert set(axes["model"]) >= {"transformer", "mamba", "lstm"}
        # one task per study: per-task sizes reach every model the same way (the LRA test checks
        # them task by task)
        task_override = [f"task={axes['task'][-1]}"] if "task" in axes else []
        toy, _ = compose_with_hydra(experiment, ["model=zz_toy", *task_override], tmp_path)
        ref, _ = compose_with_hydra(experiment, ["model=transformer", *task_override], tmp_path)
        for key in ("d_model", "n_layers", "d_ff", "dropout", "mixer.n_heads"):
            assert OmegaConf.select(toy.model, key, throw_on_missing=True) == \
                OmegaConf.select(ref.model, key, throw_on_missing=True), (experiment, key)
    assert len(studies) == len(ALL_MODELS_STUDIES)


def every_attention_model_gets_the_transformers_heads(cfgs) -> None:
    """In a study's composed jobs, every attention model on a task has the Transformer's heads,
    except where the study's by_model gives a model its own (LRA's per-model image and pathfinder
    configs): there it has those."""
    by_task: dict[str, dict[str, int]] = {}
    for cfg in cfgs:
        if heads(cfg.model) is not None:
            by_task.setdefault(cfg.task.name, {})[cfg.model.name] = heads(cfg.model)
    by_model = OmegaConf.to_container(cfgs[0].by_model) if "by_model" in cfgs[0] else {}
    own = {task: {model: sizes["n_heads"] for model, sizes in models.items() if "n_heads" in sizes}
           for task, models in by_model.items()}
    for task, counts in by_task.items():
        expected = {model: own.get(task, {}).get(model, counts["transformer"]) for model in counts}
        assert counts == expected, task
        assert len(counts) >= 8, counts  # transformer, sparse, linear families and Transformer-XL


def test_an_excluded_model_leaves_the_axis_and_an_unknown_name_is_an_error():
    _, axes = compose_with_hydra("quickstart", ["+sweep.exclude_models={linformer: causal tasks only}"])
    assert "linformer" not in axes["model"] and "transformer" in axes["model"]
    with pytest.raises(Exception, match="not models; models are: .*transformer"):
        compose_with_hydra("quickstart", ["+sweep.exclude_models={nosuchmodel: typo}"])


def test_full_and_cpu_variants_share_the_study():
    for study in ("bahdanau_length_curve", "mamba_induction_heads", "mamba_selective_copying",
                  "txl_memory", "zoology_mqar", "position_extrapolation"):
        full, _ = compose_with_hydra(study)
        cpu, _ = compose_with_hydra(f"{study}_cpu")
        assert full.hydra.runtime.choices.study == cpu.hydra.runtime.choices.study == study


# --------------------------------------------------------------------------- the papers' settings


def test_bahdanau_length_curve_sizes_and_lengths():
    for experiment, lengths in [("bahdanau_length_curve", list(range(10, 101, 10))),
                                ("bahdanau_length_curve_cpu", [8, 16, 32, 48])]:
        cfgs = swept(experiment)
        models = {"lstm", "lstm_bahdanau"} | ({"lstm_luong", "transformer"} if experiment.endswith("curve") else set())
        assert {c.model.name for c in cfgs} == models
        for c in cfgs:  # one length per run: every source exactly seq_len long
            assert c.task.name == "reverse" and c.task.min_len == c.task.seq_len
        _, axes = compose_with_hydra(experiment)
        assert [int(x) for x in axes["task.seq_len"]] == lengths
    full = {c.model.name: c.model for c in swept("bahdanau_length_curve")}
    assert (full["lstm_bahdanau"].d_model, full["lstm_bahdanau"].d_hidden) == (620, 1000)
    assert (full["transformer"].d_model, full["transformer"].n_layers, heads(full["transformer"])) == (512, 6, 8)
    cpu = {c.model.name: c.model for c in swept("bahdanau_length_curve_cpu")}
    assert (cpu["lstm"].d_model, cpu["lstm"].d_hidden, cpu["lstm_bahdanau"].d_hidden) == (64, 64, 64)
    assert {c.seed for c in swept("bahdanau_length_curve_cpu")} == {0, 1, 2}
    load_claims(PUBLISHED / "claims_bahdanau_length_curve.yaml")


def test_txl_memory_sizes():
    for experiment in ("txl_memory", "txl_memory_cpu"):
        cfgs = swept(experiment)
        assert sorted(c.model.mem_len for c in cfgs)[0] == 0 and max(c.model.mem_len for c in cfgs) > 0
        for c in cfgs:  # the paper's setting: memory carried across consecutive batches of streams
            assert c.model.name == "transformer_xl" and c.task.name == "char_lm" and c.model.stream
            assert c.task.seq_len % c.model.seg_len == 0
    full = compose_config(["experiment=txl_memory", "task.path=/data/enwik8"])
    assert (full.model.n_layers, full.model.d_model, full.model.n_heads, full.model.d_ff) == (12, 512, 8, 2048)
    assert full.model.seg_len == full.model.mem_len == full.task.seq_len == 512
    # run_enwik8_base.sh: dropatt 0.0, shared u/v (MemTransformerLM), eval tgt_len 80 mem_len 2100
    # clamp_len 820 same_length; train.py: 10 evaluation streams
    m = full.model
    assert (m.dropout, m.dropatt, m.untie_r) == (0.1, 0.0, False)
    assert (m.eval_seg_len, m.eval_mem_len, m.eval_clamp_len, m.eval_same_length) == (80, 2100, 820, True)
    assert full.trainer.eval_batch_size == 10
    cpu = compose_config(["experiment=txl_memory_cpu"])
    assert (cpu.task.source, cpu.task.path, cpu.model.d_model) == ("generate", None, 64)
    claims = load_claims(PUBLISHED / "claims_txl_memory.yaml")
    assert claims[0]["experiment"] == ["txl_memory", "txl_memory_cpu"]


def test_lra_table1_uses_the_released_per_task_sizes():
    # the released Transformer configs at cd31e5c (ListOps 8d3dc39; image and pathfinder ee6649e)
    released = {"listops": (512, 4, 8, 1024, 5000), "text": (256, 4, 4, 1024, 20000),
                "retrieval": (128, 4, 4, 512, 5000), "image": (128, 1, 8, 128, 35000),
                "pathfinder": (32, 4, 4, 32, 62400)}
    for task, expected in released.items():
        for model in ("transformer", "transformer_xl", "s4d") + (("performer",) if task != "pathfinder" else ()):
            c = compose_config(["experiment=lra_table1", f"task={task}", f"model={model}",
                                "lra_data.lra_release=/d/lra_release"])
            got = (c.model.d_model, c.model.n_layers, heads(c.model) or expected[2], c.model.d_ff or expected[3],
                   c.trainer.steps)
            assert got == expected, (task, model, got)
    # the image and pathfinder configs that size a model on their own (<model>_base.py at cd31e5c):
    # width, depth, heads, mlp_dim, qkv_dim, dropout, pooling
    own = {("image", "reformer"): (64, 4, 8, 64, None, 0.3, "cls_token"),  # the released LSH ignores qkv_dim
           ("image", "longformer"): (128, 4, 4, 128, 64, 0.3, "mean"),
           ("image", "block_local"): (128, 1, 2, 128, 64, 0.3, "mean"),
           ("image", "linformer"): (128, 1, 8, 128, 64, 0.3, "cls_token"),  # = the Transformer's
           ("pathfinder", "performer"): (32, 4, 8, 32, 16, 0.2, "mean"),
           ("pathfinder", "linear_transformer"): (128, 1, 2, 128, 64, 0.2, "mean"),
           ("pathfinder", "block_local"): (64, 2, 4, 64, 32, 0.1, "mean"),
           ("pathfinder", "sinkhorn"): (32, 2, 4, 64, 16, 0.2, "mean_all")}  # its encoder's jnp.mean
    for (task, model), expected in own.items():
        m = compose_config(["experiment=lra_table1", f"task={task}", f"model={model}"]).model
        got = (m.d_model, m.n_layers, heads(m), m.d_ff, m.mixer.get("qkv_dim"), m.dropout, m.pooling)
        assert got == expected, (task, model, got)
    listops = compose_config(["experiment=lra_table1", "task=listops", "lra_data.lra_release=/d/lra_release"])
    assert listops.task.data_dir == "/d/lra_release/listops-1000"
    mini = swept("lra_table1_mini")
    assert len(mini) == 2 * len(compose_with_hydra("lra_table1_mini")[1]["model"])
    assert {c.task.source for c in mini} == {"generate"}
    assert {c.task.seq_len for c in mini} == {256, 1024}
    assert {c.model.d_model for c in mini} == {32}
    # Table 1's claims are the full study's: the mini run has one seed and a toy budget
    assert all(c["experiment"] == ["lra_table1"] for c in load_claims(PUBLISHED / "claims_lra_table1.yaml"))


def test_mamba_and_zoology_full_studies_use_the_papers_settings():
    sc = compose_config(["experiment=mamba_selective_copying", "model=mamba"])
    assert (sc.task.seq_len, sc.task.vocab_size, sc.task.n_tokens) == (4096, 16, 16)
    assert (sc.model.n_layers, sc.model.d_model) == (2, 64)
    assert (sc.trainer.steps, sc.trainer.batch_size, sc.trainer.lr) == (400_000, 64, 1e-4)
    ih = compose_config(["experiment=mamba_induction_heads", "model=transformer"])
    assert ih.task.seq_len == 256 and max(ih.task.eval_seq_lens) == 2**14
    assert (ih.model.positional, ih.model.d_model, ih.model.d_ff) == ("learned", 128, 0)
    assert (ih.trainer.batch_size, ih.trainer.steps, ih.trainer.weight_decay) == (8, 204_800, 0.0)
    _, ih_axes = compose_with_hydra("mamba_induction_heads")
    assert ih_axes["trainer.lr"] == ["2e-4", "1e-3"]
    _, zq = compose_with_hydra("zoology_mqar")
    assert zq["task.seq_len"] == ["64", "128", "256"]
    assert zq["size.d_model"] == ["64", "128", "256", "512"]  # every model at the swept width
    assert [float(x) for x in zq["trainer.lr"]] == pytest.approx(np.logspace(-4, -2, 4), rel=1e-4)
    mq = compose_config(["experiment=zoology_mqar", "model=transformer"])
    assert (mq.task.vocab_size, mq.model.d_ff, heads(mq.model), mq.model.mixer.dropout) == (8192, 0, 1, 0.1)
    lin = compose_config(["experiment=zoology_mqar", "model=linear_transformer"])
    assert (lin.model.d_ff, heads(lin.model)) == (0, 1)
    assert "64" in compose_with_hydra("zoology_mqar_cpu")[1]["size.d_model"]  # the claims' width


def test_mamba_induction_heads_models_match_the_papers_parameter_counts():
    counts = {}
    for model in ("mamba", "transformer"):
        built = build(["experiment=mamba_induction_heads_cpu", f"model={model}", "task.eval_seq_lens=[]"])
        counts[model] = sum(p.numel() for name, p in built.model.named_parameters()
                            if not name.startswith("pos_embed"))
    # Table 11: Mamba 74K, MHA-Abs 137K parameters (positions aside); ours within 15%.
    assert counts["mamba"] == pytest.approx(74_000, rel=0.15)
    assert counts["transformer"] == pytest.approx(137_000, rel=0.15)


# The CPU variants of the studies that have a claims file (the speed sweeps' claims are in claims.yaml).
CPU_STUDIES = [e for e in EXPERIMENTS if e.endswith("_cpu")
               and (PUBLISHED / f"claims_{e.removesuffix('_cpu')}.yaml").exists()]


@pytest.mark.parametrize("experiment", CPU_STUDIES)
def test_a_cpu_study_runs_3_seeds_of_every_model_its_claims_name(experiment):
    """Every claim belongs to its full study; those the CPU variant keeps name only models the CPU
    sweep runs, with at least 3 seeds (a claim moved to the full study says why in the config)."""
    study = experiment.removesuffix("_cpu")
    cfg, axes = compose_with_hydra(experiment)
    assert len(axes.get("seed", [])) >= 3, f"{experiment} sweeps {axes.get('seed')} seeds"
    models = set(axes.get("model") or [cfg.model.name])
    claims = load_claims(PUBLISHED / f"claims_{study}.yaml")
    assert all(study in claim["experiment"] for claim in claims)
    kept = [claim for claim in claims if experiment in claim["experiment"]]
    assert kept, f"{experiment} keeps no claim"
    for claim in kept:
        named = {side["model"] for side in claim_sides(claim)}
        assert named <= models, (claim["id"], named, models)


def test_position_extrapolation_sweeps_every_positional_on_one_model():
    for experiment, train_len, seeds in [("position_extrapolation", 256, 3),
                                         ("position_extrapolation_cpu", 32, 5)]:
        _, axes = compose_with_hydra(experiment)
        assert set(axes["model.positional"]) == {"sinusoidal", "learned", "rope", "xpos", "alibi", "t5"}
        assert axes["seed"] == [str(s) for s in range(seeds)] and axes["model"] == ["transformer"]
        cfgs = swept(experiment)
        for c in cfgs:  # the same model for every option; tested at 2x .. 32x the training length
            assert (c.model.name, c.task.name, c.task.seq_len) == ("transformer", "induction_heads", train_len)
            assert (c.model.d_model, c.model.n_layers, c.model.d_ff, c.model.mixer.n_heads) == (64, 2, 0, 4)
            assert [n // train_len for n in c.task.eval_seq_lens] == [2, 4, 8, 16, 32]
        assert {c.model.positional for c in cfgs} == set(axes["model.positional"])
    claims = load_claims(PUBLISHED / "claims_position_extrapolation.yaml")
    for claim in claims:
        assert set(claim["experiment"]) == {"position_extrapolation", "position_extrapolation_cpu"}


def test_position_extrapolation_builds_every_option_at_the_longest_test_length():
    import torch

    for positional in ("sinusoidal", "learned", "rope", "xpos", "alibi", "t5"):
        built = build(["experiment=position_extrapolation_cpu", f"model.positional={positional}"])
        tokens = torch.randint(1, 15, (1, max(built.task.spec.eval_seq_lens)))
        with torch.no_grad():
            assert built.model({"tokens": tokens}).shape[1] == tokens.shape[1]
