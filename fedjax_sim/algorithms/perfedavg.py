"""Per-FedAvg: personalized FedAvg through the MAML objective.

Fallah, Mokhtari, Ozdaglar. "Personalized Federated Learning with Theoretical Guarantees:
A Model-Agnostic Meta-Learning Approach." NeurIPS 2020 (Algorithm 1).

The objective (Eq. 3) is the loss after one step of adaptation,

    min_w F(w) = (1/n) Σ_i F_i(w),   F_i(w) = f_i(w − α ∇f_i(w)),

with gradient ∇F_i(w) = (I − α ∇²f_i(w)) ∇f_i(w − α ∇f_i(w)). A sampled client starts
from the global model, w_0 = w^t, and takes τ local steps, each on three independent
batches D_t, D'_t, D''_t of its data:

    w̃_t = w_{t−1} − α ∇f_i(w_{t−1}; D_t)
    w_t = w_{t−1} − β (I − α ∇²f_i(w_{t−1}; D''_t)) ∇f_i(w̃_t; D'_t)

and uploads w_τ; the server averages the uploads with FedAvg's weights n_i / Σ n_j over
the cohort (the paper's uniform 1/(rn) Σ with equal client sizes). Two variants
(``perfedavg_variant``):

* ``fo`` (Per-FedAvg (FO)): the Hessian term is dropped (and D''_t is not drawn),
  w_t = w_{t−1} − β ∇f_i(w̃_t; D'_t);
* ``hf`` (Per-FedAvg (HF)): the Hessian-vector product ∇²f_i(w; D'') v is computed
  exactly, as the forward-mode derivative (``jax.jvp``) of ``jax.grad`` in the direction
  v; the paper approximates the same product by the finite difference
  [∇f_i(w + δv; D'') − ∇f_i(w − δv; D'')] / (2δ), which needs a δ and costs two
  gradients.

Evaluation adapts the global model in one step on the client's own loss, as the
objective does: a client is evaluated on w − α ∇f_i(w), with ∇f_i the gradient over its
whole training set (no batch noise). FL-bench instead fine-tunes for whole epochs and
PFLlib takes one step of its training update; this follows the paper.

In the paper's terms: α is the client ``lr`` (the adaptation step, during training and at
evaluation), β is ``perfedavg_beta`` (the meta step; β >= 0, traced; default 0.001,
FL-bench's), τ is the run's local budget: each step of ``local_epochs`` × ⌈n_i / B⌉ (or
of ``local_steps``) is one step t, and D_t, D'_t, D''_t are the t-th batches of
independent sample orders (in each epoch every order visits the client's data once).
The meta step uses the client optimizer at learning rate β (plain SGD at momentum and
weight decay 0, the paper's); the adaptation step is a plain gradient step.
``train_loss`` is the meta-objective f_i(w̃_t; D'_t).

β = 0: every local step leaves w where it is, so the global model keeps its
initialization and every client is evaluated on one gradient step of size α from it.
α = 0 (FO): w_t = w_{t−1} − β ∇f_i(w_{t−1}; D'_t), FedAvg's local SGD at learning rate β
on the second sample order.

Written as a plug-in through ``fedjax_sim.algorithms.register``, as any user algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS,
    Algorithm,
    HParam,
    client_optimizer,
    cross_entropy_loss,
    execution,
    federated_algorithm,
    num_params_bytes,
    per_round_bytes,
    schedule,
    shared_logits,
)
from fedjax_sim.algorithms.fedavg import global_init
from fedjax_sim.core import local
from fedjax_sim.core.evaluate import score
from fedjax_sim.core.rounds import Method
from fedjax_sim.kernels.augment import augment_batch
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS
VARIANTS = ("fo", "hf")
HPARAMS = (
    HParam("perfedavg_beta", 0.001, float, lambda v: v >= 0, ">= 0",
           "Per-FedAvg: meta step size β (the client lr is the adaptation step α)",
           traced=True, tune_values=(0.001, 0.01, 0.1, 0.3)),
    HParam("perfedavg_variant", "fo", str, lambda v: v in VARIANTS, f"one of {VARIANTS}",
           "Per-FedAvg: fo (first order) or hf (exact Hessian-vector products)",
           choices=VARIANTS),
)


def scan_streams(
    step_fn: Callable,
    carry: Any,
    x: jax.Array,
    y: jax.Array,
    count: jax.Array,
    key: jax.Array,
    *,
    streams: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    augment: str | None = None,
) -> tuple[Any, jax.Array]:
    """Runs ``step_fn(carry, batches) -> (carry, loss)`` over one client's local steps,
    each with one batch from each of ``streams`` independent sample orders.

    Each order is ``core.local.batch_schedule``'s with its own key (split from ``key``),
    so every stream has the same steps and the same active ones; ``batches`` is a tuple
    of ``(xb, yb, wb)``, one per stream. As ``core.local.scan_batches``, a step past the
    client's last batch of an epoch leaves the carry untouched.

    Returns:
      The final carry and the mean loss over the active steps.
    """
    tables = [local.batch_schedule(k, count, x.shape[0], batch_size, epochs=epochs,
                                   steps=steps) for k in jax.random.split(key, streams)]
    index = jnp.stack([t[0] for t in tables], 1)  # (S, streams, B)
    weight = jnp.stack([t[1] for t in tables], 1)
    active = tables[0][2]
    augmenting = augment not in (None, "none")
    step_keys = (jax.random.split(jax.random.fold_in(key, local.AUGMENT_STREAM),
                                  index.shape[0])
                 if augmenting else jnp.zeros((index.shape[0],), jnp.uint32))

    def batches(rows, w, step_key):
        out = []
        for j in range(streams):
            xb = x[rows[j]]
            if augmenting:
                xb = augment_batch(augment, jax.random.fold_in(step_key, j), xb)
            out.append((xb, y[rows[j]], w[j]))
        return tuple(out)

    def body(carry, inputs):
        rows, w, is_active, step_key = inputs

        def run(c):
            return step_fn(c, batches(rows, w, step_key))

        if steps is not None:  # every step of a fixed-steps budget is active
            return run(carry)

        def skip(c):
            loss = jax.eval_shape(run, c)[1]
            return c, jnp.zeros(loss.shape, loss.dtype)

        return jax.lax.cond(is_active, run, skip, carry)

    carry, losses = jax.lax.scan(body, carry, (index, weight, active, step_keys))
    return carry, jnp.sum(losses) / jnp.maximum(jnp.sum(active), 1)


def meta_gradient(loss_fn: Callable, hessian: bool) -> Callable:
    """``(w, batches, alpha) -> (loss, direction)``: the stochastic ∇F_i(w) of Per-FedAvg
    (FO: ∇f(w̃; D'); HF: (I − α ∇²f(w; D'')) ∇f(w̃; D'), w̃ = w − α ∇f(w; D)), and the
    meta-objective f(w̃; D')."""
    grad = jax.grad(loss_fn)

    def direction(w, batches, alpha):
        first, second = batches[0], batches[1]
        g = grad(w, *first)
        adapted = jax.tree.map(lambda p, gi: p - alpha * gi, w, g)
        loss, meta = jax.value_and_grad(loss_fn)(adapted, *second)
        if hessian:
            third = batches[2]
            _, hvp = jax.jvp(lambda p: grad(p, *third), (w,), (meta,))
            meta = jax.tree.map(lambda m, hv: m - alpha * hv, meta, hvp)
        return loss, meta

    return direction


def adapted_evaluate(model: Model, hp: dict) -> Callable:
    """``evaluate_with`` that scores each client on the global model after one gradient
    step of size ``lr`` on its whole training set; the state is left untouched."""
    loss_fn = cross_entropy_loss(model)
    run = execution(hp)

    def evaluate_with(state, data, traced):
        (train_rows, train_pool), (test_rows, test_pool) = (
            data.client_rows("train"), data.client_rows("test"))
        unpack_train, unpack_test = data.unpacker("train"), data.unpacker("test")

        def one_client(shared, train_row, test_row):
            traced, params, train_pool, test_pool = shared
            alpha = {**hp, **traced}["lr"]
            x, y, n = unpack_train(train_pool, train_row)
            weights = (jnp.arange(x.shape[0]) < n).astype(jnp.float32)
            grads = jax.grad(loss_fn)(params, x, y, weights)
            adapted = jax.tree.map(lambda p, g: p - alpha * g, params, grads)
            tx, ty, tn = unpack_test(test_pool, test_row)
            return score(model.apply(adapted, tx), ty, tn)

        return run.map(one_client, (train_rows, test_rows),
                       shared=(traced, state.server["params"], train_pool, test_pool))

    return evaluate_with


def perfedavg(model: Model, *, cover=(), **hp) -> Algorithm:
    """Per-FedAvg bound to ``model``; ``hp`` holds the common hyperparameters,
    ``perfedavg_beta`` and ``perfedavg_variant``. State: ``server = {"params": w}``."""
    loss_fn = cross_entropy_loss(model)
    hessian = hp["perfedavg_variant"] == "hf"
    direction = meta_gradient(loss_fn, hessian)
    budget = schedule(hp)

    def client_update(traced, start, own, x, y, n, key):
        del own
        h = {**hp, **traced}
        alpha = h["lr"]
        outer = client_optimizer({**h, "lr": h["perfedavg_beta"]})

        def step(carry, batches):
            w, opt_state = carry
            loss, meta = direction(w, batches, alpha)
            updates, opt_state = outer.update(meta, opt_state, w)
            return (optax.apply_updates(w, updates), opt_state), loss

        (w, _), loss = scan_streams(step, (start, outer.init(start)), x, y, n, key,
                                    streams=3 if hessian else 2, **budget)
        return w, None, loss

    size = num_params_bytes(model)
    return federated_algorithm(
        "perfedavg", hp, HPARAMS, Method(client_update, shared_logits(model)),
        init_with=global_init(model), comm_bytes=per_round_bytes(hp, size, size),
        evaluate_with=adapted_evaluate(model, hp), cover=cover)


register("perfedavg", perfedavg, HPARAMS, abilities=ABILITIES)
