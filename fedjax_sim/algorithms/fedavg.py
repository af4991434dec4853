"""FedAvg.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.

Each sampled client runs local SGD from the global model; the server replaces the global
model by the sample-weighted mean of the returned models.
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS_BN,
    Algorithm,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
)
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS_BN
HPARAMS = ()

# make(..., batch_order=...) is accepted (host-drawn batch orders, core.local.FixedOrder).
TAKES_BATCH_ORDER = True


def fedavg_method(model: Model, hp: dict) -> Method:
    """FedAvg's own parts: local SGD from the global model, evaluated on the global model;
    shared with the algorithms that only change evaluation."""

    def client_update(traced, start, own, x, y, n, key):
        del own
        params, loss = local_sgd(model, {**hp, **traced})(start, x, y, n, key)
        return params, None, loss

    return Method(client_update, shared_logits(model))


def global_init(model: Model):
    """``init_with`` for algorithms that keep only a global model."""

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        return SimState.create(state_key, {"params": model.init(model_key)}, None, data.num_clients)

    return init_with


def fedavg(model: Model, *, batch_order=None, cover=(), **hp) -> Algorithm:
    """FedAvg bound to ``model``; ``hp`` holds the common hyperparameters.

    ``batch_order``, an optional (R, K, E, N_max) integer array of per-round, per-client,
    per-epoch sample orders drawn on the host (``core.local.sample_batch_orders``),
    replaces the in-graph random batch order, e.g. to compare with another implementation
    step by step. It is not a hyperparameter (``make`` does not take it, and it is not
    recorded in ``hparams``). ``cover``: see ``base.assemble``.
    """
    size = num_params_bytes(model)
    return federated_algorithm(
        "fedavg", hp, HPARAMS, fedavg_method(model, hp), init_with=global_init(model),
        comm_bytes=per_round_bytes(hp, size, size), batch_order=batch_order, cover=cover,
    )
