"""The simulation state: one server part and one batched client part."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SimState:
    """Everything a round reads and writes.

    Attributes:
      key: PRNG key, split once per round.
      round: scalar int32, rounds completed.
      server: server-side pytree (global parameters, server optimizer state, ...), no
        client axis.
      clients: per-client pytree; every leaf shaped (K, ...). ``None`` or ``{}`` when the
        algorithm keeps nothing on clients between rounds.
      clock: the virtual clock of a run with a system model (``core.clock.ClockState``),
        ``None`` otherwise (no leaves: the state of a run without one is unchanged).
      privacy: a private run's own state (``core.privacy``: the current clip norm),
        ``None`` otherwise.
    """

    key: jax.Array
    round: jax.Array
    server: Any
    clients: Any
    clock: Any = None
    privacy: Any = None

    @classmethod
    def create(cls, key: jax.Array, server: Any, clients: Any, num_clients: int) -> SimState:
        if jax.tree.leaves(clients):
            chex.assert_tree_shape_prefix(clients, (num_clients,))
        return cls(key=key, round=jnp.zeros((), jnp.int32), server=server, clients=clients)


def to_host(tree: Any) -> Any:
    """NumPy copies of every leaf, gathering shards held by other processes if needed."""

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)
