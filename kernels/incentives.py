"""Incentive-aware aggregation weights over the client axis.

MaxFL / IncFL (Cho, Jhunjhunwala, Li, Smith, Joshi, "Maximizing Global Model Appeal in
Federated Learning", arXiv 2205.14840; first titled "To Federate or Not To Federate")
maximizes the number of clients whose loss on the global model is at most their
local-only loss ρ_k, through the smooth surrogate Σ_k σ((ρ_k − f_k(w)) / T) of the count
Σ_k 1[f_k(w) ≤ ρ_k]. Its gradient weights client k's gradient by σ'((f_k(w) − ρ_k) / T)
(σ' = σ(1 − σ) is even), so clients near their threshold count most and clients far on
either side (already won, or out of reach) count little.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_sigmoid_slope(global_loss: jax.Array, threshold: jax.Array,
                      temperature: jax.Array | float = 1.0) -> jax.Array:
    """``log σ'(x)`` with ``x = (global_loss − threshold) / temperature``, per client.

    Written as ``log σ(x) + log σ(−x)`` so that it stays finite where σ'(x) itself
    underflows (|x| above about 100 in float32).

    Args:
      global_loss: (M,) each client's loss f_k(w) on the global model it received.
      threshold: (M,) each client's local-only loss ρ_k.
      temperature: T > 0, a float or traced scalar.

    Returns:
      (M,) float32 log-weights.
    """
    x = (jnp.asarray(global_loss, jnp.float32) - jnp.asarray(threshold, jnp.float32))
    x = x / jnp.asarray(temperature, jnp.float32)
    return jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x)


def incfl_weights(global_loss: jax.Array, threshold: jax.Array,
                  temperature: jax.Array | float = 1.0,
                  present: jax.Array | None = None) -> jax.Array:
    """IncFL's normalized aggregation weights ``q_k / Σ_j q_j``, ``q_k = σ'((f_k − ρ_k)/T)``.

    Normalizing divides the server's step by the cohort's total weight Σ_j q_j, so that
    the step does not vanish when every client is far from its threshold (each q_k is at
    most 1/4 and can underflow). With a flat surrogate (T → ∞) every weight is 1/M.

    Args:
      global_loss: (M,) f_k(w).
      threshold: (M,) ρ_k.
      temperature: T > 0.
      present: optional (M,) bool; absent clients (e.g. padding) get weight 0.

    Returns:
      (M,) non-negative float32 weights summing to 1 over the present clients.
    """
    log_q = log_sigmoid_slope(global_loss, threshold, temperature)
    if present is not None:
        log_q = jnp.where(present, log_q, -jnp.inf)
    return jax.nn.softmax(log_q)
