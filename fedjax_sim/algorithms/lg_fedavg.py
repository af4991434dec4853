"""LG-FedAvg: local representations, a global head.

Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency. "Think Locally, Act
Globally: Federated Learning with Local and Global Representations." arXiv:2001.01523, 2020.

As in the paper (and PFLlib), every layer but the classifier is personal; the classifier
is shared and averaged. Clients train all layers locally.
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import Algorithm, local_sgd
from fedjax_sim.algorithms.partial import decoupled
from fedjax_sim.models.base import Model

HPARAMS = ()


def lg_fedavg(model: Model, **hp) -> Algorithm:
    layers = tuple(jax.eval_shape(model.init, jax.random.key(0)))
    personal = tuple(name for name in layers if name not in model.head)
    return decoupled("lg_fedavg", model, hp, personal, local_sgd(model, hp))
