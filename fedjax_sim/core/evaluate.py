"""Per-client evaluation on each client's own test set, and the summary statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core.cohort import client_map

# logits_fn(client_part, shared_part, x[T, ...]) -> logits[T, C]
LogitsFn = Callable[[Any, Any, jax.Array], jax.Array]


def count_correct(
    logits_fn: LogitsFn,
    client_part: Any,
    shared_part: Any,
    x: jax.Array,
    y: jax.Array,
    counts: jax.Array,
    *,
    strategy: str = "auto",
    chunk_size: int = 8,
) -> tuple[jax.Array, jax.Array]:
    """Correct predictions and summed loss of every client on its own padded data.

    Args:
      logits_fn: ``(client_part_k, shared_part, x_k) -> logits``.
      client_part: per-client tree with leaves (K, ...), or ``None``.
      shared_part: tree common to all clients (e.g. the global model), or ``None``.
      x: (K, T, ...) inputs; y: (K, T) labels; counts: (K,) real rows per client.

    Returns:
      correct (K,) int32 and loss_sum (K,) float32 over each client's real rows.
    """

    def one_client(shared, part, xk, yk, nk):
        logits = logits_fn(part, shared, xk)
        valid = jnp.arange(xk.shape[0]) < nk
        hits = jnp.sum((jnp.argmax(logits, -1) == yk) & valid)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yk[:, None], axis=-1)[:, 0]
        return hits.astype(jnp.int32), jnp.sum(jnp.where(valid, nll, 0.0))

    options = {"shared": shared_part, "strategy": strategy, "chunk_size": chunk_size}
    if client_part is None:
        return client_map(lambda shared, xk, yk, nk: one_client(shared, None, xk, yk, nk),
                          (x, y, counts), **options)
    return client_map(one_client, (client_part, x, y, counts), **options)


def summarize(correct: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Personalized accuracy statistics over clients (pFL-Bench style).

    Returns:
      ``accuracy`` (sample-weighted, Σ correct / Σ samples), ``client_mean_accuracy``,
      ``client_std``, ``client_min``, ``client_p10`` (bottom decile: the 10th percentile
      of per-client accuracy) and ``client_accuracies`` (list of K).
    """
    correct = np.asarray(correct, np.float64)
    counts = np.asarray(counts, np.float64)
    per_client = correct / np.maximum(counts, 1.0)
    return {
        "accuracy": float(correct.sum() / max(counts.sum(), 1.0)),
        "client_mean_accuracy": float(per_client.mean()),
        "client_std": float(per_client.std()),
        "client_min": float(per_client.min()),
        "client_p10": float(np.percentile(per_client, 10)),
        "client_accuracies": per_client.tolist(),
    }


def federation_incentives(accuracies: np.ndarray, local_accuracies: np.ndarray) -> dict:
    """Who gains from federating, against a local-only reference on the same split.

    Returns:
      ``hurt_fraction``: share of clients whose accuracy is strictly below their local-only
      accuracy (Motley). ``ipr``: the incentivized participation rate of Cho et al. (2022),
      share of clients with accuracy >= local-only accuracy.
    """
    accuracies = np.asarray(accuracies)
    local_accuracies = np.asarray(local_accuracies)
    return {
        "hurt_fraction": float(np.mean(accuracies < local_accuracies)),
        "ipr": float(np.mean(accuracies >= local_accuracies)),
    }
