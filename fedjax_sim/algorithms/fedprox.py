"""FedProx: FedAvg with a proximal term in each client's local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
Networks." MLSys 2020.

Each sampled client minimizes ``f_k(w) + μ/2 ||w − w_g||²`` from the global model ``w_g``
it received, i.e. its SGD steps use the gradient ``∇f_k(w) + μ (w − w_g)``; the server
averages the returned models as FedAvg does. ``mu`` (μ >= 0) is traced. μ = 0 is FedAvg:
where every value the round is built for is 0, the term is left out of the program (as
momentum is, see ``base``); a traced 0 adds ``0 · (w − w_g)``, which leaves every
gradient, hence every float of FedAvg's round, unchanged.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS_BN,
    Algorithm,
    HParam,
    client_optimizer,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
)
from fedjax_sim.algorithms.fedavg import global_init
from fedjax_sim.core.rounds import Method
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS_BN
HPARAMS = (
    HParam("mu", 0.01, float, lambda v: v >= 0, ">= 0",
           "FedProx: strength μ of the proximal term μ/2 ||w - w_global||^2 (0: FedAvg)",
           traced=True, zero_off=True, tune_values=(0.001, 0.01, 0.1, 1.0)),
)


def proximal(mu: Any, anchor: Any) -> optax.GradientTransformation:
    """Adds ``mu * (params − anchor)`` to the gradient: the gradient of
    ``mu/2 ||params − anchor||²``.

    Args:
      mu: a float or a (traced) scalar array.
      anchor: a pytree with the parameters' structure (the global model).
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda g, w, a: g + mu * (w - a), updates, params, anchor), state

    return optax.GradientTransformation(init, update)


def fedprox(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedProx bound to ``model``; ``hp`` holds the common hyperparameters and ``mu``."""

    def client_update(traced, start, own, x, y, n, key):
        del own
        h = {**hp, **traced}
        optimizer = client_optimizer(h)
        # mu compiled in as 0 (every value 0): FedAvg's program, nothing added.
        if not (isinstance(h["mu"], int | float) and h["mu"] == 0):
            optimizer = optax.chain(proximal(h["mu"], start), optimizer)
        params, loss = local_sgd(model, h, optimizer=optimizer)(start, x, y, n, key)
        return params, None, loss

    size = num_params_bytes(model)
    return federated_algorithm(
        "fedprox", hp, HPARAMS, Method(client_update, shared_logits(model)),
        init_with=global_init(model), comm_bytes=per_round_bytes(hp, size, size),
        cover=cover)


register("fedprox", fedprox, HPARAMS, abilities=ABILITIES)
