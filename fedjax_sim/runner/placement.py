"""Where arrays live: the client-axis mesh, shardings, and placing states and data on it."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedjax_sim import safety
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.core.cohort import CLIENT_AXIS
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import (
    AnyFederatedData,
    FederatedData,
    stack_ragged,
)


def client_axis_mesh(num_clients: int, devices: int | None = None) -> Mesh | None:
    """A one-axis mesh (``"clients"``) over the devices the client axis is sharded across.

    Args:
      num_clients: K; the number of devices used divides it.
      devices: how many devices to use (``None``: all visible ones, over every process).

    Returns:
      The mesh, or ``None`` when only one device would be used.

    Raises:
      ValueError: in a multi-process run whose device count does not divide K (every
        process must hold a block of clients), or on a bad ``devices``.
    """
    available = jax.devices()
    wanted = len(available) if devices is None else int(devices)
    if not 1 <= wanted <= len(available):
        raise ValueError(f"devices must be in [1, {len(available)}], got {devices!r}")
    if jax.process_count() > 1:
        if num_clients % wanted:
            raise ValueError(f"{num_clients} clients cannot be split evenly over {wanted} "
                             "devices in a multi-process run")
        count = wanted
    else:
        count = max(d for d in range(1, wanted + 1) if num_clients % d == 0)
    if count == 1:
        return None
    return Mesh(np.asarray(available[:count]), (CLIENT_AXIS,), axis_types=(AxisType.Auto,))


def _place(tree: Any, shardings: Any) -> Any:
    """Puts host values on the devices of ``shardings``; works across processes (every
    process holds the full host value and contributes its own shards)."""

    def put(leaf, sharding):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def _client_sharded(tree: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose every leaf has the client axis first."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec(CLIENT_AXIS)), tree)


def _state_shardings(state_shape: SimState, mesh: Mesh) -> SimState:
    """Client part sharded over the mesh, everything else replicated.

    Sharding is decided per leaf: a client leaf whose leading axis does not split evenly
    over the mesh is replicated. Such leaves exist when the client state is made of groups
    (FedMD and FCCL with several architectures: one tree per architecture, leading axis
    K_g, which need not be a multiple of the device count).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))

    def client_leaf(leaf):
        splits = len(leaf.shape) >= 1 and leaf.shape[0] % mesh.size == 0
        return sharded if splits else replicated

    return state_shape.replace(
        key=replicated,
        round=replicated,
        server=jax.tree.map(lambda _: replicated, state_shape.server),
        clients=jax.tree.map(client_leaf, state_shape.clients),
        clock=jax.tree.map(lambda _: replicated, state_shape.clock),
        privacy=jax.tree.map(lambda _: replicated, state_shape.privacy),
    )


def to_device(data: FederatedData, mesh: Mesh | None = None) -> FederatedData:
    """Moves the padded arrays to the devices once, before the loop; with ``mesh``, the
    client axis is sharded over it."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, data)
    return _place(data, _data_shardings(data, mesh))


def _data_shardings(data: AnyFederatedData, mesh: Mesh) -> Any:
    """Per-client leaves sharded over the client axis; a ragged layout's pools, which
    every client slices its rows from, replicated."""
    shardings = _client_sharded(data, mesh)
    if data.layout == "ragged":
        replicated = NamedSharding(mesh, PartitionSpec())
        pools = {f"{split}_{part}": replicated for split in ("train", "test")
                 for part in ("x", "y")}
        shardings = shardings.replace(**pools)
    return shardings


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)``, or nothing for a single-device run."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def place(
    algorithm: Algorithm, data: FederatedData, *, seed: int, mesh: Mesh | None
) -> tuple[FederatedData, SimState, SimState | None]:
    """Puts the data on the devices and initializes the state there.

    With ``mesh``, the client axis of the data and of the client state is sharded over
    it and the rest of the state is replicated; call it inside ``mesh_context(mesh)``.

    Returns:
      ``(data, state, state shardings or None)``.
    """
    data = to_device(data, mesh)
    if mesh is None:
        return data, algorithm.init(jax.random.key(seed), data), None
    shape = jax.eval_shape(lambda d: algorithm.init(jax.random.key(seed), d), data)
    shardings = _state_shardings(shape, mesh)
    state = jax.jit(lambda d: algorithm.init(jax.random.key(seed), d),
                    out_shardings=shardings)(data)
    return data, state, shardings


def data_bytes_per_device(data: AnyFederatedData, num_devices: int) -> int:
    """Bytes of ``data`` on each device: per-client leaves split over the devices, a
    ragged layout's pools whole on every one (``_data_shardings``)."""
    if data.layout != "ragged":
        return safety.tree_bytes(data) // num_devices
    pools = [getattr(data, f"{split}_{part}") for split in ("train", "test")
             for part in ("x", "y")]
    pool_bytes = safety.tree_bytes(pools)
    return pool_bytes + (safety.tree_bytes(data) - pool_bytes) // num_devices


# Mesh axis name of a sweep's configuration axis.
_CONFIG_AXIS = "configs"


def _config_mesh(num_configs: int, devices: int | None) -> tuple[Mesh | None, int]:
    """A one-axis mesh over ``devices`` of this process (at most one per configuration),
    or ``None`` for one, and the configuration count padded to a multiple of it.

    Every device gets the same number of configurations: 3 on 2 devices run as 4, the
    last repeated and its copy's results dropped, which still finishes sooner than 3 on
    one device.
    """
    available = jax.local_devices()
    wanted = len(available) if devices is None else int(devices)
    if not 1 <= wanted <= len(available):
        raise ValueError(f"devices must be in [1, {len(available)}], got {devices!r}")
    count = min(wanted, num_configs)
    padded = -(-num_configs // count) * count
    if count == 1:
        return None, padded
    mesh = Mesh(np.asarray(available[:count]), (_CONFIG_AXIS,), axis_types=(AxisType.Auto,))
    return mesh, padded


def stack_splits(splits: list[FederatedData]) -> FederatedData:
    """Several splits of one data set (same clients, input shape and classes) as one
    FederatedData with a leading split axis, each padded to the longest client.

    Padding leaves a split's rounds unchanged: a client reads only its first ``count``
    samples and an epoch's batches are drawn over those (``core.local``).
    """
    first = splits[0]
    for i, split in enumerate(splits[1:], 1):
        same = (split.num_clients == first.num_clients
                and split.num_classes == first.num_classes
                and split.input_shape == first.input_shape
                and split.layout == first.layout
                and split.name == first.name)
        if not same:
            raise ValueError(f"data[{i}] is not a split of the data of data[0] (its "
                             "clients, classes, input shape, layout and name must be the "
                             "same)")
    if first.layout == "ragged":
        return stack_ragged(splits)
    n_max = max(s.train_x.shape[1] for s in splits)
    t_max = max(s.test_x.shape[1] for s in splits)

    def pad(leaf, length):
        leaf = np.asarray(leaf)
        width = [(0, 0), (0, length - leaf.shape[1])] + [(0, 0)] * (leaf.ndim - 2)
        return np.pad(leaf, width)

    return first.replace(
        train_x=np.stack([pad(s.train_x, n_max) for s in splits]),
        train_y=np.stack([pad(s.train_y, n_max) for s in splits]),
        train_counts=np.stack([np.asarray(s.train_counts) for s in splits]),
        test_x=np.stack([pad(s.test_x, t_max) for s in splits]),
        test_y=np.stack([pad(s.test_y, t_max) for s in splits]),
        test_counts=np.stack([np.asarray(s.test_counts) for s in splits]),
    )
