"""The virtual clock: system model, server conditions, asynchronous steps, bad input."""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import clocked, num_params_bytes
from fedjax_sim.cli import main
from fedjax_sim.core import system
from fedjax_sim.core.clock import Clock, check_clock, get_condition, gini
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, to_device

HP = {"local_epochs": 1, "batch_size": 8, "lr": 0.1}


def _setup(name, num_clients=6, **hp):
    data = random_federated(num_clients=num_clients)
    model = make_model("mlp", data.input_shape, data.num_classes)
    return data, model, algorithms.make(name, model, **{**HP, **hp})


def _leaves_equal(a, b):
    def raw(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    la, lb = [raw(x) for x in jax.tree.leaves(a)], [raw(x) for x in jax.tree.leaves(b)]
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("name", ["fedavg", "fedper"])
def test_wait_all_homogeneous_equals_todays_round(name):
    data, _, alg = _setup(name, join_ratio=0.5)
    data = to_device(data)
    timed = clocked(alg, Clock(system.homogeneous(data.num_clients)), data.num_clients)
    plain, clock = alg.init(jax.random.key(0), data), timed.init(jax.random.key(0), data)
    step_plain, step_clock = jax.jit(alg.round), jax.jit(timed.round)
    for _ in range(2):
        plain, _ = step_plain(plain, data)
        clock, metrics = step_clock(clock, data)
    assert _leaves_equal((plain.server, plain.clients, plain.key),
                         (clock.server, clock.clients, clock.key))
    assert int(metrics["aggregated"]) == 3 and float(metrics["wasted_work"]) == 0.0
    # Homogeneous devices: the round lasts one job of the largest sampled client.
    assert float(clock.clock.time) > 0
    assert int(np.sum(clock.clock.participation)) == 6


def test_fedbuff_without_staleness_equals_fedavg():
    data = random_federated(num_clients=4)
    # Equal counts and one full batch: FedBuff's plain mean of deltas is FedAvg's weighted
    # mean, and the batch order does not matter (up to float summation order).
    n_max = data.train_x.shape[1]
    data = dataclasses.replace(data, train_counts=np.full(4, n_max, np.int32))
    model = make_model("mlp", data.input_shape, data.num_classes)
    hp = dict(local_epochs=1, batch_size=n_max, lr=0.1, join_ratio=1.0)
    alg = algorithms.make("fedavg", model, **hp)
    # B = C = K = 4: every step waits for all clients, a synchronous round (warned about).
    with pytest.warns(UserWarning, match="with every client in flight, a synchronous"):
        buff = clocked(alg, Clock(system.homogeneous(4), condition="fedbuff", buffer_size=4),
                       4)
    data = to_device(data)
    plain, _ = jax.jit(alg.round)(alg.init(jax.random.key(0), data), data)
    state, metrics = jax.jit(buff.round)(buff.init(jax.random.key(0), data), data)
    assert int(metrics["aggregated"]) == 4
    np.testing.assert_array_equal(np.asarray(state.clock.staleness), 0)
    for a, b in zip(jax.tree.leaves(plain.server["params"]),
                    jax.tree.leaves(state.server["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "fedper"])
def test_missed_deadline_leaves_the_model_unchanged(name):
    data, _, alg = _setup(name, join_ratio=0.5)
    data = to_device(data)
    timed = clocked(alg, Clock(system.homogeneous(data.num_clients), condition="deadline",
                               deadline=1e-6), data.num_clients)
    start = timed.init(jax.random.key(0), data)
    state, metrics = jax.jit(timed.round)(start, data)
    assert _leaves_equal((start.server, start.clients), (state.server, state.clients))
    assert float(metrics["wasted_work"]) == 1.0 and int(metrics["aggregated"]) == 0
    assert math.isclose(float(metrics["round_time"]), 1e-6, rel_tol=1e-5)
    assert int(np.sum(state.clock.participation)) == 0


def test_first_m_aggregates_the_fastest():
    data, _, alg = _setup("fedavg", join_ratio=1.0)
    speeds = np.array([1.0, 50.0, 2.0, 40.0, 3.0, 30.0])
    sysm = system.from_arrays(6, speed=speeds, up=1e9, down=1e9)
    timed = clocked(alg, Clock(sysm, condition="first_m", first_m=2), 6)
    state, metrics = jax.jit(timed.round)(timed.init(jax.random.key(0), to_device(data)),
                                          to_device(data))
    durations = HP["local_epochs"] * data.train_counts / speeds
    fastest = np.argsort(durations)[:2]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(state.clock.participation)),
                                  np.sort(fastest))
    np.testing.assert_allclose(float(metrics["round_time"]),
                               durations[fastest].max() + 2 * num_bytes(alg, data) / 1e9,
                               rtol=1e-5)


def num_bytes(alg, data):
    up, _ = alg.comm_bytes(data)
    from fedjax_sim.core.cohort import cohort_size
    return up / cohort_size(data.num_clients, alg.hparams["join_ratio"])


def test_fedbuff_defaults_to_a_buffer_below_the_concurrency():
    """FedBuff's default B is a tenth of the C clients in flight (Nguyen et al.'s 10 of
    100), at least 1; B = C is warned about by the Python API (and refused by the command
    line, test_cli_refuses_bad_clock_options)."""
    homog = system.homogeneous(40)
    buff = Clock(homog, condition="fedbuff")
    assert [buff.buffer(c) for c in (1, 4, 10, 25, 100)] == [1, 1, 1, 2, 10]
    assert Clock(homog, condition="fedasync", buffer_size=3).buffer(10) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_clock(buff, 40, 10)
        check_clock(Clock(homog, condition="fedbuff", buffer_size=9), 40, 10)
    with pytest.warns(UserWarning, match="buffer_size 10 = the 10 clients in flight"):
        check_clock(Clock(homog, condition="fedbuff", buffer_size=10), 40, 10)
    data, _, alg = _setup("fedavg", num_clients=40, join_ratio=0.5)  # C = 20, B = 2
    timed = clocked(alg, Clock(system.lognormal(40, seed=1), condition="fedbuff"), 40)
    state, metrics = jax.jit(timed.round)(timed.init(jax.random.key(0), to_device(data)),
                                          to_device(data))
    assert int(metrics["aggregated"]) == 2
    # The first arrival's slot was refilled at once; the flushing one's waits for the next
    # step: C - 1 clients in flight.
    assert int(np.sum(np.isfinite(np.asarray(state.clock.finish)))) == 19


def test_fedbuff_clock_matches_an_event_simulation():
    k, buffer, steps = 6, 2, 6
    data, model, alg = _setup("fedavg", num_clients=k, join_ratio=1.0)
    rng = np.random.default_rng(3)
    speeds = rng.uniform(1.0, 20.0, k)
    sysm = system.from_arrays(k, speed=speeds, up=2e6, down=4e6)
    timed = clocked(alg, Clock(sysm, condition="fedbuff", buffer_size=buffer), k)
    per_client = num_params_bytes(model)
    duration = (per_client / 4e6 + data.train_counts * HP["local_epochs"] / speeds
                + per_client / 2e6)

    # Host reference: every client always in flight (C = K), a heap of arrivals. With C = K
    # a client that reports before the flush has nobody free to hand its slot to (its
    # update waits in the buffer), so every job starts at a flush; the refill at each
    # arrival (C < K) is checked in test_fedbuff_concurrency.py.
    heap = [(duration[c], c, 0) for c in range(k)]
    heapq.heapify(heap)
    version, expected = 0, []
    for _ in range(steps):
        popped = [heapq.heappop(heap) for _ in range(buffer)]
        now = max(f for f, _, _ in popped)
        expected.append((now, sorted(c for _, c, _ in popped),
                         {c: version - v for _, c, v in popped}))
        version += 1
        for _, c, _ in popped:
            heapq.heappush(heap, (now + duration[c], c, version))

    data = to_device(data)
    state = timed.init(jax.random.key(0), data)
    step = jax.jit(timed.round)
    for now, clients, staleness in expected:
        before = np.asarray(state.clock.participation)
        state, metrics = step(state, data)
        got = np.flatnonzero(np.asarray(state.clock.participation) - before).tolist()
        assert got == clients
        np.testing.assert_allclose(float(state.clock.time), now, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["virtual_time"]), now, rtol=1e-5)
        for c in clients:
            assert int(state.clock.staleness[c]) == staleness[c]
    assert int(state.clock.server_version) == steps
    assert any(s > 0 for _, _, st in expected for s in st.values())  # staleness did occur


def test_fedasync_and_personal_rows():
    data, _, alg = _setup("fedper", join_ratio=0.5)
    data = to_device(data)
    timed = clocked(alg, Clock(system.lognormal(6, seed=1), condition="fedasync"), 6)
    start = timed.init(jax.random.key(0), data)
    state, metrics = jax.jit(timed.round)(start, data)
    assert int(metrics["aggregated"]) == 1
    (who,) = np.flatnonzero(np.asarray(state.clock.participation))
    heads, heads0 = state.clients["personal"], start.clients["personal"]
    for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(heads0), strict=True):
        changed = np.any(np.asarray(a) != np.asarray(b), axis=tuple(range(1, a.ndim)))
        assert changed.tolist() == [c == who for c in range(6)]
    assert not _leaves_equal(state.server, start.server)


@pytest.mark.parametrize("condition", ["fedasync", "fedbuff"])
def test_fedobp_async_trains_from_the_mask_it_was_sent(condition):
    """A client of an asynchronous run trains on the mixed model the server sent it: its
    mask from the model of its dispatch and that step's mask key (FedOBP's random control
    draws a fresh mask per step), not the key of the step its update arrives in."""
    from fedjax_sim.algorithms import fedobp
    from fedjax_sim.algorithms.base import local_sgd

    k = 8
    data = random_federated(num_clients=k)
    n_max = data.train_x.shape[1]
    model = make_model("mlp", data.input_shape, data.num_classes)
    # One full batch: the update does not depend on the training key (but for the order
    # of a sum), so it can be recomputed here.
    alg = algorithms.make("fedobp", model, local_epochs=1, batch_size=n_max, lr=0.1,
                          join_ratio=0.5, obp_variant="random", ig_ratio=0.5)
    timed = clocked(alg, Clock(system.lognormal(k, seed=1), condition=condition,
                               buffer_size=2 if condition == "fedbuff" else None), k)
    device_data = to_device(data)
    state = timed.init(jax.random.key(0), device_data)
    # Personal models away from the global one, so that the mask decides what is sent.
    noise = jax.tree.map(lambda a: 0.1 * jax.random.normal(jax.random.key(1), a.shape),
                         state.clients["params"])
    state = state.replace(clients={**state.clients, "params": jax.tree.map(
        lambda a, b: a + b, state.clients["params"], noise)})
    mix = jax.jit(fedobp.personalizer(model, alg.hparams).apply)
    fit = jax.jit(local_sgd(model, alg.hparams))

    def trained(rows, c, global_params, mask_key):
        own = jax.tree.map(lambda a: a[c][None], rows)
        mixed, _, _ = mix(own, global_params, mask_key)
        params, _ = fit(jax.tree.map(lambda a: a[0], mixed), data.train_x[c],
                        data.train_y[c], data.train_counts[c], jax.random.key(0))
        return params

    def close(a, b):
        return all(np.allclose(x, y, rtol=1e-5, atol=1e-6)
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    step = jax.jit(timed.round)
    sent = {}  # server version -> what a client dispatched at that version was sent
    stale = 0
    for _ in range(8):
        version = int(state.clock.server_version)
        sent[version] = (state.server["params"], fedobp.random_key(state))
        before = state
        state, _ = step(state, device_data)
        new = np.asarray(state.clock.participation) - np.asarray(before.clock.participation)
        for c in np.flatnonzero(new):
            row = jax.tree.map(lambda a, c=c: a[c], state.clients["params"])
            dispatched = int(state.clock.version[c])
            assert close(row, trained(before.clients, c, *sent[dispatched]))
            if dispatched < version:  # sent before this step: another step's mask key
                stale += 1
                assert not close(row, trained(before.clients, c, sent[dispatched][0],
                                              fedobp.random_key(before)))
    assert stale > 0


def test_availability_and_dropout_statistics():
    k, rounds = 4000, 60
    p_off, p_on, drop = 0.2, 0.3, 0.15
    sysm = jax.tree.map(jnp.asarray, system.homogeneous(k, p_off=p_off, p_on=p_on,
                                                         dropout=drop))

    def body(online, key):
        online = system.step_online(key, sysm, online)
        return online, online.mean()

    keys = jax.random.split(jax.random.key(0), rounds)
    _, shares = jax.lax.scan(body, jnp.ones((k,), bool), keys)
    stationary = p_on / (p_on + p_off)
    late = np.asarray(shares[-20:])  # the chain mixes in ~1 / (p_on + p_off) = 2 steps
    bound = 4 * math.sqrt(stationary * (1 - stationary) / k)
    assert np.all(np.abs(late - stationary) < bound)
    assert float(system.stationary_online(sysm)[0]) == pytest.approx(stationary)
    dropped = np.asarray(system.draw_dropout(jax.random.key(1), sysm))
    assert abs(dropped.mean() - drop) < 4 * math.sqrt(drop * (1 - drop) / k)


def test_trace_availability(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"intervals": [[[0, 10], [20, 30]], [], [[5, 6]]]}))
    trace = system.load_trace(path, 3)
    sysm = jax.tree.map(jnp.asarray, system.with_trace(system.homogeneous(3), trace))
    at = lambda t: np.asarray(system.online_at(sysm, jnp.float32(t))).tolist()
    assert at(0) == [True, False, False]
    assert at(5.5) == [True, False, True]
    assert at(10) == [False, False, False]
    assert at(25) == [True, False, False]


@pytest.mark.parametrize("content, problem", [
    ("not json", "cannot read it as JSON"),
    ('{"x": []}', "needs an object with key 'intervals'"),
    ('{"intervals": [[], []]}', "has 2 clients"),
    ('{"intervals": [[[5, 1]], [], []]}', "finite 0 <= start < end"),
    ('{"intervals": [[[0, 5], [3, 8]], [], []]}', "sorted and not overlap"),
])
def test_malformed_trace_is_refused(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as error:
        system.load_trace(path, 3)
    assert str(path) in str(error.value)


def test_bad_system_and_condition_values():
    with pytest.raises(ValueError, match="speed must be finite numbers > 0"):
        system.from_arrays(3, speed=[1.0, -2.0, 3.0], up=1.0, down=1.0)
    with pytest.raises(ValueError, match="up must be finite numbers"):
        system.from_arrays(3, speed=1.0, up=[1.0, np.nan, 1.0], down=1.0)
    with pytest.raises(ValueError, match=r"p_off must be probabilities in \[0, 1\]"):
        system.homogeneous(3, p_off=1.5)
    with pytest.raises(ValueError, match=r"one value per client \(3\)"):
        system.from_arrays(3, speed=[1.0, 2.0], up=1.0, down=1.0)
    with pytest.raises(ValueError, match="condition must be one of wait_all, deadline"):
        get_condition("nope")
    homog = system.homogeneous(6)
    with pytest.raises(ValueError, match=r"first_m .* must be an integer in \[1, 3\]"):
        check_clock(Clock(homog, condition="first_m", first_m=4), 6, 3)
    with pytest.raises(ValueError, match=r"buffer_size must be an integer in \[1, 3\]"):
        check_clock(Clock(homog, condition="fedbuff", buffer_size=0), 6, 3)
    with pytest.raises(ValueError, match="needs deadline"):
        check_clock(Clock(homog, condition="deadline"), 6, 3)
    _, model, _ = _setup("fedavg")
    scaffold = algorithms.make("scaffold", model, **HP)
    with pytest.raises(ValueError, match="algorithm scaffold cannot run under condition"):
        clocked(scaffold, Clock(homog), 6)
    ditto = algorithms.make("ditto", model, **HP)
    with pytest.raises(ValueError, match="ditto cannot run under the asynchronous condition"):
        clocked(ditto, Clock(homog, condition="fedbuff"), 6)
    assert gini([1, 1, 1]) == 0.0 and gini([0, 0, 3]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("argv, message", [
    (["--system", "homogeneous", "--condition", "nope"], "--condition must be one of"),
    (["--system", "homogeneous", "--condition", "first_m", "--first-m", "9",
      "--num-clients", "6", "--join-ratio", "0.5"], "--first-m must be at most"),
    (["--system", "homogeneous", "--condition", "fedbuff", "--buffer-size", "0"],
     "--buffer-size must be"),
    (["--system", "homogeneous", "--condition", "fedbuff", "--buffer-size", "3",
      "--num-clients", "6", "--join-ratio", "0.5"], "--buffer-size must be in [1, 2]"),
    (["--condition", "fedbuff"], "--condition needs --system"),
])
def test_cli_refuses_bad_clock_options(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--dataset", "digits", "--rounds", "1", *argv, "--output",
              str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if message is not None:
        assert message in err


def test_cli_negative_speeds_file(tmp_path, capsys):
    path = tmp_path / "devices.npz"
    np.savez(path, speed=-np.ones(6), up=np.ones(6), down=np.ones(6))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--dataset", "digits", "--num-clients", "6", "--rounds", "1",
              "--system", str(path), "--output", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "speed must be finite numbers > 0" in err
    assert str(path) in err


def test_cli_malformed_trace(tmp_path, capsys):
    path = tmp_path / "trace.json"
    path.write_text('{"intervals": [[[3, 1]], [], [], []]}')
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--dataset", "digits", "--num-clients", "4", "--rounds", "1",
              "--system", "homogeneous", "--availability-trace", str(path), "--output",
              str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "client 0, interval 0" in err


def test_run_records_clock_fields(tmp_path):
    data, _, alg = _setup("fedper", join_ratio=0.5)
    timed = clocked(alg, Clock(system.lognormal(6), condition="fedbuff", buffer_size=2), 6)
    seen = []
    from fedjax_sim.runner import Events

    events = Events().on("round_end", lambda **info: seen.append(info["virtual_time"]))
    result = run(timed, data, rounds=3, eval_every=1, output=tmp_path / "run",
                 progress=False, events=events)
    records = result.history
    times = [r["virtual_time"] for r in records]
    assert times == sorted(times) and times[0] > 0
    assert seen == pytest.approx(times)
    assert all(r["aggregated"] == 2 for r in records)
    summary = result.summary
    assert sum(summary["participation"]) == 6 and "participation_gini" in summary
    assert (tmp_path / "run" / "accuracy_vs_time.png").exists()


SHARDED = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import random_federated
from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import clocked
from fedjax_sim.core import system
from fedjax_sim.core.clock import Clock
from fedjax_sim.models import make_model
from fedjax_sim.runner import run

data = random_federated(num_clients=4)
model = make_model("mlp", data.input_shape, data.num_classes)
out = {{}}
for cond, extra in [("wait_all", {{}}), ("fedbuff", {{"buffer_size": 1}})]:
    alg = algorithms.make("fedper", model, local_epochs=1, batch_size=8, join_ratio=0.5)
    timed = clocked(alg, Clock(system.lognormal(4), condition=cond, **extra), 4)
    out[cond] = [[run(timed, data, rounds=3, eval_every=3, progress=False,
                      devices=d).history[-1][k] for k in ("virtual_time", "accuracy")]
                  for d in (1, 2)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_clock_on_two_devices_equals_one():
    from conftest import TESTS_DIR, run_on_cpu_devices

    results = run_on_cpu_devices(SHARDED.format(tests=TESTS_DIR), devices=2, timeout=600)
    for cond in ("wait_all", "fedbuff"):
        one, two = results[cond]
        assert two == pytest.approx(one, rel=1e-5)
