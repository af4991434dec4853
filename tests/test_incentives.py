"""The data-sharing game: equilibria solvable by hand, the measured value curve against
separate runs, delivered shaped models against their targets, and refused inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_sim import algorithms
from fedjax_sim import incentives as inc
from fedjax_sim.models import make_model
from fedjax_sim.runner import run

# A concave piecewise-linear v: slopes 0.005, 0.001, 1/7000.
KINKS = inc.curve_from_points([0, 100, 300, 1000], [0.1, 0.6, 0.8, 0.9])
KINK_COSTS = [0.0005, 0.002, 0.004]


def test_piecewise_linear_game_by_hand():
    caps = [500, 500, 500]
    alone = inc.solo(KINKS, KINK_COSTS, caps)
    # Each agent stops where the slope of v falls below its cost.
    np.testing.assert_allclose(alone.contributions, [300, 100, 100])
    np.testing.assert_allclose(alone.utilities, [0.8 - 0.15, 0.6 - 0.2, 0.6 - 0.4])

    naive = inc.naive_equilibrium(KINKS, KINK_COSTS, caps)
    # Free riding: the cheapest agent contributes its solo amount, at which v' = 1/7000 is
    # below everyone's cost; the others contribute nothing.
    np.testing.assert_allclose(naive.contributions, [300, 0, 0])
    assert naive.converged and naive.iterations == 2
    assert naive.accuracy == pytest.approx(0.8) and naive.max_gain <= 1e-12

    mech = inc.shaping_mechanism(KINKS, KINK_COSTS, caps)
    # On v's last segment v(M) = a + M / 7000 and m_i = (v(M) − u_i) / c_i, so
    # M = Σ (a − u_i)/c_i / (1 − Σ 1/(7000 c_i)).
    a = 0.8 - 300 / 7000
    inv = 1 / np.asarray(KINK_COSTS)
    total = np.sum((a - alone.utilities) * inv) / (1 - inv.sum() / 7000)
    assert mech.residual <= 1e-9 and mech.total == pytest.approx(total, rel=1e-8)
    np.testing.assert_allclose(mech.targets, (a + total / 7000 - alone.utilities) * inv,
                               rtol=1e-8)
    # Individual rationality binds for every agent (none is capped).
    assert not mech.capped.any()
    np.testing.assert_allclose(mech.utilities, alone.utilities, atol=1e-9)
    # Every target is its agent's best response under the shaping functions.
    np.testing.assert_allclose(mech.best_responses, mech.targets, rtol=1e-9)
    assert mech.max_gain <= 1e-9
    assert mech.total > naive.total and mech.total > alone.contributions.sum()


def test_capped_agent_keeps_its_surplus():
    mech = inc.shaping_mechanism(KINKS, KINK_COSTS, [400, 500, 500])
    # Agent 0 gives all it has; M = 400 + Σ_{1,2} (a + M/7000 − u_i)/c_i.
    a = 0.8 - 300 / 7000
    total = (400 + (a - 0.4) / 0.002 + (a - 0.2) / 0.004) / (1 - (500 + 250) / 7000)
    assert mech.total == pytest.approx(total, rel=1e-8)
    np.testing.assert_array_equal(mech.capped, [True, False, False])
    slack = mech.utilities - mech.solo.utilities
    assert slack[0] > 0.02 and np.abs(slack[1:]).max() <= 1e-9
    assert mech.max_gain <= 1e-9


def test_exponential_curve_by_hand():
    # v(m) = 1 − exp(−m/s): v'(m) = exp(−m/s)/s = c at m = s log(1/(c s)).
    s, costs, caps = 100.0, np.array([0.002, 0.004, 0.008]), [1000, 1000, 80]
    grid = np.arange(0.0, 3000.05, 0.1)
    curve = inc.curve_from_points(grid, 1 - np.exp(-grid / s))
    solo_m = s * np.log(1 / (costs * s))  # 160.9, 91.6, 22.3
    alone = inc.solo(curve, costs, caps)
    np.testing.assert_allclose(alone.contributions, solo_m, atol=0.1)

    naive = inc.naive_equilibrium(curve, costs, caps)
    np.testing.assert_allclose(naive.contributions, [solo_m[0], 0, 0], atol=0.1)
    assert naive.converged

    # The fixed point Σ min(n_i, (v(M) − u_i)/c_i) = M, by bisection on the exact v.
    u = 1 - costs * s - costs * solo_m

    def excess(total):
        return np.sum(np.minimum(caps, (1 - math.exp(-total / s) - u) / costs)) - total

    lo, hi = solo_m.sum(), 3000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    mech = inc.shaping_mechanism(curve, costs, caps)
    assert mech.total == pytest.approx(lo, abs=0.05)
    # Agent 2 gives all its 80 samples; individual rationality binds for the others.
    np.testing.assert_array_equal(mech.capped, [False, False, True])
    assert mech.targets[2] == 80 and mech.max_gain <= 1e-9
    np.testing.assert_allclose(mech.utilities[:2], alone.utilities[:2], atol=1e-9)
    assert mech.utilities[2] > alone.utilities[2]
    assert mech.total >= naive.total


def test_shaping_punishes_shortfall_by_delta():
    mech = inc.shaping_mechanism(KINKS, KINK_COSTS, [500] * 3, delta=0.05)
    i, short = 1, 10.0
    others = mech.total - mech.targets[i]
    got = mech.shaping(KINKS, KINK_COSTS, i, mech.targets[i] - short)
    expected = KINKS(mech.total - short) - 1.05 * KINK_COSTS[i] * short
    assert got == pytest.approx(expected)
    # Under the naive scheme the same agent's best response is to contribute nothing.
    assert inc.best_response(KINKS, KINK_COSTS[i], 500, others) == 0.0


def test_anchored_targets_follow_the_trained_model():
    mech = inc.shaping_mechanism(KINKS, KINK_COSTS, [500] * 3)
    achieved = np.array([0.9, 0.85, 0.8])
    # At the targets every agent is promised exactly the trained model.
    np.testing.assert_allclose(mech.anchored(KINKS, KINK_COSTS, mech.targets, achieved),
                               achieved)
    # Contributing nothing loses what the curve says, shifted to the trained model.
    others = mech.total - mech.targets
    expected = np.maximum(0.1, achieved - (mech.accuracy - KINKS(others))
                          - 1.05 * np.asarray(KINK_COSTS) * mech.targets)
    np.testing.assert_allclose(mech.anchored(KINKS, KINK_COSTS, np.zeros(3), achieved),
                               expected)


def test_rows_are_shuffled_and_held_out_per_client():
    from conftest import random_federated

    data = random_federated(seed=0, num_clients=3)
    n = np.asarray(data.train_counts)
    mixed = inc.shuffle_rows(data, seed=1)
    for k in range(3):
        rows = {tuple(r) for r in np.asarray(data.train_x)[k, :n[k]].reshape(n[k], -1)}
        assert rows == {tuple(r) for r in np.asarray(mixed.train_x)[k, :n[k]].reshape(n[k], -1)}
    assert not np.array_equal(mixed.train_y, data.train_y)
    kept, held = inc.hold_out(mixed, 0.25)
    h = np.floor(0.25 * n).astype(int)
    np.testing.assert_array_equal(kept.train_counts, n - h)
    np.testing.assert_array_equal(held.train_counts, h)
    for k in range(3):
        np.testing.assert_array_equal(np.asarray(held.train_y)[k, :h[k]],
                                      np.asarray(mixed.train_y)[k, n[k] - h[k]:n[k]])
    with pytest.raises(ValueError, match="fraction must be in"):
        inc.hold_out(data, 1.0)


def test_costs_are_drawn_from_named_distributions():
    np.testing.assert_array_equal(inc.draw_costs("constant(0.5)", 3), [0.5] * 3)
    uniform = inc.draw_costs("uniform(1, 2)", 1000, seed=1)
    assert uniform.min() >= 1 and uniform.max() <= 2 and abs(uniform.mean() - 1.5) < 0.05
    lognormal = inc.draw_costs("lognormal(0, 0.5)", 2000, seed=1, scale=2.0)
    assert abs(np.median(lognormal) - 2.0) < 0.1
    np.testing.assert_array_equal(inc.draw_costs("uniform(1, 2)", 4, seed=3),
                                  inc.draw_costs("uniform(1, 2)", 4, seed=3))


@pytest.mark.parametrize("call, message", [
    (lambda: inc.solo(KINKS, [0.1, -1.0, 0.1], [1, 1, 1]),
     "costs must be finite numbers >= 0 (one per agent), got -1.0 for agent 1"),
    (lambda: inc.naive_equilibrium(KINKS, [0.1, np.inf], [1, 1]),
     "costs must be finite numbers >= 0"),
    (lambda: inc.shaping_mechanism(KINKS, [np.nan], [1]), "costs must be finite numbers"),
    (lambda: inc.draw_costs([1.0, -2.0], 2), "costs must be finite numbers >= 0"),
    (lambda: inc.draw_costs("gamma(1, 2)", 3),
     "costs: unknown distribution 'gamma'; valid: uniform(lo, hi), lognormal(mean, "
     "sigma), constant(c)"),
    (lambda: inc.draw_costs("uniform(-1, 2)", 3), "costs: uniform parameter lo must be >= 0"),
    (lambda: inc.draw_costs("constant(inf)", 3),
     "costs: constant parameter c must be a finite number >= 0"),
    (lambda: inc.draw_costs("uniform(1)", 3), "costs: uniform takes 2 parameter(s)"),
    (lambda: inc.shaping_mechanism(KINKS, KINK_COSTS, [1] * 3, delta=0.0),
     "delta must be > 0, got 0.0"),
    (lambda: inc.shaping_mechanism(KINKS, KINK_COSTS, [1] * 3, delta=-0.1),
     "delta must be > 0"),
    (lambda: inc.shaping_mechanism(KINKS, KINK_COSTS, [1] * 3, delta=math.inf),
     "delta must be a finite number > 0"),
    (lambda: inc.solo(KINKS, KINK_COSTS, [1, 1]), "caps must have one entry per agent (3)"),
    (lambda: inc.curve_from_points([0, 5, 5], [0.1, 0.2, 0.3]), "m must be finite, strictly"),
    (lambda: inc.check_levels([0.5, 0.2]), "levels must be a non-empty, strictly increasing"),
    (lambda: inc.check_levels([0.0, 1.0]), "levels must be a non-empty, strictly increasing"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


# --- the simulator: tiny digits runs -------------------------------------------------------

HP = {"local_epochs": 2, "batch_size": 32, "lr": 0.3}


LEVELS = (0.25, 1.0)


@pytest.fixture(scope="module")
def digits():
    """Tiny digits, the value curve of two levels, and level 1.0 (all data) run alone."""
    from fedjax_sim.data import make_federated_data

    data = make_federated_data("digits", partition="iid", num_clients=3, seed=0)[0]
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=(16,))
    curve = inc.value_curve(data, model, levels=LEVELS, hparams=HP, rounds=2)
    alone = run(algorithms.make("fedavg", model, **HP), inc.level_splits(data, LEVELS)[-1],
                rounds=2, seed=0, progress=False)
    return data, model, curve, alone


def test_value_curve_batch_is_the_separate_runs(digits):
    data, _, curve, alone = digits
    n = np.asarray(data.train_counts)
    np.testing.assert_array_equal(curve.m, [0, np.ceil(n / 4).sum(), n.sum()])
    assert curve.measured[0] == pytest.approx(1 / data.num_classes)
    # A level keeps its rows by its counts alone: the arrays are the full ones.
    quarter = inc.level_splits(data, LEVELS)[0]
    assert quarter.train_x.shape == data.train_x.shape
    np.testing.assert_array_equal(quarter.train_counts, np.ceil(n / 4))
    # The last level, run alone, has the accuracy it has inside the batch.
    assert curve.measured[2] == pytest.approx(alone.summary["accuracy"], abs=1e-6)
    assert curve.measured[2] > curve.measured[1] > curve.measured[0]
    np.testing.assert_array_equal(curve.v, np.maximum.accumulate(curve.measured))


def test_delivered_accuracy_meets_target(digits):
    data, model, _, alone = digits
    params = alone.state.server["params"]
    probe = inc.deliver(model, params, data, np.zeros(3))
    chance = 1 / data.num_classes
    # 40, 60 and 80% of the way from chance to the global model.
    targets = chance + np.array([0.4, 0.6, 0.8]) * (probe.train_accuracy - chance)
    out = inc.deliver(model, params, data, targets, seed=1)
    np.testing.assert_allclose(out.p, [0.6, 0.4, 0.2])
    assert (out.test_accuracy > 0.5).all()
    # The draws match their expectation given the global model's test predictions
    # within 3 binomial standard deviations ...
    sd = np.sqrt(out.expected * (1 - out.expected) / out.test_counts)
    assert (np.abs(out.delivered - out.expected) <= 3 * sd).all()
    # ... and the target within 3 standard deviations plus the calibration error that
    # the train/test accuracy difference leaves, (1 − p)|a_train − a_test|.
    calibration = (1 - out.p) * np.abs(out.train_accuracy - out.test_accuracy)
    assert (np.abs(out.gaps) <= 3 * out.stderr + calibration).all()
    # A target equal to the global model's accuracy delivers the global model itself.
    same = inc.deliver(model, params, data, probe.train_accuracy)
    np.testing.assert_array_equal(same.p, 0)
    np.testing.assert_array_equal(same.delivered, same.test_accuracy)
    # More than the global model achieves cannot be delivered.
    assert probe.train_accuracy[2] < 0.99
    too_high = probe.train_accuracy[2] + 0.01
    with pytest.raises(ValueError) as info:
        inc.deliver(model, params, data, [0.0, 0.0, too_high])
    assert (f"targets[2] = {too_high:.4f} for agent 2 is above the accuracy the global "
            f"model achieves on its calibration (training) data, {probe.train_accuracy[2]:.4f}"
            in str(info.value))


@pytest.mark.slow
def test_models_trained_on_contributions_are_their_separate_runs(digits):
    data, model, _, alone = digits
    n = np.asarray(data.train_counts)
    full, half = inc.train_on_contributions(data, model, [n, n / 2 - 0.5], hparams=HP,
                                            rounds=2)
    np.testing.assert_array_equal(half.counts, np.ceil(n / 2 - 0.5))
    assert full.accuracy == pytest.approx(alone.summary["accuracy"], abs=1e-6)
    split = inc.with_train_counts(data, np.asarray(half.counts))
    again = run(algorithms.make("fedavg", model, **HP), split, rounds=2, seed=0,
                progress=False)
    assert half.accuracy == pytest.approx(again.summary["accuracy"], abs=1e-6)
