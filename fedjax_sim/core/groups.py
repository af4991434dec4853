"""Clients in groups: one batched tree per group, e.g. one per model architecture.

Algorithms whose clients run different architectures (FedMD, FCCL) cannot stack every
client's parameters on one axis. Client k belongs to group k mod A; each group keeps its
own tree with leaves (K_g, ...), and the client state is the tuple of the groups' trees.
Per round each group samples ``round(join_ratio · K_g)`` of its clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core.cohort import cohort_size, sample_cohort
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import AnyFederatedData, client_examples


def group_members(num_clients: int, num_groups: int) -> tuple[np.ndarray, ...]:
    """Client indices of each group: client k belongs to group k mod A.

    Raises:
      ValueError: when there are fewer clients than groups.
    """
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


def private_data(data: AnyFederatedData, clients: jax.Array) -> tuple:
    """``(train_x, train_y, train_counts)`` of the clients ``clients``, padded to the
    training width in either layout (M, N_max, ...)."""
    return client_examples(data, "train", clients)


def grouped_state(key: jax.Array, server: Any, groups: tuple) -> SimState:
    """A SimState whose client part is a tuple of per-group trees (leaves (K_g, ...)).

    Raises:
      ValueError: when the leaves of a group's tree differ in their leading axis.
    """
    for tree in groups:
        leaves = jax.tree.leaves(tree)
        if len({leaf.shape[0] for leaf in leaves}) > 1:
            raise ValueError("every leaf of a group's tree must share its leading axis")
    return SimState(key=key, round=jnp.zeros((), jnp.int32), server=server, clients=groups)


def cohort_loss(losses: Sequence[jax.Array], counts: Sequence[jax.Array]) -> jax.Array:
    """Sample-weighted mean of the per-client losses of all groups' cohorts."""
    losses = jnp.concatenate(losses)
    weights = jnp.concatenate(counts).astype(jnp.float32)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
