"""Local: every client trains alone on its own data; nothing is communicated.

The reference that personalized FL must beat for each client (Motley's "hurt" fraction and
the incentivized participation rate are measured against it).
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import Algorithm, local_sgd, map_options
from fedjax_sim.core.evaluate import count_correct
from fedjax_sim.core.rounds import advance, run_cohort
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

HPARAMS = ()


def local(model: Model, **hp) -> Algorithm:
    train = local_sgd(model, hp)

    def init(key, data):
        state_key, model_key = jax.random.split(key)
        # Every client starts from the same initial model, as in the federated runs.
        clients = {"params": broadcast(model.init(model_key), data.num_clients)}
        return SimState.create(state_key, None, clients, data.num_clients)

    def round_fn(state, data):
        next_key, round_key = jax.random.split(state.key)

        def client(_, own, x, y, n, key):
            params, loss = train(own["params"], x, y, n, key)
            return None, {"params": params}, loss

        # No uploads; the mean-upload path trains the cohort in place.
        result = run_cohort(
            round_key, state.clients, data, client, join_ratio=hp["join_ratio"],
            mean_uploads=True, **map_options(hp),
        )
        return advance(state, next_key, clients=result.clients), {"train_loss": result.loss}

    def evaluate(state, data):
        return count_correct(
            lambda own, _, x: model.apply(own["params"], x), state.clients, None,
            data.test_x, data.test_y, data.test_counts, **map_options(hp),
        )

    return Algorithm("local", init, round_fn, evaluate, lambda data: (0, 0), hp)
