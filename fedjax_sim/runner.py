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
from fedjax_sim.core.checkpoint import Checkpointer
from fedjax_sim.core.cohort import CLIENT_AXIS, strategy_override
from fedjax_sim.core.evaluate import federation_incentives, summarize
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData, check_federated_data
from fedjax_sim.rundir import RunDir, atomic_write_json, environment, read_jsonl, write_jsonl

EVENTS = ("round_start", "round_end", "evaluate", "checkpoint", "finish")


class Events:
    """Named host-side events with user handlers, called in registration order."""

    def __init__(self):
        self._handlers: dict[str, list[Callable[..., None]]] = defaultdict(list)

    def on(self, event: str, handler: Callable[..., None]) -> Events:
        """Registers ``handler(**info)`` for ``event``; returns self for chaining."""
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}; got {event!r}")
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
    )


def to_device(data: FederatedData, mesh: Mesh | None = None) -> FederatedData:
    """Moves the padded arrays to the devices once, before the loop; with ``mesh``, the
    client axis is sharded over it."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, data)
    return _place(data, _client_sharded(data, mesh))


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


def _to_host(tree: Any) -> Any:
    """NumPy copies of every leaf, gathering shards held by other processes if needed."""

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)


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
    if state_shardings is None:
        return jax.jit(block, donate_argnums=0)
    replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, PartitionSpec())
    return jax.jit(block, donate_argnums=0, out_shardings=(state_shardings, replicated))


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
            found.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return found


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
        "data": safety.tree_bytes(data) // num_devices,
    }


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
      local_accuracies: per-client accuracies of a local-only run on the same split; when
        given, the summary adds the hurt fraction and the participation rate.
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
        or a model that does not fit the data (``check_model_fits``).
      fedjax_sim.safety.DivergedError: on divergence with ``on_divergence="stop"``.
      fedjax_sim.safety.StoppedError: after SIGINT or SIGTERM, once the round in flight
        finished and the state was saved.
      fedjax_sim.safety.OutOfMemoryError: when the run cannot fit in device memory.
    """
    check_federated_data(data)
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
        try:
            return _run_loop(
                algorithm, data, mesh=mesh, run_devices=run_devices, rounds=rounds,
                eval_every=eval_every, seed=seed, events=events, out=out, lead=lead,
                local_accuracies=local_accuracies, checkpoint_every=checkpoint_every,
                resume=resume, progress=progress, extra_summary=extra_summary,
                rounds_per_call=rounds_per_call, identity=identity, settings=settings,
                on_divergence=on_divergence, stop=stop, checkpoints=checkpoints,
                resume_hint=resume_hint, options=options)
        finally:
            if checkpoints is not None:
                checkpoints.close()


def _run_loop(algorithm, data, *, mesh, run_devices, rounds, eval_every, seed, events, out,
              lead, local_accuracies, checkpoint_every, resume, progress, extra_summary,
              rounds_per_call, identity, settings, on_divergence, stop, checkpoints,
              resume_hint, options) -> RunResult:
    writes = out is not None and lead
    num_devices = 1 if mesh is None else mesh.size
    test_counts = np.asarray(data.test_counts)
    host_wait = safety.needs_host_wait(mesh)
    watchdog = safety.Watchdog()
    start = time.perf_counter()
    data, state, shardings = place(algorithm, data, seed=seed, mesh=mesh)
    history: list[dict] = []
    resumed_from = None
    if resume:
        state, history = _resume(out, checkpoints, state, shardings, identity, rounds,
                                 write=writes)
        resumed_from = int(state.round)
    config_record = {"identity": identity, "settings": settings, "options": options or {},
                     "environment": environment(), "resumed_from": resumed_from}
    if writes:
        atomic_write_json(out / "config.json", config_record)
        if not resume:
            write_jsonl(out / "metrics.jsonl", [])
    if host_wait:
        watchdog.wait(state, "initializing the state")

    blocks: dict[int, Callable] = {}
    # The traced hyperparameters go in as data: the same compiled round serves any values
    # (a sweep's configurations run this very program).
    hp = algorithm.hp()
    _, _, evaluate_with = algorithm.with_hp()
    if mesh is None:
        evaluate_fn = jax.jit(evaluate_with)
    else:
        evaluate_fn = jax.jit(evaluate_with,
                              out_shardings=NamedSharding(mesh, PartitionSpec()))
    up_per_round, down_per_round = algorithm.comm_bytes(data)
    labels = {"algorithm": algorithm.name, "dataset": data.name, "seed": seed}
    first_round = int(state.round)
    compile_s = None
    diverged: dict | None = None
    bar = _progress(rounds - first_round, progress and lead, algorithm.name)

    def summary_fields(status: str, done: int) -> dict:
        return {
            "status": status, **labels, "num_clients": data.num_clients, "rounds": rounds,
            "rounds_done": done, "wall_s": time.perf_counter() - start,
            "compile_s": compile_s, "bytes_up": up_per_round * done,
            "bytes_down": down_per_round * done, "devices": num_devices,
            "processes": jax.process_count(), "rounds_per_call": rounds_per_call,
            "hparams": algorithm.hparams, **(extra_summary or {}),
        }

    def save(done: int) -> None:
        checkpoints.save(done, state, {"identity": identity, "round": done})
        events.emit("checkpoint", round=done, state=state, path=checkpoints.directory)

    r = first_round
    try:
        while r < rounds:
            stop_at = min(rounds, (r // eval_every + 1) * eval_every, r + rounds_per_call)
            if checkpoint_every:
                stop_at = min(stop_at, (r // checkpoint_every + 1) * checkpoint_every)
            length = stop_at - r
            tic = time.perf_counter()
            if length not in blocks:
                blocks[length] = _compile_block(
                    make_round_block(algorithm, length, state_shardings=shardings,
                                     check_traces=True, num_clients=data.num_clients),
                    state, data, hp, run_devices)
            for i in range(length):
                events.emit("round_start", round=r + i, state=state)
            state, metrics = blocks[length](state, data, hp)
            if host_wait or compile_s is None:
                watchdog.wait(state, f"rounds {r + 1}-{stop_at}")
            if compile_s is None:
                compile_s = time.perf_counter() - tic
            losses = np.asarray(metrics["train_loss"])
            if not np.isfinite(losses).all() or bool(np.asarray(metrics["nonfinite_any"]).any()):
                diverged = _divergence(metrics, losses, r, algorithm, on_divergence, diverged)
            for i in range(length):
                events.emit("round_end", round=r + i + 1, state=state,
                            metrics=jax.tree.map(lambda m, i=i: m[i], metrics))
            if bar is not None:
                bar.update(length)
            r = done = stop_at
            if diverged is not None and on_divergence == "stop":
                break
            if done % eval_every == 0 or done == rounds:
                correct, _ = evaluate_fn(state, data, hp)
                record = {
                    "round": done, **labels,
                    "train_loss": float(losses[-1]),
                    **summarize(np.asarray(correct), test_counts),
                    "bytes_up": up_per_round * done,
                    "bytes_down": down_per_round * done,
                    "wall_s": time.perf_counter() - start,
                }
                if diverged is not None:
                    record["diverged_at"] = diverged["round"]
                history.append(record)
                if writes:
                    write_jsonl(out / "metrics.jsonl", history)
                if bar is not None:
                    bar.set_postfix(acc=f"{record['accuracy']:.4f}")
                events.emit("evaluate", round=done, state=state, record=record)
            if checkpoints is not None and checkpoint_every and done % checkpoint_every == 0:
                save(done)
            if stop.requested:
                break
    except jax.errors.JaxRuntimeError as error:
        if safety.is_out_of_memory(error):
            raise safety.OutOfMemoryError(
                f"{algorithm.name} ran out of device memory at round {r + 1}: "
                f"{str(error).splitlines()[0][:200]}; lower --num-clients, --batch-size or "
                "the model size, or use --client-strategy sequential") from None
        raise
    finally:
        if bar is not None:
            bar.close()

    if diverged is not None and on_divergence == "stop":
        summary = {**summary_fields("diverged", diverged["round"]), "diverged": diverged}
        if writes:
            atomic_write_json(out / "summary.json", summary)
            if history:
                _plots(out, history, summary)
        raise safety.DivergedError(diverged["message"], round=diverged["round"],
                                   clients=diverged["clients"])
    if stop.requested and r < rounds:
        saved = checkpoints is not None
        if saved:
            save(r)
            checkpoints.wait()
        summary = summary_fields("stopped", r)
        if writes:
            atomic_write_json(out / "summary.json", summary)
            if history:
                _plots(out, history, {**summary, **history[-1]})
        how = (f"; resume with: {resume_hint}" if saved and resume_hint else
               f"; its checkpoint is in {checkpoints.directory}" if saved else
               " (no output folder: nothing was saved)")
        raise safety.StoppedError(f"stopped at round {r}{how}", round=r, signum=stop.signum,
                                  checkpoint=saved)

    final = history[-1]
    summary = {
        **summary_fields("complete" if diverged is None else "diverged", rounds),
        "accuracy": final["accuracy"],
        "client_mean_accuracy": final["client_mean_accuracy"],
        "client_std": final["client_std"],
        "client_min": final["client_min"],
        "client_p10": final["client_p10"],
        "client_accuracies": final["client_accuracies"],
    }
    if diverged is not None:
        summary["diverged"] = diverged
    if resumed_from is not None:
        summary["resumed_from"] = resumed_from
    if algorithm.report is not None:
        summary.update(algorithm.report(state))
    if local_accuracies is not None:
        summary.update(federation_incentives(final["client_accuracies"], local_accuracies))
    if checkpoints is not None:
        checkpoints.wait()
    if writes:
        atomic_write_json(out / "summary.json", summary)
        _plots(out, history, summary)
    events.emit("finish", summary=summary, state=state, history=history)
    return RunResult(summary, history, state)


def _divergence(metrics, losses, first, algorithm, policy, seen) -> dict:
    """The first divergence (round, clients, message); warns under ``warn``."""
    flags = np.asarray(metrics["nonfinite_any"])
    bad_rounds = np.flatnonzero(~np.isfinite(losses) | flags)
    index = int(bad_rounds[0])
    clients = np.asarray(_to_host(metrics["nonfinite_clients"]))[index]
    message = safety.divergence_message(first + index + 1, clients, float(losses[index]),
                                        algorithm.hparams)
    if seen is not None:
        return seen
    if policy == "warn":
        warnings.warn(message + " (going on: --on-divergence warn)", RuntimeWarning,
                      stacklevel=3)
    return {"round": first + index + 1, "clients": np.flatnonzero(clients).tolist(),
            "message": message}


def _resume(out: Path, checkpoints: Checkpointer, template: SimState, shardings,
            identity: dict, rounds: int, *, write: bool) -> tuple[SimState, list[dict]]:
    """The checkpointed state and the evaluation records up to its round, after checking
    that the checkpoint belongs to a run with these settings."""
    latest = checkpoints.latest_round()
    if latest is None:
        raise ResumeError(f"--resume: no checkpoint in {checkpoints.directory}; run without "
                          "--resume (use --checkpoint-every to save one)")
    meta = checkpoints.metadata(latest)
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
    state, _ = checkpoints.restore(template, shardings, latest)
    metrics_path = out / "metrics.jsonl"
    history = read_jsonl(metrics_path) if metrics_path.exists() else []
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
    """accuracy.png (accuracy against rounds) and clients.png (per-client distribution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["round"] for h in history], [h["accuracy"] for h in history], label="accuracy")
    ax.plot([h["round"] for h in history], [h["client_p10"] for h in history],
            label="bottom decile", linestyle="--")
    ax.set_xlabel("round")
    ax.set_ylabel("personalized test accuracy")
    ax.set_title(f"{summary['algorithm']} on {summary['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

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
) -> list[tuple[int, dict]]:
    """The configurations of a sweep as ``(seed, overrides)`` pairs, checked on the host.

    Args:
      name: algorithm name.
      hparams: the algorithm's other hyperparameters (checked by the caller).
      seeds: seeds; every configuration runs once per seed (seeds varying fastest).
      lrs: learning rates: the configurations ``{"lr": lr}`` (``configs`` must be unset).
      configs: dicts of traced-hyperparameter overrides, each with its ``seed`` unless
        ``seeds`` is given.

    Returns:
      One ``(seed, overrides)`` per configuration.

    Raises:
      ValueError: naming the entry: an empty or repeated list entry, a bad seed or value,
        a key that is not a traced hyperparameter of ``name``, ``lrs`` with ``configs``,
        a configuration without a seed, or two identical configurations.
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
    pairs = []
    for i, config in enumerate(configs):
        overrides = {k: v for k, v in config.items() if k != "seed"}
        unknown = sorted(set(overrides) - set(specs))
        if unknown:
            raise ValueError(
                f"configs[{i}]: {', '.join(unknown)} is not a traced hyperparameter of "
                f"{name}; a sweep varies {', '.join(specs)} (run the others separately)")
        overrides = {k: check_hparam(specs[k], v, f"configs[{i}].{k}")
                     for k, v in overrides.items()}
        if seeds is not None:
            if "seed" in config:
                raise ValueError(f"configs[{i}] sets a seed and seeds is given; give one")
            pairs += [(s, overrides) for s in seeds]
        elif "seed" not in config:
            raise ValueError(f"configs[{i}] has no seed (give it one, or give seeds)")
        else:
            pairs.append((check_seed(f"configs[{i}].seed", config["seed"]), overrides))
    resolved = [(seed, algorithms.resolve(name, **{**hparams, **overrides}))
                for seed, overrides in pairs]
    for j, pair in enumerate(resolved):
        if pair in resolved[:j]:
            raise ValueError(f"configuration {j} (seed {pair[0]}, {pairs[j][1]}) repeats "
                             f"configuration {resolved.index(pair)} (each runs once)")
    return pairs


def _refuse_repeats(label: str, values: list) -> None:
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ValueError(f"{label} lists {repeated[0]!r} twice (each configuration runs once)")


def _config_dir(seed: int, lr: float, overrides: dict) -> str:
    """``seed{s}_lr{lr}`` and every other overridden value, e.g. ``seed0_lr0.1_momentum0.9``."""
    rest = "".join(f"_{k}{v:g}" for k, v in overrides.items() if k != "lr")
    return f"seed{seed}_lr{lr:g}{rest}"


# Mesh axis name of a sweep's configuration axis.
_CONFIG_AXIS = "configs"


def _config_mesh(num_configs: int, devices: int | None) -> Mesh | None:
    """A one-axis mesh over the most devices of this process that divide ``num_configs``,
    or ``None`` for one."""
    available = jax.local_devices()
    wanted = len(available) if devices is None else int(devices)
    if not 1 <= wanted <= len(available):
        raise ValueError(f"devices must be in [1, {len(available)}], got {devices!r}")
    count = max(d for d in range(1, wanted + 1) if num_configs % d == 0)
    if count == 1:
        return None
    return Mesh(np.asarray(available[:count]), (_CONFIG_AXIS,), axis_types=(AxisType.Auto,))


def sweep(
    name: str,
    model: Any,
    data: FederatedData,
    *,
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
    configs: list[dict] | None = None,
    rounds: int,
    eval_every: int = 1,
    hparams: dict | None = None,
    output: str | os.PathLike | None = None,
    rounds_per_call: int = 1,
    config_strategy: str = "auto",
    progress: bool = True,
    devices: int | None = None,
    overwrite: bool = False,
    options: dict | None = None,
    keep_states: bool = False,
) -> list[dict]:
    """Runs every configuration (a seed and values of the traced hyperparameters) as one
    batched simulation.

    The algorithm is built once; each configuration's traced hyperparameters
    (``Algorithm.hp``) are stacked on a leading axis next to the stacked states, and one
    jitted program advances all of them together (``vmap`` over configurations, or
    ``map``: a compiled loop over them), so the round compiles once for the whole grid.
    The configuration axis is sharded over the devices (the most that divide the number
    of configurations), each device advancing its own configurations; the data is
    replicated. A configuration computes what ``run(make(name, model, **hparams,
    **overrides), data, seed=seed)`` computes: bit for bit with ``map`` on CPU (the same
    round, one configuration at a time), to float32 rounding with ``vmap`` (batched
    matmuls sum in another order).

    Args:
      name: algorithm name (one without public data).
      model: the model.
      data: the federated data.
      seeds: seeds; every configuration runs once per seed, seeds varying fastest.
      lrs: client learning rates to sweep, the configurations ``{"lr": lr}`` (``None``:
        the ``lr`` of ``hparams``); not with ``configs``.
      configs: dicts of traced-hyperparameter overrides (``algorithms.traced_names``,
        e.g. ``{"lr": 0.1, "momentum": 0.9}``), each with its ``seed`` unless ``seeds``
        is given.
      rounds / eval_every / rounds_per_call: as in :func:`run`.
      hparams: the algorithm's other hyperparameters (and defaults of the traced ones).
      output: directory for ``sweep.json`` and one ``seed{s}_lr{lr}[_key{value}...]/
        summary.json`` per configuration.
      config_strategy: ``vmap`` or ``map`` over the configurations, or ``auto``: ``map``
        on CPU (where the vmapped client steps become batched matmuls of small matrices,
        and a client's inactive epoch steps become selects instead of skipped branches)
        and ``vmap`` on accelerators.
      progress: show a progress bar.
      devices: devices to shard the configurations over (``None``: all visible ones of
        this process; the count used divides the number of configurations).
      overwrite: replace the sweep in an existing non-empty ``output`` (refused without).
      options: every option of the command that started it, for ``config.json``.
      keep_states: add each configuration's final ``SimState`` to its summary as
        ``state`` (never written to disk).

    A configuration whose loss or state turns non-finite is reported with ``status``
    ``diverged`` and the round (``diverged_at``), and without accuracy figures; the
    others go on.

    Returns:
      One summary dict per configuration (``seed``, ``lr``, every overridden value and
      ``config``: the overrides), in the order of ``configs`` (or ``lrs``), seeds varying
      fastest.

    Raises:
      ValueError: before anything compiles: a bad loop setting or ``devices``, a bad
        configuration (see :func:`sweep_configs`; ``seeds[i]``, ``lrs[i]``,
        ``configs[i].key`` name the entry), a value the algorithm refuses, or a bad
        hyperparameter.
    """
    from fedjax_sim import algorithms

    check_federated_data(data)
    check_model_fits(model, data)
    validate_run_options(rounds=rounds, eval_every=eval_every)
    check_int("rounds_per_call", rounds_per_call, 1)
    if devices is not None:
        check_int("devices", devices, 1)
    if output is not None:
        from fedjax_sim.rundir import preflight

        preflight(output, overwrite=overwrite)
    if config_strategy not in ("auto", "vmap", "map"):
        raise ValueError(f"config_strategy must be auto, vmap or map, got {config_strategy!r}")
    hparams = dict(hparams or {})
    if algorithms.uses_public(name):
        raise ValueError(f"sweep does not support {name}: it needs public data")
    pairs = sweep_configs(name, hparams, seeds=seeds, lrs=lrs, configs=configs)
    strategy_override()
    alg = algorithms.make(name, model, cover=[overrides for _, overrides in pairs], **hparams)
    hps = []
    for i, (_, overrides) in enumerate(pairs):
        try:
            hps.append(alg.hp(**overrides))
        except ValueError as error:
            raise ValueError(f"configuration {i} ({overrides}): {error}") from None
    init_with, round_with, evaluate_with = alg.with_hp()
    if config_strategy == "auto":
        config_strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    seed_arr = np.asarray([s for s, _ in pairs], np.uint32)
    hp_arr = {key: np.stack([h[key] for h in hps]) for key in hps[0]}
    mesh = _config_mesh(len(pairs), devices)
    if mesh is None:
        data = to_device(data)
    else:
        data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
        hp_arr = jax.device_put(hp_arr, NamedSharding(mesh, PartitionSpec(_CONFIG_AXIS)))

    def over_configs(fn):
        """``fn(data, *config_args)`` mapped over the configurations; data is shared."""
        if config_strategy == "vmap":
            mapped = jax.vmap(fn, in_axes=(None, 0, 0))
        else:
            def mapped(data, *args):
                return jax.lax.map(lambda a: fn(data, *a), args)
        if mesh is None:
            return mapped
        # Every device advances its own block of configurations.
        per_config = PartitionSpec(_CONFIG_AXIS)
        return jax.shard_map(mapped, mesh=mesh,
                             in_specs=(PartitionSpec(), per_config, per_config),
                             out_specs=per_config, check_vma=False)

    start = time.perf_counter()
    states = jax.jit(over_configs(
        lambda data, seed, hp: init_with(jax.random.key(seed), data, hp)))(
        data, seed_arr, hp_arr)

    def make_block(length):
        def one(data, state, hp):
            def one_round(state):
                state, metrics = round_with(state, data, hp)
                bad = safety.nonfinite_clients(state.clients, state.server, data.num_clients)
                return state, {**metrics, "nonfinite_any": bad.any()}

            if length == 1:
                state, metrics = one_round(state)
                return state, jax.tree.map(lambda m: m[None], metrics)
            return jax.lax.scan(lambda s, _: one_round(s), state, None, length=length)

        block = jax.jit(over_configs(one), donate_argnums=1)
        return lambda states: block(data, states, hp_arr)

    evaluate_all = jax.jit(over_configs(
        lambda data, state, hp: evaluate_with(state, data, hp)))

    def evaluate(states):
        return evaluate_all(data, states, hp_arr)

    labels = [{"seed": seed, "lr": overrides.get("lr", alg.numeric["lr"]), **overrides,
               "config": overrides} for seed, overrides in pairs]
    blocks: dict[int, Callable] = {}
    histories: list[list[dict]] = [[] for _ in pairs]
    diverged_at: list[int | None] = [None] * len(pairs)
    test_counts = np.asarray(data.test_counts)
    host_wait = mesh is not None and mesh.devices.flat[0].platform == "cpu"
    watchdog = safety.Watchdog()
    bar = _progress(rounds, progress, f"{name} x{len(pairs)}")
    r, compile_s = 0, None
    with (RunDir(output, overwrite=overwrite) if output is not None
          else contextlib.nullcontext()):
        while r < rounds:
            stop = min(rounds, (r // eval_every + 1) * eval_every, r + rounds_per_call)
            if stop - r not in blocks:
                blocks[stop - r] = make_block(stop - r)
            tic = time.perf_counter()
            states, metrics = blocks[stop - r](states)
            if host_wait or compile_s is None:
                watchdog.wait(states, f"sweep rounds {r + 1}-{stop}")
            if compile_s is None:
                compile_s = time.perf_counter() - tic
            losses = np.asarray(metrics["train_loss"])
            bad = ~np.isfinite(losses) | np.asarray(metrics["nonfinite_any"])
            for c in np.flatnonzero(bad.any(axis=1)):
                if diverged_at[c] is None:
                    diverged_at[c] = r + 1 + int(np.flatnonzero(bad[c])[0])
            if bar is not None:
                bar.update(stop - r)
            r = stop
            if r % eval_every == 0 or r == rounds:
                correct = np.asarray(evaluate(states)[0])
                for c in range(len(pairs)):
                    record = {"round": r, "algorithm": name, "dataset": data.name,
                              **labels[c], "train_loss": float(losses[c, -1]),
                              **summarize(correct[c], test_counts),
                              "wall_s": time.perf_counter() - start}
                    if diverged_at[c] is not None:
                        record["diverged_at"] = diverged_at[c]
                    histories[c].append(record)
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - start
        summaries = []
        for c, history in enumerate(histories):
            summary = {
                "status": "complete" if diverged_at[c] is None else "diverged",
                "algorithm": name, "dataset": data.name, "num_clients": data.num_clients,
                "rounds": rounds, **labels[c]}
            if diverged_at[c] is None:
                final = history[-1]
                summary.update({k: final[k] for k in (
                    "accuracy", "client_mean_accuracy", "client_std", "client_min",
                    "client_p10", "client_accuracies")})
            else:
                summary.update(diverged_at=diverged_at[c], accuracy=None, client_p10=None)
            summary.update({"history": history, "sweep_size": len(pairs),
                            "sweep_wall_s": wall, "compile_s": compile_s,
                            "config_strategy": config_strategy,
                            "devices": 1 if mesh is None else mesh.size})
            if keep_states:
                summary["state"] = jax.tree.map(lambda a, c=c: a[c], states)
            summaries.append(summary)
        if output is not None:
            out = Path(output)
            atomic_write_json(out / "config.json", {
                "options": options or {}, "hparams": hparams,
                "configs": [{"seed": seed, **overrides} for seed, overrides in pairs],
                "environment": environment()})
            for summary, (seed, overrides) in zip(summaries, pairs, strict=True):
                sub = out / _config_dir(seed, summary["lr"], overrides)
                sub.mkdir(exist_ok=True)
                atomic_write_json(sub / "summary.json",
                                  {k: v for k, v in summary.items() if k != "state"})
            atomic_write_json(out / "sweep.json", [
                {k: v for k, v in s.items() if k not in ("client_accuracies", "history", "state")}
                for s in summaries])
    return summaries
