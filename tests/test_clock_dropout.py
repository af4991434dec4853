"""Dropout on the virtual clock, one model for every condition, against host event
simulations.

The model (``core.clock``): a client drops out of a job with its dropout probability,
drawn when the job is sent. The server learns of it only at the job's would-be finish time
(or when the round ends first). A dropped job never counts as an update (neither among
``wait_all``'s awaited nor ``first_m``'s M nor in FedBuff's buffer) and its samples are
wasted. Its slot is refilled at the moment the server learns of the drop: in a synchronous
round by a client drawn among the online clients not yet in the round, whose job the
condition treats as any other; in the asynchronous modes as at an arrival, with the model
current then.

The references below are written from that description with heapq and NumPy. Only local
training (a given function of a client's data and the model it received) and the random
numbers come from the library: the cohort draw, the scores by which the server ranks the
clients it may send a job to, and each job's dropout draw, so that both sides draw alike.
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
from fedjax_sim.core.clock import Clock, dispatch_scores, dropout_draws, step_keys
from fedjax_sim.core.cohort import cohort_size
from fedjax_sim.core.rounds import draw_cohort
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

ALPHA, EXPONENT, SERVER_LR = 0.6, 0.5, 1.0
UP, DOWN = 2e6, 4e6


def synchronous_round(*, cohort, duration, samples, condition, deadline=None, first_m=None,
                      scores, drops):
    """One synchronous round under the dropout model, as a heap of job ends.

    Args:
      cohort: the sampled clients, one per slot (all online).
      duration, samples: (K,) seconds and samples of one job of each client.
      condition: ``wait_all``, ``deadline`` (with ``deadline``) or ``first_m`` (with
        ``first_m``).
      scores: ``event -> (K,)``: a freed slot goes to the free client with the highest
        score; event j is the j-th drop the server learns of.
      drops: ``event -> (K,) bool``: whether a job sent at that event drops out (event 0:
        the cohort's jobs).

    Returns:
      The updates ``[(client, time)]`` in arrival order, the round's length, the samples of
      every job sent and of those whose update was not aggregated, and the drops handled.
    """
    num_clients = len(duration)
    heap = [(duration[c], slot, c, bool(drops(0)[c])) for slot, c in enumerate(cohort)]
    heapq.heapify(heap)
    used, updates, event, end = set(cohort), [], 0, 0.0
    trained = sum(samples[c] for c in cohort)
    while heap:
        time, slot, client, dropped = heapq.heappop(heap)
        if condition == "deadline" and time > deadline:
            end = deadline  # the rest arrive late, or the server learns of them too late
            break
        end = time
        if not dropped:
            updates.append((client, time))
            if condition == "first_m" and len(updates) == first_m:
                break
            continue
        event += 1  # the server learns of the drop now and hands the slot on
        score = scores(event)
        free = [k for k in range(num_clients) if k not in used]
        if free:
            k = max(free, key=lambda k: score[k])
            used.add(k)
            trained += samples[k]
            heapq.heappush(heap, (time + duration[k], slot, k, bool(drops(event)[k])))
    aggregated = sum(samples[c] for c, _ in updates)
    return {"updates": updates, "time": end, "trained": trained,
            "wasted": trained - aggregated, "events": event}


def asynchronous_steps(*, num_clients, concurrency, buffer, steps, duration, samples, w0,
                       train, merge, scores, drops):
    """FedBuff's (and FedAsync's, B = 1) server loop under the dropout model.

    A step takes the job ends in time order until B updates arrived; at most C + 8 B of
    them (a bound the test's dropout rate never reaches). Every end but the B-th update
    hands its slot on at once: a dropped client is free again, an arrived one waits in the
    buffer until the flush.

    Args:
      scores, drops: ``(step, event) -> (K,)``: event 0 is a step's start, event j its j-th
        job end.

    Returns:
      One record per step: the updates' clients, staleness and arrival times, the drops,
      the virtual time, the model, the jobs in flight ``{client: (finish, version,
      dropped)}``, and the samples of every ended job and of the dropped ones so far.
    """
    flight = []  # heap of (finish, client, version at dispatch, model sent, drops out)
    busy = set()
    version, w, totals = 0, w0, {"trained": 0.0, "wasted": 0.0}

    def send(step, time, event):
        need = concurrency - len(flight)
        score, dropped = scores(step, event), drops(step, event)
        free = sorted((k for k in range(num_clients) if k not in busy),
                      key=lambda k: (-score[k], k))
        for k in free[:max(need, 0)]:
            heapq.heappush(flight, (time + duration[k], k, version, w, bool(dropped[k])))
            busy.add(k)

    send(0, 0.0, 0)
    records = []
    for step in range(steps):
        arrivals, lost, event = [], [], 0
        while len(arrivals) < buffer and flight and event < concurrency + 8 * buffer:
            end = heapq.heappop(flight)
            event += 1
            time, k, _, _, dropped = end
            totals["trained"] += samples[k]
            if dropped:
                lost.append(k)
                busy.discard(k)
                totals["wasted"] += samples[k]
            else:
                arrivals.append(end)
            if len(arrivals) < buffer:
                send(step, time, event)
        updates = [(train(k, sent), sent, version - v) for _, k, v, sent, _ in arrivals]
        w = merge(w, updates)
        version += 1
        busy.difference_update(k for _, k, _, _, _ in arrivals)
        records.append({
            "clients": [k for _, k, _, _, _ in arrivals],
            "staleness": [tau for _, _, tau in updates], "lost": lost, "events": event,
            "time": time, "model": w,
            "in_flight": {k: (f, v, d) for f, k, v, _, d in flight}, **totals,
        })
        send(step + 1, time, 0)
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


class Setting:
    """FedAvg with one full batch per job (a client's update does not depend on its
    training key), random device speeds and a dropout probability."""

    def __init__(self, num_clients, join_ratio, dropout, seed=3):
        self.data = random_federated(num_clients=num_clients, seed=seed)
        n_max = self.data.train_x.shape[1]
        self.model = make_model("mlp", self.data.input_shape, self.data.num_classes)
        self.alg = algorithms.make("fedavg", self.model, local_epochs=1, batch_size=n_max,
                                   lr=0.1, join_ratio=join_ratio)
        speeds = np.random.default_rng(seed).uniform(1.0, 20.0, num_clients)
        self.system = system.from_arrays(num_clients, speed=speeds, up=UP, down=DOWN,
                                         dropout=dropout)
        per_client = num_params_bytes(self.model)
        self.duration = per_client / DOWN + self.data.train_counts / speeds + per_client / UP
        self.samples = self.data.train_counts.astype(np.float64)
        self.size = cohort_size(num_clients, join_ratio)
        self.fit = jax.jit(local_sgd(self.model, self.alg.hparams))
        self.device_data = to_device(self.data)

    def clocked(self, condition, **options):
        return clocked(self.alg, Clock(self.system, condition=condition, **options),
                       self.data.num_clients)

    def train(self, treedef, k, w):
        params = jax.tree.unflatten(treedef, [np.float32(a) for a in w])
        new, _ = self.fit(params, self.data.train_x[k], self.data.train_y[k],
                          self.data.train_counts[k], jax.random.key(0))
        return [np.asarray(a) for a in jax.tree.leaves(new)]

    def fedavg(self, treedef, w, clients):
        if not clients:
            return w
        counts = self.data.train_counts[clients].astype(np.float64)
        trained = [self.train(treedef, k, w) for k in clients]
        return [sum(n * np.float64(t[i]) for n, t in zip(counts, trained, strict=True))
                / counts.sum() for i in range(len(w))]


def _params(state):
    leaves, treedef = jax.tree.flatten(state.server["params"])
    return [np.asarray(a) for a in leaves], treedef


SYNCHRONOUS = {"wait_all": {}, "deadline": {"deadline": 2.0}, "first_m": {"first_m": 2}}


@pytest.mark.parametrize("condition", sorted(SYNCHRONOUS))
def test_synchronous_rounds_follow_the_dropout_model(condition):
    setting = Setting(num_clients=12, join_ratio=0.25, dropout=0.4)  # N = 3
    timed = setting.clocked(condition, **SYNCHRONOUS[condition])
    state = timed.init(jax.random.key(0), setting.device_data)
    step = jax.jit(timed.round)
    trained = wasted = 0.0
    seen = {"refill": 0, "refill_delivered": 0, "waited_for_a_drop": 0}
    for r in range(10):
        keys = step_keys(state.key, asynchronous=False)
        cohort = np.asarray(draw_cohort(keys.round, 12, setting.size)[0]).tolist()
        first_drops = np.asarray(dropout_draws(keys.drop, 0, timed.clock.system))
        expected = synchronous_round(
            cohort=cohort, duration=setting.duration, samples=setting.samples,
            condition=condition, **SYNCHRONOUS[condition],
            scores=lambda j, keys=keys: np.asarray(dispatch_scores(keys.pick, j, 12)),
            drops=lambda j, keys=keys: np.asarray(dropout_draws(keys.drop, j,
                                                                timed.clock.system)))
        w, treedef = _params(state)
        model = setting.fedavg(treedef, w, [c for c, _ in expected["updates"]])
        before = np.asarray(state.clock.participation)
        state, metrics = step(state, setting.device_data)
        where = f"{condition}, round {r}"
        got = np.flatnonzero(np.asarray(state.clock.participation) - before).tolist()
        assert got == sorted(c for c, _ in expected["updates"]), where
        assert int(metrics["aggregated"]) == len(expected["updates"]), where
        np.testing.assert_allclose(float(metrics["round_time"]), expected["time"], rtol=1e-5,
                                   err_msg=where)
        trained, wasted = trained + expected["trained"], wasted + expected["wasted"]
        np.testing.assert_allclose(float(metrics["wasted_work"]), wasted / trained,
                                   rtol=1e-5, err_msg=where)
        for a, b in zip(_params(state)[0], model, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=where)
        seen["refill"] += expected["events"]
        seen["refill_delivered"] += sum(c not in cohort for c, _ in expected["updates"])
        valid = [c for c in cohort if not first_drops[c]]
        seen["waited_for_a_drop"] += expected["time"] > max(
            (setting.duration[c] for c in valid), default=0.0) + 1e-6
    # The rounds exercise the model: drops handed to new clients, some of which delivered
    # an update, and rounds that lasted past their last update for a drop.
    assert seen["refill"] > 0 and seen["refill_delivered"] > 0, seen
    if condition == "wait_all":
        assert seen["waited_for_a_drop"] > 0, seen


def test_synchronous_reference_on_a_hand_checked_round():
    """K = 4, cohort [0, 1], jobs of 1, 2, 5 and 3 s; client 0's job drops out; the freed
    slot prefers client 3, then 2."""
    duration, samples = np.array([1.0, 2.0, 5.0, 3.0]), np.array([10.0, 20.0, 50.0, 30.0])
    common = dict(cohort=[0, 1], duration=duration, samples=samples,
                  scores=lambda j: np.array([0.0, 0.0, 0.5, 0.9]),
                  drops=lambda j: np.array([j == 0, False, False, False]))
    # t = 1: 0's drop is learned, its slot goes to 3 (until t = 4); t = 2: 1 arrives.
    wait_all = synchronous_round(condition="wait_all", **common)
    assert wait_all["updates"] == [(1, 2.0), (3, 4.0)] and wait_all["time"] == 4.0
    assert wait_all["trained"] == 60.0 and wait_all["wasted"] == 10.0
    late = synchronous_round(condition="deadline", deadline=3.0, **common)
    assert late["updates"] == [(1, 2.0)] and late["time"] == 3.0 and late["wasted"] == 40.0
    first = synchronous_round(condition="first_m", first_m=1, **common)
    assert first["updates"] == [(1, 2.0)] and first["time"] == 2.0 and first["events"] == 1


@pytest.mark.parametrize("condition, buffer", [("fedbuff", 2), ("fedasync", 1)])
def test_asynchronous_steps_follow_the_dropout_model(condition, buffer):
    setting = Setting(num_clients=10, join_ratio=0.4, dropout=0.3)  # C = 4
    timed = setting.clocked(condition, buffer_size=buffer if condition == "fedbuff" else None,
                            async_alpha=ALPHA, staleness_exponent=EXPONENT,
                            server_lr=SERVER_LR)
    state = timed.init(jax.random.key(0), setting.device_data)
    w0, treedef = _params(state)
    steps, state_keys = 10, [state.key]
    for _ in range(steps):
        state_keys.append(step_keys(state_keys[-1]).next)
    expected = asynchronous_steps(
        num_clients=10, concurrency=setting.size, buffer=buffer, steps=steps,
        duration=setting.duration, samples=setting.samples, w0=w0,
        train=lambda k, w: setting.train(treedef, k, w),
        merge=fedbuff_merge if condition == "fedbuff" else fedasync_merge,
        scores=lambda s, j: np.asarray(dispatch_scores(step_keys(state_keys[s]).pick, j, 10)),
        drops=lambda s, j: np.asarray(dropout_draws(step_keys(state_keys[s]).drop, j,
                                                    timed.clock.system)))
    step = jax.jit(timed.round)
    for t, e in enumerate(expected):
        before = np.asarray(state.clock.participation)
        state, metrics = step(state, setting.device_data)
        c, where = state.clock, f"{condition}, server step {t}"
        got = np.flatnonzero(np.asarray(c.participation) - before).tolist()
        assert got == sorted(e["clients"]) and int(metrics["aggregated"]) == buffer, where
        assert {k: int(c.staleness[k]) for k in got} == dict(
            zip(e["clients"], e["staleness"], strict=True)), where
        np.testing.assert_allclose(float(c.time), e["time"], rtol=1e-5, err_msg=where)
        np.testing.assert_allclose(float(metrics["wasted_work"]), e["wasted"] / e["trained"],
                                   rtol=1e-5, err_msg=where)
        finish = np.asarray(c.finish)
        in_flight = {int(k): (float(finish[k]), int(c.version[k]), bool(c.dropped[k]))
                     for k in np.flatnonzero(np.isfinite(finish))}
        assert sorted(in_flight) == sorted(e["in_flight"]), where
        for k, (f, v, d) in e["in_flight"].items():
            np.testing.assert_allclose(in_flight[k][0], f, rtol=1e-5, err_msg=where)
            assert in_flight[k][1:] == (v, d), where
        for a, b in zip(_params(state)[0], e["model"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=where)
    # Drops occurred, none filled the buffer: some steps needed more ends than updates.
    assert sum(len(e["lost"]) for e in expected) > 0
    assert any(e["events"] > buffer for e in expected)
