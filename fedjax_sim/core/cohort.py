"""Cohort sampling and execution strategies over the client axis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

STRATEGIES = ("auto", "vmap", "sequential", "chunked")


def cohort_size(num_clients: int, join_ratio: float) -> int:
    """Clients per round: ``round(join_ratio * K)``, at least one."""
    return max(1, min(num_clients, round(join_ratio * num_clients)))


def sample_cohort(key: jax.Array, num_clients: int, size: int) -> jax.Array | None:
    """Indices of ``size`` distinct clients, or ``None`` for full participation.

    ``None`` lets callers skip the gather/scatter entirely when everybody trains.
    """
    if size >= num_clients:
        return None
    return jax.random.choice(key, num_clients, (size,), replace=False)


def resolve_strategy(strategy: str) -> str:
    """``auto`` picks by backend: a sequential map on CPU, where per-client steps are
    faster than one wide vmapped step, and a full vmap on accelerators."""
    if strategy not in STRATEGIES:
        raise ValueError(f"client_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "sequential" if jax.default_backend() == "cpu" else "vmap"


def client_map(
    fn: Callable[..., Any], args: tuple, *, strategy: str = "auto", chunk_size: int = 8
) -> Any:
    """Applies ``fn`` to every row of the leading axis of ``args``.

    ``vmap`` runs all clients as one batched program, ``sequential`` one after another
    inside a single compiled loop, ``chunked`` ``chunk_size`` at a time. All give the same
    results; which is fastest depends on the backend and the model.
    """
    strategy = resolve_strategy(strategy)
    if strategy == "vmap":
        return jax.vmap(fn)(*args)
    batch = 1 if strategy == "sequential" else chunk_size
    return jax.lax.map(lambda a: fn(*a), args, batch_size=batch if batch > 1 else None)
