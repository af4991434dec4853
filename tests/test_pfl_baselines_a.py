"""Per-FedAvg, pFedMe, MOON and FedDyn against NumPy (or plain one-client-at-a-time JAX)
computations of their papers' update rules over two rounds of partial participation,
their degenerate settings, and the command line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_model, random_federated

from fedjax_sim import algorithms
from fedjax_sim.algorithms.pfedme import SAMPLE_STREAM
from fedjax_sim.cli import main
from fedjax_sim.core.cohort import sample_cohort
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

NAMES = ("perfedavg", "pfedme", "moon", "feddyn")
N_MAX = 16
# One full batch per epoch (batch size = the largest client), so that the batch order
# cannot matter; 3 of 5 clients a round.
COMMON = {"local_epochs": 2, "batch_size": N_MAX, "join_ratio": 0.6}


@pytest.fixture(scope="module")
def data():
    return to_device(random_federated(seed=3, num_clients=5, n_max=N_MAX))


def host(data):
    """Every client's real rows (x float64, y int) and its count."""
    x, y = np.asarray(data.train_x, np.float64), np.asarray(data.train_y)
    counts = np.asarray(data.train_counts)
    return [(x[k, :n], y[k, :n]) for k, n in enumerate(counts)], counts


def sampled(state, num_clients, size):
    """The cohort the skeleton draws in the next round of ``state`` (sorted)."""
    _, round_key = jax.random.split(state.key)
    cohort_key, _ = jax.random.split(round_key)
    index = sample_cohort(cohort_key, num_clients, size)
    return list(range(num_clients)) if index is None else sorted(np.asarray(index).tolist())


def softmax(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def grad(w, b, x, y):
    """Mean cross-entropy gradient of softmax regression (float64)."""
    p = softmax(x @ w + b)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(0)


def hessian_vector(w, b, x, y, vw, vb):
    """The derivative of ``grad`` at (w, b) in the direction (vw, vb)."""
    p = softmax(x @ w + b)
    dz = x @ vw + vb
    dp = p * (dz - np.sum(p * dz, -1, keepdims=True))
    return x.T @ dp / len(y), dp.mean(0)


def head(state_part):
    return (np.asarray(state_part["head"]["kernel"], np.float64),
            np.asarray(state_part["head"]["bias"], np.float64))


def assert_close(actual, expected, rtol=1e-4, atol=1e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


def assert_bitwise(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def differs(a, b):
    return not all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def rounds(alg, data, count, *, seed=0, hp=None):
    """The states after 0 .. ``count`` rounds and the metrics of each round."""
    values = alg.hp(**(hp or {}))
    step = jax.jit(alg.round_with)
    states, metrics = [jax.jit(alg.init_with)(jax.random.key(seed), data, values)], []
    for _ in range(count):
        state, m = step(states[-1], data, values)
        states.append(state)
        metrics.append(m)
    return states, metrics


# ---- registry and hyperparameters ---------------------------------------------------


def test_registered_with_traced_hyperparameters_and_abilities():
    for name in NAMES:
        assert name in algorithms.ALGORITHMS and not algorithms.uses_public(name)
    assert set(algorithms.traced_names("perfedavg")) >= {"lr", "perfedavg_beta"}
    assert set(algorithms.traced_names("pfedme")) >= {"pfedme_lambda", "pfedme_personal_lr",
                                                       "pfedme_beta"}
    assert "pfedme_k" not in algorithms.traced_names("pfedme")
    assert set(algorithms.traced_names("moon")) >= {"moon_mu", "moon_tau"}
    assert "feddyn_alpha" in algorithms.traced_names("feddyn")
    assert not algorithms.abilities("pfedme").clock
    assert algorithms.abilities("feddyn").clock
    assert not algorithms.abilities("feddyn").asynchronous
    assert algorithms.abilities("moon").asynchronous
    assert algorithms.abilities("perfedavg").asynchronous


@pytest.mark.parametrize("name, values, message", [
    ("perfedavg", {"perfedavg_beta": -0.1}, r"perfedavg_beta must be >= 0, got -0\.1"),
    ("perfedavg", {"perfedavg_variant": "so"}, "perfedavg_variant must be one of"),
    ("pfedme", {"pfedme_lambda": 0.0}, r"pfedme_lambda must be > 0, got 0\.0"),
    ("pfedme", {"pfedme_personal_lr": -1.0}, "pfedme_personal_lr must be > 0"),
    ("pfedme", {"pfedme_beta": 0.0}, "pfedme_beta must be > 0"),
    ("pfedme", {"pfedme_k": 0}, "pfedme_k must be a positive integer"),
    ("moon", {"moon_mu": -1.0}, "moon_mu must be >= 0"),
    ("moon", {"moon_tau": 0.0}, "moon_tau must be > 0"),
    ("feddyn", {"feddyn_alpha": 0.0}, r"feddyn_alpha must be > 0, got 0\.0"),
])
def test_bad_hyperparameters_are_refused_by_name(name, values, message):
    model = make_model("mlp", (6,), 4, hidden=(8,))
    with pytest.raises(ValueError, match=message):
        algorithms.make(name, model, **values)
    traced = {k: v for k, v in values.items() if k in algorithms.traced_names(name)}
    if traced:
        alg = algorithms.make(name, model)
        with pytest.raises(ValueError, match=message):
            alg.hp(**traced)


@pytest.mark.parametrize("name, shape", [("mlp", (6,)), ("cnn", (12, 12, 1))])
def test_moon_representation_is_the_input_of_the_head(name, shape):
    from fedjax_sim.algorithms.moon import head_input

    model = make_model(name, shape, 4)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    logits, z = jax.jit(head_input(model))(params, x)
    np.testing.assert_array_equal(logits, model.apply(params, x))
    np.testing.assert_allclose(z @ params["head"]["kernel"] + params["head"]["bias"], logits,
                               rtol=1e-5, atol=1e-6)
    if name == "mlp":  # the second hidden layer's ReLU output, exactly
        hidden = x
        for layer in ("fc1", "fc2"):
            hidden = jax.nn.relu(hidden @ params[layer]["kernel"] + params[layer]["bias"])
        np.testing.assert_array_equal(z, hidden)


def test_moon_refuses_a_model_without_a_dense_head():
    from fedjax_sim.models.base import Model

    model = Model("two_heads", (6,), 4, ("a", "b"), lambda key: {},
                  lambda p, x: x[:, :4])
    with pytest.raises(ValueError, match="MOON needs a model whose head is one dense layer"):
        algorithms.make("moon", model)


# ---- the papers' update rules, two rounds, partial participation ----------------------


def test_feddyn_follows_the_papers_rules_in_numpy(data):
    alpha, lr = 0.1, 0.2
    model = linear_model(6, 4)
    alg = algorithms.make("feddyn", model, **COMMON, lr=lr, feddyn_alpha=alpha)
    states, _ = rounds(alg, data, 2)
    clients, counts = host(data)
    total = counts.sum()
    w, b = head(states[0].server["params"])
    grad_w, grad_b = np.zeros((5, *w.shape)), np.zeros((5, *b.shape))
    h_w, h_b = np.zeros_like(w), np.zeros_like(b)
    for state in states[:-1]:
        members = sampled(state, 5, 3)
        trained = []
        for k in members:
            x, y = clients[k]
            tw, tb = w.copy(), b.copy()
            for _ in range(COMMON["local_epochs"]):
                gw, gb = grad(tw, tb, x, y)
                tw = tw - lr * (gw - grad_w[k] + alpha * (tw - w))
                tb = tb - lr * (gb - grad_b[k] + alpha * (tb - b))
            grad_w[k] -= alpha * (tw - w)  # Eq. 2
            grad_b[k] -= alpha * (tb - b)
            trained.append((tw, tb))
        p = counts[members] / counts[members].sum()
        mean_w = sum(pk * t[0] for pk, t in zip(p, trained, strict=True))
        mean_b = sum(pk * t[1] for pk, t in zip(p, trained, strict=True))
        share = counts[members].sum() / total
        h_w = h_w - alpha * share * (mean_w - w)
        h_b = h_b - alpha * share * (mean_b - b)
        w, b = mean_w - h_w / alpha, mean_b - h_b / alpha
    final = states[-1]
    assert_close(final.server["params"]["head"], {"bias": b, "kernel": w})
    assert_close(final.server["h"]["head"], {"bias": h_b, "kernel": h_w})
    assert_close(final.clients["grad"]["head"], {"bias": grad_b, "kernel": grad_w})
    # A client sampled in neither round kept its zero state.
    seen = set(sampled(states[0], 5, 3)) | set(sampled(states[1], 5, 3))
    for k in set(range(5)) - seen:
        assert not np.any(np.asarray(final.clients["grad"]["head"]["kernel"][k]))


def test_pfedme_follows_the_papers_rules_in_numpy(data):
    lam, personal_lr, beta, inner, lr = 5.0, 0.05, 0.7, 3, 0.1
    model = linear_model(6, 4)
    alg = algorithms.make("pfedme", model, **COMMON, lr=lr, pfedme_lambda=lam,
                          pfedme_personal_lr=personal_lr, pfedme_beta=beta, pfedme_k=inner)
    states, metrics = rounds(alg, data, 2)
    clients, counts = host(data)
    w, b = head(states[0].server["params"])
    theta = [None] * 5
    for state in states[:-1]:
        _, round_key = jax.random.split(state.key)
        chosen = sample_cohort(jax.random.fold_in(round_key, SAMPLE_STREAM), 5, 3)
        chosen = sorted(np.asarray(chosen).tolist())
        local_models = []
        for k in range(5):  # every client trains (Algorithm 1)
            x, y = clients[k]
            lw, lb, tw, tb = w.copy(), b.copy(), w.copy(), b.copy()
            for _ in range(COMMON["local_epochs"]):  # one local round per batch
                for _ in range(inner):
                    gw, gb = grad(tw, tb, x, y)
                    tw = tw - personal_lr * (gw + lam * (tw - lw))
                    tb = tb - personal_lr * (gb + lam * (tb - lb))
                lw = lw - lr * lam * (lw - tw)
                lb = lb - lr * lam * (lb - tb)
            local_models.append((lw, lb))
            theta[k] = (tw, tb)
        p = counts[chosen] / counts[chosen].sum()
        mean_w = sum(pk * local_models[k][0] for pk, k in zip(p, chosen, strict=True))
        mean_b = sum(pk * local_models[k][1] for pk, k in zip(p, chosen, strict=True))
        w, b = (1 - beta) * w + beta * mean_w, (1 - beta) * b + beta * mean_b
    final = states[-1]
    assert_close(final.server["params"]["head"], {"bias": b, "kernel": w})
    assert_close(final.clients["theta"]["head"],
                 {"bias": np.stack([t[1] for t in theta]),
                  "kernel": np.stack([t[0] for t in theta])})
    # Every client is evaluated on its personalized model.
    correct, _ = jax.jit(alg.evaluate)(final, data)
    tx, ty = np.asarray(data.test_x, np.float64), np.asarray(data.test_y)
    for k, (tw, tb) in enumerate(theta):
        t = int(data.test_counts[k])
        assert int(correct[k]) == int(np.sum(np.argmax(tx[k, :t] @ tw + tb, -1) == ty[k, :t]))
    assert np.isfinite(float(metrics[-1]["train_loss"]))


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_perfedavg_follows_the_papers_rules_in_numpy(data, variant):
    alpha, beta = 0.3, 0.2
    model = linear_model(6, 4)
    alg = algorithms.make("perfedavg", model, **COMMON, lr=alpha, perfedavg_beta=beta,
                          perfedavg_variant=variant)
    states, _ = rounds(alg, data, 2)
    clients, counts = host(data)
    w, b = head(states[0].server["params"])
    for state in states[:-1]:
        members = sampled(state, 5, 3)
        trained = []
        for k in members:
            x, y = clients[k]
            tw, tb = w.copy(), b.copy()
            for _ in range(COMMON["local_epochs"]):
                gw, gb = grad(tw, tb, x, y)
                mw, mb = grad(tw - alpha * gw, tb - alpha * gb, x, y)
                if variant == "hf":
                    hw, hb = hessian_vector(tw, tb, x, y, mw, mb)
                    mw, mb = mw - alpha * hw, mb - alpha * hb
                tw, tb = tw - beta * mw, tb - beta * mb
            trained.append((tw, tb))
        p = counts[members] / counts[members].sum()
        w = sum(pk * t[0] for pk, t in zip(p, trained, strict=True))
        b = sum(pk * t[1] for pk, t in zip(p, trained, strict=True))
    final = states[-1]
    assert_close(final.server["params"]["head"], {"bias": b, "kernel": w})
    # Evaluation: one gradient step of size alpha on the client's whole training set.
    correct, loss = jax.jit(alg.evaluate)(final, data)
    tx, ty = np.asarray(data.test_x, np.float64), np.asarray(data.test_y)
    for k, (x, y) in enumerate(clients):
        gw, gb = grad(w, b, x, y)
        t = int(data.test_counts[k])
        logits = tx[k, :t] @ (w - alpha * gw) + (b - alpha * gb)
        nll = -np.log(softmax(logits)[np.arange(t), ty[k, :t]])
        np.testing.assert_allclose(float(loss[k]), nll.sum(), rtol=1e-4)
        assert int(correct[k]) == int(np.sum(np.argmax(logits, -1) == ty[k, :t]))


def mlp_forward(params, x):
    """The mlp with one hidden layer: (representation, logits)."""
    z = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    return z, z @ params["head"]["kernel"] + params["head"]["bias"]


def test_moon_follows_the_papers_loss_one_client_at_a_time(data):
    mu, tau, lr = 2.0, 0.3, 0.1
    model = make_model("mlp", (6,), 4, hidden=(8,))
    alg = algorithms.make("moon", model, **COMMON, lr=lr, moon_mu=mu, moon_tau=tau)
    states, _ = rounds(alg, data, 2)
    x_all, y_all = np.asarray(data.train_x), np.asarray(data.train_y)
    counts = np.asarray(data.train_counts)

    def cosine(a, b):
        norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
        return jnp.sum(a * b, -1) / jnp.maximum(norms, 1e-8)

    def loss(params, glob, prev, x, y):
        z, logits = mlp_forward(params, x)
        z_glob, _ = mlp_forward(glob, x)
        z_prev, _ = mlp_forward(prev, x)
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
        pos, neg = cosine(z, z_glob) / tau, cosine(z, z_prev) / tau
        con = -jnp.log(jnp.exp(pos) / (jnp.exp(pos) + jnp.exp(neg)))  # Eq. 2
        return ce + mu * jnp.mean(con)  # Eq. 3

    step = jax.jit(jax.grad(loss))
    glob = jax.device_get(states[0].server["params"])
    prev = [glob] * 5
    for state in states[:-1]:
        members = sampled(state, 5, 3)
        trained = []
        for k in members:
            x, y = x_all[k, :counts[k]], y_all[k, :counts[k]]
            params = glob
            for _ in range(COMMON["local_epochs"]):
                grads = step(params, glob, prev[k], x, y)
                params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
            trained.append(params)
        for k, params in zip(members, trained, strict=True):
            prev[k] = params
        p = counts[members] / counts[members].sum()
        glob = jax.tree.map(lambda *ms, p=p: sum(pk * m for pk, m in zip(p, ms, strict=True)),
                            *trained)
    final = states[-1]
    assert_close(final.server["params"], glob)
    assert_close(final.clients["prev"], jax.tree.map(lambda *ps: np.stack(ps), *prev))


# ---- degenerate settings -----------------------------------------------------------


@pytest.fixture(scope="module")
def fedavg_runs(data):
    model = make_model("mlp", (6,), 4, hidden=(8,))
    runs = {}

    def get(join_ratio=0.6, lr=0.05):
        key = (join_ratio, lr)
        if key not in runs:
            alg = algorithms.make("fedavg", model, **{**COMMON, "join_ratio": join_ratio},
                                  lr=lr)
            runs[key] = rounds(alg, data, 2)
        return runs[key]

    return model, get


def test_moon_at_mu_zero_is_fedavg_bit_for_bit(data, fedavg_runs):
    model, fedavg = fedavg_runs
    avg, avg_metrics = fedavg()
    # mu = 0 everywhere: the contrastive term is compiled out.
    narrow = algorithms.make("moon", model, **COMMON, lr=0.05, moon_mu=0.0)
    states, metrics = rounds(narrow, data, 2)
    assert "moon_mu" not in narrow.hp()
    assert_bitwise((states[-1].server, metrics), (avg[-1].server, avg_metrics))
    # A traced 0 in a round built for other values adds 0 · ∇ℓ_con: the same models.
    wide = algorithms.make("moon", model, **COMMON, lr=0.05, cover=[{"moon_mu": 1.0}])
    traced, _ = rounds(wide, data, 2, hp={"moon_mu": 0.0})
    assert_close(traced[-1].server, jax.device_get(avg[-1].server), rtol=1e-5, atol=1e-6)
    pulled, _ = rounds(wide, data, 2, hp={"moon_mu": 1.0})
    assert differs(pulled[-1].server, avg[-1].server)


def test_pfedme_tends_to_fedavg_as_lambda_grows(data, fedavg_runs):
    # Full participation (the same training keys as FedAvg's), β = 1, K = 2 inner steps
    # of size 1/λ: λ (w − θ̃) → ∇f(w), so each local step tends to FedAvg's SGD step.
    model, fedavg = fedavg_runs
    avg, _ = fedavg(join_ratio=1.0, lr=0.05)
    alg = algorithms.make("pfedme", model, **{**COMMON, "join_ratio": 1.0}, lr=0.05,
                          pfedme_beta=1.0, pfedme_k=2,
                          cover=[{"pfedme_lambda": v, "pfedme_personal_lr": 1 / v}
                                 for v in (10.0, 1e3)])
    gaps = []
    for lam in (10.0, 1e3):
        states, _ = rounds(alg, data, 2, hp={"pfedme_lambda": lam,
                                             "pfedme_personal_lr": 1 / lam})
        gaps.append(max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
            jax.tree.leaves(states[-1].server), jax.tree.leaves(avg[-1].server), strict=True)))
    assert gaps[1] < 2e-4 and gaps[1] < gaps[0] / 20, gaps


def test_perfedavg_at_beta_zero_keeps_the_initial_model(data):
    alpha = 0.3
    model = linear_model(6, 4)
    alg = algorithms.make("perfedavg", model, **COMMON, lr=alpha, perfedavg_beta=0.0)
    states, _ = rounds(alg, data, 2)
    assert_close(states[-1].server, jax.device_get(states[0].server), rtol=1e-6, atol=1e-7)
    # Evaluation is one gradient step from the initial model.
    clients, _ = host(data)
    w, b = head(states[0].server["params"])
    correct, _ = jax.jit(alg.evaluate)(states[-1], data)
    tx, ty = np.asarray(data.test_x, np.float64), np.asarray(data.test_y)
    for k, (x, y) in enumerate(clients):
        gw, gb = grad(w, b, x, y)
        t = int(data.test_counts[k])
        want = np.argmax(tx[k, :t] @ (w - alpha * gw) + (b - alpha * gb), -1) == ty[k, :t]
        assert int(correct[k]) == int(want.sum())


def test_feddyn_as_alpha_vanishes_extrapolates_fedavgs_first_round(data, fedavg_runs):
    # α → 0: the clients train as FedAvg's (their state starts at 0, the prox term
    # vanishes), and θ¹ = mean − h¹/α = mean + (Σ_P p_k)(mean − θ⁰): not FedAvg.
    model, fedavg = fedavg_runs
    avg, _ = fedavg()
    alg = algorithms.make("feddyn", model, **COMMON, lr=0.05, feddyn_alpha=1e-6)
    states, _ = rounds(alg, data, 1)
    members = sampled(states[0], 5, 3)
    counts = np.asarray(data.train_counts, np.float64)
    share = counts[members].sum() / counts.sum()
    want = jax.tree.map(lambda m, x0: np.asarray(m, np.float64) + share * (
        np.asarray(m, np.float64) - np.asarray(x0, np.float64)),
        avg[1].server["params"], states[0].server["params"])
    assert_close(states[1].server["params"], want, rtol=1e-4, atol=1e-5)
    assert differs(states[1].server["params"], avg[1].server["params"])


# ---- the clock ---------------------------------------------------------------------


def test_clock_conditions_are_refused_or_run():
    from fedjax_sim.algorithms.base import clocked
    from fedjax_sim.core import system
    from fedjax_sim.core.clock import Clock

    model = make_model("mlp", (6,), 4, hidden=(8,))
    homog = system.homogeneous(5)
    pfedme = algorithms.make("pfedme", model, **COMMON)
    with pytest.raises(ValueError, match="algorithm pfedme cannot run under condition "
                                         "wait_all: every client trains every round"):
        algorithms.base.check_clock_support("pfedme", algorithms.abilities("pfedme"),
                                            "wait_all", False)
    with pytest.raises(ValueError, match="pfedme cannot run under condition deadline"):
        clocked(pfedme, Clock(homog, condition="deadline", deadline=1.0), 5)
    feddyn = algorithms.make("feddyn", model, **COMMON)
    with pytest.raises(ValueError, match="feddyn cannot run under the asynchronous "
                                         "condition fedbuff"):
        clocked(feddyn, Clock(homog, condition="fedbuff", buffer_size=2), 5)
    # A synchronous deadline nobody meets leaves FedDyn's server and client state as
    # they were.
    data = to_device(random_federated(seed=3, num_clients=5, n_max=N_MAX))
    timed = clocked(feddyn, Clock(homog, condition="deadline", deadline=1e-6), 5)
    start = timed.init(jax.random.key(0), data)
    state, metrics = jax.jit(timed.round)(start, data)
    assert int(metrics["aggregated"]) == 0
    assert_bitwise((state.server, state.clients), (start.server, start.clients))


# ---- the command line ----------------------------------------------------------------

TINY = ["--num-clients", "4", "--rounds", "2", "--eval-every", "2", "--local-epochs", "1",
        "--join-ratio", "0.5", "--no-progress"]


# pFedMe's round is built outside the standard skeleton's cohort: it runs by default; the
# others go through the same command in the compare test below.
@pytest.mark.parametrize("name", [
    "pfedme", *(pytest.param(n, marks=pytest.mark.slow) for n in NAMES if n != "pfedme")])
def test_runs_through_fedjax_sim_run(tmp_path, name):
    main(["run", "--algorithm", name, *TINY, "--output", str(tmp_path / name)])
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["status"] == "complete" and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["bytes_up"] > 0


def test_compare_runs_all_four_beside_fedavg(tmp_path):
    main(["compare", "--algorithms", ",".join(("fedavg", *NAMES)), "--seeds", "0", *TINY,
          "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "compare.json").read_text())
    for name in NAMES:
        assert 0.0 <= rows[name][0]["accuracy"] <= 1.0


SWEPT = {"perfedavg": "perfedavg_beta=0.001,0.01", "pfedme": "pfedme_lambda=5,15",
         "moon": "moon_mu=0.5,1", "feddyn": "feddyn_alpha=0.01,0.1"}


@pytest.mark.parametrize("name", [
    "moon", *(pytest.param(n, marks=pytest.mark.slow) for n in NAMES if n != "moon")])
def test_sweep_over_a_traced_hyperparameter_is_one_program(tmp_path, capsys, name):
    main(["sweep", "--algorithm", name, "--set", SWEPT[name], *TINY,
          "--output", str(tmp_path)])
    out = capsys.readouterr()
    assert "2 runs to do in 1 program" in out.out + out.err
    records = [json.loads(line) for line in
               (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and len({r["accuracy"] for r in records}) >= 1


# ---- the PyTorch reference (experiments/reference_pytorch_pfl_a.py) -------------------


@pytest.mark.slow
def test_pytorch_reference_takes_the_same_steps(tmp_path):
    # From fedjax-sim's initial weights and sample orders, the PyTorch loops of every
    # method reach the simulator's accuracy and its parameters to float32 rounding.
    pytest.importorskip("torch")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    spec = importlib.util.spec_from_file_location("reference_pytorch_pfl_a",
                                                  path / "reference_pytorch_pfl_a.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    partition = tmp_path / "partition.json"
    ref.draw_partition(partition)
    data = ref.load_data(partition)
    for method in ref.METHODS:
        row = ref.lockstep(method, data, seed=0, rounds=2)
        assert abs(row["fedjax"] - row["torch"]) < 1e-9, row  # the same test images
        assert row["max_abs_diff"] <= 1e-5 * max(1.0, row["max_abs_param"]), row
