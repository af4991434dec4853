"""APFL's mixing-weight report and learning rate; LG-FedAvg's number of global layers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_sim import algorithms
from fedjax_sim.algorithms.apfl import alpha_report
from fedjax_sim.algorithms.lg_fedavg import global_layers
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, to_device

HP = {"local_epochs": 1, "batch_size": 8, "lr": 0.5}


def _one_round(name, data, **hp):
    model = make_model("mlp", data.input_shape, data.num_classes)
    alg = algorithms.make(name, model, **HP, **hp)
    device_data = to_device(data)
    state = alg.init(jax.random.key(0), device_data)
    return model, state, jax.jit(alg.round)(state, device_data)[0]


def test_alpha_report_fields():
    report = alpha_report(np.array([0.0, 1.0, 0.5, 1.0], np.float32))
    assert report == {"apfl_alpha_mean": 0.625, "apfl_alpha_min": 0.0, "apfl_alpha_max": 1.0,
                      "apfl_alpha_at_0": 0.25, "apfl_alpha_at_1": 0.5}


def test_apfl_summary_reports_final_alpha(small_data):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    alg = algorithms.make("apfl", model, **HP)
    result = run(alg, small_data, rounds=2, progress=False)
    summary = result.summary
    keys = ("apfl_alpha_mean", "apfl_alpha_min", "apfl_alpha_max", "apfl_alpha_at_0",
            "apfl_alpha_at_1")
    for key in keys:
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["apfl_alpha_min"] <= summary["apfl_alpha_mean"] <= summary["apfl_alpha_max"]
    alpha = np.asarray(result.state.clients["alpha"])
    assert summary["apfl_alpha_mean"] == pytest.approx(float(alpha.mean()))
    assert summary["apfl_alpha_at_0"] + summary["apfl_alpha_at_1"] <= 1.0
    assert not np.allclose(alpha, 0.5)  # α learned away from its start with lr 0.5


@pytest.mark.slow
def test_apfl_alpha_lr(small_data):
    _, _, frozen = _one_round("apfl", small_data, apfl_alpha=0.3, apfl_alpha_lr=0.0)
    np.testing.assert_array_equal(np.asarray(frozen.clients["alpha"]), np.float32(0.3))
    # The personal model still trains with the client lr.
    _, start, _ = _one_round("apfl", small_data, apfl_alpha=0.3, apfl_alpha_lr=0.0)
    assert not np.allclose(frozen.clients["params"]["head"]["kernel"],
                           start.clients["params"]["head"]["kernel"])
    # Unset means the client lr: today's behaviour, bit for bit.
    _, _, default = _one_round("apfl", small_data, apfl_alpha=0.3)
    _, _, same = _one_round("apfl", small_data, apfl_alpha=0.3, apfl_alpha_lr=HP["lr"])
    np.testing.assert_array_equal(default.clients["alpha"], same.clients["alpha"])
    assert not np.allclose(default.clients["alpha"], 0.3)
    _, _, slow = _one_round("apfl", small_data, apfl_alpha=0.3, apfl_alpha_lr=0.05)
    moved = np.abs(np.asarray(slow.clients["alpha"]) - 0.3)
    assert (moved < np.abs(np.asarray(default.clients["alpha"]) - 0.3) + 1e-7).all()
    assert moved.max() > 0


@pytest.mark.parametrize("value, message", [
    (-0.1, "apfl_alpha_lr must be >= 0 or unset"),
    (float("inf"), "apfl_alpha_lr must be a finite number"),
    ("fast", "apfl_alpha_lr must be >= 0 or unset"),
])
def test_apfl_alpha_lr_refused(value, message):
    with pytest.raises(ValueError, match=message):
        algorithms.resolve("apfl", apfl_alpha_lr=value)


def test_global_layers_follow_the_forward_order():
    mlp = make_model("mlp", (6,), 4)
    resnet = make_model("resnet", (8, 8, 3), 4)
    assert mlp.layers == ("fc1", "fc2", "head")
    assert resnet.layers == ("stem", "stem_norm", "stage1_block1", "stage2_block1",
                             "stage3_block1", "head")
    assert global_layers(mlp, None) == ("head",)
    assert global_layers(mlp, 2) == ("fc2", "head")
    assert global_layers(resnet, 2) == ("stage3_block1", "head")
    assert global_layers(resnet, 5)[0] == "stem_norm"


@pytest.mark.parametrize("n", [1, 2])
def test_lg_global_layers_decides_what_is_averaged(small_data, n):
    model, start, state = _one_round("lg_fedavg", small_data, lg_global_layers=n)
    shared = model.layers[len(model.layers) - n:]
    personal = set(model.layers) - set(shared)
    assert set(state.clients["personal"]) == personal
    for name in model.layers:
        before = start.server["params"][name]["kernel"]
        after = state.server["params"][name]["kernel"]
        # The server averages the shared layers; its copy of the personal ones is unused.
        assert np.allclose(before, after) == (name in personal), name
    # Every client evaluates the server's shared layers; its personal layers are its own.
    for name in personal:
        rows = np.asarray(state.clients["personal"][name]["kernel"])
        assert not np.allclose(rows[0], rows[1]), name


def test_lg_default_shares_the_head_only(small_data):
    _, _, default = _one_round("lg_fedavg", small_data)
    _, _, one = _one_round("lg_fedavg", small_data, lg_global_layers=1)
    jax.tree.map(np.testing.assert_array_equal, default.server, one.server)
    jax.tree.map(np.testing.assert_array_equal, default.clients, one.clients)


@pytest.mark.parametrize("n", [3, 7])
def test_lg_global_layers_out_of_range(small_data, n):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    with pytest.raises(ValueError, match=rf"lg_global_layers must be in \[1, 2\] for model mlp "
                       rf"\(layers fc1, fc2, head\), got {n}"):
        algorithms.make("lg_fedavg", model, lg_global_layers=n)
    with pytest.raises(ValueError, match="lg_global_layers must be a positive integer"):
        algorithms.make("lg_fedavg", model, lg_global_layers=0)
