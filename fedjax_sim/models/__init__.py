"""Classifiers as pure (init, apply) pairs over plain parameter dicts.

Every model names its classifier layer ``head`` (``Model.head == ("head",)``), so that
personalized methods can split head and base by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fedjax_sim.models.base import Model, Params
from fedjax_sim.models.cnn import cnn, emnist_cnn
from fedjax_sim.models.layers import (
    DEFAULT_INIT,
    INITS,
    check_init,
    conv2d,
    max_pool_2x2,
    resolve_conv_impl,
)
from fedjax_sim.models.lstm import char_lstm, sent_lstm, so_lstm
from fedjax_sim.models.mlp import mlp
from fedjax_sim.models.resnet import resnet
from fedjax_sim.models.transformer import transformer

MODELS = ("mlp", "cnn", "resnet", "emnist_cnn", "char_lstm", "so_lstm", "sent_lstm",
          "transformer")

_FACTORIES = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "emnist_cnn": emnist_cnn,
              "char_lstm": char_lstm, "so_lstm": so_lstm, "sent_lstm": sent_lstm,
              "transformer": transformer}
_CONV_MODELS = ("cnn", "resnet", "emnist_cnn")
# Models that read int tokens (B, L) and give logits (B, L, V) for every position.
SEQUENCE_MODELS = ("char_lstm", "so_lstm", "transformer")


def make_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    conv_impl: str = "auto",
    init: str = DEFAULT_INIT,
    **options: Any,
) -> Model:
    """Builds a registered model.

    Args:
      name: one of :data:`MODELS`.
      input_shape: one example's shape, without the batch axis.
      num_classes: number of logits, at least 2.
      conv_impl: ``"auto"``, ``"xla"``, ``"im2col"`` or ``"winograd"`` for the convolutional
        models (ignored by ``mlp``); ``"auto"`` picks winograd on CPU and XLA's convolution
        elsewhere.
      init: parameter initialization, one of :data:`INITS`: ``"flax"`` (LeCun-normal
        kernels, zero biases) or ``"torch"`` (PyTorch's nn.Linear / nn.Conv2d defaults:
        kernels and biases U(+-1/sqrt(fan_in))); normalization layers start at scale 1,
        bias 0 under both.
      **options: further keyword arguments of the model's factory (e.g. ``hidden`` for
        ``mlp``, ``padding`` for ``cnn``, ``stages`` for ``resnet``).

    Returns:
      The model.

    Raises:
      ValueError: on an unknown name or ``init``, ``num_classes < 2`` or an unsuitable
        shape.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    resolve_conv_impl(conv_impl)  # validate the name even where it is unused
    if name in _CONV_MODELS:
        options["conv_impl"] = conv_impl
    return _FACTORIES[name](input_shape, num_classes, init=check_init(init), **options)


def count_params(params: Params) -> int:
    """Number of scalar parameters in a pytree.

    Args:
      params: any pytree of arrays, or of ``jax.ShapeDtypeStruct`` (e.g.
        ``jax.eval_shape(model.init, key)``, which counts without compiling anything).

    Returns:
      The total number of elements over all leaves.
    """
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


__all__ = [
    "INITS",
    "MODELS",
    "SEQUENCE_MODELS",
    "Model",
    "Params",
    "char_lstm",
    "check_init",
    "cnn",
    "conv2d",
    "count_params",
    "emnist_cnn",
    "make_model",
    "max_pool_2x2",
    "mlp",
    "resnet",
    "resolve_conv_impl",
    "sent_lstm",
    "so_lstm",
    "transformer",
]
