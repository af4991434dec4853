"""The client axis sharded over 4 CPU devices gives the results of one device."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import TESTS_DIR, run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import random_federated
    from fedjax_sim import algorithms
    from fedjax_sim.models import make_model
    from fedjax_sim.runner import run

    assert jax.device_count() == 4, jax.devices()
    data = random_federated(seed=3, num_clients=16)
    model = make_model("mlp", data.input_shape, data.num_classes)
    out = {{}}
    # Cohorts of 16 and 8 clients: 4 and 2 per device.
    for name, join, strategy in [("fedavg", 1.0, "sequential"), ("fedper", 0.5, "chunked"),
                                 ("ditto", 0.5, "vmap")]:
        alg = algorithms.make(name, model, local_epochs=1, batch_size=4, join_ratio=join,
                              client_strategy=strategy, chunk_size=2)
        res = {{}}
        for devices in (1, None):
            r = run(alg, data, rounds=2, eval_every=2, progress=False, devices=devices,
                    rounds_per_call=2, output={out!r} + f"/{{name}}{{join}}{{devices}}")
            leaves = [np.asarray(x).tolist() for x in jax.tree.leaves(
                (r.state.server, r.state.clients))]
            shardings = sorted({{str(x.sharding.spec) for x in jax.tree.leaves(
                r.state.clients) if hasattr(x.sharding, "spec")}})
            res[str(devices)] = {{"summary": r.summary, "leaves": leaves,
                                  "client_specs": shardings}}
        out[f"{{name}}{{join}}"] = res
    # Resuming a sharded run from its checkpoint equals the uninterrupted sharded run.
    alg = algorithms.make("fedper", model, local_epochs=1, batch_size=4, join_ratio=0.5)
    full = run(alg, data, rounds=4, eval_every=2, progress=False, output={out!r} + "/full")
    run(alg, data, rounds=2, eval_every=2, progress=False, output={out!r} + "/cut",
        checkpoint_every=2)
    resumed = run(alg, data, rounds=4, eval_every=2, progress=False, output={out!r} + "/cut",
                  checkpoint_every=2, resume=True)
    out["resume_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves((full.state.server, full.state.clients)),
        jax.tree.leaves((resumed.state.server, resumed.state.clients))))
    out["resume_devices"] = resumed.summary["devices"]
    # A sweep of 2 seeds x 2 learning rates: one configuration per device against one device.
    from fedjax_sim.runner import sweep
    kw = dict(seeds=[0, 1], lrs=[0.05, 0.2], rounds=2, eval_every=1, progress=False,
              hparams={{"local_epochs": 1, "batch_size": 4, "join_ratio": 0.5}})
    out["sweep"] = {{str(d): [{{k: s[k] for k in ("client_accuracies", "devices", "seed", "lr")}}
                              for s in sweep("fedper", model, data, devices=d, **kw)]
                    for d in (1, None)}}
    # 3 configurations on 4 devices use 3; 6 run as 8 on 4 (the last repeated, dropped).
    kw["lrs"] = [0.05]
    for count in (3, 6):
        kw["seeds"] = list(range(count))
        out[f"sweep{{count}}"] = {{
            str(d): [{{k: s[k] for k in ("client_accuracies", "devices", "seed")}}
                     for s in sweep("fedper", model, data, devices=d, **kw)]
            for d in (1, None)}}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    return run_on_cpu_devices(SCRIPT.format(tests=TESTS_DIR, out=str(out)), timeout=600), out


@pytest.mark.parametrize("case", ["fedavg1.0", "fedper0.5", "ditto0.5"])
def test_sharded_equals_single_device(sharded, case):
    import numpy as np

    results, out = sharded
    one, four = results[case]["1"], results[case]["None"]
    assert one["summary"]["devices"] == 1 and four["summary"]["devices"] == 4
    for a, b in zip(one["leaves"], four["leaves"], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)
    assert four["summary"]["accuracy"] == pytest.approx(one["summary"]["accuracy"], abs=1e-9)
    saved = json.loads((out / f"{case}None" / "summary.json").read_text())
    assert saved["devices"] == 4
    if case != "fedavg1.0":
        assert any("clients" in spec for spec in four["client_specs"])


def test_sharded_resume_equals_uninterrupted(sharded):
    results, _ = sharded
    assert results["resume_devices"] == 4
    assert results["resume_equal"] is True


def test_sweep_shards_configurations_over_devices(sharded):
    results, _ = sharded
    for key, devices in (("sweep3", 3), ("sweep6", 4)):
        one, many = results[key]["1"], results[key]["None"]
        assert [s["seed"] for s in many] == [s["seed"] for s in one]
        assert {s["devices"] for s in many} == {devices}
        for a, b in zip(one, many, strict=True):
            assert b["client_accuracies"] == pytest.approx(a["client_accuracies"], abs=1e-9)
    one, four = results["sweep"]["1"], results["sweep"]["None"]
    assert {s["devices"] for s in one} == {1} and {s["devices"] for s in four} == {4}
    for a, b in zip(one, four, strict=True):
        assert (a["seed"], a["lr"]) == (b["seed"], b["lr"])
        assert b["client_accuracies"] == pytest.approx(a["client_accuracies"], abs=1e-9)
