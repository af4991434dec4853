"""Per-sample costs of the agents: given, or drawn from a named distribution."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from fedjax_sim.checks import check_float, check_int, check_seed

# Cost distributions and their parameters, as ``draw_costs`` reads them.
COST_DISTRIBUTIONS = {"uniform": ("lo", "hi"), "lognormal": ("mean", "sigma"),
                      "constant": ("c",)}


def _distributions() -> str:
    return ", ".join(f"{name}({', '.join(args)})" for name, args in COST_DISTRIBUTIONS.items())


def per_agent(name: str, values: Any, num_agents: int | None, meaning: str) -> np.ndarray:
    """Checks one finite number ``>= 0`` per agent (costs, available samples, ...).

    Args:
      name: how messages name the argument.
      values: array-like of shape (N,).
      num_agents: N, when known.
      meaning: what the numbers are, for the message.

    Returns:
      The values as a float64 array.

    Raises:
      ValueError: naming ``name``, the allowed range and the first bad agent.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be finite numbers >= 0, one per agent, got {values!r}"
                         ) from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a 1-D array of finite numbers >= 0 (one per "
                         f"agent), got shape {array.shape}")
    if num_agents is not None and array.size != num_agents:
        raise ValueError(f"{name} must have one entry per agent ({num_agents}), got "
                         f"{array.size}")
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite numbers >= 0 ({meaning}), got "
                         f"{float(array[i])!r} for agent {i}")
    return array


def check_costs(costs: Any, num_agents: int | None = None) -> np.ndarray:
    """Checks per-sample costs: one finite number ``>= 0`` per agent (``per_agent``)."""
    return per_agent("costs", costs, num_agents, "one per agent")


def parse_cost_spec(spec: str) -> tuple[str, tuple[float, ...]]:
    """Reads ``"uniform(lo, hi)"``, ``"lognormal(mean, sigma)"`` or ``"constant(c)"``.

    Returns:
      ``(name, parameters)``, checked: ``0 <= lo <= hi``; ``mean`` finite and ``sigma >= 0``
      (of ``log c``); ``c >= 0``; every number finite.

    Raises:
      ValueError: naming ``costs``: an unknown distribution, a wrong number of
        parameters, or a parameter out of range.
    """
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", str(spec))
    if match is None:
        raise ValueError(f"costs must be an array or one of {_distributions()}, got {spec!r}")
    name, body = match.group(1), match.group(2)
    if name not in COST_DISTRIBUTIONS:
        raise ValueError(f"costs: unknown distribution {name!r}; valid: {_distributions()}")
    names = COST_DISTRIBUTIONS[name]
    parts = [p.strip() for p in body.split(",")] if body.strip() else []
    if len(parts) != len(names):
        raise ValueError(f"costs: {name} takes {len(names)} parameter(s) ({', '.join(names)}),"
                         f" got {spec!r}")
    values = []
    for label, text in zip(names, parts, strict=True):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"costs: {name} parameter {label} must be a number, got "
                             f"{text!r}") from None
        values.append(value)
    lows = {"lo": 0.0, "hi": 0.0, "mean": None, "sigma": 0.0, "c": 0.0}
    for label, value in zip(names, values, strict=True):
        where = f"costs: {name} parameter {label}"
        if lows[label] is None:
            if not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value!r}")
        else:
            check_float(where, value, lows[label])
    if name == "uniform" and values[1] < values[0]:
        raise ValueError(f"costs: uniform(lo, hi) needs lo <= hi, got {spec!r}")
    return name, tuple(values)


def draw_costs(spec: Any, num_agents: int, *, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Per-sample costs of ``num_agents`` agents, given or drawn.

    Args:
      spec: an array of N costs, or a distribution: ``"uniform(lo, hi)"``,
        ``"lognormal(mean, sigma)"`` (``log c ~ Normal(mean, sigma)``) or ``"constant(c)"``.
      num_agents: N.
      seed: seed of ``np.random.default_rng`` for the drawn ones.
      scale: every cost is multiplied by it (a finite number >= 0).

    Returns:
      (N,) float64 costs, each finite and ``>= 0``.

    Raises:
      ValueError: naming ``costs`` (see ``check_costs``, ``parse_cost_spec``), ``seed``
        or ``scale``.
    """
    check_int("num_agents", num_agents, 1)
    check_seed("seed", seed)
    scale = check_float("scale", scale, 0.0)
    if not isinstance(spec, str):
        return check_costs(spec, num_agents) * scale
    name, params = parse_cost_spec(spec)
    rng = np.random.default_rng(seed)
    if name == "uniform":
        costs = rng.uniform(params[0], params[1], num_agents)
    elif name == "lognormal":
        costs = rng.lognormal(params[0], params[1], num_agents)
    else:
        costs = np.full(num_agents, params[0])
    return check_costs(costs * scale, num_agents)
