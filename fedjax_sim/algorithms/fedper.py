"""FedPer: a shared base and a personal head.

Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization
Layers." arXiv:1912.00818, 2019.

Clients train base and head together; only the base is sent and averaged; the head
(the model's classifier) never leaves the client.
"""

from __future__ import annotations

from fedjax_sim.algorithms.base import Algorithm, client_optimizer, cross_entropy_loss, schedule
from fedjax_sim.algorithms.partial import decoupled
from fedjax_sim.core import local
from fedjax_sim.models.base import Model

HPARAMS = ()


def fedper(model: Model, **hp) -> Algorithm:
    loss_fn = cross_entropy_loss(model)
    optimizer = client_optimizer(hp)
    budget = schedule(hp)

    def local_fn(params, x, y, n, key):
        return local.train(loss_fn, optimizer, params, x, y, n, key, **budget)

    return decoupled("fedper", model, hp, model.head, local_fn)
