"""Shared fixtures: small random federated data sets that compile quickly."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

from fedjax_sim.data.federated import FederatedData

# Start the backends now: the command line (tests/test_cli.py) would otherwise show one CPU
# device per core to every test that runs after it in this process.
jax.devices()


def random_federated(
    seed: int = 0,
    num_clients: int = 5,
    n_max: int = 23,
    t_max: int = 9,
    input_shape: tuple[int, ...] = (6,),
    num_classes: int = 4,
) -> FederatedData:
    """Padded random data with unequal client sizes (padding rows are zero)."""
    rng = np.random.default_rng(seed)
    train_counts = rng.integers(3, n_max + 1, num_clients).astype(np.int32)
    train_counts[0] = n_max
    test_counts = rng.integers(2, t_max + 1, num_clients).astype(np.int32)

    def block(length, counts):
        x = rng.normal(size=(num_clients, length, *input_shape)).astype(np.float32)
        y = rng.integers(0, num_classes, (num_clients, length)).astype(np.int32)
        valid = np.arange(length)[None, :] < counts[:, None]
        x = x * valid.reshape(valid.shape + (1,) * len(input_shape))
        return x, np.where(valid, y, 0).astype(np.int32)

    x, y = block(n_max, train_counts)
    tx, ty = block(t_max, test_counts)
    return FederatedData(x, y, train_counts, tx, ty, test_counts, num_classes=num_classes,
                         name="random")


@pytest.fixture
def small_data() -> FederatedData:
    return random_federated()
