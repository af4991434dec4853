"""FedRoD: a shared body and generic head trained for the balanced risk, and a personal
head on top of them.

Chen, Chao. "On Bridging Generic and Personalized Federated Learning for Image
Classification." ICLR 2022 (Federated Robust Decoupling, Fed-RoD).

The model splits at its classifier: the body f(x; θ) is every layer below the model's
``head``, z = f(x; θ) the feature vector the head reads; the generic head
h_G(z; ψ) is the model's own ``head``; each client k also keeps a personal head
h_P(z; φ_k) of the same shape (its own dense layer, initialized as a copy of the initial
generic head). Rules, per local step on a batch B of client k:

* (R1) generic predictor, balanced softmax loss (the paper's balanced risk L^BR with the
  Balanced Softmax of Ren et al. 2020), g = h_G(f(x; θ); ψ):

      L_BR(θ, ψ) = −1/|B| Σ_{(x,y)∈B} log [ N_{k,y}^γ exp(g_y) / Σ_c N_{k,c}^γ exp(g_c) ]

  N_{k,c} the number of client k's training samples of class c, γ ``fedrod_gamma`` (1:
  the Balanced Softmax; 0: plain cross-entropy). A class the client lacks (N_{k,c} = 0)
  drops out of the sum for γ > 0 (its term N^γ exp(g) is 0).
* (R2) personalized predictor, the empirical risk of the combined logits, with the body
  and the generic head held fixed (no gradient reaches θ or ψ):

      L_P(φ_k) = −1/|B| Σ_{(x,y)∈B} log softmax( sg[g] + h_P(sg[z]; φ_k) )_y

  (sg: stop-gradient). One SGD step per batch moves (θ, ψ) along ∇L_BR and φ_k along
  ∇L_P, both taken at the batch's starting point (the reference implementations step the
  two optimizers one after the other on the same forward pass, which is the same step).
* (R3) server: FedAvg of the generic model, (θ, ψ) ← Σ_k n_k (θ_k, ψ_k) / Σ_k n_k over the
  cohort; φ_k never leaves client k.
* (R4) personalized prediction of client k: argmax_c g_c(x) + h_P(f(x; θ); φ_k)_c with the
  current global θ, ψ.

The paper's hypernetwork variant of the personal head (FedRoD (hyper)) is not built here.
FL-bench's FedRoD deviates from the paper: its personal head reads z without the
stop-gradient (so L_P also trains the body) and predicts with h_P alone; this module
follows the paper (and PFLlib) instead.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.

``fedrod_gamma`` is traced. At γ = 0 (R1) is plain cross-entropy and (R2) sends no
gradient into (θ, ψ), so the global model follows FedAvg's round step for step.

The features z are read from the model's own forward pass (the input of its ``head``
layer, captured with ``flax.linen.intercept_methods``), so every ``flax.linen`` model whose
last layer is a dense ``head`` on a feature vector works (mlp, cnn, emnist_cnn, resnet);
token models and models not written in ``flax.linen`` are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS,
    Algorithm,
    HParam,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.core.local import weighted_cross_entropy
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS
HPARAMS = (
    HParam("fedrod_gamma", 1.0, float, lambda v: v >= 0, ">= 0",
           "FedRoD: exponent γ of the class counts in the generic head's balanced softmax "
           "loss (1: Balanced Softmax, 0: plain cross-entropy)", traced=True,
           tune_values=(0.0, 0.25, 1.0)),
)

# A logit offset that removes a class from a softmax without producing infinities.
ABSENT = -1e30


def head_features(model: Model, name: str) -> Callable:
    """``apply(params, x) -> (logits, z)``: the model's logits and the feature vector its
    ``head`` layer reads, from one forward pass.

    Args:
      model: a ``flax.linen`` model whose one head layer is a dense layer ``{"kernel"
        (d, C), "bias" (C,)}`` applied last, to (B, d) features.
      name: the algorithm, for the error message.

    Raises:
      ValueError: a model without such a head (token models, models not written in
        ``flax.linen``).
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    head = model.head[0] if len(model.head) == 1 else None
    kernel = (shapes.get(head) or {}).get("kernel") if head is not None else None
    refusal = ValueError(
        f"{name} needs a model whose classifier is one dense layer 'head' on a feature "
        f"vector, applied last, in a flax.linen module (mlp, cnn, emnist_cnn, resnet); "
        f"model {model.name!r} is not one")
    if kernel is None or len(kernel.shape) != 2 or set(shapes[head]) != {"kernel", "bias"}:
        raise refusal

    def apply(params, x):
        captured = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and tuple(context.module.path) == (head,):
                captured.append(args[0])
            return out

        with nn.intercept_methods(interceptor):
            logits = model.apply(params, x)
        if len(captured) != 1:
            raise refusal
        return logits, captured[0]

    probe = jax.ShapeDtypeStruct((2, *model.input_shape), jnp.float32)
    logits, z = jax.eval_shape(apply, shapes, probe)
    if z.shape != (2, kernel.shape[0]) or logits.shape != (2, kernel.shape[1]):
        raise refusal
    return apply


def dense(head: dict, z: jax.Array) -> jax.Array:
    """A dense head ``{"kernel", "bias"}`` applied to features z (B, d)."""
    return jnp.dot(z, head["kernel"]) + head["bias"]


def class_counts(y: jax.Array, n: jax.Array, num_classes: int) -> jax.Array:
    """(C,) float32 sample counts per class of a client's first ``n`` labels."""
    real = (jnp.arange(y.shape[0]) < n).astype(jnp.float32)
    return jnp.sum(jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * real[:, None], 0)


def balanced_softmax_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                          counts: jax.Array, gamma) -> jax.Array:
    """(R1): mean cross-entropy of ``logits + γ log N`` over the rows with weight > 0.

    Args:
      logits: (B, C); labels: (B,); weights: (B,) (0 on padding).
      counts: (C,) the client's class counts N_c.
      gamma: the exponent γ >= 0 (a float or traced scalar).
    """
    has = counts > 0
    offset = jnp.where(has, gamma * jnp.log(jnp.where(has, counts, 1.0)),
                       jnp.where(gamma > 0, ABSENT, 0.0))
    return weighted_cross_entropy(logits + offset, labels, weights)


def fedrod(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedRoD bound to ``model``; ``hp`` holds the common hyperparameters and
    ``fedrod_gamma``.

    State: ``server = {"params": (θ, ψ)}`` (the model's parameters), ``clients =
    {"phead": φ_k}`` with leaves (K, ...) shaped like the model's head.
    """
    apply = head_features(model, "fedrod")
    head = model.head[0]

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {"phead": broadcast(params[head], data.num_clients)}
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def client_update(traced, start, own, x, y, n, key):
        h = {**hp, **traced}
        counts = class_counts(y, n, model.num_classes)

        def loss_fn(both, xb, yb, wb):
            logits, z = apply(both["model"], xb)
            generic = balanced_softmax_loss(logits, yb, wb, counts, h["fedrod_gamma"])
            combined = jax.lax.stop_gradient(logits) + dense(both["phead"],
                                                             jax.lax.stop_gradient(z))
            return generic + weighted_cross_entropy(combined, yb, wb)

        both = {"model": start, "phead": own["phead"]}
        both, loss = local_sgd(model, h, loss_fn=loss_fn)(both, x, y, n, key)
        return both["model"], {"phead": both["phead"]}, loss

    def logits(own, global_params, x):
        generic, z = apply(global_params, x)
        return generic + dense(own["phead"], z)

    size = num_params_bytes(model)
    method = Method(client_update, logits)
    return federated_algorithm("fedrod", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("fedrod", fedrod, HPARAMS, abilities=ABILITIES)
