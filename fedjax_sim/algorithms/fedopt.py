"""FedOpt: FedAvg's client updates, applied by a server optimizer.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
Optimization." ICLR 2021.

Sampled clients train locally from the global model x as in FedAvg. The server treats the
pseudo-gradient ``g = x − mean_S(y_i)`` (minus the sample-weighted mean client update) as
a gradient and steps an optax transformation on it, ``x ← x + update(g)``:

* ``sgd``: ``x − η g`` (η = 1 is FedAvg: the step is computed as ``mean + (g + update)``,
  whose bracket is an exact 0 then, so the new model is the cohort's mean bit for bit);
* ``momentum``: FedAvgM, ``optax.sgd(η, momentum=server_momentum)``;
* ``adam``: FedAdam, ``optax.adam(η, b1=beta1, b2=beta2, eps=tau)``;
* ``yogi``: FedYogi, ``optax.yogi(η, b1=beta1, b2=beta2, eps=tau)``;
* ``adagrad``: FedAdagrad, ``optax.adagrad(η, initial_accumulator_value=0,
  eps=tau²)``.

The optax forms differ from the paper's Algorithm 2 in details: optax's Adam corrects the
moments' bias and starts v at 0 (the paper: no correction, v₋₁ >= τ²); its Adagrad
divides by ``sqrt(v + τ²)`` rather than ``sqrt(v) + τ``; its Yogi starts v at 1e-6.
``server_lr``, ``server_momentum``, ``beta1``, ``beta2`` and ``tau`` are traced (optax
takes scalar arrays for each); ``server_opt`` fixes the optimizer state, so it is
structural. The adaptive optimizers want a smaller ``server_lr`` than 1 (the paper tunes
η over 10⁻³ … 10⁰).

:func:`server_optimizer` and :func:`server_step` (``algorithms.server_opt``) apply any
optax transformation to any model tree; FedPer takes the same ``server_opt`` option for
its shared layers.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS,
    Algorithm,
    federated_algorithm,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.fedavg import fedavg_method
from fedjax_sim.algorithms.server_opt import (  # noqa: F401  (re-exported)
    SERVER_HPARAMS,
    SERVER_OPTIMIZERS,
    server_optimizer,
    server_step,
    with_server_optimizer,
)
from fedjax_sim.core.state import SimState
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS
HPARAMS = SERVER_HPARAMS


def fedopt(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedOpt bound to ``model``; ``hp`` holds the common hyperparameters and ``HPARAMS``.

    State: ``server = {"params": x, "opt": the server optimizer's state}``.
    """
    init_opt, step = with_server_optimizer(hp["server_opt"], hp)

    def init_with(key, data, traced):
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        return SimState.create(state_key, {"params": params, "opt": init_opt(params, traced)},
                               None, data.num_clients)

    def server_update(traced, state, cohort, context):
        del context
        params, opt = step(traced, state.server["params"], cohort.uploads, state.server["opt"])
        return {"params": params, "opt": opt}, {}

    method = fedavg_method(model, hp)._replace(server_update=server_update)
    size = num_params_bytes(model)
    return federated_algorithm("fedopt", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("fedopt", fedopt, HPARAMS, abilities=ABILITIES)
