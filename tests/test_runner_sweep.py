"""Sweeps over any traced hyperparameter: every configuration against its separate run,
and configurations refused before anything compiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, sweep, sweep_configs

HP = {"local_epochs": 1, "batch_size": 8, "join_ratio": 0.6}
CONFIGS = {
    # lr, momentum and ig_ratio together and apart; the default ig_ratio is 0.9999.
    "fedobp": [{"lr": 0.05, "momentum": 0.5, "ig_ratio": 0.5}, {"ig_ratio": 0.9}],
    "ditto": [{"ditto_lambda": 0.1}, {"ditto_lambda": 2.0, "lr": 0.03}],
    # The server optimizer's learning rate and betas.
    "fedopt": [{"server_lr": 0.3, "beta1": 0.8}, {"server_lr": 0.05, "beta2": 0.9}],
}
STRUCTURE = {"fedopt": {"server_opt": "adam"}}
LAST_BITS = ("fedopt",)


@pytest.fixture(scope="module")
def tiny():
    data = random_federated(seed=0, num_clients=5)
    return data, make_model("mlp", data.input_shape, data.num_classes, hidden=(8,))


def _final(state):
    """The trained models of a final state: the global one and the clients' own."""
    clients = None if state.clients is None else state.clients["params"]
    return jax.tree.leaves((state.server["params"], clients))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedobp", "ditto", "fedopt"])
def test_every_configuration_is_its_separate_run(tiny, name):
    data, model = tiny
    hp = {**HP, **STRUCTURE.get(name, {})}
    kw = {"rounds": 2, "eval_every": 2, "hparams": hp, "progress": False, "keep_states": True}
    looped = sweep(name, model, data, seeds=[0, 1], configs=CONFIGS[name],
                   config_strategy="map", **kw)
    batched = sweep(name, model, data, seeds=[0, 1], configs=CONFIGS[name],
                    config_strategy="vmap", **kw)
    assert [(s["seed"], s["config"]) for s in looped] == [
        (seed, c) for c in CONFIGS[name] for seed in (0, 1)]
    for one, many in zip(looped, batched, strict=True):
        alone = run(algorithms.make(name, model, **hp, **one["config"]), data, rounds=2,
                    eval_every=2, seed=one["seed"], progress=False)
        # The compiled loop over configurations runs each one's round as the separate run
        # does: the same floats (Adam's server step may fuse otherwise inside the loop: a
        # few units in the last place).
        for a, b in zip(_final(one["state"]), _final(alone.state), strict=True):
            if name in LAST_BITS:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
            else:
                np.testing.assert_array_equal(a, b)
        if name not in LAST_BITS:
            assert one["client_accuracies"] == alone.summary["client_accuracies"]
            assert one["history"][-1]["train_loss"] == alone.history[-1]["train_loss"]
        # vmap batches the configurations' matmuls: float32 rounding apart.
        for a, b in zip(_final(many["state"]), _final(alone.state), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert many["history"][-1]["train_loss"] == pytest.approx(
            alone.history[-1]["train_loss"], rel=1e-4)
    # The configurations differ from each other.
    assert looped[0]["history"][-1]["train_loss"] != looped[2]["history"][-1]["train_loss"]


def test_lr_sweep_keeps_its_summary_fields(tiny, tmp_path):
    data, model = tiny
    out = sweep("fedavg", model, data, seeds=[3], lrs=[0.05, 0.2], rounds=1, hparams=HP,
                progress=False, output=tmp_path)
    assert [(s["seed"], s["lr"], s["config"]) for s in out] == [
        (3, 0.05, {"lr": 0.05}), (3, 0.2, {"lr": 0.2})]
    assert (tmp_path / "seed3_lr0.2" / "summary.json").exists()
    configs = sweep("fedavg", model, data, configs=[{"seed": 3, "momentum": 0.5}], rounds=1,
                    hparams=HP, progress=False)
    assert configs[0]["lr"] == 0.01 and configs[0]["momentum"] == 0.5


@pytest.mark.parametrize("kw, message", [
    ({"configs": [{"seed": 0, "batch_size": 4}]},
     "configs[0]: batch_size is not a traced hyperparameter of fedavg"),
    ({"configs": [{"seed": 0}, {"lr": 0.1}]}, "configs[1] has no seed"),
    ({"configs": [{"seed": 0, "lr": 0.1}], "seeds": [1]}, "configs[0] sets a seed"),
    ({"configs": [{"lr": 0.1}], "seeds": [0], "lrs": [0.1]}, "give lrs or configs"),
    ({"configs": {"lr": 0.1}, "seeds": [0]}, "configs must be a non-empty list of dicts"),
    ({"configs": [], "seeds": [0]}, "configs must be a non-empty list of dicts"),
    ({"configs": [{"seed": 0, "momentum": 1.0}]}, "configs[0].momentum must be in [0, 1)"),
    ({"configs": [{"seed": -1}]}, "configs[0].seed must be an integer >= 0"),
    ({"configs": [{"seed": 0, "lr": 0.01}, {"seed": 0}]},
     "configuration 1 (seed 0, {}) repeats configuration 0"),
    ({}, "seeds must be a non-empty list of seeds, got None"),
])
def test_bad_configurations_are_refused(kw, message):
    with pytest.raises(ValueError) as info:
        sweep_configs("fedavg", {}, **kw)
    assert message in str(info.value)


def test_sweep_refuses_values_the_algorithm_refuses(tiny):
    data, model = tiny
    with pytest.raises(ValueError, match="ema_alpha must be 0 with obp_variant='random'"):
        sweep("fedobp", model, data, seeds=[0], configs=[{"ema_alpha": 0.5}], rounds=1,
              hparams={**HP, "obp_variant": "random"}, progress=False)


def _two_alphas():
    from fedjax_sim.data import make_federated_data

    return [make_federated_data("digits", num_clients=4, alpha=alpha, seed=seed)[0]
            for alpha, seed in ((0.1, 0), (0.5, 1))]


def test_fedavg_over_two_alphas_and_momentum_is_the_separate_runs():
    splits = _two_alphas()
    model = make_model("mlp", splits[0].input_shape, splits[0].num_classes, hidden=(8,))
    hp = {"local_epochs": 1, "batch_size": 32}
    configs = [{"seed": 0, "split": 1, "lr": 0.05, "momentum": 0.5}, {"seed": 1, "split": 0}]
    swept = sweep("fedavg", model, splits, configs=configs, rounds=2, hparams=hp,
                  progress=False, keep_states=True, devices=1)
    for config, one in zip(configs, swept, strict=True):
        overrides = {k: v for k, v in config.items() if k not in ("seed", "split")}
        alone = run(algorithms.make("fedavg", model, **hp, **overrides),
                    splits[config["split"]], rounds=2, seed=config["seed"], progress=False,
                    devices=1)
        for a, b in zip(jax.tree.leaves(one["state"].server),
                        jax.tree.leaves(alone.state.server), strict=True):
            np.testing.assert_array_equal(a, b)
        assert one["client_accuracies"] == alone.summary["client_accuracies"]


@pytest.mark.slow
def test_one_program_over_lr_momentum_ig_ratio_seeds_and_two_alphas_is_the_separate_runs():
    splits = _two_alphas()
    assert splits[0].train_x.shape[1] != splits[1].train_x.shape[1]  # padded to one shape
    model = make_model("mlp", splits[0].input_shape, splits[0].num_classes, hidden=(8,))
    hp = {"local_epochs": 1, "batch_size": 32, "join_ratio": 1.0}
    configs = [{"seed": 0, "split": 0, "lr": 0.05, "momentum": 0.5, "ig_ratio": 0.5},
               {"seed": 1, "split": 1, "ig_ratio": 0.9},
               {"seed": 2, "split": 1, "lr": 0.02, "momentum": 0.9},
               {"seed": 0, "split": 0, "lr": 0.02, "momentum": 0.9}]
    swept = sweep("fedobp", model, splits, configs=configs, rounds=2, hparams=hp,
                  config_strategy="map", progress=False, keep_states=True)
    assert [s["split"] for s in swept] == [0, 1, 1, 0]
    for config, one in zip(configs, swept, strict=True):
        overrides = {k: v for k, v in config.items() if k not in ("seed", "split")}
        alone = run(algorithms.make("fedobp", model, **hp, **overrides),
                    splits[config["split"]], rounds=2, seed=config["seed"], progress=False)
        for a, b in zip(_final(one["state"]), _final(alone.state), strict=True):
            np.testing.assert_array_equal(a, b)
        assert one["client_accuracies"] == alone.summary["client_accuracies"]
        assert [h["accuracy"] for h in one["history"]] == [
            h["accuracy"] for h in alone.history]
    assert len({s["accuracy"] for s in swept}) > 1
