"""Soft targets and distillation losses for federated distillation, batched over clients.

Clients' predictions on one public batch arrive as a single (K, B, C) array (client,
public example, class). The kernels here reduce it over the client axis into soft targets
and score a student against them:

- ``weighted_average``: Σ_k w_k p_k / Σ_k w_k over the client axis. Applied to
  probabilities it is DS-FL's simple averaging (SA); applied to logits it is FedDF's
  AVGLOGITS and FedMD's consensus.
- ``era``: Entropy Reduction Aggregation of DS-FL (Itahara, Nishio, Koda, Morikura,
  Yamamoto, "Distillation-Based Semi-Supervised Federated Learning for
  Communication-Efficient Collaborative Training With Non-IID Private Data", IEEE TMC
  2021): softmax(mean_k p_k / T), which sharpens the averaged probabilities for T < 1.
- ``fccl_collaboration_loss``: the cross-correlation loss of FCCL (Huang, Ye, Du, "Learn
  from Others and Be Yourself in Heterogeneous Federated Learning", CVPR 2022).
- ``kl_distillation``, ``ce_distillation``, ``mae_distillation``: per-row weighted losses
  of a student's logits against a teacher.

Nothing here imports from the rest of ``fedjax_sim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

AGGREGATIONS = ("era", "sa", "avglogits")


def client_predictions(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    x: jax.Array,
    *,
    temperature: float | None = None,
) -> jax.Array:
    """Every client's output on one shared batch.

    Args:
      apply_fn: ``(params, x[B, ...]) -> logits[B, C]`` of one model.
      params: the clients' parameters, leaves (K, ...).
      x: (B, ...) public inputs, the same for every client.
      temperature: if given, return ``softmax(logits / temperature)`` instead of logits.

    Returns:
      (K, B, C) logits or probabilities.
    """
    logits = jax.vmap(apply_fn, in_axes=(0, None))(params, x)
    if temperature is None:
        return logits
    return jax.nn.softmax(logits / temperature, axis=-1)


def _client_weights(num_clients: int, weights: jax.Array | None) -> jax.Array:
    """Normalized (K,) weights; uniform when ``weights`` is None, zeros when they sum to 0."""
    if weights is None:
        return jnp.full((num_clients,), 1.0 / num_clients, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(weights)
    return weights / jnp.where(total > 0, total, 1.0)


def weighted_average(predictions: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Weighted mean over the client axis.

    Args:
      predictions: (K, B, C) probabilities or logits.
      weights: (K,) non-negative weights (participation mask, sample counts); None means
        uniform. An all-zero vector yields zeros.

    Returns:
      (B, C).
    """
    w = _client_weights(predictions.shape[0], weights)
    return jnp.einsum("k,kbc->bc", w, predictions.astype(jnp.float32))


def era(
    probabilities: jax.Array, weights: jax.Array | None = None, *, temperature: float = 0.1
) -> jax.Array:
    """Entropy Reduction Aggregation: ``softmax(weighted_average(p) / temperature)``.

    Args:
      probabilities: (K, B, C) client probabilities.
      weights: (K,) client weights, or None for the plain mean.
      temperature: T > 0; T < 1 lowers the entropy of the aggregate (DS-FL uses 0.1).

    Returns:
      (B, C) soft targets, rows summing to one.
    """
    return jax.nn.softmax(weighted_average(probabilities, weights) / temperature, axis=-1)


def soft_targets(
    predictions: jax.Array,
    weights: jax.Array | None = None,
    *,
    method: str = "era",
    temperature: float = 0.1,
) -> jax.Array:
    """Soft targets from client predictions by one of ``AGGREGATIONS``.

    ``era`` and ``sa`` expect probabilities; ``avglogits`` expects logits (and returns
    averaged logits). ``sa`` and ``avglogits`` are the same average; the names say what
    goes in.
    """
    if method == "era":
        return era(predictions, weights, temperature=temperature)
    if method in ("sa", "avglogits"):
        return weighted_average(predictions, weights)
    raise ValueError(f"method must be one of {AGGREGATIONS}, got {method!r}")


def standardize(z: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """Each column of ``z`` (B, C) minus its batch mean, over its unbiased batch std + eps."""
    mean = jnp.mean(z, axis=0, keepdims=True)
    std = jnp.std(z, axis=0, ddof=1, keepdims=True)
    return (z - mean) / (std + eps)


def cross_correlation(z: jax.Array, reference: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """FCCL's M = Z̃ᵀ R̃ / B between two (B, C) logit matrices standardized along the batch.

    Returns:
      (C, C).
    """
    return standardize(z, eps=eps).T @ standardize(reference, eps=eps) / z.shape[0]


def fccl_collaboration_loss(
    z: jax.Array, reference: jax.Array, *, off_diagonal_weight: float = 0.0051,
    eps: float = 1e-6,
) -> jax.Array:
    """FCCL's collaboration loss Σ_u (1 − M_uu)² + λ Σ_{u≠v} (1 + M_uv)².

    The diagonal pulls every class logit of the client into correlation with the same
    class of the reference (the participants' mean logits); the off-diagonal term pushes
    different classes apart. λ = 0.0051 as in the paper.

    Args:
      z: (B, C) a client's logits, or (K, B, C) for K clients at once.
      reference: (B, C) the mean logits (treated as a constant by callers).
      off_diagonal_weight: λ.

    Returns:
      A scalar, or (K,) for batched ``z``.
    """
    if z.ndim == 3:
        return jax.vmap(
            lambda zk: fccl_collaboration_loss(
                zk, reference, off_diagonal_weight=off_diagonal_weight, eps=eps
            )
        )(z)
    m = cross_correlation(z, reference, eps=eps)
    eye = jnp.eye(m.shape[0], dtype=bool)
    on = jnp.sum(jnp.where(eye, (1.0 - m) ** 2, 0.0))
    off = jnp.sum(jnp.where(eye, 0.0, (1.0 + m) ** 2))
    return on + off_diagonal_weight * off


def _row_mean(per_row: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(per_row)
    weights = jnp.asarray(weights, jnp.float32)
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kl_distillation(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    *,
    temperature: float = 1.0,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Mean over rows of KL(teacher ‖ softmax(student / T)).

    Args:
      student_logits: (B, C).
      teacher_probs: (B, C) soft targets (already tempered by the caller if desired).
      temperature: the student's temperature.
      weights: (B,) row weights (0 on padding), or None.
    """
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_teacher = jnp.log(jnp.clip(teacher_probs, 1e-12, 1.0))
    per_row = jnp.sum(teacher_probs * (log_teacher - log_student), axis=-1)
    return _row_mean(per_row, weights)


def ce_distillation(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    *,
    temperature: float = 1.0,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Mean over rows of the cross-entropy −Σ_c t_c log softmax(student / T)_c.

    Differs from ``kl_distillation`` by the teacher's entropy, a constant: same gradients.
    """
    log_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    per_row = -jnp.sum(teacher_probs * log_student, axis=-1)
    return _row_mean(per_row, weights)


def mae_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, *, weights: jax.Array | None = None
) -> jax.Array:
    """Mean absolute error between logits (FedMD's digest loss), averaged over classes and
    rows."""
    per_row = jnp.mean(jnp.abs(student_logits - teacher_logits), axis=-1)
    return _row_mean(per_row, weights)
