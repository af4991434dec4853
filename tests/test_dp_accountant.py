"""Tests of the host-side privacy accountant (fedjax_sim/core/accountant.py) against
dp-accounting called directly."""

from __future__ import annotations

import functools
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_sim.core import accountant

NR = dp_accounting.NeighboringRelation
DELTA = 1e-5
POISSON = {"delta": DELTA, "sampling": "poisson", "rate": 0.1, "num_clients": 200}
FIXED = {"delta": DELTA, "sampling": "fixed", "rate": 0.1, "num_clients": 200}


def _direct(event, relation, kind="rdp", delta=DELTA):
    if kind == "rdp":
        fresh = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    else:
        fresh = pld_privacy_accountant.PLDAccountant(neighboring_relation=relation)
    return fresh.compose(event).get_epsilon(delta)


# ---- epsilon equals dp-accounting ------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize(("sigma", "steps"), [(1.1, 50), (3.0, 7)])
def test_poisson_epsilon_is_dp_accounting_add_or_remove(kind, sigma, steps):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(sigma)), steps)
    want = _direct(event, NR.ADD_OR_REMOVE_ONE, kind)
    got = accountant.epsilon(sigma, steps=steps, accountant=kind, **POISSON)
    assert isinstance(got, float) and got == want
    assert accountant.dp_event(sigma, sampling="poisson", rate=0.1, num_clients=200,
                               steps=steps) == event


@pytest.mark.parametrize(("sigma", "steps"), [(1.1, 50), (3.0, 7)])
def test_fixed_epsilon_is_dp_accounting_replace_one_at_sensitivity_2c(sigma, steps):
    # m = round(q N) = 20 of N = 200; replacing one client moves the clipped sum by 2C,
    # so the event's multiplier is σ / 2 (module docstring).
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            200, 20, dp_accounting.GaussianDpEvent(sigma / 2)), steps)
    assert accountant.dp_event(sigma, sampling="fixed", rate=0.1, num_clients=200,
                               steps=steps) == event
    want = _direct(event, NR.REPLACE_ONE)
    assert accountant.epsilon(sigma, steps=steps, **FIXED) == want


def test_fixed_full_participation_is_the_gaussian_mechanism_at_sensitivity_2c():
    # Pins dp-accounting 0.6.0's convention (google/differential-privacy issue #378): with
    # q = 1 the fixed-size event is the Gaussian mechanism of sensitivity 2C, i.e. the
    # add/remove Gaussian of multiplier σ / 2. If dp-accounting starts doubling the
    # replace-one sensitivity itself, this fails and the σ / 2 in dp_event must go.
    sigma, steps = 4.0, 10
    gaussian = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2),
                                                 steps)
    want = _direct(gaussian, NR.ADD_OR_REMOVE_ONE)
    got = accountant.epsilon(sigma, delta=DELTA, sampling="fixed", rate=1.0, num_clients=50,
                             steps=steps)
    assert got == pytest.approx(want, rel=1e-9)


def test_fixed_sample_size_is_the_cohort_the_round_draws():
    assert accountant.fixed_sample_size(200, 0.1) == 20
    assert accountant.fixed_sample_size(10, 0.01) == 1  # at least one client
    assert accountant.fixed_sample_size(7, 1.0) == 7


def test_pld_does_not_support_fixed_sampling():
    # What dp-accounting 0.6.0 supports: no SampledWithoutReplacementDpEvent in PLD.
    event = accountant.dp_event(1.0, sampling="fixed", rate=0.1, num_clients=200, steps=3)
    assert not pld_privacy_accountant.PLDAccountant(NR.REPLACE_ONE).supports(event)
    assert rdp_privacy_accountant.RdpAccountant(neighboring_relation=NR.REPLACE_ONE).supports(
        event)
    for call in (
        lambda: accountant.epsilon(1.0, steps=3, accountant="pld", **FIXED),
        lambda: accountant.calibrate_noise_multiplier(1.0, steps=3, accountant="pld", **FIXED),
        lambda: accountant.rounds_within_budget(1.0, 1.0, max_steps=3, accountant="pld",
                                                **FIXED),
    ):
        with pytest.raises(ValueError, match="dp_accountant") as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("setting", [POISSON, FIXED], ids=["poisson", "fixed"])
def test_edges_no_noise_is_infinite_no_rounds_is_free(setting):
    kinds = ["rdp", "pld"] if setting["sampling"] == "poisson" else ["rdp"]
    for kind in kinds:
        assert accountant.epsilon(0.0, steps=5, accountant=kind, **setting) == math.inf
        assert accountant.epsilon(0.0, steps=0, accountant=kind, **setting) == 0.0
        assert accountant.epsilon(1.0, steps=0, accountant=kind, **setting) == 0.0


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    spent = [accountant.epsilon(1.0, steps=t, **POISSON) for t in (1, 10, 100)]
    assert spent == sorted(spent) and spent[0] < spent[-1]
    spent = [accountant.epsilon(s, steps=10, **POISSON) for s in (0.8, 1.6, 3.2)]
    assert spent == sorted(spent, reverse=True) and spent[0] > spent[-1]


# ---- calibration -----------------------------------------------------------------------

CALIBRATIONS = {  # setting, accountant, target ε, relative tolerance; 20 rounds each
    "poisson-rdp": (POISSON, "rdp", 1.0, 1e-4),
    "poisson-pld": (POISSON, "pld", 1.0, 1e-3),
    "fixed-rdp": (FIXED, "rdp", 4.0, 1e-4),
}
STEPS = 20


@functools.cache
def _calibrated(case: str) -> float:
    setting, kind, target, tolerance = CALIBRATIONS[case]
    return accountant.calibrate_noise_multiplier(target, steps=STEPS, accountant=kind,
                                                 tolerance=tolerance, **setting)


@pytest.mark.parametrize("case", list(CALIBRATIONS))
def test_calibrated_sigma_is_the_smallest_that_meets_the_target(case):
    setting, kind, target, tolerance = CALIBRATIONS[case]
    sigma = _calibrated(case)
    assert isinstance(sigma, float) and sigma > 0
    assert accountant.epsilon(sigma, steps=STEPS, accountant=kind, **setting) <= target
    lower = sigma * (1 - 3 * tolerance)
    assert accountant.epsilon(lower, steps=STEPS, accountant=kind, **setting) > target


def test_pld_needs_less_noise_than_rdp():
    # PLD accounting is tighter than RDP's bound: the same target needs less noise.
    assert _calibrated("poisson-pld") < _calibrated("poisson-rdp")


def test_calibration_without_rounds_needs_no_noise():
    assert accountant.calibrate_noise_multiplier(1.0, steps=0, **POISSON) == 0.0


def test_unreachable_target_raises_with_the_reachable_range():
    with pytest.raises(ValueError, match="target_epsilon") as error:
        accountant.calibrate_noise_multiplier(0.01, delta=DELTA, sampling="poisson", rate=1.0,
                                              num_clients=10, steps=1000)
    message = str(error.value)
    assert "reachable" in message and "\n" not in message
    floor = accountant.epsilon(accountant.MAX_NOISE_MULTIPLIER, delta=DELTA,
                               sampling="poisson", rate=1.0, num_clients=10, steps=1000)
    assert f"{floor:.4g}" in message


# ---- rounds within a budget ------------------------------------------------------------


@pytest.mark.parametrize(("setting", "kind", "sigma", "target"), [
    (POISSON, "rdp", 1.5, 2.0), (POISSON, "pld", 3.0, 0.5), (FIXED, "rdp", 4.0, 2.0),
], ids=["poisson-rdp", "poisson-pld", "fixed-rdp"])
def test_rounds_within_budget_is_the_last_round_that_fits(setting, kind, sigma, target):
    rounds = accountant.rounds_within_budget(target, sigma, max_steps=64, accountant=kind,
                                             **setting)
    assert 0 < rounds < 64
    assert accountant.epsilon(sigma, steps=rounds, accountant=kind, **setting) <= target
    assert accountant.epsilon(sigma, steps=rounds + 1, accountant=kind, **setting) > target


def test_rounds_within_budget_edges():
    assert accountant.rounds_within_budget(50.0, 2.0, max_steps=30, **POISSON) == 30
    assert accountant.rounds_within_budget(5.0, 0.0, max_steps=30, **POISSON) == 0
    assert accountant.rounds_within_budget(5.0, 2.0, max_steps=0, **POISSON) == 0


# ---- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(("arguments", "name"), [
    ({"noise_multiplier": -1.0}, "dp_noise_multiplier"),
    ({"noise_multiplier": float("nan")}, "dp_noise_multiplier"),
    ({"noise_multiplier": float("inf")}, "dp_noise_multiplier"),
    ({"noise_multiplier": "1"}, "dp_noise_multiplier"),
    ({"clip_norm": 0.0}, "dp_clip_norm"),
    ({"clip_norm": -2.0}, "dp_clip_norm"),
    ({"rate": 0.0}, "rate"),
    ({"rate": 1.5}, "rate"),
    ({"delta": 0.0}, "dp_delta"),
    ({"delta": 1.0}, "dp_delta"),
    ({"target_epsilon": 0.0}, "dp_target_epsilon"),
    ({"target_epsilon": -3.0}, "dp_target_epsilon"),
    ({"target_quantile": -0.1}, "dp_target_quantile"),
    ({"target_quantile": 1.1}, "dp_target_quantile"),
    ({"clip_lr": -0.2}, "dp_clip_lr"),
    ({"sampling": "uniform"}, "dp_sampling"),
    ({"accountant": "gdp"}, "dp_accountant"),
    ({"count_noise_multiplier": -1.0}, "dp_count_noise_multiplier"),
    ({"noise_multiplier": 1.0, "count_noise_multiplier": 0.4}, "dp_count_noise_multiplier"),
    ({"num_clients": 0}, "num_clients"),
    ({"num_clients": 2.5}, "num_clients"),
    ({"steps": -1}, "steps"),
    ({"max_steps": -1}, "max_steps"),
    ({"tolerance": 0.0}, "tolerance"),
])
def test_check_dp_arguments_names_the_bad_argument(arguments, name):
    with pytest.raises(ValueError, match=name) as error:
        accountant.check_dp_arguments(**arguments)
    assert "\n" not in str(error.value)


def test_check_dp_arguments_accepts_the_allowed_ranges():
    accountant.check_dp_arguments(
        noise_multiplier=0.0, count_noise_multiplier=0.0, clip_norm=1e-3, rate=1.0,
        delta=1e-9, target_epsilon=1e-3, target_quantile=0.0, clip_lr=0.0,
        sampling="fixed", accountant="pld", num_clients=1, steps=0, max_steps=0,
        tolerance=0.1)
    accountant.check_dp_arguments(noise_multiplier=1.0, count_noise_multiplier=0.51,
                                  target_quantile=1.0)


@pytest.mark.parametrize(("call", "name"), [
    (lambda: accountant.epsilon(1.0, steps=5, **{**POISSON, "rate": 0.0}), "rate"),
    (lambda: accountant.epsilon(1.0, steps=5, **{**POISSON, "delta": 2.0}), "dp_delta"),
    (lambda: accountant.epsilon(-1.0, steps=5, **POISSON), "dp_noise_multiplier"),
    (lambda: accountant.epsilon(1.0, steps=5, accountant="moments", **POISSON),
     "dp_accountant"),
    (lambda: accountant.epsilon(1.0, steps=5, **{**POISSON, "sampling": "shuffle"}),
     "dp_sampling"),
    (lambda: accountant.epsilon(1.0, steps=-2, **POISSON), "steps"),
    (lambda: accountant.calibrate_noise_multiplier(0.0, steps=5, **POISSON),
     "dp_target_epsilon"),
    (lambda: accountant.rounds_within_budget(1.0, 1.0, max_steps=-1, **POISSON), "max_steps"),
    (lambda: accountant.dp_event(1.0, sampling="fixed", rate=0.1, num_clients=0, steps=1),
     "num_clients"),
])
def test_public_functions_validate_their_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()
