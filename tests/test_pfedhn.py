"""pFedHN against a NumPy computation of the paper's update (Alg. 1, Eq. 3-4), with partial
participation, and through the command line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import linear_model

from fedjax_sim import algorithms
from fedjax_sim.cli import main
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.runner import to_device


def _grad(w, b, x, y):
    """Mean cross-entropy gradient of softmax regression, float64."""
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(0)


def _numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_pfedhn_matches_the_papers_update_in_numpy():
    # 4 clients of 6 samples, half of them per round, full batches (the batch order cannot
    # matter), 2 local epochs; a hypernetwork of one hidden layer of 5 units, d = 3.
    rng = np.random.default_rng(0)
    k, n, dim, classes, epochs, lr, hn_lr = 4, 6, 4, 3, 2, 0.2, 0.3
    x = rng.normal(size=(k, n, dim)).astype(np.float32)
    y = rng.integers(0, classes, (k, n)).astype(np.int32)
    counts = np.full(k, n, np.int32)
    data = to_device(FederatedData(x, y, counts, x[:, :2], y[:, :2], np.full(k, 2, np.int32),
                                   num_classes=classes, name="tiny"))
    alg = algorithms.make("pfedhn", linear_model(dim, classes), local_epochs=epochs,
                          batch_size=n, lr=lr, join_ratio=0.5, hn_lr=hn_lr, hn_hidden=5,
                          hn_layers=1, hn_embed_dim=3)
    state = alg.init(jax.random.key(0), data)
    phi = _numpy(state.server["params"])
    w1, b1 = phi["body"][0]["w"], phi["body"][0]["b"]
    wh, bh = phi["head"]["w"], phi["head"]["b"]
    emb = np.asarray(state.clients["embedding"], np.float64)
    step = jax.jit(alg.round)
    for _ in range(2):
        state, _ = step(state, data)
        changed = np.flatnonzero(np.any(np.asarray(state.clients["embedding"]) !=
                                        emb.astype(np.float32), axis=1))
        assert len(changed) == 2  # the cohort: half of the clients
        grads = []
        for i in changed:
            # h(v; φ): relu(v W1 + b1) Wh + bh, the flat (bias, kernel) of the linear model.
            z = emb[i] @ w1 + b1
            a = np.maximum(z, 0)
            flat = a @ wh + bh
            b0, w0 = flat[:classes], flat[classes:].reshape(dim, classes)
            w_, b_ = w0.copy(), b0.copy()
            for _ in range(epochs):
                gw, gb = _grad(w_, b_, x[i].astype(np.float64), y[i])
                w_, b_ = w_ - lr * gw, b_ - lr * gb
            delta = np.concatenate([b0 - b_, (w0 - w_).ravel()])
            # The chain rule through h, by hand.
            g_wh, g_bh = np.outer(a, delta), delta
            g_z = (wh @ delta) * (z > 0)
            g_w1, g_b1, g_v = np.outer(emb[i], g_z), g_z, w1 @ g_z
            grads.append((g_w1, g_b1, g_wh, g_bh))
            emb[i] = emb[i] - hn_lr * g_v
        mean = [np.mean([g[j] for g in grads], 0) for j in range(4)]
        w1, b1, wh, bh = (p - hn_lr * g for p, g in zip((w1, b1, wh, bh), mean, strict=True))
    got = _numpy(state.server["params"])
    for have, want in ((got["body"][0]["w"], w1), (got["body"][0]["b"], b1),
                       (got["head"]["w"], wh), (got["head"]["b"], bh),
                       (np.asarray(state.clients["embedding"]), emb)):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6)


def test_pfedhn_hyperparameters_are_checked():
    model = linear_model(4, 3)
    with pytest.raises(ValueError, match="hn_lr must be"):
        algorithms.make("pfedhn", model, hn_lr=0.0)
    with pytest.raises(ValueError, match="hn_hidden must be a positive integer"):
        algorithms.make("pfedhn", model, hn_hidden=0)
    assert "hn_lr" in algorithms.traced_names("pfedhn")


def test_pfedhn_runs_and_sweeps_its_step_size_in_one_program(tmp_path, capsys):
    tiny = ["--num-clients", "4", "--rounds", "2", "--eval-every", "1", "--local-epochs", "1",
            "--no-progress"]
    main(["run", "--algorithm", "pfedhn", "--hn-lr", "0.1", *tiny, "--output",
          str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and 0 <= summary["accuracy"] <= 1
    capsys.readouterr()
    main(["sweep", "--algorithm", "pfedhn", "--set", "hn_lr=0.1,0.3", "--seeds", "0",
          *tiny, "--output", str(tmp_path / "sweep")])
    assert "2 runs to do in 1 program" in capsys.readouterr().err
    records = [json.loads(line) for line in
               (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    by = {r["values"]["hn_lr"]: r["accuracy"] for r in records}
    assert by[0.1] == summary["accuracy"]  # the swept value equals its own run
