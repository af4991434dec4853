"""Execution strategies give the same results; ``auto`` resolves per backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.core import cohort
from fedjax_sim.kernels.aggregation import weighted_mean
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device


def _fn(scale, a, b):
    # A per-client function with a tree upload and a side output; `scale` is shared.
    upload = {"w": jnp.tanh(a) * b * scale, "s": jnp.sum(a) + b}
    return upload, (a[0] - b, b * 2)


@pytest.mark.parametrize("strategy,chunk", [("vmap", 8), ("sequential", 8), ("chunked", 3),
                                            ("chunked", 7), ("chunked", 50)])
def test_client_map_mean_equals_stack_then_mean(strategy, chunk):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(7,)), jnp.float32)
    weights = jnp.asarray(rng.integers(1, 9, 7), jnp.float32)
    uploads, rest = jax.vmap(lambda a, b: _fn(1.5, a, b))(a, b)
    mean, got_rest = jax.jit(lambda a, b, w: cohort.client_map_mean(
        _fn, (a, b), w, shared=1.5, strategy=strategy, chunk_size=chunk))(a, b, weights)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 mean, weighted_mean(uploads, weights))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), got_rest, rest)
    stacked = cohort.client_map(_fn, (a, b), shared=1.5, strategy=strategy, chunk_size=chunk)
    # atol: a GPU sums one client's entries in another order than the vmapped batch does.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), stacked,
                 (uploads, rest))


def _member(scale, own, x, n, key):
    # A client that reads its own state, its data and a key, and writes a new state.
    noise = jax.random.normal(key, own["w"].shape)
    new = {"w": own["w"] * scale + x.sum() + noise, "count": own["count"] + n}
    return {"u": new["w"] * n}, new, jnp.sum(new["w"])


@pytest.mark.parametrize("strategy,chunk", [("sequential", 8), ("chunked", 2), ("chunked", 3),
                                            ("chunked", 16)])
@pytest.mark.parametrize("full", [False, True])
def test_train_in_place_equals_gather_map_scatter(strategy, chunk, full):
    rng = np.random.default_rng(1)
    k = 9
    clients = {"w": jnp.asarray(rng.normal(size=(k, 3)), jnp.float32),
               "count": jnp.zeros((k,), jnp.int32)}
    x = jnp.asarray(rng.normal(size=(k, 4)), jnp.float32)
    n = jnp.asarray(rng.integers(1, 6, k), jnp.int32)
    index = None if full else jnp.asarray([7, 2, 5, 0, 4], jnp.int32)
    size = k if full else 5
    keys = jax.random.split(jax.random.key(3), size)
    weights = (n if full else n[index]).astype(jnp.float32)

    mean, new_clients, losses = jax.jit(lambda c, x, n, w: cohort.train_in_place(
        _member, c, (x, n), index, keys, w, shared=0.5, strategy=strategy,
        chunk_size=chunk))(clients, x, n, weights)

    rows = jax.tree.map(lambda a: a if full else a[index], (clients, x, n))
    uploads, new_rows, want_losses = jax.vmap(lambda c, x, n, kk: _member(0.5, c, x, n, kk))(
        *rows, keys)
    want_clients = new_rows if full else jax.tree.map(
        lambda a, v: a.at[index].set(v), clients, new_rows)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 mean, weighted_mean(uploads, weights))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 new_clients, want_clients)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)


def test_train_in_place_needs_a_loop_strategy():
    with pytest.raises(ValueError, match="loop strategy"):
        cohort.train_in_place(_member, {}, (jnp.zeros((2, 1)),), None,
                              jax.random.split(jax.random.key(0), 2), jnp.ones(2),
                              strategy="vmap")


def test_zero_weights_give_zeros_not_nans():
    a = jnp.ones((4, 3))
    b = jnp.ones((4,))
    mean, _ = cohort.client_map_mean(_fn, (a, b), jnp.zeros(4), shared=1.0,
                                     strategy="sequential")
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(mean))


def test_auto_follows_table_and_override(monkeypatch):
    monkeypatch.delenv("FEDJAX_SIM_STRATEGY", raising=False)
    assert cohort.resolve("auto") == cohort.AUTO_TABLE[jax.default_backend()]
    assert cohort.resolve("chunked", 5) == ("chunked", 5)
    monkeypatch.setenv("FEDJAX_SIM_STRATEGY", "chunked:4")
    assert cohort.resolve("auto") == ("chunked", 4)
    assert cohort.resolve("vmap") == ("vmap", 8)
    monkeypatch.setenv("FEDJAX_SIM_STRATEGY", "warp")
    with pytest.raises(ValueError, match="FEDJAX_SIM_STRATEGY"):
        cohort.resolve("auto")
    with pytest.raises(ValueError, match="client_strategy"):
        cohort.resolve("fastest")


@pytest.mark.parametrize("name", ["fedavg", "fedper"])
def test_strategies_give_equal_rounds(name):
    data = to_device(random_federated(seed=4, num_clients=7))
    model = make_model("mlp", data.input_shape, data.num_classes)
    results = []
    for strategy, chunk in (("vmap", 8), ("sequential", 8), ("chunked", 3)):
        alg = algorithms.make(name, model, local_epochs=2, batch_size=4, join_ratio=0.8,
                              client_strategy=strategy, chunk_size=chunk)
        state = alg.init(jax.random.key(0), data)
        round_fn = jax.jit(alg.round)
        for _ in range(2):
            state, metrics = round_fn(state, data)
        results.append((state.server, state.clients, metrics["train_loss"]))
    for other in results[1:]:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5),
                     other, results[0])


@pytest.mark.slow
def test_sweep_equals_separate_runs(tmp_path):
    from fedjax_sim.runner import run, sweep

    data = random_federated(seed=6, num_clients=5)
    model = make_model("mlp", data.input_shape, data.num_classes)
    hp = {"local_epochs": 1, "batch_size": 8, "join_ratio": 0.6}
    kwargs = {"seeds": [0, 1], "lrs": [0.05, 0.2], "rounds": 3, "eval_every": 3,
              "hparams": hp, "progress": False}
    summaries = sweep("fedper", model, data, output=tmp_path, rounds_per_call=3, **kwargs)
    assert [(s["seed"], s["lr"]) for s in summaries] == [(0, 0.05), (1, 0.05), (0, 0.2),
                                                          (1, 0.2)]
    for summary in (summaries[0], summaries[3]):  # (seed 0, lr 0.05) and (seed 1, lr 0.2)
        alg = algorithms.make("fedper", model, lr=summary["lr"], **hp)
        alone = run(alg, data, rounds=3, eval_every=3, seed=summary["seed"], progress=False)
        np.testing.assert_allclose(summary["client_accuracies"],
                                   alone.summary["client_accuracies"], atol=1e-9)
        assert summary["history"][-1]["train_loss"] == pytest.approx(
            alone.history[-1]["train_loss"], rel=1e-4)
    assert (tmp_path / "sweep.json").exists() and (tmp_path / "seed1_lr0.2").is_dir()
    # Different learning rates do give different models.
    assert summaries[0]["history"][-1]["train_loss"] != summaries[2]["history"][-1]["train_loss"]
    # A compiled loop over the configurations gives the vmapped results.
    looped = sweep("fedper", model, data, config_strategy="map", **kwargs)
    for a, b in zip(looped, summaries, strict=True):
        np.testing.assert_allclose(a["client_accuracies"], b["client_accuracies"], atol=1e-9)
        assert a["history"][-1]["train_loss"] == pytest.approx(b["history"][-1]["train_loss"],
                                                               rel=1e-4)


def test_cli_seed_sweep(tmp_path, capsys):
    import json

    from fedjax_sim.cli import main

    main(["run", "--algorithm", "fedavg", "--dataset", "digits", "--num-clients", "6",
          "--seeds", "0,1", "--sweep-lr", "0.05", "--rounds", "2", "--eval-every", "2",
          "--local-epochs", "1", "--no-progress", "--output", str(tmp_path)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    assert [(r["seed"], r["lr"]) for r in lines] == [(0, 0.05), (1, 0.05)]
    results = [json.loads(line) for line in
               (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["status"]) for r in results] == [(0, "complete"), (1, "complete")]
    assert all((tmp_path / r["path"] / "summary.json").is_file() for r in results)
    with pytest.raises(SystemExit):
        main(["run", "--seeds", "0,x", "--no-progress", "--output", str(tmp_path)])
