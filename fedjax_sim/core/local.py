"""Local training of one client as a ``lax.scan`` over mini-batches, with epoch semantics.

Client data is padded to a common length ``N_max``. Every client scans the same number of
steps, ``epochs * ceil(N_max / B)``, so the program has one shape; a client with ``n_k``
samples is active only for its first ``ceil(n_k / B)`` steps of each epoch and its padded
rows carry zero weight. Inactive steps leave the carry untouched, so the result equals a
plain loop over that client's own batches.

The batch order is drawn in the graph from the client's PRNG key by default. A
:class:`FixedOrder` passed in place of the key replaces it with an order chosen on the
host (e.g. by :func:`sample_batch_orders`), so that another implementation fed the same
orders takes the same steps: each epoch visits the client's real samples in the given
order, in batches of ``batch_size`` with the last one partial, and every batch's loss is
the mean over its real samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.kernels.augment import augment_batch

PyTree = Any
# fold_in constant of the augmentation keys: a stream apart from the batch order's.
AUGMENT_STREAM = 0x417567
# step_fn(carry, x_batch, y_batch, weights) -> (carry, loss)
StepFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], tuple[PyTree, jax.Array]]


class FixedOrder(NamedTuple):
    """A client's sample order for local training, passed where a PRNG key is expected.

    Attributes:
      order: (E, N_max) integers; row ``e`` lists the indices of the client's samples in
        the order epoch ``e`` visits them. Only the first ``count`` entries of a row are
        read, and they must be a permutation of ``0 .. count - 1`` (not checked in the
        graph; :func:`check_batch_orders` checks on the host).
    """

    order: Any


def sample_batch_orders(
    seed: int, counts: Any, *, rounds: int, epochs: int, n_max: int | None = None
) -> np.ndarray:
    """Per-round, per-client, per-epoch sample orders drawn on the host.

    Args:
      seed: seed of ``numpy.random.default_rng``.
      counts: (K,) the clients' real training sample counts.
      rounds: number of rounds R.
      epochs: local epochs E per round.
      n_max: padded length (default ``max(counts)``).

    Returns:
      (R, K, E, N_max) int32: ``[r, k, e, :counts[k]]`` is a permutation of
      ``0 .. counts[k] - 1``; the remaining entries are 0.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_max = int(counts.max()) if n_max is None else int(n_max)
    rng = np.random.default_rng(seed)
    out = np.zeros((int(rounds), counts.size, int(epochs), n_max), np.int32)
    for r in range(int(rounds)):
        for k, n in enumerate(counts):
            for e in range(int(epochs)):
                out[r, k, e, :n] = rng.permutation(int(n))
    return out


def check_batch_orders(orders: Any, counts: Any, *, epochs: int | None = None) -> np.ndarray:
    """Checks host batch orders (R, K, E, N_max) against the clients' counts.

    Args:
      orders: the orders, e.g. from :func:`sample_batch_orders`.
      counts: (K,) the clients' real training sample counts.
      epochs: the local epochs E they must have, if given.

    Returns:
      ``orders`` as an int32 NumPy array.

    Raises:
      ValueError: naming ``batch_order`` when the shape does not match, or when a row's
        first ``counts[k]`` entries are not a permutation of ``0 .. counts[k] - 1``.
    """
    orders = np.asarray(orders)
    counts = np.asarray(counts, dtype=np.int64)
    if orders.ndim != 4 or not np.issubdtype(orders.dtype, np.integer):
        raise ValueError("batch_order must be an integer array (rounds, clients, epochs, "
                         f"N_max), got dtype {orders.dtype} and shape {orders.shape}")
    _, k, e, n_max = orders.shape
    if k != counts.size or n_max < counts.max(initial=0):
        raise ValueError(f"batch_order has shape {orders.shape}; expected {counts.size} "
                         f"clients and N_max >= {counts.max(initial=0)}")
    if epochs is not None and e != int(epochs):
        raise ValueError(f"batch_order has {e} epochs per round; local_epochs is {epochs}")
    for client, n in enumerate(counts):
        rows = np.sort(orders[:, client, :, :n], axis=-1)
        if not (rows == np.arange(n)).all():
            raise ValueError(f"batch_order of client {client}: the first {n} entries of "
                             f"every epoch must be a permutation of 0..{n - 1}")
    return orders.astype(np.int32)


def num_steps(n_max: int, batch_size: int, *, epochs: int | None, steps: int | None) -> int:
    """Static number of scan steps for a padded client of length ``n_max``."""
    if steps is not None:
        return int(steps)
    return int(epochs) * -(-int(n_max) // int(batch_size))


def batch_schedule(
    key: jax.Array,
    count: jax.Array,
    n_max: int,
    batch_size: int,
    *,
    epochs: int | None = None,
    steps: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mini-batch indices for one client.

    With ``epochs``: each epoch is a fresh permutation of the client's ``count`` real
    samples cut into batches of ``batch_size`` (the last one partial); the permutation is
    drawn from ``key``, or read from it when ``key`` is a :class:`FixedOrder`. With
    ``steps``: that many batches drawn uniformly with replacement from the real samples
    (all active).

    Args:
      key: PRNG key, or a :class:`FixedOrder` with ``order`` (epochs, n_max).
      count: scalar int, the client's number of real samples (>= 1).
      n_max: padded length (static).
      batch_size: batch size (static).
      epochs / steps: exactly one of them set (static).

    Returns:
      index (S, B) int32 rows into the padded arrays, weight (S, B) float32 (0 on padding),
      active (S,) bool.

    Raises:
      ValueError: if both or neither of ``epochs`` and ``steps`` are set, or a
        :class:`FixedOrder` comes with ``steps`` or has a shape other than (epochs, n_max).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("exactly one of epochs and steps must be set")
    fixed = isinstance(key, FixedOrder)
    if fixed and steps is not None:
        raise ValueError("a fixed batch order needs local_epochs; local_steps draws batches "
                         "with replacement")
    if fixed and tuple(key.order.shape) != (epochs, n_max):
        raise ValueError(f"batch order must have shape (epochs, N_max) = ({epochs}, {n_max}), "
                         f"got {tuple(key.order.shape)}")
    if steps is not None:
        u = jax.random.uniform(key, (steps, batch_size))
        index = jnp.minimum((u * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
        weight = jnp.ones((steps, batch_size), jnp.float32)
        return index, weight, jnp.ones((steps,), bool)

    per_epoch = -(-n_max // batch_size)
    padded = per_epoch * batch_size
    positions = jnp.arange(padded)

    weight = jnp.broadcast_to((positions < count).astype(jnp.float32), (epochs, padded))
    if fixed:
        # Positions past count (padding, then the round-up to whole batches) have weight 0;
        # clipping keeps their indices in range.
        order = jnp.pad(jnp.asarray(key.order, jnp.int32), ((0, 0), (0, padded - n_max)))
        index = jnp.clip(order, 0, n_max - 1)
    else:

        def one_epoch(epoch_key):
            # Real samples get random keys in [0, 1), padding sorts last with key 2.
            u = jax.random.uniform(epoch_key, (padded,))
            order = jnp.argsort(jnp.where(positions < count, u, 2.0))
            return jnp.minimum(order, n_max - 1).astype(jnp.int32)

        index = jax.vmap(one_epoch)(jax.random.split(key, epochs))
    active = jnp.tile(jnp.arange(per_epoch) * batch_size < count, epochs)
    return (
        index.reshape(epochs * per_epoch, batch_size),
        weight.reshape(epochs * per_epoch, batch_size),
        active,
    )


def scan_batches(
    step_fn: StepFn,
    carry: PyTree,
    x: jax.Array,
    y: jax.Array,
    count: jax.Array,
    key: jax.Array,
    *,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    augment: str | None = None,
) -> tuple[PyTree, jax.Array]:
    """Runs ``step_fn`` over one client's mini-batches.

    Args:
      step_fn: ``(carry, xb, yb, wb) -> (carry, loss)``; ``wb`` weights the batch rows.
      carry: any pytree (parameters, optimizer state, ...).
      x: (N_max, ...) padded inputs; y: (N_max,) labels; count: real sample count.
      key: PRNG key for the batch order, or a :class:`FixedOrder` (epochs only).
      augment: ``None`` / ``"none"``, or an augmentation of ``kernels.augment`` applied to
        every batch with its own key (drawn from ``key``, a stream apart from the order).

    Returns:
      The final carry and the mean loss over active steps.

    Raises:
      ValueError: an augmentation with a :class:`FixedOrder` (which carries no key).
    """
    index, weight, active = batch_schedule(
        key, count, x.shape[0], batch_size, epochs=epochs, steps=steps
    )
    augmenting = augment not in (None, "none")
    if augmenting and isinstance(key, FixedOrder):
        raise ValueError("augment needs a PRNG key per client; a fixed batch order has none")
    step_keys = (jax.random.split(jax.random.fold_in(key, AUGMENT_STREAM), index.shape[0])
                 if augmenting else jnp.zeros((index.shape[0],), jnp.uint32))

    def batch(rows, step_key):
        xb = x[rows]
        return (augment_batch(augment, step_key, xb) if augmenting else xb), y[rows]

    if steps is not None:
        # Every step of a fixed-steps budget is active: no masking needed.
        def body(carry, inputs):
            rows, w, _, step_key = inputs
            return step_fn(carry, *batch(rows, step_key), w)

    else:

        def body(carry, inputs):
            rows, w, is_active, step_key = inputs

            def skip(carry):
                loss = jax.eval_shape(step_fn, carry, x[rows], y[rows], w)[1]
                return carry, jnp.zeros(loss.shape, loss.dtype)

            # A branch, not a select: a client past its last batch of the epoch does no
            # work in the loop strategies (under vmap this becomes a select, as before).
            return jax.lax.cond(
                is_active, lambda c: step_fn(c, *batch(rows, step_key), w), skip, carry
            )

    carry, losses = jax.lax.scan(body, carry, (index, weight, active, step_keys))
    n_active = jnp.maximum(jnp.sum(active), 1)
    return carry, jnp.sum(losses) / n_active


def token_weights(labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-label weights: ``weights`` (B,) broadcast over the label axes of ``labels``
    (B, *label_shape), zero where a label is negative (a pad token)."""
    extra = labels.ndim - weights.ndim
    if extra == 0:
        return weights
    return weights.reshape(*weights.shape, *([1] * extra)) * (labels >= 0).astype(weights.dtype)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy over rows with weight > 0.

    Labels (B,) give one class per row; labels (B, L) (next-token prediction) one per
    position, the mean then running over every non-pad token (label >= 0) of the rows
    with weight > 0, as the references average a sequence model's loss.
    """
    if labels.ndim == weights.ndim:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    weights = token_weights(labels, weights)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sgd_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
             stats: tuple[str, ...] = ()) -> StepFn:
    """A step function for ``scan_batches`` with carry ``(params, opt_state)``.

    Args:
      loss_fn: ``(params, xb, yb, wb) -> scalar``; with ``stats``,
        ``(params, xb, yb, wb) -> (scalar, new_stats)``, ``new_stats`` a dict of the
        top-level entries ``stats`` (a batch-normalized model's training mode).
      optimizer: any optax transformation.
      stats: top-level parameter entries that hold running statistics. The gradient is
        taken with them held constant (they get a zero gradient), the optimizer steps
        every leaf, and then ``new_stats`` replaces those entries, so that no update of
        the optimizer (weight decay, momentum) reaches the statistics. Empty: the plain
        step.
    """
    if not stats:

        def step(carry, xb, yb, wb):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, wb)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return step

    def stats_step(carry, xb, yb, wb):
        params, opt_state = carry

        def objective(trainable):
            fixed = {name: jax.lax.stop_gradient(params[name]) for name in stats}
            return loss_fn({**trainable, **fixed}, xb, yb, wb)

        (loss, new_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return ({**params, **{name: new_stats[name] for name in stats}}, opt_state), loss

    return stats_step


def train(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    count: jax.Array,
    key: jax.Array,
    *,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    augment: str | None = None,
    stats: tuple[str, ...] = (),
) -> tuple[PyTree, jax.Array]:
    """Local training of one client from ``params`` with a fresh optimizer state.

    ``key`` is a PRNG key or a :class:`FixedOrder` (see :func:`batch_schedule`).
    ``stats``: the running-statistics entries of a batch-normalized model's parameters,
    with ``loss_fn`` returning ``(loss, new_stats)`` (see :func:`sgd_step`).

    Returns:
      The trained parameters and the mean training loss.
    """
    (params, _), loss = scan_batches(
        sgd_step(loss_fn, optimizer, stats=tuple(stats)),
        (params, optimizer.init(params)),
        x,
        y,
        count,
        key,
        batch_size=batch_size,
        epochs=epochs,
        steps=steps,
        augment=augment,
    )
    return params, loss


def frozen(
    optimizer: optax.GradientTransformation, trainable: PyTree
) -> optax.GradientTransformation:
    """``optimizer`` on leaves where ``trainable`` is True; zero updates elsewhere.

    Args:
      trainable: a pytree of Python bools with the parameters' structure.
    """
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
