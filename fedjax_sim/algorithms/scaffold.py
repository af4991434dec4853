"""SCAFFOLD: local steps corrected by control variates (option II).

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning." ICML 2020 (Algorithm 1, control variate option II).

The server keeps the global model x and a control variate c; every client keeps its own
control variate c_i (client state, (K, ...)). All start at zero. A sampled client starts
from y_i = x and takes K_i local steps y_i ← y_i − η_l (g_i(y_i) − c_i + c), then sets

    c_i⁺ = c_i − c + (x − y_i) / (K_i η_l)

and uploads Δy_i = y_i − x and Δc_i = c_i⁺ − c_i. The server steps

    x ← x + η_g · mean_S(Δy_i),        c ← c + Σ_{i∈S} p_i Δc_i.

K_i counts client i's real local steps (``local_steps``, or ``local_epochs`` ×
⌈n_i / batch_size⌉: the steps it takes on its own data, not the padded scan length).
Weights follow FedAvg's objective Σ_i p_i f_i with p_i = n_i / Σ_j n_j over all K clients:
mean_S is the sample-weighted mean over the cohort (FedAvg's aggregation), and the c step
keeps c = Σ_i p_i c_i exactly under partial participation. With equal client sizes these
are the paper's 1/|S| Σ_{i∈S} Δy_i and (|S| / N) · 1/|S| Σ_{i∈S} Δc_i. The client
optimizer (momentum, weight decay) applies to the corrected gradient.

With every control variate 0 (the first round) the correction adds exact zeros, and with
η_g = 1 the server's new x is the cohort's mean model itself (computed as
``mean + (1 − η_g)(x − mean)``), so the first round is FedAvg's bit for bit. ``server_lr``
(η_g) is traced.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    Abilities,
    Algorithm,
    client_optimizer,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
    zeros_init,
)
from fedjax_sim.algorithms.server_opt import SERVER_LR
from fedjax_sim.core.rounds import Method
from fedjax_sim.models.base import Model

# The virtual clock's partial cohorts would break it.
ABILITIES = Abilities(
    batch_norm=True,
    clock=False,
    clock_refusal="its server control variate steps by |S| / N of the clients that report")
HPARAMS = (SERVER_LR,)


def corrected(shift: Any) -> optax.GradientTransformation:
    """Adds ``shift`` (a pytree like the parameters, here ``c − c_i``) to every gradient."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(jnp.add, updates, shift), state

    return optax.GradientTransformation(init, update)


def active_steps(hp: dict, count: jax.Array) -> jax.Array:
    """The real local steps K_i of a client with ``count`` training samples (float32)."""
    if hp["local_steps"] is not None:
        return jnp.float32(hp["local_steps"])
    batch = hp["batch_size"]
    per_epoch = (jnp.maximum(count, 1) + batch - 1) // batch
    return (hp["local_epochs"] * per_epoch).astype(jnp.float32)


def scaffold(model: Model, *, cover=(), **hp) -> Algorithm:
    """SCAFFOLD (option II) bound to ``model``; ``hp`` holds the common hyperparameters and
    ``server_lr``.

    State: ``server = {"params": x, "control": c, "weight": Σ_k n_k}``, ``clients =
    {"control": c_i}`` with leaves (K, ...).
    """

    init_with = zeros_init(model, "control", "control")

    def send(traced, state, round_key):
        del traced
        return round_key, (state.server["params"], state.server["control"]), None

    def client_update(traced, received, own, x, y, n, key):
        h = {**hp, **traced}
        start, c = received
        c_i = own["control"]
        optimizer = optax.chain(corrected(jax.tree.map(jnp.subtract, c, c_i)),
                                client_optimizer(h))
        params, loss = local_sgd(model, h, optimizer=optimizer)(start, x, y, n, key)
        scale = 1.0 / (active_steps(h, n) * h["lr"])
        c_new = jax.tree.map(lambda ci, cg, x0, yi: ci - cg + (x0 - yi) * scale,
                             c_i, c, start, params)
        delta_c = jax.tree.map(jnp.subtract, c_new, c_i)
        return (params, delta_c), {"control": c_new}, loss

    def server_update(traced, state, cohort, context):
        del context
        lr = traced["server_lr"]
        server = state.server
        mean_y, mean_dc = cohort.uploads  # sample-weighted means over the cohort
        params = jax.tree.map(lambda m, x: m + (1.0 - lr) * (x - m), mean_y, server["params"])
        share = jnp.sum(cohort.counts.astype(jnp.float32)) / server["weight"]
        control = jax.tree.map(lambda c, d: c + share * d, server["control"], mean_dc)
        return {"params": params, "control": control, "weight": server["weight"]}, {}

    size = 2 * num_params_bytes(model)  # the model and a control variate, each way
    method = Method(client_update, shared_logits(model), server_update=server_update,
                    broadcast=send)
    return federated_algorithm("scaffold", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("scaffold", scaffold, HPARAMS, abilities=ABILITIES)
