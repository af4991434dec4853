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
    Abilities,
    Algorithm,
    HParam,
    client_optimizer,
    federated_algorithm,
    finetuned_evaluate,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
    shared_logits,
)
from fedjax_sim.algorithms.fedavg import global_init
from fedjax_sim.core import local
from fedjax_sim.core.rounds import Method
from fedjax_sim.kernels import split
from fedjax_sim.models.base import Model

# Batch-normalized models: the statistics are averaged with the body.
ABILITIES = Abilities(batch_norm=True)
HPARAMS = (
    HParam("finetune_epochs", 1, int, lambda v: v >= 1, "a positive integer",
           "epochs of local fine-tuning before each evaluation"),
)


def fedbabu(model: Model, *, cover=(), **hp) -> Algorithm:
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    body_mask = jax.tree.map(lambda h: not h, model.head_mask(shapes))

    def client_update(traced, start, own, x, y, n, key):
        del own
        h = {**hp, **traced}
        body_only = local.frozen(client_optimizer(h), body_mask)
        params, loss = local_sgd(model, h, optimizer=body_only)(start, x, y, n, key)
        return split.drop(params, model.head), None, loss

    def server_update(traced, state, cohort, context):
        del traced, context
        return {"params": split.merge(state.server["params"], cohort.uploads)}, {}

    body_names = tuple(n for n in shapes if n not in model.head)
    size = num_params_bytes(model, body_names)
    return federated_algorithm(
        "fedbabu", hp, HPARAMS,
        Method(client_update, shared_logits(model), server_update=server_update),
        init_with=global_init(model), comm_bytes=per_round_bytes(hp, size, size),
        evaluate_with=finetuned_evaluate(model, hp, hp["finetune_epochs"]), cover=cover,
    )
