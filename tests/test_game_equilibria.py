"""Equilibria of the data-sharing game on value curves that are not concave: the
mechanism's largest fixed point on a curve with a plateau, and the range of the naive
scheme's equilibrium totals, each against a brute-force NumPy reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedjax_sim import incentives as inc

# --- NumPy references (brute force over the definitions) --------------------------------


def ref_solo_utilities(m, v, costs, caps):
    """max_{x in [0, n_i]} v(x) − c_i x on integers: exact when v's breakpoints and the
    caps are integers (a piecewise-linear function peaks at a breakpoint or an end)."""
    return np.array([np.max(np.interp(np.arange(n + 1.0), m, v) - c * np.arange(n + 1.0))
                     for c, n in zip(costs, caps, strict=True)])


def ref_largest_fixed_point(m, v, costs, caps):
    """The largest M in [0, Σ n_i] with Σ_i min(n_i, (v(M) − u_i^solo)_+ / c_i) = M: the
    last sign change of the excess on a fine grid, refined by bisection. Also returns the
    grid totals just below each fall of the excess from >= 0 to < 0 (the stable fixed
    points, approximately)."""
    costs, caps = np.asarray(costs, float), np.asarray(caps, float)
    u = ref_solo_utilities(m, v, costs, caps)

    def excess(total):
        want = np.maximum(np.interp(total, m, v) - u, 0.0) / costs
        return np.minimum(caps, want).sum() - total

    grid = np.linspace(0.0, caps.sum(), 20_001)
    signs = np.array([excess(t) >= 0 for t in grid])
    falls = grid[:-1][signs[:-1] & ~signs[1:]]
    last = int(np.flatnonzero(signs)[-1])
    if last == grid.size - 1:
        return float(grid[-1]), falls
    lo, hi = grid[last], grid[last + 1]
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) >= 0 else (lo, mid)
    return float(lo), falls


def ref_nash_totals(m, v, costs, caps):
    """Totals of every integer profile from which no agent gains by an integer deviation.
    With integer breakpoints and caps an agent's best response is an integer, so these
    are exactly the Nash equilibria of the continuous game among integer profiles."""
    costs = np.asarray(costs, float)
    profiles = np.array(list(itertools.product(*[range(n + 1) for n in caps])), float)
    total = profiles.sum(axis=1)
    stable = np.ones(total.size, bool)
    for i, (c, n) in enumerate(zip(costs, caps, strict=True)):
        x = np.arange(n + 1.0)
        others = total - profiles[:, i]
        best = np.max(np.interp(others[:, None] + x, m, v) - c * x, axis=1)
        stable &= best <= np.interp(total, m, v) - c * profiles[:, i] + 1e-12
    return np.unique(total[stable])


def ref_is_nash(m, v, costs, caps, profile):
    """No agent gains by moving anywhere in [0, n_i] (a fine grid and every breakpoint)."""
    total = float(np.sum(profile))
    for c, n, mine in zip(costs, caps, profile, strict=True):
        others = total - mine
        x = np.unique(np.clip(np.concatenate([np.linspace(0, n, 4001), m - others]), 0, n))
        if np.max(np.interp(others + x, m, v) - c * x) > (
                np.interp(total, m, v) - c * mine + 1e-9):
            return False
    return True


def random_curve(rng, top):
    """Integer breakpoints on [0, top] and random increments: rarely concave."""
    inner = np.sort(rng.choice(np.arange(1, top), size=6, replace=False))
    m = np.concatenate([[0.0], inner, [float(top)]])
    v = 0.1 + np.concatenate([[0.0], np.cumsum(rng.uniform(0.0, 0.2, m.size - 1))])
    return m, v


# --- accuracy shaping: the largest fixed point --------------------------------------------

# A plateau between 200 and 400 samples, then a steep rise: five agents of 100 samples at
# cost 0.004 each stop at 50 alone (utility 0.5 − 0.2 = 0.3).
PLATEAU_M = np.array([0.0, 50.0, 200.0, 400.0, 500.0])
PLATEAU_V = np.array([0.1, 0.5, 0.6, 0.6, 0.9])
PLATEAU_COSTS = [0.004] * 5
PLATEAU_CAPS = [100] * 5


def test_mechanism_takes_the_largest_fixed_point_on_a_plateau():
    curve = inc.curve_from_points(PLATEAU_M, PLATEAU_V)
    expected, falls = ref_largest_fixed_point(PLATEAU_M, PLATEAU_V, PLATEAU_COSTS,
                                              PLATEAU_CAPS)
    # Fixed points below the one where everyone gives everything: on the plateau (M = 375,
    # every agent at (0.6 − 0.3) / 0.004 = 75) and at 0 (v(0) is below every solo utility).
    np.testing.assert_allclose(falls, [0.0, 375.0], atol=0.05)
    assert expected == pytest.approx(500.0)

    mech = inc.shaping_mechanism(curve, PLATEAU_COSTS, PLATEAU_CAPS)
    assert mech.total == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(mech.targets, PLATEAU_CAPS)
    assert mech.capped.all()
    u_solo = ref_solo_utilities(PLATEAU_M, PLATEAU_V, PLATEAU_COSTS, PLATEAU_CAPS)
    np.testing.assert_allclose(mech.solo.utilities, u_solo, atol=1e-12)
    # Everyone gets v(500) − 0.004 · 100 = 0.5, more than alone (0.3) and more than at the
    # plateau's fixed point (0.6 − 0.004 · 75 = 0.3).
    np.testing.assert_allclose(mech.utilities, 0.9 - 0.4, atol=1e-12)
    assert mech.max_gain <= 1e-9
    # Each target is its agent's best response under γ_i (NumPy, on a fine grid).
    for i in range(5):
        x = np.linspace(0, PLATEAU_CAPS[i], 10_001)
        others = mech.total - mech.targets[i]
        gamma = np.maximum(np.interp(x, PLATEAU_M, PLATEAU_V),
                           np.interp(x + others, PLATEAU_M, PLATEAU_V)
                           - (1 + mech.delta) * PLATEAU_COSTS[i]
                           * np.maximum(mech.targets[i] - x, 0))
        assert np.max(gamma - PLATEAU_COSTS[i] * x) <= mech.utilities[i] + 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_mechanism_total_is_the_largest_fixed_point_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    m, v = random_curve(rng, 60)
    caps = rng.integers(5, 25, size=4)
    costs = rng.uniform(0.003, 0.05, size=4)
    expected, _ = ref_largest_fixed_point(m, v, costs, caps)
    mech = inc.shaping_mechanism(inc.curve_from_points(m, v), costs, caps)
    assert mech.total == pytest.approx(expected, abs=1e-7)
    assert mech.residual <= 1e-9 * caps.sum()
    # Individual rationality: nobody is worse off than alone.
    assert (mech.utilities >= ref_solo_utilities(m, v, costs, caps) - 1e-12).all()


# --- the naive scheme: every equilibrium total --------------------------------------------

# Steep to 10 samples, almost flat to 20, steep again to 30: one agent giving 10 samples
# and the others nothing is an equilibrium, and so is a total of 30.
TWO_M = np.array([0.0, 10.0, 20.0, 30.0, 60.0])
TWO_V = np.array([0.1, 0.6, 0.62, 0.95, 1.0])
TWO_COSTS = [0.02, 0.021, 0.025]
TWO_CAPS = [15, 15, 15]


def test_naive_equilibria_on_a_non_concave_curve():
    curve = inc.curve_from_points(TWO_M, TWO_V)
    reference = ref_nash_totals(TWO_M, TWO_V, TWO_COSTS, TWO_CAPS)
    np.testing.assert_array_equal(reference, [10.0, 30.0])

    naive = inc.naive_equilibrium(curve, TWO_COSTS, TWO_CAPS)
    # Best responses from zero stop at the lower one.
    assert naive.total == pytest.approx(10.0)
    np.testing.assert_allclose(naive.totals, reference, atol=1e-9)
    assert naive.lowest_total == pytest.approx(10.0)
    assert naive.highest_total == pytest.approx(30.0)
    assert naive.profiles.shape == (2, 3)
    np.testing.assert_allclose(naive.profiles.sum(axis=1), naive.totals, atol=1e-9)
    for profile in naive.profiles:
        assert ref_is_nash(TWO_M, TWO_V, TWO_COSTS, TWO_CAPS, profile)

    totals, profiles = inc.naive_equilibria(curve, TWO_COSTS, TWO_CAPS)
    np.testing.assert_array_equal(totals, naive.totals)
    np.testing.assert_array_equal(profiles, naive.profiles)


def test_naive_equilibrium_is_unique_in_total_on_a_concave_curve():
    # Concave: slopes 0.005, 0.001, 1/7000; the cheapest agent's solo amount is the only
    # equilibrium total.
    m, v = np.array([0.0, 100, 300, 1000]), np.array([0.1, 0.6, 0.8, 0.9])
    costs, caps = [0.0005, 0.002, 0.004], [500, 500, 500]
    naive = inc.naive_equilibrium(inc.curve_from_points(m, v), costs, caps)
    np.testing.assert_allclose(naive.totals, [300.0])
    assert naive.lowest_total == naive.highest_total == pytest.approx(naive.total)


@pytest.mark.parametrize("seed", range(12))
def test_naive_equilibria_on_random_curves(seed):
    rng = np.random.default_rng(100 + seed)
    m, v = random_curve(rng, 40)
    caps = rng.integers(3, 13, size=3)
    costs = rng.uniform(0.002, 0.04, size=3)
    reference = ref_nash_totals(m, v, costs, caps)
    naive = inc.naive_equilibrium(inc.curve_from_points(m, v), costs, caps)
    # Every integer equilibrium's total is found, and every total found is an equilibrium.
    for total in reference:
        assert np.min(np.abs(naive.totals - total)) <= 1e-9
    for profile in naive.profiles:
        assert ref_is_nash(m, v, costs, caps, profile)
    assert np.min(np.abs(naive.totals - naive.total)) <= 1e-9


@pytest.mark.parametrize("call, message", [
    (lambda: inc.naive_equilibria(inc.curve_from_points(TWO_M, TWO_V), TWO_COSTS, [1, 2]),
     "caps must have one entry per agent (3)"),
    (lambda: inc.naive_equilibria(None, TWO_COSTS, TWO_CAPS), "curve must be a ValueCurve"),
    (lambda: inc.shaping_mechanism(inc.curve_from_points(TWO_M, TWO_V), TWO_COSTS,
                                   TWO_CAPS, tol=-1.0), "tol must be"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
