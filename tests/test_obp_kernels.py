"""Tests of the FedOBP kernels against plain numpy."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.kernels import obp

QS = (0.0, 0.1, 0.5, 0.9, 0.99, 0.9999, 1.0)

# Jitted once per static configuration: far fewer compilations than eager mode.
_mask = jax.jit(obp.quantile_mask, static_argnames=("q", "method"))
_threshold = jax.jit(obp.quantile_threshold, static_argnames=("q", "method"))
_normalize = jax.jit(obp.minmax_normalize, static_argnames="scope")


def _shapes(k):
    # Several leaves of unequal sizes, some smaller than a top-k block and some
    # not a multiple of it.
    return {
        "conv": {"kernel": (k, 3, 3, 2, 8), "bias": (k, 8)},
        "fc": {"kernel": (k, 37, 41), "bias": (k, 41)},
        "head": {"kernel": (k, 41, 5), "bias": (k, 5)},
    }


def _tree(rng, k, kind="uniform"):
    def leaf(shape):
        if kind == "uniform":
            return rng.random(shape, dtype=np.float32)
        if kind == "ties":
            return rng.integers(0, 6, shape).astype(np.float32)
        if kind == "normal":
            return rng.standard_normal(shape).astype(np.float32)
        if kind == "mixed":  # even clients continuous, odd clients integer-valued
            x = rng.random(shape, dtype=np.float32)
            x[1::2] = rng.integers(0, 6, x[1::2].shape)
            return x
        raise AssertionError(kind)

    return jax.tree.map(leaf, _shapes(k), is_leaf=lambda s: isinstance(s, tuple))


def _flat(tree, k):
    return np.concatenate([np.asarray(x).reshape(k, -1) for x in jax.tree.leaves(tree)], axis=1)


def _numpy_mask(tree, q, k, scope=None):
    """Reference: scores > np.quantile(in-scope elements of client k, q)."""
    leaves, treedef = jax.tree.flatten(tree)
    flags = [True] * len(leaves) if scope is None else treedef.flatten_up_to(scope)
    pool = np.concatenate(
        [np.asarray(x).reshape(k, -1) for x, f in zip(leaves, flags, strict=True) if f], axis=1
    )
    taus = [np.quantile(pool[i], q) for i in range(k)]
    out = []
    for x, f in zip(leaves, flags, strict=True):
        x = np.asarray(x)
        m = np.stack([x[i] > taus[i] for i in range(k)]) if f else np.zeros(x.shape, bool)
        out.append(m)
    return jax.tree.unflatten(treedef, out)


def _assert_tree_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ---------------------------------------------------------------------------- scores


def test_drift_scores_match_numpy():
    rng = np.random.default_rng(0)
    k = 4
    client = _tree(rng, k, "normal")
    glob = jax.tree.map(lambda x: rng.standard_normal(x.shape[1:]).astype(np.float32), client)
    for variant, ref in [
        ("drift_param", lambda c, g: np.abs((c - g) * c)),
        ("drift_sq", lambda c, g: (c - g) ** 2),
    ]:
        got = obp.obp_scores(client, glob, variant)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
        want = jax.tree.map(lambda c, g, ref=ref: ref(c, g[None]), client, glob)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)


def test_drift_scores_take_only_params():
    params = list(inspect.signature(obp.obp_scores).parameters)
    assert params == ["client_params", "global_params", "variant", "fisher"]
    rng = np.random.default_rng(1)
    k = 3
    client = _tree(rng, k, "normal")
    glob = jax.tree.map(lambda x: x[0] * 0.5, client)
    score = jax.jit(obp.obp_scores, static_argnames="variant")
    base = score(client, glob, variant="drift_sq")
    # Same params, same scores; changing client 0 leaves the others' scores alone.
    _assert_tree_equal(score(client, glob, variant="drift_sq"), base)
    moved = jax.tree.map(lambda x: x.copy(), client)
    moved["fc"]["kernel"][0] += 1.0
    other = score(moved, glob, variant="drift_sq")
    np.testing.assert_array_equal(np.asarray(other["fc"]["kernel"][1:]), base["fc"]["kernel"][1:])
    assert not np.array_equal(np.asarray(other["fc"]["kernel"][0]), base["fc"]["kernel"][0])


def test_fisher_variant_and_errors():
    rng = np.random.default_rng(2)
    k = 3
    client = _tree(rng, k)
    glob = jax.tree.map(lambda x: x[0], client)
    fisher = _tree(rng, k)
    _assert_tree_equal(obp.obp_scores(client, glob, "fisher", fisher=fisher), fisher)
    with pytest.raises(ValueError, match=r"drift_param.*drift_sq.*fisher"):
        obp.obp_scores(client, glob, "magnitude")
    with pytest.raises(ValueError, match="fisher"):
        obp.obp_scores(client, glob, "fisher")
    with pytest.raises(ValueError, match="only used"):
        obp.obp_scores(client, glob, "drift_sq", fisher=fisher)
    with pytest.raises(ValueError, match="shape"):
        obp.obp_scores(client, glob, "fisher", fisher=jax.tree.map(lambda x: x[:1], fisher))


def test_empirical_fisher_matches_numpy():
    rng = np.random.default_rng(3)
    k, n, d = 3, 7, 4

    def loss(params, x, y):
        return 0.5 * (x @ params["w"] + params["b"] - y) ** 2

    params = {"w": rng.standard_normal(d).astype(np.float32), "b": np.float32(0.3)}
    x = rng.standard_normal((k, n, d)).astype(np.float32)
    y = rng.standard_normal((k, n)).astype(np.float32)
    w = rng.random((k, n)).astype(np.float32)
    w[0, 3:] = 0.0  # padding
    w[2] = 0.0  # a client with no data
    fisher = jax.vmap(obp.empirical_fisher, in_axes=(None, None, 0, 0, 0))(loss, params, x, y, w)
    for i in range(k):
        r = x[i] @ params["w"] + params["b"] - y[i]
        tot = w[i].sum()
        want_w = (w[i][:, None] * (r[:, None] * x[i]) ** 2).sum(0) / max(tot, 1.0)
        want_b = (w[i] * r**2).sum() / max(tot, 1.0)
        np.testing.assert_allclose(np.asarray(fisher["w"][i]), want_w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(fisher["b"][i]), want_b, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(fisher["w"][2]) == 0)


# -------------------------------------------------------------------------- quantile


@pytest.mark.parametrize("q", QS)
def test_mask_equals_numpy_exactly(q):
    rng = np.random.default_rng(int(q * 1e4))
    k = 3 + QS.index(q) % 3  # K in 3..5
    scores = _tree(rng, k, "mixed")  # odd clients have many ties
    want = _numpy_mask(scores, q, k)
    want_count = sum(x.reshape(k, -1).sum(1) for x in jax.tree.leaves(want))
    for method in ("top_k", "sort"):
        got = _mask(scores, q=q, method=method)
        _assert_tree_equal(got, want)
        count = np.asarray(obp.personalized_fraction(got)) * _flat(scores, k).shape[1]
        np.testing.assert_array_equal(np.round(count), want_count)


def test_threshold_bitwise_equal_to_numpy_on_adjacent_floats():
    # Scores one ulp apart make τ land on or next to a score: the float32
    # interpolation must round exactly like numpy for the mask to match.
    rng = np.random.default_rng(4)
    k = 5
    ulp = np.float32(2.0**-23)
    for q in (*QS, 0.3137, 0.7071, 0.999):
        x = (1 + ulp * rng.integers(0, 3, (k, 157))).astype(np.float32)
        for method in ("top_k", "sort"):
            tau = np.asarray(_threshold({"s": x}, q=q, method=method))
            want = np.array([np.quantile(x[i], q) for i in range(k)])
            np.testing.assert_array_equal(tau, want)


def test_top_k_and_sort_paths_agree():
    # Scores in {0, 1, 2}: nearly every block maximum ties, the hard case for
    # the block preselection of the top-k path.
    rng = np.random.default_rng(5)
    k = 4
    scores = {"a": rng.integers(0, 3, (k, 5003)).astype(np.float32), "b": _tree(rng, k)}
    for q in (0.9995, 0.97):
        fast = _mask(scores, q=q, method="top_k")
        _assert_tree_equal(fast, _mask(scores, q=q, method="sort"))
        _assert_tree_equal(fast, _numpy_mask(scores, q, k))


def test_mask_under_jit():
    rng = np.random.default_rng(6)
    k = 3
    scores = _tree(rng, k)
    fn = jax.jit(functools.partial(obp.quantile_mask, q=0.99))
    _assert_tree_equal(fn(scores), _numpy_mask(scores, 0.99, k))


@pytest.mark.parametrize("q", [0.5, 0.99])
def test_head_scope(q):
    rng = np.random.default_rng(7)
    k = 4
    scores = _tree(rng, k)
    scope = obp.scope_mask_from_paths(scores, lambda path: "head" in path)
    assert scope == {
        "conv": {"kernel": False, "bias": False},
        "fc": {"kernel": False, "bias": False},
        "head": {"kernel": True, "bias": True},
    }
    for method in ("top_k", "sort"):
        fn = jax.jit(functools.partial(obp.quantile_mask, q=q, scope_mask=scope, method=method))
        got = fn(scores)
        for name in ("conv", "fc"):
            assert not any(np.asarray(x).any() for x in jax.tree.leaves(got[name]))
        _assert_tree_equal(got, _numpy_mask(scores, q, k, scope))
        assert np.asarray(obp.per_leaf_fraction(got)["head"]["kernel"]).min() > 0


def test_empty_scope_personalizes_nothing():
    rng = np.random.default_rng(8)
    k = 3
    scores = _tree(rng, k)
    none = jax.tree.map(lambda _: False, scores)
    got = obp.quantile_mask(scores, 0.5, scope_mask=none)
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(got))
    assert np.isnan(np.asarray(obp.quantile_threshold(scores, 0.5, scope_mask=none))).all()


def test_quantile_errors():
    scores = {"a": jnp.ones((3, 4))}
    for q in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            obp.quantile_mask(scores, q)
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda s, q: obp.quantile_mask(s, q))(scores, 0.5)
    with pytest.raises(ValueError, match="top_k"):
        obp.quantile_mask(scores, 0.5, method="histogram")
    with pytest.raises(TypeError, match="bool"):
        obp.quantile_mask(scores, 0.5, scope_mask={"a": jnp.array(True)})


# ---------------------------------------------------------------- normalize, ema, mix


def test_minmax_matches_numpy():
    rng = np.random.default_rng(9)
    k = 3
    scores = _tree(rng, k, "normal")
    scores["head"]["bias"][1] = 2.5  # constant leaf for client 1
    flat = _flat(scores, k)
    lo, hi = flat.min(1), flat.max(1)
    got = _normalize(scores, scope="global")
    for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(scores), strict=True):
        shape = (-1,) + (1,) * (x.ndim - 1)
        want = (x - lo.reshape(shape)) / (hi - lo).reshape(shape)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)
    got = _normalize(scores, scope="layer")
    for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(scores), strict=True):
        axes = tuple(range(1, x.ndim))
        lo_l, hi_l = x.min(axes, keepdims=True), x.max(axes, keepdims=True)
        rng_l = hi_l - lo_l
        want = np.where(rng_l > 0, (x - lo_l) / np.where(rng_l > 0, rng_l, 1), 0)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["head"]["bias"][1]), 0.0)
    _assert_tree_equal(obp.minmax_normalize(scores, "none"), scores)
    constant = obp.minmax_normalize({"a": jnp.full((2, 3), 7.0)}, "global")
    np.testing.assert_array_equal(np.asarray(constant["a"]), 0.0)
    with pytest.raises(ValueError, match="global"):
        obp.minmax_normalize(scores, "tensor")


def test_global_minmax_keeps_global_mask():
    # Dyadic scores whose per-client range is a power of two: normalization is
    # then exact, so any mask change would be a real bug, not rounding.
    rng = np.random.default_rng(10)
    k = 4
    scores = jax.tree.map(lambda x: x * 8, _tree(rng, k, "ties"))  # 0, 8, ..., 40
    scores["conv"]["kernel"].reshape(k, -1)[:, :2] = [0.0, 64.0]  # range 64 per client
    offset = 16.0 * np.arange(k, dtype=np.float32)  # per-client minimum
    scores = jax.tree.map(lambda x: x + offset.reshape((-1,) + (1,) * (x.ndim - 1)), scores)
    for q in (0.5, 0.99):
        _assert_tree_equal(_mask(_normalize(scores, scope="global"), q=q), _mask(scores, q=q))


def test_ema():
    rng = np.random.default_rng(11)
    new, old = _tree(rng, 3), _tree(rng, 3)
    got = obp.ema(new, old, 0.3)
    for g, n, o in zip(
        jax.tree.leaves(got), jax.tree.leaves(new), jax.tree.leaves(old), strict=True
    ):
        np.testing.assert_allclose(np.asarray(g), 0.7 * n + 0.3 * o, rtol=1e-6)
    _assert_tree_equal(obp.ema(new, old, 0.0), new)
    with pytest.raises(ValueError, match="alpha"):
        obp.ema(new, old, 1.5)


def test_mix_and_fractions():
    rng = np.random.default_rng(12)
    k = 5
    client = _tree(rng, k, "normal")
    glob = jax.tree.map(lambda x: rng.standard_normal(x.shape[1:]).astype(np.float32), client)
    mask = jax.tree.map(lambda x: rng.random(x.shape) < 0.3, client)
    got = obp.mix(mask, client, glob)
    for g, m, c, w in zip(*(jax.tree.leaves(t) for t in (got, mask, client, glob)), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.where(m, c, w[None]))
    flat = _flat(mask, k)
    np.testing.assert_allclose(np.asarray(obp.personalized_fraction(mask)), flat.mean(1), rtol=1e-6)
    fracs = obp.per_leaf_fraction(mask)
    for f, m in zip(jax.tree.leaves(fracs), jax.tree.leaves(mask), strict=True):
        assert f.shape == (k,)
        np.testing.assert_allclose(np.asarray(f), m.reshape(k, -1).mean(1), rtol=1e-6)


def test_constants():
    assert obp.VARIANTS == ("drift_param", "drift_sq", "fisher")
    assert obp.NORMS == ("global", "layer", "none")
    assert obp.SCOPES == ("all", "head")
