"""FedBABU: train only the body federatedly, with the head frozen at its random init.

Oh, Kim, Yun. "FedBABU: Towards Enhanced Representation for Federated Image
Classification." ICLR 2022.

During federated training the head is never updated (so all clients share the same
random head) and only the body is sent and averaged. Before evaluation each client
fine-tunes the whole model, head included, on its own data for ``finetune_epochs``.
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import (
    Algorithm,
    HParam,
    client_optimizer,
    finetuned_evaluate,
    local_sgd,
    map_options,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.fedavg import global_init
from fedjax_sim.core import local
from fedjax_sim.core.rounds import advance, run_cohort
from fedjax_sim.kernels import split
from fedjax_sim.models.base import Model

HPARAMS = (
    HParam("finetune_epochs", 1, int, lambda v: v >= 1, "a positive integer",
           "epochs of local fine-tuning before each evaluation"),
)


def fedbabu(model: Model, **hp) -> Algorithm:
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    body_only = local.frozen(
        client_optimizer(hp), jax.tree.map(lambda h: not h, model.head_mask(shapes))
    )
    train = local_sgd(model, hp, optimizer=body_only)

    def round_fn(state, data):
        next_key, round_key = jax.random.split(state.key)
        global_params = state.server["params"]

        def client(start, _, x, y, n, key):
            params, loss = train(start, x, y, n, key)
            return split.drop(params, model.head), None, loss

        result = run_cohort(
            round_key, state.clients, data, client, join_ratio=hp["join_ratio"],
            mean_uploads=True, server=global_params, **map_options(hp),
        )
        server = {"params": split.merge(global_params, result.uploads)}
        return advance(state, next_key, server=server), {"train_loss": result.loss}

    body_names = tuple(n for n in shapes if n not in model.head)
    size = num_params_bytes(model, body_names)
    return Algorithm(
        "fedbabu", global_init(model), round_fn,
        finetuned_evaluate(model, hp, hp["finetune_epochs"]),
        per_round_bytes(hp, size, size), hp,
    )
