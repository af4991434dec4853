"""Every algorithm runs with the client axis sharded over 4 CPU devices and ends its rounds
where the single-device run does.

Two local epochs and momentum make the clients build optimizer states from what the
server sends (``zeros_like`` of the global model, FedRep's and FedBABU's frozen layers),
which is what breaks when a client function reads round values through a closure inside
``shard_map``.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from conftest import TESTS_DIR, run_on_cpu_devices

from fedjax_sim import algorithms

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import random_federated
    from fedjax_sim import algorithms
    from fedjax_sim.data.public import as_public
    from fedjax_sim.models import make_model
    from fedjax_sim.runner import run

    assert jax.device_count() == 4, jax.devices()
    data = random_federated(seed=4, num_clients=8)
    model = make_model("mlp", data.input_shape, data.num_classes)
    rng = np.random.default_rng(0)
    public = as_public(rng.normal(size=(40, *data.input_shape)), rng.integers(0, 4, 40),
                       val_x=rng.normal(size=(12, *data.input_shape)),
                       val_y=rng.integers(0, 4, 12))
    extra = {{"dsfl": dict(public=public, public_batch=16, distill_batch_size=8),
             "fedmd": dict(public=public, public_batch=16, distill_batch_size=8),
             "fccl": dict(public=public, public_batch=16, distill_batch_size=8),
             "feddf": dict(public=public, feddf_batch_size=8, feddf_steps=3)}}
    # FCCL without its Adam collaboration phase as well (see the test).
    extra["fccl_no_collaboration"] = dict(extra["fccl"], distill_epochs=0)
    out = {{}}
    for name in {names!r}:
        alg = algorithms.make(name.split("_no_")[0], model, local_epochs=2, batch_size=4,
                              momentum=0.5, join_ratio=0.5, **extra.get(name, {{}}))
        runs = {{}}
        for devices in (1, None):
            r = run(alg, data, rounds=2, eval_every=2, progress=False, devices=devices)
            runs[str(devices)] = {{
                "devices": r.summary["devices"],
                "leaves": [np.asarray(x, np.float64).ravel().tolist() for x in
                           jax.tree.leaves((r.state.server, r.state.clients))],
            }}
        out[name] = runs
    print(json.dumps(out))
""")


# A mean of uploads, personal state with the server-side FedOBP step, and distillation run
# by default; the others (frozen layers, Ditto's personal models, ...) are marked slow.
# FedAvg sharded over 4 devices is in test_sharding.
QUICK = ("fedobp", "dsfl")
REST = tuple(n for n in (*algorithms.ALGORITHMS, *algorithms.DISTILLATION,
                         "fccl_no_collaboration") if n not in QUICK)


@pytest.fixture(scope="module")
def quick_runs():
    return run_on_cpu_devices(SCRIPT.format(tests=TESTS_DIR, names=list(QUICK)))


@pytest.fixture(scope="module")
def rest_runs():
    return run_on_cpu_devices(SCRIPT.format(tests=TESTS_DIR, names=list(REST)))


def _runs(sharded_runs, name):
    one, four = sharded_runs[name]["1"], sharded_runs[name]["None"]
    assert one["devices"] == 1 and four["devices"] == 4
    assert len(one["leaves"]) == len(four["leaves"])
    return zip(one["leaves"], four["leaves"], strict=True)


def _assert_equal_up_to_summation_order(runs, name):
    for a, b in _runs(runs, name):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", QUICK)
def test_algorithm_sharded_equals_single_device(quick_runs, name):
    _assert_equal_up_to_summation_order(quick_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in REST if n != "fccl"])
def test_every_other_algorithm_sharded_equals_single_device(rest_runs, name):
    _assert_equal_up_to_summation_order(rest_runs, name)


@pytest.mark.slow
def test_fccl_sharded_within_its_adam_steps(rest_runs):
    # FCCL's collaboration takes Adam steps, each of which moves a weight by about the
    # learning rate whatever the gradient's size: near-zero gradients that differ in their
    # last bits between the two summation orders give steps of opposite signs. Without
    # that phase the runs agree (above); with it they stay within the steps' reach.
    hp = algorithms.resolve("fccl", public_batch=16, distill_batch_size=8)
    steps = 2 * hp["distill_epochs"] * (16 // 8)  # two rounds
    reach = 2 * steps * hp["fccl_public_lr"]
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in _runs(rest_runs, "fccl"))
    assert worst <= reach


# --- Heterogeneous groups: client state leaves whose leading axis is not K ---------------

GROUPS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import random_federated
    from fedjax_sim.algorithms.base import Algorithm
    from fedjax_sim.algorithms.fedmd import group_members, grouped_state
    from fedjax_sim.runner import run

    assert jax.device_count() == 4, jax.devices()

    def init(key, data):
        members = group_members(data.num_clients, 3)
        return grouped_state(key, None, tuple({{"w": jnp.zeros((len(m), 6))}}
                                              for m in members))

    def round_fn(state, data):
        members = group_members(data.num_clients, 3)
        groups = tuple({{"w": g["w"] + jnp.sum(data.train_x[m], axis=1)}}
                       for g, m in zip(state.clients, members))
        return state.replace(clients=groups, round=state.round + 1), {{
            "train_loss": sum(jnp.sum(g["w"]) for g in groups)}}

    def evaluate(state, data):
        correct = jnp.zeros((data.num_clients,), jnp.int32)
        for g, m in zip(state.clients, group_members(data.num_clients, 3)):
            correct = correct.at[m].set((jnp.sum(g["w"], axis=1) > 0).astype(jnp.int32))
        return correct, jnp.zeros((data.num_clients,))

    alg = Algorithm("groups", init, round_fn, evaluate, lambda d: (0, 0), {{}})
    out = {{}}
    for k in (7, 8):
        data = random_federated(seed=1, num_clients=k)
        for devices in (1, 2, None):
            r = run(alg, data, rounds=2, eval_every=1, progress=False, devices=devices)
            out[f"{{k}}/{{devices}}"] = {{
                "devices": r.summary["devices"],
                "specs": [list(g["w"].sharding.spec) if r.summary["devices"] > 1 else None
                          for g in r.state.clients],
                "leaves": [np.asarray(g["w"], np.float64).ravel().tolist()
                           for g in r.state.clients],
                "accuracies": r.summary["client_accuracies"]}}
    print(json.dumps(out))
""")


def test_group_states_of_any_size_on_any_device_count():
    # K=8 in 3 groups has groups of 3, 3 and 2 clients: on 2 devices the group of 2 is
    # sharded and the others replicated, on 4 all are replicated. K=7 runs on one device.
    out = run_on_cpu_devices(GROUPS_SCRIPT.format(tests=TESTS_DIR))
    assert [out[f"8/{d}"]["devices"] for d in (1, 2, None)] == [1, 2, 4]
    assert [out[f"7/{d}"]["devices"] for d in (1, 2, None)] == [1, 1, 1]
    assert out["8/2"]["specs"] == [[], [], ["clients"]]
    assert out["8/None"]["specs"] == [[], [], []]
    for k in (7, 8):
        one = out[f"{k}/1"]
        for devices in (2, None):
            other = out[f"{k}/{devices}"]
            assert other["accuracies"] == one["accuracies"]
            for a, b in zip(one["leaves"], other["leaves"], strict=True):
                np.testing.assert_allclose(b, a, rtol=1e-6)


HETEROGENEOUS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import random_federated
    from fedjax_sim import algorithms
    from fedjax_sim.data.public import as_public
    from fedjax_sim.models import make_model
    from fedjax_sim.runner import run

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    public = as_public(rng.normal(size=(32, 6)), rng.integers(0, 4, 32))
    models = tuple(make_model("mlp", (6,), 4, hidden=h) for h in ((8,), (16,), (8, 8)))
    common = dict(public=public, public_batch=16, distill_batch_size=8, local_steps=2,
                  batch_size=4, momentum=0.5, join_ratio=0.5)
    extra = {{"fedmd": dict(fedmd_transfer_epochs=1), "fccl": dict(fccl_pretrain_epochs=1)}}
    out = {{}}
    for name in ("fedmd", "fccl"):
        alg = algorithms.make(name, models, **common, **extra[name])
        for k in (7, 8):
            data = random_federated(seed=3, num_clients=k)
            for devices in (1, 2, None):
                r = run(alg, data, rounds=2, eval_every=2, progress=False, devices=devices)
                out[f"{{name}}/{{k}}/{{devices}}"] = {{
                    "devices": r.summary["devices"],
                    "leaves": [np.asarray(x, np.float64).ravel().tolist()
                               for x in jax.tree.leaves(r.state.clients)]}}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_fedmd_and_fccl_heterogeneous_on_2_and_4_devices_equal_one():
    out = run_on_cpu_devices(HETEROGENEOUS_SCRIPT.format(tests=TESTS_DIR))
    # FCCL's Adam steps: see test_fccl_sharded_within_its_adam_steps.
    hp = algorithms.resolve("fccl", public_batch=16, distill_batch_size=8)
    reach = 2 * (2 * hp["distill_epochs"] * (16 // 8)) * hp["fccl_public_lr"]
    for name in ("fedmd", "fccl"):
        for k in (7, 8):
            one = out[f"{name}/{k}/1"]
            for devices, used in ((2, 2 if k == 8 else 1), (None, 4 if k == 8 else 1)):
                other = out[f"{name}/{k}/{devices}"]
                assert one["devices"] == 1 and other["devices"] == used
                for a, b in zip(one["leaves"], other["leaves"], strict=True):
                    if name == "fedmd":
                        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
                    else:
                        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= reach
