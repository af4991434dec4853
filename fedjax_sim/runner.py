"""The host loop: jit the round once, run it, evaluate, emit events, write results.

Extensibility follows FederatedScope's event/handler view of an FL course, on the host
side only (the jitted round stays pure): handlers registered with ``Events.on`` run at
``round_start``, ``round_end``, ``evaluate``, ``checkpoint`` and ``finish``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.core.checkpoint import Checkpointer, check_meta
from fedjax_sim.core.cohort import CLIENT_AXIS
from fedjax_sim.core.evaluate import federation_incentives, summarize
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData

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
    """Client part sharded over the mesh, everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return state_shape.replace(
        key=replicated,
        round=replicated,
        server=jax.tree.map(lambda _: replicated, state_shape.server),
        clients=_client_sharded(state_shape.clients, mesh),
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
) -> Callable:
    """One jitted call running ``length`` rounds with ``lax.scan`` (the state buffers are
    donated, nothing returns to the host in between).

    Returns:
      ``(state, data) -> (state, metrics)``, every metric stacked over the ``length``
      rounds.
    """
    if length < 1:
        raise ValueError(f"rounds per call must be >= 1, got {length}")

    def block(state, data):
        if length == 1:
            state, metrics = algorithm.round(state, data)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(lambda s, _: algorithm.round(s, data), state, None, length=length)

    if check_traces:
        block = traced_once(block, f"{algorithm.name} ({length} rounds per call)")
    if state_shardings is None:
        return jax.jit(block, donate_argnums=0)
    replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, PartitionSpec())
    return jax.jit(block, donate_argnums=0, out_shardings=(state_shardings, replicated))


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
    progress: bool = True,
    extra_summary: dict | None = None,
    rounds_per_call: int = 1,
    devices: int | None = None,
) -> RunResult:
    """Runs ``rounds`` rounds of ``algorithm`` on ``data``.

    Args:
      algorithm: from ``fedjax_sim.algorithms.make``.
      data: the federated data (numpy or jax arrays).
      rounds: number of rounds.
      eval_every: evaluate every this many rounds (and always after the last).
      seed: seed of the one PRNG key everything is split from.
      events: host-side handlers.
      output: directory for ``metrics.jsonl`` (appended at each evaluation),
        ``summary.json``, plots and checkpoints; nothing is written when None (nor by any
        process but the first in a multi-process run).
      local_accuracies: per-client accuracies of a local-only run on the same split; when
        given, the summary adds the hurt fraction and the participation rate.
      checkpoint_every: save the state every this many rounds (0: never) under
        ``output/checkpoints/<round>``, each process its own shards, in the background
        (the ``checkpoint`` event fires once the save has started); the latest two are
        kept.
      resume: continue from the latest checkpoint under ``output/checkpoints`` if there
        is one (on any number of devices); it must come from a run of the same
        algorithm, hyperparameters, data set, client count and seed.
      progress: show a progress bar.
      extra_summary: more fields for ``summary.json``.
      rounds_per_call: rounds run by one jitted call (a ``lax.scan`` over rounds); a call
        also ends at every evaluation and checkpoint. With more than one, the
        ``round_start`` and ``round_end`` events of a call's rounds fire around the call,
        with the state at its start and at its end.
      devices: number of devices the client axis is sharded over (``None``: all visible
        devices, across processes after ``jax.distributed.initialize()``); the count used
        divides K and is recorded as ``devices`` in the summary.

    Returns:
      A RunResult.
    """
    validate_run_options(rounds=rounds, eval_every=eval_every, checkpoint_every=checkpoint_every)
    if not isinstance(rounds_per_call, int) or rounds_per_call < 1:
        raise ValueError(f"rounds_per_call must be an integer >= 1, got {rounds_per_call!r}")
    events = events or Events()
    lead = jax.process_index() == 0
    out = Path(output) if output is not None else None
    if out is not None and lead:
        out.mkdir(parents=True, exist_ok=True)
    mesh = client_axis_mesh(data.num_clients, devices)
    num_devices = 1 if mesh is None else mesh.size
    test_counts = np.asarray(data.test_counts)
    with mesh_context(mesh):
        start = time.perf_counter()
        data, state, shardings = place(algorithm, data, seed=seed, mesh=mesh)
        history: list[dict] = []
        meta = {"algorithm": algorithm.name, "dataset": data.name,
                "num_clients": data.num_clients, "seed": seed, "hparams": algorithm.hparams}
        ckpt = None
        if out is not None and (checkpoint_every or resume):
            ckpt = Checkpointer(out / "checkpoints")
        if resume and ckpt is not None and ckpt.latest_round() is not None:
            state, saved_meta = ckpt.restore(state, shardings)
            check_meta(ckpt.path(int(state.round)), saved_meta, meta)
            history = _read_history(out / "metrics.jsonl", int(state.round), write=lead)
        elif out is not None and lead:
            (out / "metrics.jsonl").write_text("")

        blocks: dict[int, Callable] = {}
        if mesh is None:
            evaluate_fn = jax.jit(algorithm.evaluate)
        else:
            evaluate_fn = jax.jit(algorithm.evaluate,
                                  out_shardings=NamedSharding(mesh, PartitionSpec()))
        up_per_round, down_per_round = algorithm.comm_bytes(data)
        first_round = int(state.round)
        compile_s = None
        bar = _progress(rounds - first_round, progress and lead, algorithm.name)
        r = first_round
        while r < rounds:
            stop = min(rounds, (r // eval_every + 1) * eval_every, r + rounds_per_call)
            if checkpoint_every:
                stop = min(stop, (r // checkpoint_every + 1) * checkpoint_every)
            length = stop - r
            if length not in blocks:
                blocks[length] = make_round_block(algorithm, length, state_shardings=shardings,
                                                  check_traces=True)
            for i in range(length):
                events.emit("round_start", round=r + i, state=state)
            tic = time.perf_counter()
            state, metrics = blocks[length](state, data)
            if compile_s is None:
                jax.block_until_ready(state)
                compile_s = time.perf_counter() - tic
            for i in range(length):
                events.emit("round_end", round=r + i + 1, state=state,
                            metrics=jax.tree.map(lambda m, i=i: m[i], metrics))
            if bar is not None:
                bar.update(length)
            r = done = stop
            if done % eval_every == 0 or done == rounds:
                correct, _ = evaluate_fn(state, data)
                record = {
                    "round": done,
                    "train_loss": float(np.asarray(metrics["train_loss"])[-1]),
                    **summarize(np.asarray(correct), test_counts),
                    "bytes_up": up_per_round * done,
                    "bytes_down": down_per_round * done,
                    "wall_s": time.perf_counter() - start,
                }
                history.append(record)
                if out is not None and lead:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix(acc=f"{record['accuracy']:.4f}")
                events.emit("evaluate", round=done, state=state, record=record)
            if ckpt is not None and checkpoint_every and done % checkpoint_every == 0:
                ckpt.save(done, state, meta)
                events.emit("checkpoint", round=done, state=state, path=ckpt.path(done))
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()

        final = history[-1]
        summary = {
            "algorithm": algorithm.name,
            "dataset": data.name,
            "num_clients": data.num_clients,
            "rounds": rounds,
            "seed": seed,
            "accuracy": final["accuracy"],
            "client_mean_accuracy": final["client_mean_accuracy"],
            "client_std": final["client_std"],
            "client_min": final["client_min"],
            "client_p10": final["client_p10"],
            "client_accuracies": final["client_accuracies"],
            "wall_s": time.perf_counter() - start,
            "compile_s": compile_s,
            "bytes_up": up_per_round * rounds,
            "bytes_down": down_per_round * rounds,
            "devices": num_devices,
            "processes": jax.process_count(),
            "rounds_per_call": rounds_per_call,
            "hparams": algorithm.hparams,
            **(extra_summary or {}),
        }
        if algorithm.report is not None:
            summary.update(algorithm.report(state))
    if local_accuracies is not None:
        summary.update(federation_incentives(final["client_accuracies"], local_accuracies))
    if out is not None and lead:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _plots(out, history, summary)
    events.emit("finish", summary=summary, state=state, history=history)
    return RunResult(summary, history, state)


def _read_history(path: Path, up_to_round: int, *, write: bool = True) -> list[dict]:
    """Evaluation records already written, up to the checkpointed round."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [rec for rec in records if rec["round"] <= up_to_round]
    if write:
        path.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    return kept


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


def _traced_factory(name: str, model: Any, hparams: dict) -> Callable[[Any], Algorithm]:
    """``lr -> Algorithm`` with the learning rate left as a (possibly traced) value.

    The hyperparameters are validated once with a float learning rate; the registry's
    convention (module ``fedjax_sim.algorithms.<name>`` with a factory ``<name>``) then
    builds the algorithm around whatever ``lr`` is, so that it can be vmapped.
    """
    import importlib

    from fedjax_sim import algorithms

    if algorithms.uses_public(name):
        raise ValueError(f"sweep does not support {name}: it needs public data")
    resolved = algorithms.resolve(name, **hparams)
    factory = getattr(importlib.import_module(f"fedjax_sim.algorithms.{name}"), name)
    return lambda lr: factory(model, **{**resolved, "lr": lr})


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
    seeds: list[int],
    lrs: list[float] | None = None,
    rounds: int,
    eval_every: int = 1,
    hparams: dict | None = None,
    output: str | os.PathLike | None = None,
    rounds_per_call: int = 1,
    config_strategy: str = "auto",
    progress: bool = True,
    devices: int | None = None,
) -> list[dict]:
    """Runs every (seed, learning rate) pair as one batched simulation.

    The states of all configurations are stacked on a leading axis and one jitted program
    advances them together (``vmap`` over configurations, or ``map``: a compiled loop over
    them), so the round compiles once for the whole grid. The configuration axis is
    sharded over the devices (the most that divide the number of configurations), each
    device advancing its own configurations; the data is replicated. Configuration
    ``(s, lr)`` follows the same random stream as ``run(..., seed=s)`` with that ``lr``.

    Args:
      name: algorithm name (one without public data).
      model: the model.
      data: the federated data.
      seeds: seeds, one run per seed (and per learning rate).
      lrs: client learning rates to sweep (``None``: the ``lr`` of ``hparams``).
      rounds / eval_every / rounds_per_call: as in :func:`run`.
      hparams: the algorithm's other hyperparameters.
      output: directory for ``sweep.json`` and one ``seed{s}_lr{lr}/summary.json`` per
        configuration.
      config_strategy: ``vmap`` or ``map`` over the configurations, or ``auto``: ``map``
        on CPU (where the vmapped client steps become batched matmuls of small matrices,
        and a client's inactive epoch steps become selects instead of skipped branches)
        and ``vmap`` on accelerators.
      progress: show a progress bar.
      devices: devices to shard the configurations over (``None``: all visible ones of
        this process; the count used divides the number of configurations).

    Returns:
      One summary dict per configuration, seeds varying fastest.
    """
    validate_run_options(rounds=rounds, eval_every=eval_every)
    if config_strategy not in ("auto", "vmap", "map"):
        raise ValueError(f"config_strategy must be auto, vmap or map, got {config_strategy!r}")
    if config_strategy == "auto":
        config_strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    hparams = dict(hparams or {})
    if lrs is None:
        lrs = [float(hparams.get("lr", 0.01))]
    hparams["lr"] = float(lrs[0])
    make = _traced_factory(name, model, hparams)
    configs = [(int(s), float(lr)) for lr in lrs for s in seeds]
    seed_arr = np.asarray([s for s, _ in configs], np.uint32)
    lr_arr = np.asarray([lr for _, lr in configs], np.float32)
    mesh = _config_mesh(len(configs), devices)
    if mesh is None:
        data = to_device(data)
        lr_arr = jax.numpy.asarray(lr_arr)
    else:
        data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
        lr_arr = jax.device_put(lr_arr, NamedSharding(mesh, PartitionSpec(_CONFIG_AXIS)))

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
        lambda data, seed, lr: make(lr).init(jax.random.key(seed), data)))(
        data, seed_arr, lr_arr)

    def make_block(length):
        def one(data, state, lr):
            alg = make(lr)
            if length == 1:
                state, metrics = alg.round(state, data)
                return state, jax.tree.map(lambda m: m[None], metrics)
            return jax.lax.scan(lambda s, _: alg.round(s, data), state, None, length=length)

        block = jax.jit(over_configs(one), donate_argnums=1)
        return lambda states, lrs_: block(data, states, lrs_)

    evaluate_all = jax.jit(over_configs(lambda data, state, lr: make(lr).evaluate(state, data)))

    def evaluate(states, lrs_):
        return evaluate_all(data, states, lrs_)
    blocks: dict[int, Callable] = {}
    histories: list[list[dict]] = [[] for _ in configs]
    test_counts = np.asarray(data.test_counts)
    bar = _progress(rounds, progress, f"{name} x{len(configs)}")
    r, compile_s = 0, None
    while r < rounds:
        stop = min(rounds, (r // eval_every + 1) * eval_every, r + rounds_per_call)
        if stop - r not in blocks:
            blocks[stop - r] = make_block(stop - r)
        tic = time.perf_counter()
        states, metrics = blocks[stop - r](states, lr_arr)
        if compile_s is None:
            jax.block_until_ready(states)
            compile_s = time.perf_counter() - tic
        if bar is not None:
            bar.update(stop - r)
        r = stop
        if r % eval_every == 0 or r == rounds:
            correct = np.asarray(evaluate(states, lr_arr)[0])
            losses = np.asarray(metrics["train_loss"])[:, -1]
            for c in range(len(configs)):
                histories[c].append({"round": r, "train_loss": float(losses[c]),
                                     **summarize(correct[c], test_counts),
                                     "wall_s": time.perf_counter() - start})
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    summaries = []
    for (seed, lr), history in zip(configs, histories, strict=True):
        final = history[-1]
        summaries.append({
            "algorithm": name, "dataset": data.name, "num_clients": data.num_clients,
            "rounds": rounds, "seed": seed, "lr": lr,
            **{k: final[k] for k in ("accuracy", "client_mean_accuracy", "client_std",
                                     "client_min", "client_p10", "client_accuracies")},
            "history": history, "sweep_size": len(configs), "sweep_wall_s": wall,
            "compile_s": compile_s, "config_strategy": config_strategy,
            "devices": 1 if mesh is None else mesh.size,
        })
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        for summary in summaries:
            sub = out / f"seed{summary['seed']}_lr{summary['lr']:g}"
            sub.mkdir(exist_ok=True)
            (sub / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / "sweep.json").write_text(json.dumps(
            [{k: v for k, v in s.items() if k not in ("client_accuracies", "history")}
             for s in summaries], indent=2, default=str))
    return summaries
