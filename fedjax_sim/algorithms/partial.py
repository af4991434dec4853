"""Layer-wise decoupling shared by FedPer, FedRep and LG-FedAvg.

The model's top-level layers split into a personal part, which lives on the clients as a
(K, ...) tree and never leaves them, and a shared part, which the server averages. The
three methods differ only in which layers are personal and how a client trains locally.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from fedjax_sim.algorithms.base import (
    Algorithm,
    check_batch_order,
    map_options,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.core.evaluate import count_correct
from fedjax_sim.core.rounds import advance, round_orders, run_cohort
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels import split
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

# local_fn(params, x, y, n, key) -> (params, loss)
LocalFn = Callable


def decoupled(
    name: str, model: Model, hp: dict, personal: tuple[str, ...], local_fn: LocalFn,
    batch_order=None,
) -> Algorithm:
    """An algorithm whose layers ``personal`` stay on the clients.

    Args:
      name: registry name.
      model: the model.
      hp: resolved hyperparameters (common ones at least).
      personal: top-level parameter names kept per client.
      local_fn: one client's local training of the full parameter dict.
      batch_order: optional host sample orders (R, K, E, N_max) that replace the random
        batch order; ``local_fn`` must hand its key to ``core.local.train`` unchanged
        (see ``base.check_batch_order``).
    """
    batch_order = check_batch_order(batch_order, hp)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    missing = set(personal) - set(shapes)
    if missing or not personal or set(personal) == set(shapes):
        raise ValueError(
            f"{name}: personal layers {sorted(personal)} must be a proper, non-empty subset "
            f"of the model's layers {sorted(shapes)}"
        )

    def init(key, data):
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {"personal": broadcast(split.take(params, personal), data.num_clients)}
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def round_fn(state, data):
        next_key, round_key = jax.random.split(state.key)
        global_params = state.server["params"]
        shared = split.drop(global_params, personal)

        def client(shared, own, x, y, n, key):
            params, loss = local_fn(split.merge(shared, own["personal"]), x, y, n, key)
            return split.drop(params, personal), {"personal": split.take(params, personal)}, loss

        result = run_cohort(
            round_key, state.clients, data, client, join_ratio=hp["join_ratio"],
            mean_uploads=True, server=shared,
            orders=round_orders(batch_order, state.round), **map_options(hp),
        )
        new_shared = result.uploads
        # The server's copy of the personal layers is never used by anyone; it keeps the
        # initial values so that the global tree has the model's full structure.
        server = {"params": split.merge(global_params, new_shared)}
        return advance(state, next_key, server=server, clients=result.clients), {
            "train_loss": result.loss
        }

    def evaluate(state, data):
        def logits(own, global_params, x):
            return model.apply(split.merge(global_params, own["personal"]), x)

        return count_correct(
            logits, state.clients, state.server["params"],
            data.test_x, data.test_y, data.test_counts, **map_options(hp),
        )

    shared_names = tuple(n for n in shapes if n not in personal)
    size = num_params_bytes(model, shared_names)
    return Algorithm(name, init, round_fn, evaluate, per_round_bytes(hp, size, size), hp)
