"""FederatedData: every client's train and test set as fixed-shape padded arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import struct


@struct.dataclass
class FederatedData:
    """Per-client data, padded to a common length so that kernels never see ragged arrays.

    Row ``k`` holds client ``k``; entries at positions ``>= counts[k]`` are padding (zeros)
    and must be masked out by whoever reads them.

    Attributes:
      train_x: (K, N_max, *input_shape) float32.
      train_y: (K, N_max) int32.
      train_counts: (K,) int32, number of real training examples per client.
      test_x: (K, T_max, *input_shape) float32.
      test_y: (K, T_max) int32.
      test_counts: (K,) int32.
      num_classes: number of labels (static).
      name: data set name (static).
    """

    train_x: jax.Array
    train_y: jax.Array
    train_counts: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    test_counts: jax.Array
    num_classes: int = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="")

    @property
    def num_clients(self) -> int:
        return self.train_x.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[2:])


def build_federated(pooled: Any, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> FederatedData:
    """Gathers every client's train and test examples into padded arrays.

    Args:
      pooled: a ``Pooled`` data set (anything with ``x``, ``y``, ``num_classes``, ``name``).
      splits: per client, ``(train, test)`` indices into the pooled arrays.

    Returns:
      ``FederatedData`` holding NumPy arrays, padded with zeros to the largest client
      (at least one row, so that shapes are never empty).
    """
    if len(splits) == 0:
        raise ValueError("splits must hold at least one client")
    x = np.asarray(pooled.x, dtype=np.float32)
    y = np.asarray(pooled.y, dtype=np.int32)

    def pad(index_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts = np.array([len(idx) for idx in index_lists], dtype=np.int32)
        width = max(1, int(counts.max()))
        out_x = np.zeros((len(index_lists), width, *x.shape[1:]), dtype=np.float32)
        out_y = np.zeros((len(index_lists), width), dtype=np.int32)
        for k, idx in enumerate(index_lists):
            idx = np.asarray(idx, dtype=np.int64)
            out_x[k, : len(idx)] = x[idx]
            out_y[k, : len(idx)] = y[idx]
        return out_x, out_y, counts

    train_x, train_y, train_counts = pad([train for train, _ in splits])
    test_x, test_y, test_counts = pad([test for _, test in splits])
    return FederatedData(
        train_x=train_x,
        train_y=train_y,
        train_counts=train_counts,
        test_x=test_x,
        test_y=test_y,
        test_counts=test_counts,
        num_classes=int(pooled.num_classes),
        name=str(pooled.name),
    )
