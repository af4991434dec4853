"""The compiled round: blocks of rounds jitted once, for one run or a batch of configurations."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_sim import safety
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import (
    FederatedData,
    scored_counts,
)
from fedjax_sim.runner.placement import (
    _CONFIG_AXIS,
    data_bytes_per_device,
    place,
    stack_splits,
    to_device,
)


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


def _estimate_memory(algorithm: Algorithm, data: FederatedData, seed: int,
                     num_devices: int) -> dict[str, int]:
    """Per-device bytes of the client state, server state and data, from shapes alone."""
    shape = jax.eval_shape(lambda d: algorithm.init(jax.random.key(seed), d), data)
    return {
        "client state": safety.tree_bytes(shape.clients) // num_devices,
        "server state": safety.tree_bytes(shape.server),
        "data": data_bytes_per_device(data, num_devices),
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
