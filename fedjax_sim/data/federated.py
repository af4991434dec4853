"""FederatedData: every client's train and test set as fixed-shape padded arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import struct

from fedjax_sim.data.partition import _client_list


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


def _host(value: Any) -> np.ndarray | None:
    """A NumPy view of an array, or None for a jax.Array this process cannot read whole
    (a multi-process run's sharded data: only its shape can be checked here)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return None
    return np.asarray(value)


def _clients(mask: np.ndarray) -> str:
    """``"client 3"`` or ``"clients 3, 5, 8"`` for the True entries of a (K,) mask."""
    return _client_list(np.flatnonzero(mask).tolist())


def check_federated_data(data: Any) -> FederatedData:
    """Checks that ``data`` is well-formed ``FederatedData`` before anything is compiled.

    Checked: every array has the client axis K first and the documented rank; train and
    test inputs share one input shape; labels and counts are integers; ``0 <= counts <=``
    the padded length; every client has at least one training and one test example;
    ``num_classes >= 2``; the labels of the real rows lie in ``[0, num_classes)``; the
    inputs (padding included, as masked rows still enter the arithmetic) are finite.
    Values of a ``jax.Array`` that this process cannot read whole (a multi-process run)
    are not checked, only shapes.

    Args:
      data: the federated data, NumPy or jax arrays.

    Returns:
      ``data``, unchanged.

    Raises:
      ValueError: the first problem found, naming the data set, the array and the clients.
    """
    if not isinstance(data, FederatedData):
        raise ValueError(f"data must be a FederatedData, got {type(data).__name__}")
    what = f"data {data.name!r}" if data.name else "data"
    num_classes = data.num_classes
    if (isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer)
            or num_classes < 2):
        raise ValueError(f"{what}: num_classes must be an integer >= 2, got {num_classes!r}")
    x_shape = np.shape(data.train_x)
    if len(x_shape) < 2 or x_shape[0] < 1:
        raise ValueError(f"{what}: train_x must have shape (K, N_max, *input_shape) with "
                         f"K >= 1, got {x_shape}")
    k = x_shape[0]
    for split in ("train", "test"):
        x, y, counts = (getattr(data, f"{split}_{part}") for part in ("x", "y", "counts"))
        length = np.shape(x)[1] if np.ndim(x) >= 2 else None
        layouts = {
            f"{split}_x": ((k, length, *data.input_shape),
                           "K clients, padded length, the input shape of train_x"),
            f"{split}_y": ((k, length), f"K clients, the padded length of {split}_x"),
            f"{split}_counts": ((k,), "one count per client"),
        }
        for name, value in ((f"{split}_x", x), (f"{split}_y", y), (f"{split}_counts", counts)):
            expected, layout = layouts[name]
            if length is None or tuple(np.shape(value)) != expected:
                raise ValueError(f"{what}: {name} has shape {tuple(np.shape(value))}, expected "
                                 f"{expected} ({layout}; K={k})")
        for name, value, kind, words in (
            (f"{split}_x", x, np.number, "numbers"),
            (f"{split}_y", y, np.integer, "integers"),
            (f"{split}_counts", counts, np.integer, "integers"),
        ):
            dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
            if not np.issubdtype(dtype, kind):
                raise ValueError(f"{what}: {name} must hold {words}, got dtype {dtype}")
        counts_h, y_h, x_h = _host(counts), _host(y), _host(x)
        if counts_h is not None:
            if (counts_h < 0).any() or (counts_h > length).any():
                bad = (counts_h < 0) | (counts_h > length)
                raise ValueError(f"{what}: {split}_counts must lie in [0, {length}] (the "
                                 f"padded length {split}_x.shape[1]); {_clients(bad)} "
                                 f"{'has' if bad.sum() == 1 else 'have'} "
                                 f"{counts_h[bad][:10].tolist()}")
            if (counts_h < 1).any():
                empty = counts_h < 1
                raise ValueError(f"{what}: {_clients(empty)} "
                                 f"{'has' if empty.sum() == 1 else 'have'} no {split} "
                                 "examples; every client needs at least one train and one "
                                 "test example")
        if counts_h is not None and y_h is not None:
            valid = np.arange(length)[None, :] < counts_h[:, None]
            out = valid & ((y_h < 0) | (y_h >= num_classes))
            if out.any():
                rows = out.any(axis=1)
                labels = np.unique(y_h[out])
                raise ValueError(f"{what}: {split}_y of {_clients(rows)} holds label(s) "
                                 f"{labels[:10].tolist()} outside [0, {num_classes}) "
                                 f"(num_classes={num_classes})")
        if x_h is not None and not np.isfinite(x_h).all():
            rows = ~np.isfinite(x_h.reshape(k, -1)).all(axis=1)
            raise ValueError(f"{what}: {split}_x of {_clients(rows)} holds NaN or infinite "
                             "values")
    return data


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
