"""Event-driven federation on a virtual clock.

A course of federated training is a sequence of events: a client's update arrives, every
awaited update arrived, a time budget ran out, a client went on or offline. With a
per-client system model (``core.system``) every sampled client's job gets a finish time
(download, local training, upload); a *server condition* decides, from those times, which
updates the server aggregates and when. All of it runs inside the jitted round, for all
clients at once.

Conditions are small pure functions registered by name (:func:`register_condition`):

* synchronous ones, ``fn(finish, valid, clock) -> (arrived, round_time)`` over the
  cohort's (N,) finish times (virtual seconds from the round's start) and (N,) ``valid``
  (online when sampled and not dropped): which updates the server aggregates and how long
  the round took. Built in:

  - ``wait_all``: today's synchronous round; the round lasts until the slowest valid
    member arrives (a dropped client is not waited for);
  - ``deadline``: aggregate what arrived by ``deadline`` T; the round ends at T, or at the
    last arrival when every valid member arrived before T; later work is wasted;
  - ``first_m``: over-selection: of the N sampled, aggregate the first M arrivals; the
    round ends at the M-th (or the last valid one when fewer than M are valid).

* asynchronous ones, ``fn(current, uploads, starts, staleness, use, clock) -> new``: the
  server's merge of the arrivals of one server step into its model (in the space of the
  uploads): ``current`` the global model, ``uploads`` / ``starts`` (B, ...) the arrived
  models and the global models they started from, ``staleness`` (B,) server versions
  since then, ``use`` (B,) which arrivals count. Built in:

  - ``fedasync`` (Xie, Koyejo, Gupta 2019): ``w ← (1 − α_t) w + α_t w_k``, one arrival
    per step, ``α_t = async_alpha · (1 + τ)^(−staleness_exponent)``;
  - ``fedbuff`` (Nguyen et al., AISTATS 2022): the server buffers B = ``buffer_size``
    arrivals, weights each delta by ``1 / √(1 + τ)``, steps
    ``w ← w + server_lr · Σ_k w_k Δ_k / |used|`` and clears the buffer.

Synchronous rounds keep the round skeleton (``core.rounds.federated``): the aggregation
weights become ``counts × arrived``; members whose update is not aggregated keep their
previous personal rows; a round where nothing arrived leaves the server unchanged. The
cohort is drawn among online clients (uniformly, as without a system model when every
client is online: then the cohort and every float equal today's round).

In the asynchronous modes C = the usual cohort size clients are in flight, as FedBuff's
server keeps them (Nguyen et al. 2022, Algorithm 1): a client reports when its job ends,
and the server at once sends a job to another one. Each server step (one ``round`` of the
state) is one flush of the buffer: first the free slots are filled with clients drawn
among the online, free ones (event 0), then the B next arrivals are taken one event at a
time in time order (on (K,) finish times; a ``lax.scan`` over the first B − 1, which send
jobs: none for FedAsync, B = 1). Every arrival but the B-th frees its slot, which is
filled at once, at the arrival's time, with the model current then: the one of this step,
not yet updated (event j for the j-th arrival); the B-th arrival's update completes the
buffer, the server merges the B updates, advances the virtual clock to that arrival, and
its slot is filled with the new model at the next step's event 0. A dispatched client
receives what the server sends at that moment (kept per client: a (K, ...) copy,
``ClockState.start``, typed keys as raw key data), is stamped with the server version (so
its staleness counts from the model it received) and gets a finish time from its dispatch.
A client whose update waits in the buffer is not drawn again before the flush (a buffer
holds one update per client; its personal rows are written at the flush): with populations
much larger than C, as in the paper, this rarely binds, and with C = K a freed slot waits
for the flush. The arrivals of a step are trained together, each from what it received.
Event j >= 1 draws its clients and their dropouts with the step's keys folded with j
(:func:`dispatch_scores`), among the clients online then (the step's Markov state, or the
trace at the arrival's time); event 0 uses the step's keys unfolded, so FedAsync (B = 1,
no event inside a step sends a job) is unchanged. Personal rows (FedPer's heads, FedOBP's
personal parts) are written back when a client's update is merged. A dropped client holds
its slot until its would-be finish time and its update is then discarded (wasted), still
counting as one of the step's B arrivals. A step with nothing in flight and no client
online waits: with a trace the clock jumps to the next interval start.

Availability decides who can be sampled (dispatched); a client that goes offline during a
job is modeled by its dropout probability, not by the availability chain or trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_sim.core import system as system_lib
from fedjax_sim.core.cohort import client_map, cohort_size
from fedjax_sim.core.rounds import (
    CohortResult,
    advance,
    draw_cohort,
    round_orders,
    run_cohort,
    with_examples,
)
from fedjax_sim.core.system import SystemModel
from fedjax_sim.kernels.aggregation import gather, scatter

# Salt of the clock's keys: folded into the round key, so that the keys the round draws
# its cohort and training from are those of a round without a system model.
_SALT = 0x0C10C4

SYNCHRONOUS = ("wait_all", "deadline", "first_m")
ASYNCHRONOUS = ("fedasync", "fedbuff")

# Round metrics and record fields of a clocked run.
CLOCK_METRICS = ("virtual_time", "round_time", "wasted_work", "aggregated")


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


@dataclasses.dataclass(frozen=True)
class Clock:
    """A system model and the server condition a run follows.

    Attributes:
      system: the per-client system model.
      condition: a registered condition name.
      deadline: T in virtual seconds (``deadline``).
      first_m: M, updates aggregated per round (``first_m``), at most the cohort size.
      buffer_size: B, arrivals per server step (``fedbuff``; default: the cohort size).
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

    def buffer(self, cohort: int) -> int:
        """Arrivals per server step of an asynchronous condition."""
        if self.condition == "fedasync":
            return 1
        return cohort if self.buffer_size is None else self.buffer_size

    def round(self, method, *, join_ratio: float, execution, budget: tuple,
              comm_bytes: Callable, batch_order: Any = None) -> Callable:
        """``round_with(state, data, hp)`` of ``method`` on this clock: the round skeleton
        (``core.rounds.federated``) hands the round to its clock, which knows its
        condition; the skeleton never imports this module."""
        common = dict(join_ratio=join_ratio, execution=execution, clock=self, budget=budget,
                      comm_bytes=comm_bytes)
        if self.asynchronous:
            if batch_order is not None:
                raise ValueError(f"condition {self.condition} takes no fixed batch order")
            return asynchronous_round(method, **common)
        return synchronous_round(method, batch_order=batch_order, **common)

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
    _finite("async_alpha", clock.async_alpha, 0, closed=False, high=1.0, allowed="in (0, 1]")
    _finite("staleness_exponent", clock.staleness_exponent, 0, closed=True, allowed=">= 0")
    _finite("server_lr", clock.server_lr, 0, closed=False, allowed="> 0")
    return clock


# --- Built-in conditions -----------------------------------------------------------------


def wait_all(finish, valid, clock):
    """Every valid member; the round lasts until the slowest of them."""
    del clock
    return valid, jnp.max(jnp.where(valid, finish, 0.0))


def deadline(finish, valid, clock):
    """The valid members that arrive by T; the round ends at T, or at the last arrival
    when every valid member arrived before T."""
    arrived = valid & (finish <= clock.deadline)
    everyone = jnp.all(arrived == valid)
    last = jnp.max(jnp.where(arrived, finish, 0.0))
    return arrived, jnp.where(everyone, last, jnp.float32(clock.deadline))


def first_m(finish, valid, clock):
    """The first M valid arrivals; the round ends at the M-th (or the last valid one)."""
    times = jnp.where(valid, finish, jnp.inf)
    rank = jnp.argsort(jnp.argsort(times, stable=True), stable=True)
    arrived = valid & (rank < clock.first_m)
    return arrived, jnp.max(jnp.where(arrived, finish, 0.0))


def staleness_weight(staleness, exponent):
    """The polynomial staleness weight ``(1 + τ)^(−a)``."""
    return jnp.power(1.0 + staleness.astype(jnp.float32), -jnp.float32(exponent))


def fedasync(current, uploads, starts, staleness, use, clock):
    """FedAsync's mixing of the one arrival of a step into the global model."""
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


def upload_view(received: Any) -> Any:
    """The part of what the server sends that lives in the space of the uploads: all of
    it, or the first element of a tuple (FedOBP sends ``(params, mask key)``)."""
    return received[0] if isinstance(received, tuple) else received


def _with_view(received: Any, view: Any) -> Any:
    return (view, *received[1:]) if isinstance(received, tuple) else view


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


def _bytes_per_client(comm_bytes: Callable, data: Any, cohort: int) -> tuple[float, float]:
    up, down = comm_bytes(data)
    return float(down) / cohort, float(up) / cohort


def _masked_rows(present: jax.Array, new: Any, old: Any) -> Any:
    """Rows of ``new`` where ``present`` (K,), else ``old``."""
    def pick(a, b):
        return jnp.where(present.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def _metrics(clock: ClockState, round_time, aggregated) -> dict:
    return {"virtual_time": clock.time, "round_time": jnp.asarray(round_time, jnp.float32),
            "wasted_work": clock.wasted / jnp.maximum(clock.trained, 1.0),
            "aggregated": jnp.asarray(aggregated, jnp.int32)}


def synchronous_round(method, *, join_ratio: float, execution, clock: Clock, budget: tuple,
                      comm_bytes: Callable, batch_order: Any = None) -> Callable:
    """``round_with(state, data, hp)`` of ``method`` under a synchronous condition."""
    cond = get_condition(clock.condition)

    def client(shared, own, x, y, n, key):
        hp, received = shared
        return method.client_update(hp, received, own, x, y, n, key)

    def round_with(state, data, hp):
        num_clients = data.num_clients
        size = cohort_size(num_clients, join_ratio)
        system = _system(clock)
        c = state.clock
        next_key, round_key = jax.random.split(state.key)
        cohort_key, received, context = method.broadcast(hp, state, round_key)
        avail_key, drop_key, pick_key = jax.random.split(jax.random.fold_in(round_key, _SALT), 3)
        online = system_lib.availability(avail_key, system, c.online, c.time)
        uniform, _ = draw_cohort(cohort_key, num_clients, size)
        if uniform is None:
            index = None
        else:
            # Uniform among the online clients: today's draw when it holds only online
            # ones (always, when everyone is online), else a draw that prefers them.
            score = jnp.where(online, jax.random.uniform(pick_key, (num_clients,)), -1.0)
            _, preferred = jax.lax.top_k(score, size)
            index = jnp.where(jnp.all(online[uniform]), uniform, preferred)
        down_b, up_b = _bytes_per_client(comm_bytes, data, size)
        samples = job_samples(data.train_counts, budget)
        durations = system_lib.job_durations(system, samples, down_b, up_b)
        dropped = system_lib.draw_dropout(drop_key, system)
        started = gather(online, index)
        valid = started & ~gather(dropped, index)
        arrived, round_time = cond.fn(gather(durations, index), valid, clock)
        cohort = run_cohort(
            cohort_key, state.clients, data, client, join_ratio=join_ratio,
            mean_uploads=method.mean_uploads, server=(hp, received),
            orders=round_orders(batch_order, state.round),
            strategy=execution.strategy, chunk_size=execution.chunk_size,
            index=index, present=arrived,
        )
        present = (arrived if index is None
                   else jnp.zeros((num_clients,), bool).at[index].set(arrived))
        clients = _masked_rows(present, cohort.clients, state.clients)
        server, metrics = method.server_update(hp, state, cohort, context)
        any_arrived = jnp.any(arrived)
        if server is not None:
            server = jax.tree.map(lambda a, b: jnp.where(any_arrived, a, b), server,
                                  state.server)
        work = gather(samples, index)
        nobody = ~jnp.any(valid)
        round_time = jnp.where(nobody, _idle_until(system, c.time) - c.time, round_time)
        new_clock = c.replace(
            time=c.time + round_time, online=online,
            participation=c.participation + present.astype(jnp.int32),
            trained=c.trained + jnp.sum(jnp.where(started, work, 0.0)),
            wasted=c.wasted + jnp.sum(jnp.where(started & ~arrived, work, 0.0)),
        )
        state = advance(state, next_key, server=server, clients=clients)
        state = state.replace(clock=new_clock)
        return state, {"train_loss": cohort.loss, **metrics,
                       **_metrics(new_clock, round_time, jnp.sum(arrived))}

    return round_with


class StepKeys(NamedTuple):
    """The keys of one asynchronous server step, drawn from the state's key.

    Attributes:
      next: the state's key after the step.
      round: the key the method's ``broadcast`` gets (as in a synchronous round).
      avail, drop, pick, train: the availability step, the dropout draws, the client draws
        and the training keys of the step (salted, so that ``round`` stays a plain round's).
    """

    next: jax.Array
    round: jax.Array
    avail: jax.Array
    drop: jax.Array
    pick: jax.Array
    train: jax.Array


def step_keys(state_key: jax.Array) -> StepKeys:
    """The keys of the asynchronous server step taken from a state with key ``state_key``."""
    next_key, round_key = jax.random.split(state_key)
    return StepKeys(next_key, round_key,
                    *jax.random.split(jax.random.fold_in(round_key, _SALT), 4))


def dispatch_scores(pick_key: jax.Array, event: Any, num_clients: int) -> jax.Array:
    """(K,) uniform scores by which dispatch event ``event`` of an asynchronous server step
    ranks the clients it may send a job to (the highest first): event 0 fills the free
    slots at the step's start, event j >= 1 the slot of the step's j-th arrival.
    ``pick_key``: ``step_keys(state.key).pick``."""
    return jax.random.uniform(_event_key(pick_key, event), (num_clients,))


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


def _dispatch(scores: jax.Array, available: jax.Array, need: jax.Array, flight: int,
              num_clients: int) -> jax.Array:
    """(K,) bool: the (at most ``need``) available clients with the highest scores."""
    ranked = jnp.where(available, scores, -1.0)
    top, picks = jax.lax.top_k(ranked, flight)
    take = (jnp.arange(flight) < need) & (top >= 0)
    target = jnp.where(take, picks, num_clients)  # num_clients: written nowhere
    return jnp.zeros((num_clients,), bool).at[target].set(True, mode="drop")


def asynchronous_round(method, *, join_ratio: float, execution, clock: Clock, budget: tuple,
                       comm_bytes: Callable) -> Callable:
    """``round_with(state, data, hp)`` of ``method`` under an asynchronous condition: one
    server step per call (see the module docstring)."""
    cond = get_condition(clock.condition)

    def client(hp, received, own, x, y, n, key):
        return method.client_update(hp, received, own, x, y, n, key)

    def round_with(state, data, hp):
        num_clients = data.num_clients
        flight = cohort_size(num_clients, join_ratio)
        size = clock.buffer(flight)
        system = _system(clock)
        c = state.clock
        keys = step_keys(state.key)
        _, received, context = method.broadcast(hp, state, keys.round)
        current = upload_view(received)
        sent = _raw_keys(received)  # what every client dispatched in this step receives
        online = system_lib.availability(keys.avail, system, c.online, c.time)
        down_b, up_b = _bytes_per_client(comm_bytes, data, flight)
        samples = job_samples(data.train_counts, budget)
        durations = system_lib.job_durations(system, samples, down_b, up_b)

        def dispatch(event, time, finish, version, dropped, available, need):
            new = _dispatch(dispatch_scores(keys.pick, event, num_clients), available, need,
                            flight, num_clients)
            drop = system_lib.draw_dropout(_event_key(keys.drop, event), system)
            return (new, jnp.where(new, time + durations, finish),
                    jnp.where(new, c.server_version, version), jnp.where(new, drop, dropped))

        # Event 0: fill the free slots with online, free clients, who receive the current
        # model (after the previous step's flush).
        free = ~jnp.isfinite(c.finish)
        fresh, finish, version, dropped = dispatch(
            0, c.time, c.finish, c.version, c.dropped, free & online,
            flight - jnp.sum(~free))

        # The B arrivals of the step, one event each, in time order. Every arrival but the
        # last (whose flush steps the model) frees a slot that is filled at once, at its
        # arrival time, with the model current then: the one of this step. A client whose
        # update waits in the buffer is not drawn again before the flush.
        def arrive(finish, taken):
            # Nobody in flight: a placeholder not taken yet (unique rows to scatter).
            who = jnp.where(jnp.any(jnp.isfinite(finish)), jnp.argmin(finish),
                            jnp.argmin(taken))
            time = finish[who]
            gone = jnp.arange(num_clients) == who
            return who, time, jnp.where(gone, jnp.inf, finish), taken | gone

        def arrival(carry, j):
            finish, version, dropped, fresh, taken = carry
            who, time, finish, taken = arrive(finish, taken)
            arrived = jnp.isfinite(time)
            online_now = (online if system.trace is None
                          else system_lib.online_at(system, time))
            need = jnp.where(arrived, flight - jnp.sum(jnp.isfinite(finish)), 0)
            new, finish, version, dropped = dispatch(
                j, time, finish, version, dropped,
                online_now & ~jnp.isfinite(finish) & ~taken, need)
            return (finish, version, dropped, fresh | new, taken), (who, time)

        (finish, version, dropped, fresh, taken), (sel, sel_time) = jax.lax.scan(
            arrival, (finish, version, dropped, fresh, jnp.zeros((num_clients,), bool)),
            jnp.arange(1, size))
        who, time, finish, _ = arrive(finish, taken)  # the B-th: the flush
        sel = jnp.append(sel, who)
        sel_time = jnp.append(sel_time, time)
        arrived = jnp.isfinite(sel_time)
        use = arrived & ~dropped[sel]
        now = jnp.maximum(c.time, jnp.max(jnp.where(arrived, sel_time, c.time)))
        staleness = c.server_version - version[sel]

        # Keep a copy of what the server sent for every client dispatched in this step (at
        # most C + B of them); each arrival reads what it received from it: this step's
        # model if it was dispatched in this step, else the copy kept at its dispatch.
        written, = jnp.nonzero(fresh, size=min(num_clients, flight + size),
                               fill_value=num_clients)
        start = jax.tree.map(
            lambda s, g: s.at[written].set(jnp.broadcast_to(g, (written.shape[0], *g.shape)),
                                           mode="drop"), c.start, sent)
        base = _typed_keys(gather(start, sel), received)

        own = gather(state.clients, sel)
        rows, pool = data.client_rows("train")
        n = gather(data.train_counts, sel)
        train_keys = jax.random.split(keys.train, size)
        started = with_examples(client, data.unpacker("train"), row_at=2)
        uploads, new_rows, losses = client_map(
            started, (base, own, gather(rows, sel), train_keys), shared=(hp, pool),
            strategy=execution.strategy, chunk_size=execution.chunk_size)
        if not _same_space(current, uploads):
            raise ValueError("asynchronous conditions need uploads in the space of the model "
                             "the server sends (the client's new model or its shared part)")
        merged = cond.fn(current, uploads, upload_view(base), staleness, use, clock)
        counts = n * use.astype(n.dtype)
        weights = counts.astype(jnp.float32)
        loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        kept = jax.tree.map(lambda a, b: jnp.where(
            use.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new_rows, own)
        clients = scatter(state.clients, sel, kept)
        cohort = CohortResult(sel, counts, merged, clients, loss)
        server, metrics = method.server_update(hp, state, cohort, context)
        any_used = jnp.any(use)
        if server is not None:
            server = jax.tree.map(lambda a, b: jnp.where(any_used, a, b), server,
                                  state.server)
        nothing = ~jnp.any(arrived)
        now = jnp.where(nothing, _idle_until(system, c.time), now)

        used = jnp.zeros((num_clients,), bool).at[jnp.where(use, sel, num_clients)].set(
            True, mode="drop")
        work = jnp.where(arrived, samples[sel], 0.0)
        new_clock = c.replace(
            time=now, online=online,
            participation=c.participation + used.astype(jnp.int32),
            trained=c.trained + jnp.sum(work),
            wasted=c.wasted + jnp.sum(jnp.where(use, 0.0, work)),
            finish=finish, version=version, dropped=dropped,
            staleness=c.staleness.at[jnp.where(use, sel, num_clients)].set(
                staleness, mode="drop"),
            server_version=c.server_version + any_used.astype(jnp.int32),
            start=start,
        )
        state = advance(state, keys.next, server=server, clients=clients)
        state = state.replace(clock=new_clock)
        return state, {"train_loss": loss, **metrics,
                       **_metrics(new_clock, now - c.time, jnp.sum(use))}

    return round_with


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
