"""Ditto: a global model by FedAvg and a personal model pulled towards it.

Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
Personalization." ICML 2021.

Each sampled client trains the global model locally (uploaded and averaged as in FedAvg)
and its personal model v for ``personal_epochs`` epochs on the loss
``L(v) + λ/2 ||v − w||²``, i.e. gradient ``∇L(v) + λ (v − w)``, where w is the global
model it received. Clients are evaluated on v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms.base import (
    Abilities,
    Algorithm,
    HParam,
    cross_entropy_loss,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.local import own_logits
from fedjax_sim.core.rounds import Method, personal_only
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

# The global model is FedAvg's (uploads in its space); the personal model is computed from
# the global model and the client's own data: under DP it is post-processing.
ABILITIES = Abilities(private=True)

HPARAMS = (
    HParam("ditto_lambda", 1.0, float, lambda v: v >= 0, ">= 0",
           "Ditto: strength λ of the pull of the personal model towards the global one",
           traced=True, tune_values=(0.1, 1.0, 2.0)),
    HParam("personal_epochs", 1, int, lambda v: v >= 1, "a positive integer",
           "Ditto: epochs of personal-model training per round"),
)


def ditto(model: Model, *, cover=(), **hp) -> Algorithm:
    loss_fn = cross_entropy_loss(model)

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {"params": broadcast(params, data.num_clients)}
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def client_update(traced, global_params, own, x, y, n, key):
        h = {**hp, **traced}

        def proximal_loss(v, xb, yb, wb):
            gap = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), v, global_params)
            return loss_fn(v, xb, yb, wb) + 0.5 * h["ditto_lambda"] * sum(jax.tree.leaves(gap))

        global_key, personal_key = jax.random.split(key)
        w, loss = local_sgd(model, h)(global_params, x, y, n, global_key)
        v, _ = local_sgd(model, h, loss_fn=proximal_loss, epochs=hp["personal_epochs"])(
            own["params"], x, y, n, personal_key)
        return w, {"params": v}, loss

    size = num_params_bytes(model)
    method = Method(client_update, own_logits(model), eval_inputs=personal_only)
    return federated_algorithm("ditto", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)
