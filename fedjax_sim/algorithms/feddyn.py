"""FedDyn: federated learning with dynamic regularization.

Acar, Zhao, Matas, Mattina, Whatmough, Saligrama. "Federated Learning Based on Dynamic
Regularization." ICLR 2021 (Algorithm 1).

Every client k keeps the gradient state ∇L_k(θ_k) (client state, (K, ...), zero at the
start); the server keeps the model θ and the state h (zero at the start). A sampled client
receives θ^{t−1} and minimizes its dynamically regularized risk (Eq. 1)

    θ_k^t = argmin_θ  L_k(θ) − ⟨∇L_k(θ_k^{t−1}), θ⟩ + α/2 ||θ − θ^{t−1}||²,

approximately, by the run's local SGD (epochs or steps, batch size, client optimizer) on
the gradient ∇L_k(θ) − ∇L_k(θ_k^{t−1}) + α (θ − θ^{t−1}). It then updates its state by
the first-order condition of Eq. 1 (Eq. 2)

    ∇L_k(θ_k^t) = ∇L_k(θ_k^{t−1}) − α (θ_k^t − θ^{t−1})

and uploads θ_k^t; clients that are not sampled keep their state. The server steps

    h^t = h^{t−1} − α Σ_{k∈P_t} p_k (θ_k^t − θ^{t−1}),
    θ^t = Σ_{k∈P_t} (n_k / Σ_{j∈P_t} n_j) θ_k^t − h^t / α.

Weights follow FedAvg's objective Σ_k p_k L_k, p_k = n_k / Σ_j n_j over all K clients:
the paper's uniform 1/|P_t| mean and 1/m factor are these with equal client sizes (as in
``scaffold``). Clients are evaluated on the server model θ^t. ``feddyn_alpha`` (α > 0) is
traced.

α → 0: the regularizer and the gradient states vanish, so the clients train as FedAvg's,
but the server still subtracts h^t / α = −Σ_{s≤t} Σ_{k∈P_s} p_k (θ_k^s − θ^{s−1}), the
accumulated drift of every round, which does not vanish: FedDyn has no FedAvg limit
(its first round ends at mean + (Σ_{P_1} p_k)(mean − θ^0), an extrapolation).

On the virtual clock's synchronous conditions the members whose update is not aggregated
keep their state and count in neither sum (their weights are zero); the asynchronous
conditions are refused (the server's h step needs the model the clients started from).

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
    HParam,
    client_optimizer,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
    zeros_init,
)
from fedjax_sim.core.rounds import Method
from fedjax_sim.models.base import Model

# Synchronous clock conditions only: the h step reads the model the cohort started from.
ABILITIES = Abilities()
HPARAMS = (
    HParam("feddyn_alpha", 0.01, float, lambda v: v > 0, "> 0",
           "FedDyn: strength α of the dynamic regularizer (Acar et al. use 0.1, 0.01, 0.001)",
           traced=True, tune_values=(0.001, 0.01, 0.1)),
)


def dynamic_regularizer(alpha: Any, state: Any, anchor: Any) -> optax.GradientTransformation:
    """Adds ``−state + alpha · (params − anchor)`` to the gradient: the gradient of
    ``−⟨state, params⟩ + alpha/2 ||params − anchor||²`` (FedDyn's Eq. 1 without L_k).

    Args:
      alpha: a float or a (traced) scalar array.
      state: the client's gradient state ∇L_k(θ_k^{t−1}), a pytree like the parameters.
      anchor: the model the client received, θ^{t−1}.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, opt_state, params=None):
        return jax.tree.map(lambda g, s, w, a: g - s + alpha * (w - a),
                            updates, state, params, anchor), opt_state

    return optax.GradientTransformation(init, update)


def feddyn(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedDyn bound to ``model``; ``hp`` holds the common hyperparameters and
    ``feddyn_alpha``.

    State: ``server = {"params": θ, "h": h, "weight": Σ_k n_k}``, ``clients = {"grad":
    ∇L_k(θ_k)}`` with leaves (K, ...).
    """

    init_with = zeros_init(model, "h", "grad")

    def client_update(traced, start, own, x, y, n, key):
        h = {**hp, **traced}
        alpha = h["feddyn_alpha"]
        optimizer = optax.chain(dynamic_regularizer(alpha, own["grad"], start),
                                client_optimizer(h))
        params, loss = local_sgd(model, h, optimizer=optimizer)(start, x, y, n, key)
        grad = jax.tree.map(lambda g, w, a: g - alpha * (w - a), own["grad"], params, start)
        return params, {"grad": grad}, loss

    def server_update(traced, state, cohort, context):
        del context
        alpha = traced["feddyn_alpha"]
        server = state.server
        mean = cohort.uploads  # the sample-weighted mean over the members that count
        share = jnp.sum(cohort.counts.astype(jnp.float32)) / server["weight"]
        h = jax.tree.map(lambda h_, m, w: h_ - alpha * share * (m - w),
                         server["h"], mean, server["params"])
        # A product with 1/α rather than a division: the same floats whether α is traced
        # or compiled in (XLA turns a division by a constant into that product).
        inverse = 1.0 / alpha
        params = jax.tree.map(lambda m, h_: m - h_ * inverse, mean, h)
        return {"params": params, "h": h, "weight": server["weight"]}, {}

    size = num_params_bytes(model)
    method = Method(client_update, shared_logits(model), server_update=server_update)
    return federated_algorithm("feddyn", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("feddyn", feddyn, HPARAMS, abilities=ABILITIES)
