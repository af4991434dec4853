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

import jax
import jax.numpy as jnp

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
from fedjax_sim.algorithms.dsfl import SHARED, distill_optimizer, distill_train, sample_public
from fedjax_sim.core import local
from fedjax_sim.core.groups import (
    group_members,
    grouped_cohort_size,
    grouped_state,
    private_data,
)
from fedjax_sim.core.rounds import GroupMethod, grouped, grouped_evaluate
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.public import PublicData, check_public, check_public_matches
from fedjax_sim.kernels import distill
from fedjax_sim.models.base import Model

USES_PUBLIC = True

# One architecture per client group (--architectures).
ABILITIES = Abilities(heterogeneous=True)
HPARAMS = (
    *SHARED,
    HParam("fedmd_transfer_epochs", 5, int, lambda v: v >= 0, "an integer >= 0",
           "FedMD: epochs on the labeled public set before federating (transfer learning)"),
)

# The group helpers live in ``core.groups``; these names stay importable from here.
__all__ = ["HPARAMS", "USES_PUBLIC", "architecture_report", "as_models", "distill_bytes",
           "fedmd", "group_members", "grouped_algorithm", "grouped_state", "prepare_groups"]


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


def prepare_groups(models: Sequence[Model], key: jax.Array, data: FederatedData,
                   prepare: Callable) -> tuple[jax.Array, list]:
    """Each group's initial client state, made on the host before the first round.

    Args:
      prepare: ``(g, init_key, train_key, x, y, n) -> tree`` with leaves (K_g, ...) for
        group g from its clients' private data (jitted here, one compilation per group).

    Returns:
      The state's key and what ``prepare`` made for each group.
    """
    members = group_members(data.num_clients, len(models))
    keys = jax.random.split(key, 2 * len(models) + 1)
    groups = []
    for g, idx in enumerate(members):
        made = jax.jit(lambda *args, g=g: prepare(g, *args))
        groups.append(made(keys[1 + 2 * g], keys[2 + 2 * g],
                           *private_data(data, jnp.asarray(idx))))
    return keys[0], groups


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


def grouped_algorithm(name: str, models: Sequence[Model], hp: dict, specs, method: GroupMethod,
                      *, init_with: Callable, payload: int, cover=()) -> Algorithm:
    """An algorithm over architecture groups: ``method`` in the grouped round skeleton,
    every client evaluated on its own ``params``, ``payload`` bytes each way per sampled
    client and round."""
    run = execution(hp)
    round_with = grouped(method, num_groups=len(models), join_ratio=hp["join_ratio"],
                         execution=run)
    evaluate_with = grouped_evaluate(lambda g, own, x: models[g].apply(own["params"], x),
                                     num_groups=len(models), execution=run)
    return assemble(name, hp, specs, init_with=init_with, round_with=round_with,
                    evaluate_with=evaluate_with,
                    comm_bytes=distill_bytes(hp, len(models), payload),
                    report=architecture_report(models), cover=cover)


# --- FedMD --------------------------------------------------------------------------------


def fedmd(model: Model | Sequence[Model], *, public: PublicData | None = None, cover=(),
          **hp) -> Algorithm:
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
    budget = schedule(hp)
    transfer = schedule(hp, epochs=hp["fedmd_transfer_epochs"])
    digest = {"batch_size": hp["distill_batch_size"], "epochs": hp["distill_epochs"]}
    ce = [cross_entropy_loss(m) for m in models]
    run = execution(hp)

    def mae(m):
        return lambda params, xb, tb, wb: distill.mae_distillation(m.apply(params, xb), tb,
                                                                   weights=wb)

    mae_losses = [mae(m) for m in models]

    def init_with(key, data, traced):
        check_public_matches(public, data, "fedmd")
        optimizer = client_optimizer({**hp, **traced})

        def prepare(g, init_key, train_key, x, y, n):
            params = models[g].init(init_key)
            if hp["fedmd_transfer_epochs"] > 0:
                # The public phase is identical for every client of a group (same start,
                # same data), so it runs once and is copied.
                params, _ = local.train(ce[g], optimizer, params, public_x, public_y,
                                        jnp.int32(num_public), train_key, **transfer)
            client_keys = jax.random.split(jax.random.fold_in(train_key, 1), x.shape[0])
            return {"params": run.map(
                lambda start, xk, yk, nk, kk: local.train(ce[g], optimizer, start, xk, yk, nk,
                                                          kk, **budget)[0],
                (x, y, n, client_keys), shared=params,
            )}

        state_key, groups = prepare_groups(models, key, data, prepare)
        return grouped_state(state_key, None, tuple(groups))

    def keys(round_key):
        subset_key, cohort_key, train_key = jax.random.split(round_key, 3)
        return cohort_key, train_key, subset_key

    def exchange(traced, rows, subset_key):
        xs = public_x[sample_public(subset_key, num_public, batch)]
        consensus = None
        if digest["epochs"] > 0:
            # Communicate: every sampled client's class scores on the subset, (M, B, C).
            scores = jnp.concatenate([
                distill.client_predictions(m.apply, r["params"], xs)
                for m, r in zip(models, rows, strict=True)
            ])
            consensus = distill.weighted_average(scores)
        return [r["params"] for r in rows], (xs, consensus), {}

    def client_update(traced, g, received, params, x, y, n, key):
        h = {**hp, **traced}
        digest_key, revisit_key = jax.random.split(key)
        if digest["epochs"] > 0:
            subset_x, targets = received
            params, _ = distill_train(mae_losses[g], distill_optimizer(h), params, subset_x,
                                      targets, digest_key, **digest)
        params, loss = local.train(ce[g], client_optimizer(h), params, x, y, n, revisit_key,
                                   **budget)
        return {"params": params}, loss

    # Without digesting there is no collaboration and nothing is sent.
    payload = 4 * batch * models[0].num_classes if digest["epochs"] > 0 else 0
    return grouped_algorithm("fedmd", models, hp, HPARAMS,
                             GroupMethod(keys, exchange, client_update), init_with=init_with,
                             payload=payload, cover=cover)
