"""The CNN of FedAvg, as used by FL-bench ("avgcnn") and PFLlib.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017: two 5x5 convolutions (32, 64 channels), each followed by a 2x2 max
pool, a 512-unit ReLU layer and a linear classifier. With VALID padding it has 582,026
parameters on 28x28x1 with 10 classes, and 878,538 on 32x32x3.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.base import Model
from fedjax_sim.models.layers import (
    DEFAULT_INIT,
    Conv,
    batch_norm,
    check_init,
    check_model_args,
    dense,
    linen_bn_model,
    linen_model,
    max_pool_2x2,
    resolve_conv_impl,
)

PADDINGS = ("auto", "VALID", "SAME")


class CNN(nn.Module):
    """conv1 -> pool -> conv2 -> pool -> fc1 -> head.

    Attributes:
      num_classes: number of logits.
      padding: ``"VALID"`` or ``"SAME"`` for both convolutions.
      conv_impl: ``"xla"``, ``"im2col"`` or ``"winograd"`` (see
        :func:`~fedjax_sim.models.layers.conv2d`).
      channels: output channels of conv1 and conv2.
      hidden: width of fc1.
      param_init: parameter initialization scheme, ``"flax"`` or ``"torch"`` (see
        :func:`~fedjax_sim.models.layers.layer_inits`).
    """

    num_classes: int
    padding: str = "VALID"
    conv_impl: str = "xla"
    channels: tuple[int, int] = (32, 64)
    hidden: int = 512
    param_init: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits.

        Args:
          x: (B, H, W, C).

        Returns:
          (B, num_classes) logits.
        """
        x = jnp.asarray(x, jnp.float32)
        for i, ch in enumerate(self.channels):
            conv = Conv(ch, (5, 5), padding=self.padding, impl=self.conv_impl,
                        param_init=self.param_init, name=f"conv{i + 1}")
            x = max_pool_2x2(nn.relu(conv(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(self.hidden, x.shape[-1], init=self.param_init, name="fc1")(x))
        return dense(self.num_classes, x.shape[-1], init=self.param_init, name="head")(x)


def _feature_side(n: int, padding: str) -> int:
    # Spatial size after two (5x5 conv, 2x2 pool) stages.
    for _ in range(2):
        n = (n - 4 if padding == "VALID" else n) // 2
    return n


def _resolve_padding(shape: tuple, padding: str, model: str) -> str:
    """``padding`` checked, ``auto`` resolved (VALID where the features keep a pixel, else
    SAME), and refused where the input is too small for it."""
    if padding not in PADDINGS:
        raise ValueError(f"{model}: unknown padding {padding!r}; valid: {', '.join(PADDINGS)}")
    h, w, _ = shape
    if padding == "auto":
        fits = min(_feature_side(h, "VALID"), _feature_side(w, "VALID")) >= 1
        padding = "VALID" if fits else "SAME"
    if min(_feature_side(h, padding), _feature_side(w, padding)) < 1:
        raise ValueError(f"{model}: input_shape {shape} is too small for {padding} padding")
    return padding


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    conv_impl: str = "auto",
    padding: str = "auto",
    init: str = DEFAULT_INIT,
) -> Model:
    """The FedAvg / FL-bench avgcnn.

    ``padding="auto"`` uses VALID padding, which gives the published parameter counts,
    whenever the input is large enough for two valid 5x5 convolutions and pools (H, W >=
    16), and SAME padding otherwise (e.g. 8x8 scikit-learn digits), which needs H, W >= 4.

    Args:
      input_shape: (H, W, C).
      num_classes: number of logits, at least 2.
      conv_impl: ``"auto"``, ``"xla"``, ``"im2col"`` or ``"winograd"``, resolved once here.
      padding: ``"auto"``, ``"VALID"`` or ``"SAME"``.
      init: parameter initialization, ``"flax"`` (LeCun normal, zero biases) or
        ``"torch"`` (PyTorch's nn.Conv2d / nn.Linear defaults).

    Returns:
      The model; parameters ``{"conv1", "conv2", "fc1", "head"}``, each
      ``{"kernel", "bias"}``.

    Raises:
      ValueError: if ``input_shape`` is not (H, W, C) or is too small for ``padding``, or
        on an unknown ``init``.
    """
    shape = check_model_args(input_shape, num_classes, model="cnn", rank=3)
    padding = _resolve_padding(shape, padding, "cnn")
    module = CNN(
        num_classes=int(num_classes), padding=padding, conv_impl=resolve_conv_impl(conv_impl),
        param_init=check_init(init),
    )
    return linen_model(module, name="cnn", input_shape=shape, num_classes=int(num_classes))


# PyTorch's BatchNorm defaults (the FedBN paper's models): running statistics move by 0.1 of
# the batch's per step (flax's momentum is the weight of the old value), epsilon 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class CNNBN(nn.Module):
    """conv1 -> bn1 -> pool -> conv2 -> bn2 -> pool -> fc1 -> bn3 -> head, ReLU after
    each batch normalization (the FedBN paper's placement: conv / linear, BN, ReLU).

    Attributes:
      as :class:`CNN`, and
      momentum: weight of the old running statistics in their moving average.
      epsilon: added to the variance.
    """

    num_classes: int
    padding: str = "VALID"
    conv_impl: str = "xla"
    channels: tuple[int, int] = (32, 64)
    hidden: int = 512
    param_init: str = DEFAULT_INIT
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 mask: jax.Array | None = None) -> jax.Array:
        """Computes logits.

        Args:
          x: (B, H, W, C).
          train: normalize with the batch's statistics over the rows where ``mask``
            holds (and update the running ones) rather than with the running ones.
          mask: (B,) bool, the rows that count for the batch statistics.

        Returns:
          (B, num_classes) logits.
        """
        x = jnp.asarray(x, jnp.float32)

        def norm(h, name):
            return batch_norm(h, train=train, mask=mask, momentum=self.momentum,
                              epsilon=self.epsilon, name=name)

        for i, ch in enumerate(self.channels):
            conv = Conv(ch, (5, 5), padding=self.padding, impl=self.conv_impl,
                        param_init=self.param_init, name=f"conv{i + 1}")
            x = max_pool_2x2(nn.relu(norm(conv(x), f"bn{i + 1}")))
        x = x.reshape(x.shape[0], -1)
        x = dense(self.hidden, x.shape[-1], init=self.param_init, name="fc1")(x)
        x = nn.relu(norm(x, "bn3"))
        return dense(self.num_classes, x.shape[-1], init=self.param_init, name="head")(x)


def cnn_bn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    conv_impl: str = "auto",
    padding: str = "auto",
    init: str = DEFAULT_INIT,
    momentum: float = BN_MOMENTUM,
) -> Model:
    """:func:`cnn` with batch normalization after both convolutions and fc1.

    The running means and variances are parameters of the model like any other leaf,
    under ``params["batch_stats"]`` (``{"bn1", "bn2", "bn3"}``, each ``{"mean", "var"}``),
    so that per-client statistics are one more (K, ...) subtree of the clients' state.
    ``Model.apply`` normalizes with them (evaluation); ``Model.train`` with the batch's
    statistics over its real rows, and returns the running ones after one moving-average
    step (the running variance is the batch's biased variance, as in flax; PyTorch's is
    the unbiased one).

    Args:
      input_shape, num_classes, conv_impl, padding, init: as in :func:`cnn`.
      momentum: weight of the old running statistics, in [0, 1) (0.9 is PyTorch's
        ``momentum=0.1``).

    Returns:
      The model; parameters ``{"conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "head",
      "batch_stats"}``; ``norm_layers == ("bn1", "bn2", "bn3")``.

    Raises:
      ValueError: as :func:`cnn`, or a momentum outside [0, 1).
    """
    shape = check_model_args(input_shape, num_classes, model="cnn_bn", rank=3)
    padding = _resolve_padding(shape, padding, "cnn_bn")
    if not 0 <= momentum < 1:
        raise ValueError(f"cnn_bn: momentum must be in [0, 1), got {momentum!r}")
    module = CNNBN(
        num_classes=int(num_classes), padding=padding, conv_impl=resolve_conv_impl(conv_impl),
        param_init=check_init(init), momentum=float(momentum),
    )
    return linen_bn_model(module, name="cnn_bn", input_shape=shape,
                          num_classes=int(num_classes), norm_layers=("bn1", "bn2", "bn3"))


class EMNISTCNN(nn.Module):
    """conv1 3x3x32 -> conv2 3x3x64 -> pool -> fc1 128 -> head (ReLU between)."""

    num_classes: int
    conv_impl: str = "xla"
    param_init: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        for i, ch in enumerate((32, 64)):
            x = nn.relu(Conv(ch, (3, 3), padding="VALID", impl=self.conv_impl,
                             param_init=self.param_init, name=f"conv{i + 1}")(x))
        x = max_pool_2x2(x).reshape(x.shape[0], -1)
        x = nn.relu(dense(128, x.shape[-1], init=self.param_init, name="fc1")(x))
        return dense(self.num_classes, x.shape[-1], init=self.param_init, name="head")(x)


def emnist_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    conv_impl: str = "auto",
    init: str = DEFAULT_INIT,
) -> Model:
    """The EMNIST CNN of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021):
    conv 3x3x32, conv 3x3x64, 2x2 max pool, dense 128, dense 62 (1,206,590 parameters
    on 28x28x1 with 62 classes, the paper's count). Its two dropout layers (0.25, 0.5)
    are left out: apply is deterministic, as every model here.

    Args:
      input_shape: (H, W, C), H and W >= 6.
      num_classes: number of logits.
      conv_impl: as in :func:`cnn`.
      init: ``"flax"`` or ``"torch"``.

    Raises:
      ValueError: if ``input_shape`` is not (H, W, C) or is smaller than 6x6.
    """
    shape = check_model_args(input_shape, num_classes, model="emnist_cnn", rank=3)
    if min(shape[:2]) < 6:
        raise ValueError(f"emnist_cnn: input_shape {shape} is too small (H, W >= 6)")
    module = EMNISTCNN(num_classes=int(num_classes), conv_impl=resolve_conv_impl(conv_impl),
                       param_init=check_init(init))
    return linen_model(module, name="emnist_cnn", input_shape=shape,
                       num_classes=int(num_classes))
