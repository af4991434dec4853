"""FedOBP: limits (FedAvg, Local, FedPer), the batched round against a per-client loop,
exact quantile counts, data independence of the server-side scores, and bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from conftest import random_federated, slow_unless
from test_core import HP, average, chex_close, round_keys

from fedjax_sim import algorithms
from fedjax_sim.algorithms import fedobp
from fedjax_sim.core import local
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

RUN = {"local_epochs": 1, "batch_size": 8, "join_ratio": 0.6}


@pytest.fixture(scope="module")
def data():
    return random_federated(seed=4)


@pytest.fixture(scope="module")
def tiny():
    # 6 -> 16 -> 4: 180 elements in 4 leaves, small enough to check element by element.
    d = random_federated(seed=4)
    return d, make_model("mlp", d.input_shape, d.num_classes, hidden=(16,))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _row(tree, k):
    return jax.tree.map(lambda a: np.asarray(a)[k], tree)


def _evaluate(alg, state, data):
    correct, loss = jax.jit(alg.evaluate)(state, to_device(data))
    return np.asarray(correct), np.asarray(loss)


# ------------------------------------------------------------------------------- limits


def train(alg, data, rounds, seed, evaluate=True):
    """``rounds`` jitted rounds from ``init(key(seed))`` (what ``run`` does, without the
    evaluations), and the jitted evaluation of the final state."""
    data = to_device(data)
    state = alg.init(jax.random.key(seed), data)
    round_fn = jax.jit(alg.round)
    for _ in range(rounds):
        state, _ = round_fn(state, data)
    if not evaluate:
        return state, None, None
    correct, loss = jax.jit(alg.evaluate)(state, data)
    return state, np.asarray(correct), np.asarray(loss)


@pytest.fixture(scope="module")
def fedavg_run(tiny):
    data, model = tiny
    return train(algorithms.make("fedavg", model, **RUN), data, 3, 7)


@pytest.mark.parametrize("extra", [
    {},
    {"obp_variant": "drift_sq", "ema_alpha": 0.5, "obp_norm": "layer", "obp_scope": "head"},
])
def test_ig_ratio_one_is_fedavg(tiny, fedavg_run, extra):
    data, model = tiny
    alg = algorithms.make("fedobp", model, ig_ratio=1.0, **RUN, **extra)
    state, correct, loss = train(alg, data, 3, 7)
    avg_state, avg_correct, avg_loss = fedavg_run
    # Same global model after 3 rounds; every client receives it and is tested on it.
    chex_close(state.server["params"], avg_state.server["params"], tol=1e-6)
    _, mask = fedobp.personalized_models(model, alg.hparams, state)
    assert not any(m.any() for m in _leaves(mask))
    np.testing.assert_array_equal(correct, avg_correct)
    np.testing.assert_allclose(loss, avg_loss, rtol=1e-5)
    assert alg.comm_bytes(data) == algorithms.make("fedavg", model, **RUN).comm_bytes(data)


def test_ig_ratio_zero_is_local(tiny):
    data, model = tiny
    alg = algorithms.make("fedobp", model, ig_ratio=0.0, **RUN)
    state, correct, loss = train(alg, data, 3, 3)
    local_state, local_correct, local_loss = train(algorithms.make("local", model, **RUN),
                                                   data, 3, 3)
    # Every client's own model is the one Local trained, and it is what it is tested on.
    chex_close(state.clients["params"], local_state.clients["params"], tol=1e-6)
    mixed, _ = fedobp.personalized_models(model, alg.hparams, state)
    chex_close(mixed, state.clients["params"], tol=0)
    np.testing.assert_array_equal(correct, local_correct)
    np.testing.assert_allclose(loss, local_loss, rtol=1e-5)
    # The global model did move: the mix, not the server, kept it away from the clients.
    assert any((a != b).any() for a, b in zip(
        _leaves(state.server["params"]), _leaves(alg.init(jax.random.key(3), to_device(
            data)).server["params"]), strict=True))


def test_ig_ratio_zero_on_the_head_is_fedper(tiny):
    data, model = tiny
    alg = algorithms.make("fedobp", model, ig_ratio=0.0, obp_scope="head", **RUN)
    state, correct, loss = train(alg, data, 3, 1)
    per_state, per_correct, per_loss = train(algorithms.make("fedper", model, **RUN), data,
                                             3, 1)
    g_obp, g_per = state.server["params"], per_state.server["params"]
    chex_close({n: v for n, v in g_obp.items() if n not in model.head},
               {n: v for n, v in g_per.items() if n not in model.head}, tol=1e-6)
    chex_close({n: state.clients["params"][n] for n in model.head},
               per_state.clients["personal"], tol=1e-6)
    np.testing.assert_array_equal(correct, per_correct)
    np.testing.assert_allclose(loss, per_loss, rtol=1e-5)


# ------------------------------------------------------------------ round against a loop


def reference_client(model, params, x, y, count, key):
    """One client's local SGD as a plain Python loop over its own (unpadded) batches."""
    grad = _grad_fn(model)
    index, weight, active = map(np.asarray, local.batch_schedule(
        key, count, x.shape[0], HP["batch_size"], epochs=HP["local_epochs"]))
    params = jax.tree.map(np.asarray, params)
    for rows, w, is_active in zip(index, weight, active, strict=True):
        if is_active:
            rows = rows[w > 0]
            grads = grad(params, x[rows], y[rows])
            params = jax.tree.map(lambda p, g: p - HP["lr"] * np.asarray(g), params, grads)
    return params


_GRADS = {}


def _grad_fn(model):
    if model not in _GRADS:
        def loss(p, xb, yb):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

        _GRADS[model] = jax.jit(jax.grad(loss))
    return _GRADS[model]


def np_scores(mine, theirs, variant):
    if variant == "drift_param":
        return [np.abs((c - g) * c) for c, g in zip(mine, theirs, strict=True)]
    return [np.square(c - g) for c, g in zip(mine, theirs, strict=True)]


def np_normalize(scores, norm):
    def scale(x, lo, hi):
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

    if norm == "layer":
        return [scale(x, x.min(), x.max()) for x in scores]
    if norm == "global":
        lo = min(x.min() for x in scores)
        hi = max(x.max() for x in scores)
        return [scale(x, lo, hi) for x in scores]
    return scores


def np_personalize(params_k, global_params, hp, head_names, ema_k=None, seen_k=False):
    """One client's mask and mixed model, from its stored model and the global one only."""
    names = [n for n in sorted(params_k) if hp["obp_scope"] == "all" or n in head_names]
    keys = [(n, leaf) for n in names for leaf in sorted(params_k[n])]
    mine = [np.asarray(params_k[n][leaf], np.float32) for n, leaf in keys]
    theirs = [np.asarray(global_params[n][leaf], np.float32) for n, leaf in keys]
    raw = np_scores(mine, theirs, hp["obp_variant"])
    a = hp["ema_alpha"]
    if a > 0 and seen_k:
        raw = [np.float32(1 - a) * r + np.float32(a) * e for r, e in zip(raw, ema_k,
                                                                           strict=True)]
    normed = np_normalize(raw, hp["obp_norm"])
    tau = np.quantile(np.concatenate([x.ravel() for x in normed]), hp["ig_ratio"])
    mask = {n: {leaf: np.zeros(np.shape(v), bool) for leaf, v in sub.items()}
            for n, sub in params_k.items()}
    for (n, leaf), x in zip(keys, normed, strict=True):
        mask[n][leaf] = x > tau
    mixed = {n: {leaf: np.where(mask[n][leaf], params_k[n][leaf], global_params[n][leaf])
                 for leaf in sub} for n, sub in params_k.items()}
    return mixed, mask, raw


@pytest.mark.parametrize("obp_hp", [
    {"obp_variant": "drift_param", "obp_norm": "global", "ema_alpha": 0.0, "obp_scope": "all"},
    {"obp_variant": "drift_sq", "obp_norm": "layer", "ema_alpha": 0.5, "obp_scope": "all"},
    {"obp_variant": "drift_param", "obp_norm": "none", "ema_alpha": 0.3, "obp_scope": "head"},
])
def test_round_equals_per_client_loop(tiny, obp_hp):
    data, model = tiny
    join = 0.6
    alg = algorithms.make("fedobp", model, ig_ratio=0.9, join_ratio=join, **HP, **obp_hp)
    hp = alg.hparams
    device_data = to_device(data)
    round_fn = jax.jit(alg.round)
    state = alg.init(jax.random.key(5), device_data)
    for _ in range(2):  # clients drift apart, some have an EMA, some not yet
        state, _ = round_fn(state, device_data)
    index, keys = round_keys(state, data, join)
    g = jax.tree.map(np.asarray, state.server["params"])
    clients = jax.tree.map(np.asarray, state.clients)
    scoped = [i for i, name in enumerate(fedobp.personalizer(model, hp).names)
              if hp["obp_scope"] == "all" or name.split("/")[0] in model.head]
    trained, new_ema = [], []
    for i, k in enumerate(index):
        ema_k = [clients["ema"][j][k] for j in range(len(scoped))] if "ema" in clients else None
        seen_k = bool(clients["seen"][k]) if "seen" in clients else False
        mixed, mask, raw = np_personalize(_row(clients["params"], k), g, hp, model.head,
                                          ema_k, seen_k)
        assert 0 < sum(m.sum() for m in jax.tree.leaves(mask)) < 180
        trained.append(reference_client(model, mixed, data.train_x[k], data.train_y[k],
                                        data.train_counts[k], keys[i]))
        new_ema.append(raw)
    new_state, _ = round_fn(state, device_data)
    chex_close(new_state.server["params"], average(trained, data.train_counts[index]))
    for k in range(data.num_clients):
        row = _row(new_state.clients["params"], k)
        if k in index:
            i = list(index).index(k)
            chex_close(row, trained[i])
            if hp["ema_alpha"] > 0:
                assert bool(new_state.clients["seen"][k])
                chex_close([np.asarray(e[k]) for e in new_state.clients["ema"]], new_ema[i],
                           tol=1e-6)
        else:  # not sampled: untouched, bit for bit
            chex_close(row, _row(clients["params"], k), tol=0)
            if hp["ema_alpha"] > 0:
                assert bool(new_state.clients["seen"][k]) == bool(clients["seen"][k])
    # Evaluation: every client (sampled or not) on its mixed model from the new global one,
    # with the EMA step it would take, not committed.
    mixed, mask = fedobp.personalized_models(model, hp, new_state)
    g = jax.tree.map(np.asarray, new_state.server["params"])
    after = jax.tree.map(np.asarray, new_state.clients)
    for k in range(data.num_clients):
        ema_k = [e[k] for e in after["ema"]] if "ema" in after else None
        seen_k = bool(after["seen"][k]) if "seen" in after else False
        want_mixed, want_mask, _ = np_personalize(_row(after["params"], k), g, hp,
                                                  model.head, ema_k, seen_k)
        for got, want in zip(_leaves(_row(mask, k)), _leaves(want_mask), strict=True):
            np.testing.assert_array_equal(got, want)
        chex_close(_row(mixed, k), want_mixed, tol=0)


@pytest.fixture(scope="module")
def mlp_state(data):
    model = make_model("mlp", data.input_shape, data.num_classes)  # 42,204 elements
    alg = algorithms.make("fedobp", model, **RUN)
    state, _, _ = train(alg, data, 2, 2, evaluate=False)
    return model, alg.hparams, state


@pytest.mark.parametrize(("q", "norm"), [(0.9999, "global"), (0.999, "none"), (0.7, "layer")])
def test_personalized_count_is_count_above_numpy_quantile(data, mlp_state, q, norm):
    model, hp, state = mlp_state
    hp = {**hp, "ig_ratio": q, "obp_norm": norm}
    _, mask = fedobp.personalized_models(model, hp, state)
    g = [np.asarray(x, np.float32) for x in jax.tree.leaves(state.server["params"])]
    counts = []
    for k in range(data.num_clients):
        mine = [np.asarray(x[k], np.float32) for x in jax.tree.leaves(state.clients["params"])]
        scores = np_normalize(np_scores(mine, g, "drift_param"), norm)
        flat = np.concatenate([s.ravel() for s in scores])
        want = int(np.sum(flat > np.quantile(flat, q)))
        got = int(sum(m[k].sum() for m in _leaves(mask)))
        assert got == want
        counts.append(got)
    assert min(counts) > 0


def test_random_control_has_the_saliency_mask_size(data, mlp_state):
    model, hp, state = mlp_state
    hp = {**hp, "ig_ratio": 0.99}
    random_state = state.replace(clients={**state.clients,
                                          "id": np.arange(data.num_clients, dtype=np.int32)})

    def flat_mask(variant, st):
        _, mask = fedobp.personalized_models(model, {**hp, "obp_variant": variant}, st)
        return np.concatenate([m.reshape(data.num_clients, -1) for m in _leaves(mask)], 1)

    sal, rnd = flat_mask("drift_param", state), flat_mask("random", random_state)
    # The random mask has the size the quantile rule gives untied scores; the saliency mask
    # has that size too unless scores tie at the threshold (ties stay global).
    n = sal.shape[1]
    size = n - int(np.floor(0.99 * (n - 1))) - 1
    np.testing.assert_array_equal(rnd.sum(1), size)
    assert (sal.sum(1) <= size).all() and (sal.sum(1) >= 0.99 * size).all()
    assert (sal.sum(1) == size).sum() >= 3
    assert (sal != rnd).any()
    # A fresh draw per client and per state (the state's key changes every round).
    assert (rnd[0] != rnd[1]).any()
    rekeyed = flat_mask("random", random_state.replace(key=jax.random.key(11)))
    assert (rekeyed != rnd).any() and (rekeyed.sum(1) == rnd.sum(1)).all()
    # At ig_ratio = 1 the control personalizes nothing either (it is FedAvg).
    hp["ig_ratio"] = 1.0
    assert not flat_mask("random", random_state).any()


# ------------------------------------------------------------------- no data on the server


def _scramble_train(data, seed):
    rng = np.random.default_rng(seed)
    return data.replace(
        train_x=rng.normal(size=data.train_x.shape).astype(np.float32),
        train_y=rng.integers(0, data.num_classes, data.train_y.shape).astype(np.int32),
    )


@pytest.fixture(scope="module")
def tiny_state(tiny):
    data, model = tiny
    alg = algorithms.make("fedobp", model, ig_ratio=0.9, **RUN)
    return alg, train(alg, data, 2, 4, evaluate=False)[0]


@pytest.mark.parametrize("variant", slow_unless(["drift_sq", "fisher"], ("drift_sq",)))
def test_drift_scores_use_no_client_data(tiny, tiny_state, variant):
    """With a learning rate of 1e-30 training leaves the received model as it was, so the
    stored rows of the cohort show what the server sent. Changing every client's training
    data must not change that for the drift variants; the Fisher scores (client side) must
    change."""
    data, model = tiny
    hp = {"ig_ratio": 0.9, "obp_variant": variant, **RUN}
    if variant == "fisher":
        state = train(algorithms.make("fedobp", model, **hp), data, 2, 4, evaluate=False)[0]
    else:
        state = tiny_state[1]
        assert set(state.clients) == {"params"}  # nothing derived from data is stored
    frozen = algorithms.make("fedobp", model, **{**hp, "lr": 1e-30})
    sent, _ = fedobp.personalized_models(model, frozen.hparams, state)
    index, _ = round_keys(state, data, RUN["join_ratio"])
    frozen_round = jax.jit(frozen.round)
    after = {name: frozen_round(state, to_device(d))[0]
             for name, d in (("real", data), ("other", _scramble_train(data, 9)))}
    for k in index:
        chex_close(_row(after["real"].clients["params"], k), _row(sent, k), tol=0)
        chex_close(_row(after["other"].clients["params"], k), _row(sent, k), tol=0)
    # The server did send personalized models (not just the global one).
    g = _leaves(state.server["params"])
    assert any((a != b).any() for k in index for a, b in zip(_leaves(_row(sent, k)), g,
                                                             strict=True))
    if variant == "fisher":
        # Client side: the stored Fisher is the mean squared per-example gradient of the
        # trained model on the client's own data; other data gives other scores.
        real = [np.asarray(f) for f in after["real"].clients["fisher"]]
        moved = [np.asarray(f) for f in after["other"].clients["fisher"]]
        assert all(not np.allclose(a[index], b[index]) for a, b in zip(real, moved,
                                                                        strict=True))
        k = int(index[0])
        n = int(data.train_counts[k])

        def nll(p, x, y):
            return -jax.nn.log_softmax(model.apply(p, x[None])[0])[y]

        grads = jax.jit(jax.vmap(jax.grad(nll), in_axes=(None, 0, 0)))(
            _row(after["real"].clients["params"], k), data.train_x[k, :n], data.train_y[k, :n])
        for got, g2 in zip(real, jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(got[k], np.mean(np.square(g2), axis=0), rtol=1e-4,
                                       atol=1e-9)


# ------------------------------------------------------------------------- report, errors


def test_report_counts_personalized_elements_per_layer(tiny, tiny_state):
    data, model = tiny
    alg, state = tiny_state
    report = json.loads(json.dumps(alg.report(state)))  # what summary.json gets
    _, mask = fedobp.personalized_models(model, alg.hparams, state)
    counts = np.array([[m[k].sum() for m in _leaves(mask)] for k in range(data.num_clients)])
    layers = report["personalized_by_layer"]
    assert list(layers) == ["fc1/bias", "fc1/kernel", "head/bias", "head/kernel"]
    assert [v["elements"] for v in layers.values()] == [16, 96, 4, 64]
    assert report["num_params"] == 180
    np.testing.assert_allclose([v["personalized"] for v in layers.values()], counts.mean(0))
    assert report["personalized_elements"] == pytest.approx(counts.sum(1).mean())
    assert report["personalized_fraction"] == pytest.approx(counts.sum(1).mean() / 180)
    assert sum(v["share"] for v in layers.values()) == pytest.approx(1.0)
    assert layers["fc1/kernel"]["fraction"] == pytest.approx(counts[:, 1].mean() / 96)
    assert 0 < report["personalized_fraction"] < 0.2


@pytest.mark.parametrize(("kw", "name"), [
    ({"ig_ratio": 1.5}, "ig_ratio"),
    ({"ig_ratio": -0.01}, "ig_ratio"),
    ({"ig_ratio": float("nan")}, "ig_ratio"),
    ({"obp_variant": "hessian"}, "obp_variant"),
    ({"obp_norm": "batch"}, "obp_norm"),
    ({"obp_scope": "body"}, "obp_scope"),
    ({"ema_alpha": 1.0}, "ema_alpha"),
    ({"ema_alpha": -0.5}, "ema_alpha"),
    ({"ema_alpha": 0.5, "obp_variant": "random"}, "ema_alpha"),
])
def test_bad_input_is_refused_before_compiling(tiny, kw, name):
    _, model = tiny
    with pytest.raises(ValueError, match=name):
        algorithms.make("fedobp", model, **kw)


def test_cli_refuses_bad_ig_ratio(capsys):
    from fedjax_sim.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--algorithm", "fedobp", "--ig-ratio", "1.2", "--no-progress"])
    assert exit_info.value.code == 2
    assert "--ig-ratio must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--algorithm", "fedobp", "--obp-variant", "hessian"])
    assert "invalid choice" in capsys.readouterr().err
