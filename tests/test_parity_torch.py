"""FedAvg and FedPer rounds equal a plain PyTorch per-client loop (experiments/parity_torch.py).

Both sides start from the same weights and read the same host-drawn batch orders
(``batch_order``); after each of 3 rounds every parameter (FedPer: the averaged base and
every client's head) must agree to float32 tolerance: ``atol = 1e-5 * max(1, max |param|)``,
about 100 float32 ulps at the parameters' scale, room for the few-ulp differences of
summation order (XLA's and PyTorch's matmuls and reductions) over ~60 local steps, while
any semantic difference (a skipped or duplicated batch, a full instead of a partial last
batch, weight decay after momentum) moves parameters by 1e-4 or more.

At a few settings a float32 rounding difference pushes a ReLU unit across its kink on one
side only and that unit's weights then differ by 1e-5; the float64 runs rule out a semantic
cause there. The cnn runs, minutes on a loaded CPU, are marked slow; there the tolerance
is the spread that float32 rounding alone causes in the PyTorch loop itself (against a
float64 run), since its training amplifies rounding differences.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("parity_torch",
                                                  ROOT / "experiments" / "parity_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    from fedjax_sim.data import make_federated_data

    data, _, _ = make_federated_data("digits", num_clients=6, alpha=0.5, seed=0)
    return data


def _check(results, *, rounds=3):
    assert [r["round"] for r in results] == list(range(1, rounds + 1))
    for r in results:
        assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["max_abs_param"]), results


@pytest.mark.parametrize("algorithm", [
    "fedavg", pytest.param("fedper", marks=pytest.mark.slow)])
def test_mlp_momentum_weight_decay(parity, data, algorithm):
    # Batch 32 over 115..345 samples: every client has a partial last batch.
    _check(parity.run_parity("mlp", algorithm, data, lr=0.01, momentum=0.9,
                             weight_decay=1e-4, reference=False))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedper"])
def test_mlp_plain_sgd(parity, data, algorithm):
    _check(parity.run_parity("mlp", algorithm, data, lr=0.05, reference=False))


def test_check_batch_orders(data):
    """Host orders must list every real sample once per epoch."""
    import numpy as np

    from fedjax_sim.core import local

    counts = np.asarray(data.train_counts)
    orders = local.sample_batch_orders(0, counts, rounds=1, epochs=1,
                                       n_max=data.train_x.shape[1])
    local.check_batch_orders(orders, counts, epochs=1)
    bad = orders.copy()
    bad[0, 0, 0, :2] = bad[0, 0, 0, 1::-1]  # swap two samples of client 0
    with pytest.raises(ValueError, match="permutation"):
        local.check_batch_orders(np.where(bad == bad, 0, bad), counts)
    local.check_batch_orders(bad, counts)  # still a permutation: allowed


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedper"])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-4)])
def test_cnn(parity, data, algorithm, momentum, weight_decay):
    results = parity.run_parity("cnn", algorithm, data, lr=0.01, momentum=momentum,
                                weight_decay=weight_decay)
    for r in results:
        assert r["max_abs_diff"] <= 4 * r["torch_float32_vs_float64"] + 1e-5 * max(
            1.0, r["max_abs_param"]), results


@pytest.mark.parametrize("algorithm", ["fedavg", "fedper"])
def test_mlp_float64_at_a_setting_where_float32_crosses_a_relu_kink(algorithm):
    """In float32, lr 0.05 with momentum 0.9 and weight decay 1e-4 moves two fc2 units of
    this split across their ReLU kink on one side only (1e-5 apart after round 1, while
    nearby settings agree to 1e-7). In float64 they do not: the sides must agree to
    1e-7, far below what a semantic difference moves (1e-6 or more, from round 1)."""
    import json
    import os
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "experiments" / "parity_torch.py"), "--models", "mlp",
               "--algorithms", algorithm, "--optimizers", "0.9,1e-4", "--lr", "0.05",
               "--float64"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and len(rows[0]["rounds"]) == 3, done.stdout
    for r in rows[0]["rounds"]:
        assert r["max_abs_diff"] <= 1e-7 * max(1.0, r["max_abs_param"]), rows
