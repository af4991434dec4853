"""Per-client system model: how fast each device computes and talks, and when it is online.

Every field is an array with one entry per client (leading axis K), so the whole model
rides in the jitted round with the rest of the state and the kernels below run for all
clients at once:

* ``speed``: samples processed per virtual second of local training;
* ``up`` / ``down``: bandwidth in bytes per virtual second;
* ``p_off`` / ``p_on``: availability as a two-state Markov chain per client, advanced once
  per round (per server step in the asynchronous modes): an online client goes offline
  with probability ``p_off``, an offline one comes back with probability ``p_on``; the
  stationary online share is ``p_on / (p_on + p_off)``;
* ``dropout``: probability that a client that started a job never reports it (its work
  is wasted; the server learns of it at the job's would-be finish time, see
  ``core.clock``);
* ``trace`` (optional): (K, I, 2) online intervals ``[start, end)`` in virtual seconds,
  padded with empty ``[inf, inf)`` intervals; when given it replaces the Markov chain (a
  client is online at time t when t lies in one of its intervals).

A sampled client's job takes ``bytes_down / down + samples / speed + bytes_up / up``
virtual seconds (:func:`job_durations`), where ``samples`` is what its local budget
processes (``local_epochs * n_k``, or ``local_steps * batch_size``).

Presets: :func:`homogeneous` (every device alike), :func:`lognormal` (speeds and
bandwidths drawn log-normal; its medians and sigmas are this project's choice, with
FedScale's device profiles as the reference), :func:`from_arrays` (user arrays) and
:func:`load_system` (a ``.npz`` file). Availability traces are read by
:func:`load_trace` (JSON, format in its docstring). Every constructor checks its input on
the host, before anything is compiled.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Names of the per-client arrays, as a ``.npz`` system file holds them.
FIELDS = ("speed", "up", "down", "p_off", "p_on", "dropout")

# lognormal's defaults: medians and log-space sigmas. This project's choice, after the
# spread FedScale's device profiles show (compute and network each over one to two
# orders of magnitude across devices, uploads slower than downloads).
LOGNORMAL_DEFAULTS = {
    "speed_median": 100.0,      # samples / s
    "speed_sigma": 1.0,
    "down_median": 2.5e6,       # bytes / s (20 Mbit/s)
    "down_sigma": 1.0,
    "up_median": 0.75e6,        # bytes / s (6 Mbit/s)
    "up_sigma": 1.0,
}


@struct.dataclass
class SystemModel:
    """Per-client system parameters; every leaf has the client axis first (see the
    module docstring)."""

    speed: jax.Array
    up: jax.Array
    down: jax.Array
    p_off: jax.Array
    p_on: jax.Array
    dropout: jax.Array
    trace: jax.Array | None = None

    @property
    def num_clients(self) -> int:
        return int(np.shape(self.speed)[0])


def _vector(name: str, value: Any, num_clients: int, *, positive: bool) -> np.ndarray:
    """``value`` (a scalar or K values) as a checked float32 (K,) array."""
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {value!r}") from None
    if array.ndim == 0:
        array = np.full((num_clients,), float(array))
    if array.shape != (num_clients,):
        raise ValueError(f"{name} must hold one value per client ({num_clients}), got shape "
                         f"{array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers, got {array[~np.isfinite(array)][0]}")
    if positive and np.any(array <= 0):
        raise ValueError(f"{name} must be finite numbers > 0, got {array[array <= 0][0]}")
    if not positive and np.any((array < 0) | (array > 1)):
        bad = array[(array < 0) | (array > 1)][0]
        raise ValueError(f"{name} must be probabilities in [0, 1], got {bad}")
    return array.astype(np.float32)


def from_arrays(
    num_clients: int,
    *,
    speed: Any,
    up: Any,
    down: Any,
    p_off: Any = 0.0,
    p_on: Any = 1.0,
    dropout: Any = 0.0,
    trace: Any = None,
) -> SystemModel:
    """A system model from scalars or (K,) arrays, checked on the host.

    Args:
      num_clients: K.
      speed, up, down: finite numbers > 0 (samples/s, bytes/s, bytes/s).
      p_off, p_on, dropout: probabilities in [0, 1].
      trace: optional (K, I, 2) online intervals (see :func:`load_trace`).

    Returns:
      A :class:`SystemModel` with NumPy float32 leaves.

    Raises:
      ValueError: naming the parameter and the allowed range (non-positive or non-finite
        speeds and bandwidths, probabilities outside [0, 1], a wrong length).
    """
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    model = SystemModel(
        speed=_vector("speed", speed, num_clients, positive=True),
        up=_vector("up", up, num_clients, positive=True),
        down=_vector("down", down, num_clients, positive=True),
        p_off=_vector("p_off", p_off, num_clients, positive=False),
        p_on=_vector("p_on", p_on, num_clients, positive=False),
        dropout=_vector("dropout", dropout, num_clients, positive=False),
        trace=None if trace is None else _check_trace_array(trace, num_clients, "trace"),
    )
    return model


def homogeneous(num_clients: int, *, speed: float = 100.0, up: float = 1e6,
                down: float = 1e6, dropout: float = 0.0, p_off: float = 0.0,
                p_on: float = 1.0) -> SystemModel:
    """Every device alike: ``speed`` samples/s, ``up`` / ``down`` bytes/s, always online
    unless ``p_off`` > 0."""
    return from_arrays(num_clients, speed=speed, up=up, down=down, p_off=p_off, p_on=p_on,
                       dropout=dropout)


def lognormal(num_clients: int, *, seed: int = 0, dropout: float = 0.0, p_off: float = 0.0,
              p_on: float = 1.0, **params: float) -> SystemModel:
    """Speeds and bandwidths drawn log-normal per client, independently:
    ``median * exp(sigma * N(0, 1))``.

    Defaults (:data:`LOGNORMAL_DEFAULTS`, this project's choice with FedScale's device
    profiles as the reference): speed median 100 samples/s, download median 2.5 MB/s,
    upload median 0.75 MB/s, every sigma 1.0 (the middle 50% of devices within a factor
    of about 2 of the median, the fastest 5% about 27 times the slowest 5%).

    Args:
      params: overrides of ``speed_median``, ``speed_sigma``, ``down_median``,
        ``down_sigma``, ``up_median``, ``up_sigma`` (medians > 0, sigmas >= 0).

    Raises:
      ValueError: an unknown or out-of-range parameter.
    """
    unknown = sorted(set(params) - set(LOGNORMAL_DEFAULTS))
    if unknown:
        raise ValueError(f"lognormal takes {', '.join(LOGNORMAL_DEFAULTS)}, got "
                         f"{', '.join(unknown)}")
    values = {**LOGNORMAL_DEFAULTS, **params}
    for name, value in values.items():
        low_ok = value > 0 if name.endswith("median") else value >= 0
        if not (isinstance(value, int | float) and math.isfinite(value) and low_ok):
            bound = "> 0" if name.endswith("median") else ">= 0"
            raise ValueError(f"lognormal {name} must be a finite number {bound}, got {value!r}")
    rng = np.random.default_rng(seed)

    def draw(what):
        return values[f"{what}_median"] * np.exp(values[f"{what}_sigma"]
                                                 * rng.standard_normal(num_clients))

    return from_arrays(num_clients, speed=draw("speed"), down=draw("down"), up=draw("up"),
                       p_off=p_off, p_on=p_on, dropout=dropout)


def load_system(path: str | os.PathLike, num_clients: int) -> SystemModel:
    """A system model from a ``.npz`` file holding (K,) arrays ``speed``, ``up`` and
    ``down`` and optionally ``p_off``, ``p_on``, ``dropout`` (defaults 0, 1, 0).

    Raises:
      ValueError: naming the file: unreadable, a missing or unknown array, or a value out
        of range (as :func:`from_arrays`).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name]) for name in npz.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"system file {path}: cannot read it as .npz ({error})") from None
    unknown = sorted(set(arrays) - set(FIELDS))
    missing = [name for name in ("speed", "up", "down") if name not in arrays]
    if unknown or missing:
        raise ValueError(f"system file {path}: needs arrays speed, up, down (optional p_off, "
                         f"p_on, dropout); missing {missing}, unknown {unknown}")
    try:
        return from_arrays(num_clients, **arrays)
    except ValueError as error:
        raise ValueError(f"system file {path}: {error}") from None


def _check_trace_array(trace: Any, num_clients: int, where: str) -> np.ndarray:
    array = np.asarray(trace, np.float64)
    if array.ndim != 3 or array.shape[0] != num_clients or array.shape[2] != 2:
        raise ValueError(f"{where}: intervals must have shape (clients={num_clients}, I, 2), "
                         f"got {array.shape}")
    return array.astype(np.float32)


def load_trace(path: str | os.PathLike, num_clients: int) -> np.ndarray:
    """Online intervals from a JSON file.

    Format: ``{"intervals": [[[start, end], ...], ...]}``, one list per client (K lists,
    in client order), each a list of ``[start, end)`` pairs in virtual seconds when the
    client is online: finite numbers with ``0 <= start < end``, sorted and not
    overlapping. A client with no interval is never online.

    Returns:
      (K, I, 2) float32 intervals, I the longest list, shorter lists padded with
      ``[inf, inf)`` (never online).

    Raises:
      ValueError: naming the file and the problem (unreadable JSON, no ``intervals`` list,
        a wrong number of clients, a malformed, unsorted or overlapping interval).
    """
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"availability trace {path}: cannot read it as JSON ({error})") \
            from None
    lists = record.get("intervals") if isinstance(record, dict) else None
    if not isinstance(lists, list):
        raise ValueError(f"availability trace {path}: needs an object with key 'intervals', "
                         "a list with one list of [start, end] pairs per client")
    if len(lists) != num_clients:
        raise ValueError(f"availability trace {path}: 'intervals' has {len(lists)} clients, "
                         f"the data has {num_clients}")
    longest = max((len(c) for c in lists if isinstance(c, list)), default=0)
    table = np.full((num_clients, max(longest, 1), 2), np.inf, np.float64)
    for k, intervals in enumerate(lists):
        if not isinstance(intervals, list):
            raise ValueError(f"availability trace {path}: client {k}: expected a list of "
                             f"[start, end] pairs, got {intervals!r}")
        last_end = -np.inf
        for i, pair in enumerate(intervals):
            ok = (isinstance(pair, list) and len(pair) == 2
                  and all(isinstance(v, int | float) and not isinstance(v, bool)
                          and math.isfinite(v) for v in pair))
            if not ok or not 0 <= pair[0] < pair[1]:
                raise ValueError(f"availability trace {path}: client {k}, interval {i}: "
                                 "expected [start, end] with finite 0 <= start < end, got "
                                 f"{pair!r}")
            if pair[0] < last_end:
                raise ValueError(f"availability trace {path}: client {k}, interval {i}: "
                                 f"intervals must be sorted and not overlap, {pair!r} starts "
                                 f"before the previous one ends ({last_end})")
            last_end = pair[1]
            table[k, i] = pair
    return table.astype(np.float32)


def with_trace(model: SystemModel, trace: np.ndarray) -> SystemModel:
    """``model`` with its availability given by ``trace`` (from :func:`load_trace`)."""
    return model.replace(trace=_check_trace_array(trace, model.num_clients, "trace"))


def with_dropout(model: SystemModel, dropout: float) -> SystemModel:
    """``model`` with every client's dropout probability set to ``dropout``."""
    return model.replace(dropout=_vector("dropout", dropout, model.num_clients,
                                         positive=False))


# --- Kernels (jittable, all clients at once) --------------------------------------------


def job_durations(system: SystemModel, samples: jax.Array, bytes_down: float,
                  bytes_up: float) -> jax.Array:
    """(K,) virtual seconds of one job per client: download, local training of
    ``samples`` (K,) samples, upload."""
    samples = jnp.asarray(samples, jnp.float32)
    return (bytes_down / system.down + samples / system.speed) + bytes_up / system.up


def step_online(key: jax.Array, system: SystemModel, online: jax.Array) -> jax.Array:
    """One step of every client's on/off Markov chain: (K,) bool online afterwards."""
    u = jax.random.uniform(key, online.shape)
    return jnp.where(online, u >= system.p_off, u < system.p_on)


def online_at(system: SystemModel, time: jax.Array) -> jax.Array:
    """(K,) bool: whether each client's trace has it online at virtual ``time``."""
    start, end = system.trace[..., 0], system.trace[..., 1]
    return jnp.any((start <= time) & (time < end), axis=-1)


def availability(key: jax.Array, system: SystemModel, online: jax.Array,
                 time: jax.Array) -> jax.Array:
    """(K,) bool online now: the trace at ``time`` when the model has one, else one step
    of the Markov chain from ``online``."""
    if system.trace is not None:
        return online_at(system, time)
    return step_online(key, system, online)


def draw_dropout(key: jax.Array, system: SystemModel) -> jax.Array:
    """(K,) bool: which clients would drop out of a job they start now."""
    return jax.random.uniform(key, system.dropout.shape) < system.dropout


def stationary_online(system: SystemModel) -> np.ndarray:
    """(K,) long-run online share of each client's Markov chain,
    ``p_on / (p_on + p_off)`` (1 where both are 0: it never leaves its first state)."""
    p_on, p_off = np.asarray(system.p_on, np.float64), np.asarray(system.p_off, np.float64)
    total = p_on + p_off
    return np.where(total > 0, p_on / np.where(total > 0, total, 1.0), 1.0)
