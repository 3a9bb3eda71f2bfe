"""The S4 repository's pixel pipeline as backbone and task options (conf/study/s4_lra.yaml): pixel
values through a linear encoder (``model.encoder=linear``), residual dropout tied along the
sequence (``model.tie_dropout``), no input dropout (``model.input_dropout``), and torchvision's
grayscale conversion of CIFAR-10 (``task.grayscale=pil``)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image as PILImage

from architectures.backbone import SequenceModel
from architectures.layers import TiedDropout
from architectures.ssm import S4D
from harness.api import compose_config
from harness.config import result_config
from harness.records import config_hash
from tasks.base import TaskSpec
from tasks.image import to_grey

PIXELS = TaskSpec(kind="classify", vocab_size=257, n_outputs=10, seq_len=16, pad_id=256)
MIXER = functools.partial(S4D, d_state=4, ssm_lr=1e-3, bidirectional=True, dt_min=1e-3, dt_max=1e-1)


def pixel_model(**kwargs) -> SequenceModel:
    kwargs = {"encoder": "linear", "input_mean": 122.6, "input_std": 61.0, **kwargs}
    return SequenceModel(spec=PIXELS, mixer=MIXER, d_model=8, n_layers=1, d_ff=0, positional="none", **kwargs)


def test_the_linear_encoder_reads_each_pixel_standardised_through_one_linear():
    torch.manual_seed(0)
    model = pixel_model()
    tokens = torch.tensor([[0, 122, 255, 61]])
    values = (tokens.double() - 122.6) / 61.0  # torchvision's Normalize(122.6 / 255, 61.0 / 255) of x / 255
    expected = values[..., None] * model.embed.linear.weight.double().T + model.embed.linear.bias.double()
    torch.testing.assert_close(model.embed(tokens).double(), expected)  # (1, 4, 8)
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    model({"tokens": torch.randint(0, 256, (2, 16))}).sum().backward()
    assert model.embed.linear.weight.grad.abs().sum() > 0


def test_the_linear_encoder_refuses_token_tasks_and_a_bad_scale_naming_the_key():
    lm = TaskSpec(kind="lm", vocab_size=20, n_outputs=20, seq_len=16)
    with pytest.raises(ValueError, match="model.encoder=linear"):
        SequenceModel(spec=lm, mixer=MIXER, d_model=8, n_layers=1, d_ff=0, encoder="linear")
    with pytest.raises(ValueError, match="model.input_std"):
        pixel_model(input_std=0.0)
    with pytest.raises(ValueError, match="model.encoder must be one of"):
        SequenceModel(spec=PIXELS, mixer=MIXER, d_model=8, n_layers=1, d_ff=0, encoder="conv")


def test_tied_dropout_keeps_one_mask_per_example_and_channel_along_the_sequence():
    torch.manual_seed(0)
    drop = TiedDropout(0.5).train()
    x = torch.ones(4, 50, 16)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert (y == y[:, :1]).all()  # the same mask at every position
    assert 0 < (y[:, 0] == 0).float().mean() < 1
    assert torch.equal(drop.eval()(x), x)


def test_tied_residual_dropout_and_no_input_dropout_in_the_blocks():
    torch.manual_seed(0)
    model = pixel_model(dropout=0.5, tie_dropout=True, input_dropout=0.0)
    assert isinstance(model.blocks[0].dropout, TiedDropout) and model.dropout.p == 0.0
    untied = pixel_model(dropout=0.5)
    assert isinstance(untied.blocks[0].dropout, torch.nn.Dropout) and untied.dropout.p == 0.5


def test_pil_grayscale_is_pillows_convert_l():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(8, 3072), dtype=np.uint8)  # channel-major, as the CIFAR pickles
    images = data.reshape(8, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    pil = np.stack([np.asarray(PILImage.fromarray(im).convert("L")).reshape(-1) for im in images])
    assert np.array_equal(to_grey(data, "pil"), pil)
    assert not np.array_equal(to_grey(data, "pil"), to_grey(data))  # LRA's TF conversion rounds otherwise


def test_s4_lra_uses_the_pixel_pipeline_on_the_image_tasks_only():
    image = compose_config(["experiment=s4_lra", "model=s4", "task=image"])
    m = image.model
    assert (m.encoder, m.input_mean, m.input_std, m.tie_dropout, m.input_dropout) == ("linear", 122.6, 61.0, True, 0.0)
    assert (m.dropout, m.mixer.dropout, image.task.grayscale) == (0.1, 0.1, "pil")  # s4-cifar.yaml: dropout 0.1
    for task in ("pathfinder", "pathx"):
        m = compose_config(["experiment=s4_lra", "model=s4d", f"task={task}"]).model
        assert (m.encoder, m.input_mean, m.input_std, m.tie_dropout) == ("linear", 0.0, 255.0, False)
    listops = compose_config(["experiment=s4_lra", "model=s4", "task=listops"]).model
    assert (listops.encoder, listops.tie_dropout, listops.input_dropout) == ("embedding", False, None)


def test_the_new_keys_keep_old_hashes_and_count_when_set():
    cfg = compose_config(["model=s4d", "task=image"])
    before = config_hash(result_config(cfg))
    older = OmegaConf.create(OmegaConf.to_container(cfg))  # a config of before these keys
    del older.model.encoder, older.model.input_mean, older.model.input_std, older.model.tie_dropout
    del older.model.input_dropout, older.task.grayscale
    assert config_hash(result_config(older)) == before
    for override in ("model.encoder=linear", "model.input_std=255", "model.tie_dropout=true",
                     "model.input_dropout=0", "task.grayscale=pil"):
        assert config_hash(result_config(compose_config(["model=s4d", "task=image", override]))) != before
