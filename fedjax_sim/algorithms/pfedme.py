"""pFedMe: personalized federated learning with Moreau envelopes.

T. Dinh, Tran, Nguyen. "Personalized Federated Learning with Moreau Envelopes."
NeurIPS 2020 (Algorithm 1).

The bi-level problem (Eq. 2–3): min_w (1/N) Σ_i F_i(w) with the Moreau envelope

    F_i(w) = min_θ { f_i(θ) + λ/2 ||θ − w||² },    θ̂_i(w) = its minimizer,

whose gradient is ∇F_i(w) = λ (w − θ̂_i(w)). A round of Algorithm 1:

1. the server sends w^t to every client; each sets w_{i,0} = w^t;
2. every client takes R local rounds r = 0 .. R−1: on a fresh mini-batch D_i it solves
   the personal problem min_θ h̃_i(θ; w_{i,r}, D_i) = f̃_i(θ; D_i) + λ/2 ||θ − w_{i,r}||²
   approximately, by K gradient steps of size ``pfedme_personal_lr`` (the gradient
   ∇f̃_i(θ; D_i) + λ (θ − w_{i,r})), giving the personalized model θ̃_i(w_{i,r}); then
   steps its local model w_{i,r+1} = w_{i,r} − η λ (w_{i,r} − θ̃_i(w_{i,r}));
3. the server samples S clients, which send w_{i,R}, and steps
   w^{t+1} = (1 − β) w^t + β Σ_{i∈S} p_i w_{i,R},  p_i = n_i / Σ_{j∈S} n_j.

Choices made here, in the paper's terms:

* η is the client ``lr``; R is the run's local budget (each batch of ``local_epochs`` ×
  ⌈n_i / B⌉, or of ``local_steps``, is one local round); K is ``pfedme_k``.
* The personal problem starts, each round, from w^t and, in later local rounds, from the
  previous θ̃ (as the authors' code); its K steps use the client optimizer (plain SGD at
  momentum and weight decay 0, the paper's; the authors' code adds an L2 term μθ, which is
  ``weight_decay`` here) with a fresh state per local round.
* Every client trains every round, as in Algorithm 1 (FL-bench and PFLlib train only the
  sampled ones); the S = ``join_ratio`` · N sampled clients are drawn uniformly from a key
  of their own, after training. A round therefore costs a full-participation round, and
  the server sends w^t to all N clients.
* The mean uses FedAvg's weights n_i (the paper's 1/S Σ with equal sizes); β = 1 gives
  the mean itself (computed as ``mean + (1 − β)(w − mean)``).
* A client is evaluated on its personalized model θ_i, the θ̃ of its last local round
  (the paper's "pFedMe (PM)").

``pfedme_lambda`` (λ > 0), ``pfedme_personal_lr`` and ``pfedme_beta`` (β > 0) are traced;
β > 1 is the paper's acceleration. Defaults λ 15, personal lr 0.01, K 5, β 1 (FL-bench's).

λ → ∞: θ̂_i(w) → w and λ (w − θ̂_i(w)) → ∇f_i(w), so the local step becomes
w − η ∇f̃_i(w; D_i), FedAvg's SGD step. With the K inner steps of size 1/λ (stable for
large λ) that limit is reached at rate O(1/λ) (for K >= 2; the first inner step from w is
exactly λ (w − θ) = ∇f̃_i(w; D_i)).

The virtual clock is refused: Algorithm 1 has every client train every round, and the
clock decides which clients train.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    Abilities,
    Algorithm,
    HParam,
    assemble,
    client_optimizer,
    cross_entropy_loss,
    execution,
    num_params_bytes,
    schedule,
)
from fedjax_sim.core import local
from fedjax_sim.core.cohort import cohort_size, sample_cohort
from fedjax_sim.core.rounds import Method, federated, personal_only
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels.aggregation import broadcast, gather
from fedjax_sim.models.base import Model

ABILITIES = Abilities(
    clock=False,
    clock_refusal="every client trains every round in pFedMe's Algorithm 1 (the server "
                  "then samples which local models it averages), while the clock decides "
                  "which clients train")
HPARAMS = (
    HParam("pfedme_lambda", 15.0, float, lambda v: v > 0, "> 0",
           "pFedMe: strength λ of the Moreau envelope's pull of the personalized model "
           "towards the local model", traced=True, tune_values=(5.0, 15.0, 30.0)),
    HParam("pfedme_personal_lr", 0.01, float, lambda v: v > 0, "> 0",
           "pFedMe: step size of the K gradient steps on the personal problem",
           traced=True),
    HParam("pfedme_beta", 1.0, float, lambda v: v > 0, "> 0",
           "pFedMe: server mixing β: w ← (1 − β) w + β · mean (1: the mean; > 1 "
           "accelerates)", traced=True),
    HParam("pfedme_k", 5, int, lambda v: v >= 1, "a positive integer",
           "pFedMe: gradient steps K on the personal problem per local round"),
)

# fold_in constant of the key the aggregated clients are drawn with: a stream apart from
# the training keys (which are the round's, as FedAvg's under full participation).
SAMPLE_STREAM = 0x53616D


def pfedme(model: Model, *, cover=(), **hp) -> Algorithm:
    """pFedMe bound to ``model``; ``hp`` holds the common hyperparameters, ``pfedme_lambda``,
    ``pfedme_personal_lr``, ``pfedme_beta`` and ``pfedme_k``.

    State: ``server = {"params": w}``, ``clients = {"theta": θ_i}`` with leaves (K, ...).
    """
    loss_fn = cross_entropy_loss(model)
    budget = schedule(hp)
    inner_steps = hp["pfedme_k"]

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {"theta": broadcast(params, data.num_clients)}
        return SimState.create(state_key, {"params": params}, clients, data.num_clients)

    def send(traced, state, round_key):
        del traced
        return (round_key, state.server["params"],
                jax.random.fold_in(round_key, SAMPLE_STREAM))

    def client_update(traced, start, own, x, y, n, key):
        del own  # the personal problem starts from w^t each round
        h = {**hp, **traced}
        lam, eta = h["pfedme_lambda"], h["lr"]
        inner = client_optimizer({**h, "lr": h["pfedme_personal_lr"]})

        def personalize(theta, w, xb, yb, wb):
            def inner_step(_, carry):
                theta, opt_state, _ = carry
                loss, grads = jax.value_and_grad(loss_fn)(theta, xb, yb, wb)
                grads = jax.tree.map(lambda g, t, a: g + lam * (t - a), grads, theta, w)
                updates, opt_state = inner.update(grads, opt_state, theta)
                return optax.apply_updates(theta, updates), opt_state, loss

            carry = (theta, inner.init(theta), jnp.zeros((), jnp.float32))
            theta, _, loss = jax.lax.fori_loop(0, inner_steps, inner_step, carry)
            return theta, loss

        def local_round(carry, xb, yb, wb):
            w, theta = carry
            theta, loss = personalize(theta, w, xb, yb, wb)
            w = jax.tree.map(lambda a, t: a - eta * lam * (a - t), w, theta)
            return (w, theta), loss

        (w, theta), loss = local.scan_batches(local_round, (start, start), x, y, n, key,
                                              **budget)
        return w, {"theta": theta}, loss

    def server_update(traced, state, cohort, sample_key):
        beta = traced["pfedme_beta"]
        num_clients = cohort.counts.shape[0]
        index = sample_cohort(sample_key, num_clients,
                              cohort_size(num_clients, hp["join_ratio"]))
        weights = gather(cohort.counts, index).astype(jnp.float32)
        weights = weights / jnp.maximum(jnp.sum(weights), 1.0)
        mean = jax.tree.map(lambda u: jnp.tensordot(weights, u, 1),
                            gather(cohort.uploads, index))
        params = jax.tree.map(lambda m, w: m + (1.0 - beta) * (w - m), mean,
                              state.server["params"])
        return {"params": params}, {}

    def logits(own, _shared, x):
        return model.apply(own["theta"], x)

    # Every client trains (a full-participation round, uploads stacked); the server's
    # update draws the S it averages.
    method = Method(client_update, logits, server_update=server_update, broadcast=send,
                    eval_inputs=personal_only, mean_uploads=False)
    round_with, evaluate_with = federated(method, join_ratio=1.0, execution=execution(hp))
    size = num_params_bytes(model)

    def comm_bytes(data):
        sampled = cohort_size(data.num_clients, hp["join_ratio"])
        return sampled * size, data.num_clients * size

    return assemble("pfedme", hp, HPARAMS, init_with=init_with, round_with=round_with,
                    evaluate_with=evaluate_with, comm_bytes=comm_bytes, cover=cover)


register("pfedme", pfedme, HPARAMS, abilities=ABILITIES)
