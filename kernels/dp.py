"""User-level differential privacy kernels: clipping, noised sums, adaptive clip norms.

McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language
Models." ICLR 2018 (DP-FedAvg: every client's update is clipped to L2 norm C, the
clipped updates are summed and Gaussian noise of standard deviation σ C is added once).
Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive
Clipping." NeurIPS 2021, arXiv 1905.03871 (Algorithm 1: C follows a target quantile γ of
the update norms through a noised count of unclipped updates and a geometric step;
Theorem 1: splitting one noise multiplier between the update sum and that count).

Every function is pure array math and traceable under ``jax.jit`` / ``jax.vmap``: each
numeric argument may be a traced scalar. Update trees have leaves shaped ``(M, ...)``
(M = rows, one client update each); ``present`` is the ``(M,)`` bool mask of the rows
that hold a sampled client. The host-side check of the noise split is
:func:`split_noise_multiplier_host`.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _rows(tree: PyTree) -> int:
    """M, the shared leading axis of every leaf."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("the update tree has no leaves")
    rows = leaves[0].shape[0]
    chex.assert_tree_shape_prefix(tree, (rows,))
    return rows


def _present(present: jax.Array | None, rows: int) -> jax.Array:
    """The (M,) bool mask; None means every row."""
    if present is None:
        return jnp.ones((rows,), bool)
    present = jnp.asarray(present)
    chex.assert_shape(present, (rows,))
    return present.astype(bool)


def _row_mask(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    """``mask`` (M,) reshaped to broadcast against ``leaf`` (M, ...)."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def clip_rows(deltas: PyTree, clip_norm: jax.Array | float) -> tuple[PyTree, jax.Array]:
    """Clips every row (client update) to global L2 norm ``clip_norm``.

    The norm of a row is taken over all its leaves together (flat clipping, McMahan et
    al. 2018, Algorithm 1 ``ClipFn``). A row whose norm is at most ``clip_norm`` is
    returned unchanged bit for bit; a longer one is scaled by ``clip_norm / norm`` (its
    norm is then ``clip_norm`` up to float rounding). ``clip_norm = inf`` leaves every
    row unchanged; zero rows stay zero.

    Args:
      deltas: leaves shaped (M, ...), one update per row.
      clip_norm: C > 0, a scalar (traced or not).

    Returns:
      ``(clipped, norms)``: ``clipped`` the tree of ``deltas``' structure, shapes and
      dtypes; ``norms`` (M,) float32, each row's norm before clipping.
    """
    rows = _rows(deltas)
    squares = [
        jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(rows, -1), axis=1)
        for leaf in jax.tree.leaves(deltas)
    ]
    norms = jnp.sqrt(sum(squares[1:], squares[0]))
    clip_norm = jnp.asarray(clip_norm, jnp.float32)
    too_long = norms > clip_norm
    # The divisor is 1 where the row is kept, so a zero row is never divided by its norm.
    scale = clip_norm / jnp.where(too_long, norms, 1.0)

    def clip_leaf(leaf):
        scaled = leaf * _row_mask(scale, leaf).astype(leaf.dtype)
        # where, not a multiply by 1: kept rows are the input bits, not a rounding of them.
        return jnp.where(_row_mask(too_long, leaf), scaled, leaf)

    return jax.tree.map(clip_leaf, deltas), norms


def noised_sum(
    clipped: PyTree, present: jax.Array | None, key: jax.Array, stddev: jax.Array | float
) -> PyTree:
    """Sum of the present rows plus N(0, stddev²) on every coordinate.

    The Gaussian mechanism of DP-FedAvg: with rows clipped to C, ``stddev = σ C`` gives
    noise multiplier σ. Each leaf draws its noise from its own key (``key`` split over
    the leaves). Absent rows are excluded with ``where``, so even NaN or inf in them never
    reaches the sum. ``stddev = 0`` adds nothing: the result is the plain masked sum bit
    for bit. A NaN ``stddev`` (e.g. from :func:`split_noise_multiplier` when no split
    exists) makes the result NaN rather than silently dropping the noise.

    Args:
      clipped: leaves shaped (M, ...).
      present: (M,) bool, the rows that count; None means all.
      key: a PRNG key (typed or raw).
      stddev: the noise standard deviation, a scalar ≥ 0 (traced or not).

    Returns:
      The tree without the leading axis, in the leaves' dtypes.
    """
    rows = _rows(clipped)
    present = _present(present, rows)
    leaves, treedef = jax.tree.flatten(clipped)
    keys = jax.random.split(key, len(leaves))
    stddev = jnp.asarray(stddev, jnp.float32)

    def noised(leaf, leaf_key):
        total = jnp.sum(jnp.where(_row_mask(present, leaf), leaf, jnp.zeros((), leaf.dtype)),
                        axis=0)
        noise = jax.random.normal(leaf_key, total.shape, leaf.dtype) * stddev.astype(leaf.dtype)
        return jnp.where(stddev == 0, total, total + noise)

    return jax.tree.unflatten(
        treedef, [noised(leaf, leaf_key) for leaf, leaf_key in zip(leaves, keys, strict=True)])


def noised_count(
    norms: jax.Array,
    present: jax.Array | None,
    clip_norm: jax.Array | float,
    key: jax.Array,
    stddev: jax.Array | float,
    *,
    expected_count: jax.Array | float | None = None,
) -> jax.Array:
    """Noised count of the present rows left unclipped (Andrew et al., Algorithm 1).

    With ``b_k = [norm_k ≤ C]`` it returns ``Σ_present b_k + ½ (E − m) + N(0, stddev²)``,
    m = the number of present rows, E = ``expected_count`` (default m, which gives the
    plain ``Σ_present b_k + N(0, stddev²)``).

    Why E: Theorem 1's split (:func:`split_noise_multiplier`) charges the count with
    multiplier 2σ_b, i.e. it assumes the released count moves by at most ½ when one client
    is added or removed. That holds for the centred sum ``Σ (b_k − ½)`` (TensorFlow
    Privacy's ``QuantileEstimatorQuery`` accumulates ``b_k − 0.5`` for this reason), and
    ``½ E`` added back must be public. Under Poisson sampling m is not public: pass E =
    the expected cohort q N. Under fixed-size sampling m is public (E = m, the default),
    and the replace-one relation moves both the count and the clipped sum by twice their
    add/remove bound, so the split holds there as well.

    Args:
      norms: (M,) the rows' norms before clipping (from :func:`clip_rows`).
      present: (M,) bool, the rows that count; None means all.
      clip_norm: C, the clip norm the rows were clipped to.
      key: a PRNG key (typed or raw).
      stddev: σ_b, the count noise's standard deviation ≥ 0.
      expected_count: E, the public centre of the count (see above); None uses m.

    Returns:
      A float32 scalar.
    """
    norms = jnp.asarray(norms, jnp.float32)
    chex.assert_rank(norms, 1)
    present = _present(present, norms.shape[0])
    count = jnp.sum(present & (norms <= jnp.asarray(clip_norm, jnp.float32)), dtype=jnp.float32)
    if expected_count is not None:
        members = jnp.sum(present, dtype=jnp.float32)
        count = count + 0.5 * (jnp.asarray(expected_count, jnp.float32) - members)
    stddev = jnp.asarray(stddev, jnp.float32)
    noisy = count + stddev * jax.random.normal(key, (), jnp.float32)
    return jnp.where(stddev == 0, count, noisy)


def geometric_clip_update(
    clip_norm: jax.Array | float,
    noised_fraction: jax.Array | float,
    target_quantile: jax.Array | float,
    clip_lr: jax.Array | float,
) -> jax.Array:
    """The next clip norm: ``C · exp(−η_C (b̄ − γ))`` (Andrew et al., geometric update).

    ``b̄`` is clamped to [0, 1] first (as TensorFlow Privacy's ``QuantileEstimatorQuery``
    does): noise can push the estimate outside, and the true fraction never is, so the
    clamp only bounds a step to a factor ``exp(±η_C)``. It is post-processing of the noised
    count and costs no privacy.

    Args:
      clip_norm: C, the current clip norm.
      noised_fraction: b̄, the noised fraction of unclipped updates (noised count / E).
      target_quantile: γ in [0, 1], the fraction of updates to leave unclipped.
      clip_lr: η_C ≥ 0, the step size in log space.

    Returns:
      A float32 scalar.
    """
    fraction = jnp.clip(jnp.asarray(noised_fraction, jnp.float32), 0.0, 1.0)
    step = jnp.asarray(clip_lr, jnp.float32) * (fraction - jnp.asarray(target_quantile,
                                                                       jnp.float32))
    return jnp.asarray(clip_norm, jnp.float32) * jnp.exp(-step)


def _is_host_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool)


def split_noise_multiplier_host(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """Host-side :func:`split_noise_multiplier`, in float64, with the arguments checked.

    Args:
      noise_multiplier: σ ≥ 0, the multiplier the accountant sees.
      count_noise_multiplier: σ_b ≥ 0, the clipped count's noise standard deviation.

    Returns:
      σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2); 0.0 when σ = 0 (no noise asked for, nothing to
      split); σ when σ_b = inf.

    Raises:
      ValueError: naming ``dp_noise_multiplier`` when σ < 0 or not a number, or
        ``dp_count_noise_multiplier`` when σ_b < 0, not a number, or 2σ_b ≤ σ (then no
        positive σ_Δ exists).
    """
    sigma, sigma_b = float(noise_multiplier), float(count_noise_multiplier)
    if not sigma >= 0 or math.isinf(sigma):
        raise ValueError(f"dp_noise_multiplier must be a finite number >= 0, got {sigma!r}")
    if not sigma_b >= 0:
        raise ValueError(f"dp_count_noise_multiplier must be >= 0, got {sigma_b!r}")
    if sigma == 0:
        return 0.0
    if 2 * sigma_b <= sigma:
        raise ValueError(
            f"dp_count_noise_multiplier {sigma_b:g} must exceed dp_noise_multiplier / 2 = "
            f"{sigma / 2:g}: otherwise no update noise σ_Δ > 0 gives total multiplier "
            f"{sigma:g} (Andrew et al. 2021, Theorem 1); raise dp_count_noise_multiplier "
            "or lower dp_noise_multiplier")
    ratio = sigma / (2 * sigma_b)
    # σ (1 − (σ / 2σ_b)²)^(−1/2): the same as (σ⁻² − (2σ_b)⁻²)^(−1/2), better conditioned.
    return sigma / math.sqrt(1.0 - ratio * ratio)


def split_noise_multiplier(
    noise_multiplier: jax.Array | float, count_noise_multiplier: jax.Array | float
) -> jax.Array | float:
    """The update sum's noise multiplier σ_Δ when the clipped count takes σ_b.

    Andrew et al. 2021, Section 3, Theorem 1 (arXiv 1905.03871): one round of Algorithm 1
    with update noise multiplier σ_Δ and count noise σ_b (on a count of sensitivity ½, see
    :func:`noised_count`) is the Gaussian mechanism with multiplier
    σ = (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2), hence σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2). The accountant
    sees σ alone. TensorFlow Federated computes the same split
    (``tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive`` through
    ``adaptive_clip_noise_params``: ``(z**-2 - (2 * clipped_count_stddev)**-2)**-0.5``).

    Args:
      noise_multiplier: σ ≥ 0 (traced or not).
      count_noise_multiplier: σ_b ≥ 0 (traced or not).

    Returns:
      With two Python / NumPy numbers, :func:`split_noise_multiplier_host`'s float (its
      checks raise). Otherwise a float32 array: 0 where σ = 0, and NaN where 2σ_b ≤ σ
      (no positive σ_Δ exists; NaN noise makes the round's result NaN instead of silently
      under-noised).

    Raises:
      ValueError: only with host numbers, as :func:`split_noise_multiplier_host`.
    """
    if _is_host_number(noise_multiplier) and _is_host_number(count_noise_multiplier):
        return split_noise_multiplier_host(noise_multiplier, count_noise_multiplier)
    sigma = jnp.asarray(noise_multiplier, jnp.float32)
    sigma_b = jnp.asarray(count_noise_multiplier, jnp.float32)
    ratio = jnp.where(sigma == 0, 0.0, sigma / (2 * sigma_b))
    valid = (ratio < 1) & (sigma >= 0) & (sigma_b >= 0)
    # The root sees 1 where invalid, so the discarded branch computes no NaN.
    root = jnp.sqrt(jnp.where(valid, 1.0 - ratio * ratio, 1.0))
    return jnp.where(valid, sigma / root, jnp.nan)
