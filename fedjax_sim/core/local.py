"""Local training of one client as a ``lax.scan`` over mini-batches, with epoch semantics.

Client data is padded to a common length ``N_max``. Every client scans the same number of
steps, ``epochs * ceil(N_max / B)``, so the program has one shape; a client with ``n_k``
samples is active only for its first ``ceil(n_k / B)`` steps of each epoch and its padded
rows carry zero weight. Inactive steps leave the carry untouched, so the result equals a
plain loop over that client's own batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
# step_fn(carry, x_batch, y_batch, weights) -> (carry, loss)
StepFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], tuple[PyTree, jax.Array]]


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
    samples cut into batches of ``batch_size`` (the last one partial). With ``steps``: that
    many batches drawn uniformly with replacement from the real samples (all active).

    Args:
      key: PRNG key.
      count: scalar int, the client's number of real samples (>= 1).
      n_max: padded length (static).
      batch_size: batch size (static).
      epochs / steps: exactly one of them set (static).

    Returns:
      index (S, B) int32 rows into the padded arrays, weight (S, B) float32 (0 on padding),
      active (S,) bool.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("exactly one of epochs and steps must be set")
    if steps is not None:
        u = jax.random.uniform(key, (steps, batch_size))
        index = jnp.minimum((u * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
        weight = jnp.ones((steps, batch_size), jnp.float32)
        return index, weight, jnp.ones((steps,), bool)

    per_epoch = -(-n_max // batch_size)
    padded = per_epoch * batch_size
    positions = jnp.arange(padded)

    def one_epoch(epoch_key):
        # Real samples get random keys in [0, 1), padding sorts last with key 2.
        u = jax.random.uniform(epoch_key, (padded,))
        order = jnp.argsort(jnp.where(positions < count, u, 2.0))
        weight = (positions < count).astype(jnp.float32)
        index = jnp.minimum(order, n_max - 1).astype(jnp.int32)
        return index.reshape(per_epoch, batch_size), weight.reshape(per_epoch, batch_size)

    index, weight = jax.vmap(one_epoch)(jax.random.split(key, epochs))
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
) -> tuple[PyTree, jax.Array]:
    """Runs ``step_fn`` over one client's mini-batches.

    Args:
      step_fn: ``(carry, xb, yb, wb) -> (carry, loss)``; ``wb`` weights the batch rows.
      carry: any pytree (parameters, optimizer state, ...).
      x: (N_max, ...) padded inputs; y: (N_max,) labels; count: real sample count.
      key: PRNG key for the batch order.

    Returns:
      The final carry and the mean loss over active steps.
    """
    index, weight, active = batch_schedule(
        key, count, x.shape[0], batch_size, epochs=epochs, steps=steps
    )

    if steps is not None:
        # Every step of a fixed-steps budget is active: no masking needed.
        def body(carry, inputs):
            rows, w, _ = inputs
            return step_fn(carry, x[rows], y[rows], w)

    else:

        def body(carry, inputs):
            rows, w, is_active = inputs

            def skip(carry):
                loss = jax.eval_shape(step_fn, carry, x[rows], y[rows], w)[1]
                return carry, jnp.zeros(loss.shape, loss.dtype)

            # A branch, not a select: a client past its last batch of the epoch does no
            # work in the loop strategies (under vmap this becomes a select, as before).
            return jax.lax.cond(
                is_active, lambda c: step_fn(c, x[rows], y[rows], w), skip, carry
            )

    carry, losses = jax.lax.scan(body, carry, (index, weight, active))
    n_active = jnp.maximum(jnp.sum(active), 1)
    return carry, jnp.sum(losses) / n_active


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy over rows with weight > 0."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sgd_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> StepFn:
    """A step function for ``scan_batches`` with carry ``(params, opt_state)``.

    Args:
      loss_fn: ``(params, xb, yb, wb) -> scalar``.
      optimizer: any optax transformation.
    """

    def step(carry, xb, yb, wb):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, wb)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


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
) -> tuple[PyTree, jax.Array]:
    """Local training of one client from ``params`` with a fresh optimizer state.

    Returns:
      The trained parameters and the mean training loss.
    """
    (params, _), loss = scan_batches(
        sgd_step(loss_fn, optimizer),
        (params, optimizer.init(params)),
        x,
        y,
        count,
        key,
        batch_size=batch_size,
        epochs=epochs,
        steps=steps,
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
