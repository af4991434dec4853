"""MOON: model-contrastive federated learning.

Li, He, Song. "Model-Contrastive Federated Learning." CVPR 2021 (Algorithm 1).

Every client keeps its previous local model w_i^{t−1} (client state, (K, ...); the initial
global model until the client first trains). A sampled client receives the global model
w^t and trains, from w^t, on

    ℓ = ℓ_sup(w_i^t; (x, y)) + μ ℓ_con(w_i^t; w_i^{t−1}; w^t; x)              (Eq. 3)

    ℓ_con = −log [ exp(sim(z, z_glob)/τ)
                   / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) ]       (Eq. 2)

where z, z_glob and z_prev are the representations of x under the local model being
trained, the global model and the client's previous local model (the last two fixed),
sim is the cosine similarity, ℓ_sup the cross-entropy; both losses are means over the
batch. It then keeps its trained model as its new w_i^{t−1} and uploads it; the server
averages the uploads with FedAvg's weights n_i / Σ n_j over the cohort. Clients are
evaluated on the global model.

The representation is the input of the model's classifier layer (``Model.head``, a dense
layer), as FL-bench and PFLlib take it; the paper's networks add a two-layer projection
head before the output layer, and their output is the representation. The models here
have no such head: the representation is the body's output.

``moon_mu`` (μ >= 0) and ``moon_tau`` (τ > 0) are traced; the paper uses τ = 0.5 and μ
from {0.1, 1, 5, 10} (5 on CIFAR-10, 1 on CIFAR-100 and Tiny-ImageNet). μ = 0 is FedAvg:
where every value the round is built for is 0, the contrastive term is left out of the
program and the round computes FedAvg's floats bit for bit; a traced 0 adds
``0 · ∇ℓ_con``.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS,
    Algorithm,
    HParam,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
)
from fedjax_sim.core.local import token_weights, weighted_cross_entropy
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in;
# a client's representations then compare against the model it received.
ABILITIES = ASYNCHRONOUS
HPARAMS = (
    HParam("moon_mu", 1.0, float, lambda v: v >= 0, ">= 0",
           "MOON: weight μ of the model-contrastive loss (0: FedAvg)",
           traced=True, zero_off=True, tune_values=(0.1, 1.0, 5.0, 10.0)),
    HParam("moon_tau", 0.5, float, lambda v: v > 0, "> 0",
           "MOON: temperature τ of the model-contrastive loss", traced=True),
)

# Cosine similarity of a zero representation (a dead ReLU layer) is 0, not NaN.
_EPS = 1e-8


def head_input(model: Model) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(params, x) -> (logits, z)``: the model's logits and the input z of its classifier
    layer (the representation MOON contrasts), in one forward pass.

    The classifier is the dense layer ``model.head`` names, logits = z W + b with W
    (d, C). The logits are linear in W, with derivative z · T in a direction T, so the
    derivative in the directions of the columns of the d × d identity, taken C at a time,
    gives z itself (a product with 0s and a 1: exact).

    Raises:
      ValueError: a model whose head is not one layer with a 2-D ``kernel``.
    """
    if len(model.head) != 1:
        raise ValueError(f"MOON needs a model whose head is one dense layer; model "
                         f"{model.name} has head layers {model.head}")
    (name,) = model.head
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    layer = shapes.get(name, {}) if isinstance(shapes, dict) else {}
    kernel = layer.get("kernel") if isinstance(layer, dict) else None
    if kernel is None or len(kernel.shape) != 2:
        raise ValueError(f"MOON needs a model whose head {name!r} is a dense layer with a "
                         f"2-D kernel; model {model.name} has {layer!r}")
    width, classes = kernel.shape
    chunks = -(-width // classes)
    # Tangent j selects the j-th group of C coordinates of z (zero columns past d).
    basis = np.eye(width, chunks * classes, dtype=kernel.dtype).reshape(
        width, chunks, classes).transpose(1, 0, 2)

    def apply(params, x):
        def logits_of(w):
            return model.apply({**params, name: {**params[name], "kernel": w}}, x)

        logits, tangent = jax.linearize(logits_of, params[name]["kernel"])
        parts = jax.vmap(tangent)(basis)  # (chunks, *batch, C)
        z = jnp.moveaxis(parts, 0, -2).reshape(*logits.shape[:-1], chunks * classes)
        return logits, z[..., :width]

    return apply


def contrastive_loss(z: jax.Array, z_glob: jax.Array, z_prev: jax.Array, tau: Any) -> jax.Array:
    """MOON's ℓ_con (Eq. 2) per example: representations (..., d) → (...)."""

    def sim(a, b):
        norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
        return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, _EPS)

    # A product with 1/τ rather than a division: the same floats whether τ is traced or
    # compiled in (XLA turns a division by a constant into that product).
    scale = 1.0 / tau
    pos, neg = sim(z, z_glob) * scale, sim(z, z_prev) * scale
    return jnp.logaddexp(pos, neg) - pos


def moon_loss(model: Model) -> Callable:
    """``(params, xb, yb, wb, mu, tau, glob, prev) -> ℓ`` of Eq. 3 (batch means over the
    rows with weight > 0; with token labels, over the non-pad tokens)."""
    apply = head_input(model)

    def loss(params, xb, yb, wb, mu, tau, glob, prev):
        logits, z = apply(params, xb)
        _, z_glob = apply(glob, xb)
        _, z_prev = apply(prev, xb)
        z_glob, z_prev = jax.lax.stop_gradient(z_glob), jax.lax.stop_gradient(z_prev)
        con = contrastive_loss(z, z_glob, z_prev, tau)
        w = token_weights(yb, wb)
        con = jnp.sum(con * w) / jnp.maximum(jnp.sum(w), 1.0)
        return weighted_cross_entropy(logits, yb, wb) + mu * con

    return loss


def moon(model: Model, *, cover=(), **hp) -> Algorithm:
    """MOON bound to ``model``; ``hp`` holds the common hyperparameters, ``moon_mu`` and
    ``moon_tau``.

    State: ``server = {"params": w}``, ``clients = {"prev": w_i^{t−1}}`` with leaves
    (K, ...).

    Raises:
      ValueError: a model whose head is not one dense layer (see :func:`head_input`).
    """
    contrastive = moon_loss(model)

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {"prev": broadcast(params, data.num_clients)}
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def client_update(traced, start, own, x, y, n, key):
        h = {**hp, **traced}
        mu = h["moon_mu"]
        if isinstance(mu, int | float) and mu == 0:
            # mu compiled in as 0 (every value 0): FedAvg's program, nothing added.
            params, loss = local_sgd(model, h)(start, x, y, n, key)
        else:
            def loss_fn(params, xb, yb, wb):
                return contrastive(params, xb, yb, wb, mu, h["moon_tau"], start,
                                   own["prev"])

            params, loss = local_sgd(model, h, loss_fn=loss_fn)(start, x, y, n, key)
        return params, {"prev": params}, loss

    head_input(model)  # refuses an unsuitable model now, not when the round is traced
    size = num_params_bytes(model)
    return federated_algorithm(
        "moon", hp, HPARAMS, Method(client_update, shared_logits(model)),
        init_with=init_with, comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("moon", moon, HPARAMS, abilities=ABILITIES)
