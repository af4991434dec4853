"""The data-sharing game on a measured accuracy curve: the value curve v(m), the solo
optimum, the naive scheme's Nash equilibrium and the accuracy-shaping mechanism.

Pure NumPy: the game has one variable per agent. ``v`` is piecewise linear, so every
utility below is piecewise linear in an agent's own contribution and its maximum lies at
a breakpoint or an end of ``[0, n_i]``: the best responses are exact, not grid searches.
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


@dataclasses.dataclass(frozen=True, eq=False)
class Equilibrium:
    """The naive scheme's Nash equilibrium: everyone receives v(Σ_j m_j).

    Attributes:
      contributions: (N,) m_i.
      total: M = Σ m_i.
      accuracy: v(M), received by every agent.
      utilities: (N,) v(M) − c_i m_i.
      iterations: sweeps of sequential best responses run.
      converged: whether the last sweep changed no contribution (by more than ``tol``).
      gains: (N,) each agent's largest gain from deviating, ``<= 0`` at an equilibrium.
    """

    contributions: np.ndarray
    total: float
    accuracy: float
    utilities: np.ndarray
    iterations: int
    converged: bool
    gains: np.ndarray

    @property
    def max_gain(self) -> float:
        return float(self.gains.max())


def naive_equilibrium(curve: ValueCurve, costs: Any, caps: Any, *, max_sweeps: int = 1000,
                      tol: float = 1e-9) -> Equilibrium:
    """Nash equilibrium of the naive scheme by iterated (sequential) best responses.

    Starting from no contributions, agents best-respond in turn
    (``best_response(curve, c_i, n_i, M_−i)``) until a whole sweep moves no contribution by
    more than ``tol * max(1, max n_i)``. The game is an exact potential game with potential
    ``v(Σ_j m_j) − Σ_j c_j m_j`` (its change under a move of agent i is agent i's change of
    utility), so each best response raises the potential and the sweeps settle.

    Args:
      curve: v.
      costs: (N,) c_i.
      caps: (N,) n_i.
      max_sweeps: at most this many sweeps.
      tol: convergence tolerance, relative to the largest cap.

    Returns:
      An Equilibrium (``converged`` False when ``max_sweeps`` ran out).

    Raises:
      ValueError: naming ``costs``, ``caps`` or ``max_sweeps``.
    """
    costs, caps = _check_game(curve, costs, caps)
    check_int("max_sweeps", max_sweeps, 1)
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
    return Equilibrium(_frozen(m), total, float(curve(total)), _frozen(utilities), sweep,
                       converged, _frozen(gains))


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
      iterations: fixed-point iterations run.
      converged: whether M^† moved by at most the tolerance in the last one.
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
    iterations: int
    converged: bool
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


def shaping_mechanism(curve: ValueCurve, costs: Any, caps: Any,
                      delta: float = DEFAULT_DELTA, *, grid: int = 2001,
                      max_iter: int = 100_000, tol: float = 1e-10) -> Mechanism:
    """The accuracy-shaping mechanism's targets, and the check that they form an
    equilibrium.

    The target of agent i is the largest ``m <= n_i`` that leaves it as well off as alone:
    ``m_i^† = min(n_i, (v(M^†) − u_i^solo) / c_i)`` (``n_i`` when ``c_i = 0``), with
    ``M^† = Σ_j m_j^†``. The map ``M -> Σ_i min(n_i, (v(M) − u_i^solo) / c_i)`` is
    non-decreasing and, started from the solo amounts, never goes down (an agent's solo
    amount already satisfies individual rationality against any larger total), so iterating
    it climbs to the smallest fixed point above ``Σ_i m_i^solo``.

    Agent i then receives ``shaped_accuracy``; every agent's best response against the
    others at their targets is computed exactly (with a ``grid`` of extra points) and its
    gain over the target reported.

    Args:
      curve: v.
      costs: (N,) c_i.
      caps: (N,) n_i.
      delta: δ, a finite number > 0.
      grid: evenly spaced contributions tried besides the breakpoints.
      max_iter: at most this many fixed-point iterations.
      tol: stop once M^† moves by at most ``tol * max(1, v's last total)``.

    Returns:
      A Mechanism.

    Raises:
      ValueError: naming ``costs``, ``caps``, ``delta``, ``grid`` or ``max_iter``.
    """
    costs, caps = _check_game(curve, costs, caps)
    delta = check_delta(delta)
    check_int("grid", grid, 0)
    check_int("max_iter", max_iter, 1)
    alone = solo(curve, costs, caps)
    free = costs == 0
    safe = np.where(free, 1.0, costs)

    def targets_at(total: float) -> np.ndarray:
        rational = np.maximum(curve(total) - alone.utilities, 0.0) / safe
        return np.where(free, caps, np.minimum(caps, rational))

    m = np.array(alone.contributions)
    step = tol * max(1.0, curve.total)
    converged, iteration = False, 0
    while iteration < max_iter and not converged:
        iteration += 1
        new = targets_at(m.sum())
        converged = bool(abs(new.sum() - m.sum()) <= step)
        m = new
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
        solo=alone, delta=delta, iterations=iteration, converged=converged,
        capped=_frozen(m >= caps - step, bool), best_responses=_frozen(best),
        gains=_frozen(gains))

