"""Cohort sampling and execution strategies over the client axis.

A strategy says how the per-client function runs over the rows of the client axis:

* ``vmap``: all clients as one batched program (best on GPU / TPU);
* ``sequential``: one client after another inside a single compiled loop (best on CPU,
  where a batched matmul of many small client matrices is slower than the same matmuls
  one at a time);
* ``chunked``: ``chunk_size`` clients at a time, vmapped inside the loop, which spans the
  two;
* ``auto``: the measured best per backend, :data:`AUTO_TABLE` (overridden by the
  ``FEDJAX_SIM_STRATEGY`` environment variable, e.g. ``chunked:4``).

All strategies give the same results (up to float summation order). When the client axis
is sharded over a device mesh (see :func:`client_mesh`), each device runs the strategy on
its own block of clients under ``shard_map`` and partial sums meet in one ``psum``.

A mapped function gets what all clients share (the global model, keys, soft targets) as
its first argument, ``shared``, never through a closure: under ``shard_map`` a value
closed over from the round keeps the sharding type of the round's inputs, and operations
that copy an operand's type (``zeros_like`` in optax's momentum or frozen-layer states)
then fail. ``shared`` enters ``shard_map`` as a replicated argument instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

STRATEGIES = ("auto", "vmap", "sequential", "chunked")

# Mesh axis name of the client axis.
CLIENT_AXIS = "clients"

# ``auto`` per backend, from fedjax-sim bench --client-strategy all (experiments/speed.md,
# experiments/gpu.md): on CPU the sequential loop wins for the mlp and the cnn, on
# accelerators the full vmap does.
AUTO_TABLE = {"cpu": ("sequential", 1), "gpu": ("vmap", 0), "tpu": ("vmap", 0)}


def cohort_size(num_clients: int, join_ratio: float) -> int:
    """Clients per round: ``round(join_ratio * K)``, at least one."""
    return max(1, min(num_clients, round(join_ratio * num_clients)))


# Up to this many clients a cohort is drawn by ``jax.random.choice`` (a shuffle of all K,
# the draw every earlier run used); beyond it by Floyd's algorithm, whose cost depends on
# the cohort alone: the shuffle took 160 ms a round at K = 342,477 on the 2-core CPU.
SHUFFLE_MAX_CLIENTS = 4096


def sample_cohort(key: jax.Array, num_clients: int, size: int) -> jax.Array | None:
    """Indices of ``size`` distinct clients in random order, or ``None`` for full
    participation.

    ``None`` lets callers skip the gather/scatter entirely when everybody trains. Every
    ``size``-subset is equally likely; for more than :data:`SHUFFLE_MAX_CLIENTS` clients
    the draw costs O(size²) instead of O(K log K) (:func:`floyd_sample`).
    """
    if size >= num_clients:
        return None
    if num_clients <= SHUFFLE_MAX_CLIENTS:
        return jax.random.choice(key, num_clients, (size,), replace=False)
    return floyd_sample(key, num_clients, size)


def floyd_sample(key: jax.Array, num_clients: int, size: int) -> jax.Array:
    """``size`` distinct integers of ``[0, num_clients)``, a uniform random subset in random
    order (Floyd's algorithm: for j = K - M .. K - 1, draw t in [0, j] and take t, or j
    when t is taken already; then shuffle the M)."""
    draw_key, order_key = jax.random.split(key)
    keys = jax.random.split(draw_key, size)

    def take(i, chosen):
        j = num_clients - size + i
        t = jax.random.randint(keys[i], (), 0, j + 1, dtype=jnp.int32)
        return chosen.at[i].set(jnp.where(jnp.any(chosen == t), j, t))

    chosen = jax.lax.fori_loop(0, size, take, jnp.full((size,), -1, jnp.int32))
    return jax.random.permutation(order_key, chosen)


# The environment variable that overrides ``auto``: ``NAME`` or ``NAME:CHUNK_SIZE``.
STRATEGY_ENV = "FEDJAX_SIM_STRATEGY"


def strategy_override() -> tuple[str, int] | None:
    """The ``(strategy, chunk_size)`` that ``FEDJAX_SIM_STRATEGY`` forces on ``auto``.

    Returns:
      ``None`` when the variable is unset or empty.

    Raises:
      ValueError: naming the variable, when it is not ``vmap``, ``sequential``,
        ``chunked`` or one of them followed by ``:N`` with an integer N >= 1 (the chunk
        size; default 8).
    """
    text = os.environ.get(STRATEGY_ENV, "")
    if not text.strip():
        return None
    name, colon, size = text.strip().partition(":")
    size = size.strip()
    if (name.strip() not in STRATEGIES[1:] or (colon and not size.isdecimal())
            or (size and int(size) < 1)):
        raise ValueError(f"{STRATEGY_ENV} must be one of {', '.join(STRATEGIES[1:])}, "
                         f"optionally followed by :N with an integer N >= 1, got {text!r}")
    return name.strip(), int(size) if size else 8


def resolve(strategy: str, chunk_size: int = 8) -> tuple[str, int]:
    """The concrete ``(strategy, chunk_size)`` that ``strategy`` stands for here."""
    if strategy not in STRATEGIES:
        raise ValueError(f"client_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy, int(chunk_size)
    override = strategy_override()
    if override is not None:
        return override
    return AUTO_TABLE.get(jax.default_backend(), ("vmap", 0))


def resolve_strategy(strategy: str) -> str:
    """The concrete strategy name that ``strategy`` (possibly ``auto``) stands for here."""
    return resolve(strategy)[0]


def client_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh in context (``jax.set_mesh``) if it shards the client axis over >1 devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CLIENT_AXIS not in mesh.axis_names:
        return None
    return mesh if mesh.shape[CLIENT_AXIS] > 1 else None


def _leading(args: Any) -> int:
    return jax.tree.leaves(args)[0].shape[0]


def _local_map(fn, args, weights, strategy, chunk_size):
    """Runs ``fn`` over the rows of ``args`` on one device.

    With ``weights`` (M,), ``fn`` returns ``(to_sum, rest)`` and this returns
    ``(Σ_m weights[m] * to_sum_m, stacked rest)`` without ever stacking ``to_sum``.
    """
    if strategy == "vmap" or (strategy == "chunked" and chunk_size >= _leading(args)):
        out = jax.vmap(fn)(*args)
        if weights is None:
            return out
        total = jax.tree.map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, 1),
                             out[0])
        return total, out[1]
    chunk = 1 if strategy == "sequential" else int(chunk_size)
    if weights is None:
        return jax.lax.map(lambda a: fn(*a), args, batch_size=chunk if chunk > 1 else None)
    return _summing_map(fn, args, weights, chunk)


def _summing_map(fn, args, weights, chunk):
    """``lax.map`` in chunks of ``chunk`` that keeps a running weighted sum of the first
    output in the loop carry instead of stacking it.

    The loop runs over block numbers and slices each block's rows out of ``args`` inside
    the body: scanning over ``args`` reshaped to (blocks, chunk, ...) made XLA copy every
    input (the whole training data) once per call.
    """
    size = _leading(args)
    full, rem = divmod(size, chunk)

    def block_rows(tree, start, length):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, length), tree)

    def run_block(block):
        if chunk == 1:
            row_args, row_weight = jax.tree.map(lambda a: a[block], (args, weights))
            summed, rest = fn(*row_args)
            return (jax.tree.map(lambda leaf: leaf * row_weight.astype(leaf.dtype), summed),
                    jax.tree.map(lambda leaf: leaf[None], rest))
        block_args, block_weights = block_rows((args, weights), block * chunk, chunk)
        summed, rest = jax.vmap(fn)(*block_args)
        return (jax.tree.map(lambda leaf: jnp.tensordot(block_weights.astype(leaf.dtype),
                                                        leaf, 1), summed), rest)

    out_shapes = jax.eval_shape(fn, *jax.tree.map(lambda a: a[0], args))
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes[0])

    def body(carry, block):
        summed, rest = run_block(block)
        return jax.tree.map(jnp.add, carry, summed), rest

    total, rest = jax.lax.scan(body, total, jnp.arange(full))
    rest = jax.tree.map(lambda a: a.reshape(full * chunk, *a.shape[2:]), rest)
    if rem:
        tail_args, tail_weights = block_rows((args, weights), full * chunk, rem)
        summed, tail_rest = jax.vmap(fn)(*tail_args)
        total = jax.tree.map(
            lambda t, leaf: t + jnp.tensordot(tail_weights.astype(leaf.dtype), leaf, 1),
            total, summed)
        rest = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), rest, tail_rest)
    return total, rest


def _mapped(fn, args, weights, shared, strategy, chunk_size):
    strategy, chunk_size = resolve(strategy, chunk_size)
    mesh = client_mesh()
    if mesh is None or _leading(args) % mesh.shape[CLIENT_AXIS]:
        return _local_map(functools.partial(fn, shared), args, weights, strategy, chunk_size)

    # Each device maps its own block of rows; the weighted sums meet in one psum.
    spec, replicated = PartitionSpec(CLIENT_AXIS), PartitionSpec()

    def per_device(shared, block_args, block_weights):
        out = _local_map(functools.partial(fn, shared), block_args, block_weights, strategy,
                         chunk_size)
        if block_weights is None:
            return out
        return jax.lax.psum(out[0], CLIENT_AXIS), out[1]

    if weights is None:
        return jax.shard_map(lambda c, a: per_device(c, a, None), mesh=mesh,
                             in_specs=(replicated, spec), out_specs=spec,
                             check_vma=False)(shared, args)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(replicated, spec, spec),
                         out_specs=(replicated, spec), check_vma=False)(shared, args, weights)


def _row(tree, i):
    # Keys may be a pytree (e.g. ``core.local.FixedOrder``), not only a key array.
    return jax.tree.map(lambda a: a[i], tree)


def _train_owned(fn, shared, clients, rows, index, keys, weights, chunk, device):
    """The in-place cohort loop over one block of clients (one device's, or all of them).

    Trains, in cohort order, the members of ``index`` whose rows this block holds: rows
    ``device * K_block`` onwards. Returns the weighted sum of their uploads, the block with
    their new rows written in, and the (M,) losses with zeros at other blocks' positions.
    """
    block_size = _leading(rows)  # the client state may be empty (FedAvg)
    size = index.shape[0]
    owned = index // block_size == device
    count = jnp.sum(owned)
    # This block's cohort positions first, each group kept in cohort order.
    positions = jnp.argsort(jnp.logical_not(owned), stable=True)
    local_rows = index[positions] - device * block_size
    fn = functools.partial(fn, shared)
    first = jax.eval_shape(fn, *jax.tree.map(lambda a: a[0], (clients, *rows, keys)))
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first[0])
    losses = jnp.zeros((size,), first[2].dtype)

    if chunk == 1:
        def body(i, carry):
            total, clients, losses = carry
            position, row = positions[i], local_rows[i]
            own, *data = jax.tree.map(lambda a: a[row], (clients, *rows))
            upload, new_row, loss = fn(own, *data, _row(keys, position))
            weight = weights[position]
            total = jax.tree.map(lambda t, u: t + weight.astype(u.dtype) * u, total, upload)
            clients = jax.tree.map(lambda a, v: a.at[row].set(v), clients, new_row)
            return total, clients, losses.at[position].set(loss)

        return jax.lax.fori_loop(0, count, body, (total, clients, losses))

    def chunk_body(c, carry):
        total, clients, losses = carry
        slots = c * chunk + jnp.arange(chunk)
        valid = slots < count
        slots = jnp.minimum(slots, size - 1)
        position, row = positions[slots], local_rows[slots]
        own, *data = jax.tree.map(lambda a: a[row], (clients, *rows))
        upload, new_rows, loss = jax.vmap(fn)(own, *data, _row(keys, position))
        weight = jnp.where(valid, weights[position], 0.0)
        total = jax.tree.map(
            lambda t, u: t + jnp.tensordot(weight.astype(u.dtype), u, 1), total, upload)
        # Slots past this block's last member write nowhere.
        drop_row = jnp.where(valid, row, block_size)
        clients = jax.tree.map(lambda a, v: a.at[drop_row].set(v, mode="drop"), clients,
                               new_rows)
        losses = losses.at[jnp.where(valid, position, size)].set(loss, mode="drop")
        return total, clients, losses

    chunks = (count + chunk - 1) // chunk
    return jax.lax.fori_loop(0, chunks, chunk_body, (total, clients, losses))


def train_in_place(
    fn: Callable[..., Any],
    clients: Any,
    rows: tuple,
    index: jax.Array | None,
    keys: jax.Array,
    weights: jax.Array,
    *,
    shared: Any = None,
    strategy: str = "auto",
    chunk_size: int = 8,
) -> tuple[Any, Any, jax.Array]:
    """Trains a cohort with a loop strategy, reading and writing the resident client state.

    Each member's client row and data rows are read from the (K, ...) arrays inside the
    loop and its new client row is written back in place, so a round holds no (M, ...)
    copy of the cohort (neither gathered before nor stacked after training). When the
    client axis is sharded over a mesh, every device trains the members it holds, so no
    client row crosses devices: only the weighted sum of the uploads and the (M,) losses
    are summed over devices. Results equal :func:`client_map_mean` on gathered rows
    followed by a scatter, up to float summation order.

    Args:
      fn: ``(shared, client_row, *data_rows, key) -> (upload, new_client_row, loss)``.
      clients: the client state, leaves (K, ...).
      rows: per-client data, each leaf (K, ...) (e.g. train_x, train_y, train_counts).
      index: (M,) distinct client indices, or ``None`` for all K clients in order.
      keys: (M,) PRNG keys, one per cohort position (or any pytree with leading axis M,
        e.g. a ``core.local.FixedOrder``).
      weights: (M,) non-negative weights, normalized here (all zero gives zeros).
      shared: what every client receives (see the module docstring), or ``None``.
      strategy: ``sequential``, ``chunked`` or ``auto`` (resolving to either).
      chunk_size: clients vmapped per loop iteration with ``chunked``.

    Returns:
      ``(weighted mean of the uploads, clients with the cohort's rows replaced,
      losses (M,))``.
    """
    strategy, chunk_size = resolve(strategy, chunk_size)
    if strategy not in ("sequential", "chunked"):
        raise ValueError(f"train_in_place needs a loop strategy, got {strategy!r}")
    chunk = 1 if strategy == "sequential" else int(chunk_size)
    num_clients = _leading(rows)
    if index is None:
        index = jnp.arange(num_clients, dtype=jnp.int32)
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(weights)
    weights = weights / jnp.where(total > 0, total, 1.0)
    mesh = client_mesh()
    if mesh is None or num_clients % mesh.shape[CLIENT_AXIS]:
        return _train_owned(fn, shared, clients, rows, index, keys, weights, chunk, 0)

    spec, replicated = PartitionSpec(CLIENT_AXIS), PartitionSpec()

    def per_device(shared, clients, rows, index, keys, weights):
        device = jax.lax.axis_index(CLIENT_AXIS)
        total, clients, losses = _train_owned(fn, shared, clients, rows, index, keys, weights,
                                              chunk, device)
        return jax.lax.psum(total, CLIENT_AXIS), clients, jax.lax.psum(losses, CLIENT_AXIS)

    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(replicated, spec, spec, replicated, replicated, replicated),
        out_specs=(replicated, spec, replicated), check_vma=False,
    )(shared, clients, rows, index, keys, weights)


def client_map(
    fn: Callable[..., Any],
    args: tuple,
    *,
    shared: Any = None,
    strategy: str = "auto",
    chunk_size: int = 8,
) -> Any:
    """Applies ``fn(shared, *row)`` to every row of the leading axis of ``args``.

    ``vmap`` runs all clients as one batched program, ``sequential`` one after another
    inside a single compiled loop, ``chunked`` ``chunk_size`` at a time. All give the same
    results; which is fastest depends on the backend and the model.

    Args:
      fn: ``(shared, *row) -> out``.
      args: tuple of trees with leading axis M.
      shared: what every row's call reads besides its own row (see the module docstring).
    """
    return _mapped(fn, args, None, shared, strategy, chunk_size)


def client_map_mean(
    fn: Callable[..., Any],
    args: tuple,
    weights: jax.Array,
    *,
    shared: Any = None,
    strategy: str = "auto",
    chunk_size: int = 8,
) -> tuple[Any, Any]:
    """Like :func:`client_map` for a ``fn`` returning ``(upload, rest)``, but hands back the
    ``weights``-weighted mean of the uploads (no client axis) instead of stacking them.

    The loop strategies keep a running sum in their carry, so an upload as large as the
    model is never materialized M times.

    Args:
      fn: per-client function ``(shared, *row) -> (upload, rest)``.
      args: tuple of trees with leading axis M.
      weights: (M,) non-negative weights, normalized here (all zero gives zeros).
      shared: what every row's call reads besides its own row.

    Returns:
      ``(weighted mean of upload, stacked rest)``.
    """
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(weights)
    normalized = weights / jnp.where(total > 0, total, 1.0)
    return _mapped(fn, args, normalized, shared, strategy, chunk_size)


class Execution(NamedTuple):
    """How the per-client functions of an algorithm run over the client axis.

    Chosen once per algorithm (from its ``client_strategy`` and ``chunk_size``); the round
    and evaluation skeletons of ``core.rounds`` and the algorithms' own client maps all
    read it from here instead of taking the two options at every call.

    Attributes:
      strategy: one of :data:`STRATEGIES`.
      chunk_size: clients vmapped per loop iteration with ``chunked``.
    """

    strategy: str = "auto"
    chunk_size: int = 8

    def map(self, fn: Callable[..., Any], args: tuple, *, shared: Any = None) -> Any:
        """:func:`client_map` with this strategy."""
        return client_map(fn, args, shared=shared, strategy=self.strategy,
                          chunk_size=self.chunk_size)
