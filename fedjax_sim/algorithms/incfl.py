"""IncFL (MaxFL): aggregation that maximizes the number of clients the global model appeals to.

Cho, Jhunjhunwala, Li, Smith, Joshi. "Maximizing Global Model Appeal in Federated
Learning." arXiv:2205.14840 (first titled "To Federate or Not To Federate: Incentivizing
Client Participation in Federated Learning").

A client gains from federating when the global model w does at least as well on its own
objective as the model it could train alone: f_k(w) <= ρ_k, with f_k the client's training
loss and ρ_k the loss of its local-only model. IncFL maximizes the *global model appeal*,
the count of such clients,

    max_w  Σ_k 1[f_k(w) <= ρ_k],

through its smooth surrogate Σ_k σ((ρ_k − f_k(w)) / T). The surrogate's gradient is
−Σ_k (1/T) σ'((f_k(w) − ρ_k) / T) ∇f_k(w) (σ' = σ(1 − σ), an even function), so each
client's update is weighted by

    q_k = σ'((f_k(w) − ρ_k) / T):

clients near their threshold weigh most; clients far above it (out of reach) or far below
it (already won) weigh little.

A round: every sampled client computes f_k(w), its mean cross-entropy on its own training
rows under the global model it received (before training), runs local SGD from w as in
FedAvg, and uploads its model w_k and f_k. The server takes the normalized weights
p_k = q_k / Σ_{j∈S} q_j over the cohort S (``kernels.incentives.incfl_weights``, in log
space: no weight underflows to a 0/0) and steps

    w ← w + η_g (Σ_{k∈S} p_k w_k − w).

The thresholds ρ_k. In MaxFL a client's requirement is a threshold on its training loss,
and the threshold the paper studies is the training loss of the client's own local model:
ρ_k = f_k(ŵ_k), with ŵ_k the model client k trains in isolation on its own data, the model
it would use if it did not federate. The same local model is what the global model is
then measured against. Here ŵ_k is, by default, exactly the model of the run's Local
reference (``algorithms.local``, the reference of ``compare_local`` and of the IPR):

* ``incfl_local_rounds`` = R (default 30, a run's default number of rounds): when the state
  is initialized, Local runs R rounds from the run's key, with the run's local budget
  (``local_epochs`` or ``local_steps`` per round), client optimizer, learning rate, batch
  size and participation (``join_ratio``); ρ_k is the mean cross-entropy of client k's
  resulting model on its own training rows. Local's initial model is the initial global
  model (both split the key as FedAvg does) and Local's rounds draw their keys from the same
  state key as the reference run, so with R equal to the run's ``rounds`` ŵ_k is the Local
  reference's final model and ρ_k its training loss (equal up to float rounding: here the
  R rounds are compiled into one loop, in the reference run round by round).
  Keep R at the run's ``rounds``: with R below it the thresholds are looser than the
  reference IncFL is compared with, above it stricter.
* ``incfl_local_epochs`` = E, when set, replaces that: every client trains a local-only
  model from the initial global model for E epochs in one pass (epochs even when the run
  sets ``local_steps``; every client, whatever ``join_ratio``), with the run's client
  optimizer, learning rate and batch size, and ρ_k is its mean training cross-entropy.
  This model is not the Local reference's unless E = rounds × local_epochs, full
  participation and plain SGD (and even then its batch orders differ).

ρ (K,) is computed once and kept in the client part of the state (``clients["rho"]``),
unchanged. Other choices made here:

* f_k is the mean training loss (the paper's f_k is the client's training objective),
  evaluated in blocks of at most :data:`LOSS_BLOCK` rows.
* Normalizing by Σ q_j keeps the step's size when every client is far from its threshold
  (each q_k <= 1/4). With a flat surrogate (T → ∞) every p_k is 1/|S|: the server averages
  the cohort's models uniformly, which is FedAvg when the clients hold equal sample counts.
  The weights ignore the clients' sample counts (each client counts once in the appeal, as
  in the paper's objective), so on unequal clients even the flat surrogate is not FedAvg.
* ``incfl_temperature`` (T > 0) and ``server_lr`` (η_g > 0, the one definition of
  ``server_opt.SERVER_LR``) are traced; ``incfl_local_rounds`` and ``incfl_local_epochs``
  are structural.

Round metrics: ``incfl_appeal``, the share of the cohort with f_k <= ρ_k (the global model
appeal on training losses, before the round's update), and ``incfl_max_weight``, the
largest p_k. ``summary.json`` records ρ's mean, minimum and maximum and how ρ was trained
(``incfl_rho_rounds``: R, or ``incfl_rho_epochs``: E).

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    COMMON,
    Algorithm,
    HParam,
    execution,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
)
from fedjax_sim.algorithms.local import local
from fedjax_sim.algorithms.server_opt import SERVER_LR
from fedjax_sim.core.local import token_weights
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState, to_host
from fedjax_sim.kernels.aggregation import gather
from fedjax_sim.kernels.incentives import incfl_weights
from fedjax_sim.models.base import Model

HPARAMS = (
    HParam("incfl_temperature", 1.0, float, lambda v: v > 0, "> 0",
           "IncFL: temperature T of the sigmoid surrogate σ((ρ_k − f_k(w)) / T) of the "
           "global model appeal (large: flat, uniform weights)", traced=True),
    SERVER_LR,
    HParam("incfl_local_rounds", 30, int, lambda v: v >= 1, "a positive integer",
           "IncFL: the threshold ρ_k is the training loss of the model Local trains in this "
           "many rounds (the run's own settings and seed): with the run's --rounds, ρ_k is "
           "the training loss of the Local reference's final model"),
    HParam("incfl_local_epochs", None, int, lambda v: v is None or v >= 1,
           "a positive integer or unset",
           "IncFL: when set, ρ_k is instead the training loss of a local-only model trained "
           "this many epochs in one pass from the initial model"),
)

# Rows of a client's training data whose loss is computed in one pass (bounds the memory of
# f_k on large clients).
LOSS_BLOCK = 1024

# The stream of the initial key that draws the local-only models' batch orders (the state
# key and the model key are FedAvg's).
RHO_STREAM = 1


def mean_loss(model: Model, params: Any, x: jax.Array, y: jax.Array, n: jax.Array, *,
              block: int = LOSS_BLOCK) -> jax.Array:
    """Mean cross-entropy of ``params`` over the first ``n`` rows of ``(x, y)``.

    The rows are read in blocks of at most ``block``; the last block is shifted back to
    end at the last row, its rows of the previous block masked out, so that no padded copy
    of the data is made.

    Args:
      model: the model.
      params: its parameters.
      x: (N_max, ...) inputs; y: (N_max,) labels, or (N_max, L) next-token labels (the
        mean then runs over the non-pad tokens); n: scalar, the real rows.
      block: rows per pass.

    Returns:
      Scalar float32 (0 when ``n`` is 0).
    """
    rows = x.shape[0]
    size = min(block, rows)
    count = -(-rows // size)

    def block_sum(i):
        start = jnp.minimum(i * size, rows - size)
        index = start + jnp.arange(size)
        xb = jax.lax.dynamic_slice_in_dim(x, start, size)
        yb = jax.lax.dynamic_slice_in_dim(y, start, size)
        keep = ((index >= i * size) & (index < n)).astype(jnp.float32)
        weights = token_weights(yb, keep)  # next-token labels: every non-pad token
        nll = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, xb),
                                                              jnp.maximum(yb, 0))
        return jnp.stack([jnp.sum(jnp.where(weights > 0, nll, 0.0)), jnp.sum(weights)])

    sums = block_sum(0) if count == 1 else jnp.sum(jax.lax.map(block_sum, jnp.arange(count)),
                                                   axis=0)
    return sums[0] / jnp.maximum(sums[1], 1.0)


def training_losses(model: Model, hp: dict) -> Any:
    """``(params, data) -> (K,)``: each client's mean training cross-entropy
    (:func:`mean_loss`) under its own model, ``params`` leaves (K, ...), mapped over the
    clients with the run's execution strategy."""
    run = execution(hp)

    def losses(params, data):
        rows, pool = data.client_rows("train")
        unpack = data.unpacker("train")

        def one_client(pool, row, own):
            x, y, n = unpack(pool, row)
            return mean_loss(model, own, x, y, n)

        return run.map(one_client, (rows, params), shared=pool)

    return losses


def local_thresholds(model: Model, hp: dict, epochs: int) -> Any:
    """``(traced, params, data, keys) -> ρ (K,)``: every client trains a local-only model
    from ``params`` for ``epochs`` epochs in one pass (``base.local_sgd`` with the run's
    optimizer and batch size; ``keys`` (K,) draw the batch orders) and ρ_k is its mean
    training loss (:func:`mean_loss`), mapped over the clients with the run's execution
    strategy."""
    run = execution(hp)

    def thresholds(traced, params, data, keys):
        rows, pool = data.client_rows("train")
        unpack = data.unpacker("train")

        def one_client(shared, row, key):
            traced, params, pool = shared
            x, y, n = unpack(pool, row)
            h = {**hp, **traced, "local_steps": None}  # epochs, whatever the round's budget
            trained, _ = local_sgd(model, h, epochs=epochs)(params, x, y, n, key)
            return mean_loss(model, trained, x, y, n)

        return run.map(one_client, (rows, keys), shared=(traced, params, pool))

    return thresholds


def reference_thresholds(model: Model, hp: dict, rounds: int, *, cover=()) -> Any:
    """``(key, data, traced) -> ρ (K,)``: the Local algorithm with the run's settings
    (``algorithms.local`` over the common hyperparameters of ``hp``) initialized from
    ``key`` and run ``rounds`` rounds, as the Local reference of a run with seed ``key``
    is; ρ_k is the mean training loss of client k's final model.

    ``traced`` holds at least Local's traced hyperparameters (the client ``lr``,
    ``momentum``, ``weight_decay``); ``cover`` is the IncFL round's cover (the same values
    of those hyperparameters are compiled in or traced as in the run's Local reference).
    """
    common = {spec.name: hp[spec.name] for spec in COMMON}
    names = tuple(spec.name for spec in COMMON if spec.traced)
    reference = local(model, cover=tuple({k: c[k] for k in names if k in c} for c in cover),
                      **common)
    kept = tuple(reference.hp())  # the traced ones not compiled in
    losses = training_losses(model, common)

    def thresholds(key, data, traced):
        own = {k: traced[k] for k in kept}
        state = reference.init_with(key, data, own)
        state = jax.lax.fori_loop(
            0, rounds, lambda _, s: reference.round_with(s, data, own)[0], state)
        return losses(state.clients["params"], data)

    return thresholds


def aggregate(params: Any, uploads: Any, weights: jax.Array, server_lr: Any) -> Any:
    """``w + η_g (Σ_k weights_k w_k − w)``, computed as ``mean + (1 − η_g)(w − mean)`` (η_g
    = 1 gives the weighted mean itself).

    Args:
      params: the global model w.
      uploads: the cohort's models, leaves (M, ...).
      weights: (M,) weights summing to 1.
      server_lr: η_g.
    """

    def weighted_sum(leaf):
        # Elementwise products and a sum, not a matmul: no reduced-precision (TF32) path.
        w = weights.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
        return jnp.sum(w * leaf, axis=0)

    mean = jax.tree.map(weighted_sum, uploads)
    return jax.tree.map(lambda m, x: m + (1.0 - server_lr) * (x - m), mean, params)


def rho_report(rho, **training) -> dict:
    """Summary fields of the thresholds ρ (K,): ``incfl_rho_mean``, ``incfl_rho_min``,
    ``incfl_rho_max``, and ``training`` (how ρ was trained) as ``incfl_rho_<name>``."""
    rho = np.asarray(rho, np.float64).reshape(-1)
    return {"incfl_rho_mean": float(rho.mean()), "incfl_rho_min": float(rho.min()),
            "incfl_rho_max": float(rho.max()),
            **{f"incfl_rho_{name}": value for name, value in training.items()}}


def incfl(model: Model, *, cover=(), **hp) -> Algorithm:
    """IncFL bound to ``model``; ``hp`` holds the common hyperparameters and ``HPARAMS``.

    State: ``server = {"params": w}``, ``clients = {"rho": ρ}`` with ρ (K,).
    """
    epochs, rounds = hp["incfl_local_epochs"], hp["incfl_local_rounds"]
    if epochs is None:
        reference = jax.jit(reference_thresholds(model, hp, rounds, cover=cover))

        def thresholds(key, params, data, traced):
            del params  # Local's initial model is the same one, drawn from the same key
            return reference(key, data, traced)

        training = {"rounds": rounds, "epochs": None}
    else:
        one_pass = jax.jit(local_thresholds(model, hp, epochs))

        def thresholds(key, params, data, traced):
            keys = jax.random.split(jax.random.fold_in(key, RHO_STREAM), data.num_clients)
            return one_pass(traced, params, data, keys)

        training = {"rounds": None, "epochs": epochs}

    def init_with(key, data, traced):
        state_key, model_key = jax.random.split(key)  # as FedAvg's and Local's
        params = model.init(model_key)
        rho = thresholds(key, params, data, traced)
        return SimState.create(state_key, {"params": params}, {"rho": rho}, data.num_clients)

    def client_update(traced, start, own, x, y, n, key):
        global_loss = mean_loss(model, start, x, y, n)
        params, loss = local_sgd(model, {**hp, **traced})(start, x, y, n, key)
        return (params, global_loss), own, loss

    def server_update(traced, state, cohort, context):
        del context
        params, global_loss = cohort.uploads
        rho = gather(state.clients["rho"], cohort.index)
        present = cohort.counts > 0
        weights = incfl_weights(global_loss, rho, traced["incfl_temperature"],
                                present=present)
        new = aggregate(state.server["params"], params, weights, traced["server_lr"])
        appealed = jnp.sum(present & (global_loss <= rho)).astype(jnp.float32)
        metrics = {"incfl_appeal": appealed / jnp.maximum(jnp.sum(present), 1),
                   "incfl_max_weight": jnp.max(weights)}
        return {"params": new}, metrics

    def report(state):
        # Gathers client shards held by other processes (multi-host runs).
        return rho_report(to_host(state.clients["rho"]), **training)

    size = num_params_bytes(model)
    method = Method(client_update, shared_logits(model), server_update=server_update,
                    eval_inputs=lambda traced, state: (None, state.server["params"]),
                    mean_uploads=False)
    # Up: the model and one float (f_k) per sampled client; down: the model.
    return federated_algorithm("incfl", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size + 4, size),
                               report=report, cover=cover)


register("incfl", incfl, HPARAMS)
