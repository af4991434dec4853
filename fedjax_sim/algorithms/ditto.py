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
    Algorithm,
    HParam,
    cross_entropy_loss,
    local_sgd,
    map_options,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.core.evaluate import count_correct
from fedjax_sim.core.rounds import advance, run_cohort
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

HPARAMS = (
    HParam("ditto_lambda", 1.0, float, lambda v: v >= 0, ">= 0",
           "Ditto: strength λ of the pull of the personal model towards the global one"),
    HParam("personal_epochs", 1, int, lambda v: v >= 1, "a positive integer",
           "Ditto: epochs of personal-model training per round"),
)


def ditto(model: Model, **hp) -> Algorithm:
    loss_fn = cross_entropy_loss(model)
    train = local_sgd(model, hp)
    lam = hp["ditto_lambda"]

    def init(key, data):
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {"params": broadcast(params, data.num_clients)}
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def round_fn(state, data):
        next_key, round_key = jax.random.split(state.key)
        global_params = state.server["params"]

        def proximal_loss(v, xb, yb, wb):
            gap = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), v, global_params)
            return loss_fn(v, xb, yb, wb) + 0.5 * lam * sum(jax.tree.leaves(gap))

        train_personal = local_sgd(model, hp, loss_fn=proximal_loss,
                                   epochs=hp["personal_epochs"])

        def client(global_params, own, x, y, n, key):
            global_key, personal_key = jax.random.split(key)
            w, loss = train(global_params, x, y, n, global_key)
            v, _ = train_personal(own["params"], x, y, n, personal_key)
            return w, {"params": v}, loss

        result = run_cohort(
            round_key, state.clients, data, client, join_ratio=hp["join_ratio"],
            mean_uploads=True, server=global_params, **map_options(hp),
        )
        server = {"params": result.uploads}
        return advance(state, next_key, server=server, clients=result.clients), {
            "train_loss": result.loss
        }

    def evaluate(state, data):
        return count_correct(
            lambda own, _, x: model.apply(own["params"], x), state.clients, None,
            data.test_x, data.test_y, data.test_counts, **map_options(hp),
        )

    size = num_params_bytes(model)
    return Algorithm("ditto", init, round_fn, evaluate, per_round_bytes(hp, size, size), hp)
