"""The host loop: jit the round once, run it, evaluate, emit events, write results.

Extensibility follows FederatedScope's event/handler view of an FL course, on the host
side only (the jitted round stays pure): handlers registered with ``Events.on`` run at
``round_start``, ``round_end``, ``evaluate``, ``checkpoint`` and ``finish``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_sim import safety
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.core.checkpoint import Checkpointer
from fedjax_sim.core.cohort import strategy_override
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.rundir import (
    RunDir,
    atomic_write_json,
    environment,
    write_jsonl,
)
from fedjax_sim.runner.loop import (
    EVENTS,
    Events,
    Track,
    _finish,
    _loop,
    _record_failure,
    one_line,
)
from fedjax_sim.runner.placement import (
    _config_mesh,
    client_axis_mesh,
    data_bytes_per_device,
    mesh_context,
    place,
    stack_splits,
    to_device,
)
from fedjax_sim.runner.programs import (
    Program,
    _batched_program,
    _estimate_memory,
    _single_program,
    make_round_block,
    round_block,
    traced_once,
)
from fedjax_sim.runner.resume import (
    CHECKPOINT_DIR,
    RESUMABLE,
    ResumeError,
    _resume,
    _stopped_error,
    data_fingerprint,
    run_identity,
)
from fedjax_sim.runner.validation import (
    DIVERGENCE_POLICIES,
    _check_run,
    _check_sweep,
    sweep_configs,
    validate_divergence_policy,
    validate_run_options,
)


@dataclasses.dataclass
class RunResult:
    """What a run produced: the final summary, one record per evaluation, the state."""

    summary: dict
    history: list[dict]
    state: SimState


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
        track = Track(labels={"algorithm": algorithm.name, "dataset": data.name, "seed": seed},
                      hparams=algorithm.hparams, out=out, local_accuracies=local_accuracies,
                      extra_summary=dict(extra_summary or {}))
        written = False  # config.json of this run is in the folder: it ends with a summary
        try:
            start = time.perf_counter()
            program = _single_program(algorithm, data, seed=seed, mesh=mesh)
            resumed_from = None
            if resume:
                program.state, track.history = _resume(
                    out, checkpoints, program.state, program.shardings, identity, rounds,
                    write=lead)
                resumed_from = int(program.state.round)
            if out is not None and lead:
                _write_run_config(out, identity, settings, options, resumed_from,
                                  fresh=not resume)
                written = True
            state, done, compile_s = _loop(
                program, [track], rounds=rounds, eval_every=eval_every,
                rounds_per_call=rounds_per_call, checkpoint_every=checkpoint_every,
                checkpoints=checkpoints, identity=identity,
                first_round=int(program.state.round), events=events,
                on_divergence=on_divergence, stop=stop, progress=progress, lead=lead,
                start=start, name=algorithm.name)
            stopped = stop.requested and done < rounds
            if checkpoints is not None:
                checkpoints.wait()
            fields = _run_fields(program, data, rounds=rounds, rounds_per_call=rounds_per_call,
                                 mesh=mesh, start=start, compile_s=compile_s,
                                 resumed_from=resumed_from)
            _finish(program, [track], state, rounds=rounds, done=done, stopped=stopped,
                    fields=fields, writes=lead)
        except Exception as error:
            if lead and written:
                _record_failure([track], error)
            raise
        finally:
            if checkpoints is not None:
                checkpoints.close()
    _raise_unfinished(track, on_divergence=on_divergence, stopped=stopped, done=done,
                      signum=stop.signum, checkpoints=checkpoints, resume_hint=resume_hint)
    events.emit("finish", summary=track.summary, state=state, history=track.history)
    return RunResult(track.summary, track.history, state)


def _write_run_config(out: Path, identity: dict, settings: dict, options: dict | None,
                      resumed_from: int | None, *, fresh: bool) -> None:
    """config.json of a run (and an empty metrics.jsonl when it starts afresh)."""
    atomic_write_json(out / "config.json", {
        "identity": identity, "settings": settings, "options": options or {},
        "environment": environment(), "resumed_from": resumed_from})
    if fresh:
        write_jsonl(out / "metrics.jsonl", [])


def _run_fields(program: Program, data: FederatedData, *, rounds: int, rounds_per_call: int,
                mesh, start: float, compile_s: float, resumed_from: int | None):
    """The summary fields of a run, as ``_finish`` asks for them."""

    def fields(c, track, status, rounds_done):
        up, down = program.comm[c]
        summary = {
            "status": status, **track.labels, "num_clients": data.num_clients,
            "rounds": rounds, "rounds_done": rounds_done,
            "wall_s": time.perf_counter() - start, "compile_s": compile_s,
            "bytes_up": up * rounds_done, "bytes_down": down * rounds_done,
            "devices": 1 if mesh is None else mesh.size,
            "processes": jax.process_count(), "rounds_per_call": rounds_per_call,
            "hparams": track.hparams, **track.extra_summary}
        if resumed_from is not None:
            summary["resumed_from"] = resumed_from
        return summary

    return fields


def _raise_unfinished(track: Track, *, on_divergence: str, stopped: bool, done: int,
                      signum: int | None, checkpoints: Checkpointer | None,
                      resume_hint: str | None) -> None:
    """A run that diverged under ``stop`` or was stopped by a signal ends in its error."""
    if track.diverged is not None and on_divergence == "stop":
        diverged = track.diverged
        raise safety.DivergedError(diverged["message"], round=diverged["round"],
                                   clients=diverged["clients"])
    if stopped:
        raise _stopped_error(done, signum, checkpoints, resume_hint)


def _config_dir(seed: int, lr: float, overrides: dict, split: int, num_splits: int) -> str:
    """``seed{s}_lr{lr}`` and every other overridden value, e.g. ``seed0_lr0.1_momentum0.9``
    (and ``_split{i}`` when there are several data splits)."""
    rest = "".join(f"_{k}{v:g}" for k, v in overrides.items() if k != "lr")
    return f"seed{seed}_lr{lr:g}{rest}" + (f"_split{split}" if num_splits > 1 else "")


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
    alg, hps = _sweep_algorithm(name, model, splits, triples, hparams, clock)
    if config_strategy == "auto":
        config_strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    mesh, padded = _config_mesh(len(triples), devices)
    _check_sweep_memory(alg, splits, mesh, padded, f"a sweep of {len(triples)} {name} "
                        "configurations")
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
        _write_sweep_configs(tracks, triples, config_records, options)
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
        fields = _sweep_fields(program, splits[0].num_clients, rounds=rounds,
                               wall=time.perf_counter() - start, count=len(triples),
                               compile_s=compile_s, config_strategy=config_strategy,
                               mesh=mesh)
        stopped = stop.requested and done < rounds
        _finish(program, tracks, state, rounds=rounds, done=done, stopped=stopped,
                fields=fields, writes=True)
        summaries = [{**track.summary, "history": track.history,
                      **({"state": jax.tree.map(lambda a, c=c: a[c], state)}
                         if keep_states else {})} for c, track in enumerate(tracks)]
        if output is not None:
            atomic_write_json(Path(output) / "sweep.json", [
                {k: v for k, v in s.items() if k not in ("client_accuracies", "history", "state")}
                for s in summaries])
    if stopped:
        raise safety.StoppedError(f"sweep stopped at round {done} (rerun it to start the "
                                  "stopped configurations again)", round=done,
                                  signum=stop.signum, checkpoint=False)
    return summaries


def _sweep_algorithm(name: str, model: Any, splits: list, triples: list, hparams: dict,
                     clock: Any) -> tuple[Algorithm, list]:
    """The algorithm built once (on the clock when given) and every configuration's
    traced hyperparameters."""
    from fedjax_sim import algorithms

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
    return alg, hps


def _check_sweep_memory(alg: Algorithm, splits: list, mesh, padded: int, what: str) -> None:
    """Every device holds the data (all splits) and the states of its configurations."""
    per_config = _estimate_memory(alg, splits[0], 0, 1)
    run_devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
    safety.check_memory(
        {"client state": per_config["client state"] * padded // len(run_devices),
         "server state": per_config["server state"] * padded // len(run_devices),
         "data": sum(safety.tree_bytes(split) for split in splits)},
        devices=run_devices, what=what)


def _write_sweep_configs(tracks: list[Track], triples: list, config_records: list | None,
                         options: dict | None) -> None:
    """config.json (and an empty metrics.jsonl) of every configuration with a folder."""
    env = environment()
    for c, track in enumerate(tracks):
        if track.out is None:
            continue
        record = (config_records[c] if config_records is not None else {
            "options": options or {}, "hparams": track.hparams,
            "config": {"seed": triples[c][0], "split": triples[c][2], **triples[c][1]},
            "environment": env})
        atomic_write_json(track.out / "config.json", record)
        write_jsonl(track.out / "metrics.jsonl", [])


def _sweep_fields(program: Program, num_clients: int, *, rounds: int, wall: float, count: int,
                  compile_s: float, config_strategy: str, mesh):
    """The summary fields of a sweep's configurations, as ``_finish`` asks for them."""

    def fields(c, track, status, rounds_done):
        up, down = program.comm[c]
        return {
            "status": status, **track.labels, "num_clients": num_clients,
            # Its share of the program's time (all configurations ran together).
            "rounds": rounds, "rounds_done": rounds_done, "wall_s": wall / count,
            "compile_s": compile_s, "bytes_up": up * rounds_done,
            "bytes_down": down * rounds_done, "hparams": track.hparams,
            "sweep_size": count, "sweep_wall_s": wall, "config_strategy": config_strategy,
            "devices": 1 if mesh is None else mesh.size, **track.extra_summary,
            # A diverged configuration's row reads as one without figures.
            **({"accuracy": None, "client_p10": None} if status == "diverged" else {})}

    return fields


__all__ = [
    "CHECKPOINT_DIR",
    "DIVERGENCE_POLICIES",
    "EVENTS",
    "RESUMABLE",
    "Events",
    "Program",
    "ResumeError",
    "RunResult",
    "Track",
    "client_axis_mesh",
    "data_bytes_per_device",
    "data_fingerprint",
    "make_round_block",
    "mesh_context",
    "one_line",
    "place",
    "round_block",
    "run",
    "run_identity",
    "stack_splits",
    "sweep",
    "sweep_configs",
    "to_device",
    "traced_once",
    "validate_divergence_policy",
    "validate_run_options",
]
