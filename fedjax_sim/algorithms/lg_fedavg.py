"""LG-FedAvg: local representations, global top layers.

Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency. "Think Locally, Act
Globally: Federated Learning with Local and Global Representations." arXiv:2001.01523, 2020.

The layers nearest the output are shared and averaged; those below them, the local
representation, stay personal. By default only the classifier is shared, as in PFLlib;
``lg_global_layers N`` shares the top N top-level layers of the model (in forward order,
``Model.layers``). Clients train all layers locally.

``server_opt`` (with ``server_lr``, ``server_momentum``, ``beta1``, ``beta2``, ``tau``)
applies a server optimizer to the shared layers, as for ``fedper``; the default, ``sgd``
at ``server_lr`` 1, is the plain mean, bit for bit.
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import ASYNCHRONOUS_BN, Algorithm, HParam
from fedjax_sim.algorithms.partial import decoupled, plain_sgd
from fedjax_sim.algorithms.server_opt import SERVER_HPARAMS
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS_BN
HPARAMS = (
    HParam("lg_global_layers", None, int, lambda v: v is None or v >= 1,
           "a positive integer or unset",
           "LG-FedAvg: number of top layers (nearest the output) shared and averaged; the "
           "others stay personal (unset: the classifier head only); at most the model's "
           "layer count - 1"),
    *SERVER_HPARAMS,
)


def global_layers(model: Model, n: int | None) -> tuple[str, ...]:
    """The top-level layers LG-FedAvg shares.

    Args:
      model: the model; ``model.layers`` gives the forward order.
      n: how many of the last layers to share, or ``None`` for the model's head.

    Returns:
      The shared layer names.

    Raises:
      ValueError: if ``n`` is outside [1, number of layers - 1] (sharing every layer would
        be FedAvg, sharing none Local), or the model does not record its layer order.
    """
    if n is None:
        return tuple(model.head)
    layers = tuple(model.layers)
    if not layers:
        raise ValueError(f"lg_global_layers needs the layer order of model {model.name}, "
                         "which it does not record (Model.layers is empty)")
    if not 1 <= n <= len(layers) - 1:
        raise ValueError(
            f"lg_global_layers must be in [1, {len(layers) - 1}] for model {model.name} "
            f"(layers {', '.join(layers)}), got {n}"
        )
    return layers[len(layers) - n:]


def lg_fedavg(model: Model, *, cover=(), **hp) -> Algorithm:
    shared = global_layers(model, hp["lg_global_layers"])
    layers = tuple(jax.eval_shape(model.init, jax.random.key(0)))
    personal = tuple(name for name in layers if name not in shared)
    return decoupled("lg_fedavg", model, hp, personal, plain_sgd(model), specs=HPARAMS,
                     cover=cover, server_opt=hp["server_opt"])
