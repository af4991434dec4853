"""FedProx, SCAFFOLD and FedOpt (the baselines written as plug-ins) against FedAvg and
against NumPy computations of their papers' update rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_model, random_federated

from fedjax_sim import algorithms
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

COMMON = {"local_epochs": 1, "batch_size": 8, "join_ratio": 0.6, "lr": 0.05}


@pytest.fixture(scope="module")
def tiny():
    data = to_device(random_federated(seed=3, num_clients=5, n_max=16))
    return data, make_model("mlp", (6,), 4, hidden=(8,))


_BUILT: dict = {}
_RUNS: dict = {}


def built(name, tiny, **kw):
    """The algorithm and its jitted init_with / round_with, compiled once per setting."""
    key = (name, repr(sorted(kw.items())))
    if key not in _BUILT:
        alg = algorithms.make(name, tiny[1], **{**COMMON, **kw})
        _BUILT[key] = alg, jax.jit(alg.init_with), jax.jit(alg.round_with)
    return _BUILT[key]


def run(name, tiny, rounds, *, hp=None, **kw):
    """The algorithm, state and metrics after ``rounds`` rounds (at ``hp`` overrides)."""
    key = (name, rounds, repr(sorted((hp or {}).items())), repr(sorted(kw.items())))
    if key not in _RUNS:
        data = tiny[0]
        alg, init_with, round_with = built(name, tiny, **kw)
        values = alg.hp(**(hp or {}))
        state, metrics = init_with(jax.random.key(7), data, values), []
        for _ in range(rounds):
            state, m = round_with(state, data, values)
            metrics.append(m)
        _RUNS[key] = alg, state, metrics
    return _RUNS[key]


def assert_bitwise(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def differs(a, b):
    return not all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_baselines_are_registered():
    for name in ("fedprox", "scaffold", "fedopt"):
        assert name in algorithms.ALGORITHMS and not algorithms.uses_public(name)
    assert "mu" in algorithms.traced_names("fedprox")
    assert set(algorithms.traced_names("fedopt")) >= {"server_lr", "beta1", "beta2", "tau",
                                                       "server_momentum"}
    with pytest.raises(ValueError, match="built-in"):
        algorithms.register("fedprox", lambda model, **hp: None, ())


def test_fedprox_mu_zero_is_fedavg_bit_for_bit(tiny):
    _, avg, avg_metrics = run("fedavg", tiny, 2)
    # mu = 0 everywhere: the proximal term is compiled out.
    _, narrow, narrow_metrics = run("fedprox", tiny, 2, mu=0.0)
    assert_bitwise((narrow.server, narrow_metrics), (avg.server, avg_metrics))
    # A traced mu of 0 in a round built for other values too adds 0 · (w - w_g).
    alg, traced, traced_metrics = run("fedprox", tiny, 2, cover=[{"mu": 0.5}], hp={"mu": 0.0})
    assert "mu" in alg.hp()
    assert_bitwise((traced.server, traced_metrics), (avg.server, avg_metrics))
    _, pulled, _ = run("fedprox", tiny, 2, cover=[{"mu": 0.5}], hp={"mu": 0.5})
    assert differs(pulled.server, avg.server)


def test_fedprox_step_is_gradient_plus_proximal_term():
    from fedjax_sim.algorithms.fedprox import proximal

    grads = {"w": jnp.array([1.0, -2.0])}
    params, anchor = {"w": jnp.array([0.5, 0.5])}, {"w": jnp.array([1.5, -0.5])}
    tx = proximal(0.3, anchor)
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(out["w"], [1.0 + 0.3 * -1.0, -2.0 + 0.3 * 1.0], rtol=1e-6)


def test_scaffold_first_round_is_fedavg(tiny):
    data, _ = tiny
    _, avg, avg_metrics = run("fedavg", tiny, 1)
    alg, sc, sc_metrics = run("scaffold", tiny, 1)
    assert_bitwise((sc.server["params"], sc_metrics), (avg.server["params"], avg_metrics))
    evaluate = jax.jit(alg.evaluate)
    assert_bitwise(evaluate(sc, data), evaluate(sc.replace(server=avg.server), data))
    # The control variates moved, so the second round is no longer FedAvg's.
    assert differs(sc.server["control"], jax.tree.map(jnp.zeros_like, sc.server["control"]))
    _, avg2, _ = run("fedavg", tiny, 2)
    _, sc2, _ = run("scaffold", tiny, 2)
    assert differs(sc2.server["params"], avg2.server["params"])


def test_scaffold_keeps_c_the_weighted_mean_of_the_client_variates(tiny):
    data, _ = tiny
    _, state, _ = run("scaffold", tiny, 2)
    p = np.asarray(data.train_counts, np.float64) / np.sum(data.train_counts)
    for c, c_i in zip(jax.tree.leaves(state.server["control"]),
                      jax.tree.leaves(state.clients["control"]), strict=True):
        np.testing.assert_allclose(c, np.tensordot(p, np.asarray(c_i, np.float64), 1),
                                   rtol=1e-4, atol=1e-6)


def _grad(w, b, x, y):
    """Mean cross-entropy gradient of softmax regression, float64."""
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(0)


def test_scaffold_matches_the_papers_update_in_numpy():
    # Equal client sizes (the paper's uniform means) and full batches (so the batch order
    # cannot matter): 3 clients of 6 samples, 3 local epochs = K = 3 steps per round.
    rng = np.random.default_rng(0)
    k, n, dim, classes, epochs, lr, server_lr = 3, 6, 4, 3, 3, 0.2, 0.7
    x = rng.normal(size=(k, n, dim)).astype(np.float32)
    y = rng.integers(0, classes, (k, n)).astype(np.int32)
    counts = np.full(k, n, np.int32)
    data = to_device(FederatedData(x, y, counts, x[:, :2], y[:, :2], np.full(k, 2, np.int32),
                                   num_classes=classes, name="tiny"))
    model = linear_model(dim, classes)
    alg = algorithms.make("scaffold", model, local_epochs=epochs, batch_size=n, lr=lr,
                          server_lr=server_lr)
    state = alg.init(jax.random.key(0), data)
    w = np.asarray(state.server["params"]["head"]["kernel"], np.float64)
    b = np.asarray(state.server["params"]["head"]["bias"], np.float64)
    cw, cb = np.zeros_like(w), np.zeros_like(b)
    ciw, cib = np.zeros((k, *w.shape)), np.zeros((k, *b.shape))
    step = jax.jit(alg.round)
    for _ in range(2):
        state, _ = step(state, data)
        dys, dcs = [], []
        for i in range(k):
            yw, yb = w.copy(), b.copy()
            for _ in range(epochs):
                gw, gb = _grad(yw, yb, x[i].astype(np.float64), y[i])
                yw -= lr * (gw - ciw[i] + cw)
                yb -= lr * (gb - cib[i] + cb)
            new_w = ciw[i] - cw + (w - yw) / (epochs * lr)
            new_b = cib[i] - cb + (b - yb) / (epochs * lr)
            dys.append((yw - w, yb - b))
            dcs.append((new_w - ciw[i], new_b - cib[i]))
            ciw[i], cib[i] = new_w, new_b
        w = w + server_lr * np.mean([d[0] for d in dys], 0)
        b = b + server_lr * np.mean([d[1] for d in dys], 0)
        cw = cw + k / k * np.mean([d[0] for d in dcs], 0)
        cb = cb + k / k * np.mean([d[1] for d in dcs], 0)
    head = state.server["params"]["head"]
    np.testing.assert_allclose(head["kernel"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head["bias"], b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.server["control"]["head"]["kernel"], cw, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(state.clients["control"]["head"]["kernel"], ciw, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(state.clients["control"]["head"]["bias"], cib, rtol=1e-4,
                               atol=1e-6)


def test_scaffold_counts_only_a_clients_real_steps():
    from fedjax_sim.algorithms.scaffold import active_steps

    hp = {"local_steps": None, "local_epochs": 2, "batch_size": 8}
    np.testing.assert_array_equal(active_steps(hp, jnp.array([1, 8, 9, 23])), [2, 2, 4, 6])
    assert float(active_steps({**hp, "local_steps": 5}, jnp.array(3))) == 5.0


def test_fedopt_sgd_at_server_lr_1_is_fedavg_bit_for_bit(tiny):
    _, avg, avg_metrics = run("fedavg", tiny, 2)
    _, opt, opt_metrics = run("fedopt", tiny, 2, server_opt="sgd", server_lr=1.0)
    assert_bitwise((opt.server["params"], opt_metrics), (avg.server["params"], avg_metrics))
    _, slow, _ = run("fedopt", tiny, 2, hp={"server_lr": 0.5})
    assert differs(slow.server["params"], avg.server["params"])


@pytest.mark.slow
@pytest.mark.parametrize("server_opt", ["momentum", "yogi", "adagrad"])
def test_fedopt_other_server_optimizers_run_and_differ(tiny, server_opt):
    _, avg, _ = run("fedavg", tiny, 2)
    _, state, metrics = run("fedopt", tiny, 2, server_opt=server_opt, server_lr=0.1)
    assert np.isfinite(float(metrics[-1]["train_loss"]))
    assert differs(state.server["params"], avg.server["params"])


def test_fedopt_adam_is_one_numpy_adam_step_on_the_pseudo_gradient(tiny):
    data = tiny[0]
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 0.01
    values = {"server_lr": lr, "beta1": b1, "beta2": b2, "tau": tau}
    alg, state, _ = run("fedopt", tiny, 1, server_opt="adam", **values)
    # The same key, so the same cohort and client updates: FedAvg's new model is the mean.
    start = alg.init(jax.random.key(7), data)
    mean = run("fedavg", tiny, 1)[1].server["params"]
    for x0, m, new in zip(jax.tree.leaves(start.server["params"]), jax.tree.leaves(mean),
                          jax.tree.leaves(state.server["params"]), strict=True):
        g = np.asarray(x0, np.float64) - np.asarray(m, np.float64)
        mu, nu = (1 - b1) * g, (1 - b2) * g**2
        mu_hat, nu_hat = mu / (1 - b1), nu / (1 - b2)  # bias correction at step 1
        want = np.asarray(x0, np.float64) - lr * mu_hat / (np.sqrt(nu_hat) + tau)
        np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(new, m, atol=1e-6) or not np.any(g)
    # The traced values reach the server step: other values through the same round.
    other = run("fedopt", tiny, 1, server_opt="adam", **values, hp={"tau": 0.5})[1]
    assert differs(other.server["params"], state.server["params"])


def test_fedopt_refuses_an_unknown_server_optimizer(tiny):
    with pytest.raises(ValueError, match="server_opt must be one of"):
        algorithms.make("fedopt", tiny[1], server_opt="rmsprop")
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        algorithms.make("fedopt", tiny[1], beta2=1.0)


@pytest.mark.slow
def test_fedper_server_optimizer_on_the_shared_layers(tiny):
    from fedjax_sim.algorithms.partial import decoupled, plain_sgd

    data, model = tiny
    # The default (sgd at server_lr 1) is the plain mean of the shared layers, bit for bit.
    hp = algorithms.resolve("fedper", **COMMON)
    plain = decoupled("fedper", model, hp, model.head, plain_sgd(model))
    _, default, default_metrics = run("fedper", tiny, 2)
    state = plain.init(jax.random.key(7), data)
    metrics = []
    for _ in range(2):
        state, m = jax.jit(plain.round)(state, data)
        metrics.append(m)
    assert_bitwise((default.server, default.clients, default_metrics),
                   (state.server, state.clients, metrics))
    # Adam keeps its state for the shared layers only; the personal head stays where it was.
    _, adam, _ = run("fedper", tiny, 2, server_opt="adam", server_lr=0.05)
    assert set(adam.server) == {"params", "opt"}
    assert "head" not in adam.server["opt"][0].mu
    assert_bitwise(adam.server["params"]["head"], default.server["params"]["head"])
    assert differs(adam.server["params"], default.server["params"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedrep", "lg_fedavg"])
def test_fedrep_and_lg_fedavg_take_a_server_optimizer(tiny, name):
    _, default, _ = run(name, tiny, 2)
    _, adam, _ = run(name, tiny, 2, server_opt="adam", server_lr=0.05)
    assert set(adam.server) == {"params", "opt"} and set(default.server) == {"params"}
    assert differs(adam.server["params"], default.server["params"])
