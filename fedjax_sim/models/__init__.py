"""Classifiers as pure (init, apply) pairs over plain parameter dicts.

Every model names its classifier layer ``head`` (``Model.head == ("head",)``), so that
personalized methods can split head and base by name. ``cnn_bn`` and ``resnet_bn`` add batch
normalization, with their running statistics in the parameter dict (``Model.state_names``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fedjax_sim.models.base import Model, Params
from fedjax_sim.models.cnn import cnn, cnn_bn, emnist_cnn
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
from fedjax_sim.models.resnet import resnet, resnet_bn
from fedjax_sim.models.transformer import transformer

MODELS = ("mlp", "cnn", "resnet", "emnist_cnn", "char_lstm", "so_lstm", "sent_lstm",
          "transformer", "cnn_bn", "resnet_bn")

_FACTORIES = {"mlp": mlp, "cnn": cnn, "cnn_bn": cnn_bn, "resnet": resnet, "emnist_cnn": emnist_cnn,
              "char_lstm": char_lstm, "so_lstm": so_lstm, "sent_lstm": sent_lstm,
              "transformer": transformer, "resnet_bn": resnet_bn}
_CONV_MODELS = ("cnn", "cnn_bn", "resnet", "resnet_bn", "emnist_cnn")
# Models that read int tokens (B, L) and give logits (B, L, V) for every position.
SEQUENCE_MODELS = ("char_lstm", "so_lstm", "transformer")
# Models that read int tokens (B, L): the above, and sent_lstm (one label per sequence).
TOKEN_MODELS = (*SEQUENCE_MODELS, "sent_lstm")


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
      TypeError: a ``name`` that is not a string, an ``input_shape`` that is not a sequence
        of integers (a string such as ``"64"`` is refused, not read as ``(6, 4)``), or a
        ``num_classes`` that is not an integer.
      ValueError: on an unknown name or ``init``, ``num_classes < 2`` or an unsuitable
        shape.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name (str), one of {', '.join(MODELS)}; got "
                        f"{type(name).__name__} {name!r}")
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    _check_shape_and_classes(input_shape, num_classes)
    resolve_conv_impl(conv_impl)  # validate the name even where it is unused
    if name in _CONV_MODELS:
        options["conv_impl"] = conv_impl
    return _FACTORIES[name](input_shape, num_classes, init=check_init(init), **options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_shape_and_classes(input_shape: Any, num_classes: Any) -> None:
    """Refuses an ``input_shape`` that is not a sequence of positive integers and a
    ``num_classes`` that is not an integer >= 2 (TypeError for the type, ValueError for
    the range), before a model is built."""
    example = "e.g. (28, 28, 1) or (64,)"
    if (isinstance(input_shape, str | bytes)
            or not isinstance(input_shape, Sequence | np.ndarray)
            or (isinstance(input_shape, np.ndarray) and input_shape.ndim != 1)):
        raise TypeError(f"input_shape must be a tuple of positive integers (one example's "
                        f"shape, without the batch axis), {example}; got "
                        f"{type(input_shape).__name__} {input_shape!r}")
    if not all(_is_int(d) for d in input_shape):
        raise TypeError(f"input_shape must be a tuple of positive integers, {example}; got "
                        f"{tuple(input_shape)!r}")
    if len(input_shape) == 0 or any(d < 1 for d in input_shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive integers, "
                         f"{example}; got {tuple(input_shape)!r}")
    if not _is_int(num_classes):
        raise TypeError(f"num_classes must be an integer >= 2 (the number of logits), got "
                        f"{type(num_classes).__name__} {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (the number of logits), got "
                         f"{num_classes}")


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
    "TOKEN_MODELS",
    "Model",
    "Params",
    "char_lstm",
    "check_init",
    "cnn",
    "cnn_bn",
    "conv2d",
    "count_params",
    "emnist_cnn",
    "make_model",
    "max_pool_2x2",
    "mlp",
    "resnet",
    "resnet_bn",
    "resolve_conv_impl",
    "sent_lstm",
    "so_lstm",
    "transformer",
]
