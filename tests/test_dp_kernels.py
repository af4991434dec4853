"""Tests of the user-level DP kernels (kernels/dp.py) against plain NumPy."""

from __future__ import annotations

import functools

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_sim.kernels import dp

ROWS = 8
CLIP = 1.5

# Jitted once per shape: far fewer compilations than op-by-op eager mode.
_clip_rows = jax.jit(dp.clip_rows)
_noised_sum = jax.jit(dp.noised_sum)
_noised_count = jax.jit(dp.noised_count)


def _updates(seed: int = 0, rows: int = ROWS) -> dict:
    """Rows of very different norms over leaves of unequal shapes; row 3 is zero, row 5
    has norm exactly CLIP * 0.5 and row 6 norm exactly 5 (a 3-4-5 row)."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.01, 0.3, 1.0, 0.0, 3.0, 1.0, 1.0, 40.0], np.float32)[:rows]
    tree = {
        "conv": rng.standard_normal((rows, 3, 4)).astype(np.float32),
        "bias": rng.standard_normal((rows, 5)).astype(np.float32),
        "head": {"kernel": rng.standard_normal((rows, 2, 3)).astype(np.float32)},
    }
    tree = jax.tree.map(lambda x: x * scales.reshape((-1,) + (1,) * (x.ndim - 1)), tree)
    for leaf in jax.tree.leaves(tree):
        leaf[5] = 0.0
        leaf[6] = 0.0
    tree["bias"][5, 0] = CLIP * 0.5
    tree["bias"][6, :2] = [3.0, 4.0]
    return tree


def _flat(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves],
                          axis=1)


def _numpy_clip(tree, clip):
    norms = np.linalg.norm(_flat(tree), axis=1)
    factor = np.where(norms > clip, clip / np.where(norms > 0, norms, 1.0), 1.0)
    clipped = jax.tree.map(
        lambda x: np.asarray(x, np.float64) * factor.reshape((-1,) + (1,) * (x.ndim - 1)), tree)
    return clipped, norms


def _row_bits_equal(a, b, row) -> bool:
    def bits(x):
        return np.asarray(x)[row].view(np.uint32)

    return all(np.array_equal(bits(x), bits(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---- clip_rows -------------------------------------------------------------------------


def test_clip_rows_matches_numpy_and_keeps_short_rows_bit_for_bit():
    tree = _updates()
    clipped, norms = dp.clip_rows(tree, CLIP)  # eager once
    want, want_norms = _numpy_clip(tree, CLIP)

    assert norms.shape == (ROWS,) and norms.dtype == jnp.float32
    np.testing.assert_allclose(norms, want_norms, rtol=1e-6)
    for got, ref in zip(jax.tree.leaves(clipped), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), clipped) == jax.tree.map(
        lambda x: (x.shape, jnp.asarray(x).dtype), tree)

    new_norms = np.linalg.norm(_flat(clipped), axis=1)
    assert np.all(new_norms <= CLIP * (1 + 1e-6))
    for row in range(ROWS):
        if want_norms[row] <= CLIP:
            assert _row_bits_equal(clipped, tree, row), row
        else:
            assert new_norms[row] == pytest.approx(CLIP, rel=1e-6), row
    assert (want_norms > CLIP).sum() >= 2 and (want_norms <= CLIP).sum() >= 3


def test_clip_rows_boundary_row_is_kept():
    # Row 6 has norm exactly 5 in float32: with C = 5 it is not clipped.
    tree = _updates()
    clipped, norms = _clip_rows(tree, 5.0)
    assert float(norms[6]) == 5.0
    assert _row_bits_equal(clipped, tree, 6)


def test_clip_rows_infinite_clip_leaves_everything_unchanged():
    tree = _updates()
    clipped, norms = _clip_rows(tree, jnp.inf)
    assert all(_row_bits_equal(clipped, tree, row) for row in range(ROWS))
    assert np.all(np.isfinite(norms))


@pytest.mark.parametrize("clip", [CLIP, np.inf, 1e-30])
def test_clip_rows_zero_rows_stay_zero_without_nan(clip):
    tree = jax.tree.map(np.zeros_like, _updates())
    clipped, norms = _clip_rows(tree, clip)
    assert np.all(np.asarray(norms) == 0)
    for leaf in jax.tree.leaves(clipped):
        assert not np.any(np.isnan(leaf)) and np.all(np.asarray(leaf) == 0)


def test_clip_rows_jit_with_traced_clip_compiles_once():
    tree = _updates()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def clip(t, c):
        return dp.clip_rows(t, c)

    for value in (0.2, CLIP, 7.0):
        got, got_norms = clip(tree, jnp.float32(value))
        want, want_norms = dp.clip_rows(tree, value)
        np.testing.assert_allclose(got_norms, want_norms, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
        assert np.all(np.linalg.norm(_flat(got), axis=1) <= value * (1 + 1e-6))


def test_clip_rows_checks_the_row_axis():
    with pytest.raises(AssertionError):
        dp.clip_rows({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}, 1.0)


# ---- noised_sum ------------------------------------------------------------------------

PRESENT = np.array([True, False, True, True, False, True, True, False])


def _masked_sum(tree, present):
    return jax.tree.map(
        lambda x: jnp.sum(jnp.where(present.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), 0),
        tree)


def test_noised_sum_with_zero_stddev_is_the_masked_sum_bit_for_bit():
    tree, _ = _clip_rows(_updates(), CLIP)
    present = jnp.asarray(PRESENT)
    # A traced zero, under jit as in the round, against the masked sum jitted alike.
    got = _noised_sum(tree, present, jax.random.key(0), jnp.float32(0))
    want = jax.jit(_masked_sum)(tree, present)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    numpy_sum = jax.tree.map(lambda x: np.asarray(x, np.float64)[PRESENT].sum(0), tree)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(numpy_sum), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_noised_sum_absent_rows_do_not_contribute_even_nan():
    tree, _ = _clip_rows(_updates(), CLIP)
    poisoned = jax.tree.map(
        lambda x: jnp.where(jnp.asarray(~PRESENT).reshape((-1,) + (1,) * (x.ndim - 1)),
                            jnp.nan, x), tree)
    for stddev in (0.0, 0.8):
        clean = _noised_sum(tree, PRESENT, jax.random.key(3), stddev)
        dirty = _noised_sum(poisoned, PRESENT, jax.random.key(3), stddev)
        for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty), strict=True):
            np.testing.assert_array_equal(a, b)
    # None means every row.
    every = _noised_sum(tree, None, jax.random.key(0), 0.0)
    want = _masked_sum(tree, jnp.ones(ROWS, bool))
    for a, b in zip(jax.tree.leaves(every), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_noised_sum_same_key_same_noise_other_key_other_noise():
    tree, _ = _clip_rows(_updates(), CLIP)
    first = _noised_sum(tree, PRESENT, jax.random.key(7), 0.5)
    again = _noised_sum(tree, PRESENT, jax.random.key(7), 0.5)
    other = _noised_sum(tree, PRESENT, jax.random.key(8), 0.5)
    for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(again), jax.tree.leaves(other),
                       strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.asarray(a) != np.asarray(c))
    # Raw (uint32) keys work too.
    raw = _noised_sum(tree, PRESENT, jax.random.PRNGKey(7), 0.5)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(raw))


def test_noised_sum_noise_has_the_stated_stddev_and_independent_leaves():
    # 20,000 draws over zero updates: the result is the noise alone. Two leaves of the
    # same shape would draw equal noise if the key were not split over the leaves.
    draws, stddev = 20_000, 0.7
    zeros = {"a": jnp.zeros((2, 3, 4)), "b": jnp.zeros((2, 3, 4)), "c": jnp.zeros((2, 5))}
    keys = jax.random.split(jax.random.key(42), draws)
    noise = jax.jit(jax.vmap(lambda k: dp.noised_sum(zeros, jnp.ones(2, bool), k, stddev)))(keys)
    flat = np.concatenate([np.asarray(x).reshape(draws, -1) for x in jax.tree.leaves(noise)],
                          axis=1)
    per_coordinate = flat.std(axis=0)
    # Each coordinate's std from 20,000 draws is within ±0.5% (1 s.e.): 3% is 6 s.e.
    np.testing.assert_allclose(per_coordinate, stddev, rtol=0.03)
    assert flat.std() == pytest.approx(stddev, rel=0.005)
    assert np.all(np.abs(flat.mean(axis=0)) < 5 * stddev / np.sqrt(draws))
    correlation = np.corrcoef(flat[:, :6].T, flat[:, 12:18].T)[:6, 6:]
    assert np.all(np.abs(correlation) < 0.04)  # 1 s.e. ≈ 0.007
    assert not np.allclose(np.asarray(noise["a"]), np.asarray(noise["b"]))


def test_noised_sum_nan_stddev_is_not_silently_noiseless():
    tree, _ = _clip_rows(_updates(), CLIP)
    got = _noised_sum(tree, PRESENT, jax.random.key(0), jnp.nan)
    assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(got))


# ---- noised_count and the geometric update ---------------------------------------------

NORMS = np.array([0.5, 1.5, 2.0, 0.0, 3.0, 1.49, 1.51, 40.0], np.float32)


def test_noised_count_without_noise_matches_numpy():
    for clip in (0.1, 1.5, 2.0, np.inf):
        want = float(np.sum(PRESENT & (NORMS <= clip)))
        got = dp.noised_count(NORMS, PRESENT, clip, jax.random.key(0), 0.0)
        assert got.dtype == jnp.float32 and float(got) == want
        centred = dp.noised_count(NORMS, PRESENT, clip, jax.random.key(0), 0.0,
                                  expected_count=6.0)
        assert float(centred) == want + 0.5 * (6.0 - PRESENT.sum())


def test_noised_count_with_expected_count_moves_by_half_per_client():
    # Adding or removing one client moves the centred count by exactly ½: the
    # sensitivity Theorem 1's 2σ_b assumes. The plain count moves by 1 or 0.
    for row in range(ROWS):
        without = PRESENT.copy()
        without[row] = False
        with_row = without.copy()
        with_row[row] = True
        centred = [float(dp.noised_count(NORMS, p, CLIP, jax.random.key(0), 0.0,
                                         expected_count=4.0)) for p in (without, with_row)]
        plain = [float(dp.noised_count(NORMS, p, CLIP, jax.random.key(0), 0.0))
                 for p in (without, with_row)]
        assert abs(centred[1] - centred[0]) == 0.5
        assert plain[1] - plain[0] == float(NORMS[row] <= CLIP)


def test_noised_count_noise_statistics():
    draws, stddev = 20_000, 2.0
    keys = jax.random.split(jax.random.key(1), draws)
    counts = jax.jit(jax.vmap(lambda k: dp.noised_count(NORMS, PRESENT, CLIP, k, stddev)))(keys)
    exact = float(np.sum(PRESENT & (NORMS <= CLIP)))
    assert np.std(counts) == pytest.approx(stddev, rel=0.03)
    assert abs(np.mean(counts) - exact) < 5 * stddev / np.sqrt(draws)


def test_geometric_clip_update_matches_numpy():
    rng = np.random.default_rng(0)
    clip = rng.uniform(0.01, 10, 50).astype(np.float32)
    fraction = rng.uniform(-0.5, 1.5, 50).astype(np.float32)  # noise leaves [0, 1]
    gamma = rng.uniform(0, 1, 50).astype(np.float32)
    lr = rng.uniform(0, 1, 50).astype(np.float32)
    got = jax.jit(jax.vmap(dp.geometric_clip_update))(clip, fraction, gamma, lr)
    want = clip * np.exp(-lr.astype(np.float64) * (np.clip(fraction, 0, 1) - gamma))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(dp.geometric_clip_update(2.0, 0.3, 0.3, 0.2)) == 2.0
    assert float(dp.geometric_clip_update(2.0, 0.9, 0.5, 0.0)) == 2.0


_POPULATION = 2000
_LOGNORMAL = np.random.default_rng(0).lognormal(0.0, 0.7, _POPULATION).astype(np.float32)


@functools.partial(jax.jit, static_argnames="rate")
def _adapt(key, target_quantile, count_stddev, rate, rounds=300, clip_lr=0.2, start=0.1):
    """``rounds`` rounds of Andrew et al.'s Algorithm 1 clip update over the lognormal
    population: the members (all, or Poisson at ``rate``) report b_k, the server adds
    count noise, divides by the expected cohort and steps C."""
    norms = jnp.asarray(_LOGNORMAL)
    expected = rate * _POPULATION

    def one_round(clip, round_key):
        sample_key, noise_key = jax.random.split(round_key)
        present = (jnp.ones(_POPULATION, bool) if rate == 1.0
                   else jax.random.bernoulli(sample_key, rate, (_POPULATION,)))
        count = dp.noised_count(norms, present, clip, noise_key, count_stddev,
                                expected_count=expected)
        new = dp.geometric_clip_update(clip, count / expected, target_quantile, clip_lr)
        return new, new

    return jax.lax.scan(one_round, jnp.float32(start), jax.random.split(key, rounds))[1]


@pytest.mark.parametrize("target_quantile", [0.2, 0.5, 0.8])
def test_geometric_update_converges_to_the_target_quantile(target_quantile):
    want = np.quantile(_LOGNORMAL, target_quantile)
    keys = jax.random.split(jax.random.key(0), 8)
    # No noise, every client: within 5% of the empirical quantile after 300 rounds
    # (measured: within 0.3%).
    exact = _adapt(keys[0], target_quantile, 0.0, 1.0)
    assert float(exact[-1]) == pytest.approx(want, rel=0.05)
    # Poisson cohorts of expected size 200 and count noise σ_b = 200 / 20 (the default):
    # the noised fraction moves by ~0.05 a round, so C wanders; within 15% for each of 8
    # seeds (measured over 50 seeds: at most 7%).
    noisy = jax.vmap(lambda k: _adapt(k, target_quantile, 200 / 20, 0.1))(keys)
    np.testing.assert_allclose(np.asarray(noisy[:, -1]), want, rtol=0.15)


# ---- the noise split -------------------------------------------------------------------

SPLITS = [(0.5, 1.0), (1.0, 5.0), (1.1, 0.6), (3.0, 1.6), (0.8, 100.0), (1e-3, 0.05)]


def _formula(sigma, sigma_b):
    return (sigma ** -2.0 - (2.0 * sigma_b) ** -2.0) ** -0.5


@pytest.mark.parametrize(("sigma", "sigma_b"), SPLITS)
def test_split_noise_multiplier_is_andrew_et_al_theorem_1(sigma, sigma_b):
    want = _formula(sigma, sigma_b)
    host = dp.split_noise_multiplier_host(sigma, sigma_b)
    assert isinstance(host, float) and host == pytest.approx(want, rel=1e-12)
    assert dp.split_noise_multiplier(sigma, sigma_b) == host  # host numbers → host path
    traced = jax.jit(dp.split_noise_multiplier)(jnp.float32(sigma), jnp.float32(sigma_b))
    assert traced.dtype == jnp.float32
    want32 = _formula(float(np.float32(sigma)), float(np.float32(sigma_b)))
    assert float(traced) == pytest.approx(want32, rel=2e-6)
    assert host > sigma  # the update sum always takes more noise than σ


def test_split_noise_multiplier_near_the_limit():
    # 2σ_b just above σ: σ_Δ is large but finite, and the float64 host form stays exact.
    sigma, sigma_b = 2.0, 1.0 + 1e-7
    assert dp.split_noise_multiplier_host(sigma, sigma_b) == pytest.approx(
        _formula(sigma, sigma_b), rel=1e-8)
    assert dp.split_noise_multiplier_host(sigma, sigma_b) > 1000 * sigma


def test_split_noise_multiplier_edges():
    assert dp.split_noise_multiplier_host(0.0, 0.0) == 0.0
    assert dp.split_noise_multiplier_host(1.3, np.inf) == 1.3
    assert float(dp.split_noise_multiplier(jnp.float32(0), jnp.float32(0))) == 0.0
    assert float(dp.split_noise_multiplier(jnp.float32(1.3), jnp.inf)) == pytest.approx(1.3)
    for sigma, sigma_b in [(1.0, 0.5), (1.0, 0.2), (1.0, 0.0), (-1.0, 1.0)]:
        assert np.isnan(dp.split_noise_multiplier(jnp.float32(sigma), jnp.float32(sigma_b)))


@pytest.mark.parametrize(("sigma", "sigma_b", "name"), [
    (1.0, 0.5, "dp_count_noise_multiplier"),
    (1.0, 0.1, "dp_count_noise_multiplier"),
    (1.0, -1.0, "dp_count_noise_multiplier"),
    (1.0, float("nan"), "dp_count_noise_multiplier"),
    (-0.1, 1.0, "dp_noise_multiplier"),
    (float("inf"), 1.0, "dp_noise_multiplier"),
])
def test_split_noise_multiplier_host_rejects_impossible_splits(sigma, sigma_b, name):
    with pytest.raises(ValueError, match=name) as error:
        dp.split_noise_multiplier_host(sigma, sigma_b)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=name):
        dp.split_noise_multiplier(sigma, sigma_b)


def _rdp_epsilon(event, delta=1e-5):
    return rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(delta)


@pytest.mark.parametrize(("sigma", "sigma_b"), [(0.7, 1.0), (1.1, 5.0), (2.5, 2.0)])
def test_split_costs_what_sigma_alone_costs(sigma, sigma_b):
    # The count has sensitivity ½, so its noise σ_b is a Gaussian mechanism of
    # multiplier 2σ_b (see noised_count); both see the same cohort, so one round is the
    # sampled composition of the two.
    sigma_delta = dp.split_noise_multiplier_host(sigma, sigma_b)
    pair = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma_delta),
                                          dp_accounting.GaussianDpEvent(2 * sigma_b)])
    alone = dp_accounting.GaussianDpEvent(sigma)
    assert _rdp_epsilon(pair) == pytest.approx(_rdp_epsilon(alone), rel=1e-6)

    def sampled(event):
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.05, event), 200)

    assert _rdp_epsilon(sampled(pair)) == pytest.approx(_rdp_epsilon(sampled(alone)), rel=1e-6)
