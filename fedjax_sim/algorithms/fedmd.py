"""FedMD: heterogeneous federated learning via model distillation.

Li, Wang. "FedMD: Heterogenous Federated Learning via Model Distillation." NeurIPS 2019
Workshop on Federated Learning for Data Privacy and Confidentiality (arXiv:1910.03581).

Clients may run different architectures. Before federating, every model is trained on
the labeled public set and then on its private data (transfer learning). Each round the
server draws a random alignment subset of the public set; every sampled client computes
its class scores (logits) on it, the server averages them into a consensus, and each
client

1. digests: fits the consensus on the subset (mean absolute error on logits,
   ``distill_epochs`` epochs, mini-batches of ``distill_batch_size``),
2. revisits: trains on its private data for the local budget.

With ``distill_epochs = 0`` nobody digests and nothing is sent: transfer learning and
private training only, the paper's no-collaboration baseline.

Heterogeneous models: clients are assigned to the given architectures round-robin
(client k runs architecture k mod A). Each architecture's clients form a group with its
own batched parameter tree (leaves (K_g, ...)); the client state is the tuple of the
groups' trees, and the consensus is shared across groups. Per round each group samples
``round(join_ratio · K_g)`` of its clients.

This module also holds the group machinery FCCL reuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.algorithms.base import (
    Algorithm,
    HParam,
    client_optimizer,
    cross_entropy_loss,
    map_options,
    num_params_bytes,
    schedule,
)
from fedjax_sim.algorithms.dsfl import SHARED, distill_optimizer, distill_train, sample_public
from fedjax_sim.core import local
from fedjax_sim.core.cohort import client_map, cohort_size, sample_cohort
from fedjax_sim.core.evaluate import count_correct
from fedjax_sim.core.rounds import advance
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.public import PublicData, check_public, check_public_matches
from fedjax_sim.kernels import distill
from fedjax_sim.kernels.aggregation import gather, scatter
from fedjax_sim.models.base import Model

USES_PUBLIC = True

HPARAMS = (
    *SHARED,
    HParam("fedmd_transfer_epochs", 5, int, lambda v: v >= 0, "an integer >= 0",
           "FedMD: epochs on the labeled public set before federating (transfer learning)"),
)


# --- Heterogeneous groups (shared with FCCL) ---------------------------------------------


def as_models(model: Model | Sequence[Model], algorithm: str) -> tuple[Model, ...]:
    """One or more architectures with the same input shape and number of classes."""
    models = (model,) if isinstance(model, Model) else tuple(model)
    if not models or not all(isinstance(m, Model) for m in models):
        raise ValueError(f"{algorithm}: model must be a Model or a non-empty sequence of Models")
    first = models[0]
    for m in models[1:]:
        if m.input_shape != first.input_shape or m.num_classes != first.num_classes:
            raise ValueError(
                f"{algorithm}: every architecture must take input shape {first.input_shape} "
                f"with {first.num_classes} classes; {m.name} takes {m.input_shape} with "
                f"{m.num_classes}"
            )
    return models


def group_members(num_clients: int, num_groups: int) -> tuple[np.ndarray, ...]:
    """Client indices of each architecture group: client k belongs to group k mod A."""
    if num_clients < num_groups:
        raise ValueError(
            f"{num_groups} architectures need at least {num_groups} clients, got {num_clients}"
        )
    return tuple(np.arange(g, num_clients, num_groups) for g in range(num_groups))


def group_cohorts(
    key: jax.Array, members: Sequence[np.ndarray], join_ratio: float
) -> list[jax.Array | None]:
    """Per group, the sampled rows of that group (``None``: all of them)."""
    keys = jax.random.split(key, len(members))
    return [
        sample_cohort(keys[g], len(idx), cohort_size(len(idx), join_ratio))
        for g, idx in enumerate(members)
    ]


def grouped_cohort_size(num_clients: int, num_groups: int, join_ratio: float) -> int:
    """Clients sampled per round over all groups."""
    return sum(cohort_size(len(idx), join_ratio)
               for idx in group_members(num_clients, num_groups))


def global_rows(members: np.ndarray, rows: jax.Array | None) -> jax.Array:
    """Client indices (into the K clients) of a group's sampled rows."""
    members = jnp.asarray(members)
    return members if rows is None else members[rows]


def private_data(data: FederatedData, clients: jax.Array) -> tuple:
    """``(train_x, train_y, train_counts)`` of the clients ``clients``."""
    return data.train_x[clients], data.train_y[clients], data.train_counts[clients]


def grouped_state(key: jax.Array, server: Any, groups: tuple) -> SimState:
    """A SimState whose client part is a tuple of per-group trees (leaves (K_g, ...))."""
    for tree in groups:
        leaves = jax.tree.leaves(tree)
        if len({leaf.shape[0] for leaf in leaves}) > 1:
            raise ValueError("every leaf of a group's tree must share its leading axis")
    return SimState(key=key, round=jnp.zeros((), jnp.int32), server=server, clients=groups)


def grouped_evaluate(
    models: Sequence[Model],
    members: Sequence[np.ndarray],
    logits_fn: Callable[[Model, Any, jax.Array], jax.Array],
    groups: tuple,
    data: FederatedData,
    hp: dict,
) -> tuple[jax.Array, jax.Array]:
    """``evaluate`` over groups: every client's own model on its own test set.

    Args:
      logits_fn: ``(model, client_state_k, x) -> logits``.

    Returns:
      correct (K,) int32 and loss_sum (K,) float32, in client order.
    """
    correct = jnp.zeros((data.num_clients,), jnp.int32)
    loss = jnp.zeros((data.num_clients,), jnp.float32)
    for model, idx, tree in zip(models, members, groups, strict=True):
        c, l_ = count_correct(
            lambda own, _, x, m=model: logits_fn(m, own, x), tree, None,
            data.test_x[idx], data.test_y[idx], data.test_counts[idx], **map_options(hp),
        )
        correct = correct.at[idx].set(c)
        loss = loss.at[idx].set(l_)
    return correct, loss


def cohort_loss(losses: Sequence[jax.Array], counts: Sequence[jax.Array]) -> jax.Array:
    """Sample-weighted mean of the per-client losses of all groups' cohorts."""
    losses = jnp.concatenate(losses)
    weights = jnp.concatenate(counts).astype(jnp.float32)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def architecture_report(models: Sequence[Model]) -> Callable:
    """``report`` listing each group's architecture and parameter count."""
    described = [f"{m.name} ({num_params_bytes(m) // 4} parameters)" for m in models]
    return lambda _state: {"architectures": described}


def distill_bytes(hp: dict, num_groups: int, payload: int) -> Callable:
    """``comm_bytes`` for a grouped algorithm sending ``payload`` bytes each way per sampled
    client and round."""

    def comm_bytes(data: FederatedData) -> tuple[int, int]:
        size = grouped_cohort_size(data.num_clients, num_groups, hp["join_ratio"])
        return size * payload, size * payload

    return comm_bytes


# --- FedMD --------------------------------------------------------------------------------


def fedmd(model: Model | Sequence[Model], *, public: PublicData | None = None, **hp) -> Algorithm:
    """FedMD over one or more architectures and the labeled ``public`` set.

    Args:
      model: a Model, or a sequence of Models (clients assigned round-robin).
      public: the public set; its labels are used for transfer learning.
      **hp: the common hyperparameters and ``HPARAMS``.
    """
    models = as_models(model, "fedmd")
    batch = hp["public_batch"]
    check_public(public, algorithm="fedmd", input_shape=models[0].input_shape,
                 num_classes=models[0].num_classes, batch=batch,
                 need_labels=hp["fedmd_transfer_epochs"] > 0)
    public_x = jnp.asarray(public.x)
    public_y = None if public.y is None else jnp.asarray(public.y)
    num_public = public.num_samples
    optimizer = client_optimizer(hp)
    digest_optimizer = distill_optimizer(hp)
    budget = schedule(hp)
    transfer = schedule(hp, epochs=hp["fedmd_transfer_epochs"])
    digest = {"batch_size": hp["distill_batch_size"], "epochs": hp["distill_epochs"]}
    ce = [cross_entropy_loss(m) for m in models]

    def mae(m):
        return lambda params, xb, tb, wb: distill.mae_distillation(m.apply(params, xb), tb,
                                                                   weights=wb)

    mae_losses = [mae(m) for m in models]

    def init(key, data):
        check_public_matches(public, data, "fedmd")
        members = group_members(data.num_clients, len(models))
        keys = jax.random.split(key, 2 * len(models) + 1)
        groups = []
        for g, (m, idx) in enumerate(zip(models, members, strict=True)):

            @jax.jit
            def prepare(init_key, train_key, x, y, n, m=m, g=g):
                params = m.init(init_key)
                if hp["fedmd_transfer_epochs"] > 0:
                    # The public phase is identical for every client of a group (same
                    # start, same data), so it runs once and is copied.
                    params, _ = local.train(ce[g], optimizer, params, public_x, public_y,
                                            jnp.int32(num_public), train_key, **transfer)
                client_keys = jax.random.split(jax.random.fold_in(train_key, 1), x.shape[0])
                return client_map(
                    lambda start, xk, yk, nk, kk: local.train(ce[g], optimizer, start, xk, yk,
                                                              nk, kk, **budget)[0],
                    (x, y, n, client_keys), shared=params, **map_options(hp),
                )

            groups.append({"params": prepare(keys[1 + 2 * g], keys[2 + 2 * g],
                                             *private_data(data, jnp.asarray(idx)))})
        return grouped_state(keys[0], None, tuple(groups))

    def round_fn(state, data):
        members = group_members(data.num_clients, len(models))
        next_key, round_key = jax.random.split(state.key)
        subset_key, cohort_key, train_key = jax.random.split(round_key, 3)
        xs = public_x[sample_public(subset_key, num_public, batch)]
        cohorts = group_cohorts(cohort_key, members, hp["join_ratio"])
        rows = [gather(tree, c) for tree, c in zip(state.clients, cohorts, strict=True)]
        consensus = None
        if digest["epochs"] > 0:
            # Communicate: every sampled client's class scores on the subset, (M, B, C).
            scores = jnp.concatenate([
                distill.client_predictions(m.apply, r["params"], xs)
                for m, r in zip(models, rows, strict=True)
            ])
            consensus = distill.weighted_average(scores)
        new_groups, losses, counts = [], [], []
        for g, (idx, tree, c, r) in enumerate(
            zip(members, state.clients, cohorts, rows, strict=True)
        ):
            clients = global_rows(idx, c)
            x, y, n = private_data(data, clients)
            keys = jax.random.split(jax.random.fold_in(train_key, g), clients.shape[0])

            def client(received, params, xk, yk, nk, kk, g=g):
                digest_key, revisit_key = jax.random.split(kk)
                if digest["epochs"] > 0:
                    subset_x, targets = received
                    params, _ = distill_train(mae_losses[g], digest_optimizer, params, subset_x,
                                              targets, digest_key, **digest)
                return local.train(ce[g], optimizer, params, xk, yk, nk, revisit_key, **budget)

            params, loss = client_map(client, (r["params"], x, y, n, keys),
                                      shared=(xs, consensus), **map_options(hp))
            new_groups.append(scatter(tree, c, {"params": params}))
            losses.append(loss)
            counts.append(n)
        metrics = {"train_loss": cohort_loss(losses, counts)}
        return advance(state, next_key, clients=tuple(new_groups)), metrics

    def evaluate(state, data):
        members = group_members(data.num_clients, len(models))
        return grouped_evaluate(models, members, lambda m, own, x: m.apply(own["params"], x),
                                state.clients, data, hp)

    # Without digesting there is no collaboration and nothing is sent.
    payload = 4 * batch * models[0].num_classes if digest["epochs"] > 0 else 0
    return Algorithm("fedmd", init, round_fn, evaluate, distill_bytes(hp, len(models), payload),
                     hp, architecture_report(models))
