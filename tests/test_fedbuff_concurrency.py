"""FedBuff's concurrency as the paper runs it, against a host event simulation.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation" (AISTATS 2022),
Algorithm 1: the server keeps C clients training; a client trains from the model it
received and reports when it finishes; the server adds its update to a buffer and at once
sends a job to another client (with the model it has then); when the buffer holds B
updates it steps the model with their staleness-weighted mean and clears the buffer.
FedAsync (Xie et al. 2019) is the case B = 1 with its mixing step.

The reference below is written from that description, with plain Python, heapq and NumPy;
only the local training of a client (a given function of its data and the model it
received) and the random numbers by which the server draws among the available clients
come from the library, so that both sides make the same draws.
"""

from __future__ import annotations

import heapq

import jax
import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import clocked, local_sgd, num_params_bytes
from fedjax_sim.core import system
from fedjax_sim.core.clock import Clock, dispatch_scores, step_keys
from fedjax_sim.core.cohort import cohort_size
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

ALPHA, EXPONENT, SERVER_LR = 0.6, 0.5, 1.0


def event_simulation(*, num_clients, concurrency, buffer, steps, duration, w0, train, merge,
                     scores):
    """FedBuff's server loop on a virtual clock.

    Args:
      num_clients: K; concurrency: C clients in flight; buffer: B updates per server step.
      duration: (K,) seconds of one job of each client.
      w0: the initial model (list of arrays).
      train: ``(client, model) -> uploaded model``.
      merge: ``(model, [(upload, start, staleness)]) -> model``, the server step.
      scores: ``(step, event) -> (K,)``: the server sends jobs to the available clients
        with the highest scores (a uniform draw without replacement); event 0 is the start
        of a server step, event j the j-th arrival of the step.

    Returns:
      One record per server step: its clients in arrival order, the arrival times, the
      staleness of each update, the event that dispatched each, the virtual time, the
      model after the step and the jobs in flight then ``{client: (finish, version)}``.
    """
    flight = []  # heap of (finish, client, version at dispatch, model sent, event)
    busy = set()  # in flight, or its update waits in the buffer
    version, w, step = 0, w0, 0

    def send(time, event):
        need = concurrency - len(flight)
        s = scores(step, event)
        free = sorted((k for k in range(num_clients) if k not in busy),
                      key=lambda k: (-s[k], k))
        for k in free[:max(need, 0)]:
            heapq.heappush(flight, (time + duration[k], k, version, w, event))
            busy.add(k)

    send(0.0, 0)
    records = []
    while step < steps:
        arrivals = []
        while len(arrivals) < buffer:
            arrivals.append(heapq.heappop(flight))
            if len(arrivals) < buffer:  # the flushing arrival's slot is filled after it
                send(arrivals[-1][0], len(arrivals))
        updates = [(train(k, sent), sent, version - v) for _, k, v, sent, _ in arrivals]
        w = merge(w, updates)
        version += 1
        busy.difference_update(k for _, k, _, _, _ in arrivals)
        now = arrivals[-1][0]
        records.append({
            "clients": [k for _, k, _, _, _ in arrivals],
            "times": [f for f, _, _, _, _ in arrivals],
            "staleness": [tau for _, _, tau in updates],
            "events": [e for _, _, _, _, e in arrivals],
            "time": now, "model": w,
            "in_flight": {k: (f, v) for f, k, v, _, _ in flight},
        })
        step += 1
        send(now, 0)
    return records


def fedbuff_merge(w, updates):
    """w + η_g · Σ_i Δ_i / √(1 + τ_i) / B."""
    total = [np.zeros_like(a, np.float64) for a in w]
    for upload, start, tau in updates:
        for t, u, s in zip(total, upload, start, strict=True):
            t += (np.float64(u) - np.float64(s)) / np.sqrt(1.0 + tau)
    return [np.float64(a) + SERVER_LR * t / len(updates) for a, t in zip(w, total, strict=True)]


def fedasync_merge(w, updates):
    """w ← (1 − α_τ) w + α_τ w_k, α_τ = α (1 + τ)^(−a)."""
    ((upload, _, tau),) = updates
    alpha = ALPHA * (1.0 + tau) ** -EXPONENT
    return [(1.0 - alpha) * np.float64(a) + alpha * np.float64(u)
            for a, u in zip(w, upload, strict=True)]


def run_both(condition, num_clients, join_ratio, buffer, steps, seed=3):
    data = random_federated(num_clients=num_clients, seed=seed)
    n_max = data.train_x.shape[1]
    model = make_model("mlp", data.input_shape, data.num_classes)
    # One full batch per job: a client's update does not depend on its training key (but
    # for the order of a sum), so the reference can train it with any key.
    alg = algorithms.make("fedavg", model, local_epochs=1, batch_size=n_max, lr=0.1,
                          join_ratio=join_ratio)
    rng = np.random.default_rng(seed)
    speeds = rng.uniform(1.0, 20.0, num_clients)
    sysm = system.from_arrays(num_clients, speed=speeds, up=2e6, down=4e6)
    timed = clocked(alg, Clock(sysm, condition=condition, buffer_size=buffer,
                               async_alpha=ALPHA, staleness_exponent=EXPONENT,
                               server_lr=SERVER_LR), num_clients)
    per_client = num_params_bytes(model)
    duration = per_client / 4e6 + data.train_counts / speeds + per_client / 2e6

    fit = jax.jit(local_sgd(model, alg.hparams))
    treedef = None

    def train(k, w):
        params = jax.tree.unflatten(treedef, [np.float32(a) for a in w])
        new, _ = fit(params, data.train_x[k], data.train_y[k], data.train_counts[k],
                     jax.random.key(0))
        return [np.asarray(a) for a in jax.tree.leaves(new)]

    device_data = to_device(data)
    state = timed.init(jax.random.key(0), device_data)
    leaves, treedef = jax.tree.flatten(state.server["params"])
    state_keys = [state.key]
    for _ in range(steps):
        state_keys.append(step_keys(state_keys[-1]).next)

    def scores(step, event):
        return np.asarray(dispatch_scores(step_keys(state_keys[step]).pick, event,
                                          num_clients))

    expected = event_simulation(
        num_clients=num_clients, concurrency=cohort_size(num_clients, join_ratio),
        buffer=buffer, steps=steps, duration=duration,
        w0=[np.asarray(a) for a in leaves], train=train,
        merge=fedbuff_merge if condition == "fedbuff" else fedasync_merge, scores=scores)

    step = jax.jit(timed.round)
    got = []
    for _ in range(steps):
        before = np.asarray(state.clock.participation)
        state, metrics = step(state, device_data)
        c = state.clock
        aggregated = np.flatnonzero(np.asarray(c.participation) - before).tolist()
        finish = np.asarray(c.finish)
        got.append({
            "clients": aggregated,
            "staleness": {k: int(c.staleness[k]) for k in aggregated},
            "time": float(c.time), "virtual_time": float(metrics["virtual_time"]),
            "aggregated": int(metrics["aggregated"]),
            "model": [np.asarray(a) for a in jax.tree.leaves(state.server["params"])],
            "in_flight": {int(k): (float(finish[k]), int(c.version[k]))
                          for k in np.flatnonzero(np.isfinite(finish))},
        })
    return expected, got


def assert_same(expected, got):
    for t, (e, g) in enumerate(zip(expected, got, strict=True)):
        where = f"server step {t}"
        assert g["clients"] == sorted(e["clients"]), where
        assert g["aggregated"] == len(e["clients"]), where
        assert g["staleness"] == dict(zip(e["clients"], e["staleness"], strict=True)), where
        np.testing.assert_allclose(g["time"], e["time"], rtol=1e-5, err_msg=where)
        np.testing.assert_allclose(g["virtual_time"], e["time"], rtol=1e-5, err_msg=where)
        assert sorted(g["in_flight"]) == sorted(e["in_flight"]), where
        for k, (finish, version) in e["in_flight"].items():
            np.testing.assert_allclose(g["in_flight"][k][0], finish, rtol=1e-5, err_msg=where)
            assert g["in_flight"][k][1] == version, where
        for a, b in zip(g["model"], e["model"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=where)


# B = C (8, 0.5, 4) is a configuration check_clock warns about; it still refills freed slots.
@pytest.mark.filterwarnings("ignore:fedbuff with buffer_size:UserWarning")
@pytest.mark.parametrize("num_clients, join_ratio, buffer", [(10, 0.4, 3), (8, 0.5, 4)])
def test_fedbuff_refills_at_each_arrival(num_clients, join_ratio, buffer):
    expected, got = run_both("fedbuff", num_clients, join_ratio, buffer, steps=8)
    assert_same(expected, got)
    # The settings exercise what the refill at each arrival changes: jobs sent between two
    # flushes (event > 0), some of them reporting before the next flush (staleness 0),
    # and stale updates.
    mid = [(e, tau) for r in expected for e, tau in zip(r["events"], r["staleness"],
                                                       strict=True)]
    assert any(e > 0 and tau == 0 for e, tau in mid)
    assert any(e > 0 and tau > 0 for e, tau in mid)
    assert any(tau > 1 for _, tau in mid)


def test_fedasync_equals_the_event_simulation():
    expected, got = run_both("fedasync", 10, 0.4, 1, steps=12)
    assert_same(expected, got)
    assert any(tau > 0 for r in expected for tau in r["staleness"])


def test_event_simulation_sends_jobs_at_arrivals():
    """The reference itself, on a hand-checked case: K = 3, C = 2, B = 2, jobs of 1, 2 and
    10 s, scores preferring client 0, then 1, then 2."""
    records = event_simulation(
        num_clients=3, concurrency=2, buffer=2, steps=2, duration=np.array([1.0, 2.0, 10.0]),
        w0=[np.zeros(1)], train=lambda k, w: [w[0] + 1.0], merge=fedbuff_merge,
        scores=lambda step, event: np.array([3.0, 2.0, 1.0]))
    # t = 0: clients 0 and 1 start from version 0. t = 1: 0 reports; 2 is the only free
    # client and starts (10 s, version 0). t = 2: 1 reports, the buffer is full: version
    # 1; 0 and 1 are free again and 0 (highest score) starts at t = 2 (until t = 3).
    first, second = records
    assert first["clients"] == [0, 1] and first["times"] == [1.0, 2.0]
    assert first["staleness"] == [0, 0] and first["in_flight"] == {2: (11.0, 0)}
    np.testing.assert_allclose(first["model"][0], [1.0])  # two deltas of 1, mean 1
    # t = 3: 0 reports; 1 starts (version 1, until t = 5). t = 5: 1 reports: flush.
    assert second["clients"] == [0, 1] and second["times"] == [3.0, 5.0]
    assert second["staleness"] == [0, 0] and second["events"] == [0, 1]
    assert second["in_flight"] == {2: (11.0, 0)}


@pytest.mark.filterwarnings("ignore:fedbuff with buffer_size:UserWarning")  # B = C = 2
def test_a_client_coming_online_takes_the_next_freed_slot():
    """With an availability trace, a slot freed between two flushes goes to a client
    online at the arrival's time, not only to those online at the step's start."""
    data = random_federated(num_clients=4)
    model = make_model("mlp", data.input_shape, data.num_classes)
    alg = algorithms.make("fedavg", model, local_epochs=1, batch_size=8, lr=0.1,
                          join_ratio=0.5)  # C = 2
    speeds = np.array([100.0, 1.0, 100.0, 100.0])
    per_client = num_params_bytes(model)
    duration = 2 * per_client / 1e9 + data.train_counts / speeds
    comes_online = 0.5 * duration[0]
    trace = np.array([[[0.0, 1e4]], [[0.0, 1e4]], [[comes_online, 1e4]], [[np.inf, np.inf]]])
    sysm = system.with_trace(system.from_arrays(4, speed=speeds, up=1e9, down=1e9), trace)
    timed = clocked(alg, Clock(sysm, condition="fedbuff", buffer_size=2), 4)
    device_data = to_device(data)
    state, _ = jax.jit(timed.round)(timed.init(jax.random.key(0), device_data), device_data)
    # t = 0: 0 and 1 start (2 is offline, 3 never online). 0 reports; 2, online by then,
    # starts at once and reports before slow 1: the flush holds 0 and 2.
    assert np.asarray(state.clock.participation).tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(float(state.clock.time), duration[0] + duration[2],
                               rtol=1e-5)
    assert np.asarray(state.clock.staleness).tolist() == [0, 0, 0, 0]
    finish = np.asarray(state.clock.finish)
    np.testing.assert_allclose(finish[1], duration[1], rtol=1e-5)
    assert np.isinf(finish[[0, 2, 3]]).all()
