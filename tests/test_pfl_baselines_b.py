"""FedRoD, FedProto, FedAMP and FedALA: each round against a plain one-client-at-a-time
JAX computation of the paper's rules (two or three rounds, partial participation), the
degenerate settings that equal FedAvg or Local, the options, the virtual clock, and the
command line (run, compare, sweep in one program, two devices)."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_model, random_federated, run_on_cpu_devices

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import clocked
from fedjax_sim.algorithms.fedamp import attention, cloud_model, squared_distances
from fedjax_sim.algorithms.fedrod import balanced_softmax_loss, head_features
from fedjax_sim.cli import main
from fedjax_sim.core import system
from fedjax_sim.core.clock import Clock
from fedjax_sim.core.cohort import cohort_size, sample_cohort
from fedjax_sim.kernels.aggregation import weighted_mean
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, to_device

NAMES = ("fedrod", "fedproto", "fedamp", "fedala")
K, CLASSES, JOIN = 5, 4, 0.6


def _data(seed=0):
    """Five clients, unequal sizes (23 rows at most), with classes missing on some: client
    0 holds labels {0, 1} only, client 1 {0, 1, 2}."""
    data = random_federated(seed=seed, num_clients=K, num_classes=CLASSES)
    y = np.array(data.train_y)
    y[0] %= 2
    y[1] %= 3
    return to_device(dataclasses.replace(data, train_y=y))


def _model():
    return make_model("mlp", (6,), CLASSES, hidden=(8,))


# One full batch per epoch (batch >= 23 rows): the batch order cannot matter.
FULL = dict(local_epochs=2, batch_size=32, lr=0.5, join_ratio=JOIN)


def features(p, x):
    return jax.nn.relu(x.reshape(x.shape[0], -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"])


def logits_of(p, x):
    return features(p, x) @ p["head"]["kernel"] + p["head"]["bias"]


def ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def rows(data, i):
    n = int(data.train_counts[i])
    return jnp.asarray(data.train_x[i, :n]), jnp.asarray(data.train_y[i, :n])


def cohort(state):
    """The cohort the skeleton draws from ``state`` (the round key is the cohort key)."""
    _, round_key = jax.random.split(state.key)
    index = sample_cohort(jax.random.split(round_key)[0], K, cohort_size(K, JOIN))
    return list(range(K)) if index is None else [int(i) for i in np.asarray(index)]


def sgd(params, grads, lr):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def mean_of(trees, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return jax.tree.map(lambda *leaves: sum(float(wi) * leaf for wi, leaf in
                                            zip(w, leaves, strict=True)), *trees)


def row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rounds(alg, data, count, seed=0):
    state = alg.init(jax.random.key(seed), data)
    step = jax.jit(alg.round)
    out = []
    for _ in range(count):
        out.append((state, cohort(state)))
        state, _ = step(state, data)
    return state, out


# --- The model split --------------------------------------------------------------------


def test_features_are_the_heads_input_and_the_logits_the_models():
    model = _model()
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    logits, z = head_features(model, "fedrod")(params, x)
    np.testing.assert_array_equal(logits, model.apply(params, x))
    np.testing.assert_allclose(z, features(params, x), rtol=1e-6, atol=1e-6)
    for other in (linear_model(6, 4), make_model("char_lstm", (10,), 20)):
        with pytest.raises(ValueError, match="needs a model whose classifier is one dense"):
            algorithms.make("fedproto", other)


def test_balanced_softmax_is_the_papers_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    y = np.array([0, 1, 1, 2, 0, 1])
    counts = np.array([5.0, 2.0, 1.0, 0.0], np.float32)
    w = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    for gamma in (1.0, 0.25):
        scaled = counts.astype(np.float64) ** gamma * np.exp(logits.astype(np.float64))
        want = -np.mean(np.log(scaled[np.arange(5), y[:5]] / scaled[:5].sum(1)))
        got = balanced_softmax_loss(logits, y, w, counts, gamma)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = -np.mean(jax.nn.log_softmax(logits[:5])[np.arange(5), y[:5]])
    np.testing.assert_allclose(balanced_softmax_loss(logits, y, w, counts, 0.0), plain,
                               rtol=1e-6)


# --- Each round against the paper's rules, one client at a time ---------------------------


def generic_loss(theta, x, y, offset):
    return ce(logits_of(theta, x) + offset, y)


def personal_loss(phead, theta, x, y):
    return ce(logits_of(theta, x) + features(theta, x) @ phead["kernel"] + phead["bias"], y)


def proto_loss(p, x, y, protos, seen, lam):
    z = features(p, x)
    target = jnp.where(seen[y][:, None], protos[y], jax.lax.stop_gradient(z))
    return ce(logits_of(p, x), y) + lam * jnp.mean((z - target) ** 2)


def combine(weights, models):
    """Σ_j weights_j models_j in float64, as float32 parameters."""
    return jax.tree.map(lambda *leaves: jnp.asarray(sum(
        w * np.asarray(leaf, np.float64) for w, leaf in zip(weights, leaves, strict=True)),
        jnp.float32), *models)


def amp_loss(w, x, y, u, pull):
    gap = sum(jnp.sum((a - b) ** 2) for a, b in
              zip(jax.tree.leaves(w), jax.tree.leaves(u), strict=True))
    return ce(logits_of(w, x), y) + pull / 2 * gap


def mixed(weights, gtop, ltop):
    return jax.tree.map(lambda a, g, l_: a * g + (1 - a) * l_, weights, gtop, ltop)


def top_loss(top, theta, x, y):
    return ce(logits_of({**theta, **top}, x), y)


def clipped_step(w, grad, gap, *, eta):
    return jnp.clip(w - eta * grad * gap, 0, 1)


def test_fedrod_rounds_follow_the_papers_rules():
    data, model, gamma = _data(), _model(), 1.0
    alg = algorithms.make("fedrod", model, **FULL, fedrod_gamma=gamma)
    state, history = rounds(alg, data, 2)
    theta = history[0][0].server["params"]
    phead = [row(history[0][0].clients["phead"], i) for i in range(K)]
    for _, members in history:
        uploads = []
        for i in members:
            x, y = rows(data, i)
            counts = jnp.bincount(y, length=CLASSES).astype(jnp.float32)
            offset = jnp.where(counts > 0, gamma * jnp.log(counts), -jnp.inf)
            th, ph = theta, phead[i]
            for _ in range(FULL["local_epochs"]):
                g_th = jax.grad(generic_loss)(th, x, y, offset)
                g_ph = jax.grad(personal_loss)(ph, th, x, y)
                th, ph = sgd(th, g_th, FULL["lr"]), sgd(ph, g_ph, FULL["lr"])
            uploads.append(th)
            phead[i] = ph
        theta = mean_of(uploads, [int(data.train_counts[i]) for i in members])
    close(state.server["params"], theta)
    close([row(state.clients["phead"], i) for i in range(K)], phead)
    # (R4): the personalized logits add the personal head to the global model's.
    x = jnp.asarray(data.test_x[2])
    z = features(theta, x)
    correct, _ = jax.jit(alg.evaluate)(state, data)
    want = logits_of(theta, x) + z @ phead[2]["kernel"] + phead[2]["bias"]
    n = int(data.test_counts[2])
    assert int(correct[2]) == int(np.sum(np.argmax(want[:n], 1) == data.test_y[2, :n]))


def test_fedproto_rounds_follow_the_papers_rules():
    data, model, lam = _data(), _model(), 0.7
    alg = algorithms.make("fedproto", model, **FULL, fedproto_lambda=lam)
    state, history = rounds(alg, data, 2)
    own = [row(history[0][0].clients["params"], i) for i in range(K)]
    protos, seen = np.zeros((CLASSES, 8), np.float32), np.zeros(CLASSES, bool)
    for _, members in history:
        local = {}
        for i in members:
            x, y = rows(data, i)
            p = own[i]
            for _ in range(FULL["local_epochs"]):
                grads = jax.grad(proto_loss)(p, x, y, jnp.asarray(protos), jnp.asarray(seen),
                                             lam)
                p = sgd(p, grads, FULL["lr"])
            own[i] = p
            z = np.asarray(features(p, x))
            local[i] = {c: z[np.asarray(y) == c].mean(0) for c in range(CLASSES)
                        if np.any(np.asarray(y) == c)}
        for c in range(CLASSES):
            holders = [local[i][c] for i in members if c in local[i]]
            if holders:
                protos[c], seen[c] = np.mean(holders, 0), True
    close([row(state.clients["params"], i) for i in range(K)], own)
    np.testing.assert_array_equal(state.server["seen"], seen)
    np.testing.assert_allclose(state.server["protos"], protos, rtol=1e-5, atol=1e-6)
    # (R4): the nearest global prototype.
    x, n = jnp.asarray(data.test_x[3]), int(data.test_counts[3])
    z = np.asarray(features(own[3], x))[:n]
    d = ((z[:, None, :] - protos[None]) ** 2).sum(-1)
    d[:, ~seen] = np.inf
    correct, _ = jax.jit(alg.evaluate)(state, data)
    assert int(correct[3]) == int(np.sum(np.argmin(d, 1) == data.test_y[3, :n]))


def test_fedproto_sample_weighting_weighs_prototypes_by_class_counts():
    local = jnp.array([[[1.0, 0.0], [2.0, 2.0]], [[3.0, 4.0], [0.0, 0.0]],
                       [[9.0, 9.0], [9.0, 9.0]]])
    counts = jnp.array([[1.0, 2.0], [3.0, 0.0], [5.0, 5.0]])
    member = jnp.array([True, True, False])  # the third upload does not count
    previous, seen = jnp.full((2, 2), 7.0), jnp.array([False, True])
    from fedjax_sim.algorithms.fedproto import aggregate_prototypes

    by_clients, now = aggregate_prototypes(local, counts, member, previous, seen,
                                           weighting="clients")
    np.testing.assert_allclose(by_clients, [[2.0, 2.0], [2.0, 2.0]])
    by_samples, _ = aggregate_prototypes(local, counts, member, previous, seen,
                                         weighting="samples")
    np.testing.assert_allclose(by_samples, [[2.5, 3.0], [2.0, 2.0]])
    assert now.tolist() == [True, True]
    none, still = aggregate_prototypes(local, counts, jnp.zeros(3, bool), previous, seen,
                                       weighting="clients")
    np.testing.assert_array_equal(none, previous)
    assert still.tolist() == [False, True]


def test_fedamp_rounds_follow_the_papers_rules():
    data, model = _data(), _model()
    alpha, lam, sigma = 0.05, 0.2, 0.5
    alg = algorithms.make("fedamp", model, **FULL, fedamp_alpha=alpha, fedamp_lambda=lam,
                          fedamp_sigma=sigma)
    state, history = rounds(alg, data, 3)
    models = [row(history[0][0].clients["params"], i) for i in range(K)]
    for _, members in history:
        flat = np.stack([np.concatenate([np.ravel(a) for a in jax.tree.leaves(m)])
                         for m in models]).astype(np.float64)
        d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
        xi = alpha * np.exp(-d / sigma) / sigma
        np.fill_diagonal(xi, 0.0)
        np.fill_diagonal(xi, 1.0 - xi.sum(1))
        new = list(models)
        for i in members:
            x, y = rows(data, i)
            u = combine(xi[i], models)
            w = u
            for _ in range(FULL["local_epochs"]):
                w = sgd(w, jax.grad(amp_loss)(w, x, y, u, lam / alpha), FULL["lr"])
            new[i] = w
        models = new
    close([row(state.clients["params"], i) for i in range(K)], models, rtol=1e-4, atol=1e-5)
    # The rounds did pass messages: some attention weight between clients is not tiny.
    grown = squared_distances(state.clients["params"])
    assert float(jnp.max(attention(grown, alpha, sigma) - jnp.diag(jnp.diag(
        attention(grown, alpha, sigma))))) > 1e-3


def test_attention_kernel_against_numpy():
    rng = np.random.default_rng(3)
    tree = {"a": rng.normal(size=(6, 3, 4)).astype(np.float32) + 5.0,
            "b": rng.normal(size=(6, 2)).astype(np.float32)}
    flat = np.concatenate([tree["a"].reshape(6, -1), tree["b"]], 1).astype(np.float64)
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    got = squared_distances(jax.tree.map(jnp.asarray, tree))
    np.testing.assert_allclose(got, d, rtol=1e-5, atol=1e-4)
    assert np.all(np.diag(np.asarray(got)) == 0)
    xi = np.asarray(attention(got, 0.1, 4.0))
    np.testing.assert_allclose(xi.sum(1), 1.0, rtol=1e-6)
    want = 0.1 * np.exp(-d / 4.0) / 4.0
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(xi[off], want[off], rtol=1e-4)
    u = cloud_model(jnp.asarray(xi[2]), jax.tree.map(jnp.asarray, tree))
    np.testing.assert_allclose(u["b"], xi[2] @ tree["b"].astype(np.float64), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("layers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_fedala_rounds_follow_the_papers_rules(layers):
    data, model = _data(), _model()
    eta, memory, threshold, cap = 1.0, 2, 0.01, 6
    alg = algorithms.make("fedala", model, **FULL, fedala_eta=eta, fedala_layers=layers,
                          fedala_sample_ratio=1.0, fedala_num_pre_loss=memory,
                          fedala_threshold=threshold, fedala_max_start_epochs=cap)
    state, history = rounds(alg, data, 3)
    top = ("fc1", "head")[-layers:]
    theta = history[0][0].server["params"]
    own = [row(history[0][0].clients["params"], i) for i in range(K)]
    weights = [{name: jax.tree.map(jnp.ones_like, theta[name]) for name in top}
               for _ in range(K)]
    started = [False] * K
    passes_seen = []
    for _, members in history:
        uploads = []
        for i in members:
            x, y = rows(data, i)
            same = all(np.array_equal(a, b) for a, b in zip(
                jax.tree.leaves(own[i]), jax.tree.leaves(theta), strict=True))
            if same:
                start = theta
            else:
                gtop = {name: theta[name] for name in top}
                ltop = {name: own[i][name] for name in top}
                gap = jax.tree.map(jnp.subtract, gtop, ltop)
                losses, w = [], weights[i]
                while True:
                    loss, g = jax.value_and_grad(top_loss)(mixed(w, gtop, ltop), theta, x, y)
                    w = jax.tree.map(functools.partial(clipped_step, eta=eta), w, g, gap)
                    losses.append(float(loss))
                    if started[i] or len(losses) >= cap:
                        break
                    if len(losses) > memory and np.std(losses[-memory:]) < threshold:
                        break
                passes_seen.append(len(losses))
                weights[i], started[i] = w, True
                start = {**theta, **mixed(w, gtop, ltop)}
            p = start
            for _ in range(FULL["local_epochs"]):
                p = sgd(p, jax.grad(top_loss)(p, {}, x, y), FULL["lr"])
            own[i] = p
            uploads.append(p)
        theta = mean_of(uploads, [int(data.train_counts[i]) for i in members])
    # Both phases happened: start phases of several passes and single later passes.
    assert max(passes_seen) > 1 and 1 in passes_seen
    close(state.server["params"], theta, rtol=1e-4, atol=1e-6)
    close([row(state.clients["params"], i) for i in range(K)], own, rtol=1e-4, atol=1e-6)
    close([row(state.clients["weights"], i) for i in range(K)], weights, rtol=1e-4,
          atol=1e-6)
    assert np.asarray(state.clients["started"]).tolist() == started


def test_fedala_samples_a_random_floor_share_of_the_real_rows():
    from fedjax_sim.algorithms.fedala import sample_order, sample_size

    for ratio, n, want in ((0.7, 10, 7), (0.8, 5, 4), (0.01, 5, 1), (1.0, 23, 23),
                           (0.3, 100, 30)):
        got = sample_size(jnp.float32(ratio), jnp.int32(n))
        assert int(got) == want == max(1, int(ratio * n)), (ratio, n)
    orders = [np.asarray(sample_order(jax.random.key(s), jnp.int32(6), 9).order[0])
              for s in range(4)]
    for order in orders:  # the 6 real rows first, in a random order, padding last
        assert sorted(order[:6]) == list(range(6)) and sorted(order[6:]) == [6, 7, 8]
    assert len({tuple(o[:6]) for o in orders}) > 1


# --- Degenerate settings -------------------------------------------------------------------

# Random batch orders (batch 8 < client sizes) and momentum: the equalities are step for step.
MIXED = dict(local_epochs=2, batch_size=8, lr=0.2, momentum=0.5, join_ratio=JOIN)


def test_fedrod_at_gamma_zero_trains_the_global_model_as_fedavg():
    data, model = _data(), _model()
    fedavg = algorithms.make("fedavg", model, **MIXED)
    fedrod = algorithms.make("fedrod", model, **MIXED, fedrod_gamma=0.0)
    a, _ = rounds(fedavg, data, 2)
    b, _ = rounds(fedrod, data, 2)
    equal(a.server["params"], b.server["params"])
    # With γ = 1 the generic model is another one.
    c, _ = rounds(algorithms.make("fedrod", model, **MIXED), data, 2)
    assert not np.array_equal(c.server["params"]["head"]["bias"],
                              a.server["params"]["head"]["bias"])


def test_fedproto_at_lambda_zero_trains_as_local():
    data, model = _data(), _model()
    local_state, _ = rounds(algorithms.make("local", model, **MIXED), data, 2)
    proto_state, _ = rounds(algorithms.make("fedproto", model, **MIXED,
                                            fedproto_lambda=0.0), data, 2)
    equal(local_state.clients["params"], proto_state.clients["params"])
    # The prototypes still travel (and with λ > 0 change the training).
    assert bool(jnp.all(proto_state.server["seen"]))
    other, _ = rounds(algorithms.make("fedproto", model, **MIXED), data, 2)
    assert not np.array_equal(other.clients["params"]["head"]["bias"],
                              local_state.clients["params"]["head"]["bias"])


def test_fedamp_with_uniform_attention_follows_fedavg():
    # Equal client sizes, full participation, no proximal pull, σ far above every
    # distance and α = σ / K: ξ = 1/K everywhere, u = the plain mean of all models, so the
    # clients' mean model is FedAvg's global model round after round.
    data = random_federated(seed=1, num_clients=4)
    data = to_device(dataclasses.replace(
        data, train_counts=np.full(4, data.train_x.shape[1], np.int32)))
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=(8,))
    common = dict(local_epochs=2, batch_size=8, lr=0.2, join_ratio=1.0)
    sigma = 1e30
    fedamp = algorithms.make("fedamp", model, **common, fedamp_alpha=sigma / 4,
                             fedamp_sigma=sigma, fedamp_lambda=0.0)
    fedavg = algorithms.make("fedavg", model, **common)
    a, _ = rounds(fedavg, data, 3)
    b, _ = rounds(fedamp, data, 3)
    xi = attention(squared_distances(b.clients["params"]), sigma / 4, sigma)
    np.testing.assert_allclose(xi, np.full((4, 4), 0.25), rtol=1e-6)
    close(weighted_mean(b.clients["params"], jnp.ones(4)), a.server["params"], rtol=1e-5,
          atol=1e-6)
    # The message of uniform attention is the mean the FedAvg server computes.
    close(cloud_model(jnp.full(4, 0.25), b.clients["params"]),
          weighted_mean(b.clients["params"], jnp.ones(4)), rtol=1e-6, atol=1e-7)


def test_fedala_with_its_weights_fixed_at_one_is_fedavg():
    data, model = _data(), _model()
    fedavg = algorithms.make("fedavg", model, **MIXED)
    fedala = algorithms.make("fedala", model, **MIXED, fedala_eta=0.0)
    a, _ = rounds(fedavg, data, 3)
    b, _ = rounds(fedala, data, 3)
    equal(a.server["params"], b.server["params"])
    np.testing.assert_array_equal(b.clients["weights"]["head"]["kernel"], 1.0)
    # Learned weights move away from 1 and change the global model.
    c, _ = rounds(algorithms.make("fedala", model, **MIXED), data, 3)
    assert float(jnp.min(c.clients["weights"]["head"]["kernel"])) < 1.0
    assert not np.array_equal(c.server["params"]["head"]["bias"],
                              a.server["params"]["head"]["bias"])


# --- Options, traced values, the clock -------------------------------------------------------


@pytest.mark.parametrize("name, option, value, message", [
    ("fedrod", "fedrod_gamma", -0.5, "fedrod_gamma must be >= 0, got -0.5"),
    ("fedproto", "fedproto_lambda", -1.0, "fedproto_lambda must be >= 0"),
    ("fedproto", "fedproto_eval", "knn", "fedproto_eval must be one of"),
    ("fedproto", "fedproto_weighting", "x", "fedproto_weighting must be one of"),
    ("fedamp", "fedamp_alpha", 0.0, "fedamp_alpha must be > 0, got 0.0"),
    ("fedamp", "fedamp_sigma", float("inf"), "fedamp_sigma must be a finite number > 0"),
    ("fedamp", "fedamp_lambda", -0.1, "fedamp_lambda must be >= 0"),
    ("fedala", "fedala_sample_ratio", 1.5, r"fedala_sample_ratio must be in \(0, 1\]"),
    ("fedala", "fedala_sample_ratio", 0.0, r"fedala_sample_ratio must be in \(0, 1\]"),
    ("fedala", "fedala_eta", -1.0, "fedala_eta must be >= 0"),
    ("fedala", "fedala_layers", 0, "fedala_layers must be a positive integer"),
    ("fedala", "fedala_layers", 3, r"fedala_layers must be at most the model's number of "
                                   r"layers \(2: fc1, head\), got 3"),
    ("fedala", "fedala_threshold", 0.0, "fedala_threshold must be > 0"),
    ("fedala", "fedala_num_pre_loss", 0, "fedala_num_pre_loss must be a positive integer"),
])
def test_bad_options_name_themselves_and_their_range(name, option, value, message):
    with pytest.raises(ValueError, match=message):
        algorithms.make(name, _model(), **{option: value})


OTHER = {"fedrod_gamma": 0.5, "fedproto_lambda": 0.3, "fedamp_alpha": 0.02,
         "fedamp_lambda": 0.05, "fedamp_sigma": 2.0, "fedala_eta": 0.5,
         "fedala_sample_ratio": 0.6, "fedala_threshold": 0.05}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "fedamp" else
                                               pytest.mark.slow) for n in NAMES])
def test_traced_values_take_effect_in_one_compiled_round(name):
    data, model = _data(), _model()
    own = [n for n in algorithms.traced_names(name) if n in OTHER]
    values = {n: OTHER[n] for n in own}
    common = dict(local_epochs=1, batch_size=8, join_ratio=JOIN)
    alg = algorithms.make(name, model, **common)
    built = algorithms.make(name, model, **common, **values)
    round_with = jax.jit(alg.round_with)
    key = jax.random.key(2)
    state = alg.init(key, data)
    equal(round_with(state, data, alg.hp())[0].clients, jax.jit(alg.round)(state, data)[0]
          .clients)
    got, _ = round_with(state, data, alg.hp(**values))
    want, _ = jax.jit(built.round)(built.init(key, data), data)
    equal((got.server, got.clients), (want.server, want.clients))
    with pytest.raises(ValueError, match=own[0]):
        alg.hp(**{own[0]: -1.0})


@pytest.mark.parametrize("name", ["fedamp", "fedproto"])
def test_asynchronous_conditions_are_refused_where_uploads_are_not_models(name):
    homog = system.homogeneous(K)
    alg = algorithms.make(name, _model(), **MIXED)
    with pytest.raises(ValueError, match=f"{name} cannot run under the asynchronous "
                                         "condition fedbuff"):
        clocked(alg, Clock(homog, condition="fedbuff"), K)


@pytest.mark.parametrize("name, condition", [
    pytest.param("fedrod", "fedbuff", marks=pytest.mark.slow),
    pytest.param("fedala", "fedasync", marks=pytest.mark.slow),
    ("fedproto", "deadline"),
    pytest.param("fedamp", "deadline", marks=pytest.mark.slow)])
def test_the_clock_runs_them(name, condition):
    data = _data()
    alg = algorithms.make(name, _model(), **MIXED)
    speeds = np.array([1.0, 1.0, 1.0, 100.0, 100.0])  # two stragglers
    sysm = system.from_arrays(K, speed=speeds, up=1e9, down=1e9)
    extra = {"deadline": 30.0} if condition == "deadline" else {}
    timed = clocked(alg, Clock(sysm, condition=condition, **extra), K)
    result = run(timed, data, rounds=3, progress=False)
    assert result.summary["status"] == "complete"
    assert 0.0 <= result.summary["accuracy"] <= 1.0


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "fedala" else
                                               pytest.mark.slow) for n in NAMES])
def test_resume_equals_the_uninterrupted_run(name, tmp_path):
    data = _data()
    alg = algorithms.make(name, _model(), **MIXED)
    full = run(alg, data, rounds=4, eval_every=1, progress=False, output=tmp_path / "full")
    run(alg, data, rounds=2, eval_every=1, progress=False, output=tmp_path / "cut",
        checkpoint_every=2)
    resumed = run(alg, data, rounds=4, eval_every=1, progress=False, output=tmp_path / "cut",
                  checkpoint_every=2, resume=True)
    equal((resumed.state.server, resumed.state.clients), (full.state.server, full.state.clients))
    assert [h["accuracy"] for h in resumed.history] == [h["accuracy"] for h in full.history]


# --- The command line ------------------------------------------------------------------------

TINY = ["--num-clients", "4", "--rounds", "2", "--eval-every", "1", "--local-epochs", "1",
        "--no-progress"]
SWEPT = {"fedrod": ("fedrod_gamma", "0,1"), "fedproto": ("fedproto_lambda", "0.5,1"),
         "fedamp": ("fedamp_lambda", "0.01,0.1"), "fedala": ("fedala_eta", "0.5,1")}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "fedamp" else
                                               pytest.mark.slow) for n in NAMES])
def test_run_and_a_sweep_over_a_traced_value_in_one_program(name, tmp_path, capsys):
    option, values = SWEPT[name]
    first = values.split(",")[0]
    main(["run", "--algorithm", name, f"--{option.replace('_', '-')}", first, *TINY,
          "--output", str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and 0 <= summary["accuracy"] <= 1
    capsys.readouterr()
    main(["sweep", "--algorithm", name, "--set", f"{option}={values}", "--seeds", "0",
          *TINY, "--output", str(tmp_path / "sweep")])
    assert "2 runs to do in 1 program" in capsys.readouterr().err
    records = [json.loads(line) for line in
               (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    by = {r["values"][option]: r["accuracy"] for r in records}
    assert by[float(first)] == summary["accuracy"]  # the swept value equals its own run


@pytest.mark.slow
def test_compare_runs_the_four_beside_fedavg(tmp_path):
    out = tmp_path / "compare"
    main(["compare", "--algorithms", "fedavg," + ",".join(NAMES), "--seeds", "0",
          *TINY, "--output", str(out)])
    records = {r["algorithm"]: r for r in map(
        json.loads, (out / "results.jsonl").read_text().splitlines())}
    for name in ("fedavg", *NAMES):
        assert records[name]["status"] == "complete", name
        assert 0 <= records[name]["accuracy"] <= 1 and "ipr" in records[name], name
    # Prototypes, not models, travel.
    assert 0 < records["fedproto"]["bytes_up"] < records["fedavg"]["bytes_up"]


SHARDED = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from conftest import random_federated
from fedjax_sim import algorithms
from fedjax_sim.models import make_model
from fedjax_sim.runner import run
data = random_federated(seed=0, num_clients=4)
model = make_model("mlp", data.input_shape, data.num_classes, hidden=(8,))
out = {{}}
for name in {names!r}:
    alg = algorithms.make(name, model, local_epochs=1, batch_size=8, join_ratio=0.5)
    runs = {{}}
    for devices in (1, None):
        r = run(alg, data, rounds=2, eval_every=2, progress=False, devices=devices)
        runs[str(devices)] = {{"devices": r.summary["devices"], "leaves": [
            np.asarray(x, np.float64).ravel().tolist()
            for x in jax.tree.leaves((r.state.server, r.state.clients))]}}
    out[name] = runs
print(json.dumps(out))
"""


@pytest.mark.slow
def test_two_devices_equal_one():
    from conftest import TESTS_DIR

    out = run_on_cpu_devices(SHARDED.format(tests=TESTS_DIR, names=list(NAMES)), devices=2)
    for name in NAMES:
        one, two = out[name]["1"], out[name]["None"]
        assert one["devices"] == 1 and two["devices"] == 2, name
        for a, b in zip(one["leaves"], two["leaves"], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
