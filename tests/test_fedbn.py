"""Batch normalization (``cnn_bn``: running statistics as per-client state, train and eval
modes, the training step) and FedBN (Li et al., ICLR 2021), against plain NumPy / JAX
computations, FedAvg, and the command line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import client_optimizer, local_sgd
from fedjax_sim.core import local
from fedjax_sim.core.local import weighted_cross_entropy
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

SHAPE, CLASSES = (8, 8, 1), 4
BN_NAMES = {"bn1", "bn2", "bn3", "batch_stats"}
COMMON = {"local_epochs": 1, "batch_size": 8, "lr": 0.05}
EPS, MOMENTUM = 1e-5, 0.9


@pytest.fixture(scope="module")
def model():
    # XLA's convolution, as the hand computations below use it.
    return make_model("cnn_bn", SHAPE, CLASSES, conv_impl="xla")


@pytest.fixture(scope="module")
def data():
    return to_device(random_federated(seed=5, num_clients=4, n_max=12, t_max=6,
                                      input_shape=SHAPE, num_classes=CLASSES))


def random_params(model, seed=0):
    """Initial parameters with random BN scales, biases and running statistics."""
    params = model.init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for name in ("bn1", "bn2", "bn3"):
        width = params[name]["scale"].shape
        params[name] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, width), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=width), jnp.float32)}
        params["batch_stats"][name] = {
            "mean": jnp.asarray(rng.normal(size=width), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2.0, width), jnp.float32)}
    return params


def conv(x, layer):
    y = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return np.asarray(y + layer["bias"], np.float64)


def pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def affine(h, layer, mean, var):
    return (h - mean) / np.sqrt(var + EPS) * np.asarray(layer["scale"]) + np.asarray(
        layer["bias"])


def hand_forward(params, x, stats_of):
    """The cnn_bn forward pass in NumPy; ``stats_of(name, h)`` gives each BN layer's
    (mean, var) for its input ``h``."""
    h = np.asarray(x, np.float64)
    for i in (1, 2):
        h = conv(jnp.asarray(h, jnp.float32), params[f"conv{i}"])
        h = pool(np.maximum(affine(h, params[f"bn{i}"], *stats_of(f"bn{i}", h)), 0))
    h = h.reshape(h.shape[0], -1)
    h = h @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"])
    h = np.maximum(affine(h, params["bn3"], *stats_of("bn3", h)), 0)
    return h @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(
        params["head"]["bias"])


def test_cnn_bn_keeps_its_statistics_in_the_parameter_dict(model):
    params = model.init(jax.random.key(0))
    assert set(params) == {"conv1", "conv2", "fc1", "head"} | BN_NAMES
    assert model.state_names == ("batch_stats",) and model.has_stats
    assert model.norm_layers == ("bn1", "bn2", "bn3")
    assert model.layers == ("conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "head")
    for name, width in (("bn1", 32), ("bn2", 64), ("bn3", 512)):
        np.testing.assert_array_equal(params["batch_stats"][name]["mean"], np.zeros(width))
        np.testing.assert_array_equal(params["batch_stats"][name]["var"], np.ones(width))
    plain = make_model("cnn", SHAPE, CLASSES)
    assert not plain.has_stats and plain.train_fn is None
    with pytest.raises(ValueError, match="no training mode"):
        plain.train(plain.init(jax.random.key(0)), jnp.zeros((1, *SHAPE)), jnp.ones(1))


def test_eval_mode_normalizes_with_the_running_statistics(model):
    params = random_params(model)
    x = np.random.default_rng(1).normal(size=(5, *SHAPE)).astype(np.float32)
    stats = params["batch_stats"]
    expected = hand_forward(params, x, lambda name, h: (np.asarray(stats[name]["mean"]),
                                                        np.asarray(stats[name]["var"])))
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=2e-4, atol=2e-4)


def test_train_mode_statistics_ignore_padded_rows(model):
    params = random_params(model)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, *SHAPE)).astype(np.float32)
    x[4:] = 50.0 * rng.normal(size=(2, *SHAPE))  # padded rows, far off the real ones
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    logits, new = model.train(params, x, weights)

    batch = {}

    def batch_stats(name, h):
        axes = tuple(range(h.ndim - 1))
        real = h[:4]
        batch[name] = real.mean(axes), real.var(axes)  # biased, as BN normalizes with
        return batch[name]

    expected = hand_forward(params, x, batch_stats)
    np.testing.assert_allclose(logits[:4], expected[:4], rtol=2e-4, atol=2e-4)
    for name, (mean, var) in batch.items():
        old = params["batch_stats"][name]
        np.testing.assert_allclose(new["batch_stats"][name]["mean"],
                                   MOMENTUM * old["mean"] + (1 - MOMENTUM) * mean,
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new["batch_stats"][name]["var"],
                                   MOMENTUM * old["var"] + (1 - MOMENTUM) * var,
                                   rtol=1e-4, atol=1e-5)
    # The same as the real rows alone.
    alone, alone_stats = model.train(params, x[:4], jnp.ones(4))
    np.testing.assert_allclose(logits[:4], alone, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(alone_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_step_trains_by_gradient_and_overwrites_the_statistics(model):
    params = random_params(model, seed=3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, *SHAPE)).astype(np.float32)
    y = jnp.asarray(rng.integers(0, CLASSES, 5), jnp.int32)
    w = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    step = local.sgd_step(algorithms.base.train_loss(model), client_optimizer(hp),
                          stats=model.state_names)
    optimizer = client_optimizer(hp)
    (trained, _), loss = step((params, optimizer.init(params)), x, y, w)

    trainable = {k: v for k, v in params.items() if k != "batch_stats"}

    def reference_loss(p):
        logits, new = model.train({**p, "batch_stats": params["batch_stats"]}, x, w)
        return weighted_cross_entropy(logits, y, w), new

    (ref_loss, ref_stats), grads = jax.value_and_grad(reference_loss, has_aux=True)(trainable)
    # SGD with momentum from a zero buffer and L2 decay: w - lr (g + decay w).
    expected = jax.tree.map(lambda p, g: p - 0.1 * (g + 0.01 * p), trainable, grads)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves({k: trained[k] for k in trainable}),
                    jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The statistics are the training pass's moving average, untouched by decay or momentum.
    for a, b in zip(jax.tree.leaves(trained["batch_stats"]),
                    jax.tree.leaves(ref_stats["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_without_statistics_trains_as_before():
    model = make_model("mlp", (6,), 4, hidden=(8,))
    hp = {**COMMON, "local_steps": None, "momentum": 0.0, "weight_decay": 0.0}
    params = model.init(jax.random.key(0))
    data = random_federated(seed=1, num_clients=1, n_max=10)
    args = (params, data.train_x[0], data.train_y[0], data.train_counts[0], jax.random.key(4))
    ours = jax.jit(local_sgd(model, hp))(*args)
    loss_fn = algorithms.base.cross_entropy_loss(model)
    plain = jax.jit(lambda *a: local.train(loss_fn, optax.sgd(0.05), *a, batch_size=8,
                                           epochs=1))(*args)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def run_rounds(name, model, data, rounds, **kw):
    alg = algorithms.make(name, model, **{**COMMON, **kw})
    state = jax.jit(alg.init)(jax.random.key(7), data)
    round_fn = jax.jit(alg.round)
    metrics = []
    for _ in range(rounds):
        state, m = round_fn(state, data)
        metrics.append(m)
    return alg, state, metrics


def test_fedbn_without_batch_norm_is_fedavg_bit_for_bit():
    data = to_device(random_federated(seed=3, num_clients=5, n_max=16))
    mlp = make_model("mlp", (6,), 4, hidden=(8,))
    _, avg, avg_metrics = run_rounds("fedavg", mlp, data, 2, join_ratio=0.6)
    alg, bn, bn_metrics = run_rounds("fedbn", mlp, data, 2, join_ratio=0.6)
    for a, b in zip(jax.tree.leaves((avg.server, avg.clients, avg_metrics)),
                    jax.tree.leaves((bn.server, bn.clients, bn_metrics)), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.jit(alg.evaluate)(bn, data)[0],
                                  jax.jit(alg.evaluate)(avg, data)[0])


def test_fedbn_statistics_never_leave_their_client(model, data):
    alg, state, metrics = run_rounds("fedbn", model, data, 2, join_ratio=0.5)
    init = jax.jit(alg.init)(jax.random.key(7), data)
    personal = state.clients["personal"]
    assert set(personal) == BN_NAMES
    # The server's copy of the BN layers is never written: every round leaves it at init.
    for name in BN_NAMES:
        for a, b in zip(jax.tree.leaves(state.server["params"][name]),
                        jax.tree.leaves(init.server["params"][name]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(state.server["params"]["conv1"]["kernel"],
                              init.server["params"]["conv1"]["kernel"])
    # Sampled clients' statistics are their own; each one differs from every other.
    means = np.asarray(personal["batch_stats"]["bn1"]["mean"])
    moved = [k for k in range(data.num_clients) if np.any(means[k] != 0)]
    assert len(moved) >= 2
    for i in moved:
        for j in moved:
            assert i == j or not np.allclose(means[i], means[j])
    # Uploads and downloads hold the shared layers only.
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    shared = sum(int(np.prod(leaf.shape)) for name, sub in shapes.items()
                 if name not in BN_NAMES for leaf in jax.tree.leaves(sub))
    up, down = alg.comm_bytes(data)
    assert up == down == 2 * 4 * shared
    assert np.isfinite(float(metrics[-1]["train_loss"]))


def test_fedbn_round_equals_one_client_at_a_time(model, data):
    # One batch per client per round (batch_size >= N_max): the batch order changes the
    # summation order only, so the per-client loop agrees to float tolerance.
    hp = {**COMMON, "batch_size": 16}
    alg, state, _ = run_rounds("fedbn", model, data, 1, **hp)
    init = jax.jit(alg.init)(jax.random.key(7), data)
    full = algorithms.resolve("fedbn", **hp)
    train = jax.jit(local_sgd(model, full))
    server = init.server["params"]
    shared_names = [n for n in server if n not in BN_NAMES]
    counts = np.asarray(data.train_counts, np.float64)
    trained = []
    for k in range(data.num_clients):
        own = jax.tree.map(lambda leaf, k=k: leaf[k], init.clients["personal"])
        params, _ = train({**server, **own}, data.train_x[k], data.train_y[k], data.train_counts[k],
                          jax.random.key(k))
        trained.append(params)
    for name in shared_names:
        for leaves in zip(jax.tree.leaves(state.server["params"][name]),
                          *(jax.tree.leaves(p[name]) for p in trained), strict=True):
            mean = sum(c * np.asarray(leaf, np.float64)
                       for c, leaf in zip(counts, leaves[1:], strict=True)) / counts.sum()
            np.testing.assert_allclose(leaves[0], mean, rtol=2e-4, atol=2e-5)
    for k in range(data.num_clients):
        for name in BN_NAMES:
            for got, want in zip(
                    jax.tree.leaves(jax.tree.map(lambda leaf, k=k: leaf[k],
                                                 state.clients["personal"][name])),
                    jax.tree.leaves(trained[k][name]), strict=True):
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedper", "fedavg_ft", "local",
                                  "scaffold", "lg_fedavg", "fedbabu"])
def test_algorithms_that_train_through_local_sgd_support_batch_norm(name, model, data):
    alg, state, metrics = run_rounds(name, model, data, 1)
    # The running means start at 0: wherever the algorithm keeps them (averaged in the
    # global model, or per client), training has moved them.
    means = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        (state.server, state.clients))[0]
        if "batch_stats" in jax.tree_util.keystr(path) and "mean" in jax.tree_util.keystr(path)]
    assert means and any(np.any(np.asarray(m) != 0) for m in means)
    assert np.isfinite(float(metrics[0]["train_loss"]))
    correct, _ = jax.jit(alg.evaluate)(state, data)
    assert np.all(np.asarray(correct) >= 0)


@pytest.mark.parametrize("name", ["ditto", "apfl", "fedrep", "fedobp", "incfl", "pfedhn"])
def test_algorithms_with_their_own_loss_refuse_batch_norm(name, model):
    # Declared on the algorithm (Abilities.batch_norm), refused by make before any build.
    assert not algorithms.abilities(name).batch_norm
    with pytest.raises(ValueError, match=f"{name} does not train batch-normalized models"):
        algorithms.make(name, model, **COMMON)


def test_a_custom_loss_refuses_batch_norm(model):
    hp = algorithms.resolve("fedavg", **COMMON)
    with pytest.raises(ValueError, match="own local loss does not train"):
        local_sgd(model, hp, loss_fn=lambda p, x, y, w: 0.0)


def test_cli_runs_fedbn_on_cnn_bn_and_sweeps_lr(tmp_path):
    from fedjax_sim.cli import main

    tiny = ["--num-clients", "4", "--rounds", "2", "--eval-every", "1", "--local-epochs",
            "1", "--no-progress", "--algorithm", "fedbn", "--model", "cnn_bn"]
    out = tmp_path / "run"
    main(["run", "--output", str(out), *tiny])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fedbn" and 0 <= summary["accuracy"] <= 1
    swept = tmp_path / "sweep"
    main(["run", "--output", str(swept), "--sweep-lr", "0.01,0.1", *tiny])
    records = [json.loads(p.read_text()) for p in swept.rglob("summary.json")]
    assert len(records) == 2
    assert len({r["accuracy"] for r in records} | {r["bytes_up"] for r in records}) >= 2
