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
    for name in [*algorithms.ALGORITHMS, *algorithms.DISTILLATION, "fccl_no_collaboration"]:
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


@pytest.fixture(scope="module")
def sharded_runs():
    return run_on_cpu_devices(SCRIPT.format(tests=TESTS_DIR))


def _runs(sharded_runs, name):
    one, four = sharded_runs[name]["1"], sharded_runs[name]["None"]
    assert one["devices"] == 1 and four["devices"] == 4
    assert len(one["leaves"]) == len(four["leaves"])
    return zip(one["leaves"], four["leaves"], strict=True)


@pytest.mark.parametrize("name", [*(n for n in algorithms.ALGORITHMS + algorithms.DISTILLATION
                                    if n != "fccl"), "fccl_no_collaboration"])
def test_algorithm_sharded_equals_single_device(sharded_runs, name):
    for a, b in _runs(sharded_runs, name):
        # Only the summation order differs.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_fccl_sharded_within_its_adam_steps(sharded_runs):
    # FCCL's collaboration takes Adam steps, each of which moves a weight by about the
    # learning rate whatever the gradient's size: near-zero gradients that differ in their
    # last bits between the two summation orders give steps of opposite signs. Without
    # that phase the runs agree (above); with it they stay within the steps' reach.
    hp = algorithms.resolve("fccl", public_batch=16, distill_batch_size=8)
    steps = 2 * hp["distill_epochs"] * (16 // 8)  # two rounds
    reach = 2 * steps * hp["fccl_public_lr"]
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in _runs(sharded_runs, "fccl"))
    assert worst <= reach
