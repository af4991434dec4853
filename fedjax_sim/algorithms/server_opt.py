"""Server optimizers: an optax transformation stepping the global model on the
pseudo-gradient ``x − mean`` (Reddi et al., "Adaptive Federated Optimization", ICLR 2021;
see ``fedopt``). Shared by FedOpt and the ``server_opt`` option of FedPer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from fedjax_sim.algorithms.base import HParam

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")


def _unit(v):
    return 0 <= v < 1


# One definition for every algorithm with a server learning rate (SCAFFOLD, FedOpt, IncFL).
SERVER_LR = HParam("server_lr", 1.0, float, lambda v: v > 0, "> 0",
                   "server learning rate η_g applied to the mean client update "
                   "(SCAFFOLD, FedOpt, IncFL)", traced=True)

SERVER_HPARAMS = (
    HParam("server_opt", "sgd", str, lambda v: v in SERVER_OPTIMIZERS,
           f"one of {SERVER_OPTIMIZERS}",
           "FedOpt: the server optimizer applied to the pseudo-gradient",
           choices=SERVER_OPTIMIZERS),
    SERVER_LR,
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
