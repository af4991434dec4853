"""Event-driven federation on a virtual clock.

A course of federated training is a sequence of events: a client's update arrives, every
awaited update arrived, a time budget ran out, a client went on or offline. With a
per-client system model (``core.system``) every dispatched client's job gets a finish time
(download, local training, upload); a *server condition* decides, from those times, which
updates the server aggregates and when. All of it runs inside the jitted round, for all
clients at once.

The round itself is the skeleton of ``core.rounds`` (dispatch, train, receive, aggregate):
the clock is passed into it as a ``core.rounds.Schedule`` (:meth:`Clock.schedule`), whose
dispatch step runs the events below, whose merge step is an asynchronous server's and
whose record step advances :class:`ClockState`. This module imports the skeleton's steps;
the skeleton imports nothing of the clock.

Conditions are small pure functions registered by name (:func:`register_condition`):

* synchronous ones, ``fn(finish, valid, clock) -> (arrived, round_time)`` over the
  cohort's N slots: ``finish`` (N,) the virtual seconds from the round's start when each
  slot's job ends, for the server (its update arrives, or it learns that the job dropped
  out; ``inf``: the slot holds no job), ``valid`` (N,) whether the job delivers an update.
  They say which updates the server aggregates and how long the round took. Built in:

  - ``wait_all``: the round lasts until every slot's job ended;
  - ``deadline``: aggregate what arrived by ``deadline`` T; the round ends at T, or when
    every slot's job ended before T; later work is wasted;
  - ``first_m``: over-selection: of the N sampled, aggregate the first M updates; the
    round ends at the M-th (or when every job ended, when fewer than M deliver).

* asynchronous ones, ``fn(current, uploads, starts, staleness, use, clock) -> new``: the
  server's merge of the updates of one server step into its model (in the space of the
  uploads): ``current`` the global model, ``uploads`` / ``starts`` (B, ...) the arrived
  models and the global models they started from, ``staleness`` (B,) server versions
  since then, ``use`` (B,) which entries are updates. Built in:

  - ``fedasync`` (Xie, Koyejo, Gupta 2019): ``w ← (1 − α_t) w + α_t w_k``, one update per
    step, ``α_t = async_alpha · (1 + τ)^(−staleness_exponent)``;
  - ``fedbuff`` (Nguyen et al., AISTATS 2022): the server buffers B = ``buffer_size``
    updates, weights each delta by ``1 / √(1 + τ)``, steps
    ``w ← w + server_lr · Σ_k w_k Δ_k / |used|`` and clears the buffer. B defaults to a
    tenth of the clients in flight (:func:`default_buffer`; the ratio of the paper's
    experiments, e.g. 10 of 100). B = C waits for as many updates as clients train at
    once; with every client in flight (C = K) that is a synchronous ``wait_all`` round:
    :func:`check_clock` warns about it.

Synchronous rounds: the aggregation weights become ``counts × arrived``; members whose
update is not aggregated keep their previous personal rows; a round where nothing arrived
leaves the server unchanged. The cohort is drawn among online clients (uniformly, as
without a system model when every client is online: then the cohort and every float equal
the plain round's).

In the asynchronous modes C = the usual cohort size clients are in flight, as FedBuff's
server keeps them (Nguyen et al. 2022, Algorithm 1): a client reports when its job ends,
and the server at once sends a job to another one. Each server step (one ``round`` of the
state) is one flush of the buffer: first the free slots are filled with clients drawn
among the online, free ones (event 0), then the step's events are taken one at a time in
time order (on (K,) finish times, a ``lax.while_loop``) until the B-th update arrives.
Every event but that last one frees its slot, which is filled at once, at the event's
time, with the model current then: the one of this step, not yet updated (event j for the
step's j-th event); the B-th update completes the buffer, the server merges the B updates,
advances the virtual clock to that arrival, and its slot is filled with the new model at
the next step's event 0. A dispatched client receives what the server sends at that
moment (kept per client: a (K, ...) copy, ``ClockState.start``, typed keys as raw key
data), is stamped with the server version (so its staleness counts from the model it
received) and gets a finish time from its dispatch. A client whose update waits in the
buffer is not drawn again before the flush (a buffer holds one update per client; its
personal rows are written at the flush): with populations much larger than C, as in the
paper, this rarely binds, and with C = K a freed slot waits for the flush. The updates of
a step are trained together, each from what it received. A step with nothing in flight and
no client online waits: with a trace the clock jumps to the next interval start.

Dropout, one model for every condition. A client that starts a job drops out of it with
its dropout probability, drawn when the job is sent. The server learns of it only when the
job would have finished, or when its round ends first (a deadline, the M-th update): a
dropped job never counts as an update, neither among ``wait_all``'s awaited nor ``first_m``'s
M nor in FedBuff's buffer, and its work is wasted. Its slot is refilled at the moment the
server learns of the drop, from the model current then: in a synchronous round by a client
drawn among the online clients not yet in the round (each client trains at most once a
round; with none left the slot stays empty), whose job the condition waits for as for any
other (``wait_all`` waits for it, ``deadline`` takes it if it arrives by T, ``first_m``
counts it among the M); in the asynchronous modes as at an arrival (the client that
dropped is free again). An asynchronous step handles at most C + ``EVENTS_PER_UPDATE`` · B
events: at dropout rates that reach it (near 1) the step merges the updates it holds.
FederatedScope and FedScale model a lost update otherwise (``experiments/clock.md``,
Dropout): a stale update dropped on arrival, its slot refilled at the next aggregation; a
client inactive at its completion time removed before its round is timed.

Random draws of the clock: event 0 of a round or step draws its clients
(:func:`dispatch_scores`) and its dropouts (:func:`dropout_draws`) with the salted keys of
:func:`step_keys`; event j >= 1 (the j-th drop the server learns of in a synchronous round,
the j-th arrival or drop of an asynchronous step) with those keys folded with j, among the
clients online then (the round's Markov state, or the trace at the event's time).

Availability decides who can be sampled (dispatched); a client that goes offline during a
job is modeled by its dropout probability, not by the availability chain or trace.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_sim.core import system as system_lib
from fedjax_sim.core.cohort import cohort_size
from fedjax_sim.core.rounds import Plan, RoundKeys, Schedule, draw_cohort, upload_view
from fedjax_sim.core.system import SystemModel
from fedjax_sim.kernels.aggregation import gather

# Salt of the clock's keys: folded into the round key, so that the keys the round draws
# its cohort and training from are those of a round without a system model.
_SALT = 0x0C10C4

SYNCHRONOUS = ("wait_all", "deadline", "first_m")
ASYNCHRONOUS = ("fedasync", "fedbuff")

# Round metrics and record fields of a clocked run.
CLOCK_METRICS = ("virtual_time", "round_time", "wasted_work", "aggregated")

# Events (arrivals and drops) an asynchronous server step handles per update of its
# buffer, besides one per client in flight: far more than dropout rates below 0.8 need.
EVENTS_PER_UPDATE = 8


class Condition(NamedTuple):
    """A registered server condition: its function and whether it is asynchronous."""

    name: str
    fn: Callable
    asynchronous: bool


_CONDITIONS: dict[str, Condition] = {}


def register_condition(name: str, fn: Callable, *, asynchronous: bool = False) -> None:
    """Adds a server condition (see the module docstring for the two signatures).

    Raises:
      ValueError: a name that is not an identifier, or a ``fn`` that is not callable.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"condition name must be an identifier, got {name!r}")
    if not callable(fn):
        raise ValueError(f"condition {name!r}: fn must be callable, got {type(fn).__name__}")
    _CONDITIONS[name] = Condition(name, fn, bool(asynchronous))


def conditions() -> tuple[str, ...]:
    """The registered condition names."""
    return tuple(_CONDITIONS)


def get_condition(name: str) -> Condition:
    """The condition ``name``.

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    if name not in _CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(_CONDITIONS)}, got {name!r}")
    return _CONDITIONS[name]


def default_buffer(flight: int) -> int:
    """FedBuff's default buffer size B for ``flight`` clients in flight: a tenth of them,
    rounded down, at least 1 (the ratio of Nguyen et al.'s experiments, 10 of 100)."""
    return max(1, flight // 10)


@dataclasses.dataclass(frozen=True)
class Clock:
    """A system model and the server condition a run follows.

    Attributes:
      system: the per-client system model.
      condition: a registered condition name.
      deadline: T in virtual seconds (``deadline``).
      first_m: M, updates aggregated per round (``first_m``), at most the cohort size.
      buffer_size: B, updates per server step (``fedbuff``; default
        :func:`default_buffer` of the cohort size, the clients in flight).
      async_alpha: α of ``fedasync``, in (0, 1].
      staleness_exponent: a of the polynomial staleness weight ``(1 + τ)^(−a)``, >= 0.
      server_lr: η_g of ``fedbuff``, > 0.
    """

    system: SystemModel
    condition: str = "wait_all"
    deadline: float | None = None
    first_m: int | None = None
    buffer_size: int | None = None
    async_alpha: float = 0.6
    staleness_exponent: float = 0.5
    server_lr: float = 1.0

    @property
    def asynchronous(self) -> bool:
        return get_condition(self.condition).asynchronous

    def buffer(self, flight: int) -> int:
        """Updates per server step of an asynchronous condition with ``flight`` clients
        in flight."""
        if self.condition == "fedasync":
            return 1
        return default_buffer(flight) if self.buffer_size is None else self.buffer_size

    def schedule(self, *, join_ratio: float, budget: tuple, comm_bytes: Callable,
                 batch_order: Any = None) -> Schedule:
        """The ``core.rounds.Schedule`` of this clock's condition, which the round skeleton
        (``core.rounds.federated``) runs under.

        Args:
          join_ratio: fixes the cohort size N (synchronous) or the clients in flight C.
          budget: ``(local_epochs, local_steps, batch_size)``: the samples a job processes.
          comm_bytes: the algorithm's ``comm_bytes(data) -> (up, down)`` of a cohort.
          batch_order: host batch orders (synchronous conditions only).

        Raises:
          ValueError: batch orders under an asynchronous condition.
        """
        if not self.asynchronous:
            return synchronous_schedule(self, join_ratio=join_ratio, budget=budget,
                                        comm_bytes=comm_bytes)
        if batch_order is not None:
            raise ValueError(f"condition {self.condition} takes no fixed batch order")
        return asynchronous_schedule(self, join_ratio=join_ratio, budget=budget,
                                     comm_bytes=comm_bytes)

    def describe(self) -> dict:
        """The settings as JSON-able values (the system model by its size)."""
        return {"condition": self.condition, "deadline": self.deadline,
                "first_m": self.first_m, "buffer_size": self.buffer_size,
                "async_alpha": self.async_alpha,
                "staleness_exponent": self.staleness_exponent, "server_lr": self.server_lr,
                "trace": self.system.trace is not None}


def _finite(label: str, value: Any, low: float, *, closed: bool, high: float | None = None,
            allowed: str) -> None:
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= low if closed else value > low)
          and (high is None or value <= high))
    if not ok:
        raise ValueError(f"{label} must be a finite number {allowed}, got {value!r}")


def check_clock(clock: Clock, num_clients: int, cohort: int) -> Clock:
    """Checks ``clock`` against a run of ``num_clients`` clients and cohort size
    ``cohort``, on the host, before anything is compiled.

    Warns (``UserWarning``) when FedBuff's buffer is as large as the ``cohort`` >= 2
    clients in flight: each step then waits for as many updates as clients train at once
    (with every client in flight, a synchronous round).

    Raises:
      ValueError: naming the setting and its allowed range: an unknown condition, a
        system model of another size, ``deadline`` unset or not > 0 for ``deadline``,
        ``first_m`` not in [1, cohort] for ``first_m``, ``buffer_size`` not in [1,
        cohort], ``async_alpha`` not in (0, 1], ``staleness_exponent`` < 0,
        ``server_lr`` <= 0.
    """
    if not isinstance(clock, Clock):
        raise ValueError(f"clock must be a core.clock.Clock, got {type(clock).__name__}")
    get_condition(clock.condition)
    if not isinstance(clock.system, SystemModel):
        raise ValueError("clock.system must be a core.system.SystemModel")
    if clock.system.num_clients != num_clients:
        raise ValueError(f"the system model has {clock.system.num_clients} clients, the data "
                         f"{num_clients}")
    if clock.condition == "deadline":
        if clock.deadline is None:
            raise ValueError("condition deadline needs deadline (virtual seconds > 0)")
        _finite("deadline", clock.deadline, 0, closed=False, allowed="> 0")
    if clock.condition == "first_m":
        m = clock.first_m
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= cohort:
            raise ValueError(f"first_m (over-selection: aggregate the first M of the N = "
                             f"{cohort} sampled) must be an integer in [1, {cohort}], got {m!r}")
    if clock.buffer_size is not None:
        b = clock.buffer_size
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= cohort:
            raise ValueError(f"buffer_size must be an integer in [1, {cohort}] (at most the "
                             f"clients in flight), got {b!r}")
    if clock.condition == "fedbuff" and cohort >= 2 and clock.buffer(cohort) == cohort:
        warnings.warn(f"fedbuff with buffer_size {cohort} = the {cohort} clients in flight: "
                      "each server step waits for as many updates as clients train at once "
                      "(with every client in flight, a synchronous wait_all round); FedBuff "
                      f"buffers fewer (default {default_buffer(cohort)})", UserWarning,
                      stacklevel=3)
    _finite("async_alpha", clock.async_alpha, 0, closed=False, high=1.0, allowed="in (0, 1]")
    _finite("staleness_exponent", clock.staleness_exponent, 0, closed=True, allowed=">= 0")
    _finite("server_lr", clock.server_lr, 0, closed=False, allowed="> 0")
    return clock


# --- Built-in conditions -----------------------------------------------------------------


def _last_end(finish):
    """When the last job of the round ended for the server (0 without any job)."""
    return jnp.max(jnp.where(jnp.isfinite(finish), finish, 0.0))


def wait_all(finish, valid, clock):
    """Every delivered update; the round lasts until every job ended."""
    del clock
    return valid, _last_end(finish)


def deadline(finish, valid, clock):
    """The updates that arrive by T; the round ends at T, or when every job ended before
    T."""
    arrived = valid & (finish <= clock.deadline)
    everyone = jnp.all(jnp.where(jnp.isfinite(finish), finish <= clock.deadline, True))
    return arrived, jnp.where(everyone, _last_end(finish), jnp.float32(clock.deadline))


def first_m(finish, valid, clock):
    """The first M updates; the round ends at the M-th (or when every job ended, with
    fewer than M)."""
    times = jnp.where(valid, finish, jnp.inf)
    rank = jnp.argsort(jnp.argsort(times, stable=True), stable=True)
    arrived = valid & (rank < clock.first_m)
    enough = jnp.sum(valid) >= clock.first_m
    return arrived, jnp.where(enough, jnp.max(jnp.where(arrived, finish, 0.0)),
                              _last_end(finish))


def staleness_weight(staleness, exponent):
    """The polynomial staleness weight ``(1 + τ)^(−a)``."""
    return jnp.power(1.0 + staleness.astype(jnp.float32), -jnp.float32(exponent))


def fedasync(current, uploads, starts, staleness, use, clock):
    """FedAsync's mixing of the one update of a step into the global model."""
    del starts
    alpha = clock.async_alpha * staleness_weight(staleness, clock.staleness_exponent)
    alpha = jnp.where(use, alpha, 0.0)[0]
    return jax.tree.map(lambda w, u: (1.0 - alpha) * w + alpha * u[0], current, uploads)


def fedbuff(current, uploads, starts, staleness, use, clock):
    """FedBuff's step on the buffered, staleness-weighted deltas."""
    weights = jnp.where(use, 1.0 / jnp.sqrt(1.0 + staleness.astype(jnp.float32)), 0.0)
    used = jnp.maximum(jnp.sum(use.astype(jnp.float32)), 1.0)
    scale = clock.server_lr / used

    def step(w, u, s):
        delta = jnp.tensordot(weights, (u - s).astype(jnp.float32), 1)
        return w + (scale * delta).astype(w.dtype)

    return jax.tree.map(step, current, uploads, starts)


for _name, _fn in (("wait_all", wait_all), ("deadline", deadline), ("first_m", first_m)):
    register_condition(_name, _fn)
register_condition("fedasync", fedasync, asynchronous=True)
register_condition("fedbuff", fedbuff, asynchronous=True)
del _name, _fn


# --- The state -----------------------------------------------------------------------------


@struct.dataclass
class ClockState:
    """The virtual clock in ``SimState.clock``.

    Attributes:
      time: scalar float32, virtual seconds since the start.
      online: (K,) bool, each client's on/off state (the Markov chain's).
      participation: (K,) int32, aggregated updates per client.
      trained: scalar float32, samples trained by every started job.
      wasted: scalar float32, of those, samples whose update was not aggregated.
      finish, version, dropped, staleness, server_version, start: asynchronous modes only
        (``None`` otherwise): (K,) finish time of each client's job in flight (inf: free),
        server version it started from, whether it dropped out, staleness of its last
        merged update; the server version (merging steps so far); and, with a (K, ...)
        leading axis, what the server sent each in-flight client (the method's
        ``broadcast`` output: the global model in upload space, and any other part, e.g.
        FedOBP's mask key, typed keys as their raw key data).
    """

    time: jax.Array
    online: jax.Array
    participation: jax.Array
    trained: jax.Array
    wasted: jax.Array
    finish: jax.Array | None = None
    version: jax.Array | None = None
    dropped: jax.Array | None = None
    staleness: jax.Array | None = None
    server_version: jax.Array | None = None
    start: Any = None


def init_clock(num_clients: int, start: Any = None) -> ClockState:
    """The clock at virtual time 0, every client online; with ``start`` (the model tree
    in upload space, no client axis) the asynchronous fields, nothing in flight."""
    k = num_clients
    state = ClockState(time=jnp.zeros((), jnp.float32), online=jnp.ones((k,), bool),
                       participation=jnp.zeros((k,), jnp.int32),
                       trained=jnp.zeros((), jnp.float32), wasted=jnp.zeros((), jnp.float32))
    if start is None:
        return state
    return state.replace(
        finish=jnp.full((k,), jnp.inf, jnp.float32), version=jnp.zeros((k,), jnp.int32),
        dropped=jnp.zeros((k,), bool), staleness=jnp.zeros((k,), jnp.int32),
        server_version=jnp.zeros((), jnp.int32),
        start=jax.tree.map(lambda a: jnp.zeros((k, *jnp.shape(a)), jnp.asarray(a).dtype),
                           start))


def _same_space(view: Any, uploads: Any) -> bool:
    try:
        pairs = jax.tree.map(lambda v, u: jnp.shape(v) == jnp.shape(u)[1:], view, uploads)
    except ValueError:
        return False
    return all(jax.tree.leaves(pairs))


def job_samples(train_counts: jax.Array, budget: tuple) -> jax.Array:
    """(K,) samples one job of each client processes: ``local_epochs · n_k``, or
    ``local_steps · batch_size`` when steps are fixed."""
    epochs, steps, batch = budget
    if steps is not None:
        return jnp.full(train_counts.shape, steps * batch, jnp.float32)
    return epochs * train_counts.astype(jnp.float32)


class _Jobs(NamedTuple):
    """(K,) one job of each client: its virtual seconds and its samples."""

    durations: jax.Array
    samples: jax.Array


def _jobs(system: SystemModel, data: Any, budget: tuple, comm_bytes: Callable,
          cohort: int) -> _Jobs:
    up, down = comm_bytes(data)
    samples = job_samples(data.train_counts, budget)
    durations = system_lib.job_durations(system, samples, float(down) / cohort,
                                         float(up) / cohort)
    return _Jobs(durations, samples)


def _system(clock: Clock) -> SystemModel:
    return jax.tree.map(jnp.asarray, clock.system)


def _idle_until(system: SystemModel, time: jax.Array) -> jax.Array:
    """When a server with nobody to wait for looks again: the next interval start of the
    trace, or now (the Markov chain steps with the next round)."""
    if system.trace is None:
        return time
    starts = system.trace[..., 0]
    later = jnp.min(jnp.where(starts > time, starts, jnp.inf))
    return jnp.where(jnp.isfinite(later), later, time)


def _metrics(clock: ClockState, round_time, aggregated) -> dict:
    return {"virtual_time": clock.time, "round_time": jnp.asarray(round_time, jnp.float32),
            "wasted_work": clock.wasted / jnp.maximum(clock.trained, 1.0),
            "aggregated": jnp.asarray(aggregated, jnp.int32)}


# --- Random draws of the events ----------------------------------------------------------


class StepKeys(NamedTuple):
    """The keys of one round or asynchronous server step, drawn from the state's key.

    Attributes:
      next: the state's key after the step.
      round: the key the method's ``broadcast`` gets (as in a plain round).
      avail, drop, pick: the availability step, the dropout draws and the client draws
        (salted, so that ``round`` stays a plain round's).
      train: the training keys of an asynchronous step (a synchronous round trains with
        the cohort key, as a plain round); ``None`` in a synchronous round.
    """

    next: jax.Array
    round: jax.Array
    avail: jax.Array
    drop: jax.Array
    pick: jax.Array
    train: jax.Array | None


def step_keys(state_key: jax.Array, *, asynchronous: bool = True) -> StepKeys:
    """The keys of the round (``asynchronous=False``) or asynchronous server step taken
    from a state with key ``state_key``."""
    return _salted(*jax.random.split(state_key), asynchronous=asynchronous)


def _salted(next_key: jax.Array, round_key: jax.Array, *, asynchronous: bool) -> StepKeys:
    salted = jax.random.fold_in(round_key, _SALT)
    if asynchronous:
        return StepKeys(next_key, round_key, *jax.random.split(salted, 4))
    return StepKeys(next_key, round_key, *jax.random.split(salted, 3), None)


def dispatch_scores(pick_key: jax.Array, event: Any, num_clients: int) -> jax.Array:
    """(K,) uniform scores by which dispatch event ``event`` of a round or asynchronous
    step ranks the clients it may send a job to (the highest first): event 0 draws the
    cohort among the online (synchronous) or fills the free slots at the step's start,
    event j >= 1 the slot of the j-th event (see the module docstring).
    ``pick_key``: ``step_keys(state.key, ...).pick``."""
    return jax.random.uniform(_event_key(pick_key, event), (num_clients,))


def dropout_draws(drop_key: jax.Array, event: Any, system: SystemModel) -> jax.Array:
    """(K,) bool: whether each client would drop out of a job sent at event ``event``.
    ``drop_key``: ``step_keys(state.key, ...).drop``."""
    return system_lib.draw_dropout(_event_key(drop_key, event), system)


def _event_key(key: jax.Array, event: Any) -> jax.Array:
    return key if isinstance(event, int) and event == 0 else jax.random.fold_in(key, event)


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _raw_keys(tree: Any) -> Any:
    """``tree`` with typed PRNG keys replaced by their raw integer data (so that the
    clock's copy of what the server sent is a plain array tree, checkpointed as one)."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _typed_keys(raw: Any, like: Any) -> Any:
    """``raw`` with the leaves that are typed keys in ``like`` wrapped back into keys."""
    return jax.tree.map(
        lambda r, a: jax.random.wrap_key_data(r, impl=jax.random.key_impl(a))
        if _is_key(a) else r, raw, like)


# --- Synchronous rounds ------------------------------------------------------------------


class _Slots(NamedTuple):
    """A synchronous round's N jobs, one per cohort slot.

    Attributes:
      client: (N,) int32, the client of each slot's job.
      end: (N,) float32, when the job ends for the server, in virtual seconds from the
        round's start: its update arrives, or the server learns that it dropped out (at its
        would-be finish); ``inf``: the slot holds no job (its client was offline).
      dropped: (N,) bool, the job dropped out.
      closed: (N,) bool, a dropped job whose slot found no client to take it.
    """

    client: jax.Array
    end: jax.Array
    dropped: jax.Array
    closed: jax.Array

    @property
    def valid(self) -> jax.Array:
        """(N,) bool: the slot's job delivers an update."""
        return jnp.isfinite(self.end) & ~self.dropped


class _RoundRecord(NamedTuple):
    """What a synchronous round's dispatch hands its record: the online state, (K,) who
    was aggregated, (N,) which slots held a job and its samples, the samples of the
    dropped jobs whose slot was refilled, and the round's length."""

    online: jax.Array
    aggregated: jax.Array
    started: jax.Array
    work: jax.Array
    lost: jax.Array
    round_time: jax.Array


def synchronous_schedule(clock: Clock, *, join_ratio: float, budget: tuple,
                         comm_bytes: Callable) -> Schedule:
    """The ``core.rounds.Schedule`` of a synchronous condition: the cohort is drawn among
    the online clients, each slot's job gets a finish time, dropped jobs are refilled when
    the server learns of them (the module docstring's dropout model), and the condition
    decides which updates count and how long the round lasts."""
    cond = get_condition(clock.condition)

    def dispatch(state, data, keys: RoundKeys, received) -> Plan:
        del received
        num_clients, c, system = data.num_clients, state.clock, _system(clock)
        size = cohort_size(num_clients, join_ratio)
        k = _salted(keys.next, keys.round, asynchronous=False)
        online = system_lib.availability(k.avail, system, c.online, c.time)
        uniform, train_key = draw_cohort(keys.cohort, num_clients, size)
        index = _online_cohort(uniform, online, k.pick, size)
        jobs = _jobs(system, data, budget, comm_bytes, size)
        slots = _first_jobs(index, online, jobs, dropout_draws(k.drop, 0, system))
        lost = jnp.zeros((), jnp.float32)
        # Refills need a free client (none under full participation) and a drop.
        if index is not None and np.any(np.asarray(clock.system.dropout) > 0):
            slots, lost = _refill(slots, cond=cond, clock=clock, system=system,
                                  online=online, start=c.time, keys=k, jobs=jobs)
            index = slots.client
        arrived, round_time = cond.fn(slots.end, slots.valid, clock)
        aggregated = (arrived if index is None
                      else jnp.zeros((num_clients,), bool).at[index].set(arrived))
        record = _RoundRecord(online, aggregated, jnp.isfinite(slots.end),
                              gather(jobs.samples, index), lost, round_time)
        return Plan(index, train_key, arrived, clock=record)

    def record(state, plan: Plan, cohort) -> tuple[Any, dict]:
        del cohort
        c, r = state.clock, plan.clock
        nobody = ~jnp.any(r.started)
        round_time = jnp.where(nobody, _idle_until(_system(clock), c.time) - c.time,
                               r.round_time)
        new_clock = c.replace(
            time=c.time + round_time, online=r.online,
            participation=c.participation + r.aggregated.astype(jnp.int32),
            trained=c.trained + jnp.sum(jnp.where(r.started, r.work, 0.0)) + r.lost,
            wasted=(c.wasted + jnp.sum(jnp.where(r.started & ~plan.present, r.work, 0.0))
                    + r.lost),
        )
        return (state.replace(clock=new_clock),
                _metrics(new_clock, round_time, jnp.sum(plan.present)))

    return Schedule(dispatch, record=record)


def _online_cohort(uniform: jax.Array | None, online: jax.Array, pick_key: jax.Array,
                   size: int) -> jax.Array | None:
    """The cohort: uniform among the online clients. The plain round's draw when it holds
    only online ones (always, when everyone is online), else a draw that prefers them."""
    if uniform is None:
        return None
    score = jnp.where(online, dispatch_scores(pick_key, 0, online.shape[0]), -1.0)
    _, preferred = jax.lax.top_k(score, size)
    return jnp.where(jnp.all(online[uniform]), uniform, preferred)


def _first_jobs(index: jax.Array | None, online: jax.Array, jobs: _Jobs,
                dropped: jax.Array) -> _Slots:
    """The jobs the round starts with: one per cohort member online now."""
    started = gather(online, index)
    client = jnp.arange(online.shape[0], dtype=jnp.int32) if index is None else index
    return _Slots(client, jnp.where(started, gather(jobs.durations, index), jnp.inf),
                  started & gather(dropped, index), jnp.zeros(started.shape, bool))


def _refill(slots: _Slots, *, cond: Condition, clock: Clock, system: SystemModel,
            online: jax.Array, start: jax.Array, keys: StepKeys,
            jobs: _Jobs) -> tuple[_Slots, jax.Array]:
    """Hands the slot of every dropped job the server learns of before the round ends
    (its would-be finish at most the round's end under the condition) to a client drawn
    among the online ones not yet in the round, in time order; event j is the j-th drop.

    Returns:
      The final slots, and the samples of the replaced (wasted) jobs.
    """
    num_clients = online.shape[0]

    def pending(s: _Slots) -> jax.Array:
        _, end = cond.fn(s.end, s.valid, clock)
        return s.dropped & ~s.closed & (s.end <= end)

    def event(carry):
        s, used, j, lost = carry
        slot = jnp.argmin(jnp.where(pending(s), s.end, jnp.inf))
        time, old = s.end[slot], s.client[slot]
        now = online if system.trace is None else system_lib.online_at(system, start + time)
        score = jnp.where(now & ~used, dispatch_scores(keys.pick, j, num_clients), -1.0)
        who = jnp.argmax(score).astype(s.client.dtype)
        found = score[who] >= 0
        s = _Slots(s.client.at[slot].set(jnp.where(found, who, old)),
                   s.end.at[slot].set(jnp.where(found, time + jobs.durations[who], time)),
                   s.dropped.at[slot].set(~found | dropout_draws(keys.drop, j, system)[who]),
                   s.closed.at[slot].set(~found))
        lost = lost + jnp.where(found, jobs.samples[old], 0.0)
        return s, used.at[who].set(used[who] | found), j + 1, lost

    used = jnp.zeros((num_clients,), bool).at[slots.client].set(True)
    slots, _, _, lost = jax.lax.while_loop(
        lambda carry: jnp.any(pending(carry[0])), event,
        (slots, used, jnp.int32(1), jnp.zeros((), jnp.float32)))
    return slots, lost


# --- Asynchronous server steps -----------------------------------------------------------


class _Flight(NamedTuple):
    """(K,) per client, the jobs in flight during an asynchronous step.

    Attributes:
      finish: finish time of its job in flight (virtual seconds; ``inf``: free).
      version: the server version its job started from.
      dropped: whether its job drops out.
      fresh: it was sent a job in this step.
      taken: its update waits in the buffer.
    """

    finish: jax.Array
    version: jax.Array
    dropped: jax.Array
    fresh: jax.Array
    taken: jax.Array


class _Buffer(NamedTuple):
    """The step's updates in arrival order: (B,) clients and the server versions their
    jobs started from, the first ``count`` of them filled."""

    who: jax.Array
    version: jax.Array
    count: jax.Array


class _StepRecord(NamedTuple):
    """What an asynchronous step's dispatch hands its merge and record."""

    online: jax.Array
    flight: _Flight
    staleness: jax.Array
    work: jax.Array
    lost: jax.Array
    now: jax.Array
    start: Any


def asynchronous_schedule(clock: Clock, *, join_ratio: float, budget: tuple,
                          comm_bytes: Callable) -> Schedule:
    """The ``core.rounds.Schedule`` of an asynchronous condition: one server step per
    round of the state (see the module docstring)."""
    cond = get_condition(clock.condition)

    def dispatch(state, data, keys: RoundKeys, received) -> Plan:
        num_clients, c, system = data.num_clients, state.clock, _system(clock)
        flight = cohort_size(num_clients, join_ratio)
        size, events = clock.buffer(flight), flight + EVENTS_PER_UPDATE * clock.buffer(flight)
        k = _salted(keys.next, keys.round, asynchronous=True)
        online = system_lib.availability(k.avail, system, c.online, c.time)
        jobs = _jobs(system, data, budget, comm_bytes, flight)
        send = _sender(k, system, jobs, flight, c.server_version)
        # Event 0: the free slots go to online, free clients, who receive the current
        # model (after the previous step's flush).
        free = ~jnp.isfinite(c.finish)
        nobody = jnp.zeros((num_clients,), bool)
        f = send(0, c.time, _Flight(c.finish, c.version, c.dropped, nobody, nobody),
                 free & online, flight - jnp.sum(~free))
        f, buf, count, last, lost = _events(f, send, online=online, system=system, size=size,
                                            flight=flight, events=events, time=c.time,
                                            samples=jobs.samples)
        index = _with_placeholders(buf, f.taken)
        use = jnp.arange(size) < buf.count
        now = jnp.where(count == 0, _idle_until(system, c.time), jnp.maximum(c.time, last))
        start = _keep_sent(c.start, _raw_keys(received), f.fresh,
                           min(num_clients, flight + events))
        record = _StepRecord(online, f, c.server_version - buf.version,
                             jnp.where(use, jobs.samples[index], 0.0), lost, now, start)
        return Plan(index, k.train, use, _typed_keys(gather(start, index), received), record)

    def merge(received, plan: Plan, uploads):
        current = upload_view(received)
        if not _same_space(current, uploads):
            raise ValueError("asynchronous conditions need uploads in the space of the model "
                             "the server sends (the client's new model or its shared part)")
        return cond.fn(current, uploads, upload_view(plan.sent), plan.clock.staleness,
                       plan.present, clock)

    return Schedule(dispatch, merge=merge, record=_step_record)


def _sender(keys: StepKeys, system: SystemModel, jobs: _Jobs, flight: int,
            server_version: jax.Array) -> Callable:
    """``send(event, time, f, available, need) -> f``: event ``event`` sends jobs, with
    the model current then, to the (at most ``need``) ``available`` clients it ranks
    highest."""

    def send(event, time, f: _Flight, available, need) -> _Flight:
        num_clients = f.finish.shape[0]
        new = _dispatch(dispatch_scores(keys.pick, event, num_clients), available, need,
                        flight, num_clients)
        drop = dropout_draws(keys.drop, event, system)
        return f._replace(finish=jnp.where(new, time + jobs.durations, f.finish),
                          version=jnp.where(new, server_version, f.version),
                          dropped=jnp.where(new, drop, f.dropped), fresh=f.fresh | new)

    return send


def _dispatch(scores: jax.Array, available: jax.Array, need: jax.Array, flight: int,
              num_clients: int) -> jax.Array:
    """(K,) bool: the (at most ``need``) available clients with the highest scores."""
    ranked = jnp.where(available, scores, -1.0)
    top, picks = jax.lax.top_k(ranked, flight)
    take = (jnp.arange(flight) < need) & (top >= 0)
    target = jnp.where(take, picks, num_clients)  # num_clients: written nowhere
    return jnp.zeros((num_clients,), bool).at[target].set(True, mode="drop")


def _events(f: _Flight, send: Callable, *, online, system, size, flight, events, time,
            samples) -> tuple:
    """The step's events in time order, until the B-th update arrives, nothing is in
    flight or ``events`` events passed. An update enters the buffer, a drop is wasted;
    every event but the B-th update hands its slot to a new client at once, among those
    online then, free and without an update in the buffer.

    Returns:
      ``(flight, buffer, events handled, time of the last, samples of the drops)``.
    """
    num_clients = f.finish.shape[0]

    def event(carry):
        f, buf, j, _, lost = carry
        who = jnp.argmin(f.finish)
        time, valid = f.finish[who], ~f.dropped[who]
        gone = jnp.arange(num_clients) == who
        buf = _Buffer(buf.who.at[buf.count].set(jnp.where(valid, who, buf.who[buf.count])),
                      buf.version.at[buf.count].set(
                          jnp.where(valid, f.version[who], buf.version[buf.count])),
                      buf.count + valid.astype(jnp.int32))
        f = f._replace(finish=jnp.where(gone, jnp.inf, f.finish), taken=f.taken | (gone & valid))
        now = online if system.trace is None else system_lib.online_at(system, time)
        need = jnp.where(buf.count < size, flight - jnp.sum(jnp.isfinite(f.finish)), 0)
        f = send(j, time, f, now & ~jnp.isfinite(f.finish) & ~f.taken, need)
        return f, buf, j + 1, time, lost + jnp.where(valid, 0.0, samples[who])

    def going(carry):
        f, buf, j, _, _ = carry
        return (buf.count < size) & jnp.any(jnp.isfinite(f.finish)) & (j <= events)

    empty = jnp.zeros((size,), jnp.int32)
    f, buf, j, last, lost = jax.lax.while_loop(
        going, event, (f, _Buffer(empty, empty, jnp.int32(0)), jnp.int32(1),
                       jnp.asarray(time, jnp.float32), jnp.zeros((), jnp.float32)))
    return f, buf, j - 1, last, lost


def _with_placeholders(buf: _Buffer, taken: jax.Array) -> jax.Array:
    """(B,) the buffer's clients, its unfilled entries given the lowest-numbered clients
    without an update in it (distinct rows, trained and never used)."""
    size = buf.who.shape[0]
    spare, = jnp.nonzero(~taken, size=size, fill_value=0)
    slot = jnp.arange(size)
    return jnp.where(slot < buf.count, buf.who, spare[jnp.maximum(slot - buf.count, 0)])


def _keep_sent(start: Any, sent: Any, fresh: jax.Array, most: int) -> Any:
    """The per-client copy of what the server sent, with ``sent`` written for every client
    dispatched in this step (at most ``most`` of them)."""
    num_clients = fresh.shape[0]
    written, = jnp.nonzero(fresh, size=most, fill_value=num_clients)
    return jax.tree.map(
        lambda s, g: s.at[written].set(jnp.broadcast_to(g, (written.shape[0], *g.shape)),
                                       mode="drop"), start, sent)


def _step_record(state, plan: Plan, cohort) -> tuple[Any, dict]:
    """An asynchronous step's record: the virtual clock after its flush."""
    del cohort
    c, r, use, index = state.clock, plan.clock, plan.present, plan.index
    num_clients = c.finish.shape[0]
    merged = jnp.where(use, index, num_clients)  # num_clients: written nowhere
    new_clock = c.replace(
        time=r.now, online=r.online,
        participation=c.participation + jnp.zeros((num_clients,), jnp.int32).at[merged].set(
            1, mode="drop"),
        trained=c.trained + jnp.sum(r.work) + r.lost, wasted=c.wasted + r.lost,
        finish=r.flight.finish, version=r.flight.version, dropped=r.flight.dropped,
        staleness=c.staleness.at[merged].set(r.staleness, mode="drop"),
        server_version=c.server_version + jnp.any(use).astype(jnp.int32), start=r.start,
    )
    return state.replace(clock=new_clock), _metrics(new_clock, r.now - c.time, jnp.sum(use))


def clocked_init(method, init_with: Callable, clock: Clock) -> Callable:
    """``init_with`` that adds the clock (and, for an asynchronous condition, the per-client
    copy of the model in upload space) to the state."""

    def init(key, data, hp):
        state = init_with(key, data, hp)
        start = None
        if clock.asynchronous:
            _, received, _ = method.broadcast(hp, state, state.key)
            start = _raw_keys(received)
        return state.replace(clock=init_clock(data.num_clients, start))

    return init


def participation_report(state) -> dict:
    """Summary fields of the clock: per-client aggregated updates, their Gini, min and
    max, and the final virtual time and wasted share."""
    counts = np.asarray(state.clock.participation, np.float64)
    return {
        "participation": counts.astype(int).tolist(),
        "participation_gini": gini(counts),
        "participation_min": int(counts.min()),
        "participation_max": int(counts.max()),
        "virtual_time": float(state.clock.time),
        "wasted_work": float(state.clock.wasted / max(float(state.clock.trained), 1.0)),
    }


def gini(values: Any) -> float:
    """Gini coefficient of non-negative ``values`` (0: all equal; 0 for all zeros)."""
    v = np.sort(np.asarray(values, np.float64))
    total = v.sum()
    if total <= 0:
        return 0.0
    n = v.size
    return float((2 * np.sum(np.arange(1, n + 1) * v) / (n * total)) - (n + 1) / n)
