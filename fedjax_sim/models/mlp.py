"""The 2NN multilayer perceptron of FedAvg.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017: two hidden layers of 200 ReLU units (199,210 parameters on MNIST).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.models.base import Model
from fedjax_sim.models.layers import DEFAULT_INIT, check_init, check_model_args, dense, linen_model


class MLP(nn.Module):
    """Flatten, then ReLU dense layers ``fc1``, ``fc2``, ..., then the linear ``head``.

    Attributes:
      hidden: widths of the hidden layers.
      num_classes: number of logits.
      param_init: parameter initialization scheme, ``"flax"`` or ``"torch"`` (see
        :func:`~fedjax_sim.models.layers.layer_inits`).
    """

    hidden: Sequence[int]
    num_classes: int
    param_init: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Computes logits.

        Args:
          x: (B, *input_shape).

        Returns:
          (B, num_classes) logits.
        """
        x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(dense(width, x.shape[-1], init=self.param_init, name=f"fc{i + 1}")(x))
        return dense(self.num_classes, x.shape[-1], init=self.param_init, name="head")(x)


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (200, 200),
    init: str = DEFAULT_INIT,
) -> Model:
    """The FedAvg 2NN: flatten -> fc1 200 ReLU -> fc2 200 ReLU -> head.

    Args:
      input_shape: one example's shape, any rank (e.g. (28, 28, 1), (40, 1), (60,)).
      num_classes: number of logits, at least 2.
      hidden: hidden layer widths.
      init: parameter initialization, ``"flax"`` (LeCun normal, zero biases) or
        ``"torch"`` (PyTorch's nn.Linear defaults).

    Returns:
      The model; parameters ``{"fc1", "fc2", "head"}``, each ``{"kernel", "bias"}``.

    Raises:
      ValueError: on a bad shape, class count or ``init``.
    """
    shape = check_model_args(input_shape, num_classes, model="mlp")
    module = MLP(hidden=tuple(int(h) for h in hidden), num_classes=int(num_classes),
                 param_init=check_init(init))
    return linen_model(module, name="mlp", input_shape=shape, num_classes=int(num_classes))
