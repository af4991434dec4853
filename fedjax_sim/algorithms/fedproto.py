"""FedProto: clients exchange per-class prototypes instead of model weights.

Tan, Long, Liu, Zhou, Lu, Jiang, Zhang. "FedProto: Federated Prototype Learning across
Heterogeneous Clients." AAAI 2022.

Every client keeps its whole model (never sent). The model splits at its classifier: the
representation z = f(x; φ_k) is the feature vector the model's ``head`` reads. A
prototype is the mean representation of a class. Rules:

* (R1) local prototypes of client k after its local training, over its training data
  D_{k,j} of class j:  C_k^(j) = 1/|D_{k,j}| Σ_{(x,y)∈D_{k,j}} f(x; φ_k).
* (R2) global prototypes, at the server, over the cohort's clients N_j that hold class j:
  C̄^(j) = 1/|N_j| Σ_{k∈N_j} C_k^(j) (``fedproto_weighting = "clients"``, the authors'
  code and PFLlib), or the sample-weighted mean Σ_k |D_{k,j}| C_k^(j) / Σ_k |D_{k,j}|
  (``"samples"``). A class no member of the cohort holds keeps its previous global
  prototype; a class never seen has none.
* (R3) local objective of client k: L_S(F(x; ω_k), y) + λ · L_R, with L_S the
  cross-entropy of the model's own logits and L_R the distance between the client's
  representations and the global prototypes, evaluated as the authors' code does on every
  batch: the squared distance between each sample's representation and the global
  prototype of its label, averaged over the batch and the d feature dimensions
  (``MSELoss(f(x), C̄^(y))``); a sample whose label has no global prototype adds nothing.
  λ is ``fedproto_lambda``.
* (R4) inference: the label whose global prototype is nearest to f(x; φ_k) in Euclidean
  distance (``fedproto_eval = "prototype"``, as PFLlib evaluates FedProto; the authors'
  code reports it beside the accuracy of the client's own classifier, which ``"head"``
  uses instead). Before any prototype exists every class ties (class 0).

Communication per sampled client (``comm_bytes``): up, the C × d prototype table and the C
class counts; down, the C × d global prototypes (float32), where a FedAvg round moves the
model both ways.

λ = 0 removes the prototypes from training: every client then trains exactly as Local's
do (the same floats, step for step).

The representation is read from the model's own forward pass (see ``fedrod.head_features``):
``flax.linen`` models whose last layer is a dense ``head`` on a feature vector.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    Algorithm,
    HParam,
    federated_algorithm,
    local_sgd,
)
from fedjax_sim.algorithms.fedrod import class_counts, head_features
from fedjax_sim.core.local import weighted_cross_entropy
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

EVALUATIONS = ("prototype", "head")
WEIGHTINGS = ("clients", "samples")
HPARAMS = (
    HParam("fedproto_lambda", 1.0, float, lambda v: v >= 0, ">= 0",
           "FedProto: weight λ of the distance between representations and the global "
           "prototypes of their labels (0: Local training)", traced=True,
           tune_values=(0.1, 1.0, 5.0)),
    HParam("fedproto_eval", "prototype", str, lambda v: v in EVALUATIONS,
           f"one of {EVALUATIONS}",
           "FedProto: predict by the nearest global prototype, or by the client's own head",
           choices=EVALUATIONS),
    HParam("fedproto_weighting", "clients", str, lambda v: v in WEIGHTINGS,
           f"one of {WEIGHTINGS}",
           "FedProto: global prototype = mean over the clients holding the class, or "
           "weighted by their sample counts of it", choices=WEIGHTINGS),
)

# Logit of a class without a global prototype (finite, so that losses stay finite).
NO_PROTOTYPE = -1e9


def prototypes(apply, params, x: jax.Array, y: jax.Array, n: jax.Array, num_classes: int,
               batch_size: int) -> tuple[jax.Array, jax.Array]:
    """(R1) of one client: its (C, d) class-mean representations (0 for a class it lacks)
    and (C,) class counts, over its first ``n`` rows, in blocks of ``batch_size`` rows."""
    blocks = -(-x.shape[0] // batch_size)
    pad = blocks * batch_size - x.shape[0]
    xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    ys = jnp.pad(y, (0, pad))
    real = (jnp.arange(xs.shape[0]) < n).astype(jnp.float32)
    onehot = jax.nn.one_hot(ys, num_classes, dtype=jnp.float32) * real[:, None]

    def block(total, i):
        rows = jax.lax.dynamic_slice_in_dim(xs, i * batch_size, batch_size)
        hot = jax.lax.dynamic_slice_in_dim(onehot, i * batch_size, batch_size)
        _, z = apply(params, rows)
        return total + hot.T @ z, None

    width = jax.eval_shape(apply, params, xs[:batch_size])[1].shape[-1]
    sums, _ = jax.lax.scan(block, jnp.zeros((num_classes, width), jnp.float32),
                           jnp.arange(blocks))
    counts = class_counts(y, n, num_classes)
    return sums / jnp.maximum(counts, 1.0)[:, None], counts


def aggregate_prototypes(local: jax.Array, counts: jax.Array, member: jax.Array,
                         previous: jax.Array, seen: jax.Array, *,
                         weighting: str) -> tuple[jax.Array, jax.Array]:
    """(R2): the new global prototypes and which classes have one.

    Args:
      local: (M, C, d) the members' prototypes; counts: (M, C) their class counts.
      member: (M,) bool, the members whose upload counts.
      previous: (C, d) the global prototypes so far; seen: (C,) bool, which exist.
      weighting: ``"clients"`` or ``"samples"``.
    """
    holds = (counts > 0) & member[:, None]
    weight = holds.astype(jnp.float32)
    if weighting == "samples":
        weight = weight * counts
    total = jnp.sum(weight, 0)
    mean = jnp.einsum("mc,mcd->cd", weight, local) / jnp.maximum(total, 1e-30)[:, None]
    fresh = total > 0
    return jnp.where(fresh[:, None], mean, previous), seen | fresh


def prototype_logits(z: jax.Array, protos: jax.Array, seen: jax.Array) -> jax.Array:
    """(R4): −||z − C̄^(c)||² per class c, ``NO_PROTOTYPE`` where class c has none."""
    distance = jnp.sum((z[:, None, :] - protos[None, :, :]) ** 2, -1)
    return jnp.where(seen[None, :], -distance, NO_PROTOTYPE)


def fedproto(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedProto bound to ``model``; ``hp`` holds the common hyperparameters and FedProto's.

    State: ``server = {"protos": (C, d), "seen": (C,) bool}``, ``clients = {"params":
    every client's model}`` with leaves (K, ...).
    """
    apply = head_features(model, "fedproto")
    classes = model.num_classes
    width = jax.eval_shape(model.init, jax.random.key(0))[model.head[0]]["kernel"].shape[0]

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        clients = {"params": broadcast(model.init(model_key), data.num_clients)}
        server = {"protos": jnp.zeros((classes, width), jnp.float32),
                  "seen": jnp.zeros((classes,), bool)}
        return SimState.create(state_key, server, clients, data.num_clients)

    def send(traced, state, round_key):
        del traced
        return round_key, (state.server["protos"], state.server["seen"]), None

    def client_update(traced, received, own, x, y, n, key):
        h = {**hp, **traced}
        protos, seen = received

        def loss_fn(params, xb, yb, wb):
            logits, z = apply(params, xb)
            target = jnp.where(seen[yb][:, None], protos[yb], jax.lax.stop_gradient(z))
            gap = jnp.mean((z - target) ** 2, -1)
            distance = jnp.sum(gap * wb) / jnp.maximum(jnp.sum(wb), 1.0)
            return weighted_cross_entropy(logits, yb, wb) + h["fedproto_lambda"] * distance

        params, loss = local_sgd(model, h, loss_fn=loss_fn)(own["params"], x, y, n, key)
        upload = prototypes(apply, params, x, y, n, classes, hp["batch_size"])
        return upload, {"params": params}, loss

    def server_update(traced, state, cohort, context):
        del traced, context
        local, counts = cohort.uploads
        protos, seen = aggregate_prototypes(
            local, counts, cohort.counts > 0, state.server["protos"], state.server["seen"],
            weighting=hp["fedproto_weighting"])
        return {"protos": protos, "seen": seen}, {"fedproto_classes": jnp.sum(seen)}

    def eval_inputs(traced, state):
        del traced
        return state.clients, (state.server["protos"], state.server["seen"])

    def logits(own, shared, x):
        own_logits, z = apply(own["params"], x)
        if hp["fedproto_eval"] == "head":
            return own_logits
        return prototype_logits(z, *shared)

    def comm_bytes(data):
        from fedjax_sim.core.cohort import cohort_size

        size = cohort_size(data.num_clients, hp["join_ratio"])
        return size * 4 * classes * (width + 1), size * 4 * classes * width

    method = Method(client_update, logits, server_update=server_update, broadcast=send,
                    eval_inputs=eval_inputs, mean_uploads=False)
    return federated_algorithm("fedproto", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=comm_bytes, cover=cover)


register("fedproto", fedproto, HPARAMS)
