"""Host-side privacy accounting of DP-FedAvg runs, with dp-accounting only.

One round of DP-FedAvg (McMahan et al., ICLR 2018) is a sampled Gaussian mechanism: a
cohort is sampled, each member's update is clipped to norm C, and noise of standard
deviation σ C is added to the sum. With adaptive clipping the pair (σ_Δ, σ_b) costs what
σ alone costs (Andrew et al. 2021, Theorem 1; ``kernels.dp.split_noise_multiplier``), so
the accountant sees σ. A run of T rounds composes T such mechanisms. Every ε here comes
from ``dp_accounting`` (Google's dp-accounting library); nothing is a home-made formula.

The two samplings are accounted under different neighbouring relations, so their ε are
not interchangeable:

* ``poisson``: each of N clients joins each round independently with probability q.
  Neighbouring data sets differ by adding or removing one client's data
  (``NeighboringRelation.ADD_OR_REMOVE_ONE``); the event is
  ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``. Both accountants support it.
* ``fixed``: each round takes m = round(q N) distinct clients uniformly (at least one, as
  ``core.cohort.cohort_size``). N is public, and neighbouring data sets differ by
  replacing one client's data (``NeighboringRelation.REPLACE_ONE``; Wang, Balle,
  Kasiviswanathan, AISTATS 2019, Theorem 27). The event is
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(σ / 2))``: replacing one
  client moves the clipped sum by up to 2C, not C, and dp-accounting 0.6.0's RDP
  accountant reads the multiplier of this event relative to that replace-one
  sensitivity (under ``REPLACE_ONE`` it gives a ``GaussianDpEvent(σ)`` the RDP α / 2σ²
  of sensitivity C; https://github.com/google/differential-privacy/issues/378). A
  fixed-size cohort therefore needs much more noise than a Poisson one of the same
  expected size for the same ε. Only the RDP accountant supports the event:
  dp-accounting 0.6.0's ``PLDAccountant`` has no ``SampledWithoutReplacementDpEvent``
  and is refused for ``fixed`` sampling.
"""

from __future__ import annotations

import logging
import math
import numbers

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_sim.core.cohort import cohort_size
from fedjax_sim.kernels import dp as dp_kernels


class _SkippedOrders(logging.Filter):
    """Drops the RDP accountant's note that a fractional order did not converge: that
    order is left out of the minimum over orders by design, and the note would fill
    every run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkippedOrders())

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")

# The largest σ calibration tries: a target that needs more is reported as out of reach.
MAX_NOISE_MULTIPLIER = 1e3

# Calibration's tolerance on σ, relative: the result is within this fraction above the
# smallest σ that meets the target.
DEFAULT_TOLERANCE = 1e-4

# Replacing one client moves a sum of updates clipped to C by up to this many C.
REPLACE_ONE_SENSITIVITY = 2.0

# How messages name each argument: the run's option where there is one.
_OPTION_NAMES = {
    "noise_multiplier": "dp_noise_multiplier",
    "count_noise_multiplier": "dp_count_noise_multiplier",
    "clip_norm": "dp_clip_norm",
    "rate": "rate (join_ratio)",
    "delta": "dp_delta",
    "target_epsilon": "dp_target_epsilon",
    "target_quantile": "dp_target_quantile",
    "clip_lr": "dp_clip_lr",
    "sampling": "dp_sampling",
    "accountant": "dp_accountant",
    "num_clients": "num_clients",
    "steps": "steps",
    "max_steps": "max_steps",
    "tolerance": "tolerance",
}


# ---- validation ------------------------------------------------------------------------


def _real(name: str, value) -> float:
    """``value`` as a float; ValueError naming ``name`` when it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{_OPTION_NAMES[name]} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{_OPTION_NAMES[name]} must be an integer >= {low}, got {value!r}")
    return int(value)


def _require(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{_OPTION_NAMES[name]} must be {allowed}, got {value!r}")


def check_dp_arguments(
    *,
    noise_multiplier=None,
    count_noise_multiplier=None,
    clip_norm=None,
    rate=None,
    delta=None,
    target_epsilon=None,
    target_quantile=None,
    clip_lr=None,
    sampling=None,
    accountant=None,
    num_clients=None,
    steps=None,
    max_steps=None,
    tolerance=None,
) -> None:
    """Checks the privacy arguments that are given (None skips one).

    Args:
      noise_multiplier: σ, a finite number ≥ 0.
      count_noise_multiplier: σ_b ≥ 0; with σ > 0 also 2σ_b > σ (adaptive clipping).
      clip_norm: C, a finite number > 0.
      rate: q, the sampling rate, in (0, 1].
      delta: δ in (0, 1).
      target_epsilon: a finite ε > 0.
      target_quantile: γ in [0, 1].
      clip_lr: η_C, a finite number ≥ 0.
      sampling: one of :data:`SAMPLINGS`.
      accountant: one of :data:`ACCOUNTANTS`.
      num_clients: N, an integer ≥ 1.
      steps: rounds, an integer ≥ 0.
      max_steps: rounds, an integer ≥ 0.
      tolerance: calibration's relative tolerance, in (0, 0.1].

    Raises:
      ValueError: one line naming the first bad argument and its allowed range.
    """
    if noise_multiplier is not None:
        value = _real("noise_multiplier", noise_multiplier)
        _require("noise_multiplier", noise_multiplier, 0 <= value < math.inf,
                 "a finite number >= 0")
    if count_noise_multiplier is not None:
        value = _real("count_noise_multiplier", count_noise_multiplier)
        _require("count_noise_multiplier", count_noise_multiplier, value >= 0, ">= 0")
        if noise_multiplier is not None:
            dp_kernels.split_noise_multiplier_host(noise_multiplier, count_noise_multiplier)
    if clip_norm is not None:
        value = _real("clip_norm", clip_norm)
        _require("clip_norm", clip_norm, 0 < value < math.inf, "a finite number > 0")
    if rate is not None:
        value = _real("rate", rate)
        _require("rate", rate, 0 < value <= 1, "in (0, 1]")
    if delta is not None:
        value = _real("delta", delta)
        _require("delta", delta, 0 < value < 1, "in (0, 1)")
    if target_epsilon is not None:
        value = _real("target_epsilon", target_epsilon)
        _require("target_epsilon", target_epsilon, 0 < value < math.inf,
                 "a finite number > 0")
    if target_quantile is not None:
        value = _real("target_quantile", target_quantile)
        _require("target_quantile", target_quantile, 0 <= value <= 1, "in [0, 1]")
    if clip_lr is not None:
        value = _real("clip_lr", clip_lr)
        _require("clip_lr", clip_lr, 0 <= value < math.inf, "a finite number >= 0")
    if sampling is not None:
        _require("sampling", sampling, sampling in SAMPLINGS, f"one of {SAMPLINGS}")
    if accountant is not None:
        _require("accountant", accountant, accountant in ACCOUNTANTS, f"one of {ACCOUNTANTS}")
    if num_clients is not None:
        _integer("num_clients", num_clients, 1)
    if steps is not None:
        _integer("steps", steps, 0)
    if max_steps is not None:
        _integer("max_steps", max_steps, 0)
    if tolerance is not None:
        value = _real("tolerance", tolerance)
        _require("tolerance", tolerance, 0 < value <= 0.1, "in (0, 0.1]")


def _check_supported(accountant: str, sampling: str) -> None:
    if accountant == "pld" and sampling == "fixed":
        raise ValueError(
            "dp_accountant 'pld' cannot account dp_sampling 'fixed': dp-accounting 0.6.0's "
            "PLDAccountant does not support SampledWithoutReplacementDpEvent; use "
            "dp_accountant 'rdp' or dp_sampling 'poisson'")


# ---- events and accountants ------------------------------------------------------------


def fixed_sample_size(num_clients: int, rate: float) -> int:
    """m, the clients of a ``fixed`` round: the cohort ``core.cohort.cohort_size`` draws."""
    return cohort_size(num_clients, rate)


def dp_event(
    noise_multiplier: float, *, sampling: str, rate: float, num_clients: int, steps: int
) -> dp_accounting.DpEvent:
    """The dp-accounting event of ``steps`` rounds.

    Args:
      noise_multiplier: σ, noise standard deviation over the clip norm.
      sampling: ``"poisson"`` or ``"fixed"`` (see the module docstring).
      rate: q in (0, 1].
      num_clients: N (the population; fixes m for ``fixed`` sampling).
      steps: the rounds, ≥ 0.

    Returns:
      ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)`` for
      ``poisson``; ``SelfComposedDpEvent(SampledWithoutReplacementDpEvent(N, m,
      GaussianDpEvent(σ / 2)), steps)`` for ``fixed`` (σ / 2: the replace-one
      sensitivity 2C, see the module docstring).

    Raises:
      ValueError: naming a bad argument.
    """
    check_dp_arguments(noise_multiplier=noise_multiplier, sampling=sampling, rate=rate,
                       num_clients=num_clients, steps=steps)
    if sampling == "poisson":
        round_event = dp_accounting.PoissonSampledDpEvent(
            float(rate), dp_accounting.GaussianDpEvent(float(noise_multiplier)))
    else:
        round_event = dp_accounting.SampledWithoutReplacementDpEvent(
            int(num_clients), fixed_sample_size(int(num_clients), float(rate)),
            dp_accounting.GaussianDpEvent(float(noise_multiplier) / REPLACE_ONE_SENSITIVITY))
    return dp_accounting.SelfComposedDpEvent(round_event, int(steps))


def make_accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant for ``sampling``'s neighbouring relation.

    Raises:
      ValueError: naming ``dp_accountant`` for ``pld`` with ``fixed`` sampling.
    """
    check_dp_arguments(accountant=accountant, sampling=sampling)
    _check_supported(accountant, sampling)
    relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if sampling == "fixed"
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    return pld_privacy_accountant.PLDAccountant(neighboring_relation=relation)


def epsilon(
    noise_multiplier: float,
    *,
    delta: float,
    sampling: str,
    rate: float,
    num_clients: int,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """ε at δ after ``steps`` rounds of noise multiplier σ.

    Args:
      noise_multiplier: σ ≥ 0.
      delta: δ in (0, 1).
      sampling: ``"poisson"`` (add/remove-one ε) or ``"fixed"`` (replace-one ε).
      rate: q in (0, 1].
      num_clients: N ≥ 1.
      steps: the rounds, ≥ 0.
      accountant: ``"rdp"`` (``dp_accounting.rdp.RdpAccountant``) or ``"pld"``
        (``dp_accounting.pld.PLDAccountant``, Poisson sampling only).

    Returns:
      ε as a float: 0.0 after no rounds, inf with σ = 0.

    Raises:
      ValueError: naming a bad argument, or ``dp_accountant`` for ``pld`` with ``fixed``.
    """
    check_dp_arguments(noise_multiplier=noise_multiplier, delta=delta, sampling=sampling,
                       rate=rate, num_clients=num_clients, steps=steps, accountant=accountant)
    _check_supported(accountant, sampling)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_event(noise_multiplier, sampling=sampling, rate=rate, num_clients=num_clients,
                     steps=steps)
    return float(make_accountant(accountant, sampling).compose(event).get_epsilon(delta))


# ---- searches --------------------------------------------------------------------------


def _bracket(spent, target: float, guess: float, factor: float, cap: float):
    """(low, high) with spent(low) > target ≥ spent(high), from ``guess`` in steps of
    ``factor``; ``spent`` decreases in σ and spent(cap) ≤ target."""
    high = min(guess, cap)
    if spent(high) <= target:
        low = high / factor
        while spent(low) <= target:
            high, low = low, low / factor
        return low, high
    low = high
    high = min(low * factor, cap)
    while spent(high) > target:
        low, high = high, min(high * factor, cap)
    return low, high


def calibrate_noise_multiplier(
    target_epsilon: float,
    *,
    delta: float,
    sampling: str,
    rate: float,
    num_clients: int,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = DEFAULT_TOLERANCE,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """The smallest σ whose ε after ``steps`` rounds is at most ``target_epsilon``.

    A bracket is found by doubling / halving σ, then dp-accounting's
    ``mechanism_calibration.calibrate_dp_mechanism`` (Brent's method, then bisection)
    narrows it; it returns a σ whose ε does not exceed the target. With ``pld`` the
    search starts from the RDP answer (an upper bound on the PLD one in practice), so the
    PLD accountant, slow at small σ, is evaluated near the answer only.

    Args:
      target_epsilon: ε > 0 to meet.
      delta: δ in (0, 1).
      sampling: ``"poisson"`` or ``"fixed"``.
      rate: q in (0, 1].
      num_clients: N ≥ 1.
      steps: the rounds, ≥ 0.
      accountant: ``"rdp"`` or ``"pld"``.
      tolerance: relative tolerance on σ, in (0, 0.1]: the result is at most about
        ``1 + tolerance`` times the smallest σ that meets the target.
      max_noise_multiplier: the largest σ tried.

    Returns:
      σ as a float (0.0 when ``steps`` is 0: nothing is spent).

    Raises:
      ValueError: naming ``target_epsilon`` with the reachable range when even
        ``max_noise_multiplier`` spends more; or naming another bad argument.
    """
    check_dp_arguments(target_epsilon=target_epsilon, delta=delta, sampling=sampling,
                       rate=rate, num_clients=num_clients, steps=steps,
                       accountant=accountant, tolerance=tolerance)
    if not 0 < max_noise_multiplier < math.inf:
        raise ValueError(
            f"max_noise_multiplier must be a finite number > 0, got {max_noise_multiplier!r}")
    _check_supported(accountant, sampling)
    if steps == 0:
        return 0.0
    setting = {"delta": delta, "sampling": sampling, "rate": rate,
               "num_clients": num_clients, "steps": steps}

    def spent(sigma: float) -> float:
        return epsilon(sigma, accountant=accountant, **setting)

    floor = spent(max_noise_multiplier)
    if floor > target_epsilon:
        raise ValueError(
            f"target_epsilon {target_epsilon:g} is out of reach: with noise multipliers up to "
            f"{max_noise_multiplier:g}, {steps} rounds spend at least ε = {floor:.4g} (δ = "
            f"{delta:g}); reachable targets are ε >= {floor:.4g}")
    if accountant == "pld":
        try:
            guess = calibrate_noise_multiplier(target_epsilon, accountant="rdp",
                                               tolerance=1e-2, **setting)
        except ValueError:  # out of RDP's reach, within PLD's
            guess = max_noise_multiplier
        low, high = _bracket(spent, target_epsilon, guess, 1.25, max_noise_multiplier)
    else:
        low, high = _bracket(spent, target_epsilon, 1.0, 2.0, max_noise_multiplier)
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        make_fresh_accountant=lambda: make_accountant(accountant, sampling),
        make_event_from_param=lambda s: dp_event(s, sampling=sampling, rate=rate,
                                                 num_clients=num_clients, steps=steps),
        target_epsilon=float(target_epsilon),
        target_delta=float(delta),
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(low, high),
        tol=tolerance * low,
    )
    return float(sigma)


def rounds_within_budget(
    target_epsilon: float,
    noise_multiplier: float,
    *,
    delta: float,
    sampling: str,
    rate: float,
    num_clients: int,
    max_steps: int,
    accountant: str = "rdp",
) -> int:
    """The most rounds, up to ``max_steps``, whose ε is at most ``target_epsilon``.

    ε grows with the rounds, so a bisection over [0, max_steps] finds it with about
    log2(max_steps) accountant calls.

    Args:
      target_epsilon: ε > 0.
      noise_multiplier: σ ≥ 0.
      delta: δ in (0, 1).
      sampling: ``"poisson"`` or ``"fixed"``.
      rate: q in (0, 1].
      num_clients: N ≥ 1.
      max_steps: the largest answer, ≥ 0.
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      The number of rounds (0 with σ = 0).

    Raises:
      ValueError: naming a bad argument.
    """
    check_dp_arguments(target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
                       delta=delta, sampling=sampling, rate=rate, num_clients=num_clients,
                       max_steps=max_steps, accountant=accountant)
    _check_supported(accountant, sampling)

    def spent(steps: int) -> float:
        return epsilon(noise_multiplier, delta=delta, sampling=sampling, rate=rate,
                       num_clients=num_clients, steps=steps, accountant=accountant)

    if spent(max_steps) <= target_epsilon:
        return int(max_steps)
    within, beyond = 0, int(max_steps)  # spent(within) <= target < spent(beyond)
    while beyond - within > 1:
        middle = (within + beyond) // 2
        if spent(middle) <= target_epsilon:
            within = middle
        else:
            beyond = middle
    return within
