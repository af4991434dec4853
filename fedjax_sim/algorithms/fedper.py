"""FedPer: a shared base and a personal head.

Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization
Layers." arXiv:1912.00818, 2019.

Clients train base and head together; only the base is sent and averaged; the head
(the model's classifier) never leaves the client.
"""

from __future__ import annotations

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.partial import decoupled, plain_sgd
from fedjax_sim.models.base import Model

HPARAMS = ()

# make(..., batch_order=...) is accepted (host-drawn batch orders, core.local.FixedOrder).
TAKES_BATCH_ORDER = True


def fedper(model: Model, *, batch_order=None, cover=(), **hp) -> Algorithm:
    """FedPer bound to ``model``; ``hp`` holds the common hyperparameters.

    ``batch_order``: optional (R, K, E, N_max) host sample orders that replace the random
    batch order, as for ``fedavg.fedavg``.
    """
    return decoupled("fedper", model, hp, model.head, plain_sgd(model), batch_order,
                     cover=cover)
