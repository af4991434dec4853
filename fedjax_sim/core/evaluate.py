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
    data: Any,
    *,
    split: str = "test",
    index: Any = None,
    strategy: str = "auto",
    chunk_size: int = 8,
) -> tuple[jax.Array, jax.Array]:
    """Correct predictions and summed loss of every client on its own data.

    Each client's rows are read inside the mapped function (``data.client_rows`` /
    ``unpacker``), so the ragged layout never materializes more than the clients being
    evaluated at once. With token labels (B, L), every non-pad token (label >= 0) counts.

    Args:
      logits_fn: ``(client_part_k, shared_part, x_k) -> logits``.
      client_part: per-client tree with leaves (M, ...), or ``None``.
      shared_part: tree common to all clients (e.g. the global model), or ``None``.
      data: ``FederatedData`` or ``RaggedFederatedData``.
      split: which split to score, ``"test"`` or ``"train"``.
      index: (M,) the clients to score (static NumPy or traced), ``None`` for all K.

    Returns:
      correct (M,) int32 and loss_sum (M,) float32 over each client's real rows.
    """
    rows, pool = data.client_rows(split)
    if index is not None:
        rows = jax.tree.map(lambda a: a[index], rows)
    unpack = data.unpacker(split)

    def one_client(shared, part, row):
        shared, pool = shared
        xk, yk, nk = unpack(pool, row)
        logits = logits_fn(part, shared, xk)
        return score(logits, yk, nk)

    options = {"shared": (shared_part, pool), "strategy": strategy, "chunk_size": chunk_size}
    if client_part is None:
        return client_map(lambda shared, row: one_client(shared, None, row), (rows,),
                          **options)
    return client_map(one_client, (client_part, rows), **options)


def score(logits: jax.Array, y: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(correct, loss_sum)`` of one client's padded rows: logits (T, ..., C), labels
    (T, ...), the first ``n`` rows real; negative labels (pad tokens) are not scored."""
    valid = (jnp.arange(y.shape[0]) < n).reshape(-1, *([1] * (y.ndim - 1))) & (y >= 0)
    labels = jnp.maximum(y, 0)
    hits = jnp.sum((jnp.argmax(logits, -1) == labels) & valid)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
    return hits.astype(jnp.int32), jnp.sum(jnp.where(valid, nll, 0.0))


def summarize(correct: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Personalized accuracy statistics over clients (pFL-Bench style).

    A client without test data (``counts[k] == 0``) has no accuracy: it is left out of
    every per-client statistic (never counted as 0) and its entry of
    ``client_accuracies`` is NaN. The data loaders and the runner refuse such clients
    (``fedjax_sim.data.check_federated_data``); this only matters for direct calls.

    Args:
      correct: (K,) correct test predictions per client.
      counts: (K,) test examples per client.

    Returns:
      ``accuracy`` (sample-weighted, Σ correct / Σ samples), ``client_mean_accuracy``,
      ``client_std``, ``client_min``, ``client_p10`` (bottom decile: the 10th percentile
      of per-client accuracy) over the clients with test data (all NaN when there are
      none), and ``client_accuracies`` (list of K, NaN for clients without test data).
    """
    correct = np.asarray(correct, np.float64)
    counts = np.asarray(counts, np.float64)
    tested = counts > 0
    per_client = np.where(tested, correct / np.where(tested, counts, 1.0), np.nan)
    kept = per_client[tested]
    if kept.size == 0:
        stats = dict.fromkeys(("accuracy", "client_mean_accuracy", "client_std", "client_min",
                               "client_p10"), float("nan"))
    else:
        stats = {
            "accuracy": float(correct[tested].sum() / counts[tested].sum()),
            "client_mean_accuracy": float(kept.mean()),
            "client_std": float(kept.std()),
            "client_min": float(kept.min()),
            "client_p10": float(np.percentile(kept, 10)),
        }
    return {**stats, "client_accuracies": per_client.tolist()}


# The fields of :func:`federation_incentives`, in the order they are reported.
INCENTIVE_FIELDS = ("hurt_fraction", "ipr", "ipr_strict", "tie_fraction")


def federation_incentives(accuracies: np.ndarray, local_accuracies: np.ndarray) -> dict:
    """Who gains from federating, against a local-only reference on the same split.

    Clients whose accuracy is NaN in either list (no test data) are left out.

    Returns:
      The shares of clients (all NaN when no client has both accuracies):
      ``hurt_fraction``, accuracy strictly below the local-only accuracy (Motley);
      ``ipr``, the incentivized participation rate of Cho et al. (2022), accuracy >= the
      local-only accuracy (``1 − hurt_fraction``); ``ipr_strict``, strictly above it; and
      ``tie_fraction``, exactly equal (``ipr − ipr_strict``: on small test sets many
      clients tie, e.g. both at 100%).
    """
    accuracies = np.asarray(accuracies, np.float64)
    local_accuracies = np.asarray(local_accuracies, np.float64)
    # Clients without an accuracy (NaN: no test data) count on neither side.
    known = np.isfinite(accuracies) & np.isfinite(local_accuracies)
    if not known.any():
        return dict.fromkeys(INCENTIVE_FIELDS, float("nan"))
    accuracies, local_accuracies = accuracies[known], local_accuracies[known]
    return {
        "hurt_fraction": float(np.mean(accuracies < local_accuracies)),
        "ipr": float(np.mean(accuracies >= local_accuracies)),
        "ipr_strict": float(np.mean(accuracies > local_accuracies)),
        "tie_fraction": float(np.mean(accuracies == local_accuracies)),
    }
