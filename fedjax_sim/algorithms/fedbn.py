"""FedBN: FedAvg with every batch-normalization layer kept on its client.

Li, Jiang, Zhang, Kamp, Dou. "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization." ICLR 2021.

Alg. 1 (FedBN): each client k trains its full model w_k by local SGD; at every
communication round the server averages each layer l that is *not* batch normalization,
``w^(l) <- mean_k w_k^(l)``, and sends it back, while every batch-normalization layer's
parameters (scale γ, bias β) and running statistics (mean, variance) stay local:
``w_k^(l)`` for a BN layer l is never sent, averaged or overwritten.

Here the BN part of a model is ``Model.norm_layers`` (the layers' affine parameters) and
``Model.state_names`` (their running statistics, ``"batch_stats"``); it lives on the
clients as (K, ...) leaves, as FedPer's head does (``partial.decoupled``), and each client
evaluates the averaged layers with its own BN layers. Local training is the standard step
(``base.local_sgd``): training-mode normalization over each batch's real rows, then the
running statistics' moving-average update. Paper and official code average the shared
layers with equal client weights; this round uses the skeleton's sample-weighted mean, as
FedAvg here does (the same on clients of equal size). Under partial participation a client
keeps its BN layers between the rounds it is sampled.

On a model without batch normalization nothing is local and FedBN is FedAvg: the same
program and the same floats, bit for bit.
"""

from __future__ import annotations

from fedjax_sim.algorithms import register
from fedjax_sim.algorithms.base import (
    Abilities,
    Algorithm,
    federated_algorithm,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.fedavg import fedavg_method, global_init
from fedjax_sim.algorithms.partial import decoupled, plain_sgd
from fedjax_sim.models.base import Model

ABILITIES = Abilities(batch_norm=True)
HPARAMS = ()


def local_layers(model: Model) -> tuple[str, ...]:
    """The top-level parameter entries FedBN keeps on the clients: the normalization
    layers and their running statistics (empty for a model without batch normalization)."""
    return tuple(model.norm_layers) + tuple(model.state_names)


def fedbn(model: Model, *, cover=(), **hp) -> Algorithm:
    """FedBN bound to ``model``; ``hp`` holds the common hyperparameters.

    State on a batch-normalized model: ``server = {"params": the model, whose BN entries
    keep their initial values and are never sent}``, ``clients = {"personal": the BN
    layers and statistics}`` with leaves (K, ...). On a model without BN: FedAvg's state.
    """
    personal = local_layers(model)
    if not personal:
        size = num_params_bytes(model)
        return federated_algorithm(
            "fedbn", hp, HPARAMS, fedavg_method(model, hp), init_with=global_init(model),
            comm_bytes=per_round_bytes(hp, size, size), cover=cover)
    return decoupled("fedbn", model, hp, personal, plain_sgd(model), specs=HPARAMS,
                     cover=cover)


register("fedbn", fedbn, HPARAMS, abilities=ABILITIES)
