"""Long Range Arena's released model details, as options of the shared backbone.

What LRA's released code (google-research/long-range-arena, read at cd31e5c) does that our
backbone does not by default, for Table 1's and Table 2's rows:

* ``model.init=lra_released`` (:func:`lra_released_init`), from
  ``lra_benchmarks/models/transformer/transformer.py`` and ``models/layers/common_layers.py``
  (every other released model's block passes the same initialisers):

  - token embeddings N(0, 1) (``nn.Embed`` with ``normal(stddev=1.0)``), not scaled;
  - learned positions N(0, 0.02) (``learn_pos_emb``); the CLS token stays zeros;
  - the attention projections have no biases (``nn.SelfAttention(..., bias=False)``) and
    xavier-uniform kernels, one per query, key, value and output projection (flax's
    ``DenseGeneral`` draws each kernel over its flattened (in, out) shape, so a fused q/k/v
    matrix here gets one xavier draw per part);
  - the feed-forward (``MlpBlock``): xavier-uniform kernels, biases N(0, 1e-6);
  - the classifier's Dense layers keep flax's default: LeCun normal truncated at two standard
    deviations (``variance_scaling(1, fan_in, truncated_normal)``), zero biases;
  - LayerNorms: ones and zeros, as PyTorch's.

  A mixer may re-draw its other parameters as its released code does (``lra_released_init_``:
  the Synthesizer's random logits); the rest (Linformer's length projections, Sinkhorn's
  sorting network, ...) keep the mixer's own initialisation.
* ``model.head=lra_released`` (:class:`architectures.layers.ClassifierHead` with ``d_hidden =
  d_ff``, and :class:`LRADualHead`): ``common_layers.classifier_head`` is Dense(mlp_dim) -> ReLU
  -> Dense(classes), mlp_dim being the feed-forward width; ``classifier_head_dual`` with
  ``interaction=None`` (what every released train.py leaves it at) concatenates the two pooled
  vectors [u, v] only, then Dense(mlp_dim) -> ReLU -> Dense(mlp_dim // 2) -> ReLU -> Dense(classes).
  The [u, v, u * v, u - v] form (our default :class:`architectures.layers.PairHead`) is the
  release's ``interaction='NLI'``, which no released config selects.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

INITS = ("default", "lra_released")
MIXER_VARIANTS = ("paper", "lra_released")  # model.mixer.variant: the paper's attention, or LRA's released code
HEADS = ("default", "lra_released", "lra_dense")  # lra_dense: the released Sinkhorn encoder's one Dense

# jax's truncated_normal variance scaling divides by the std of a unit normal cut at +-2
TRUNCATED_NORMAL_STD = 0.87962566103423978
FFN_BIAS_STD = 1e-6  # common_layers.MlpBlock bias_init=normal(stddev=1e-6)
POSITION_STD = 0.02  # transformer.py: pe_init = normal(stddev=0.02) if learn_pos_emb


def check_mixer_variant(variant: str) -> None:
    """Refuse a ``model.mixer.variant`` outside :data:`MIXER_VARIANTS`, naming the key."""
    if variant not in MIXER_VARIANTS:
        raise ValueError(f"model.mixer.variant must be one of {MIXER_VARIANTS}, got {variant!r}")


class LRADualHead(nn.Module):
    """LRA's released retrieval head (``classifier_head_dual``, ``interaction=None``):
    [u, v] -> Linear(d_hidden) -> ReLU -> Linear(d_hidden // 2) -> ReLU -> Linear(n_classes)."""

    def __init__(self, d_model: int, n_classes: int, *, d_hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, d_hidden), nn.ReLU(),
            nn.Linear(d_hidden, d_hidden // 2), nn.ReLU(),
            nn.Linear(d_hidden // 2, n_classes),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([x1, x2], dim=-1))  # (B, 2D) -> (B, n_classes)


class LRADenseHead(nn.Module):
    """The classifier of LRA's released Sinkhorn encoder (sinkhorn_transformer.py, ``classifier_pool
    'MEAN'``): one Dense from the pooled vector to the logits, no hidden layer."""

    def __init__(self, d_model: int, n_classes: int):
        super().__init__()
        self.logits = nn.Linear(d_model, n_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.logits(pooled)  # (B, n_classes)


def head_width(d_model: int, d_ff: int) -> int:
    """The released heads' hidden width: mlp_dim, the feed-forward width; a model without a
    feed-forward (d_ff 0, e.g. Mamba's blocks) falls back to d_model."""
    return d_ff if d_ff > 0 else d_model


@torch.no_grad()
def xavier_parts_(weight: torch.Tensor, parts: int) -> None:
    """Xavier-uniform on each of ``parts`` equal row blocks of a (parts * out, in) weight, as flax
    draws separate query, key and value kernels."""
    for part in weight.chunk(parts, dim=0):
        nn.init.xavier_uniform_(part)


@torch.no_grad()
def lecun_truncated_normal_(weight: torch.Tensor) -> None:
    """flax Dense's default kernel init: variance_scaling(1.0, 'fan_in', 'truncated_normal')."""
    std = math.sqrt(1.0 / weight.shape[1]) / TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


@torch.no_grad()
def lra_released_init(model: nn.Module) -> None:
    """Re-initialise a built :class:`architectures.backbone.SequenceModel` as LRA's release does
    (see the module docstring). Removes the biases of the attention projections."""
    if isinstance(model.embed, nn.Embedding):  # not a linear encoder of values (S4's pixel input)
        nn.init.normal_(model.embed.weight, std=1.0)
    if hasattr(model, "pos_embed"):
        nn.init.normal_(model.pos_embed.weight, std=POSITION_STD)
    for block in model.blocks:
        # an attention mixer names its projections and how many flax kernels each one fuses
        # (``released_projections``); other mixers (SSMs, convolutions) keep their own init
        for name, parts in getattr(block.mixer, "released_projections", {}).items():
            linear = getattr(block.mixer, name, None)
            if isinstance(linear, nn.Linear):
                xavier_parts_(linear.weight, parts)
                linear.register_parameter("bias", None)  # nn.SelfAttention(bias=False)
        mixer_init = getattr(block.mixer, "lra_released_init_", None)
        if mixer_init is not None:
            mixer_init()
        if block.ffn is not None:
            for linear in (block.ffn.up, block.ffn.down):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=FFN_BIAS_STD)
    if isinstance(model.head, nn.Linear):
        return  # lm / seq2seq: not an LRA head
    for layer in model.head.modules():
        if isinstance(layer, nn.Linear):
            lecun_truncated_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
