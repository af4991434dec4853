"""The host loop: jit the round once, run it, evaluate, emit events, write results.

Extensibility follows FederatedScope's event/handler view of an FL course, on the host
side only (the jitted round stays pure): handlers registered with ``Events.on`` run at
``round_start``, ``round_end``, ``evaluate``, ``checkpoint`` and ``finish``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedjax_sim import safety
from fedjax_sim.algorithms.base import Algorithm, check_model_fits
from fedjax_sim.checks import check_int, check_seed
from fedjax_sim.core.checkpoint import Checkpointer, CheckpointError
from fedjax_sim.core.clock import CLOCK_METRICS
from fedjax_sim.core.cohort import CLIENT_AXIS, strategy_override
from fedjax_sim.core.evaluate import federation_incentives, summarize
from fedjax_sim.core.state import SimState, to_host
from fedjax_sim.data.federated import (
    AnyFederatedData,
    FederatedData,
    check_federated_data,
    scored_counts,
    stack_ragged,
)
from fedjax_sim.rundir import RunDir, atomic_write_json, environment, read_jsonl, write_jsonl

EVENTS = ("round_start", "round_end", "evaluate", "checkpoint", "finish")


class Events:
    """Named host-side events with user handlers, called in registration order."""

    def __init__(self):
        self._handlers: dict[str, list[Callable[..., None]]] = defaultdict(list)

    def on(self, event: str, handler: Callable[..., None]) -> Events:
        """Registers ``handler(**info)`` for ``event``; returns self for chaining.

        Raises:
          ValueError: an ``event`` not in :data:`EVENTS`.
          TypeError: a ``handler`` that is not callable.
        """
        if not isinstance(event, str) or event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}; got {event!r}")
        if not callable(handler):
            raise TypeError(f"handler for event {event!r} must be callable as "
                            f"handler(**info), got {type(handler).__name__} {handler!r}")
        self._handlers[event].append(handler)
        return self

    def emit(self, event: str, **info: Any) -> None:
        for handler in self._handlers[event]:
            handler(**info)


@dataclasses.dataclass
class RunResult:
    """What a run produced: the final summary, one record per evaluation, the state."""

    summary: dict
    history: list[dict]
    state: SimState


def traced_once(fn: Callable, name: str) -> Callable:
    """Wraps ``fn`` so that tracing it a second time raises: every round of a run must reuse
    the first compilation (a retrace means a shape or a static value changed between
    rounds). Unlike ``chex.assert_max_traces``, the count belongs to this wrapper alone, so
    separate runs of the same algorithm do not add up."""
    traces = 0

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        nonlocal traces
        traces += 1
        if traces > 1:
            raise RuntimeError(f"{name}: the round was traced again; every round must have "
                               "the same shapes and static arguments")
        return fn(*args, **kwargs)

    return wrapped


def validate_run_options(*, rounds: int, eval_every: int, checkpoint_every: int = 0) -> None:
    """Raises ValueError naming the option on a bad loop setting."""
    for name, value, low in (("rounds", rounds, 1), ("eval_every", eval_every, 1),
                             ("checkpoint_every", checkpoint_every, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def client_axis_mesh(num_clients: int, devices: int | None = None) -> Mesh | None:
    """A one-axis mesh (``"clients"``) over the devices the client axis is sharded across.

    Args:
      num_clients: K; the number of devices used divides it.
      devices: how many devices to use (``None``: all visible ones, over every process).

    Returns:
      The mesh, or ``None`` when only one device would be used.

    Raises:
      ValueError: in a multi-process run whose device count does not divide K (every
        process must hold a block of clients), or on a bad ``devices``.
    """
    available = jax.devices()
    wanted = len(available) if devices is None else int(devices)
    if not 1 <= wanted <= len(available):
        raise ValueError(f"devices must be in [1, {len(available)}], got {devices!r}")
    if jax.process_count() > 1:
        if num_clients % wanted:
            raise ValueError(f"{num_clients} clients cannot be split evenly over {wanted} "
                             "devices in a multi-process run")
        count = wanted
    else:
        count = max(d for d in range(1, wanted + 1) if num_clients % d == 0)
    if count == 1:
        return None
    return Mesh(np.asarray(available[:count]), (CLIENT_AXIS,), axis_types=(AxisType.Auto,))


def _place(tree: Any, shardings: Any) -> Any:
    """Puts host values on the devices of ``shardings``; works across processes (every
    process holds the full host value and contributes its own shards)."""

    def put(leaf, sharding):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def _client_sharded(tree: Any, mesh: Mesh) -> Any:
    """Shardings for a tree whose every leaf has the client axis first."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec(CLIENT_AXIS)), tree)


def _state_shardings(state_shape: SimState, mesh: Mesh) -> SimState:
    """Client part sharded over the mesh, everything else replicated.

    Sharding is decided per leaf: a client leaf whose leading axis does not split evenly
    over the mesh is replicated. Such leaves exist when the client state is made of groups
    (FedMD and FCCL with several architectures: one tree per architecture, leading axis
    K_g, which need not be a multiple of the device count).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))

    def client_leaf(leaf):
        splits = len(leaf.shape) >= 1 and leaf.shape[0] % mesh.size == 0
        return sharded if splits else replicated

    return state_shape.replace(
        key=replicated,
        round=replicated,
        server=jax.tree.map(lambda _: replicated, state_shape.server),
        clients=jax.tree.map(client_leaf, state_shape.clients),
        clock=jax.tree.map(lambda _: replicated, state_shape.clock),
    )


def to_device(data: FederatedData, mesh: Mesh | None = None) -> FederatedData:
    """Moves the padded arrays to the devices once, before the loop; with ``mesh``, the
    client axis is sharded over it."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, data)
    return _place(data, _data_shardings(data, mesh))


def _data_shardings(data: AnyFederatedData, mesh: Mesh) -> Any:
    """Per-client leaves sharded over the client axis; a ragged layout's pools, which
    every client slices its rows from, replicated."""
    shardings = _client_sharded(data, mesh)
    if data.layout == "ragged":
        replicated = NamedSharding(mesh, PartitionSpec())
        pools = {f"{split}_{part}": replicated for split in ("train", "test")
                 for part in ("x", "y")}
        shardings = shardings.replace(**pools)
    return shardings


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)``, or nothing for a single-device run."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def place(
    algorithm: Algorithm, data: FederatedData, *, seed: int, mesh: Mesh | None
) -> tuple[FederatedData, SimState, SimState | None]:
    """Puts the data on the devices and initializes the state there.

    With ``mesh``, the client axis of the data and of the client state is sharded over
    it and the rest of the state is replicated; call it inside ``mesh_context(mesh)``.

    Returns:
      ``(data, state, state shardings or None)``.
    """
    data = to_device(data, mesh)
    if mesh is None:
        return data, algorithm.init(jax.random.key(seed), data), None
    shape = jax.eval_shape(lambda d: algorithm.init(jax.random.key(seed), d), data)
    shardings = _state_shardings(shape, mesh)
    state = jax.jit(lambda d: algorithm.init(jax.random.key(seed), d),
                    out_shardings=shardings)(data)
    return data, state, shardings


def round_block(algorithm: Algorithm, length: int, *, check_traces: bool = False,
                num_clients: int | None = None) -> Callable:
    """``(state, data, hp=None) -> (state, metrics)`` running ``length`` rounds with
    ``lax.scan`` (unjitted; see :func:`make_round_block`)."""
    if length < 1:
        raise ValueError(f"rounds per call must be >= 1, got {length}")
    _, round_with, _ = algorithm.with_hp()

    def one_round(state, data, hp):
        state, metrics = round_with(state, data, hp)
        if num_clients is not None:
            bad = safety.nonfinite_clients(state.clients, state.server, num_clients)
            metrics = {**metrics, "nonfinite_clients": bad, "nonfinite_any": bad.any()}
        return state, metrics

    def block(state, data, hp=None):
        hp = algorithm.hp() if hp is None else hp
        if length == 1:
            state, metrics = one_round(state, data, hp)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(lambda s, _: one_round(s, data, hp), state, None, length=length)

    if check_traces:
        block = traced_once(block, f"{algorithm.name} ({length} rounds per call)")
    return block


def make_round_block(
    algorithm: Algorithm,
    length: int,
    *,
    state_shardings: Any = None,
    check_traces: bool = False,
    num_clients: int | None = None,
) -> Callable:
    """One jitted call running ``length`` rounds with ``lax.scan`` (the state buffers are
    donated, nothing returns to the host in between).

    With ``num_clients``, every round's metrics also hold ``nonfinite_clients`` (K,) and
    ``nonfinite_any``: which clients' states (or the shared server state) hold a NaN or an
    infinity after the round (the runner's divergence check).

    Returns:
      ``(state, data, hp=None) -> (state, metrics)``, every metric stacked over the
      ``length`` rounds; ``hp`` the traced hyperparameters (``algorithm.hp(...)``), passed
      as data, or ``None`` for the algorithm's own values compiled in.
    """
    block = round_block(algorithm, length, check_traces=check_traces,
                        num_clients=num_clients)
    mesh = None if state_shardings is None else jax.tree.leaves(state_shardings)[0].mesh
    return _jitted_block(block, state_shardings, mesh)


# Settings that may change between a run and its resumption: they do not change what the
# rounds compute (``rounds`` may grow; ``devices`` changes only float summation order).
RESUMABLE = frozenset({"rounds", "eval_every", "checkpoint_every", "rounds_per_call",
                       "devices", "on_divergence", "progress"})
DIVERGENCE_POLICIES = ("stop", "warn")
CHECKPOINT_DIR = "checkpoints"


class ResumeError(ValueError):
    """A resume that cannot continue the run in the folder (no checkpoint, other settings,
    a torn file)."""


def _jsonable(value: Any) -> Any:
    """``value`` as JSON would read it back, so that saved and current settings compare."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def data_fingerprint(data: FederatedData) -> str:
    """A short hash of the split: client counts, labels and a strided sample of inputs
    (enough to tell two partitions or two sources apart, cheap for large pools)."""
    digest = hashlib.sha256()
    for leaf in (data.train_counts, data.test_counts, data.train_y, data.test_y):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    for leaf in (data.train_x, data.test_x):
        flat = np.asarray(leaf).reshape(-1)
        digest.update(np.ascontiguousarray(flat[:: max(1, flat.size // 4096)]).tobytes())
    return digest.hexdigest()[:16]


def run_identity(algorithm: Algorithm, data: FederatedData, seed: int,
                 config: dict | None = None) -> dict:
    """The settings that determine what a run computes: what a checkpoint must match."""
    identity = {
        "algorithm": algorithm.name,
        "hparams": algorithm.hparams,
        "seed": seed,
        "dataset": data.name,
        "num_clients": data.num_clients,
        "num_classes": data.num_classes,
        "data_fingerprint": data_fingerprint(data),
    }
    identity.update({k: v for k, v in (config or {}).items() if k not in RESUMABLE})
    return _jsonable(identity)


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``name: saved -> current`` for every setting that differs (nested hparams too)."""
    found = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {_shown(a)} in the checkpoint, {_shown(b)} now")
    return found


def _shown(value: Any) -> str:
    # An option left unset resolves to its default: say so, not "None".
    return "the default" if value is None else repr(value)


def validate_divergence_policy(on_divergence: str) -> None:
    if on_divergence not in DIVERGENCE_POLICIES:
        raise ValueError(f"on_divergence must be one of {', '.join(DIVERGENCE_POLICIES)}, "
                         f"got {on_divergence!r}")


def _estimate_memory(algorithm: Algorithm, data: FederatedData, seed: int,
                     num_devices: int) -> dict[str, int]:
    """Per-device bytes of the client state, server state and data, from shapes alone."""
    shape = jax.eval_shape(lambda d: algorithm.init(jax.random.key(seed), d), data)
    return {
        "client state": safety.tree_bytes(shape.clients) // num_devices,
        "server state": safety.tree_bytes(shape.server),
        "data": data_bytes_per_device(data, num_devices),
    }


def data_bytes_per_device(data: AnyFederatedData, num_devices: int) -> int:
    """Bytes of ``data`` on each device: per-client leaves split over the devices, a
    ragged layout's pools whole on every one (``_data_shardings``)."""
    if data.layout != "ragged":
        return safety.tree_bytes(data) // num_devices
    pools = [getattr(data, f"{split}_{part}") for split in ("train", "test")
             for part in ("x", "y")]
    pool_bytes = safety.tree_bytes(pools)
    return pool_bytes + (safety.tree_bytes(data) - pool_bytes) // num_devices


def _compile_block(block: Callable, state: SimState, data: FederatedData, hp: dict,
                   devices: list) -> Callable:
    """Compiles ``block`` for these arguments and refuses to run it when its temporaries
    do not fit in the memory left on the devices."""
    compiled = block.lower(state, data, hp).compile()
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        stats = None
    if stats is not None:
        extra = (int(stats.temp_size_in_bytes) + int(stats.output_size_in_bytes)
                 - int(stats.alias_size_in_bytes))
        safety.check_memory({"round temporaries": max(extra, 0)}, devices=devices,
                            what="one round")
    return compiled


@dataclasses.dataclass
class Program:
    """What the host loop advances: ``size`` configurations of one compiled round.

    A single run is a program of one configuration; a sweep stacks its configurations
    on a leading axis and maps the round over it (as brax wraps an environment in a
    vmap wrapper). The loop sees only this interface.

    Attributes:
      algorithm: the algorithm (its values are those of configuration 0).
      size: number of configurations C.
      data: the placed data argument of every call.
      state: the initial (placed) state; leaves lead with C for a sweep.
      shardings: the state's shardings (``None``: the default device).
      hp: the traced hyperparameters argument (stacked over C for a sweep).
      make_block: ``length -> jitted (state, data, hp) -> (state, metrics)``, each metric
        shaped (C, length, ...), with ``nonfinite_clients`` (C, length, K) and
        ``nonfinite_any`` (C, length).
      evaluate: jitted ``(state, data, hp) -> correct``, (C, K).
      devices: the devices the program runs on.
      host_wait: wait for each call before dispatching the next (several CPU devices).
      test_counts: (C, K) test sample counts.
      comm: per configuration, bytes (up, down) per round.
      view: ``(state, c) -> configuration c's state`` (for ``Algorithm.report``).
    """

    algorithm: Algorithm
    size: int
    data: Any
    state: Any
    shardings: Any
    hp: Any
    make_block: Callable[[int], Callable]
    evaluate: Callable
    devices: list
    host_wait: bool
    test_counts: np.ndarray
    comm: list[tuple[int, int]]
    view: Callable[[Any, int], Any]


@dataclasses.dataclass
class Track:
    """One configuration's records in the host loop: what it writes and reports."""

    labels: dict
    hparams: dict
    out: Path | None = None
    local_accuracies: Any = None
    extra_summary: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    diverged: dict | None = None
    summary: dict | None = None


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for a summary's ``reason``."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _record_failure(tracks: list[Track], error: BaseException) -> None:
    """A ``failed`` summary, with the one-line reason, for every configuration that started
    writing its folder and has no summary yet: no folder is left without a status."""
    for track in tracks:
        if track.out is None or track.summary is not None:
            continue
        if not (track.out / "config.json").exists():
            continue
        rounds_done = track.history[-1]["round"] if track.history else 0
        track.summary = {"status": "failed", "reason": one_line(error), **track.labels,
                         "rounds_done": rounds_done, "hparams": track.hparams}
        try:
            atomic_write_json(track.out / "summary.json", track.summary)
        except OSError:
            pass  # the original error matters more than a folder that cannot be written


def _single_program(algorithm: Algorithm, data: FederatedData, *, seed: int,
                    mesh: Mesh | None) -> Program:
    """One run: the client axis sharded over ``mesh``, no configuration axis."""
    # Host facts first: placed arrays may span processes.
    test_counts = scored_counts(data)[None]
    comm = [algorithm.comm_bytes(data)]
    data, state, shardings = place(algorithm, data, seed=seed, mesh=mesh)
    _, _, evaluate_with = algorithm.with_hp()
    if mesh is None:
        evaluate = jax.jit(lambda s, d, hp: evaluate_with(s, d, hp)[0][None])
    else:
        evaluate = jax.jit(lambda s, d, hp: evaluate_with(s, d, hp)[0][None],
                           out_shardings=NamedSharding(mesh, PartitionSpec()))

    def make_block(length):
        block = round_block(algorithm, length, check_traces=True,
                            num_clients=data.num_clients)
        def rounds_block(state, data, hp):
            return _with_config_axis(block(state, data, hp))

        return _jitted_block(rounds_block, shardings, mesh)

    return Program(
        algorithm=algorithm, size=1, data=data, state=state, shardings=shardings,
        hp=algorithm.hp(), make_block=make_block,
        evaluate=evaluate,
        devices=jax.devices()[:1] if mesh is None else list(mesh.devices.flat),
        host_wait=safety.needs_host_wait(mesh),
        test_counts=test_counts, comm=comm, view=lambda s, c: s)


def _with_config_axis(result):
    state, metrics = result
    return state, jax.tree.map(lambda m: m[None], metrics)


def _jitted_block(block: Callable, shardings: Any, mesh: Mesh | None) -> Callable:
    if shardings is None:
        return jax.jit(block, donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(block, donate_argnums=0, out_shardings=(shardings, replicated))


class _VirtualTime:
    """The virtual time of a clocked run (``core.clock``), kept on the host from the round
    metrics so that the events read it without waiting on the device."""

    def __init__(self, state: Any, program: Program, count: int):
        self.single = program.size == 1
        self.last = None
        if getattr(state, "clock", None) is not None:
            last = np.asarray(to_host(state.clock.time)).reshape(-1)[:count]
            self.last = np.broadcast_to(last, (count,))

    def info(self, times=None) -> dict:
        """``virtual_time`` for an event (``times``: one round's, else the latest)."""
        if self.last is None:
            return {}
        now = self.last if times is None else times
        return {"virtual_time": float(now[0]) if self.single else now.tolist()}


def _block_end(r: int, *, rounds: int, eval_every: int, rounds_per_call: int,
               checkpoint_every: int) -> int:
    """The round a call starting after round ``r`` ends at: the next evaluation,
    checkpoint or the call-length limit."""
    stop_at = min(rounds, (r // eval_every + 1) * eval_every, r + rounds_per_call)
    if checkpoint_every:
        stop_at = min(stop_at, (r // checkpoint_every + 1) * checkpoint_every)
    return stop_at


def _note_divergence(tracks: list[Track], metrics: dict, first: int,
                     on_divergence: str) -> np.ndarray:
    """Marks each configuration whose loss or state went non-finite in this call (its
    first divergence only); returns the (configurations, rounds) losses."""
    # Rows past the tracks are padding (``sweep``'s repeated configurations).
    losses = np.asarray(metrics["train_loss"])[:len(tracks)]
    flags = np.asarray(metrics["nonfinite_any"])[:len(tracks)]
    new = [c for c in np.flatnonzero((~np.isfinite(losses) | flags).any(axis=1))
           if tracks[c].diverged is None]
    if new:
        clients = np.asarray(to_host(metrics["nonfinite_clients"]))
        for c in new:
            tracks[c].diverged = _divergence(losses[c], flags[c], clients[c], first,
                                             tracks[c].hparams, on_divergence)
    return losses


def _record(program: Program, c: int, track: Track, *, done: int, loss: float,
            correct: np.ndarray, metrics: dict, start: float) -> dict:
    """Configuration ``c``'s evaluation record after round ``done``."""
    up, down = program.comm[c]
    record = {"round": done, **track.labels, "train_loss": loss,
              **summarize(correct[c], program.test_counts[c]),
              "bytes_up": up * done, "bytes_down": down * done,
              "wall_s": time.perf_counter() - start}
    for key in CLOCK_METRICS:
        if key in metrics:
            record[key] = np.asarray(metrics[key])[c, -1].item()
    if track.local_accuracies is not None:
        # Against the Local reference's final accuracies (it ran first).
        record.update(federation_incentives(record["client_accuracies"],
                                            track.local_accuracies))
    if track.diverged is not None:
        record["diverged_at"] = track.diverged["round"]
    return record


def _loop(program: Program, tracks: list[Track], *, rounds: int, eval_every: int,
          rounds_per_call: int, checkpoint_every: int, checkpoints: Checkpointer | None,
          identity: dict | None, first_round: int, events: Events, on_divergence: str,
          stop: safety.StopRequest, progress: bool, lead: bool, start: float,
          name: str) -> tuple[Any, int, float | None]:
    """The host loop, for one run and for a sweep alike.

    Runs rounds ``first_round`` .. ``rounds`` in calls that end at every evaluation and
    checkpoint; after each evaluation, every configuration's ``metrics.jsonl`` is
    rewritten. A configuration that diverges under ``stop`` keeps its records up to its
    divergence and takes no more (the others go on); the loop ends when every one has.

    Returns:
      ``(final state, rounds done, compile seconds)``.
    """
    watchdog = safety.Watchdog()
    if program.host_wait:
        watchdog.wait(program.state, "initializing the state", first=True)
    state, data, hp = program.state, program.data, program.hp
    blocks: dict[int, Callable] = {}
    compile_s = None
    bar = _progress(rounds - first_round, progress and lead, name)
    clock = _VirtualTime(state, program, len(tracks))

    def live() -> list[int]:
        return [c for c, t in enumerate(tracks)
                if t.diverged is None or on_divergence == "warn"]

    def save(done: int) -> None:
        checkpoints.save(done, state, {"identity": identity, "round": done})
        events.emit("checkpoint", round=done, state=state, path=checkpoints.directory)

    def evaluate(done: int, losses: np.ndarray, metrics: dict) -> None:
        correct = np.asarray(to_host(program.evaluate(state, data, hp)))
        for c in live():
            track = tracks[c]
            track.history.append(_record(program, c, track, done=done,
                                         loss=float(losses[c, -1]), correct=correct,
                                         metrics=metrics, start=start))
            if lead and track.out is not None:
                write_jsonl(track.out / "metrics.jsonl", track.history)
        if bar is not None and live():
            bar.set_postfix(acc=f"{tracks[live()[0]].history[-1]['accuracy']:.4f}")
        record = (tracks[0].history[-1] if program.size == 1 and tracks[0].history
                  else [t.history[-1] for t in tracks if t.history])
        events.emit("evaluate", round=done, state=state, **clock.info(), record=record)

    r = first_round
    try:
        while r < rounds and live():
            stop_at = _block_end(r, rounds=rounds, eval_every=eval_every,
                                 rounds_per_call=rounds_per_call,
                                 checkpoint_every=checkpoint_every)
            length = stop_at - r
            tic = time.perf_counter()
            if length not in blocks:
                blocks[length] = _compile_block(program.make_block(length), state, data, hp,
                                                program.devices)
            for i in range(length):
                events.emit("round_start", round=r + i, state=state, **clock.info())
            state, metrics = blocks[length](state, data, hp)
            if program.host_wait or compile_s is None:
                watchdog.wait(state, f"rounds {r + 1}-{stop_at}", first=compile_s is None)
            if compile_s is None:
                compile_s = time.perf_counter() - tic
            losses = _note_divergence(tracks, metrics, r, on_divergence)
            times = (np.asarray(metrics["virtual_time"])[:len(tracks)]
                     if "virtual_time" in metrics else None)
            for i in range(length):
                events.emit("round_end", round=r + i + 1, state=state,
                            metrics=jax.tree.map(lambda m, i=i: m[:, i] if program.size > 1
                                                 else m[0, i], metrics),
                            **clock.info(None if times is None else times[:, i]))
            if times is not None:
                clock.last = times[:, -1]
            if bar is not None:
                bar.update(length)
            r = done = stop_at
            if not live():
                break
            if done % eval_every == 0 or done == rounds:
                evaluate(done, losses, metrics)
            if checkpoints is not None and checkpoint_every and done % checkpoint_every == 0:
                save(done)
            if stop.requested:
                break
    except jax.errors.JaxRuntimeError as error:
        if safety.is_out_of_memory(error):
            raise safety.OutOfMemoryError(
                f"{program.algorithm.name} ran out of device memory at round {r + 1}: "
                f"{str(error).splitlines()[0][:200]}; lower --num-clients, --batch-size or "
                "the model size, or use --client-strategy sequential") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if stop.requested and r < rounds and checkpoints is not None:
        save(r)
        checkpoints.wait()
    return state, r, compile_s


def _finish(program: Program, tracks: list[Track], state: Any, *, rounds: int, done: int,
            stopped: bool, fields: Callable[[int, Track, str, int], dict],
            writes: bool) -> None:
    """Every configuration's summary (``Track.summary``), written with its plots."""
    for c, track in enumerate(tracks):
        final = track.history[-1] if track.history else None
        # Ran to the end: complete, or diverged and kept going (``warn``).
        to_the_end = final is not None and final["round"] == rounds and not stopped
        if stopped:
            status, rounds_done = "stopped", done
        elif track.diverged is not None:
            status = "diverged"
            rounds_done = rounds if to_the_end else track.diverged["round"]
        else:
            status, rounds_done = "complete", rounds
        summary = fields(c, track, status, rounds_done)
        # A diverged run reports no accuracy, even one that kept going (``warn``): its
        # records stay in metrics.jsonl, marked by the round it diverged at.
        if to_the_end and track.diverged is None:
            summary.update({k: final[k] for k in (
                "accuracy", "client_mean_accuracy", "client_std", "client_min",
                "client_p10", "client_accuracies")})
            if program.algorithm.report is not None:
                summary.update(program.algorithm.report(program.view(state, c)))
            if track.local_accuracies is not None:
                summary.update(federation_incentives(final["client_accuracies"],
                                                     track.local_accuracies))
        if track.diverged is not None:
            summary["diverged"] = track.diverged
            summary["diverged_at"] = track.diverged["round"]
        track.summary = summary
        if writes and track.out is not None:
            atomic_write_json(track.out / "summary.json", summary)
            if track.history:
                _plots(track.out, track.history, {**final, **summary})


def run(
    algorithm: Algorithm,
    data: FederatedData,
    *,
    rounds: int,
    eval_every: int = 1,
    seed: int = 0,
    events: Events | None = None,
    output: str | os.PathLike | None = None,
    local_accuracies: np.ndarray | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    extra_summary: dict | None = None,
    rounds_per_call: int = 1,
    devices: int | None = None,
    config: dict | None = None,
    options: dict | None = None,
    on_divergence: str = "stop",
    resume_hint: str | None = None,
) -> RunResult:
    """Runs ``rounds`` rounds of ``algorithm`` on ``data``.

    Args:
      algorithm: from ``fedjax_sim.algorithms.make``.
      data: the federated data (numpy or jax arrays).
      rounds: number of rounds.
      eval_every: evaluate every this many rounds (and always after the last).
      seed: seed of the one PRNG key everything is split from.
      events: host-side handlers.
      output: the run folder: ``config.json``, ``metrics.jsonl`` (rewritten atomically at
        each evaluation), ``summary.json``, plots and ``checkpoints/``; nothing is written
        when None (nor by any process but the first in a multi-process run). An existing
        non-empty folder is refused unless ``resume`` or ``overwrite``; a lock keeps
        other processes out while the run uses it.
      local_accuracies: per-client accuracies of a local-only run on the same split (its
        final ones; run it first); when given, every evaluation record and the summary add
        ``hurt_fraction``, ``ipr``, ``ipr_strict`` and ``tie_fraction`` against them
        (``core.evaluate.federation_incentives``).
      checkpoint_every: save the state every this many rounds (0: only when stopped by a
        signal). Saving is asynchronous: the next rounds run while it writes.
      resume: continue from the latest checkpoint in ``output``; refused when there is
        none, or when any setting that changes results differs from the checkpoint's
        (``rounds`` may grow).
      overwrite: replace the run in an existing ``output`` folder.
      progress: show a progress bar.
      extra_summary: more fields for ``summary.json``.
      rounds_per_call: rounds run by one jitted call (a ``lax.scan`` over rounds); a call
        also ends at every evaluation and checkpoint. With more than one, the
        ``round_start`` and ``round_end`` events of a call's rounds fire around the call,
        with the state at its start and at its end.
      devices: number of devices the client axis is sharded over (``None``: all visible
        devices, across processes after ``jax.distributed.initialize()``); the count used
        divides K and is recorded as ``devices`` in the summary.
      config: the settings that produced ``data`` and ``algorithm`` (data, partition,
        model, ...), written to ``config.json`` and matched on resume.
      options: every option of the command that started the run, for ``config.json``.
      on_divergence: ``stop`` (default): a NaN or infinity in the loss or in any client's
        state ends the run with :class:`~fedjax_sim.safety.DivergedError` at that round,
        keeping what was written; ``warn``: report it and go on (the summary's ``status``
        is ``diverged`` either way).
      resume_hint: the command that resumes this run, printed when a signal stops it.

    Returns:
      A RunResult.

    Raises:
      ValueError: a bad loop setting, seed (an integer >= 0 and < 2**32) or ``devices``,
        or a malformed ``FEDJAX_SIM_STRATEGY`` (before anything is placed or compiled), an
        unusable output folder or a refused resume, data failing ``check_federated_data``,
        a model that does not fit the data (``check_model_fits``), or ``local_accuracies``
        that are not one value in [0, 1] (or NaN) per client.
      fedjax_sim.safety.DivergedError: on divergence with ``on_divergence="stop"``.
      fedjax_sim.safety.StoppedError: after SIGINT or SIGTERM, once the round in flight
        finished and the state was saved.
      fedjax_sim.safety.OutOfMemoryError: when the run cannot fit in device memory.
      TypeError: an ``algorithm``, ``data`` or ``events`` of the wrong type.
    """
    _check_run(algorithm, data, events=events, local_accuracies=local_accuracies,
               rounds=rounds, eval_every=eval_every, checkpoint_every=checkpoint_every,
               rounds_per_call=rounds_per_call, seed=seed, devices=devices,
               on_divergence=on_divergence, resume=resume, output=output)
    events = events or Events()
    lead = jax.process_index() == 0
    identity = run_identity(algorithm, data, seed, config)
    settings = {"rounds": rounds, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
                "rounds_per_call": rounds_per_call, "devices": devices,
                "on_divergence": on_divergence}
    mesh = client_axis_mesh(data.num_clients, devices)
    run_devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    safety.check_memory(_estimate_memory(algorithm, data, seed, len(run_devices)),
                        devices=run_devices, what=f"{algorithm.name} on {data.name}")
    folder = (RunDir(output, resume=resume, overwrite=overwrite, lead=lead)
              if output is not None else contextlib.nullcontext())
    with folder, mesh_context(mesh), safety.StopRequest() as stop:
        out = Path(output) if output is not None else None
        checkpoints = Checkpointer(out / CHECKPOINT_DIR) if out is not None else None
        written = False  # config.json of this run is in the folder: it ends with a summary
        try:
            start = time.perf_counter()
            program = _single_program(algorithm, data, seed=seed, mesh=mesh)
            track = Track(labels={"algorithm": algorithm.name, "dataset": data.name,
                                  "seed": seed},
                          hparams=algorithm.hparams, out=out,
                          local_accuracies=local_accuracies,
                          extra_summary=dict(extra_summary or {}))
            resumed_from = None
            if resume:
                program.state, track.history = _resume(
                    out, checkpoints, program.state, program.shardings, identity, rounds,
                    write=lead)
                resumed_from = int(program.state.round)
            if out is not None and lead:
                atomic_write_json(out / "config.json", {
                    "identity": identity, "settings": settings, "options": options or {},
                    "environment": environment(), "resumed_from": resumed_from})
                if not resume:
                    write_jsonl(out / "metrics.jsonl", [])
                written = True
            state, done, compile_s = _loop(
                program, [track], rounds=rounds, eval_every=eval_every,
                rounds_per_call=rounds_per_call, checkpoint_every=checkpoint_every,
                checkpoints=checkpoints, identity=identity,
                first_round=int(program.state.round), events=events,
                on_divergence=on_divergence, stop=stop, progress=progress, lead=lead,
                start=start, name=algorithm.name)

            def fields(c, track, status, rounds_done):
                up, down = program.comm[c]
                summary = {
                    "status": status, **track.labels, "num_clients": data.num_clients,
                    "rounds": rounds, "rounds_done": rounds_done,
                    "wall_s": time.perf_counter() - start, "compile_s": compile_s,
                    "bytes_up": up * rounds_done, "bytes_down": down * rounds_done,
                    "devices": 1 if mesh is None else mesh.size,
                    "processes": jax.process_count(), "rounds_per_call": rounds_per_call,
                    "hparams": algorithm.hparams, **track.extra_summary}
                if resumed_from is not None:
                    summary["resumed_from"] = resumed_from
                return summary

            stopped = stop.requested and done < rounds
            if checkpoints is not None:
                checkpoints.wait()
            _finish(program, [track], state, rounds=rounds, done=done, stopped=stopped,
                    fields=fields, writes=lead)
        except Exception as error:
            if lead and written:
                _record_failure([track], error)
            raise
        finally:
            if checkpoints is not None:
                checkpoints.close()
    if track.diverged is not None and on_divergence == "stop":
        diverged = track.diverged
        raise safety.DivergedError(diverged["message"], round=diverged["round"],
                                   clients=diverged["clients"])
    if stopped:
        raise _stopped_error(done, stop.signum, checkpoints, resume_hint)
    events.emit("finish", summary=track.summary, state=state, history=track.history)
    return RunResult(track.summary, track.history, state)


def _stopped_error(done: int, signum: int | None, checkpoints: Checkpointer | None,
                   resume_hint: str | None) -> safety.StoppedError:
    saved = checkpoints is not None
    how = (f"; resume with: {resume_hint}" if saved and resume_hint else
           f"; its checkpoint is in {checkpoints.directory}" if saved else
           " (no output folder: nothing was saved)")
    return safety.StoppedError(f"stopped at round {done}{how}", round=done, signum=signum,
                               checkpoint=saved)


def _check_local_accuracies(label: str, local_accuracies: Any, num_clients: int) -> None:
    """One accuracy per client, each in [0, 1] or NaN (a client without test data)."""
    import reprlib

    local = np.array(local_accuracies, dtype=object)
    if local.shape != (num_clients,) or not all(
            isinstance(a, float | int | np.floating | np.integer) and not isinstance(
                a, bool | np.bool_) and (0 <= a <= 1 or a != a) for a in local):
        raise ValueError(f"{label} must be a list of {num_clients} accuracies (one per "
                         f"client), each in [0, 1] or NaN, got {reprlib.repr(local_accuracies)}")


def _check_run(algorithm: Any, data: Any, *, events: Any, local_accuracies: Any, rounds: Any,
               eval_every: Any, checkpoint_every: Any, rounds_per_call: Any, seed: Any,
               devices: Any, on_divergence: Any, resume: bool, output: Any) -> None:
    """:func:`run`'s arguments, checked before anything is placed or compiled."""
    for label, value, kind, what in (("algorithm", algorithm, Algorithm, "an Algorithm "
                                      "(from fedjax_sim.algorithms.make)"),
                                     ("data", data, AnyFederatedData, "a FederatedData or "
                                      "RaggedFederatedData"),
                                     ("events", events, Events | None, "an Events or None")):
        if not isinstance(value, kind):
            raise TypeError(f"{label} must be {what}, got {type(value).__name__}")
    check_federated_data(data)
    if local_accuracies is not None:
        _check_local_accuracies("local_accuracies", local_accuracies, data.num_clients)
    check_model_fits(algorithm.models, data)
    validate_run_options(rounds=rounds, eval_every=eval_every, checkpoint_every=checkpoint_every)
    check_int("rounds_per_call", rounds_per_call, 1)
    check_seed("seed", seed)
    if devices is not None:
        check_int("devices", devices, 1)
    strategy_override()  # a malformed FEDJAX_SIM_STRATEGY fails here, not while tracing
    validate_divergence_policy(on_divergence)
    if resume and output is None:
        raise ValueError("resume needs an output folder to resume from")


def _divergence(losses: np.ndarray, flags: np.ndarray, clients: np.ndarray, first: int,
                hparams: dict, policy: str) -> dict:
    """A configuration's first divergence in a call of rounds ``first + 1 ..`` (round,
    clients, message) from its losses, flags and (rounds, K) non-finite clients; warns
    under ``warn``."""
    index = int(np.flatnonzero(~np.isfinite(losses) | flags)[0])
    clients = clients[index]
    message = safety.divergence_message(first + index + 1, clients, float(losses[index]),
                                        hparams)
    if policy == "warn":
        warnings.warn(message + " (going on: --on-divergence warn)", RuntimeWarning,
                      stacklevel=4)
    return {"round": first + index + 1, "clients": np.flatnonzero(clients).tolist(),
            "message": message}


def _check_resumable(checkpoints: Checkpointer, meta: Any, latest: int, identity: dict,
                     rounds: int) -> None:
    saved = meta.get("identity") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        raise ResumeError(f"--resume: {checkpoints.directory}: the checkpoint of round "
                          f"{latest} records no configuration; it is not this program's")
    differences = _differences(saved, identity)
    if differences:
        raise ResumeError("--resume: the checkpoint in " + str(checkpoints.directory)
                          + " belongs to other settings: " + "; ".join(differences))
    if latest > rounds:
        raise ResumeError(f"--resume: the checkpoint is at round {latest}, past --rounds "
                          f"{rounds}; give --rounds {latest} or more")


def _resume(out: Path, checkpoints: Checkpointer, template: SimState, shardings,
            identity: dict, rounds: int, *, write: bool) -> tuple[SimState, list[dict]]:
    """The checkpointed state and the evaluation records up to its round, after checking
    that the checkpoint belongs to a run with these settings."""
    rounds_saved = checkpoints.rounds()
    if not rounds_saved:
        raise ResumeError(f"--resume: no checkpoint in {checkpoints.directory}; run without "
                          "--resume (use --checkpoint-every to save one)")
    for latest in reversed(rounds_saved):
        try:
            meta = checkpoints.metadata(latest)
            _check_resumable(checkpoints, meta, latest, identity, rounds)
            state, _ = checkpoints.restore(template, shardings, latest)
            break
        except CheckpointError as error:
            # A torn or corrupted checkpoint: the intact one before it, with a warning.
            if latest == rounds_saved[0]:
                raise
            warnings.warn(f"--resume: the checkpoint of round {latest} cannot be read "
                          f"({one_line(error)}); resuming from the one before it",
                          RuntimeWarning, stacklevel=3)
    metrics_path = out / "metrics.jsonl"
    if not metrics_path.is_file():
        # The records before the checkpoint live only there: refuse rather than lose them.
        raise ResumeError(f"--resume: {metrics_path} is missing; it holds the run's records "
                          f"up to round {latest}: restore it, or start a fresh run")
    history = read_jsonl(metrics_path)
    history = [record for record in history if record.get("round", 0) <= latest]
    if write:
        write_jsonl(metrics_path, history)
    return state, history


def _progress(total: int, enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, leave=False)


def _plots(out: Path, history: list[dict], summary: dict) -> None:
    """accuracy.png (accuracy against rounds), clients.png (per-client distribution) and,
    for a run on the virtual clock, accuracy_vs_time.png (accuracy against virtual time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def accuracy_against(key: str, label: str, name: str) -> None:
        x = [h[key] for h in history]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(x, [h["accuracy"] for h in history], label="accuracy")
        ax.plot(x, [h["client_p10"] for h in history], label="bottom decile", linestyle="--")
        ax.set_xlabel(label)
        ax.set_ylabel("personalized test accuracy")
        ax.set_title(f"{summary['algorithm']} on {summary['dataset']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    accuracy_against("round", "round", "accuracy.png")

    if history and "virtual_time" in history[0]:
        accuracy_against("virtual_time", "virtual time (s)", "accuracy_vs_time.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(summary["client_accuracies"], bins=20, range=(0, 1))
    ax.set_xlabel("client test accuracy")
    ax.set_ylabel("clients")
    ax.set_title(f"{summary['algorithm']}: {summary['num_clients']} clients")
    fig.tight_layout()
    fig.savefig(out / "clients.png", dpi=100)
    plt.close(fig)


def sweep_configs(
    name: str,
    hparams: dict,
    *,
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
    configs: list[dict] | None = None,
    num_splits: int = 1,
) -> list[tuple[int, dict, int]]:
    """The configurations of a sweep as ``(seed, overrides, split)``, checked on the host.

    Args:
      name: algorithm name.
      hparams: the algorithm's other hyperparameters (checked by the caller).
      seeds: seeds; every configuration runs once per seed (seeds varying fastest).
      lrs: learning rates: the configurations ``{"lr": lr}`` (``configs`` must be unset).
      configs: dicts of traced-hyperparameter overrides, each with its ``seed`` unless
        ``seeds`` is given, and optionally ``split``: the index of its data split.
      num_splits: how many data splits there are (``split`` is in ``[0, num_splits)``).

    Returns:
      One ``(seed, overrides, split)`` per configuration.

    Raises:
      ValueError: naming the entry: an empty or repeated list entry, a bad seed, split or
        value, a key that is not a traced hyperparameter of ``name``, ``lrs`` with
        ``configs``, a configuration without a seed, or two identical configurations.
    """
    from fedjax_sim import algorithms
    from fedjax_sim.algorithms.base import check_hparam

    specs = {spec.name: spec for spec in algorithms.hparam_specs(name) if spec.traced}
    if seeds is not None:
        if isinstance(seeds, str | bytes) or not seeds:
            raise ValueError(f"seeds must be a non-empty list of seeds, got {seeds!r}")
        seeds = [check_seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
        _refuse_repeats("seeds", seeds)
    if configs is None:
        if seeds is None:
            raise ValueError("seeds must be a non-empty list of seeds, got None")
        if lrs is None:
            configs = [{}]
        else:
            if isinstance(lrs, str | bytes) or not lrs:
                raise ValueError(f"lrs must be a non-empty list of learning rates, got {lrs!r}")
            lrs = [check_hparam(specs["lr"], lr, f"lrs[{i}]") for i, lr in enumerate(lrs)]
            _refuse_repeats("lrs", lrs)
            configs = [{"lr": lr} for lr in lrs]
    elif lrs is not None:
        raise ValueError("give lrs or configs, not both (a config may set lr)")
    elif isinstance(configs, dict | str | bytes) or not configs or not all(
            isinstance(c, dict) for c in configs):
        raise ValueError(f"configs must be a non-empty list of dicts, got {configs!r}")
    triples = []
    for i, config in enumerate(configs):
        overrides = {k: v for k, v in config.items() if k not in ("seed", "split")}
        unknown = sorted(set(overrides) - set(specs))
        if unknown:
            raise ValueError(
                f"configs[{i}]: {', '.join(unknown)} is not a traced hyperparameter of "
                f"{name}; a sweep varies {', '.join(specs)} (run the others separately)")
        overrides = {k: check_hparam(specs[k], v, f"configs[{i}].{k}")
                     for k, v in overrides.items()}
        split = config.get("split", 0)
        if (not isinstance(split, int) or isinstance(split, bool)
                or not 0 <= split < num_splits):
            raise ValueError(f"configs[{i}].split must be an integer in [0, {num_splits}) "
                             f"(one of the data splits), got {split!r}")
        if seeds is not None:
            if "seed" in config:
                raise ValueError(f"configs[{i}] sets a seed and seeds is given; give one")
            triples += [(s, overrides, split) for s in seeds]
        elif "seed" not in config:
            raise ValueError(f"configs[{i}] has no seed (give it one, or give seeds)")
        else:
            triples.append((check_seed(f"configs[{i}].seed", config["seed"]), overrides,
                            split))
    resolved = [(seed, split, algorithms.resolve(name, **{**hparams, **overrides}))
                for seed, overrides, split in triples]
    for j, entry in enumerate(resolved):
        if entry in resolved[:j]:
            where = f", split {entry[1]}" if num_splits > 1 else ""
            raise ValueError(f"configuration {j} (seed {entry[0]}, {triples[j][1]}{where}) "
                             f"repeats configuration {resolved.index(entry)} (each runs "
                             "once)")
    return triples


def _refuse_repeats(label: str, values: list) -> None:
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ValueError(f"{label} lists {repeated[0]!r} twice (each configuration runs once)")


def _config_dir(seed: int, lr: float, overrides: dict, split: int, num_splits: int) -> str:
    """``seed{s}_lr{lr}`` and every other overridden value, e.g. ``seed0_lr0.1_momentum0.9``
    (and ``_split{i}`` when there are several data splits)."""
    rest = "".join(f"_{k}{v:g}" for k, v in overrides.items() if k != "lr")
    return f"seed{seed}_lr{lr:g}{rest}" + (f"_split{split}" if num_splits > 1 else "")


# Mesh axis name of a sweep's configuration axis.
_CONFIG_AXIS = "configs"


def _config_mesh(num_configs: int, devices: int | None) -> tuple[Mesh | None, int]:
    """A one-axis mesh over ``devices`` of this process (at most one per configuration),
    or ``None`` for one, and the configuration count padded to a multiple of it.

    Every device gets the same number of configurations: 3 on 2 devices run as 4, the
    last repeated and its copy's results dropped, which still finishes sooner than 3 on
    one device.
    """
    available = jax.local_devices()
    wanted = len(available) if devices is None else int(devices)
    if not 1 <= wanted <= len(available):
        raise ValueError(f"devices must be in [1, {len(available)}], got {devices!r}")
    count = min(wanted, num_configs)
    padded = -(-num_configs // count) * count
    if count == 1:
        return None, padded
    mesh = Mesh(np.asarray(available[:count]), (_CONFIG_AXIS,), axis_types=(AxisType.Auto,))
    return mesh, padded


def stack_splits(splits: list[FederatedData]) -> FederatedData:
    """Several splits of one data set (same clients, input shape and classes) as one
    FederatedData with a leading split axis, each padded to the longest client.

    Padding leaves a split's rounds unchanged: a client reads only its first ``count``
    samples and an epoch's batches are drawn over those (``core.local``).
    """
    first = splits[0]
    for i, split in enumerate(splits[1:], 1):
        same = (split.num_clients == first.num_clients
                and split.num_classes == first.num_classes
                and split.input_shape == first.input_shape
                and split.layout == first.layout
                and split.name == first.name)
        if not same:
            raise ValueError(f"data[{i}] is not a split of the data of data[0] (its "
                             "clients, classes, input shape, layout and name must be the "
                             "same)")
    if first.layout == "ragged":
        return stack_ragged(splits)
    n_max = max(s.train_x.shape[1] for s in splits)
    t_max = max(s.test_x.shape[1] for s in splits)

    def pad(leaf, length):
        leaf = np.asarray(leaf)
        width = [(0, 0), (0, length - leaf.shape[1])] + [(0, 0)] * (leaf.ndim - 2)
        return np.pad(leaf, width)

    return first.replace(
        train_x=np.stack([pad(s.train_x, n_max) for s in splits]),
        train_y=np.stack([pad(s.train_y, n_max) for s in splits]),
        train_counts=np.stack([np.asarray(s.train_counts) for s in splits]),
        test_x=np.stack([pad(s.test_x, t_max) for s in splits]),
        test_y=np.stack([pad(s.test_y, t_max) for s in splits]),
        test_counts=np.stack([np.asarray(s.test_counts) for s in splits]),
    )


def _batched_program(algorithm: Algorithm, splits: list[FederatedData],
                     triples: list[tuple[int, dict, int]], hps: list[dict], *,
                     config_strategy: str, mesh: Mesh | None) -> Program:
    """Every configuration of a sweep as one program: states and traced hyperparameters
    stacked on a leading axis, the round mapped over it (``vmap`` or ``lax.map``), the
    axis sharded over ``mesh``. With one split the data is shared; with several, each
    configuration reads its own (``stack_splits``)."""
    init_with, round_with, evaluate_with = algorithm.with_hp()
    num_clients = splits[0].num_clients
    seeds = np.asarray([s for s, _, _ in triples], np.uint32)
    split_of = np.asarray([i for _, _, i in triples], np.int32)
    hp = {key: np.stack([h[key] for h in hps]) for key in hps[0]}
    shared = len(splits) == 1
    data = splits[0] if shared else stack_splits(splits)
    if mesh is None:
        data = to_device(data)
    else:
        data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
        per_config = NamedSharding(mesh, PartitionSpec(_CONFIG_AXIS))
        hp, seeds, split_of = jax.device_put((hp, seeds, split_of), per_config)

    def over_configs(fn):
        """``fn(data, *config_args)`` mapped over the configurations; the data is shared,
        or indexed by each configuration's split."""
        def own(data, split, *args):
            if not shared:
                data = jax.tree.map(lambda leaf: leaf[split], data)
            return fn(data, *args)

        if config_strategy == "vmap":
            mapped = jax.vmap(own, in_axes=(None, 0, 0, 0))
        else:
            def mapped(data, *args):
                return jax.lax.map(lambda a: own(data, *a), args)
        if mesh is None:
            return mapped
        # Every device advances its own block of configurations.
        per = PartitionSpec(_CONFIG_AXIS)
        return jax.shard_map(mapped, mesh=mesh, in_specs=(PartitionSpec(), per, per, per),
                             out_specs=per, check_vma=False)

    state = jax.jit(over_configs(
        lambda data, seed, hp: init_with(jax.random.key(seed), data, hp)))(
        data, split_of, seeds, hp)

    def one_config(data, state, hp, length):
        def one_round(state):
            state, metrics = round_with(state, data, hp)
            bad = safety.nonfinite_clients(state.clients, state.server, num_clients)
            return state, {**metrics, "nonfinite_clients": bad, "nonfinite_any": bad.any()}

        if length == 1:
            state, metrics = one_round(state)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(lambda s, _: one_round(s), state, None, length=length)

    def make_block(length):
        mapped = over_configs(functools.partial(one_config, length=length))

        def rounds_block(state, data, hp):
            return mapped(data[0], data[1], state, hp)

        block = traced_once(rounds_block,
                            f"{algorithm.name} sweep ({length} rounds per call)")
        return jax.jit(block, donate_argnums=0)

    evaluate = jax.jit(lambda state, data, hp: over_configs(
        lambda d, s, h: evaluate_with(s, d, h)[0])(data[0], data[1], state, hp))
    counts = [scored_counts(s) for s in splits]
    return Program(
        algorithm=algorithm, size=len(triples), data=(data, split_of), state=state,
        shardings=None, hp=hp, make_block=make_block, evaluate=evaluate,
        devices=[jax.devices()[0]] if mesh is None else list(mesh.devices.flat),
        host_wait=mesh is not None and mesh.devices.flat[0].platform == "cpu",
        test_counts=np.stack([counts[i] for _, _, i in triples]),
        comm=[algorithm.comm_bytes(splits[i]) for _, _, i in triples],
        view=lambda s, c: jax.tree.map(lambda a: a[c], s))


def _check_sweep(name: str, model: Any, splits: list, *, hparams: dict, seeds: Any, lrs: Any,
                 configs: Any, rounds: Any, eval_every: Any, rounds_per_call: Any,
                 devices: Any, on_divergence: Any, output: Any, config_strategy: Any,
                 per_config: dict) -> list[tuple[int, dict, int]]:
    """:func:`sweep`'s arguments, checked before anything compiles; its configurations."""
    from fedjax_sim import algorithms

    if not splits:
        raise ValueError("data must be FederatedData or a non-empty list of splits")
    for split in splits:
        check_federated_data(split)
        check_model_fits(model, split)
    validate_run_options(rounds=rounds, eval_every=eval_every)
    check_int("rounds_per_call", rounds_per_call, 1)
    if devices is not None:
        check_int("devices", devices, 1)
    validate_divergence_policy(on_divergence)
    if output is not None and per_config["outputs"] is not None:
        raise ValueError("give output (one sweep folder) or outputs (one per "
                         "configuration), not both")
    if config_strategy not in ("auto", "vmap", "map"):
        raise ValueError(f"config_strategy must be auto, vmap or map, got {config_strategy!r}")
    if algorithms.uses_public(name):
        raise ValueError(f"sweep does not support {name}: it needs public data")
    triples = sweep_configs(name, hparams, seeds=seeds, lrs=lrs, configs=configs,
                            num_splits=len(splits))
    for label, values in per_config.items():
        if values is not None and len(values) != len(triples):
            raise ValueError(f"{label} must have one entry per configuration "
                             f"({len(triples)}), got {len(values)}")
    for c, local in enumerate(per_config["local_accuracies"] or ()):
        split = triples[c][2]
        _check_local_accuracies(f"local_accuracies[{c}]", local, splits[split].num_clients)
    return triples


def _sweep_folders(alg: Algorithm, triples: list, num_splits: int, *, output: Any,
                   outputs: Any, overwrite: bool) -> list[Path | None]:
    """Each configuration's run folder (under ``output``, or ``outputs``), checked."""
    from fedjax_sim.rundir import preflight

    if output is not None:
        folders = [Path(output) / _config_dir(seed, overrides.get("lr", alg.numeric["lr"]),
                                              overrides, split, num_splits)
                   for seed, overrides, split in triples]
    else:
        folders = [None if o is None else Path(o) for o in (outputs or [None] * len(triples))]
    for folder in ([Path(output)] if output is not None else folders):
        if folder is not None:
            preflight(folder, overwrite=overwrite)
    return folders


def _sweep_track(name: str, c: int, triple: tuple, splits: list, alg: Algorithm,
                 hparams: dict, folder: Path | None, *, local: Any, extra: dict) -> Track:
    """Configuration ``c``'s labels, hyperparameters and folder."""
    from fedjax_sim import algorithms

    seed, overrides, split = triple
    labels = {"algorithm": name, "dataset": splits[split].name, "seed": seed,
              "lr": overrides.get("lr", alg.numeric["lr"]), **overrides, "config": overrides}
    if len(splits) > 1:
        labels["split"] = split
    return Track(labels=labels, hparams=algorithms.resolve(name, **{**hparams, **overrides}),
                 out=folder, local_accuracies=local, extra_summary=dict(extra))


def sweep(
    name: str,
    model: Any,
    data: FederatedData | list[FederatedData],
    *,
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
    configs: list[dict] | None = None,
    rounds: int,
    eval_every: int = 1,
    hparams: dict | None = None,
    output: str | os.PathLike | None = None,
    outputs: list[str | os.PathLike] | None = None,
    rounds_per_call: int = 1,
    config_strategy: str = "auto",
    progress: bool = True,
    devices: int | None = None,
    overwrite: bool = False,
    options: dict | None = None,
    keep_states: bool = False,
    local_accuracies: list | None = None,
    extra_summaries: list[dict] | None = None,
    config_records: list[dict] | None = None,
    on_divergence: str = "stop",
    events: Events | None = None,
    clock: Any = None,
) -> list[dict]:
    """Runs every configuration (a seed, a data split and values of the traced
    hyperparameters) as one batched simulation, in the loop :func:`run` uses.

    The algorithm is built once; each configuration's traced hyperparameters
    (``Algorithm.hp``) are stacked on a leading axis next to the stacked states, and one
    jitted program advances all of them together (``vmap`` over configurations, or
    ``map``: a compiled loop over them), so the round compiles once for the whole grid.
    The configuration axis is sharded over the devices (the most that divide the number
    of configurations), each device advancing its own configurations; the data is
    replicated. A configuration computes what ``run(make(name, model, **hparams,
    **overrides), data[split], seed=seed)`` computes: bit for bit with ``map`` on CPU
    (the same round, one configuration at a time), to float32 rounding with ``vmap``
    (batched matmuls sum in another order).

    Args:
      name: algorithm name (one without public data).
      model: the model.
      data: the federated data, or a list of splits of one data set (other partitions,
        e.g. other Dirichlet α or partition seeds, with the same number of clients):
        each configuration trains on ``data[split]``.
      seeds: seeds; every configuration runs once per seed, seeds varying fastest.
      lrs: client learning rates to sweep, the configurations ``{"lr": lr}`` (``None``:
        the ``lr`` of ``hparams``); not with ``configs``.
      configs: dicts of traced-hyperparameter overrides (``algorithms.traced_names``,
        e.g. ``{"lr": 0.1, "momentum": 0.9}``), each with its ``seed`` unless ``seeds``
        is given, and its ``split`` (default 0) when ``data`` is a list.
      rounds / eval_every / rounds_per_call / on_divergence / events: as in :func:`run`
        (events get the stacked state, and ``evaluate`` a list of records); a
        configuration that diverges under ``stop`` keeps its records up to the
        divergence and the others go on.
      hparams: the algorithm's other hyperparameters (and defaults of the traced ones).
      clock: a ``core.clock.Clock``: every configuration runs on this virtual clock
        (system model, condition), each with its own clock state, as its own run would.
      output: directory for ``sweep.json`` and one ``seed{s}_lr{lr}[_key{value}...]/``
        run folder per configuration.
      outputs: instead of ``output``, each configuration's run folder (``config.json``,
        ``metrics.jsonl`` rewritten at each evaluation, ``summary.json``, plots).
      config_strategy: ``vmap`` or ``map`` over the configurations, or ``auto``: ``map``
        on CPU (where the vmapped client steps become batched matmuls of small matrices,
        and a client's inactive epoch steps become selects instead of skipped branches)
        and ``vmap`` on accelerators.
      progress: show a progress bar.
      devices: devices to shard the configurations over (``None``: all visible ones of
        this process; the count used divides the number of configurations).
      overwrite: replace existing non-empty run folders (refused without).
      options: every option of the command that started it, for ``config.json``.
      keep_states: add each configuration's final ``SimState`` to its summary as
        ``state`` (never written to disk).
      local_accuracies: per configuration, the Local reference's per-client accuracies
        (or None): every evaluation record and the summary then add the hurt fraction,
        the participation rates and the ties (as in :func:`run`).
      extra_summaries: per configuration, more fields for its summary.
      config_records: per configuration, the ``config.json`` to write in its folder.

    Returns:
      One summary dict per configuration (``seed``, ``lr``, every overridden value,
      ``split`` and ``config``: the overrides; ``history``: its evaluation records), in
      the order of ``configs`` (or ``lrs``), seeds varying fastest. A diverged
      configuration has ``status`` ``diverged``, ``diverged_at`` and ``accuracy`` None.

    Raises:
      ValueError: before anything compiles: a bad loop setting or ``devices``, a bad
        configuration (see :func:`sweep_configs`; ``seeds[i]``, ``lrs[i]``,
        ``configs[i].key`` name the entry), a value the algorithm refuses, or a bad
        hyperparameter.
      fedjax_sim.safety.StoppedError: after SIGINT or SIGTERM (each folder's summary says
        ``stopped``).
    """
    from fedjax_sim import algorithms

    splits = list(data) if isinstance(data, list | tuple) else [data]
    triples = _check_sweep(name, model, splits, hparams=dict(hparams or {}), seeds=seeds,
                           lrs=lrs, configs=configs, rounds=rounds, eval_every=eval_every,
                           rounds_per_call=rounds_per_call, devices=devices,
                           on_divergence=on_divergence, output=output,
                           config_strategy=config_strategy,
                           per_config={"outputs": outputs,
                                       "local_accuracies": local_accuracies,
                                       "extra_summaries": extra_summaries,
                                       "config_records": config_records})
    hparams = dict(hparams or {})
    strategy_override()
    alg = algorithms.make(name, model, cover=[overrides for _, overrides, _ in triples],
                          **hparams)
    if clock is not None:  # every configuration on the same virtual clock, its own state
        from fedjax_sim.algorithms.base import clocked

        alg = clocked(alg, clock, splits[0].num_clients)
    hps = []
    for i, (_, overrides, _) in enumerate(triples):
        try:
            hps.append(alg.hp(**overrides))
        except ValueError as error:
            raise ValueError(f"configuration {i} ({overrides}): {error}") from None
    if config_strategy == "auto":
        config_strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    mesh, padded = _config_mesh(len(triples), devices)
    # Every device holds the data (all splits) and the states of its configurations.
    per_config = _estimate_memory(alg, splits[0], 0, 1)
    run_devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
    safety.check_memory(
        {"client state": per_config["client state"] * padded // len(run_devices),
         "server state": per_config["server state"] * padded // len(run_devices),
         "data": sum(safety.tree_bytes(split) for split in splits)},
        devices=run_devices, what=f"a sweep of {len(triples)} {name} configurations")
    folders = _sweep_folders(alg, triples, len(splits), output=output, outputs=outputs,
                             overwrite=overwrite)
    tracks = [_sweep_track(name, c, triple, splits, alg, hparams, folders[c],
                           local=None if local_accuracies is None else local_accuracies[c],
                           extra=(extra_summaries or [{}] * len(triples))[c])
              for c, triple in enumerate(triples)]
    with contextlib.ExitStack() as stack:
        if output is not None:
            stack.enter_context(RunDir(output, overwrite=overwrite))
        for folder in folders:
            if folder is not None:
                stack.enter_context(RunDir(folder, overwrite=overwrite or output is not None))
        stop = stack.enter_context(safety.StopRequest())
        start = time.perf_counter()
        extra = padded - len(triples)  # copies of the last configuration, dropped
        program = _batched_program(alg, splits, triples + triples[-1:] * extra,
                                   hps + hps[-1:] * extra, config_strategy=config_strategy,
                                   mesh=mesh)
        env = environment()
        for c, track in enumerate(tracks):
            if track.out is not None:
                record = (config_records[c] if config_records is not None else {
                    "options": options or {}, "hparams": track.hparams,
                    "config": {"seed": triples[c][0], "split": triples[c][2],
                               **triples[c][1]}, "environment": env})
                atomic_write_json(track.out / "config.json", record)
                write_jsonl(track.out / "metrics.jsonl", [])
        try:
            state, done, compile_s = _loop(
                program, tracks, rounds=rounds, eval_every=eval_every,
                rounds_per_call=rounds_per_call, checkpoint_every=0, checkpoints=None,
                identity=None, first_round=0, events=events or Events(),
                on_divergence=on_divergence, stop=stop, progress=progress, lead=True,
                start=start, name=f"{name} x{len(triples)}")
        except Exception as error:
            _record_failure(tracks, error)
            raise
        wall = time.perf_counter() - start

        def fields(c, track, status, rounds_done):
            up, down = program.comm[c]
            return {
                "status": status, **track.labels, "num_clients": splits[0].num_clients,
                # Its share of the program's time (all configurations ran together).
                "rounds": rounds, "rounds_done": rounds_done, "wall_s": wall / len(triples),
                "compile_s": compile_s, "bytes_up": up * rounds_done,
                "bytes_down": down * rounds_done, "hparams": track.hparams,
                "sweep_size": len(triples), "sweep_wall_s": wall,
                "config_strategy": config_strategy,
                "devices": 1 if mesh is None else mesh.size, **track.extra_summary,
                # A diverged configuration's row reads as one without figures.
                **({"accuracy": None, "client_p10": None} if status == "diverged" else {})}

        stopped = stop.requested and done < rounds
        _finish(program, tracks, state, rounds=rounds, done=done, stopped=stopped,
                fields=fields, writes=True)
        summaries = []
        for c, track in enumerate(tracks):
            summary = {**track.summary, "history": track.history}
            if keep_states:
                summary["state"] = jax.tree.map(lambda a, c=c: a[c], state)
            summaries.append(summary)
        if output is not None:
            atomic_write_json(Path(output) / "sweep.json", [
                {k: v for k, v in s.items() if k not in ("client_accuracies", "history", "state")}
                for s in summaries])
    if stopped:
        raise safety.StoppedError(f"sweep stopped at round {done} (rerun it to start the "
                                  "stopped configurations again)", round=done,
                                  signum=stop.signum, checkpoint=False)
    return summaries
