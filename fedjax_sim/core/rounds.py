"""The shape shared by every round: sample a cohort, train it, hand back what it produced.

Algorithms supply only the per-client function and what the server does with the
uploads; gathering the cohort's rows, splitting keys, mapping over clients and scattering
personal state back are done here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.core.cohort import (
    client_map,
    client_map_mean,
    cohort_size,
    resolve_strategy,
    sample_cohort,
    train_in_place,
)
from fedjax_sim.core.local import FixedOrder
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.kernels.aggregation import gather, scatter

# client_fn(server, client_state_k, x_k, y_k, n_k, key_k)
#     -> (upload_k, new_client_state_k, loss_k)
ClientFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array, jax.Array],
                    tuple[Any, Any, jax.Array]]


class CohortResult(NamedTuple):
    """What one round's cohort produced.

    Attributes:
      index: (M,) client indices, or ``None`` under full participation.
      counts: (M,) training sample counts (the FedAvg aggregation weights).
      uploads: per-client uploads, leaves (M, ...); with ``mean_uploads`` their
        sample-weighted mean instead (no client axis).
      clients: the full (K, ...) client state with the cohort's new rows written back.
      loss: scalar, sample-weighted mean training loss of the cohort.
    """

    index: jax.Array | None
    counts: jax.Array
    uploads: Any
    clients: Any
    loss: jax.Array


def run_cohort(
    key: jax.Array,
    clients: Any,
    data: FederatedData,
    client_fn: ClientFn,
    *,
    join_ratio: float,
    strategy: str = "auto",
    chunk_size: int = 8,
    mean_uploads: bool = False,
    server: Any = None,
    orders: jax.Array | None = None,
) -> CohortResult:
    """Samples ``round(join_ratio * K)`` clients and runs ``client_fn`` on each of them.

    Args:
      client_fn: ``(server, own, x, y, n, key) -> (upload, new_own, loss)``.
      server: what the server sends every sampled client this round (the global model,
        keys, soft targets, ...), handed to ``client_fn`` as its first argument. A client
        function must read the round's values only through it, never through a closure
        (``core.cohort`` says why).
      mean_uploads: hand back the sample-weighted mean of the uploads (what FedAvg-style
        servers compute) rather than the stacked uploads. The loop strategies then keep a
        running sum and train the cohort in place (``core.cohort.train_in_place``): no
        (M, ...) copy of the cohort's state, data or uploads is made, and with the client
        axis sharded every device trains the members it holds.
      orders: (K, E, N_max) sample orders of this round, one row per client (see
        :func:`round_orders`), or ``None``. When given, each sampled client receives
        ``core.local.FixedOrder(orders[k])`` in place of its PRNG key, which
        ``core.local.train`` reads as its batch order.

    Raises:
      ValueError: if ``orders`` does not have K rows and ``N_max`` columns.
    """
    num_clients = data.num_clients
    size = cohort_size(num_clients, join_ratio)
    cohort_key, train_key = jax.random.split(key)
    index = sample_cohort(cohort_key, num_clients, size)
    keys = jax.random.split(train_key, size)
    if orders is not None:
        n_max = data.train_x.shape[1]
        if orders.ndim != 3 or orders.shape[0] != num_clients or orders.shape[2] != n_max:
            raise ValueError(f"batch orders of a round must have shape (clients, epochs, "
                             f"N_max) = ({num_clients}, E, {n_max}), got {orders.shape}")
        keys = FixedOrder(gather(orders, index))
    counts = gather(data.train_counts, index)
    weights = counts.astype(jnp.float32)
    if mean_uploads and resolve_strategy(strategy) != "vmap":
        # Loop strategies read and write the resident (K, ...) arrays in place.
        uploads, new_clients, losses = train_in_place(
            client_fn, clients, (data.train_x, data.train_y, data.train_counts), index, keys,
            weights, shared=server, strategy=strategy, chunk_size=chunk_size,
        )
        loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return CohortResult(index, counts, uploads, new_clients, loss)
    x, y = gather((data.train_x, data.train_y), index)
    cohort_args = (gather(clients, index), x, y, counts, keys)
    if mean_uploads:
        uploads, (new_rows, losses) = client_map_mean(
            lambda *a: _upload_first(client_fn(*a)), cohort_args, weights, shared=server,
            strategy=strategy, chunk_size=chunk_size,
        )
    else:
        uploads, new_rows, losses = client_map(
            client_fn, cohort_args, shared=server, strategy=strategy, chunk_size=chunk_size
        )
    loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return CohortResult(index, counts, uploads, scatter(clients, index, new_rows), loss)


def round_orders(batch_order: Any, round_index: jax.Array) -> jax.Array | None:
    """This round's (K, E, N_max) rows of host batch orders (R, K, E, N_max).

    Round ``r`` uses ``batch_order[r % R]``: a run longer than R rounds starts over.

    Args:
      batch_order: host orders (e.g. ``core.local.sample_batch_orders``), or ``None``.
      round_index: scalar int, the rounds completed so far (``SimState.round``).

    Returns:
      The round's orders, or ``None`` when ``batch_order`` is ``None``.
    """
    if batch_order is None:
        return None
    table = jnp.asarray(batch_order, jnp.int32)
    return table[round_index % table.shape[0]]


def _upload_first(out):
    upload, new_row, loss = out
    return upload, (new_row, loss)


def advance(
    state: SimState, key: jax.Array, *, server: Any = None, clients: Any = None
) -> SimState:
    """The state after a round: new key, round + 1, and whichever parts changed."""
    return state.replace(
        key=key,
        round=state.round + 1,
        server=state.server if server is None else server,
        clients=state.clients if clients is None else clients,
    )
