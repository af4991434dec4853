"""Layer-wise decoupling shared by FedPer, FedRep and LG-FedAvg.

The model's top-level layers split into a personal part, which lives on the clients as a
(K, ...) tree and never leaves them, and a shared part, which the server averages. The
three methods differ only in which layers are personal and how a client trains locally.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from fedjax_sim.algorithms.base import (
    Algorithm,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.server_opt import with_server_optimizer
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels import split
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models.base import Model

# local_fn(hp, params, x, y, n, key) -> (params, loss); ``hp`` the resolved hyperparameters
# with the traced ones as (traced) arrays.
LocalFn = Callable


def plain_sgd(model: Model) -> LocalFn:
    """Local SGD of all layers with this round's hyperparameters."""
    return lambda hp, params, x, y, n, key: local_sgd(model, hp)(params, x, y, n, key)


def decoupled(
    name: str, model: Model, hp: dict, personal: tuple[str, ...], local_fn: LocalFn,
    batch_order=None, specs=(), cover=(), server_opt: str | None = None,
) -> Algorithm:
    """An algorithm whose layers ``personal`` stay on the clients.

    Args:
      name: registry name.
      model: the model.
      hp: resolved hyperparameters (common ones at least).
      personal: top-level parameter names kept per client.
      local_fn: one client's local training of the full parameter dict.
      batch_order: optional host sample orders (R, K, E, N_max) that replace the random
        batch order; ``local_fn`` must hand its key to ``core.local.train`` unchanged
        (see ``base.check_batch_order``).
      specs: the algorithm's own ``HPARAMS``.
      cover: other values of the traced hyperparameters (see ``base.assemble``).
      server_opt: a server optimizer of ``server_opt.SERVER_OPTIMIZERS`` stepping the
        shared layers on their pseudo-gradient (FedOpt's server, with ``hp``'s
        ``server_lr``, ...), or None for the plain mean. A stateful one keeps its state in
        the server part as ``"opt"``; ``sgd`` keeps none (at ``server_lr`` 1 it is the
        plain mean bit for bit).
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    missing = set(personal) - set(shapes)
    if missing or not personal or set(personal) == set(shapes):
        raise ValueError(
            f"{name}: personal layers {sorted(personal)} must be a proper, non-empty subset "
            f"of the model's layers {sorted(shapes)}"
        )

    stateful = server_opt is not None and server_opt != "sgd"
    if server_opt is not None:
        init_opt, step = with_server_optimizer(server_opt, hp)

    def init_with(key, data, traced):
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        clients = {"personal": broadcast(split.take(params, personal), data.num_clients)}
        server = {"params": params}
        if stateful:
            server["opt"] = init_opt(split.drop(params, personal), traced)
        return SimState.create(state_key, server, clients, data.num_clients)

    def send_shared(traced, state, round_key):
        del traced
        return round_key, split.drop(state.server["params"], personal), None

    def client_update(traced, shared, own, x, y, n, key):
        params, loss = local_fn({**hp, **traced}, split.merge(shared, own["personal"]),
                                x, y, n, key)
        return split.drop(params, personal), {"personal": split.take(params, personal)}, loss

    def server_update(traced, state, cohort, context):
        del context
        # The server's copy of the personal layers is never used by anyone; it keeps the
        # initial values so that the global tree has the model's full structure.
        if server_opt is None:
            return {"params": split.merge(state.server["params"], cohort.uploads)}, {}
        shared = split.drop(state.server["params"], personal)
        # sgd's state holds no arrays: made afresh each round rather than kept.
        opt = state.server["opt"] if stateful else init_opt(shared, traced)
        shared, opt = step(traced, shared, cohort.uploads, opt)
        server = {"params": split.merge(state.server["params"], shared)}
        if stateful:
            server["opt"] = opt
        return server, {}

    def logits(own, global_params, x):
        return model.apply(split.merge(global_params, own["personal"]), x)

    method = Method(client_update, logits, server_update=server_update, broadcast=send_shared)
    shared_names = tuple(n for n in shapes if n not in personal)
    size = num_params_bytes(model, shared_names)
    return federated_algorithm(name, hp, specs, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, size, size),
                               batch_order=batch_order, cover=cover)
