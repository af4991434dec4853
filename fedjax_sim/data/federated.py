"""FederatedData: every client's train and test set as fixed-shape padded arrays."""

from __future__ import annotations

import jax
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
