"""FedAMP: attentive message passing between every pair of clients' models.

Huang, Chu, Zhou, Wang, Liu, Pei, Zhang. "Personalized Cross-Silo Federated Learning on
Non-IID Data." AAAI 2021.

Every client k keeps a personalized model w_k; the server keeps the latest copy of each
(the client state here). The objective is Σ_k F_k(w_k) + λ Σ_{i<j} A(||w_i − w_j||²) with
the attention-inducing function A(t) = 1 − exp(−t/σ), A'(t) = exp(−t/σ)/σ. A round
alternates a gradient step on the attention term at the server and a proximal step on
each client:

* (R1) attention weights, a K × K kernel over the client axis, from the squared distances
  between all pairs of current models:

      ξ_{k,j} = α A'(||w_k − w_j||²)  (j ≠ k),      ξ_{k,k} = 1 − Σ_{j≠k} ξ_{k,j}

* (R2) message passing: client k's personalized cloud model is u_k = Σ_j ξ_{k,j} w_j,
  the gradient step U = W − α ∇ Σ_{i<j} A(||w_i − w_j||²) with the gradient's factor 2
  folded into α (as PFLlib computes ξ).
* (R3) proximal update of a sampled client, approximately (local SGD epochs):

      w_k ← argmin_w F_k(w) + λ / (2α) ||w − u_k||²

  starting from u_k; the gradient of the penalty is (λ / α)(w − u_k).

α (the paper's α_k, constant here), λ and σ are ``fedamp_alpha``, ``fedamp_lambda`` and
``fedamp_sigma``, all traced. Clients are evaluated on their own w_k.

The distances come from one Gram matrix of the K models (taken relative to one of them,
in float32 at the highest matmul precision); (R1) and (R2) are two K-sized contractions, so
the server step costs O(K² |w|) with no loop over clients or pairs. The server reads the
stored models of all K clients in every round (the paper's setting is cross-silo, every
client in every round); under partial participation a client not sampled recently enters
with its last trained model. PFLlib's FedAMP deviates from the paper: it attends only
over the models uploaded in the previous round, uses the unsquared norm ||w − u|| as the
penalty, and starts local training from the client's previous model rather than from the
cloud model it receives.

With uniform attention (ξ_{k,j} = 1/K for all j, e.g. α = σ/K with σ far above every
distance) u_k is the plain mean of the K models: on equal-sized clients with full
participation and λ = 0, the clients' mean model then follows FedAvg's global model.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    Algorithm,
    HParam,
    client_optimizer,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.fedprox import proximal
from fedjax_sim.algorithms.local import own_logits
from fedjax_sim.core.rounds import Method, keep_server, personal_only
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

HPARAMS = (
    HParam("fedamp_alpha", 0.01, float, lambda v: v > 0, "> 0",
           "FedAMP: step α of the message passing (attention weight α·exp(−d/σ)/σ per "
           "other client; the penalty pulls with λ/α)", traced=True,
           tune_values=(0.002, 0.01, 0.05)),
    HParam("fedamp_lambda", 0.01, float, lambda v: v >= 0, ">= 0",
           "FedAMP: λ of the proximal pull λ/(2α) ||w − u||² towards the cloud model",
           traced=True),
    HParam("fedamp_sigma", 1.0, float, lambda v: v > 0, "> 0",
           "FedAMP: scale σ of the squared model distances in the attention exp(−d/σ)/σ",
           traced=True),
)


def squared_distances(models: Any) -> jax.Array:
    """(K, K) squared Euclidean distances between the K models of a tree with leaves
    (K, ...), from the Gram matrix of the models taken relative to the first one.

    Distances do not change under a common shift; shifting by one of the models keeps the
    Gram entries at the scale of the distances (not of the weights), so the subtraction
    ``n_i + n_j − 2 G_ij`` loses little in float32. (A shift by the mean model would do
    the same; on XLA:CPU its reduction over the client axis costs several times the
    Gram.)"""
    gram = 0.0
    for leaf in jax.tree.leaves(models):
        flat = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
        shifted = flat - flat[:1]
        gram = gram + jnp.dot(shifted, shifted.T, precision=jax.lax.Precision.HIGHEST)
    norms = jnp.diagonal(gram)
    distances = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
    return jnp.where(jnp.eye(distances.shape[0], dtype=bool), 0.0, distances)


def attention(distances: jax.Array, alpha: Any, sigma: Any) -> jax.Array:
    """(R1): the (K, K) message-passing weights ξ from the squared distances."""
    off = ~jnp.eye(distances.shape[0], dtype=bool)
    xi = jnp.where(off, alpha * jnp.exp(-distances / sigma) / sigma, 0.0)
    return xi + jnp.diag(1.0 - jnp.sum(xi, 1))


def cloud_model(weights: jax.Array, models: Any) -> Any:
    """(R2) for one client: Σ_j weights_j w_j, ``weights`` (K,), ``models`` leaves
    (K, ...)."""
    return jax.tree.map(
        lambda leaf: jnp.tensordot(weights, leaf, axes=1,
                                   precision=jax.lax.Precision.HIGHEST), models)


def fedamp(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedAMP bound to ``model``; ``hp`` holds the common hyperparameters and FedAMP's.

    State: no server part; ``clients = {"params": w_k, "id": k}`` with leaves (K, ...): the
    client's index lets it read its row of the attention kernel.
    """

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        clients = {"params": broadcast(model.init(model_key), data.num_clients),
                   "id": jnp.arange(data.num_clients, dtype=jnp.int32)}
        return SimState.create(state_key, None, clients, data.num_clients)

    def send(traced, state, round_key):
        models = state.clients["params"]
        xi = attention(squared_distances(models), traced["fedamp_alpha"],
                       traced["fedamp_sigma"])
        return round_key, (xi, models), None

    def client_update(traced, received, own, x, y, n, key):
        h = {**hp, **traced}
        xi, models = received
        u = cloud_model(xi[own["id"]], models)
        pull = h["fedamp_lambda"] / h["fedamp_alpha"]
        optimizer = optax.chain(proximal(pull, u), client_optimizer(h))
        params, loss = local_sgd(model, h, optimizer=optimizer)(u, x, y, n, key)
        return None, {"params": params, "id": own["id"]}, loss

    size = num_params_bytes(model)
    method = Method(client_update, own_logits(model), server_update=keep_server,
                    broadcast=send, eval_inputs=personal_only)
    return federated_algorithm("fedamp", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("fedamp", fedamp, HPARAMS)
