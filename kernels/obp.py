"""FedOBP element-wise personalization kernels.

Chen et al., "FedOBP: Federated Optimal Brain Personalization through Cloud-Edge
Element-wise Decoupling", arXiv 2604.16574. After aggregation the server scores
every element of every client's model, takes ONE quantile of those scores per
client, and lets each client keep its own value only where the score exceeds that
quantile; everywhere else the client takes the new global value.

Every function works on pytrees. ``client_params`` / ``scores`` / ``mask`` leaves
are shaped ``(K, ...)`` (K = clients); ``global_params`` leaves are the same
shapes without the client axis. All functions are pure and traceable under
``jax.jit`` / ``jax.vmap``; options documented as static must be Python values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

VARIANTS = ("drift_param", "drift_sq", "fisher")
NORMS = ("global", "layer", "none")
SCOPES = ("all", "head")
METHODS = ("auto", "top_k", "sort")

# ``method="auto"`` takes the top-k path when the m = n - floor(q (n - 1)) largest
# elements are at most this fraction of a client's n elements. Measured on XLA:CPU
# with the 582,026-element CNN (experiments/bench_quantile.py --sweep): the top-k
# path is 65-75x faster than the sort at q = 0.9999, 7x at q = 0.99, 1.5x at
# m / n = 0.2; from m / n = 0.5 on the two are even within timing noise.
TOP_K_MAX_FRACTION = 0.5


# --------------------------------------------------------------------------- scores


def obp_scores(
    client_params: PyTree,
    global_params: PyTree,
    variant: str = "drift_param",
    *,
    fisher: PyTree | None = None,
) -> PyTree:
    """Element-wise importance scores, one per parameter element and client.

    Variants (θ_k = client k's params, θ_g = global params):

    * ``"drift_param"``: |(θ_k − θ_g) ⊙ θ_k| (OBD saliency with the gradient
      approximated by the local–global drift; reference code v1).
    * ``"drift_sq"``: (θ_k − θ_g)² (reference code v2).
    * ``"fisher"``: the given per-client diagonal Fisher tree (see
      :func:`empirical_fisher`), returned as float32.

    The drift variants need only the stored models (no data, no gradients), so
    the server can compute them.

    Args:
      client_params: pytree, leaves (K, ...).
      global_params: same structure, leaves (...) (no client axis).
      variant: one of :data:`VARIANTS`.
      fisher: for ``variant="fisher"`` only: pytree like ``client_params``.

    Returns:
      Pytree like ``client_params``, float32 leaves (K, ...).

    Raises:
      ValueError: unknown variant, or ``fisher`` missing / given to a drift
        variant / shaped unlike ``client_params``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown score variant {variant!r}; valid: {VARIANTS}")
    if variant == "fisher":
        if fisher is None:
            raise ValueError('variant="fisher" needs fisher=<tree shaped like client_params>')

        def take(c, f):
            if jnp.shape(c) != jnp.shape(f):
                raise ValueError(f"fisher leaf shape {jnp.shape(f)} != params {jnp.shape(c)}")
            return jnp.asarray(f, jnp.float32)

        return jax.tree.map(take, client_params, fisher)
    if fisher is not None:
        raise ValueError(f"fisher is only used by variant='fisher', not {variant!r}")

    def drift_param(c, g):
        c = jnp.asarray(c, jnp.float32)
        return jnp.abs((c - jnp.asarray(g, jnp.float32)) * c)

    def drift_sq(c, g):
        return jnp.square(jnp.asarray(c, jnp.float32) - jnp.asarray(g, jnp.float32))

    fn = drift_param if variant == "drift_param" else drift_sq
    return jax.tree.map(fn, client_params, global_params)


def empirical_fisher(
    per_example_loss_fn: Callable[[PyTree, jax.Array, jax.Array], jax.Array],
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
) -> PyTree:
    """Weighted empirical Fisher diagonal of ONE client: Σ_i w_i g_i² / Σ_i w_i.

    Per-example gradients g_i come from ``vmap(grad(per_example_loss_fn))``, so
    memory grows as N × |θ|; vmap this function over clients for (K, ...) output.
    Zero weights mark padding: those examples contribute nothing even if their
    gradients are not finite, and a client with no weight gets zeros.

    Args:
      per_example_loss_fn: ``(params, x_i, y_i) -> scalar`` loss of one example.
      params: pytree of the client's parameters, leaves (...).
      x: (N, ...) inputs.
      y: (N, ...) targets.
      weights: (N,) non-negative example weights (e.g. the padding mask).

    Returns:
      Pytree like ``params``, float32 leaves (...).
    """
    grads = jax.vmap(jax.grad(per_example_loss_fn), in_axes=(None, 0, 0))(params, x, y)
    w = jnp.asarray(weights, jnp.float32)
    live = w > 0
    total = jnp.sum(w)
    # Double where: no 0/0 in the forward pass and no NaN leaking into gradients.
    safe_total = jnp.where(total > 0, total, 1.0)

    def reduce(g):
        g2 = jnp.square(jnp.asarray(g, jnp.float32))
        g2 = jnp.where(live.reshape((-1,) + (1,) * (g2.ndim - 1)), g2, 0.0)
        num = jnp.tensordot(w, g2, axes=1)
        return jnp.where(total > 0, num / safe_total, 0.0)

    return jax.tree.map(reduce, grads)


def ema(new_scores: PyTree, old_scores: PyTree, alpha: float | jax.Array) -> PyTree:
    """Exponential moving average of scores: (1 − alpha)·new + alpha·old.

    Matches the reference ``I_ema ← (1 − a)·I + a·I_ema``.

    Args:
      new_scores: pytree, leaves (K, ...).
      old_scores: same structure and shapes.
      alpha: weight of the old scores, in [0, 1]; a Python number or a scalar
        array (traced values are not range-checked).

    Returns:
      Pytree like ``new_scores``.

    Raises:
      ValueError: a Python ``alpha`` outside [0, 1].
    """
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return jax.tree.map(lambda n, o: (1 - alpha) * n + alpha * o, new_scores, old_scores)


def minmax_normalize(scores: PyTree, scope: str = "global") -> PyTree:
    """Per-client min-max normalization of scores to [0, 1].

    ``"global"`` uses one (min, max) per client over all its elements; it is
    affine per client, so it leaves a global quantile mask unchanged (up to
    float rounding merging near-equal scores). ``"layer"`` uses one (min, max)
    per client and leaf. ``"none"`` returns the scores as float32. A constant
    range (max == min) maps to zeros.

    Args:
      scores: pytree, leaves (K, ...).
      scope: static, one of :data:`NORMS`.

    Returns:
      Pytree like ``scores``, float32 leaves (K, ...).

    Raises:
      ValueError: unknown scope.
    """
    if scope not in NORMS:
        raise ValueError(f"unknown normalization {scope!r}; valid: {NORMS}")
    leaves, treedef = jax.tree.flatten(scores)
    leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
    if scope == "none" or not leaves:
        return jax.tree.unflatten(treedef, leaves)

    def lo_hi(x):
        axes = tuple(range(1, x.ndim))
        return jnp.min(x, axis=axes), jnp.max(x, axis=axes)

    def scale(x, lo, hi):
        shape = (-1,) + (1,) * (x.ndim - 1)
        lo, rng = lo.reshape(shape), (hi - lo).reshape(shape)
        return jnp.where(rng > 0, (x - lo) / jnp.where(rng > 0, rng, 1.0), 0.0)

    if scope == "layer":
        out = [scale(x, *lo_hi(x)) if x.size else x for x in leaves]
    else:
        stats = [lo_hi(x) for x in leaves if x.size]
        if not stats:
            return jax.tree.unflatten(treedef, leaves)
        lo = jnp.min(jnp.stack([s[0] for s in stats]), axis=0)
        hi = jnp.max(jnp.stack([s[1] for s in stats]), axis=0)
        out = [scale(x, lo, hi) if x.size else x for x in leaves]
    return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------- quantile


def scope_mask_from_paths(tree: PyTree, predicate: Callable[[str], bool]) -> PyTree:
    """Builds a per-leaf scope for :func:`quantile_mask` from leaf paths.

    Example: ``scope_mask_from_paths(global_params, lambda p: "head" in p)``
    selects the classifier leaves of a model whose head module is named
    ``head`` (the ``scope="head"`` of FedOBP).

    Args:
      tree: any pytree with the parameter structure (with or without K axis).
      predicate: called with each leaf's ``jax.tree_util.keystr`` path, e.g.
        ``"['params']['head']['kernel']"``; True = the leaf is in scope.

    Returns:
      Pytree of the same structure with Python bool leaves.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(predicate(jax.tree_util.keystr(path))), tree
    )


def _quantile_plan(n: int, q: float) -> tuple[int, int, float]:
    """(lo, hi, t) as numpy's linear method computes them for n sorted values.

    Mirrors numpy 2's ``_get_indexes`` / ``_get_gamma``, including the clamped
    case p >= n − 1 where both indexes become n − 1 and gamma is p + 1.
    """
    p = (n - 1) * q
    if p >= n - 1:
        return n - 1, n - 1, p + 1.0
    lo = math.floor(p)
    return lo, lo + 1, p - lo


def _lerp_like_numpy(a: jax.Array, b: jax.Array, t: float) -> jax.Array:
    """numpy's ``_lerp`` for float32 a, b and a Python-float weight t.

    numpy (NEP 50) rounds t and 1 − t to float32 and interpolates in float32,
    taking the form anchored at b when t >= 0.5. The products go through an
    optimization barrier so the backend cannot fuse them into an FMA, whose
    single rounding could move τ by one ulp across a tied score.
    """
    d = b - a
    if t >= 0.5:
        return b - jax.lax.optimization_barrier(d * np.float32(1.0 - t))
    return a + jax.lax.optimization_barrier(d * np.float32(t))


def _top_m_values(parts: list[jax.Array], m: int) -> jax.Array:
    """The m largest values of each client over several (K, n_l) pieces, descending.

    A plain ``lax.top_k`` over n elements costs about as much as a full sort on
    XLA:CPU, so each piece is cut into blocks and only the m blocks with the
    largest maxima are searched. This is exact: an element among the top m is
    >= the m-th largest block maximum, so its block is chosen unless that
    block's maximum ties that value, and then the chosen blocks still hold
    enough copies of the tied value. Blocks never straddle pieces, so the
    pieces are never concatenated (a copy as large as the scores).

    Args:
      parts: non-empty (K, n_l) float32 arrays, Σ n_l = n >= m >= 1.
      m: static count.

    Returns:
      (K, m) float32, descending.
    """
    k = parts[0].shape[0]
    n = sum(p.shape[1] for p in parts)
    # Balances the block-max selection (n / block) and the candidate search
    # (m · block): both are about sqrt(n · m).
    block = max(1, round(math.sqrt(n / m)))
    counts = [-(-p.shape[1] // block) for p in parts]
    if block == 1 or sum(counts) <= m:
        flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return jax.lax.top_k(flat, m)[0]
    maxima = []
    for p in parts:
        n_l = p.shape[1]
        full = n_l // block
        if full:
            maxima.append(jnp.max(p[:, : full * block].reshape(k, full, block), axis=2))
        if full * block < n_l:
            maxima.append(jnp.max(p[:, full * block :], axis=1, keepdims=True))
    _, chosen = jax.lax.top_k(jnp.concatenate(maxima, axis=1), m)  # (K, m) block ids
    offsets = jnp.arange(block)
    cand = jnp.full((k, m, block), -jnp.inf, jnp.float32)
    first = 0
    for p, count in zip(parts, counts, strict=True):
        n_l = p.shape[1]
        local = chosen - first
        pos = local[:, :, None] * block + offsets  # (K, m, block)
        # Slots past the end of a short last block read as -inf, which can
        # never push a real value out of the top m.
        ok = (local[:, :, None] >= 0) & (local[:, :, None] < count) & (pos < n_l)
        got = jnp.take_along_axis(p, jnp.clip(pos, 0, n_l - 1).reshape(k, -1), axis=1)
        cand = jnp.where(ok, got.reshape(k, m, block), cand)
        first += count
    return jax.lax.top_k(cand.reshape(k, m * block), m)[0]


def _check_q(q: float) -> float:
    try:
        q = float(q)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"q must be a static Python float in [0, 1], got {q!r}") from None
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    return q


def _scoped_leaves(scores: PyTree, scope_mask: PyTree | None):
    leaves, treedef = jax.tree.flatten(scores)
    if scope_mask is None:
        flags = [True] * len(leaves)
    else:
        flags = treedef.flatten_up_to(scope_mask)
        for f in flags:
            if not isinstance(f, (bool, np.bool_)):
                raise TypeError(
                    f"scope_mask leaves must be Python bools (one per leaf), got {type(f)}"
                )
        flags = [bool(f) for f in flags]
    return leaves, treedef, flags


def quantile_threshold(
    scores: PyTree,
    q: float,
    *,
    scope_mask: PyTree | None = None,
    method: str = "auto",
) -> jax.Array:
    """Per-client q-quantile τ_k over all in-scope score elements of client k.

    Bit-for-bit equal to ``np.quantile(flat_k, q)`` (numpy >= 2, default linear
    method, float32 ``flat_k``, Python-float ``q``): the same two order
    statistics, interpolated in float32 the way numpy does. Scores must not
    contain NaN.

    Args:
      scores: pytree, leaves (K, ...); compared as float32.
      q: static Python float in [0, 1].
      scope_mask: optional pytree with the structure of ``scores`` and one
        Python bool per leaf (no client axis); only True leaves enter the
        quantile. See :func:`scope_mask_from_paths`.
      method: static; ``"top_k"`` selects the m = n − floor(q (n − 1))
        largest elements per client (fast when m ≪ n), ``"sort"`` sorts each
        client's elements, ``"auto"`` uses top_k when m <= TOP_K_MAX_FRACTION · n.

    Returns:
      (K,) float32 thresholds; NaN for a client with no in-scope element.

    Raises:
      ValueError: q not a Python number in [0, 1], unknown method.
      TypeError: scope_mask leaves that are not Python bools.
    """
    q = _check_q(q)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    leaves, _, flags = _scoped_leaves(scores, scope_mask)
    if not leaves:
        raise ValueError("scores has no leaves")
    k = jnp.shape(leaves[0])[0]
    parts = [
        jnp.asarray(x, jnp.float32).reshape(k, -1) for x, f in zip(leaves, flags, strict=True) if f
    ]
    parts = [p for p in parts if p.shape[1]]
    n = sum(p.shape[1] for p in parts)
    if n == 0:
        return jnp.full((k,), jnp.nan, jnp.float32)
    lo, hi, t = _quantile_plan(n, q)
    m = n - lo
    if method == "auto":
        method = "top_k" if m <= TOP_K_MAX_FRACTION * n else "sort"
    if method == "top_k":
        top = _top_m_values(parts, m)  # top[j] = sorted[n - 1 - j]
        a, b = top[:, m - 1], top[:, n - 1 - hi]
    else:
        flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        ordered = jnp.sort(flat, axis=1)
        a, b = ordered[:, lo], ordered[:, hi]
    return _lerp_like_numpy(a, b, t)


def quantile_mask(
    scores: PyTree,
    q: float,
    *,
    scope_mask: PyTree | None = None,
    method: str = "auto",
) -> PyTree:
    """FedOBP mask: True where a client keeps its own (personalized) element.

    For each client k, τ_k = q-quantile of its in-scope scores (see
    :func:`quantile_threshold`), and an element is personalized iff it is in
    scope and its score > τ_k, exactly as ``scores > np.quantile(...)``; ties at
    τ_k stay global. Leaves outside ``scope_mask`` are never personalized.

    Jit with q, method and scope_mask static, e.g.
    ``jax.jit(functools.partial(quantile_mask, q=0.9999, scope_mask=s))``.

    Args:
      scores: pytree, leaves (K, ...).
      q: static Python float in [0, 1]; the personalized fraction is about 1 − q.
      scope_mask: optional pytree of Python bools, one per leaf of ``scores``
        (no client axis). ``None`` = every leaf.
      method: static, one of :data:`METHODS`.

    Returns:
      Pytree like ``scores`` with bool leaves (K, ...).

    Raises:
      ValueError: q not a Python number in [0, 1], unknown method.
      TypeError: scope_mask leaves that are not Python bools.
    """
    tau = quantile_threshold(scores, q, scope_mask=scope_mask, method=method)
    leaves, treedef, flags = _scoped_leaves(scores, scope_mask)

    def leaf_mask(x, in_scope):
        if not in_scope:
            return jnp.zeros(jnp.shape(x), bool)
        x = jnp.asarray(x, jnp.float32)
        return x > tau.reshape((-1,) + (1,) * (x.ndim - 1))

    return jax.tree.unflatten(
        treedef, [leaf_mask(x, f) for x, f in zip(leaves, flags, strict=True)]
    )


# ----------------------------------------------------------------------- mix, stats


def mix(mask: PyTree, client_params: PyTree, global_params: PyTree) -> PyTree:
    """Element-wise merge: client value where ``mask`` is True, global elsewhere.

    Args:
      mask: pytree of bool leaves (K, ...).
      client_params: same structure, leaves (K, ...).
      global_params: same structure, leaves (...) broadcast over K.

    Returns:
      Pytree like ``client_params`` (its dtypes).
    """

    def pick(m, c, g):
        c = jnp.asarray(c)
        return jnp.where(m, c, jnp.asarray(g, c.dtype))

    return jax.tree.map(pick, mask, client_params, global_params)


def _counts(x: jax.Array) -> jax.Array:
    k = jnp.shape(x)[0]
    return jnp.sum(jnp.reshape(x, (k, -1)), axis=1, dtype=jnp.int32)


def personalized_fraction(mask: PyTree) -> jax.Array:
    """Fraction of personalized elements per client, over all leaves.

    Args:
      mask: pytree of bool leaves (K, ...).

    Returns:
      (K,) float32; zeros if the tree has no elements.
    """
    leaves = jax.tree.leaves(mask)
    k = jnp.shape(leaves[0])[0]
    total = sum(math.prod(jnp.shape(x)[1:]) for x in leaves)
    if total == 0:
        return jnp.zeros((k,), jnp.float32)
    count = sum(_counts(x) for x in leaves)
    return count.astype(jnp.float32) / total


def per_leaf_fraction(mask: PyTree) -> PyTree:
    """Fraction of personalized elements per client and leaf.

    Args:
      mask: pytree of bool leaves (K, ...).

    Returns:
      Pytree like ``mask`` with float32 leaves (K,); 0 for empty leaves.
    """

    def frac(x):
        size = math.prod(jnp.shape(x)[1:])
        if size == 0:
            return jnp.zeros((jnp.shape(x)[0],), jnp.float32)
        return _counts(x).astype(jnp.float32) / size

    return jax.tree.map(frac, mask)
