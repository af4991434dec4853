"""FedALA: adaptive local aggregation of the global model into each client's model.

Zhang, Hua, Wang, Song, Xue, Ma, Guan. "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning." AAAI 2023.

Every client k keeps its local model Θ_k and element-wise aggregation weights W_k for the
top p layers (``fedala_layers``, counted from the head down in the model's forward order).
A sampled client receives the global model Θ and, instead of overwriting Θ_k with it,
initializes its local training with the adaptive local aggregation (ALA):

* (R1) Θ̂_k = Θ_k + (Θ − Θ_k) ⊙ [1 (lower layers); W_k (top p layers)], i.e. the lower
  layers take Θ and the top ones mix; computed as W ⊙ Θ + (1 − W) ⊙ Θ_k, the same value
  and exact at W ∈ {0, 1}.
* (R2) W_k is learned on a random sample D_k^s of s = ``fedala_sample_ratio`` of the
  client's training data (⌊s n_k⌋ samples, at least 1, drawn afresh each round), one
  gradient step per mini-batch with Θ and Θ_k fixed:

      W_k ← clip_[0,1]( W_k − η ∇_{W_k} L(Θ̂_k; batch) ),
      ∇_{W_k} L = ∇_{Θ̂_k} L ⊙ (Θ − Θ_k) on the top layers,

  η = ``fedala_eta``, L the mean cross-entropy, Θ̂_k recomputed by (R1) after every step.
  W_k starts at 1 (so the first aggregation is Θ itself) and carries over between rounds.
  The client's first aggregation (its start phase) repeats passes over its sample until
  the standard deviation of the last ``fedala_num_pre_loss`` passes' losses (each pass's
  last-batch loss) falls below ``fedala_threshold``, at most ``fedala_max_start_epochs``
  passes; later rounds make one pass.
* (R3) while the client's model still equals the global model (before it first trains,
  and in the first round, where both are the initial model) ALA is skipped: Θ̂_k = Θ and
  neither W_k nor the start phase changes.
* (R4) the client trains Θ̂_k with local SGD (the round's local epochs), keeps the result
  as its new Θ_k and uploads it; the server averages the uploads as FedAvg does.

Clients are evaluated on their own Θ_k (their model after their last local training).
The reference implementation (PFLlib, ``utils/ALA.py``) draws the sample as a contiguous
window of the client's data, drops its last partial batch and runs the start phase without
a cap; this module draws the sample at random, as the paper describes, visits every
sampled row, and stops the start phase after ``fedala_max_start_epochs`` passes. PFLlib's
defaults are kept: η 1.0, s 80%, the head as the top layers (its ``layer_idx`` 2 counts
the head's two tensors), threshold 0.1, 10 losses.

With η = 0 every W_k stays 1, Θ̂_k = Θ and FedALA's global model is FedAvg's, bit for bit.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS,
    Algorithm,
    HParam,
    cross_entropy_loss,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.local import own_logits
from fedjax_sim.core import local
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels import split
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS
HPARAMS = (
    HParam("fedala_eta", 1.0, float, lambda v: v >= 0, ">= 0",
           "FedALA: learning rate η of the element-wise aggregation weights (0: weights "
           "stay 1, FedAvg)", traced=True, tune_values=(0.1, 1.0, 10.0)),
    HParam("fedala_sample_ratio", 0.8, float, lambda v: 0 < v <= 1, "in (0, 1]",
           "FedALA: fraction s of a client's training data the weights learn on",
           traced=True),
    HParam("fedala_layers", 1, int, lambda v: v >= 1, "a positive integer",
           "FedALA: top layers (from the head down) aggregated with learned weights; "
           "the lower ones take the global model"),
    HParam("fedala_threshold", 0.1, float, lambda v: v > 0, "> 0",
           "FedALA: the start phase ends when the std of the last losses is below this",
           traced=True),
    HParam("fedala_num_pre_loss", 10, int, lambda v: v >= 1, "a positive integer",
           "FedALA: number of last pass losses whose std ends the start phase"),
    HParam("fedala_max_start_epochs", 100, int, lambda v: v >= 1, "a positive integer",
           "FedALA: at most this many passes over the sample in the start phase"),
)

# fold_in constant of the weight-learning sample's key: a stream apart from the batch
# order of local training (which uses the round's key itself, as FedAvg does).
SAMPLE_STREAM = 0x414C41


def top_layers(model: Model, count: int) -> tuple[str, ...]:
    """The ``count`` top-level layers nearest the output, in forward order.

    Raises:
      ValueError: a model that does not list its layers, or fewer than ``count``.
    """
    layers = tuple(model.layers)
    if not layers or count > len(layers):
        raise ValueError(f"fedala_layers must be at most the model's number of layers "
                         f"({len(layers)}: {', '.join(layers) or 'not listed'}), got {count}")
    return layers[-count:]


def mix(weights: Any, global_top: Any, local_top: Any) -> Any:
    """(R1) on the top layers: W ⊙ Θ + (1 − W) ⊙ Θ_k."""
    return jax.tree.map(lambda w, g, l_: w * g + (1.0 - w) * l_, weights, global_top,
                        local_top)


def sample_size(ratio: Any, n: jax.Array) -> jax.Array:
    """⌊s n⌋ samples, at least 1, for a (traced float32) ratio s; the factor absorbs s's
    float32 rounding (0.7 is 0.69999999, and ⌊0.7 · 10⌋ must be 7)."""
    return jnp.maximum(jnp.floor(ratio * n * (1.0 + 3e-7)), 1.0).astype(n.dtype)


def sample_order(key: jax.Array, n: jax.Array, n_max: int) -> local.FixedOrder:
    """A uniformly random order of a client's ``n`` real rows (padding last), as a
    one-pass ``core.local.FixedOrder``: its first m entries are a random m-sample."""
    positions = jnp.arange(n_max)
    u = jax.random.uniform(key, (n_max,))
    order = jnp.argsort(jnp.where(positions < n, u, 2.0)).astype(jnp.int32)
    return local.FixedOrder(order[None, :])


def fedala(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedALA bound to ``model``; ``hp`` holds the common hyperparameters and FedALA's.

    State: ``server = {"params": Θ}``, ``clients = {"params": Θ_k, "weights": W_k,
    "started": bool}`` with leaves (K, ...); ``weights`` covers the top layers only and
    ``started`` says whether the client's start phase is over.
    """
    top = top_layers(model, hp["fedala_layers"])
    loss_fn = cross_entropy_loss(model)
    batch = hp["batch_size"]
    memory = hp["fedala_num_pre_loss"]

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        ones = jax.tree.map(jnp.ones_like, split.take(params, top))
        clients = {"params": broadcast(params, data.num_clients),
                   "weights": broadcast(ones, data.num_clients),
                   "started": jnp.zeros((data.num_clients,), bool)}
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def learn_weights(h, global_params, own, x, y, n, key, same):
        """(R2): the learned weights (one pass only where ``same``: nothing to learn)."""
        lower, global_top = split.drop(global_params, top), split.take(global_params, top)
        local_top = split.take(own["params"], top)
        gap = jax.tree.map(jnp.subtract, global_top, local_top)
        size = sample_size(h["fedala_sample_ratio"], n)
        order = sample_order(key, n, x.shape[0])

        def step(carry, xb, yb, wb):
            weights, _ = carry
            mixed = mix(weights, global_top, local_top)
            loss, grad = jax.value_and_grad(
                lambda t: loss_fn(split.merge(lower, t), xb, yb, wb))(mixed)
            weights = jax.tree.map(
                lambda w, g, d: jnp.clip(w - h["fedala_eta"] * g * d, 0.0, 1.0),
                weights, grad, gap)
            return (weights, loss), loss

        def one_pass(weights):
            (weights, last), _ = local.scan_batches(
                step, (weights, jnp.zeros((), jnp.float32)), x, y, size, order,
                batch_size=batch, epochs=1)
            return weights, last

        def keep_going(carry):
            _, losses, passes = carry
            full = passes > memory
            spread = jnp.std(losses)
            return ~own["started"] & ~same & (passes < hp["fedala_max_start_epochs"]) & ~(
                full & (spread < h["fedala_threshold"]))

        def another(carry):
            weights, losses, passes = carry
            weights, last = one_pass(weights)
            return weights, jnp.roll(losses, -1).at[-1].set(last), passes + 1

        # One pass always; more while the start phase has not converged.
        weights, last = one_pass(own["weights"])
        losses = jnp.zeros((memory,), jnp.float32).at[-1].set(last)
        weights, _, _ = jax.lax.while_loop(keep_going, another,
                                           (weights, losses, jnp.int32(1)))
        return weights

    def client_update(traced, global_params, own, x, y, n, key):
        h = {**hp, **traced}
        same = jnp.all(jnp.stack([jnp.all(a == b) for a, b in zip(
            jax.tree.leaves(own["params"]), jax.tree.leaves(global_params), strict=True)]))
        learned = learn_weights(h, global_params, own, x, y, n,
                                jax.random.fold_in(key, SAMPLE_STREAM), same)
        weights = jax.tree.map(lambda a, b: jnp.where(same, a, b), own["weights"], learned)
        mixed = mix(weights, split.take(global_params, top), split.take(own["params"], top))
        start = jax.tree.map(lambda g, m: jnp.where(same, g, m), global_params,
                             split.merge(global_params, mixed))
        params, loss = local_sgd(model, h)(start, x, y, n, key)
        new_own = {"params": params, "weights": weights,
                   "started": own["started"] | ~same}
        return params, new_own, loss

    size = num_params_bytes(model)
    method = Method(client_update, own_logits(model))
    return federated_algorithm("fedala", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


register("fedala", fedala, HPARAMS, abilities=ABILITIES)
