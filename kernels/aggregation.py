"""Aggregation and client-axis bookkeeping over batched pytrees.

Every function here treats the leading axis of each leaf as the client axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def weighted_mean(tree: PyTree, weights: jax.Array) -> PyTree:
    """Weighted mean over the leading (client) axis.

    Args:
      tree: leaves shaped (M, ...).
      weights: (M,) non-negative weights (e.g. sample counts times a participation mask).
        They are normalized here; an all-zero vector yields zeros rather than NaNs.

    Returns:
      The tree without the leading axis.
    """
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(weights)
    normalized = weights / jnp.where(total > 0, total, 1.0)

    def reduce(leaf):
        w = normalized.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
        return jnp.sum(leaf * w, axis=0)

    return jax.tree.map(reduce, tree)


def broadcast(tree: PyTree, num_clients: int) -> PyTree:
    """Repeats every leaf along a new leading client axis of size ``num_clients``."""
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_clients, *leaf.shape)), tree)


def gather(tree: PyTree, index: jax.Array | None) -> PyTree:
    """Rows ``index`` of every leaf; ``None`` means all rows (full participation, no copy)."""
    if index is None:
        return tree
    return jax.tree.map(lambda leaf: leaf[index], tree)


def scatter(tree: PyTree, index: jax.Array | None, rows: PyTree) -> PyTree:
    """Writes ``rows`` back at ``index`` of every leaf; ``None`` replaces the whole tree."""
    if index is None:
        return rows
    return jax.tree.map(lambda leaf, new: leaf.at[index].set(new), tree, rows)


def tree_where(condition: jax.Array, if_true: PyTree, if_false: PyTree) -> PyTree:
    """Leaf-wise ``where`` with a scalar (or broadcastable) condition."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


def tree_bytes(tree: PyTree, bytes_per_element: int = 4) -> int:
    """Size of a (non-batched) tree on the wire, float32 by default."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(tree))) * bytes_per_element
