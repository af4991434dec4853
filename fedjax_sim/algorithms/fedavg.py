"""FedAvg.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.

Each sampled client runs local SGD from the global model; the server replaces the global
model by the sample-weighted mean of the returned models.
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import (
    Algorithm,
    check_batch_order,
    local_sgd,
    map_options,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
)
from fedjax_sim.core.evaluate import count_correct
from fedjax_sim.core.rounds import advance, round_orders, run_cohort
from fedjax_sim.core.state import SimState
from fedjax_sim.models.base import Model

HPARAMS = ()

# make(..., batch_order=...) is accepted (host-drawn batch orders, core.local.FixedOrder).
TAKES_BATCH_ORDER = True


def fedavg_round(model: Model, hp: dict, batch_order=None):
    """The FedAvg round, shared with the algorithms that only change evaluation.

    Args:
      batch_order: optional host sample orders (R, K, E, N_max) that replace the random
        batch order (see ``base.check_batch_order``).
    """
    train = local_sgd(model, hp)
    batch_order = check_batch_order(batch_order, hp)

    def round_fn(state: SimState, data):
        next_key, round_key = jax.random.split(state.key)
        global_params = state.server["params"]

        def client(start, _, x, y, n, key):
            params, loss = train(start, x, y, n, key)
            return params, None, loss

        result = run_cohort(
            round_key, state.clients, data, client, join_ratio=hp["join_ratio"],
            mean_uploads=True, server=global_params,
            orders=round_orders(batch_order, state.round), **map_options(hp),
        )
        server = {"params": result.uploads}
        return advance(state, next_key, server=server), {"train_loss": result.loss}

    return round_fn


def global_init(model: Model):
    """``init`` for algorithms that keep only a global model."""

    def init(key, data):
        state_key, model_key = jax.random.split(key)
        return SimState.create(state_key, {"params": model.init(model_key)}, None, data.num_clients)

    return init


def fedavg(model: Model, *, batch_order=None, **hp) -> Algorithm:
    """FedAvg bound to ``model``; ``hp`` holds the common hyperparameters.

    ``batch_order``, an optional (R, K, E, N_max) integer array of per-round, per-client,
    per-epoch sample orders drawn on the host (``core.local.sample_batch_orders``),
    replaces the in-graph random batch order, e.g. to compare with another implementation
    step by step. It is not a hyperparameter (``make`` does not take it, and it is not
    recorded in ``hparams``).
    """

    def evaluate(state, data):
        return count_correct(
            shared_logits(model), None, state.server["params"],
            data.test_x, data.test_y, data.test_counts, **map_options(hp),
        )

    size = num_params_bytes(model)
    return Algorithm(
        "fedavg", global_init(model), fedavg_round(model, hp, batch_order), evaluate,
        per_round_bytes(hp, size, size), hp,
    )
