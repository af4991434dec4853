"""``resnet_bn``: the ResNet with batch normalization as top-level layers (the contract
FedBN needs), its train and eval modes, FedBN and FedAvg on it, the algorithms that refuse
it, and the command line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import local_sgd
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

SHAPE, CLASSES = (8, 8, 3), 2
# batch_size above every client's count: one batch per epoch, so a client's training does
# not depend on its batch order, and a per-client loop agrees with the vmapped round.
COMMON = {"local_epochs": 1, "batch_size": 16, "lr": 0.05}
MOMENTUM = 0.9
BN_LAYERS = (
    "stem_bn",
    "stage1_block1_bn1", "stage1_block1_bn2",
    "stage2_block1_bn1", "stage2_block1_bn2", "stage2_block1_proj_bn",
    "stage3_block1_bn1", "stage3_block1_bn2", "stage3_block1_proj_bn",
)
LOCAL = {*BN_LAYERS, "batch_stats"}


@pytest.fixture(scope="module")
def model():
    # XLA's convolution: the fastest to compile on CPU.
    return make_model("resnet_bn", SHAPE, CLASSES, conv_impl="xla")


@pytest.fixture(scope="module")
def data():
    return to_device(random_federated(seed=5, num_clients=4, n_max=12, t_max=6,
                                      input_shape=SHAPE, num_classes=CLASSES))


def random_stats(params, seed):
    """``params`` with random running statistics for every BN layer."""
    rng = np.random.default_rng(seed)
    stats = {name: {"mean": jnp.asarray(rng.normal(size=s["mean"].shape), jnp.float32),
                    "var": jnp.asarray(rng.uniform(0.5, 2.0, s["var"].shape), jnp.float32)}
             for name, s in params["batch_stats"].items()}
    return {**params, "batch_stats": stats}


def test_every_batch_norm_layer_is_a_top_level_entry(model):
    params = model.init(jax.random.key(0))
    convs = {"stem", *(f"stage{s}_block1_conv{i}" for s in (1, 2, 3) for i in (1, 2)),
             "stage2_block1_proj", "stage3_block1_proj"}
    assert set(params) == convs | LOCAL | {"head"}
    assert model.norm_layers == BN_LAYERS
    assert model.state_names == ("batch_stats",) and model.has_stats
    assert set(params["batch_stats"]) == set(BN_LAYERS)
    # Forward order: conv, its BN, ..., head.
    assert model.layers[:4] == ("stem", "stem_bn", "stage1_block1_conv1", "stage1_block1_bn1")
    assert model.layers[-1] == "head" and set(model.layers) == set(params) - {"batch_stats"}
    for name in BN_LAYERS:
        width = params[name]["scale"].shape
        assert set(params[name]) == {"scale", "bias"}
        np.testing.assert_array_equal(params["batch_stats"][name]["mean"], np.zeros(width))
        np.testing.assert_array_equal(params["batch_stats"][name]["var"], np.ones(width))
    # No submodules: every layer is one flat {name: array} entry; convolutions have no bias.
    for name in convs:
        assert set(params[name]) == {"kernel"}
    # Equal channels across stages: no projection, and the BN list follows.
    same = make_model("resnet_bn", SHAPE, CLASSES, stages=(8, 8), blocks_per_stage=2)
    shapes = jax.eval_shape(same.init, jax.random.key(0))
    assert same.norm_layers == ("stem_bn", "stage1_block1_bn1", "stage1_block1_bn2",
                                "stage1_block2_bn1", "stage1_block2_bn2", "stage2_block1_bn1",
                                "stage2_block1_bn2", "stage2_block2_bn1", "stage2_block2_bn2")
    assert set(shapes["batch_stats"]) == set(same.norm_layers)
    assert not any("proj" in name for name in shapes)
    with pytest.raises(ValueError, match="momentum"):
        make_model("resnet_bn", SHAPE, CLASSES, momentum=1.0)
    with pytest.raises(ValueError, match="needs H, W >= 4"):
        make_model("resnet_bn", (2, 2, 3), CLASSES)


def test_eval_mode_uses_the_running_statistics_and_train_mode_does_not(model):
    params = model.init(jax.random.key(1))
    other = random_stats(params, seed=1)
    x = np.random.default_rng(1).normal(size=(5, *SHAPE)).astype(np.float32)
    weights = jnp.ones(5)
    assert not np.allclose(model.apply(params, x), model.apply(other, x), atol=1e-3)
    logits, new = model.train(params, x, weights)
    other_logits, other_new = model.train(other, x, weights)
    np.testing.assert_array_equal(logits, other_logits)
    # Both moved by the same batch statistics from their own running ones.
    for name in BN_LAYERS:
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                new["batch_stats"][name][key] - MOMENTUM * params["batch_stats"][name][key],
                other_new["batch_stats"][name][key]
                - MOMENTUM * other["batch_stats"][name][key], rtol=1e-4, atol=1e-5)


def test_padded_rows_do_not_change_the_batch_statistics(model):
    params = random_stats(model.init(jax.random.key(2)), seed=2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, *SHAPE)).astype(np.float32)
    x[4:] = 50.0 * rng.normal(size=(2, *SHAPE))  # padded rows, far off the real ones
    logits, new = model.train(params, x, jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    alone, alone_new = model.train(params, x[:4], jnp.ones(4))
    np.testing.assert_allclose(logits[:4], alone, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(alone_new), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The padded rows would have moved them.
    _, with_padding = model.train(params, x, jnp.ones(6))
    assert not np.allclose(with_padding["batch_stats"]["stem_bn"]["var"],
                           new["batch_stats"]["stem_bn"]["var"])


def init_and_round(name, model, data, **kw):
    alg = algorithms.make(name, model, **{**COMMON, **kw})
    return alg, jax.jit(alg.init)(jax.random.key(7), data), jax.jit(alg.round)


def test_fedbn_keeps_every_batch_norm_layer_on_its_client(model, data):
    alg, init, round_fn = init_and_round("fedbn", model, data)
    first, _ = round_fn(init, data)
    second, metrics = round_fn(first, data)
    assert np.isfinite(float(metrics["train_loss"]))
    personal = second.clients["personal"]
    assert set(personal) == LOCAL
    # Every client's BN layers and statistics are its own.
    for leaf in jax.tree.leaves(personal):
        rows = np.asarray(leaf).reshape(data.num_clients, -1)
        for i in range(data.num_clients):
            for j in range(i):
                assert not np.allclose(rows[i], rows[j])
    # The server's copy of the BN layers is never written.
    for name in LOCAL:
        for a, b in zip(jax.tree.leaves(second.server["params"][name]),
                        jax.tree.leaves(init.server["params"][name]), strict=True):
            np.testing.assert_array_equal(a, b)

    # Round two by hand: each client trains the shared layers with its own BN layers; the
    # server's shared layers are the sample-weighted mean, the clients keep their BN part.
    train = jax.jit(local_sgd(model, algorithms.resolve("fedbn", **COMMON)))
    server = first.server["params"]
    trained = []
    for k in range(data.num_clients):
        own = jax.tree.map(lambda leaf, k=k: leaf[k], first.clients["personal"])
        params, _ = train({**server, **own}, data.train_x[k], data.train_y[k],
                          data.train_counts[k], jax.random.key(k))
        trained.append(params)
    counts = np.asarray(data.train_counts, np.float64)
    for name in set(server) - LOCAL:
        for leaves in zip(jax.tree.leaves(second.server["params"][name]),
                          *(jax.tree.leaves(p[name]) for p in trained), strict=True):
            mean = sum(c * np.asarray(leaf, np.float64)
                       for c, leaf in zip(counts, leaves[1:], strict=True)) / counts.sum()
            np.testing.assert_allclose(leaves[0], mean, rtol=2e-4, atol=2e-5)
    for k in range(data.num_clients):
        for name in LOCAL:
            for got, want in zip(jax.tree.leaves(jax.tree.map(lambda leaf, k=k: leaf[k],
                                                              personal[name])),
                                 jax.tree.leaves(trained[k][name]), strict=True):
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    correct, _ = jax.jit(alg.evaluate)(second, data)
    assert np.all(np.asarray(correct) >= 0)


def test_fedavg_averages_the_statistics_of_resnet_bn(model, data):
    alg, init, round_fn = init_and_round("fedavg", model, data)
    state, metrics = round_fn(init, data)
    assert np.isfinite(float(metrics["train_loss"]))
    means = state.server["params"]["batch_stats"]["stage3_block1_bn2"]["mean"]
    assert np.any(np.asarray(means) != 0)
    correct, _ = jax.jit(alg.evaluate)(state, data)
    assert np.all(np.asarray(correct) >= 0)


@pytest.mark.parametrize("name", ["moon", "ditto"])
def test_algorithms_without_batch_norm_support_refuse_it(name, model):
    with pytest.raises(ValueError, match=f"{name} does not train batch-normalized models"):
        algorithms.make(name, model, **COMMON)


def test_cli_runs_fedbn_on_resnet_bn_with_digits(tmp_path):
    from fedjax_sim.cli import main

    out = tmp_path / "run"
    main(["run", "--algorithm", "fedbn", "--dataset", "digits", "--model", "resnet_bn",
          "--rounds", "1", "--num-clients", "4", "--local-epochs", "1", "--no-progress",
          "--output", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fedbn" and 0 <= summary["accuracy"] <= 1
