"""APFL: adaptive personalized federated learning.

Deng, Kamani, Mahdavi. "Adaptive Personalized Federated Learning." arXiv:2003.13461, 2020.

Each client holds a personal model v and a mixing weight α. Per mini-batch it steps the
global copy w on its own loss, then steps v on the loss of the mixed output
``α·v(x) + (1 − α)·w(x)`` with w's output held fixed, and (adaptive α) steps α on the same
loss, clipped to [0, 1], with its own learning rate ``apfl_alpha_lr`` (the client lr
unless set). w is uploaded and averaged; clients are evaluated on the mixed output with the
current global model. ``summary.json`` records the clients' final α (mean, min, max and the
shares at 0 and at 1: clients that dropped the personal or the global model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.base import (
    Algorithm,
    HParam,
    client_optimizer,
    cross_entropy_loss,
    federated_algorithm,
    num_params_bytes,
    per_round_bytes,
    schedule,
)
from fedjax_sim.core import local
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState, to_host
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

HPARAMS = (
    HParam("apfl_alpha", 0.5, float, lambda v: 0 <= v <= 1, "in [0, 1]",
           "APFL: initial mixing weight α of the personal model", traced=True),
    HParam("apfl_adaptive", True, bool, lambda v: isinstance(v, bool), "true or false",
           "APFL: learn α by gradient descent"),
    HParam("apfl_alpha_lr", None, float, lambda v: v is None or v >= 0, ">= 0 or unset",
           "APFL: learning rate of α (unset: the client lr; 0 keeps α at apfl_alpha)",
           traced=True, fallback="lr"),
)


def alpha_report(alpha) -> dict:
    """Summary fields of the clients' final mixing weights.

    Args:
      alpha: (K,) mixing weights in [0, 1].

    Returns:
      ``apfl_alpha_mean``, ``apfl_alpha_min``, ``apfl_alpha_max``, and
      ``apfl_alpha_at_0`` / ``apfl_alpha_at_1``: the share of clients whose α was clipped to
      0 (the global model only) or 1 (the personal model only).
    """
    alpha = np.asarray(alpha, np.float64).reshape(-1)
    return {
        "apfl_alpha_mean": float(alpha.mean()),
        "apfl_alpha_min": float(alpha.min()),
        "apfl_alpha_max": float(alpha.max()),
        "apfl_alpha_at_0": float(np.mean(alpha == 0.0)),
        "apfl_alpha_at_1": float(np.mean(alpha == 1.0)),
    }


def apfl(model: Model, *, cover=(), **hp) -> Algorithm:
    loss_fn = cross_entropy_loss(model)
    budget = schedule(hp)
    adaptive = hp["apfl_adaptive"]

    def init_with(key, data, traced):
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {
            "params": broadcast(params, data.num_clients),
            "alpha": jnp.full((data.num_clients,), traced["apfl_alpha"], jnp.float32),
        }
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def client_update(traced, global_params, own, x, y, n, key):
        optimizer = client_optimizer({**hp, **traced})

        def step(carry, xb, yb, wb):
            w, v, alpha, w_opt, v_opt = carry
            loss, grads = jax.value_and_grad(loss_fn)(w, xb, yb, wb)
            updates, w_opt = optimizer.update(grads, w_opt, w)
            w = optax.apply_updates(w, updates)
            w_logits = jax.lax.stop_gradient(model.apply(w, xb))

            def mixed_loss(v, a):
                logits = a * model.apply(v, xb) + (1.0 - a) * w_logits
                return local.weighted_cross_entropy(logits, yb, wb)

            v_grads, alpha_grad = jax.grad(mixed_loss, argnums=(0, 1))(v, alpha)
            updates, v_opt = optimizer.update(v_grads, v_opt, v)
            v = optax.apply_updates(v, updates)
            if adaptive:
                alpha = jnp.clip(alpha - traced["apfl_alpha_lr"] * alpha_grad, 0.0, 1.0)
            return (w, v, alpha, w_opt, v_opt), loss

        carry = (global_params, own["params"], own["alpha"],
                 optimizer.init(global_params), optimizer.init(own["params"]))
        (w, v, alpha, _, _), loss = local.scan_batches(step, carry, x, y, n, key, **budget)
        return w, {"params": v, "alpha": alpha}, loss

    def logits(own, global_params, x):
        a = own["alpha"]
        return a * model.apply(own["params"], x) + (1 - a) * model.apply(global_params, x)

    def report(state):
        # Gathers client shards held by other processes (multi-host runs).
        return alpha_report(to_host(state.clients["alpha"]))

    size = num_params_bytes(model)
    return federated_algorithm("apfl", hp, HPARAMS, Method(client_update, logits),
                               init_with=init_with, comm_bytes=per_round_bytes(hp, size, size),
                               report=report, cover=cover)
