"""The batched round against a plain per-client Python loop, epoch semantics, tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_federated, slow_unless

from fedjax_sim import algorithms
from fedjax_sim.core import local
from fedjax_sim.core.cohort import cohort_size, sample_cohort
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, to_device

HP = {"local_epochs": 2, "batch_size": 4, "lr": 0.1}


def reference_client(model, params, x, y, count, key, *, train_head=True, train_base=True):
    """One client's local SGD as a plain Python loop over its own (unpadded) batches."""
    index, weight, active = map(
        np.asarray, local.batch_schedule(key, count, x.shape[0], HP["batch_size"],
                                         epochs=HP["local_epochs"]))
    params = jax.tree.map(np.asarray, params)
    for rows, w, is_active in zip(index, weight, active, strict=True):
        if not is_active:
            continue
        rows = rows[w > 0]

        def loss(p, xb=x[rows], yb=y[rows]):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

        grads = jax.grad(loss)(params)
        params = {
            name: {
                leaf: np.asarray(value) - HP["lr"] * np.asarray(grads[name][leaf])
                * (train_head if name in model.head else train_base)
                for leaf, value in sub.items()
            }
            for name, sub in params.items()
        }
    return params


def round_keys(state, data, join_ratio):
    """The cohort and per-client keys a round derives from the state's key."""
    _, round_key = jax.random.split(state.key)
    cohort_key, train_key = jax.random.split(round_key)
    size = cohort_size(data.num_clients, join_ratio)
    index = sample_cohort(cohort_key, data.num_clients, size)
    index = np.arange(data.num_clients) if index is None else np.asarray(index)
    return index, jax.random.split(train_key, size)


def average(trees, weights):
    weights = np.asarray(weights, np.float64) / np.sum(weights)
    return jax.tree.map(lambda *leaves: sum(w * leaf for w, leaf in zip(weights, leaves,
                                                                         strict=True)), *trees)


# Each strategy once by default (full participation on vmap, a cohort on the loops); every
# pair with -m slow.
@pytest.mark.parametrize("strategy,join_ratio", [
    pytest.param(s, j, marks=() if (s, j) in (("vmap", 1.0), ("sequential", 0.6),
                                              ("chunked", 0.6)) else pytest.mark.slow)
    for j in (1.0, 0.6) for s in ("vmap", "sequential", "chunked")])
def test_fedavg_round_equals_python_loop(small_data, strategy, join_ratio):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    alg = algorithms.make("fedavg", model, client_strategy=strategy, chunk_size=2,
                          join_ratio=join_ratio, **HP)
    data = to_device(small_data)
    state = alg.init(jax.random.key(3), data)
    index, keys = round_keys(state, data, join_ratio)
    global_params = state.server["params"]
    trained = [
        reference_client(model, global_params, small_data.train_x[k], small_data.train_y[k],
                         small_data.train_counts[k], keys[i])
        for i, k in enumerate(index)
    ]
    expected = average(trained, small_data.train_counts[index])
    new_state, _ = jax.jit(alg.round)(state, data)
    chex_close(new_state.server["params"], expected)


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_fedper_round_equals_python_loop(small_data, strategy):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    alg = algorithms.make("fedper", model, client_strategy=strategy, join_ratio=0.6, **HP)
    data = to_device(small_data)
    state = alg.init(jax.random.key(1), data)
    # Give clients distinct heads so that a mix-up between clients would show.
    heads = jax.tree.map(lambda h: h + jnp.arange(h.shape[0]).reshape((-1,) + (1,) *
                                                                       (h.ndim - 1)) * 0.1,
                         state.clients["personal"])
    state = state.replace(clients={"personal": heads})
    index, keys = round_keys(state, data, 0.6)
    g = state.server["params"]
    trained = []
    for i, k in enumerate(index):
        start = {**{n: s for n, s in g.items() if n not in model.head},
                 **jax.tree.map(lambda h, k=k: h[k], heads)}
        trained.append(reference_client(model, start, small_data.train_x[k],
                                        small_data.train_y[k], small_data.train_counts[k],
                                        keys[i]))
    new_state, _ = jax.jit(alg.round)(state, data)
    expected_base = average([{n: s for n, s in t.items() if n not in model.head}
                             for t in trained], small_data.train_counts[index])
    chex_close({n: s for n, s in new_state.server["params"].items() if n not in model.head},
               expected_base)
    # Sampled clients keep their trained heads; the others keep theirs untouched.
    new_heads = new_state.clients["personal"]
    for k in range(small_data.num_clients):
        row = jax.tree.map(lambda h, k=k: h[k], new_heads)
        if k in index:
            i = list(index).index(k)
            chex_close(row, {n: trained[i][n] for n in model.head})
        else:
            chex_close(row, jax.tree.map(lambda h, k=k: h[k], heads))
    # The server's head is never touched.
    chex_close(new_state.server["params"]["head"], g["head"])


def chex_close(actual, expected, tol=2e-5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=tol, atol=tol), actual, expected)


def test_epoch_schedule_visits_each_sample_once_per_epoch():
    index, weight, active = map(np.asarray, local.batch_schedule(
        jax.random.key(0), jnp.int32(10), 16, 4, epochs=3))
    assert index.shape == (12, 4) and active.tolist() == [True] * 3 + [False] + [True] * 3 \
        + [False] + [True] * 3 + [False]
    for epoch in range(3):
        rows = index[epoch * 4:(epoch + 1) * 4][weight[epoch * 4:(epoch + 1) * 4] > 0]
        assert sorted(rows.tolist()) == list(range(10))


def test_fewer_samples_take_fewer_steps():
    # A client with 3 samples and batch 4 takes one step per epoch: after one epoch with
    # lr 0 on a loss that counts steps, its carry moved once.
    def step(carry, xb, yb, wb):
        return carry + 1, jnp.sum(wb)

    x = jnp.zeros((20, 2))
    y = jnp.zeros((20,), jnp.int32)
    for count, expected in ((3, 2), (20, 10), (9, 6)):
        carry, _ = local.scan_batches(step, 0, x, y, jnp.int32(count), jax.random.key(0),
                                      batch_size=4, epochs=2)
        assert int(carry) == expected


def test_round_traces_once_across_rounds(small_data):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    for name in ("fedavg", "fedper", "ditto"):
        alg = algorithms.make(name, model, local_epochs=1, batch_size=8, join_ratio=0.6)
        # The runner wraps the round in traced_once: a retrace would raise.
        result = run(alg, small_data, rounds=4, eval_every=2, progress=False)
        assert result.summary["rounds"] == 4 and len(result.history) == 2


def test_same_seed_same_result(small_data):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    alg = algorithms.make("fedavg", model, local_epochs=1, batch_size=8, join_ratio=0.6)
    a = run(alg, small_data, rounds=2, progress=False, seed=5).summary
    b = run(alg, small_data, rounds=2, progress=False, seed=5)
    c = run(alg, small_data, rounds=2, progress=False, seed=6)
    assert a["client_accuracies"] == b.summary["client_accuracies"]
    assert a["accuracy"] == b.summary["accuracy"]
    # Another seed draws another initialization and cohorts: other trained parameters.
    assert not all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(b.state.server), jax.tree.leaves(c.state.server), strict=True))


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    data = random_federated(seed=2)
    model = make_model("mlp", data.input_shape, data.num_classes)
    alg = algorithms.make("ditto", model, local_epochs=1, batch_size=8, join_ratio=0.6)
    full = run(alg, data, rounds=4, eval_every=1, progress=False, output=tmp_path / "full")
    run(alg, data, rounds=2, eval_every=1, progress=False, output=tmp_path / "cut",
        checkpoint_every=2)
    resumed = run(alg, data, rounds=4, eval_every=1, progress=False, output=tmp_path / "cut",
                  checkpoint_every=2, resume=True)
    chex_close(resumed.state.clients, full.state.clients, tol=0)
    chex_close(resumed.state.server, full.state.server, tol=0)
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in full.history]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


@pytest.mark.parametrize("name", slow_unless(algorithms.ALGORITHMS,
                                             ("fedavg", "fedobp", "apfl", "scaffold")))
def test_every_algorithm_runs_and_evaluates(small_data, name):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    alg = algorithms.make(name, model, local_epochs=2, batch_size=8, join_ratio=0.6)
    summary = run(alg, small_data, rounds=2, progress=False).summary
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert len(summary["client_accuracies"]) == small_data.num_clients
    up, _ = alg.comm_bytes(small_data)
    assert (up == 0) == (name == "local")
    assert summary["bytes_up"] == 2 * up


def test_traced_once_catches_a_retrace():
    from fedjax_sim.runner import traced_once

    f = jax.jit(traced_once(lambda x: x * 2, "double"))
    f(jnp.ones(3))
    f(jnp.ones(3) * 5)  # same shape: cached
    with pytest.raises(RuntimeError, match="traced again"):
        f(jnp.ones(4))
