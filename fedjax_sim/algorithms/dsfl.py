"""DS-FL: distillation-based semi-supervised federated learning.

Itahara, Nishio, Koda, Morikura, Yamamoto. "Distillation-Based Semi-Supervised Federated
Learning for Communication-Efficient Collaborative Training With Non-IID Private Data."
IEEE Transactions on Mobile Computing, 2021 (arXiv:2008.06180).

Clients never send weights. Every round the server names a random subset of an unlabeled
public (open) set; each sampled client

1. distills its model on the previous round's global soft targets (KL or cross-entropy),
2. trains on its private labeled data,
3. uploads its softmax probabilities on the new subset, a (B, C) array.

The server averages the (M, B, C) uploads per example and sharpens the average with
Entropy Reduction Aggregation, ŷ = softmax(mean_k p_k / T) (T = 0.1), or keeps the plain
average (SA). A global model on the server distills on ŷ as well. Clients are evaluated on
their own models (``dsfl_eval="client"``) or on the global one (``"global"``).

Per round and sampled client, B·C float32 go up and B·C come down, against 2·|θ| for
FedAvg; the subset's indices can be derived from a seed both sides share and are not
counted.

The shared hyperparameters of the distillation family (``public_batch``,
``distill_epochs``, ``distill_batch_size``) and small helpers live here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import (
    Abilities,
    Algorithm,
    HParam,
    client_optimizer,
    cross_entropy_loss,
    federated_algorithm,
    per_round_bytes,
    schedule,
    shared_logits,
)
from fedjax_sim.algorithms.local import own_logits
from fedjax_sim.core import local
from fedjax_sim.core.rounds import Method, personal_only
from fedjax_sim.core.state import SimState
from fedjax_sim.data.public import PublicData, check_public, check_public_matches
from fedjax_sim.kernels import distill
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

USES_PUBLIC = True

PUBLIC_BATCH = HParam(
    "public_batch", 256, int, lambda v: v >= 1, "a positive integer",
    "distillation: public examples drawn per round (the subset every client predicts on)",
)
DISTILL_EPOCHS = HParam(
    "distill_epochs", 1, int, lambda v: v >= 0, "an integer >= 0",
    "distillation: epochs over the round's public subset when distilling (0: none)",
)
DISTILL_BATCH = HParam(
    "distill_batch_size", 64, int, lambda v: v >= 1, "a positive integer",
    "distillation: mini-batch size on the public subset",
)
# 0.1, not the client lr: at the client lr (0.01 by default) a round's few distillation
# steps barely move the models off what private training gives, and a default run ties
# with Local on most clients (86% of digits clients at α = 0.1, against 53-67% at 0.1).
DISTILL_LR = HParam(
    "distill_lr", 0.1, float, lambda v: v > 0, "> 0",
    "distillation: SGD learning rate on the public set", traced=True,
)
SHARED = (PUBLIC_BATCH, DISTILL_EPOCHS, DISTILL_BATCH, DISTILL_LR)

AGGREGATIONS = ("era", "sa")
LOSSES = ("kl", "ce")
EVALS = ("client", "global")

# The virtual clock's partial cohorts would break it.
ABILITIES = Abilities(
    clock=False,
    clock_refusal="it aggregates soft labels on a public set, not client updates")
HPARAMS = (
    *SHARED,
    HParam("dsfl_aggregation", "era", str, lambda v: v in AGGREGATIONS, "era or sa",
           "DS-FL: entropy reduction aggregation (era) or simple averaging (sa)",
           choices=AGGREGATIONS),
    HParam("dsfl_temperature", 0.1, float, lambda v: v > 0, "> 0",
           "DS-FL: ERA temperature T in softmax(mean / T)", traced=True),
    HParam("dsfl_distill_loss", "kl", str, lambda v: v in LOSSES, "kl or ce",
           "DS-FL: distillation loss against the soft targets", choices=LOSSES),
    HParam("dsfl_eval", "client", str, lambda v: v in EVALS, "client or global",
           "DS-FL: evaluate each client's own model or the server's distilled model",
           choices=EVALS),
)


def single_model(model, algorithm: str) -> Model:
    """``model`` itself, refusing a sequence of architectures."""
    if not isinstance(model, Model):
        raise ValueError(
            f"{algorithm} trains one architecture; got {type(model).__name__} (heterogeneous "
            "models are for fedmd and fccl)"
        )
    return model


def distill_optimizer(hp: dict) -> optax.GradientTransformation:
    """The client optimizer with ``distill_lr`` as its learning rate; ``hp`` may hold the
    traced hyperparameters."""
    return client_optimizer({**hp, "lr": hp["distill_lr"]})


def sample_public(key: jax.Array, num_public: int, size: int) -> jax.Array:
    """``size`` distinct public indices (all of them, in random order, when size == N)."""
    return jax.random.choice(key, num_public, (size,), replace=False)


def distill_train(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    params,
    x: jax.Array,
    targets: jax.Array,
    key: jax.Array,
    *,
    batch_size: int,
    epochs: int,
):
    """Trains ``params`` on the public batch ``x`` (B, ...) against ``targets`` (B, ...) for
    ``epochs`` epochs of shuffled mini-batches; ``loss_fn(params, xb, tb, wb)``."""
    count = jnp.int32(x.shape[0])
    return local.train(loss_fn, optimizer, params, x, targets, count, key,
                       batch_size=batch_size, epochs=epochs)


def soft_target_loss(model: Model, kind: str) -> Callable:
    """``(params, xb, targets, wb) -> loss`` of ``model`` against soft targets."""
    kernel = distill.kl_distillation if kind == "kl" else distill.ce_distillation

    def loss(params, xb, targets, wb):
        return kernel(model.apply(params, xb), targets, weights=wb)

    return loss


def mean_entropy(probs: jax.Array) -> jax.Array:
    """Mean Shannon entropy (nats) of the rows of ``probs``."""
    return -jnp.mean(jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-12, 1.0)), axis=-1))


def dsfl(model: Model | Sequence[Model], *, public: PublicData | None = None, cover=(),
         **hp) -> Algorithm:
    """DS-FL bound to ``model`` and the unlabeled ``public`` set.

    Args:
      model: one architecture shared by all clients.
      public: the public set (its labels are not read).
      **hp: the common hyperparameters and ``HPARAMS``.
    """
    model = single_model(model, "dsfl")
    batch = hp["public_batch"]
    check_public(public, algorithm="dsfl", input_shape=model.input_shape,
                 num_classes=model.num_classes, batch=batch)
    public_x = jnp.asarray(public.x)
    num_public = public.num_samples
    num_classes = model.num_classes
    loss_fn = cross_entropy_loss(model)
    kd_loss = soft_target_loss(model, hp["dsfl_distill_loss"])
    budget = schedule(hp)
    kd = {"batch_size": hp["distill_batch_size"], "epochs": hp["distill_epochs"]}
    distills = hp["distill_epochs"] > 0

    def aggregate(traced, probs):
        if hp["dsfl_aggregation"] == "era":
            return distill.era(probs, temperature=traced["dsfl_temperature"])
        return distill.weighted_average(probs)

    def init_with(key, data, traced):
        del traced
        check_public_matches(public, data, "dsfl")
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        server = {
            "params": params,
            "targets": jnp.zeros((batch, num_classes), jnp.float32),
            "subset": jnp.zeros((batch,), jnp.int32),
            "has_targets": jnp.zeros((), bool),
        }
        clients = {"params": broadcast(params, data.num_clients)}
        return SimState.create(state_key, server, clients, data.num_clients)

    def send(traced, state, round_key):
        del traced
        cohort_key, subset_key, server_key = jax.random.split(round_key, 3)
        server = state.server
        subset = sample_public(subset_key, num_public, batch)
        next_x = public_x[subset]
        # What the server sends: last round's subset and soft targets, this round's subset.
        received = {"previous_x": public_x[server["subset"]], "targets": server["targets"],
                    "has_targets": server["has_targets"], "next_x": next_x}
        return cohort_key, received, (subset, next_x, server_key)

    def client_update(traced, received, own, x, y, n, key):
        h = {**hp, **traced}
        distill_key, train_key = jax.random.split(key)
        params = own["params"]
        if distills:
            params = jax.lax.cond(
                received["has_targets"],
                lambda p: distill_train(kd_loss, distill_optimizer(h), p,
                                        received["previous_x"], received["targets"],
                                        distill_key, **kd)[0],
                lambda p: p,
                params,
            )
        params, loss = local.train(loss_fn, client_optimizer(h), params, x, y, n, train_key,
                                   **budget)
        probs = jax.nn.softmax(model.apply(params, received["next_x"]), axis=-1)
        return probs, {"params": params}, loss

    def server_update(traced, state, cohort, context):
        subset, next_x, server_key = context
        targets = aggregate(traced, cohort.uploads)  # (M, B, C) -> (B, C)
        global_params = state.server["params"]
        if distills:
            global_params, _ = distill_train(kd_loss, distill_optimizer({**hp, **traced}),
                                             global_params, next_x, targets, server_key, **kd)
        new_server = {
            "params": global_params,
            "targets": targets,
            "subset": subset.astype(jnp.int32),
            "has_targets": jnp.ones((), bool),
        }
        return new_server, {"target_entropy": mean_entropy(targets)}

    if hp["dsfl_eval"] == "global":
        logits, eval_inputs = shared_logits(model), (lambda traced, state: (
            None, state.server["params"]))
    else:
        logits, eval_inputs = own_logits(model), personal_only

    def report(state):
        return {"target_entropy": float(mean_entropy(state.server["targets"]))}

    payload = 4 * batch * num_classes
    method = Method(client_update, logits, server_update=server_update, broadcast=send,
                    eval_inputs=eval_inputs, mean_uploads=False)
    return federated_algorithm("dsfl", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, payload, payload), report=report,
                               cover=cover)
