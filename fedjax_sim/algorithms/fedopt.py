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

:func:`server_optimizer` and :func:`server_step` apply any optax transformation to any
model tree, for other algorithms' server sides.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    Algorithm,
    HParam,
    federated_algorithm,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.fedavg import fedavg_method
from fedjax_sim.core.state import SimState
from fedjax_sim.models.base import Model

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")


def _unit(v):
    return 0 <= v < 1


HPARAMS = (
    HParam("server_opt", "sgd", str, lambda v: v in SERVER_OPTIMIZERS,
           f"one of {SERVER_OPTIMIZERS}",
           "FedOpt: the server optimizer applied to the pseudo-gradient",
           choices=SERVER_OPTIMIZERS),
    HParam("server_lr", 1.0, float, lambda v: v > 0, "> 0",
           "server learning rate η_g applied to the mean client update (SCAFFOLD, FedOpt)",
           traced=True),
    HParam("server_momentum", 0.9, float, _unit, "in [0, 1)",
           "FedOpt: momentum of server_opt=momentum (FedAvgM)", traced=True),
    HParam("beta1", 0.9, float, _unit, "in [0, 1)",
           "FedOpt: first-moment decay of server_opt=adam|yogi", traced=True),
    HParam("beta2", 0.99, float, _unit, "in [0, 1)",
           "FedOpt: second-moment decay of server_opt=adam|yogi", traced=True),
    HParam("tau", 1e-3, float, lambda v: v > 0, "> 0",
           "FedOpt: adaptivity τ (eps) of server_opt=adam|yogi|adagrad", traced=True),
)


def server_optimizer(name: str, hp: Mapping[str, Any]) -> optax.GradientTransformation:
    """The server optimizer ``name`` (one of ``SERVER_OPTIMIZERS``) with the values of
    ``hp`` (floats or traced scalar arrays: ``server_lr``, ``server_momentum``, ``beta1``,
    ``beta2``, ``tau``).

    Raises:
      ValueError: an unknown ``name``.
    """
    lr = hp["server_lr"]
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=hp["server_momentum"])
    if name == "adam":
        return optax.adam(lr, b1=hp["beta1"], b2=hp["beta2"], eps=hp["tau"])
    if name == "yogi":
        return optax.yogi(lr, b1=hp["beta1"], b2=hp["beta2"], eps=hp["tau"])
    if name == "adagrad":
        return optax.adagrad(lr, initial_accumulator_value=0.0, eps=hp["tau"] ** 2)
    raise ValueError(f"server_opt must be one of {', '.join(SERVER_OPTIMIZERS)}, got {name!r}")


def server_step(tx: optax.GradientTransformation, params: Any, mean: Any,
                opt_state: Any) -> tuple[Any, Any]:
    """One server step of ``tx`` on the pseudo-gradient ``params − mean``.

    Args:
      tx: any optax transformation.
      params: the server's model (any pytree).
      mean: the cohort's mean model, same structure.
      opt_state: ``tx``'s state.

    Returns:
      ``(new params, new opt_state)``; the new params are ``params + update``, computed as
      ``mean + ((params − mean) + update)`` so that an update of exactly minus the
      pseudo-gradient (SGD at learning rate 1) gives ``mean`` bit for bit.
    """
    pseudo = jax.tree.map(lambda x, m: x - m, params, mean)
    updates, opt_state = tx.update(pseudo, opt_state, params)
    new = jax.tree.map(lambda m, g, u: m + (g + u), mean, pseudo, updates)
    return new, opt_state


def with_server_optimizer(name: str, hp: Mapping[str, Any]) -> tuple[Callable, Callable]:
    """``(init_opt, step)`` of server optimizer ``name`` for a server keeping
    ``{"params": ..., "opt": ...}``: ``init_opt(params, traced)`` the optimizer state,
    ``step(traced, params, mean, opt_state) -> (params, opt_state)``."""

    def init_opt(params, traced):
        return server_optimizer(name, {**hp, **traced}).init(params)

    def step(traced, params, mean, opt_state):
        return server_step(server_optimizer(name, {**hp, **traced}), params, mean, opt_state)

    return init_opt, step


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


register("fedopt", fedopt, HPARAMS)
