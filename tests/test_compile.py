"""trainer.activation_checkpointing and trainer.compile (harness.compile): a checkpointed step
equals the plain one for every model (or the model refuses, naming the key), a compiled step
equals the eager one, and a compile failure falls back to eager with a warning naming the reason."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_contract import MODELS, SPECS, build_for_spec
from test_train import TINY_MQAR

from architectures.layers import UnsupportedTask
from harness.api import build_model, build_task, compose_config
from harness.bench import bench_job
from harness.compile import StepCompiler, failure_reason, set_activation_checkpointing
from harness.config import result_config
from harness.loggers import NoLogger
from harness.objectives import auxiliary_loss, loss_and_counts
from harness.trainer import Trainer
from harness.validation import config_problems
from tasks.base import random_batch

KINDS = ("lm", "classify", "seq2seq")  # the first a model supports is used


def model_and_batch(model_name: str, *overrides: str):
    for kind in KINDS:
        try:
            model = build_for_spec(model_name, SPECS[kind], *overrides).train()
        except UnsupportedTask:
            continue
        spec = SPECS[kind]
        return model, spec, random_batch(spec, 2, seed=1, padded=not spec.causal)
    pytest.skip(f"{model_name} supports none of {KINDS}")


def step_grads(model, spec, batch, *, seed: int = 0):
    """One training forward + backward from a fixed RNG state: loss, gradients, and the bytes the
    autograd graph saved for the backward pass."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_and_counts(model(batch), batch, spec)[0]
        aux = auxiliary_loss(model)
        loss = loss if aux is None else loss + aux
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("model_name", MODELS)
def test_a_checkpointed_step_equals_the_plain_one(model_name):
    """Loss and every gradient equal, with the yaml's dropout (the recomputation replays the RNG),
    and less kept for the backward pass; a model without a block stack refuses, naming the key."""
    model, spec, batch = model_and_batch(model_name)

    def redraw_due() -> None:  # Performer: both steps draw a fresh projection (from the same seed)
        for module in model.modules():
            if hasattr(module, "forward_calls"):
                module.forward_calls.fill_(1)

    redraw_due()
    loss, grads, saved = step_grads(model, spec, batch)
    redraw_due()
    try:
        set_activation_checkpointing(model, True)
    except UnsupportedTask as e:
        assert "trainer.activation_checkpointing" in str(e)
        assert not hasattr(model, "activation_checkpointing")
        return
    loss_ck, grads_ck, saved_ck = step_grads(model, spec, batch)
    # a block's recomputation is not another call: Performer counts one per step, redraws once
    assert all(int(m.forward_calls) == 2 for m in model.modules() if hasattr(m, "forward_calls"))
    torch.testing.assert_close(loss_ck, loss, rtol=1e-5, atol=1e-6)
    assert grads_ck.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if not getattr(model, "reversible", False):  # reversible blocks keep nothing either way
        assert saved_ck < saved, f"checkpointing kept {saved_ck} bytes, the plain step {saved}"


@pytest.mark.parametrize("model_name", ["transformer", "transformer_xl"])
def test_with_dropout_the_recomputation_draws_the_same_masks(model_name):
    """Non-reentrant checkpointing restores the RNG state for the recomputation: with dropout on,
    the checkpointed step still equals the plain one from the same seed, and evaluation runs."""
    model, spec, batch = model_and_batch(model_name, "model.dropout=0.3")
    loss, grads, _ = step_grads(model, spec, batch)
    set_activation_checkpointing(model, True)
    loss_ck, grads_ck, _ = step_grads(model, spec, batch)
    assert loss_ck != step_grads(model, spec, batch, seed=1)[0]  # dropout is on
    torch.testing.assert_close(loss_ck, loss)
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], msg=name)
    with torch.no_grad():  # no recomputation without gradients
        model.eval()(batch)


def test_the_keys_are_validated_hashed_only_when_set_and_passed_to_the_bench():
    problems = config_problems(compose_config(["trainer.compile=maybe", "trainer.activation_checkpointing=2"]))
    assert any(p.startswith("trainer.compile=") for p in problems)
    assert any(p.startswith("trainer.activation_checkpointing=") for p in problems)
    plain = result_config(compose_config([]))["trainer"]
    assert "compile" not in plain and "activation_checkpointing" not in plain  # older records keep their hash
    assert result_config(compose_config(["trainer.compile=true"]))["trainer"]["compile"] is True
    cfg = compose_config(["trainer.compile=true", "trainer.activation_checkpointing=true"], config_name="bench")
    job = bench_job(cfg, torch.device("cpu"))
    assert job["compile"] is True and job["activation_checkpointing"] is True


class RaisingCompile:
    """Stands for a torch.compile whose compiled function fails when first called."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, **kwargs):
        def compiled(*args):
            self.calls += 1
            raise RuntimeError("backend='inductor' raised:\nInvalidCxxCompiler: No working C++ compiler found")
        return compiled


def tiny_trainer(tmp_path, *overrides):
    cfg = compose_config([*TINY_MQAR, "logger=none", "trainer.steps=3", "trainer.eval_every=3", "task.n_train=64",
                          "task.n_val=16", "task.n_test=16", "trainer.batch_size=8", *overrides])
    task = build_task(cfg)
    tmp_path.mkdir()
    torch.manual_seed(0)
    return Trainer(model=build_model(cfg, task), task=task, trainer_cfg=cfg.trainer, seed=0,
                   device=torch.device("cpu"), run_dir=tmp_path, logger=NoLogger())


class Bar:
    def update(self, *args, **kwargs):
        pass


def test_a_model_that_cannot_be_compiled_trains_eager_with_a_warning(tmp_path, monkeypatch, caplog):
    eager = tiny_trainer(tmp_path / "eager")
    eager.fit(Bar())
    fake = RaisingCompile()
    monkeypatch.setattr(torch, "compile", fake)
    trainer = tiny_trainer(tmp_path / "compiled", "trainer.compile=true")
    with caplog.at_level(logging.WARNING, logger="harness.compile"):
        trainer.fit(Bar())
    assert fake.calls == 1  # tried once, then eager for good
    assert trainer.compiler.status() == {
        "requested": True, "applied": False,
        "fallback": "RuntimeError: backend='inductor' raised: InvalidCxxCompiler: No working C++ compiler found"}
    assert "could not be compiled (RuntimeError: backend='inductor' raised: InvalidCxxCompiler" in caplog.text
    assert trainer.state.step == 3 and trainer.state.last_train_loss == eager.state.last_train_loss


class FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("compiled backward failed")


def test_a_failure_in_the_backward_reruns_the_whole_step_eager():
    """Gradients of the failed attempt are dropped: the step's gradients are the eager ones."""
    model, spec, batch = model_and_batch("s4d")

    def forward():
        return loss_and_counts(model(batch), batch, spec)[0]

    def backward(fwd):
        model.zero_grad(set_to_none=True)
        fwd().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = backward(forward)
    compiler = StepCompiler(forward, enabled=False)
    compiler.requested, compiler.compiled = True, lambda: FailsInBackward.apply(forward() * 2)
    got = compiler.run(backward)
    assert compiler.status()["fallback"] == "RuntimeError: compiled backward failed"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_a_kept_exception_is_not_a_compile_failure():
    """E.g. the trainer's Diverged: it propagates from the compiled step, nothing falls back."""
    compiler = StepCompiler(lambda: None, enabled=False)
    compiler.requested, compiler.compiled = True, lambda: None

    def diverges(forward):
        raise ValueError("diverged")

    with pytest.raises(ValueError, match="diverged"):
        compiler.run(diverges, keep=(ValueError,))
    assert compiler.status() == {"requested": True, "applied": True, "fallback": None}


def test_failure_reason_is_the_type_and_the_first_line():
    assert failure_reason(ValueError("bad shape\ntraceback...")) == "ValueError: bad shape"
    assert failure_reason(KeyError()) == "KeyError: "


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["s4d", "mamba", "mamba2"])  # Mamba's: the fused kernels' fake shapes
# S4D's kernel is complex; inductor runs those ops as eager code and says so (when its cache is cold)
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_a_compiled_step_equals_the_eager_one_on_the_cpu(model_name):
    """Inductor on the CPU (generated C++, g++): the compiled forward and its backward give the
    eager loss and gradients, and the compiler reports that it applied (Mamba and Mamba-2: through
    the fused CPU kernels, whose backward writes into its dz_out argument)."""
    model, spec, batch = model_and_batch(model_name)

    def forward():
        return loss_and_counts(model(batch), batch, spec)[0]

    def backward(fwd):
        model.zero_grad(set_to_none=True)
        loss = fwd()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = backward(forward)
    compiler = StepCompiler(forward, enabled=True)
    for _ in range(2):  # the second call runs the cached compiled code
        loss_c, grads_c = compiler.run(backward)
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert compiler.status() == {"requested": True, "applied": True, "fallback": None}


@pytest.mark.slow
def test_arena_bench_takes_the_keys_into_their_own_folders_and_records(tmp_path):
    """trainer.activation_checkpointing=true measures into a folder of its own (-ckpt; the plain
    folder names are test_bench's); the records carry the key and env.compile; a model without a
    block stack is recorded as unsupported, naming the key."""
    from test_bench import FAST, bench, records_under

    bench(tmp_path, "-m", "model=transformer,lstm", "task.seq_len=64", "trainer.activation_checkpointing=true",
          "sweep.name=t", *FAST)
    records = {r["model"]: r for r in (json.loads(p.read_text())
                                       for p in (tmp_path / "results/sweeps/t").rglob("record.json"))}
    assert (tmp_path / "results/sweeps/t/transformer-text/L64-B2-fp32-ckpt/record.json").exists()
    assert records["transformer"]["status"] == "ok"
    assert records["transformer"]["config"]["trainer"]["activation_checkpointing"] is True
    assert records["transformer"]["env"]["compile"] == {"requested": False, "applied": False, "fallback": None}
    refused = records["lstm"]
    assert refused["status"] == "unsupported" and "trainer.activation_checkpointing" in refused["error"]
    assert len(records_under(tmp_path / "results/sweeps/t")) == 2  # (model, seq_len) pairs, all valid
