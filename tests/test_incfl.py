"""IncFL / MaxFL: its weights, thresholds and rounds against NumPy and FedAvg, its options,
and the command line (partial participation, two devices, the Local reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_model, random_federated

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import local_sgd
from fedjax_sim.algorithms.incfl import RHO_STREAM, mean_loss
from fedjax_sim.cli import main
from fedjax_sim.core.cohort import cohort_size, sample_cohort
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.kernels.incentives import incfl_weights
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device


def numpy_weights(f, rho, temperature, present=None):
    """q_k = σ'((f_k − ρ_k) / T) normalized over the present clients, in float64 (log
    space, so that no weight underflows before normalizing)."""
    x = (np.asarray(f, np.float64) - np.asarray(rho, np.float64)) / temperature
    log_q = -np.abs(x) - 2.0 * np.log1p(np.exp(-np.abs(x)))  # log σ(x) + log σ(−x)
    if present is not None:
        log_q = np.where(present, log_q, -np.inf)
    q = np.exp(log_q - log_q.max())
    return q / q.sum()


def sigmoid_slope(x):
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 - s)


def test_weights_are_the_normalized_sigmoid_slope():
    f = np.array([1.0, 0.6, 2.5, 0.9, 1.2], np.float32)
    rho = np.array([0.8, 0.9, 0.5, 0.9, 1.0], np.float32)
    for temperature in (1.0, 0.3):
        q = sigmoid_slope((f.astype(np.float64) - rho) / temperature)
        got = np.asarray(incfl_weights(f, rho, temperature))
        np.testing.assert_allclose(got, q / q.sum(), rtol=1e-5)
        np.testing.assert_allclose(got, numpy_weights(f, rho, temperature), rtol=1e-5)
    # Absent clients get 0 and the rest renormalize among themselves.
    present = np.array([True, False, True, True, False])
    got = np.asarray(incfl_weights(f, rho, 0.3, present=present))
    q = np.where(present, sigmoid_slope((f.astype(np.float64) - rho) / 0.3), 0.0)
    np.testing.assert_allclose(got, q / q.sum(), rtol=1e-5)
    assert got[1] == 0 and got[4] == 0
    # Far from the threshold σ' underflows in float32 (exp(−300)); the weights do not: one
    # client far above its threshold next to clients near theirs gets a weight of ~0, and a
    # cohort of far clients alone still splits the weight by their distance.
    far = np.array([300.0, 1.0, 0.95], np.float32)
    near_rho = np.array([0.0, 0.9, 0.9], np.float32)
    got = np.asarray(incfl_weights(far, near_rho, 1.0))
    np.testing.assert_allclose(got, numpy_weights(far, near_rho, 1.0), rtol=1e-5, atol=1e-30)
    assert got[0] < 1e-30 and np.isclose(got.sum(), 1.0)
    all_far = np.array([300.0, 310.0, -305.0], np.float32)
    got = np.asarray(incfl_weights(all_far, np.zeros(3, np.float32), 1.0))
    assert np.all(np.isfinite(got)) and np.isclose(got.sum(), 1.0)
    np.testing.assert_allclose(got, numpy_weights(all_far, np.zeros(3), 1.0), rtol=1e-5)
    # A flat surrogate weighs every client alike.
    np.testing.assert_allclose(np.asarray(incfl_weights(f, rho, 1e30)), np.full(5, 0.2),
                               rtol=1e-6)


def _loss_and_grad(w, b, x, y):
    """Mean cross-entropy of softmax regression and its gradient, float64."""
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = -np.mean(log_p[np.arange(len(y)), y])
    p = np.exp(log_p)
    p[np.arange(len(y)), y] -= 1.0
    return loss, (x.T @ p / len(y), p.mean(0))


def _descend(w, b, x, y, lr, steps):
    w, b = w.copy(), b.copy()
    for _ in range(steps):
        _, (gw, gb) = _loss_and_grad(w, b, x, y)
        w, b = w - lr * gw, b - lr * gb
    return w, b


@pytest.mark.parametrize("join_ratio", [1.0, 0.75])
def test_rounds_match_the_papers_update_in_numpy(join_ratio):
    # Equal client sizes and full batches (the batch order cannot matter). Client 3's
    # inputs are scaled up: its steps overshoot, so its local-only loss ends far above its
    # loss on the global model (f_3 <= ρ_3, (f_3 − ρ_3) / T near −150: its weight
    # underflows in float32 unless computed in log space).
    rng = np.random.default_rng(1)
    k, n, dim, classes = 4, 6, 4, 3
    epochs, rho_epochs, lr, server_lr, temperature = 2, 3, 2.0, 0.7, 0.05
    x = rng.normal(size=(k, n, dim)).astype(np.float32)
    x[3] *= 10.0
    y = rng.integers(0, classes, (k, n)).astype(np.int32)
    counts = np.full(k, n, np.int32)
    data = to_device(FederatedData(x, y, counts, x[:, :2], y[:, :2], np.full(k, 2, np.int32),
                                   num_classes=classes, name="tiny"))
    alg = algorithms.make("incfl", linear_model(dim, classes), local_epochs=epochs, batch_size=n,
                          lr=lr, join_ratio=join_ratio, server_lr=server_lr,
                          incfl_temperature=temperature, incfl_local_epochs=rho_epochs)
    state = jax.jit(alg.init)(jax.random.key(0), data)
    xs = x.astype(np.float64)
    w = np.asarray(state.server["params"]["head"]["kernel"], np.float64)
    b = np.asarray(state.server["params"]["head"]["bias"], np.float64)
    rho = np.array([_loss_and_grad(*_descend(w, b, xs[i], y[i], lr, rho_epochs), xs[i],
                                   y[i])[0] for i in range(k)])
    np.testing.assert_allclose(state.clients["rho"], rho, rtol=1e-4)
    f0 = np.array([_loss_and_grad(w, b, xs[i], y[i])[0] for i in range(k)])
    assert np.all(f0[:3] > rho[:3]) and (f0[3] - rho[3]) / temperature < -100
    step = jax.jit(alg.round)
    size = cohort_size(k, join_ratio)
    appeals = []
    for _ in range(2):
        _, round_key = jax.random.split(state.key)
        index = sample_cohort(jax.random.split(round_key)[0], k, size)
        cohort = np.arange(k) if index is None else np.asarray(index)
        state, metrics = step(state, data)
        f = np.array([_loss_and_grad(w, b, xs[i], y[i])[0] for i in cohort])
        trained = [_descend(w, b, xs[i], y[i], lr, epochs) for i in cohort]
        p = numpy_weights(f, rho[cohort], temperature)
        w = w + server_lr * (sum(pi * t[0] for pi, t in zip(p, trained, strict=True)) - w)
        b = b + server_lr * (sum(pi * t[1] for pi, t in zip(p, trained, strict=True)) - b)
        np.testing.assert_allclose(metrics["incfl_max_weight"], p.max(), rtol=1e-4)
        assert float(metrics["incfl_appeal"]) == pytest.approx(np.mean(f <= rho[cohort]))
        appeals.append(float(metrics["incfl_appeal"]))
    head = state.server["params"]["head"]
    np.testing.assert_allclose(head["kernel"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head["bias"], b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.clients["rho"], rho, rtol=1e-4)  # never changes
    if join_ratio == 1.0:
        assert appeals[0] == 0.25  # client 3 only, before any update


def _equal_sizes(k=5, n=8, dim=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, n, dim)).astype(np.float32)
    y = rng.integers(0, classes, (k, n)).astype(np.int32)
    tx = rng.normal(size=(k, 3, dim)).astype(np.float32)
    ty = rng.integers(0, classes, (k, 3)).astype(np.int32)
    return to_device(FederatedData(x, y, np.full(k, n, np.int32), tx, ty,
                                   np.full(k, 3, np.int32), num_classes=classes, name="eq"))


def test_a_flat_surrogate_on_equal_clients_is_fedavg():
    data = _equal_sizes()
    model = make_model("mlp", (6,), 4, hidden=(8,))
    common = dict(local_epochs=2, batch_size=4, lr=0.1, join_ratio=0.6)
    fedavg = algorithms.make("fedavg", model, **common)
    incfl = algorithms.make("incfl", model, **common, incfl_temperature=1e30,
                            incfl_local_epochs=1)
    states = {}
    for alg in (fedavg, incfl):
        state, losses = jax.jit(alg.init)(jax.random.key(5), data), []
        step = jax.jit(alg.round)
        for _ in range(2):
            state, metrics = step(state, data)
            losses.append(float(metrics["train_loss"]))
        states[alg.name] = state, losses
    (avg, avg_losses), (inc, inc_losses) = states["fedavg"], states["incfl"]
    for a, b in zip(jax.tree.leaves(avg.server["params"]),
                    jax.tree.leaves(inc.server["params"]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inc_losses, avg_losses, rtol=1e-6)
    np.testing.assert_array_equal(jax.random.key_data(inc.key), jax.random.key_data(avg.key))
    # The models moved (the comparison is not of two initial states).
    first = jax.jit(fedavg.init)(jax.random.key(5), data)
    assert not np.allclose(jax.tree.leaves(first.server["params"])[0],
                           jax.tree.leaves(avg.server["params"])[0])


def test_thresholds_are_each_clients_local_only_training_loss():
    data = to_device(random_federated(seed=2, num_clients=5, n_max=23))
    model = make_model("mlp", (6,), 4, hidden=(8,))
    hp = dict(batch_size=4, lr=0.2, momentum=0.5, local_epochs=1)
    key = jax.random.key(3)
    alg = algorithms.make("incfl", model, **hp, incfl_local_epochs=2)
    rho = np.asarray(alg.init(key, data).clients["rho"])
    assert rho.shape == (5,)
    # Reference: one client at a time, local_sgd alone from the initial global model.
    params = model.init(jax.random.split(key)[1])
    keys = jax.random.split(jax.random.fold_in(key, RHO_STREAM), data.num_clients)
    resolved = algorithms.resolve("incfl", **hp)
    for k in (0, 3):
        n = int(data.train_counts[k])
        trained, _ = jax.jit(local_sgd(model, resolved, epochs=2))(
            params, data.train_x[k], data.train_y[k], data.train_counts[k], keys[k])
        logits = np.asarray(model.apply(trained, data.train_x[k][:n]), np.float64)
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        expected = -np.mean(log_p[np.arange(n), data.train_y[k][:n]])
        np.testing.assert_allclose(rho[k], expected, rtol=1e-5)
    # ρ trains for incfl_local_epochs epochs even when the rounds take local steps.
    stepped = algorithms.make("incfl", model, **hp, local_steps=1, incfl_local_epochs=2)
    np.testing.assert_allclose(stepped.init(key, data).clients["rho"], rho, rtol=1e-6)


def _numpy_training_loss(model, params, x, y, n):
    """Mean cross-entropy of ``params`` on the first ``n`` rows, the log-softmax in float64."""
    logits = np.asarray(model.apply(params, x[:n]), np.float64)
    logits -= logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(log_p[np.arange(n), np.asarray(y[:n])])


def test_default_thresholds_are_the_training_losses_of_the_local_reference_in_numpy():
    # Equal clients and full batches: Local's R rounds of E epochs are R × E plain gradient
    # steps from the initial model, whatever the batch orders. The default R is 30.
    rng = np.random.default_rng(4)
    k, n, dim, classes, epochs, lr = 4, 6, 5, 3, 2, 0.5
    x = rng.normal(size=(k, n, dim)).astype(np.float32)
    y = rng.integers(0, classes, (k, n)).astype(np.int32)
    data = to_device(FederatedData(x, y, np.full(k, n, np.int32), x[:, :2], y[:, :2],
                                   np.full(k, 2, np.int32), num_classes=classes, name="eq"))
    alg = algorithms.make("incfl", linear_model(dim, classes), local_epochs=epochs,
                          batch_size=n, lr=lr)
    assert alg.hparams["incfl_local_rounds"] == 30
    assert alg.hparams["incfl_local_epochs"] is None
    state = jax.jit(alg.init)(jax.random.key(2), data)
    w = np.asarray(state.server["params"]["head"]["kernel"], np.float64)
    b = np.asarray(state.server["params"]["head"]["bias"], np.float64)
    xs = x.astype(np.float64)
    rho = np.array([_loss_and_grad(*_descend(w, b, xs[i], y[i], lr, 30 * epochs), xs[i],
                                   y[i])[0] for i in range(k)])
    np.testing.assert_allclose(state.clients["rho"], rho, rtol=1e-4)
    # Ten epochs from the same start (a different budget) give other thresholds.
    short = np.array([_loss_and_grad(*_descend(w, b, xs[i], y[i], lr, 10), xs[i], y[i])[0]
                      for i in range(k)])
    assert np.all(short > rho + 1e-3)
    assert alg.report(state)["incfl_rho_rounds"] == 30
    assert alg.report(state)["incfl_rho_epochs"] is None


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_thresholds_are_the_losses_of_the_local_reference_run(momentum):
    # Unequal clients, mini-batches, half the clients per round and (traced) momentum: ρ_k
    # is the training loss of client k's model at the end of the Local run a compare_local
    # reference makes (same seed, same rounds, the runner's own loop); clients Local never
    # sampled keep the initial model.
    from fedjax_sim.runner import run

    data = random_federated(seed=6, num_clients=6, n_max=21)
    model = make_model("mlp", (6,), 4, hidden=(8,))
    hp = dict(batch_size=4, lr=0.2, local_epochs=2, join_ratio=0.5)
    rounds, seed = 3, 11
    # The IncFL round is built for momentum 0 and 0.5 (a sweep's cover): its Local
    # reference then takes momentum as data too.
    alg = algorithms.make("incfl", model, **hp, incfl_local_rounds=rounds,
                          cover=[{"momentum": 0.5}])
    device_data = to_device(data)
    rho = np.asarray(jax.jit(alg.init_with)(jax.random.key(seed), device_data,
                                            alg.hp(momentum=momentum)).clients["rho"])
    reference = run(algorithms.make("local", model, **hp, momentum=momentum), data,
                    rounds=rounds, seed=seed, progress=False).state.clients["params"]
    expected = np.array([
        _numpy_training_loss(model, jax.tree.map(lambda leaf, i=i: leaf[i], reference),
                             data.train_x[i], data.train_y[i], int(data.train_counts[i]))
        for i in range(data.num_clients)])
    np.testing.assert_allclose(rho, expected, rtol=2e-5)
    initial = model.init(jax.random.split(jax.random.key(seed))[1])
    untouched = [i for i in range(data.num_clients) if all(
        np.array_equal(leaf[i], start) for leaf, start in
        zip(jax.tree.leaves(reference), jax.tree.leaves(initial), strict=True))]
    for i in untouched:  # never sampled in 3 rounds of 3 of 6 clients, if any
        np.testing.assert_allclose(rho[i], _numpy_training_loss(
            model, initial, data.train_x[i], data.train_y[i], int(data.train_counts[i])),
            rtol=2e-5)
    # The one-pass option trains every client from the initial model instead.
    one_pass = algorithms.make("incfl", model, **hp, incfl_local_epochs=rounds * 2)
    other = np.asarray(jax.jit(one_pass.init)(jax.random.key(seed), device_data)
                       .clients["rho"])
    assert not np.allclose(other, rho)


def test_mean_loss_in_blocks_masks_padding_and_overlap():
    data = random_federated(seed=1, num_clients=2, n_max=23)
    model = make_model("mlp", (6,), 4, hidden=(8,))
    params = model.init(jax.random.key(0))
    x, y = data.train_x[0], data.train_y[0]
    for n in (23, 17, 4):
        logits = np.asarray(model.apply(params, x[:n]), np.float64)
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        expected = -np.mean(log_p[np.arange(n), y[:n]])
        for block in (5, 8, 23, 1024):  # the last block of 5 and of 8 overlaps the one before
            got = jax.jit(lambda p, x, y, n, b=block: mean_loss(model, p, x, y, n, block=b))(
                params, x, y, jnp.int32(n))
            np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("option, value", [
    ("incfl_temperature", 0.0), ("incfl_temperature", -1.0),
    ("incfl_temperature", float("inf")), ("incfl_temperature", float("nan")),
    ("incfl_local_epochs", 0), ("incfl_local_epochs", 1.5), ("server_lr", 0.0),
    ("incfl_local_rounds", 0), ("incfl_local_rounds", 2.5), ("incfl_local_rounds", None),
])
def test_bad_options_name_themselves(option, value):
    model = make_model("mlp", (6,), 4, hidden=(8,))
    with pytest.raises(ValueError, match=option):
        algorithms.make("incfl", model, **{option: value})


def test_traced_options_are_checked_and_take_new_values_without_rebuilding():
    assert set(algorithms.traced_names("incfl")) >= {"incfl_temperature", "server_lr", "lr"}
    assert "incfl_local_epochs" not in algorithms.traced_names("incfl")
    assert "incfl_local_rounds" not in algorithms.traced_names("incfl")
    model = make_model("mlp", (6,), 4, hidden=(8,))
    alg = algorithms.make("incfl", model)
    for value in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="incfl_temperature"):
            alg.hp(incfl_temperature=value)
    assert float(alg.hp(incfl_temperature=0.5)["incfl_temperature"]) == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--incfl-temperature", "0"], "--incfl-temperature must be > 0, got 0.0"),
    (["--incfl-temperature", "inf"], "--incfl-temperature must be a finite number > 0"),
    (["--incfl-local-epochs", "0"], "--incfl-local-epochs must be a positive integer"),
    (["--incfl-local-rounds", "0"], "--incfl-local-rounds must be a positive integer"),
])
def test_the_command_line_refuses_bad_options_in_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--algorithm", "incfl", *argv, "--output", str(tmp_path / "out"),
              "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_partial_participation_runs_and_reports_its_thresholds():
    from fedjax_sim.runner import run

    data = random_federated(seed=4, num_clients=6)
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=(8,))
    alg = algorithms.make("incfl", model, join_ratio=0.5, local_epochs=1, batch_size=8,
                          incfl_local_epochs=1)
    result = run(alg, data, rounds=2, progress=False, local_accuracies=[0.5] * 6)
    summary = result.summary
    assert summary["status"] == "complete" and summary["bytes_up"] > 0
    rho = np.asarray(result.state.clients["rho"])
    assert summary["incfl_rho_min"] == pytest.approx(rho.min())
    assert summary["incfl_rho_max"] == pytest.approx(rho.max())
    assert (summary["incfl_rho_epochs"], summary["incfl_rho_rounds"]) == (1, None)
    # Every evaluation record carries the incentive fields (Local reference given).
    for record in result.history:
        assert {"ipr", "ipr_strict", "tie_fraction", "hurt_fraction"} <= set(record)
        assert record["ipr"] == pytest.approx(record["ipr_strict"] + record["tie_fraction"])
    last = result.history[-1]
    assert all(summary[k] == last[k] for k in ("ipr", "ipr_strict", "tie_fraction",
                                               "hurt_fraction"))


TWO_DEVICES = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.mark.slow
def test_compare_with_fedavg_on_two_devices_with_sparse_evaluation(tmp_path):
    # --eval-every equal to --rounds (rounds back to back), half the clients per round,
    # Local first as the reference: every evaluation record carries IPR and ties.
    proc = subprocess.run(
        [sys.executable, "-m", "fedjax_sim.cli", "compare", "--algorithms", "fedavg,incfl",
         "--seeds", "0", "--num-clients", "4", "--rounds", "2", "--eval-every", "2",
         "--local-epochs", "1", "--join-ratio", "0.5", "--incfl-local-epochs", "1",
         "--no-progress", "--output", str(tmp_path)],
        capture_output=True, text=True, env=TWO_DEVICES, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| incfl |" in proc.stdout and "ties %" in proc.stdout
    summary = json.loads((tmp_path / "incfl" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["devices"] == 2
    records = [json.loads(line) for line in
               (tmp_path / "incfl" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [2]
    for key in ("ipr", "ipr_strict", "tie_fraction", "hurt_fraction"):
        assert records[-1][key] == summary[key]


def test_the_thresholds_follow_the_runs_rounds():
    # ρ_k comes from a Local run of the run's own length unless set: recorded in the spec
    # (so the identity says what ran); epochs given instead leave the rounds unset.
    from fedjax_sim.spec import ExperimentSpec, check_spec

    assert check_spec(ExperimentSpec(algorithm="incfl", rounds=20)).hparam_dict[
        "incfl_local_rounds"] == 20
    given = check_spec(ExperimentSpec(algorithm="incfl", rounds=20,
                                      hparams={"incfl_local_rounds": 5}))
    assert given.hparam_dict["incfl_local_rounds"] == 5
    epochs = check_spec(ExperimentSpec(algorithm="incfl", rounds=20,
                                       hparams={"incfl_local_epochs": 10}))
    assert "incfl_local_rounds" not in epochs.hparam_dict
    assert "incfl_local_rounds" not in check_spec(ExperimentSpec(rounds=20)).hparam_dict
