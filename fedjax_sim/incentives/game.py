"""The data-sharing game on a measured accuracy curve: the value curve v(m), the solo
optimum, the naive scheme's Nash equilibria and the accuracy-shaping mechanism.

Pure NumPy: the game has one variable per agent. ``v`` is piecewise linear, so every
utility below is piecewise linear in an agent's own contribution and its maximum lies at
a breakpoint or an end of ``[0, n_i]``: the best responses are exact, not grid searches.
The same holds for the totals: the naive scheme's equilibrium totals are enumerated among
finitely many candidates, and the mechanism's fixed point is the largest root of a
piecewise-linear function, found from its breakpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_sim.checks import check_float, check_int
from fedjax_sim.incentives.costs import check_costs, per_agent

# The mechanism's margin: contributing d samples less than the target costs
# (1 + DEFAULT_DELTA) c_i d of accuracy, more than the d c_i saved.
DEFAULT_DELTA = 0.05

# Two utilities closer than this are equal (accuracies and utilities are O(1)): a tie goes
# to the larger contribution.
TIE = 1e-12


def _frozen(array: Any, dtype=np.float64) -> np.ndarray:
    array = np.array(array, dtype=dtype)
    array.setflags(write=False)
    return array


def check_delta(delta: Any) -> float:
    """``delta``, checked: a finite number > 0."""
    return check_float("delta", delta, 0.0, low_open=True)


def _check_caps(caps: Any, num_agents: int) -> np.ndarray:
    return per_agent("caps", caps, num_agents, "each agent's available samples")


# ---------------------------------------------------------------------------------------
# The value curve


@dataclasses.dataclass(frozen=True, eq=False)
class ValueCurve:
    """v(m): accuracy of a model trained on m samples in total, piecewise linear.

    Attributes:
      m: (P,) strictly increasing sample totals, ``m[0] == 0``.
      measured: (P,) accuracies as measured (``measured[0]``: chance, ``1 / num_classes``).
      v: (P,) the curve used by the game: the running maximum of ``measured`` (v must be
        non-decreasing: more data never hurts the best model one can deliver).
      num_classes: number of classes (None when unknown).
      levels: (P - 1,) the contribution fractions of the measured points (None when the
        points were given directly).
    """

    m: np.ndarray
    measured: np.ndarray
    v: np.ndarray
    num_classes: int | None = None
    levels: np.ndarray | None = None

    def __call__(self, m: Any) -> np.ndarray:
        """v at ``m`` (linear between the points, flat beyond the last one)."""
        return np.interp(m, self.m, self.v)

    @property
    def total(self) -> float:
        """The largest measured total."""
        return float(self.m[-1])


def curve_from_points(m: Any, accuracy: Any, *, num_classes: int | None = None,
                      levels: Any = None) -> ValueCurve:
    """A ValueCurve through the points ``(m[j], accuracy[j])``.

    Args:
      m: (P,) sample totals, ``P >= 2``, strictly increasing, ``m[0] == 0``.
      accuracy: (P,) finite accuracies (``accuracy[0]`` is v(0)).
      num_classes: number of classes, recorded.
      levels: (P - 1,) the contribution fractions of ``m[1:]``, recorded.

    Returns:
      The curve; its ``v`` is the running maximum of ``accuracy``.

    Raises:
      ValueError: naming ``m`` or ``accuracy``.
    """
    m = np.asarray(m, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if m.ndim != 1 or m.size < 2 or accuracy.shape != m.shape:
        raise ValueError(f"m and accuracy must be 1-D of one length >= 2, got shapes "
                         f"{m.shape} and {accuracy.shape}")
    if not np.isfinite(m).all() or m[0] != 0 or not (np.diff(m) > 0).all():
        raise ValueError(f"m must be finite, strictly increasing and start at 0, got "
                         f"{m.tolist()}")
    if not np.isfinite(accuracy).all():
        raise ValueError(f"accuracy must be finite, got {accuracy.tolist()}")
    return ValueCurve(m=_frozen(m), measured=_frozen(accuracy),
                      v=_frozen(np.maximum.accumulate(accuracy)), num_classes=num_classes,
                      levels=None if levels is None else _frozen(levels))


def _check_game(curve: ValueCurve, costs: Any, caps: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(curve, ValueCurve):
        raise ValueError(f"curve must be a ValueCurve, got {type(curve).__name__}")
    costs = check_costs(costs)
    return costs, _check_caps(caps, costs.size)


# ---------------------------------------------------------------------------------------
# Utilities and best responses


def shaped_accuracy(curve: ValueCurve, cost: float, target: float, m: Any, others: float,
                    delta: float = DEFAULT_DELTA) -> np.ndarray:
    """γ_i(m; m_−i) = max(v(m), v(m + others) − (1 + δ) c_i (target − m)_+).

    Args:
      curve: v.
      cost: c_i.
      target: the agent's target contribution m_i^†.
      m: its contribution(s).
      others: Σ_{j≠i} m_j.
      delta: δ.

    Returns:
      The accuracy the mechanism delivers, shaped like ``m``.
    """
    m = np.asarray(m, dtype=np.float64)
    short = np.maximum(target - m, 0.0)
    return np.maximum(curve(m), curve(m + others) - (1.0 + delta) * cost * short)


def _candidates(curve: ValueCurve, cap: float, others: float, extra: Sequence[float] = (),
                grid: int = 0) -> np.ndarray:
    """Every breakpoint of the agent's utility in ``[0, cap]``, and a grid."""
    points = [np.array([0.0, cap, *extra]), curve.m, curve.m - others]
    if grid:
        points.append(np.linspace(0.0, cap, grid))
    return np.unique(np.clip(np.concatenate(points), 0.0, cap))


def _largest_argmax(candidates: np.ndarray, utility: np.ndarray) -> float:
    return float(candidates[utility >= utility.max() - TIE].max())


def best_response(curve: ValueCurve, cost: float, cap: float, others: float = 0.0, *,
                  target: float | None = None, delta: float = DEFAULT_DELTA,
                  grid: int = 0) -> float:
    """The contribution that maximizes an agent's utility, the others' fixed.

    Naive scheme (``target`` None): ``argmax_{m in [0, cap]} v(m + others) − cost m``.
    Accuracy shaping: ``argmax γ(m; others) − cost m`` with ``shaped_accuracy``. Exact: the
    utility is piecewise linear, so its maximum is at one of its breakpoints, all of which
    are tried (and ``grid`` evenly spaced points more). Ties go to the larger contribution.

    Args:
      curve: v.
      cost: c_i >= 0.
      cap: n_i, the agent's available samples.
      others: Σ_{j≠i} m_j (0: the agent alone).
      target: m_i^† under the mechanism, or None for the naive scheme.
      delta: δ of the mechanism.
      grid: extra evenly spaced points to try (0: breakpoints only).

    Returns:
      The best response, in ``[0, cap]``.
    """
    if target is None:
        cand = _candidates(curve, cap, others, grid=grid)
        return _largest_argmax(cand, curve(cand + others) - cost * cand)
    cand = _candidates(curve, cap, others, extra=(target,), grid=grid)
    return _largest_argmax(cand, shaped_accuracy(curve, cost, target, cand, others, delta)
                           - cost * cand)


# ---------------------------------------------------------------------------------------
# Solo, naive equilibrium, mechanism


@dataclasses.dataclass(frozen=True, eq=False)
class Solo:
    """Each agent training alone on its own contribution.

    Attributes:
      contributions: (N,) m_i^solo = argmax_{m <= n_i} v(m) − c_i m (the largest maximizer).
      accuracies: (N,) v(m_i^solo).
      utilities: (N,) u_i^solo = v(m_i^solo) − c_i m_i^solo.
    """

    contributions: np.ndarray
    accuracies: np.ndarray
    utilities: np.ndarray


def solo(curve: ValueCurve, costs: Any, caps: Any) -> Solo:
    """Every agent's optimum alone: ``argmax_{m in [0, n_i]} v(m) − c_i m``.

    Args:
      curve: v.
      costs: (N,) c_i, finite and >= 0.
      caps: (N,) n_i.

    Returns:
      A Solo.

    Raises:
      ValueError: naming ``costs`` or ``caps``.
    """
    costs, caps = _check_game(curve, costs, caps)
    m = np.array([best_response(curve, c, n) for c, n in zip(costs, caps, strict=True)])
    acc = curve(m)
    return Solo(_frozen(m), _frozen(acc), _frozen(acc - costs * m))


def _slopes(curve: ValueCurve) -> np.ndarray:
    return np.diff(curve.v) / np.diff(curve.m)


def _reaches(curve: ValueCurve, cost: float, cap: float, total: float) -> tuple[float, float]:
    """How far below and above ``total`` the payoff ``h(y) = v(y) − cost y`` stays at most
    ``h(total)`` (up to ``TIE``): ``(left, right)``, ``left <= total``, ``right <= cap``.

    ``h`` is linear between v's breakpoints, so walking away from ``total`` over them finds
    the first point above the level exactly (by interpolation on the segment it crosses).
    """
    level = float(curve(total)) - cost * total + TIE

    def first_crossing(points: np.ndarray) -> float:
        h = curve(points) - cost * points
        above = np.flatnonzero(h > level)
        if above.size == 0:
            return float(points[-1])
        k = int(above[0])  # >= 1: h(points[0]) = h(total) <= level
        frac = (level - h[k - 1]) / (h[k] - h[k - 1])
        return float(points[k - 1] + frac * (points[k] - points[k - 1]))

    m = curve.m
    below = np.concatenate([[total], m[(m > 0) & (m < total)][::-1], [0.0]])
    above = np.concatenate([[total], m[(m > total) & (m < total + cap)], [total + cap]])
    return total - first_crossing(below), first_crossing(above) - total


def _profile_at(curve: ValueCurve, costs: np.ndarray, caps: np.ndarray, total: float,
                slack: float) -> np.ndarray | None:
    """A Nash profile of the naive scheme with ``Σ m_i = total``, or None if there is none.

    Agent i's window of reachable totals is ``[total − m_i, total − m_i + n_i]``; ``m_i`` is
    a best response iff ``h_i = v − c_i y`` peaks at ``total`` on it, i.e.
    ``n_i − right_i <= m_i <= left_i`` (``_reaches``). The profile exists iff every such
    interval is non-empty and their sums bracket ``total``; the interval ends are filled in
    agent order.
    """
    bounds = [_reaches(curve, c, n, total) for c, n in zip(costs, caps, strict=True)]
    left, right = np.array(bounds).T
    lo = np.maximum(0.0, caps - right)
    hi = np.minimum(caps, left)
    if (lo > hi + slack).any() or lo.sum() > total + slack or hi.sum() < total - slack:
        return None
    hi = np.maximum(hi, lo)
    room = np.maximum(total - lo.sum(), 0.0)
    extra = np.minimum(hi - lo, np.maximum(room - np.cumsum(hi - lo) + (hi - lo), 0.0))
    return lo + extra


def _candidate_totals(curve: ValueCurve, costs: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Every total a Nash equilibrium of the naive scheme can have (no cost equal to a
    slope of v assumed).

    Inside a segment of slope s an agent with ``c_i < s`` gains by giving more and one with
    ``c_i > s`` by giving less, so it sits at ``n_i`` or 0 and the total is the caps of the
    agents cheaper than s. At a breakpoint of v an agent strictly between 0 and ``n_i``
    needs ``right slope <= c_i <= left slope``; with no such agent the total is again such
    a sum of caps. Candidates: the caps of the k cheapest agents summed (k = 0..N), and
    the breakpoints (v is flat after its last one) at which some cost lies between the two
    slopes.
    """
    order = np.argsort(costs, kind="stable")
    sums = np.concatenate([[0.0], np.cumsum(caps[order])])
    slopes = _slopes(curve)
    left = slopes[:, None]
    right = np.concatenate([slopes[1:], [0.0]])[:, None]
    between = ((right <= costs[None, :]) & (costs[None, :] <= left)).any(axis=1)
    kinks = curve.m[1:][between]
    totals = np.concatenate([sums, kinks[kinks <= caps.sum()]])
    return np.unique(totals)


def naive_equilibria(curve: ValueCurve, costs: Any, caps: Any) -> tuple[np.ndarray,
                                                                         np.ndarray]:
    """Every total of a Nash equilibrium of the naive scheme, with one profile each.

    On a concave v the equilibrium total is unique; on a measured curve, which need not be
    concave, several totals can each be an equilibrium (agents stop at a kink of v, or all
    give their whole data past a steep stretch). The candidates of ``_candidate_totals``
    are each checked exactly (``_profile_at``). Complete when no cost equals the slope of a
    segment of v: with such a tie (a zero cost on a flat stretch of v, say) the agent is
    indifferent along the segment and totals inside it are not searched. At least one
    total is always found: the maximum of the potential ``v(Σ_j m_j) − Σ_j c_j m_j`` is an
    equilibrium, and its total is a candidate (at a given total the potential is largest
    with the cheapest agents filled first; over totals it then peaks at a sum of the
    cheapest caps or at a kink of v whose slopes enclose the marginal agent's cost).

    Args:
      curve: v.
      costs: (N,) c_i.
      caps: (N,) n_i.

    Returns:
      ``(totals, profiles)``: (K,) the equilibrium totals, ascending (K >= 1), and (K, N)
      an equilibrium profile of each (contributions summing to the total).

    Raises:
      ValueError: naming ``curve``, ``costs`` or ``caps``.
    """
    costs, caps = _check_game(curve, costs, caps)
    slack = 1e-9 * max(1.0, float(caps.sum()))
    totals, profiles = [], []
    for total in _candidate_totals(curve, costs, caps):
        profile = _profile_at(curve, costs, caps, float(total), slack)
        if profile is not None:
            totals.append(float(total))
            profiles.append(profile)
    return _frozen(totals), _frozen(np.reshape(profiles, (len(totals), costs.size)))


@dataclasses.dataclass(frozen=True, eq=False)
class Equilibrium:
    """The naive scheme's Nash equilibrium: everyone receives v(Σ_j m_j).

    ``contributions`` is the equilibrium reached by best responses from zero; ``totals``
    lists every equilibrium total (``naive_equilibria``), so ``lowest_total`` and
    ``highest_total`` bound what free riding can leave.

    Attributes:
      contributions: (N,) m_i.
      total: M = Σ m_i.
      accuracy: v(M), received by every agent.
      utilities: (N,) v(M) − c_i m_i.
      iterations: sweeps of sequential best responses run.
      converged: whether the last sweep changed no contribution (by more than ``tol``).
      gains: (N,) each agent's largest gain from deviating, ``<= 0`` at an equilibrium.
      totals: (K,) every equilibrium total, ascending.
      profiles: (K, N) an equilibrium profile with each of ``totals``.
    """

    contributions: np.ndarray
    total: float
    accuracy: float
    utilities: np.ndarray
    iterations: int
    converged: bool
    gains: np.ndarray
    totals: np.ndarray
    profiles: np.ndarray

    @property
    def max_gain(self) -> float:
        return float(self.gains.max())

    @property
    def lowest_total(self) -> float:
        """The smallest total of any Nash equilibrium."""
        return float(self.totals[0])

    @property
    def highest_total(self) -> float:
        """The largest total of any Nash equilibrium."""
        return float(self.totals[-1])


def naive_equilibrium(curve: ValueCurve, costs: Any, caps: Any, *, max_sweeps: int = 1000,
                      tol: float = 1e-9) -> Equilibrium:
    """Nash equilibrium of the naive scheme by iterated (sequential) best responses.

    Starting from no contributions, agents best-respond in turn
    (``best_response(curve, c_i, n_i, M_−i)``) until a whole sweep moves no contribution by
    more than ``tol * max(1, max n_i)``. The game is an exact potential game with potential
    ``v(Σ_j m_j) − Σ_j c_j m_j`` (its change under a move of agent i is agent i's change of
    utility), so each best response raises the potential and the sweeps settle.

    The equilibrium reached need not be the only one: on a non-concave v others can have a
    different total. Every equilibrium total is listed in the result's ``totals``
    (``naive_equilibria``; the one reached here is added when it is not among them, which
    happens only where a cost equals a slope of v).

    Args:
      curve: v.
      costs: (N,) c_i.
      caps: (N,) n_i.
      max_sweeps: at most this many sweeps.
      tol: convergence tolerance, relative to the largest cap, a finite number >= 0.

    Returns:
      An Equilibrium (``converged`` False when ``max_sweeps`` ran out).

    Raises:
      ValueError: naming ``costs``, ``caps``, ``max_sweeps`` or ``tol``.
    """
    costs, caps = _check_game(curve, costs, caps)
    check_int("max_sweeps", max_sweeps, 1)
    check_float("tol", tol, 0.0)
    m = np.zeros_like(costs)
    step = tol * max(1.0, float(caps.max()))
    converged, sweep = False, 0
    while sweep < max_sweeps and not converged:
        sweep += 1
        change = 0.0
        for i in range(m.size):
            new = best_response(curve, costs[i], caps[i], m.sum() - m[i])
            change, m[i] = max(change, abs(new - m[i])), new
        converged = bool(change <= step)
    total = float(m.sum())
    utilities = curve(total) - costs * m
    best = np.array([best_response(curve, costs[i], caps[i], total - m[i])
                     for i in range(m.size)])
    gains = curve(total - m + best) - costs * best - utilities
    totals, profiles = naive_equilibria(curve, costs, caps)
    slack = 1e-9 * max(1.0, float(caps.sum()))
    # Utilities are O(1): a gain of 1e-9 is rounding.
    if converged and gains.max() <= 1e-9 and np.abs(totals - total).min() > slack:
        order = np.argsort(np.append(totals, total), kind="stable")
        totals = np.append(totals, total)[order]
        profiles = np.vstack([profiles, m])[order]
    return Equilibrium(_frozen(m), total, float(curve(total)), _frozen(utilities), sweep,
                       converged, _frozen(gains), _frozen(totals), _frozen(profiles))


@dataclasses.dataclass(frozen=True, eq=False)
class Mechanism:
    """Accuracy shaping: targets, the accuracies and utilities at the targets, and the
    check that each target is its agent's best response.

    Attributes:
      targets: (N,) m_i^†.
      total: M^† = Σ m_i^†.
      accuracy: v(M^†), what every agent receives at its target.
      utilities: (N,) v(M^†) − c_i m_i^†.
      solo: the agents' solo optima (the individual-rationality reference).
      delta: δ.
      residual: |Σ_i t_i(M^†) − M^†|, how far M^† is from a fixed point (rounding only).
      capped: (N,) True where m_i^† = n_i (individual rationality may then be slack).
      best_responses: (N,) each agent's best response under the shaping functions, the
        others at their targets (equal to ``targets`` at an equilibrium).
      gains: (N,) each agent's largest gain from deviating from m_i^† (over the grid and
        every breakpoint of its utility); ``<= 0`` up to the tolerance at an equilibrium.
    """

    targets: np.ndarray
    total: float
    accuracy: float
    utilities: np.ndarray
    solo: Solo
    delta: float
    residual: float
    capped: np.ndarray
    best_responses: np.ndarray
    gains: np.ndarray

    @property
    def max_gain(self) -> float:
        return float(self.gains.max())

    def shaping(self, curve: ValueCurve, costs: Any, agent: int, m: Any) -> np.ndarray:
        """γ of ``agent`` at contribution(s) ``m``, the others at their targets."""
        costs = check_costs(costs, self.targets.size)
        others = self.total - self.targets[agent]
        return shaped_accuracy(curve, costs[agent], self.targets[agent], m, others,
                               self.delta)

    def anchored(self, curve: ValueCurve, costs: Any, contributions: Any,
                 achieved: Any) -> np.ndarray:
        """γ_i(m_i) of every agent (the others at their targets), with the pooled model's
        accuracy read off the model actually trained at the targets.

        The curve predicts v(M^†) for that model; a trained one reaches ``achieved[i]`` on
        agent i's data instead. The pooled term ``v(m_i + M_−i)`` is shifted by the
        difference, ``achieved[i] − v(M^†)``, so that an agent at its target is promised
        exactly the trained model and a deviation loses what the curve says it loses;
        ``v(m_i)`` (alone) stays. These are the accuracies a server holding the trained
        model can deliver (``deliver`` refuses more than ``achieved``).

        Args:
          curve: v.
          costs: (N,) c_i.
          contributions: (N,) m_i.
          achieved: (N,) the trained model's accuracy on each agent's training data.

        Returns:
          (N,) the targets.
        """
        costs = check_costs(costs, self.targets.size)
        m = np.asarray(contributions, np.float64)
        achieved = np.asarray(achieved, np.float64)
        others = self.total - self.targets
        short = np.maximum(self.targets - m, 0.0)
        pooled = curve(m + others) + achieved - self.accuracy
        return np.maximum(curve(m), pooled - (1.0 + self.delta) * costs * short)


def _level_crossings(curve: ValueCurve, levels: np.ndarray) -> np.ndarray:
    """The totals strictly inside v's rising segments at which v equals one of
    ``levels``."""
    lo, hi = curve.v[:-1], curve.v[1:]
    level = np.asarray(levels, np.float64)[:, None]
    inside = (lo < level) & (level < hi)
    frac = (level - lo) / np.where(hi > lo, hi - lo, 1.0)
    return (curve.m[:-1] + frac * np.diff(curve.m))[inside]


def shaping_mechanism(curve: ValueCurve, costs: Any, caps: Any,
                      delta: float = DEFAULT_DELTA, *, grid: int = 2001,
                      tol: float = 1e-10) -> Mechanism:
    """The accuracy-shaping mechanism's targets, and the check that they form an
    equilibrium.

    The target of agent i is the largest ``m <= n_i`` that leaves it as well off as alone:
    ``m_i^† = t_i(M^†)`` with ``t_i(M) = min(n_i, (v(M) − u_i^solo)_+ / c_i)`` (``n_i``
    when ``c_i = 0``) and ``M^† = Σ_j m_j^†``. ``T(M) = Σ_i t_i(M)`` is non-decreasing, so
    its fixed points can be many (on a curve with a plateau, one on the plateau and one with
    every agent at ``n_i``); ``M^†`` is the largest, which gives every agent its largest
    individually rational target. ``T(M) − M`` is piecewise linear with breakpoints at v's
    and where v crosses ``u_i^solo`` or ``u_i^solo + c_i n_i``; it is >= 0 at 0 and <= 0
    at ``Σ n_i``, so its largest root is found exactly: the last breakpoint where it is
    >= 0, and linear interpolation to the next one. ``M^† >= Σ_i m_i^solo`` (an agent's solo
    amount is individually rational against any larger total).

    Agent i then receives ``shaped_accuracy``; every agent's best response against the
    others at their targets is computed exactly (with a ``grid`` of extra points) and its
    gain over the target reported.

    Args:
      curve: v.
      costs: (N,) c_i.
      caps: (N,) n_i.
      delta: δ, a finite number > 0.
      grid: evenly spaced contributions tried besides the breakpoints.
      tol: a target within ``tol * max(1, max n_i)`` of its cap counts as capped, a finite
        number >= 0.

    Returns:
      A Mechanism.

    Raises:
      ValueError: naming ``costs``, ``caps``, ``delta``, ``grid`` or ``tol``.
    """
    costs, caps = _check_game(curve, costs, caps)
    delta = check_delta(delta)
    check_int("grid", grid, 0)
    check_float("tol", tol, 0.0)
    alone = solo(curve, costs, caps)
    free = costs == 0
    safe = np.where(free, 1.0, costs)

    def targets_at(totals: np.ndarray) -> np.ndarray:
        """(..., N) t_i at each of ``totals``."""
        totals = np.asarray(totals, np.float64)[..., None]
        rational = np.maximum(curve(totals) - alone.utilities, 0.0) / safe
        return np.where(free, caps, np.minimum(caps, rational))

    most = float(caps.sum())
    kinks = _level_crossings(curve, np.concatenate([alone.utilities,
                                                     alone.utilities + costs * caps]))
    points = np.unique(np.clip(np.concatenate([[0.0, most], curve.m, kinks]), 0.0, most))
    excess = targets_at(points).sum(axis=-1) - points
    k = int(np.flatnonzero(excess >= 0)[-1])  # excess[0] = T(0) >= 0
    root = points[k]
    if k < points.size - 1:
        root += excess[k] * (points[k + 1] - points[k]) / (excess[k] - excess[k + 1])
    m = targets_at(root)
    total = float(m.sum())
    accuracy = float(curve(total))
    utilities = accuracy - costs * m
    best = np.array([best_response(curve, costs[i], caps[i], total - m[i], target=m[i],
                                   delta=delta, grid=grid) for i in range(m.size)])
    others = total - m
    gains = (shaped_accuracy(curve, costs, m, best, others, delta) - costs * best
             - utilities)
    return Mechanism(
        targets=_frozen(m), total=total, accuracy=accuracy, utilities=_frozen(utilities),
        solo=alone, delta=delta, residual=float(abs(targets_at(total).sum() - total)),
        capped=_frozen(m >= caps - tol * max(1.0, float(caps.max())), bool),
        best_responses=_frozen(best), gains=_frozen(gains))
