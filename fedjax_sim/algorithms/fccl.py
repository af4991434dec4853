"""FCCL: federated cross-correlation and continual learning.

Huang, Ye, Du. "Learn from Others and Be Yourself in Heterogeneous Federated Learning."
CVPR 2022.

Clients may run different architectures. Before federating, every client trains its model
on its own data; a frozen copy is its intra-domain teacher. Each round, on a random
subset of the unlabeled public set:

1. Collaborative updating: for every public mini-batch, each sampled client computes its
   logits Z_i, the server averages them into Z̄ (all participants, treated as constants),
   and each client takes an Adam step on the cross-correlation loss
   Σ_u (1 − M_uu)² + λ Σ_{u≠v} (1 + M_uv)², M = Z̃_iᵀ Z̄̃ / B, with logits standardized
   along the batch (λ = 0.0051). All clients step in lockstep: one scan over the public
   mini-batches, every group vmapped inside it.
2. Local updating with dual-domain distillation on private data:
   L = CE + KL(σ(f_inter(x)) ‖ σ(f(x))) + KL(σ(f_intra(x)) ‖ σ(f(x))), T = 1, where the
   inter-domain teacher is the client's model from the end of the previous round and
   the intra-domain teacher its frozen pretrained model.

Heterogeneous models use the groups of ``fedmd`` (client k runs architecture k mod A).
Each sampled client sends its logits on every public example once per collaboration
epoch and receives Z̄ for it: B·C float32 each way per epoch.
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
    client_optimizer,
    execution,
    schedule,
)
from fedjax_sim.algorithms.dsfl import SHARED, sample_public
from fedjax_sim.algorithms.fedmd import as_models, grouped_algorithm, prepare_groups
from fedjax_sim.core import local
from fedjax_sim.core.groups import grouped_state
from fedjax_sim.core.rounds import GroupMethod
from fedjax_sim.data.public import PublicData, check_public, check_public_matches
from fedjax_sim.kernels import distill
from fedjax_sim.models.base import Model

USES_PUBLIC = True

# One architecture per client group (--architectures).
ABILITIES = Abilities(heterogeneous=True)
HPARAMS = (
    *SHARED,
    HParam("fccl_lambda", 0.0051, float, lambda v: v >= 0, ">= 0",
           "FCCL: weight λ of the off-diagonal cross-correlation terms", traced=True),
    HParam("fccl_public_lr", 0.001, float, lambda v: v > 0, "> 0",
           "FCCL: Adam learning rate of the collaborative updating", traced=True),
    HParam("fccl_pretrain_epochs", 50, int, lambda v: v >= 1, "a positive integer",
           "FCCL: epochs on private data that make the intra-domain teacher"),
)


def fccl(model: Model | Sequence[Model], *, public: PublicData | None = None, cover=(),
         **hp) -> Algorithm:
    """FCCL over one or more architectures and the unlabeled ``public`` set.

    Args:
      model: a Model, or a sequence of Models (clients assigned round-robin).
      public: the public set (its labels are not read).
      **hp: the common hyperparameters and ``HPARAMS``.
    """
    models = as_models(model, "fccl")
    batch = hp["public_batch"]
    check_public(public, algorithm="fccl", input_shape=models[0].input_shape,
                 num_classes=models[0].num_classes, batch=batch)
    if hp["distill_batch_size"] > batch:
        raise ValueError(
            f"distill_batch_size must be <= public_batch ({batch}) for fccl, got "
            f"{hp['distill_batch_size']}"
        )
    public_x = jnp.asarray(public.x)
    num_public = public.num_samples
    budget = schedule(hp)
    pretrain = schedule(hp, epochs=hp["fccl_pretrain_epochs"])
    col_batch = hp["distill_batch_size"]
    steps_per_epoch = batch // col_batch  # a trailing partial batch is dropped
    run = execution(hp)

    def ce(m):
        return lambda p, xb, yb, wb: local.weighted_cross_entropy(m.apply(p, xb), yb, wb)

    def dual_loss(m):
        def loss(p, xb, yb, wb, prev, intra):
            logits = m.apply(p, xb)
            inter_t = jax.nn.softmax(m.apply(prev, xb), axis=-1)
            intra_t = jax.nn.softmax(m.apply(intra, xb), axis=-1)
            return (local.weighted_cross_entropy(logits, yb, wb)
                    + distill.kl_distillation(logits, inter_t, weights=wb)
                    + distill.kl_distillation(logits, intra_t, weights=wb))

        return loss

    ce_losses = [ce(m) for m in models]
    dual_losses = [dual_loss(m) for m in models]

    def init_with(key, data, traced):
        check_public_matches(public, data, "fccl")
        optimizer = client_optimizer({**hp, **traced})

        def prepare(g, init_key, train_key, x, y, n):
            client_keys = jax.random.split(train_key, x.shape[0])
            return run.map(
                lambda start, xk, yk, nk, kk: local.train(ce_losses[g], optimizer, start,
                                                          xk, yk, nk, kk, **pretrain)[0],
                (x, y, n, client_keys), shared=models[g].init(init_key),
            )

        state_key, teachers = prepare_groups(models, key, data, prepare)
        # Separate buffers: the runner donates the state to each round.
        groups = [{"params": jax.tree.map(jnp.copy, intra), "intra": intra}
                  for intra in teachers]
        return grouped_state(state_key, None, tuple(groups))

    def collaborate(traced, params, xs, key):
        """Lockstep Adam steps of every sampled client (tuple over groups) on the FCCL loss."""
        adam = optax.adam(traced["fccl_public_lr"])
        epochs = hp["distill_epochs"]
        order = jax.vmap(lambda k: jax.random.permutation(k, batch))(
            jax.random.split(key, epochs))
        order = order[:, :steps_per_epoch * col_batch].reshape(-1, col_batch)
        states = tuple(jax.vmap(adam.init)(p) for p in params)

        def step(carry, rows):
            params, states = carry
            xb = xs[rows]
            logits = [distill.client_predictions(m.apply, p, xb)
                      for m, p in zip(models, params, strict=True)]
            mean = jax.lax.stop_gradient(distill.weighted_average(jnp.concatenate(logits)))
            new_params, new_states, losses = [], [], []
            for m, p, s in zip(models, params, states, strict=True):

                def one(pk, sk, m=m):
                    loss, grads = jax.value_and_grad(
                        lambda q: distill.fccl_collaboration_loss(
                            m.apply(q, xb), mean,
                            off_diagonal_weight=traced["fccl_lambda"]))(pk)
                    updates, sk = adam.update(grads, sk, pk)
                    return optax.apply_updates(pk, updates), sk, loss

                p, s, loss = jax.vmap(one)(p, s)
                new_params.append(p)
                new_states.append(s)
                losses.append(loss)
            return (tuple(new_params), tuple(new_states)), jnp.mean(jnp.concatenate(losses))

        (params, _), losses = jax.lax.scan(step, (params, states), order)
        return params, jnp.mean(losses) if losses.size else jnp.zeros(())

    def keys(round_key):
        subset_key, cohort_key, col_key, train_key = jax.random.split(round_key, 4)
        return cohort_key, train_key, (subset_key, col_key)

    def exchange(traced, rows, other):
        subset_key, col_key = other
        xs = public_x[sample_public(subset_key, num_public, batch)]
        # The inter-domain teacher is each client's model as the previous round left it.
        previous = tuple(r["params"] for r in rows)
        params = previous
        col_loss = jnp.zeros(())
        if hp["distill_epochs"] > 0 and steps_per_epoch > 0:
            params, col_loss = collaborate(traced, params, xs, col_key)
        inputs = [(p, prev, r["intra"]) for p, prev, r in zip(params, previous, rows,
                                                                strict=True)]
        return inputs, None, {"collaboration_loss": col_loss}

    def client_update(traced, g, received, inputs, x, y, n, key):
        del received
        params, prev, intra = inputs

        def dual(q, xb, yb, wb):
            return dual_losses[g](q, xb, yb, wb, prev, intra)

        optimizer = client_optimizer({**hp, **traced})
        trained, loss = local.train(dual, optimizer, params, x, y, n, key, **budget)
        return {"params": trained, "intra": intra}, loss

    payload = 4 * hp["distill_epochs"] * steps_per_epoch * col_batch * models[0].num_classes
    return grouped_algorithm("fccl", models, hp, HPARAMS,
                             GroupMethod(keys, exchange, client_update), init_with=init_with,
                             payload=payload, cover=cover)
