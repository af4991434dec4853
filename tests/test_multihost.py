"""Two processes on localhost (jax.distributed, CPU collectives through gloo) agree with a
single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import run_two_processes

HERE = Path(__file__).parent

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    if process_id >= 0:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}", num_processes=2,
                                   process_id=process_id, local_device_ids=[0])
    sys.path.insert(0, {tests!r})
    from conftest import random_federated
    from fedjax_sim import algorithms
    from fedjax_sim.models import make_model
    from fedjax_sim.core.state import to_host as _to_host
    from fedjax_sim.runner import run

    data = random_federated(seed=5, num_clients=6)
    model = make_model("mlp", data.input_shape, data.num_classes)
    out = {{"devices": jax.device_count(), "processes": jax.process_count()}}
    for name, join in (("fedavg", 1.0), ("fedper", 0.67)):
        alg = algorithms.make(name, model, local_epochs=1, batch_size=4, join_ratio=join)
        r = run(alg, data, rounds=2, eval_every=2, progress=False,
                output={out!r} + f"/{{name}}_{{process_id}}")
        out[name] = {{"summary": {{k: r.summary[k] for k in ("accuracy", "client_accuracies",
                                                             "devices", "processes")}},
                     "leaves": [x.tolist() for x in _to_host(jax.tree.leaves(
                         (r.state.server, r.state.clients)))]}}
    print("RESULT " + json.dumps(out), flush=True)
""")


def _result(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert lines, text[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    script = WORKER.format(tests=str(HERE), out=str(out))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    single = subprocess.run([sys.executable, "-c", script, "-1", "0"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    outputs = [_result(text) for text in run_two_processes(script, out)]
    return _result(single.stdout), outputs, out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedavg", "fedper"])
def test_two_processes_agree_with_one(runs, name):
    single, (p0, p1), out = runs
    assert single["processes"] == 1 and single["devices"] == 1
    assert p0["processes"] == p1["processes"] == 2 and p0["devices"] == 2
    assert p0[name]["summary"]["devices"] == 2
    for worker in (p0, p1):
        for a, b in zip(single[name]["leaves"], worker[name]["leaves"], strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)
        assert worker[name]["summary"]["client_accuracies"] == pytest.approx(
            single[name]["summary"]["client_accuracies"], abs=1e-9)
    # Only the first process writes the run's files.
    assert json.loads((out / f"{name}_0" / "summary.json").read_text())["devices"] == 2
    assert not (out / f"{name}_1").exists()


def test_cluster_flags_need_distributed():
    from fedjax_sim.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--coordinator", "127.0.0.1:1", "--no-progress"])
