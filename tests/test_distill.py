"""Federated distillation: soft-target kernels against NumPy, DS-FL / FedMD / FCCL / FedDF
rounds, heterogeneous groups, public data hold-out and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_federated, slow_unless

from fedjax_sim import algorithms
from fedjax_sim.core.cohort import cohort_size
from fedjax_sim.data.public import as_public, hold_out, make_federated_data_with_public
from fedjax_sim.kernels import distill
from fedjax_sim.kernels.aggregation import broadcast
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, to_device

COMMON = {"local_epochs": 1, "batch_size": 8}


def public_set(seed=0, n=40, shape=(6,), classes=4, val=12):
    rng = np.random.default_rng(seed)
    return as_public(rng.normal(size=(n, *shape)), rng.integers(0, classes, n),
                     val_x=rng.normal(size=(val, *shape)), val_y=rng.integers(0, classes, val))


def np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# --- kernels ------------------------------------------------------------------------------


def test_era_equals_numpy():
    rng = np.random.default_rng(0)
    probs = np_softmax(rng.normal(size=(4, 7, 5)) * 3)
    weights = np.array([3.0, 1.0, 0.0, 2.0])
    for w in (None, weights):
        ww = np.full(4, 0.25) if w is None else w / w.sum()
        mean = np.einsum("k,kbc->bc", ww, probs)
        for t in (0.1, 0.5, 1.0):
            expected = np_softmax(mean / t)
            got = distill.era(jnp.asarray(probs), None if w is None else jnp.asarray(w),
                              temperature=t)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)
    # ERA lowers the entropy of the plain average for T < 1.
    sa = np.asarray(distill.weighted_average(jnp.asarray(probs)))
    sharp = np.asarray(distill.era(jnp.asarray(probs), temperature=0.1))
    assert np.all(-(sharp * np.log(sharp)).sum(-1) < -(sa * np.log(sa)).sum(-1))


def test_sa_with_unit_temperature_and_identical_clients_returns_their_probabilities():
    model = make_model("mlp", (6,), 4, hidden=(8,))
    params = broadcast(model.init(jax.random.key(1)), 5)  # five identical clients
    x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 6)), jnp.float32)
    probs = distill.client_predictions(model.apply, params, x, temperature=1.0)
    assert probs.shape == (5, 9, 4)
    own = jax.nn.softmax(model.apply(jax.tree.map(lambda p: p[0], params), x), -1)
    for targets in (distill.soft_targets(probs, method="sa"),
                    distill.soft_targets(probs, jnp.array([1.0, 2.0, 3.0, 4.0, 5.0]),
                                         method="sa")):
        np.testing.assert_allclose(np.asarray(targets), np.asarray(own), rtol=1e-5, atol=1e-6)


def np_fccl(z, zbar, lam, eps=1e-6):
    def standardize(a):
        return (a - a.mean(0)) / (a.std(0, ddof=1) + eps)

    m = standardize(z).T @ standardize(zbar) / z.shape[0]
    on = sum((1.0 - m[u, u]) ** 2 for u in range(m.shape[0]))
    off = sum((1.0 + m[u, v]) ** 2 for u in range(m.shape[0]) for v in range(m.shape[0])
              if u != v)
    return on + lam * off


def test_fccl_loss_equals_numpy():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(3, 16, 5)) * np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    zbar = z.mean(0) + 0.3 * rng.normal(size=(16, 5))
    for lam in (0.0051, 0.5):
        batched = distill.fccl_collaboration_loss(jnp.asarray(z), jnp.asarray(zbar),
                                                  off_diagonal_weight=lam)
        assert batched.shape == (3,)
        for k in range(3):
            expected = np_fccl(z[k], zbar, lam)
            single = distill.fccl_collaboration_loss(jnp.asarray(z[k]), jnp.asarray(zbar),
                                                     off_diagonal_weight=lam)
            np.testing.assert_allclose(float(single), expected, rtol=1e-4)
            np.testing.assert_allclose(float(batched[k]), expected, rtol=1e-4)
    # Perfectly correlated logits leave only the off-diagonal term.
    m = np.asarray(distill.cross_correlation(jnp.asarray(zbar), jnp.asarray(zbar)))
    np.testing.assert_allclose(np.diag(m), 1.0 - 1.0 / 16, atol=1e-4)


def test_distillation_losses_equal_numpy():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(6, 4))
    t = np_softmax(rng.normal(size=(6, 4)))
    tl = rng.normal(size=(6, 4))
    w = np.array([1.0, 1.0, 0.0, 1.0, 2.0, 0.0])
    log_s = np.log(np_softmax(s / 2.0))
    kl = (t * (np.log(t) - log_s)).sum(-1)
    ce = -(t * log_s).sum(-1)
    mae = np.abs(s - tl).mean(-1)
    for fn, expected, kwargs in (
        (distill.kl_distillation, kl, {"temperature": 2.0}),
        (distill.ce_distillation, ce, {"temperature": 2.0}),
    ):
        got = fn(jnp.asarray(s), jnp.asarray(t), weights=jnp.asarray(w), **kwargs)
        np.testing.assert_allclose(float(got), (expected * w).sum() / w.sum(), rtol=1e-5)
    got = distill.mae_distillation(jnp.asarray(s), jnp.asarray(tl))
    np.testing.assert_allclose(float(got), mae.mean(), rtol=1e-6)


# --- algorithms ---------------------------------------------------------------------------


def test_dsfl_round_uploads_probabilities_and_stores_era_targets():
    data = to_device(random_federated(num_clients=4))
    model = make_model("mlp", (6,), 4, hidden=(8,))
    public = public_set()
    alg = algorithms.make("dsfl", model, public=public, public_batch=16, distill_batch_size=8,
                          dsfl_temperature=0.2, **COMMON)
    round_fn = jax.jit(alg.round)
    state, _ = round_fn(alg.init(jax.random.key(0), data), data)
    state, metrics = round_fn(state, data)
    # The stored targets are ERA of the clients' probabilities on the stored subset, computed
    # here from the clients' final models.
    x = jnp.asarray(public.x)[state.server["subset"]]
    probs = distill.client_predictions(model.apply, state.clients["params"], x, temperature=1.0)
    expected = np_softmax(np.asarray(probs).mean(0) / 0.2)
    np.testing.assert_allclose(np.asarray(state.server["targets"]), expected, atol=1e-5)
    assert bool(state.server["has_targets"]) and float(metrics["target_entropy"]) >= 0
    up, down = alg.comm_bytes(data)
    assert up == down == 4 * 16 * 4 * 4  # 4 clients x 16 examples x 4 classes x float32


def test_feddf_with_zero_distillation_steps_equals_fedavg():
    data = to_device(random_federated(num_clients=5))
    model = make_model("mlp", (6,), 4, hidden=(8,))
    public = public_set()
    fedavg = algorithms.make("fedavg", model, join_ratio=0.6, **COMMON)
    feddf0 = algorithms.make("feddf", model, public=public, feddf_steps=0, join_ratio=0.6,
                             feddf_batch_size=8, **COMMON)
    feddf = algorithms.make("feddf", model, public=public, feddf_steps=12, join_ratio=0.6,
                            feddf_batch_size=8, feddf_eval_every=3, feddf_patience=2,
                            feddf_lr=0.01, **COMMON)
    start = fedavg.init(jax.random.key(4), data)
    expected, _ = jax.jit(fedavg.round)(start, data)
    got, _ = jax.jit(feddf0.round)(start, data)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got.server["params"], expected.server["params"])
    assert fedavg.comm_bytes(data) == feddf.comm_bytes(data)
    # With distillation the server model moves (or early stopping keeps the average, whose
    # validation accuracy nothing beat); steps never exceed the budget.
    distilled, metrics = jax.jit(feddf.round)(start, data)
    steps = int(metrics["distill_steps"])
    assert 1 <= steps <= 12
    changed = any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                  zip(jax.tree.leaves(distilled.server["params"]),
                      jax.tree.leaves(expected.server["params"]), strict=True))
    assert changed or steps < 12


@pytest.mark.parametrize("name", slow_unless(["fedmd", "fccl"], ("fedmd",)))
def test_heterogeneous_groups_train_in_one_round(name):
    data = to_device(random_federated(num_clients=6))
    models = [make_model("mlp", (6,), 4, hidden=h) for h in ((8,), (16,), (8, 8))]
    extra = {"fedmd_transfer_epochs": 1} if name == "fedmd" else {"fccl_pretrain_epochs": 1}
    alg = algorithms.make(name, models, public=public_set(), public_batch=16,
                          distill_batch_size=8, join_ratio=0.5, **COMMON, **extra)
    state = alg.init(jax.random.key(0), data)
    assert len(state.clients) == 3
    kernels = [g["params"]["fc1"]["kernel"].shape for g in state.clients]
    assert kernels == [(2, 6, 8), (2, 6, 16), (2, 6, 8)] and "fc2" in state.clients[2]["params"]
    before = jax.tree.map(np.asarray, state.clients)
    new, metrics = jax.jit(alg.round)(state, data)
    assert np.isfinite(float(metrics["train_loss"]))
    for g in range(3):
        changed = [
            any(not np.array_equal(a[row], b[row]) for a, b in
                zip(jax.tree.leaves(before[g]["params"]),
                    jax.tree.leaves(new.clients[g]["params"]), strict=True))
            for row in range(2)
        ]
        assert sum(changed) == cohort_size(2, 0.5)  # every group trained its sampled client
    # Evaluation maps group rows back to clients: client k is row k // 3 of group k % 3.
    correct, _ = jax.jit(alg.evaluate)(new, data)
    for k in range(6):
        params = jax.tree.map(lambda p, k=k: p[k // 3], new.clients[k % 3]["params"])
        logits = models[k % 3].apply(params, data.test_x[k])
        hits = (np.argmax(np.asarray(logits), -1) == np.asarray(data.test_y[k]))
        assert int(correct[k]) == int(hits[: int(data.test_counts[k])].sum())
    assert len(alg.report(new)["architectures"]) == 3
    # One sampled client per group; FCCL sends logits on every collaboration batch.
    per_client = (16 // 8) * 8 * 4 * 4 if name == "fccl" else 16 * 4 * 4
    assert alg.comm_bytes(data) == (3 * per_client, 3 * per_client)


def test_dsfl_runs_traces_once_resumes_and_sends_fewer_bytes_than_fedavg(tmp_path):
    data = random_federated(num_clients=4, seed=5)
    model = make_model("mlp", (6,), 4, hidden=(32, 32))
    alg = algorithms.make("dsfl", model, public=public_set(), public_batch=16,
                          distill_batch_size=8, dsfl_aggregation="sa", join_ratio=0.5,
                          **COMMON)
    # The runner's traced_once wrapper raises if a later round retraces.
    full = run(alg, data, rounds=3, eval_every=1, progress=False, output=tmp_path / "full")
    run(alg, data, rounds=2, eval_every=1, progress=False, output=tmp_path / "cut",
        checkpoint_every=2)
    resumed = run(alg, data, rounds=3, eval_every=1, progress=False, output=tmp_path / "cut",
                  checkpoint_every=2, resume=True)
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in full.history]
    assert 0 <= full.summary["accuracy"] <= 1
    assert full.summary["bytes_up"] == full.summary["bytes_down"] == 3 * 2 * 16 * 4 * 4
    assert full.summary["target_entropy"] > 0  # the algorithm's report reaches the summary
    fedavg = algorithms.make("fedavg", model, join_ratio=0.5, **COMMON)
    assert full.summary["bytes_up"] < 3 * fedavg.comm_bytes(data)[0]


# --- public data --------------------------------------------------------------------------


def test_public_data_is_held_out_before_partitioning(tmp_path):
    kwargs = dict(public_fraction=0.2, val_fraction=0.05, num_clients=8, alpha=0.5, seed=3)
    data, public, splits, pooled = make_federated_data_with_public(
        "digits", save_partition_to=tmp_path / "split.json", **kwargs)
    n = pooled.num_samples
    assert public.num_samples == round(0.2 * n) and public.num_val == round(0.05 * n)
    used = np.concatenate([np.concatenate(s) for s in splits])
    assert used.size == len(np.unique(used)) == n - public.num_samples - public.num_val
    public_idx, val_idx, private_idx = hold_out(n, public_fraction=0.2, val_fraction=0.05,
                                                seed=3)
    np.testing.assert_array_equal(np.sort(used), private_idx)  # no held-out index is used
    np.testing.assert_array_equal(np.asarray(public.x), pooled.x[public_idx])
    np.testing.assert_array_equal(np.asarray(public.val_y), pooled.y[val_idx])
    assert public.input_shape == data.input_shape
    again, public2, _, _ = make_federated_data_with_public(
        "digits", partition_file=tmp_path / "split.json", **kwargs)
    np.testing.assert_array_equal(np.asarray(again.train_x), np.asarray(data.train_x))
    np.testing.assert_array_equal(np.asarray(public2.x), np.asarray(public.x))
    # A partition that gives a held-out example to a client is refused.
    with pytest.raises(ValueError, match="held-out"):
        make_federated_data_with_public("digits", partition_file=tmp_path / "split.json",
                                        **{**kwargs, "seed": 4})


def test_public_data_from_another_source():
    data, public, _, _ = make_federated_data_with_public(
        "mnist1d", public_dataset="mnist1d", public_size=100, num_clients=4,
        source_options={"num_samples": 600}, public_source_options={"num_samples": 300,
                                                                    "seed": 7})
    assert public.num_samples == 100 and public.input_shape == data.input_shape
    with pytest.raises(ValueError, match=r"public_dataset 'mnist1d' has input shape \(40, 1\)"):
        make_federated_data_with_public("digits", public_dataset="mnist1d", num_clients=4,
                                        public_source_options={"num_samples": 100})


@pytest.mark.parametrize("kwargs, message", [
    ({"public_fraction": 0.0}, r"public_fraction must be in \(0, 1\)"),
    ({"public_fraction": 1.0}, r"public_fraction must be in \(0, 1\)"),
    ({"public_fraction": -0.2}, r"public_fraction must be in \(0, 1\)"),
    ({"public_fraction": 0.5, "val_fraction": 0.5}, "public_fraction \\+ val_fraction"),
    ({}, "exactly one of public_fraction and public_dataset"),
    ({"public_dataset": "digits"}, "is the private data set itself"),
])
def test_bad_public_data_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_federated_data_with_public("digits", num_clients=4, **kwargs)


def test_bad_algorithm_input_is_refused_before_compiling():
    model = make_model("mlp", (6,), 4, hidden=(8,))
    public = public_set()
    with pytest.raises(ValueError, match="dsfl_temperature must be > 0"):
        algorithms.make("dsfl", model, public=public, dsfl_temperature=0.0)
    with pytest.raises(ValueError, match="dsfl_temperature must be > 0"):
        algorithms.make("dsfl", model, public=public, dsfl_temperature=-1.0)
    with pytest.raises(ValueError, match="public_batch must be <= the public set size"):
        algorithms.make("dsfl", model, public=public, public_batch=41)
    with pytest.raises(ValueError, match="feddf_batch_size must be <= the public set size"):
        algorithms.make("feddf", model, public=public)  # default batch 128 > 40
    with pytest.raises(ValueError, match="input shape"):
        algorithms.make("fedmd", model, public=public_set(shape=(5,)), public_batch=8)
    with pytest.raises(ValueError, match="needs public data"):
        algorithms.make("fccl", model, public_batch=8)
    with pytest.raises(ValueError, match="takes no public data"):
        algorithms.make("fedavg", model, public=public)
    with pytest.raises(ValueError, match="public labels must lie in"):
        algorithms.make("fedmd", model, public=public_set(classes=7), public_batch=8)
    with pytest.raises(ValueError, match="trains one architecture"):
        algorithms.make("dsfl", [model, model], public=public, public_batch=8)
    other = make_model("mlp", (6,), 3)
    with pytest.raises(ValueError, match="every architecture"):
        algorithms.make("fccl", [model, other], public=public, public_batch=8)
    # Private data whose input shape differs from the public set's: refused at init.
    alg = algorithms.make("dsfl", model, public=public, public_batch=8)
    with pytest.raises(ValueError, match="private data has input shape"):
        alg.init(jax.random.key(0), random_federated(input_shape=(5,)))


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "dsfl", "--public-fraction", "1.5"], "--public-fraction must be in (0, 1)"),
    (["--algorithm", "dsfl", "--dsfl-temperature", "0"], "--dsfl-temperature must be > 0"),
    (["--algorithm", "dsfl", "--public-batch", "5000"], "public_batch must be <="),
    (["--algorithm", "fedavg", "--architectures", "mlp,cnn"], "--architectures applies to"),
    (["--algorithm", "fedmd", "--architectures", "mlp:0"], "positive widths"),
    (["--algorithm", "fedavg", "--public-batch", "8"], "does not apply to fedavg"),
])
def test_cli_bad_public_input(argv, message, capsys, tmp_path):
    from fedjax_sim.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", *argv, "--output", str(tmp_path), "--no-progress", "--num-clients", "5"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_runs_dsfl_with_held_out_public_data(tmp_path, capsys):
    import json

    from fedjax_sim.cli import main

    out = tmp_path / "dsfl"
    main(["run", "--algorithm", "dsfl", "--public-fraction", "0.3", "--public-batch", "64",
          "--distill-batch-size", "32", "--dsfl-aggregation", "sa", "--num-clients", "5",
          "--rounds", "2", "--eval-every", "1", "--local-epochs", "1", "--no-progress",
          "--output", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["public_size"] == round(0.3 * 1797) and summary["public_val_size"] == 90
    assert summary["bytes_up"] == 2 * 5 * 64 * 10 * 4
    assert summary["hparams"]["dsfl_aggregation"] == "sa"
