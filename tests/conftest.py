"""Shared fixtures: small random federated data sets that compile quickly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Commands run by the tests keep compiled programs in a folder of this test session (shared
# with their subprocesses), never in the user's cache.
os.environ.setdefault("FEDJAX_SIM_COMPILE_CACHE", tempfile.mkdtemp(prefix="fedjax-sim-cc-"))

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.data.federated import FederatedData

# Start the backends now: the command line (tests/test_cli.py) would otherwise show one CPU
# device per core to every test that runs after it in this process.
jax.devices()

# The tests compare float32 paths to tolerances of a few ulps; on GPU, XLA's default
# precision runs float32 matmuls and convolutions as TF32.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def random_federated(
    seed: int = 0,
    num_clients: int = 5,
    n_max: int = 23,
    t_max: int = 9,
    input_shape: tuple[int, ...] = (6,),
    num_classes: int = 4,
) -> FederatedData:
    """Padded random data with unequal client sizes (padding rows are zero)."""
    rng = np.random.default_rng(seed)
    train_counts = rng.integers(3, n_max + 1, num_clients).astype(np.int32)
    train_counts[0] = n_max
    test_counts = rng.integers(2, t_max + 1, num_clients).astype(np.int32)

    def block(length, counts):
        x = rng.normal(size=(num_clients, length, *input_shape)).astype(np.float32)
        y = rng.integers(0, num_classes, (num_clients, length)).astype(np.int32)
        valid = np.arange(length)[None, :] < counts[:, None]
        x = x * valid.reshape(valid.shape + (1,) * len(input_shape))
        return x, np.where(valid, y, 0).astype(np.int32)

    x, y = block(n_max, train_counts)
    tx, ty = block(t_max, test_counts)
    return FederatedData(x, y, train_counts, tx, ty, test_counts, num_classes=num_classes,
                         name="random")


@pytest.fixture
def small_data() -> FederatedData:
    return random_federated()


TESTS_DIR = str(Path(__file__).parent)


def run_on_cpu_devices(script: str, devices: int = 4, timeout: int = 1200) -> dict:
    """Runs ``script`` in a fresh Python that sees ``devices`` CPU devices and returns the
    JSON object it printed last."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_two_processes(script: str, folder: Path, timeout: int = 600) -> list[str]:
    """Runs ``script`` as processes 0 and 1 of a two-process CPU job (each gets its process
    id and a free coordinator port as arguments; one CPU device each) and returns each
    one's output, asserting that both exited 0."""
    import socket

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [open(Path(folder) / f"worker{i}.log", "w+") for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", script, str(i), str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
               for i, log in enumerate(logs)]
    texts = []
    for worker, log in zip(workers, logs, strict=True):
        try:
            worker.wait(timeout=timeout)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        log.seek(0)
        text = log.read()
        log.close()
        assert worker.returncode == 0, text[-3000:]
        texts.append(text)
    return texts


def slow_unless(values, keep):
    """``values`` as test parameters, each one not in ``keep`` marked slow: the default
    suite runs a representative few, ``-m slow`` all of them."""
    return [pytest.param(v, marks=() if v in keep else pytest.mark.slow) for v in values]


def linear_model(dim: int, classes: int):
    """Softmax regression as a ``Model`` (one "head" layer), for checks against numpy."""
    from fedjax_sim.models.base import Model

    def init(key):
        return {"head": {"kernel": 0.3 * jax.random.normal(key, (dim, classes)),
                         "bias": jnp.zeros((classes,))}}

    return Model("linear", (dim,), classes, ("head",), init,
                 lambda p, x: x @ p["head"]["kernel"] + p["head"]["bias"], ("head",))


def write_toml(folder: Path, text: str, name: str = "grid.toml") -> Path:
    """``text`` (dedented) as the config file ``folder/name``."""
    path = Path(folder) / name
    path.write_text(textwrap.dedent(text))
    return path
