"""Local: every client trains alone on its own data; nothing is communicated.

The reference that personalized FL must beat for each client (Motley's "hurt" fraction and
the incentivized participation rate are measured against it).
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import Abilities, Algorithm, federated_algorithm, local_sgd
from fedjax_sim.core.rounds import Method, keep_server, personal_only
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

# Batch-normalized models: every client keeps its own statistics.
ABILITIES = Abilities(batch_norm=True)
HPARAMS = ()


def own_logits(model: Model):
    """Evaluation logits of a client's own ``params``."""
    return lambda own, _shared, x: model.apply(own["params"], x)


def local(model: Model, *, cover=(), **hp) -> Algorithm:
    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        # Every client starts from the same initial model, as in the federated runs.
        clients = {"params": broadcast(model.init(model_key), data.num_clients)}
        return SimState.create(state_key, None, clients, data.num_clients)

    def client_update(traced, received, own, x, y, n, key):
        del received
        params, loss = local_sgd(model, {**hp, **traced})(own["params"], x, y, n, key)
        return None, {"params": params}, loss

    # Nothing is sent: the cohort receives no global model and uploads nothing (the
    # mean-upload path still trains it in place).
    method = Method(client_update, own_logits(model), server_update=keep_server,
                    broadcast=lambda traced, state, key: (key, None, None),
                    eval_inputs=personal_only)
    return federated_algorithm("local", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=lambda data: (0, 0), cover=cover)
