"""FedDF: ensemble distillation for model fusion.

Lin, Kong, Stich, Jaggi. "Ensemble Distillation for Robust Model Fusion in Federated
Learning." NeurIPS 2020.

A FedAvg round, then the server refines the averaged model by distilling the ensemble of
the returned client models into it on unlabeled public data. The teacher on a public
mini-batch is AVGLOGITS, Σ_k w_k f_k(x) with w_k ∝ n_k; the student, started at the FedAvg
average, minimizes KL(σ(teacher / T) ‖ σ(student / T)) (T = 1) with Adam (1e-3, cosine
annealed over ``feddf_steps``) on mini-batches of 128. Every ``feddf_eval_every`` steps the
student is scored on the server's labeled validation split; distillation stops after
``feddf_patience`` checks without improvement and keeps the best student (the FedAvg
average itself if nothing beats it). Without a validation split it runs all the steps.

Distillation happens on the server, so the traffic is FedAvg's. With ``feddf_steps = 0``
the algorithm is FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import (
    Abilities,
    Algorithm,
    HParam,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
)
from fedjax_sim.algorithms.dsfl import single_model
from fedjax_sim.algorithms.fedavg import global_init
from fedjax_sim.core.rounds import Method
from fedjax_sim.data.public import PublicData, check_public, check_public_matches
from fedjax_sim.kernels import distill
from fedjax_sim.kernels.aggregation import tree_where, weighted_mean
from fedjax_sim.models.base import Model

USES_PUBLIC = True

# The virtual clock's partial cohorts would break it.
ABILITIES = Abilities(
    clock=False,
    clock_refusal="it distills the cohort's models on a public set, not a mean of updates")
HPARAMS = (
    HParam("feddf_steps", 200, int, lambda v: v >= 0, "an integer >= 0",
           "FedDF: most server distillation steps per round (0: plain FedAvg)"),
    HParam("feddf_batch_size", 128, int, lambda v: v >= 1, "a positive integer",
           "FedDF: public mini-batch size of the server distillation"),
    HParam("feddf_lr", 0.001, float, lambda v: v > 0, "> 0",
           "FedDF: server Adam learning rate, cosine-annealed over feddf_steps", traced=True),
    HParam("feddf_temperature", 1.0, float, lambda v: v > 0, "> 0",
           "FedDF: distillation temperature T", traced=True),
    HParam("feddf_eval_every", 20, int, lambda v: v >= 1, "a positive integer",
           "FedDF: distillation steps between checks on the validation split"),
    HParam("feddf_patience", 5, int, lambda v: v >= 1, "a positive integer",
           "FedDF: checks without improvement before distillation stops"),
)


def feddf(model: Model | Sequence[Model], *, public: PublicData | None = None, cover=(),
          **hp) -> Algorithm:
    """FedDF bound to ``model`` and the unlabeled ``public`` set (plus its validation split).

    Args:
      model: one architecture shared by all clients.
      public: the public set; ``public.val_x``/``val_y`` drive early stopping when present.
      **hp: the common hyperparameters and ``HPARAMS``.
    """
    model = single_model(model, "feddf")
    check_public(public, algorithm="feddf", input_shape=model.input_shape,
                 num_classes=model.num_classes, batch=hp["feddf_batch_size"],
                 batch_name="feddf_batch_size")
    public_x = jnp.asarray(public.x)
    num_public = public.num_samples
    val_x, val_y = jnp.asarray(public.val_x), jnp.asarray(public.val_y)
    has_val = public.num_val > 0
    steps = hp["feddf_steps"]
    every = hp["feddf_eval_every"]
    patience = hp["feddf_patience"]

    def val_accuracy(params):
        return jnp.mean((jnp.argmax(model.apply(params, val_x), -1) == val_y).astype(jnp.float32))

    def server_distill(traced, student, teachers, weights, key):
        """Distills the ensemble ``teachers`` (leaves (M, ...)) into ``student``."""
        temperature = traced["feddf_temperature"]
        server_tx = optax.adam(optax.cosine_decay_schedule(traced["feddf_lr"], max(steps, 1)))

        def distill_loss(params, xb, teacher):
            return distill.kl_distillation(model.apply(params, xb), teacher,
                                           temperature=temperature)

        def teacher_probs(xb):
            logits = distill.client_predictions(model.apply, teachers, xb)
            return jax.nn.softmax(distill.weighted_average(logits, weights) / temperature, -1)

        start_acc = val_accuracy(student) if has_val else jnp.zeros(())
        carry = (jnp.zeros((), jnp.int32), student, server_tx.init(student), student, start_acc,
                 jnp.zeros((), jnp.int32), key)

        def cond(carry):
            step, *_, bad, _ = carry
            return (step < steps) & (bad < patience)

        def body(carry):
            step, params, opt_state, best, best_acc, bad, key = carry
            key, batch_key = jax.random.split(key)
            rows = jax.random.choice(batch_key, num_public, (hp["feddf_batch_size"],),
                                     replace=False)
            xb = public_x[rows]
            grads = jax.grad(distill_loss)(params, xb, teacher_probs(xb))
            updates, opt_state = server_tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            step = step + 1
            if has_val:
                check = (step % every == 0) | (step == steps)
                acc = jax.lax.cond(check, val_accuracy, lambda _: best_acc, params)
                improved = check & (acc > best_acc)
                best = tree_where(improved, params, best)
                best_acc = jnp.where(improved, acc, best_acc)
                bad = jnp.where(improved, 0, jnp.where(check, bad + 1, bad))
            return step, params, opt_state, best, best_acc, bad, key

        step, params, _, best, best_acc, _, _ = jax.lax.while_loop(cond, body, carry)
        return (best if has_val else params), step, best_acc

    def client_update(traced, start, own, x, y, n, key):
        del own
        params, loss = local_sgd(model, {**hp, **traced})(start, x, y, n, key)
        return params, None, loss

    def send(traced, state, round_key):
        del traced
        return round_key, state.server["params"], round_key

    def server_update(traced, state, cohort, round_key):
        if steps == 0:
            return {"params": cohort.uploads}, {}
        fused = weighted_mean(cohort.uploads, cohort.counts)
        fused, done, val_acc = server_distill(traced, fused, cohort.uploads, cohort.counts,
                                              jax.random.fold_in(round_key, 1))
        return {"params": fused}, {"distill_steps": done, "val_accuracy": val_acc}

    init_fn = global_init(model)

    def init_with(key, data, traced):
        check_public_matches(public, data, "feddf")
        return init_fn(key, data, traced)

    # Without distillation this is FedAvg's round, line for line; with it the server needs
    # every client model (the ensemble), not only their average.
    method = Method(client_update, shared_logits(model), server_update=server_update,
                    broadcast=send, mean_uploads=steps == 0)
    size = num_params_bytes(model)
    return federated_algorithm("feddf", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)
