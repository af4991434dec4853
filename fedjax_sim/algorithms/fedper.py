"""FedPer: a shared base and a personal head.

Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization
Layers." arXiv:1912.00818, 2019.

Clients train base and head together; only the base is sent and averaged; the head
(the model's classifier) never leaves the client.

``server_opt`` (with ``server_lr``, ``server_momentum``, ``beta1``, ``beta2``, ``tau``)
applies a server optimizer to the base as FedOpt does to the whole model (Reddi et al.,
ICLR 2021; see ``fedopt``); the default, ``sgd`` at ``server_lr`` 1, is the plain mean,
bit for bit.
"""

from __future__ import annotations

from fedjax_sim.algorithms.base import ASYNCHRONOUS_BN, Algorithm
from fedjax_sim.algorithms.partial import decoupled, plain_sgd
from fedjax_sim.algorithms.server_opt import SERVER_HPARAMS
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS_BN
HPARAMS = SERVER_HPARAMS

# make(..., batch_order=...) is accepted (host-drawn batch orders, core.local.FixedOrder).
TAKES_BATCH_ORDER = True


def fedper(model: Model, *, batch_order=None, cover=(), **hp) -> Algorithm:
    """FedPer bound to ``model``; ``hp`` holds the common hyperparameters.

    ``batch_order``: optional (R, K, E, N_max) host sample orders that replace the random
    batch order, as for ``fedavg.fedavg``.
    """
    return decoupled("fedper", model, hp, model.head, plain_sgd(model), batch_order,
                     specs=HPARAMS, cover=cover, server_opt=hp["server_opt"])
