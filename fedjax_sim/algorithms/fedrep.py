"""FedRep: learn a shared representation, keep a personal head, train them in turn.

Collins, Hassani, Mokhtari, Shakkottai. "Exploiting Shared Representations for
Personalized Federated Learning." ICML 2021.

Each round a client first trains only its head with the base frozen, then only the base
with the head frozen (``body_epochs`` epochs, default 1, as FL-bench's
``train_body_epoch``); the head stays personal, the base is averaged. With
``local_epochs = E`` the head gets ``E - body_epochs`` epochs. With ``local_steps = S`` the
head gets S steps and the base ``body_epochs`` × ceil(S / local_epochs) steps.

``server_opt`` (with ``server_lr``, ``server_momentum``, ``beta1``, ``beta2``, ``tau``)
applies a server optimizer to the shared layers, as for ``fedper``; the default, ``sgd``
at ``server_lr`` 1, is the plain mean, bit for bit.
"""

from __future__ import annotations

import jax

from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS,
    Algorithm,
    HParam,
    client_optimizer,
    cross_entropy_loss,
)
from fedjax_sim.algorithms.partial import decoupled
from fedjax_sim.algorithms.server_opt import SERVER_HPARAMS
from fedjax_sim.core import local
from fedjax_sim.models.base import Model

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS
HPARAMS = (
    HParam("body_epochs", 1, int, lambda v: v >= 1, "a positive integer",
           "FedRep: epochs that train the base after the head (must be <= local_epochs)"),
    *SERVER_HPARAMS,
)


def fedrep(model: Model, *, cover=(), **hp) -> Algorithm:
    if hp["local_steps"] is None and hp["body_epochs"] > hp["local_epochs"]:
        raise ValueError(
            f"body_epochs must be <= local_epochs={hp['local_epochs']}, got {hp['body_epochs']}"
        )
    loss_fn = cross_entropy_loss(model)
    head_mask = model.head_mask(jax.eval_shape(model.init, jax.random.key(0)))
    body_mask = jax.tree.map(lambda h: not h, head_mask)
    if hp["local_steps"] is None:
        head_budget = {"epochs": hp["local_epochs"] - hp["body_epochs"]}
        body_budget = {"epochs": hp["body_epochs"]}
    else:
        per_epoch = -(-hp["local_steps"] // hp["local_epochs"])
        head_budget = {"steps": hp["local_steps"]}
        body_budget = {"steps": hp["body_epochs"] * per_epoch}
    batch = hp["batch_size"]

    def local_fn(h, params, x, y, n, key):
        base_optimizer = client_optimizer(h)
        head_only = local.frozen(base_optimizer, head_mask)
        body_only = local.frozen(base_optimizer, body_mask)
        head_key, body_key = jax.random.split(key)
        if head_budget.get("epochs", 1) > 0:
            params, _ = local.train(
                loss_fn, head_only, params, x, y, n, head_key, batch_size=batch, **head_budget
            )
        params, body_loss = local.train(
            loss_fn, body_only, params, x, y, n, body_key, batch_size=batch, **body_budget
        )
        # The reported loss is that of the phase that trains the shared representation.
        return params, body_loss

    return decoupled("fedrep", model, hp, model.head, local_fn, specs=HPARAMS, cover=cover,
                     server_opt=hp["server_opt"])
