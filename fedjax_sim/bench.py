"""Throughput measurement: rounds per second on random data, FLOP counts, matmul peak.

Used by ``fedjax-sim bench`` and the scripts under ``experiments/``. Times are wall clock;
on a shared machine compare figures taken in one command, never across commands.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_sim import algorithms
from fedjax_sim.checks import check_int, check_seed
from fedjax_sim.core import cohort
from fedjax_sim.core.local import weighted_cross_entropy
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.models import make_model
from fedjax_sim.models.base import Model
from fedjax_sim.runner import client_axis_mesh, make_round_block, mesh_context, place


def random_data(
    num_clients: int,
    samples: int,
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    test_samples: int = 8,
    seed: int = 0,
) -> FederatedData:
    """Uniform random inputs and labels, every client with ``samples`` training rows."""
    rng = np.random.default_rng(seed)
    k, shape = num_clients, tuple(input_shape)
    return FederatedData(
        train_x=rng.random((k, samples, *shape), dtype=np.float32),
        train_y=rng.integers(0, num_classes, (k, samples)).astype(np.int32),
        train_counts=np.full((k,), samples, np.int32),
        test_x=rng.random((k, test_samples, *shape), dtype=np.float32),
        test_y=rng.integers(0, num_classes, (k, test_samples)).astype(np.int32),
        test_counts=np.full((k,), test_samples, np.int32),
        num_classes=num_classes, name=f"random{'x'.join(map(str, shape))}",
    )


def flops_per_step(model: Model, batch_size: int) -> float:
    """XLA's FLOP count of one client SGD step (forward, backward, update) at ``batch_size``."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    xb = jax.ShapeDtypeStruct((batch_size, *model.input_shape), jnp.float32)
    yb = jax.ShapeDtypeStruct((batch_size,), jnp.int32)

    def step(p, x, y):
        grads = jax.grad(lambda p: weighted_cross_entropy(
            model.apply(p, x), y, jnp.ones((batch_size,))))(p)
        return jax.tree.map(lambda a, g: a - 0.01 * g, p, grads)

    cost = jax.jit(step).lower(params, xb, yb).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost["flops"])


def matmul_peak(n: int = 2048, repeats: int = 10, *, all_devices: bool = False) -> float:
    """Best GFLOP/s of ``n x n`` float32 matmuls through XLA.

    Args:
      n: matrix side.
      repeats: timed calls; the fastest counts.
      all_devices: one matmul per visible device at once (the client axis's way of using
        several CPU devices) instead of one matmul on the default device.
    """
    count = jax.device_count() if all_devices else 1
    a = jax.random.normal(jax.random.key(0), (count, n, n), jnp.float32)
    if count > 1:
        a = jax.device_put(a, NamedSharding(jax.make_mesh((count,), ("d",)), PartitionSpec("d")))
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - tic)
    return 2 * count * n**3 / best / 1e9


def timed_calls(block, state, data, calls: int) -> tuple[Any, float, list[float]]:
    """Runs ``block(state, data)`` once to compile, then ``calls`` times timed.

    Returns:
      ``(state after the last call, seconds of the first call, seconds of each timed
      call)``.
    """
    tic = time.perf_counter()
    state, _ = block(state, data)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - tic
    times = []
    for _ in range(calls):
        tic = time.perf_counter()
        state, _ = block(state, data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - tic)
    return state, compile_s, times


def time_rounds(
    algorithm,
    data: FederatedData,
    *,
    rounds: int,
    rounds_per_call: int = 1,
    seed: int = 0,
    devices: int | None = None,
) -> dict:
    """Compiles the round (``rounds_per_call`` rounds per jitted call), then times ``rounds``
    rounds, with the client axis sharded as :func:`fedjax_sim.runner.run` shards it.

    Args:
      devices: devices to shard the client axis over (``None``: all visible ones; the
        count used divides K).

    Returns:
      ``compile_s`` (first call, compile included), ``round_s`` (mean over the timed
      calls), ``round_s_best`` (the fastest call, per round) and ``devices`` (the count
      the client axis was sharded over).
    """
    mesh = client_axis_mesh(data.num_clients, devices)
    with mesh_context(mesh):
        data, state, shardings = place(algorithm, data, seed=seed, mesh=mesh)
        block = make_round_block(algorithm, rounds_per_call, state_shardings=shardings)
        _, compile_s, times = timed_calls(block, state, data,
                                          max(1, -(-rounds // rounds_per_call)))
    per_round = np.asarray(times) / rounds_per_call
    return {"compile_s": compile_s, "round_s": float(per_round.mean()),
            "round_s_best": float(per_round.min()),
            "devices": 1 if mesh is None else mesh.size}


def bench(
    *,
    algorithm: str = "fedavg",
    model: str = "mlp",
    num_clients: int = 50,
    local_steps: int = 10,
    batch_size: int = 32,
    rounds: int = 5,
    rounds_per_call: int = 1,
    samples_per_client: int = 320,
    client_strategy: str = "auto",
    chunk_size: int = 8,
    conv_impl: str = "auto",
    seed: int = 0,
    devices: int | None = None,
) -> dict:
    """Times ``algorithm`` rounds on random 28x28x1 data; the figures of ``fedjax-sim bench``.

    The client axis is sharded over ``devices`` devices (``None``: all visible ones) as in
    ``fedjax-sim run``; on a CPU host the command line shows one device per core
    (:mod:`fedjax_sim.platform`).

    Raises:
      ValueError: naming the argument, before any data is drawn or anything compiles.
    """
    for name, value in (("num_clients", num_clients), ("local_steps", local_steps),
                        ("batch_size", batch_size), ("rounds", rounds),
                        ("rounds_per_call", rounds_per_call),
                        ("samples_per_client", samples_per_client)):
        check_int(name, value, 1)
    check_seed("seed", seed)
    if devices is not None:
        check_int("devices", devices, 1)
    if algorithms.uses_public(algorithm):
        raise ValueError(f"bench times algorithms without public data, not {algorithm}")
    # Every hyperparameter is checked before the random data is drawn.
    algorithms.resolve(algorithm, local_steps=local_steps, batch_size=batch_size,
                       client_strategy=client_strategy, chunk_size=chunk_size)
    cohort.strategy_override()
    data = random_data(num_clients, samples_per_client, seed=seed)
    net = make_model(model, (28, 28, 1), 10,
                     **({"conv_impl": conv_impl} if model == "cnn" else {}))
    alg = algorithms.make(algorithm, net, local_steps=local_steps, batch_size=batch_size,
                          client_strategy=client_strategy, chunk_size=chunk_size)
    timing = time_rounds(alg, data, rounds=rounds, rounds_per_call=rounds_per_call, seed=seed,
                         devices=devices)
    strategy, chunk = cohort.resolve(client_strategy, chunk_size)
    steps = num_clients * local_steps
    flops = flops_per_step(net, batch_size)
    return {
        "algorithm": algorithm, "model": model, "num_clients": num_clients,
        "local_steps": local_steps, "batch_size": batch_size,
        "strategy": strategy, "chunk_size": chunk if strategy == "chunked" else None,
        "rounds_per_call": rounds_per_call, "backend": jax.default_backend(),
        **timing,
        "client_steps_per_s": steps / timing["round_s"],
        "client_steps_per_s_best": steps / timing["round_s_best"],
        "flops_per_client_step": flops,
        "gflops": steps * flops / timing["round_s_best"] / 1e9,
    }
