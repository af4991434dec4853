"""FedAvg + fine-tuning: FedAvg, then each client fine-tunes the global model on its own
training data before it is tested.

The standard strong baseline for personalization (e.g. Wang et al., "Federated Evaluation
of On-device Personalization", 2019; Collins et al., FedRep, ICML 2021, Table 1).
"""

from __future__ import annotations

from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS_BN,
    Algorithm,
    HParam,
    federated_algorithm,
    finetuned_evaluate,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.fedavg import fedavg_method, global_init
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS_BN
HPARAMS = (
    HParam("finetune_epochs", 1, int, lambda v: v >= 1, "a positive integer",
           "epochs of local fine-tuning before each evaluation"),
)


def fedavg_ft(model: Model, *, cover=(), **hp) -> Algorithm:
    size = num_params_bytes(model)
    return federated_algorithm(
        "fedavg_ft", hp, HPARAMS, fedavg_method(model, hp), init_with=global_init(model),
        comm_bytes=per_round_bytes(hp, size, size),
        evaluate_with=finetuned_evaluate(model, hp, hp["finetune_epochs"]), cover=cover,
    )
