"""Numeric hyperparameters as data: ``round_with(state, data, hp)`` against ``round``, the
values it accepts, and momentum / weight decay at 0 against plain SGD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_federated, slow_unless

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import client_optimizer, cross_entropy_loss
from fedjax_sim.core import local
from fedjax_sim.data.public import as_public
from fedjax_sim.models import make_model
from fedjax_sim.runner import to_device

COMMON = {"local_epochs": 1, "batch_size": 8, "join_ratio": 0.6}
# Small structural settings of the distillation algorithms (the public set has 40 rows).
STRUCTURE = {"public_batch": 16, "distill_batch_size": 8, "feddf_steps": 3,
             "feddf_batch_size": 16, "feddf_eval_every": 2, "fccl_pretrain_epochs": 1,
             "fedmd_transfer_epochs": 1}
# Values other than the defaults for every traced hyperparameter.
OTHER = {"lr": 0.03, "momentum": 0.5, "weight_decay": 1e-3, "ig_ratio": 0.5,
         "ema_alpha": 0.3, "ditto_lambda": 0.3, "apfl_alpha": 0.3, "apfl_alpha_lr": 0.02,
         "distill_lr": 0.02, "dsfl_temperature": 0.3, "fccl_lambda": 0.01,
         "fccl_public_lr": 0.002, "feddf_lr": 0.002, "feddf_temperature": 2.0,
         "mu": 0.1, "server_lr": 0.7, "server_momentum": 0.5, "beta1": 0.8, "beta2": 0.9,
         "tau": 0.01, "incfl_temperature": 0.3, "hn_lr": 0.05, "fedrod_gamma": 0.5,
         "fedproto_lambda": 0.3, "fedamp_alpha": 0.02, "fedamp_lambda": 0.05,
         "fedamp_sigma": 2.0, "fedala_eta": 0.5, "fedala_sample_ratio": 0.6,
         "fedala_threshold": 0.05, "feddyn_alpha": 0.02, "moon_mu": 0.5, "moon_tau": 0.3,
         "perfedavg_beta": 0.002, "pfedme_lambda": 10.0, "pfedme_personal_lr": 0.02,
         "pfedme_beta": 0.8}
# The heterogeneous-group algorithms pretrain before the first round: slower to compile.
# The default suite checks one algorithm of each kind of state (none, personal, EMA,
# distillation targets, control variates); -m slow checks every one.
EVERY = slow_unless(algorithms.ALGORITHMS + algorithms.DISTILLATION,
                    ("fedavg", "fedobp", "ditto", "dsfl", "scaffold"))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    public = as_public(rng.normal(size=(40, 6)), rng.integers(0, 4, 40),
                       val_x=rng.normal(size=(12, 6)), val_y=rng.integers(0, 4, 12))
    return to_device(random_federated(seed=0, num_clients=5)), make_model(
        "mlp", (6,), 4, hidden=(8,)), public


def build(name, tiny, **kw):
    _, model, public = tiny
    own = {spec.name for spec in algorithms.hparam_specs(name)}
    settings = {k: v for k, v in STRUCTURE.items() if k in own}
    extra = {"public": public} if algorithms.uses_public(name) else {}
    return algorithms.make(name, model, **COMMON, **settings, **extra, **kw)


def models(state):
    """The server part and the clients' models, without FedOBP's EMA state."""
    clients = state.clients
    if isinstance(clients, dict):
        clients = {k: v for k, v in clients.items() if k not in ("ema", "seen")}
    return state.server, clients


# Algorithms whose traced values give the compiled-in floats to float32 rounding only
# (their docstrings say why).
ROUNDING = {"pfedhn"}


def assert_bitwise(a, b, rtol=0.0):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if rtol:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-9)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", EVERY)
def test_round_with_traced_values_equals_round_bit_for_bit(tiny, name):
    data = tiny[0]
    # The privacy values reach a round only with dp on (tests/test_privacy.py).
    values = {k: OTHER[k] for k in algorithms.traced_names(name) if not k.startswith("dp_")}
    alg = build(name, tiny, cover=[values])
    key = jax.random.key(1)
    round_with = jax.jit(alg.round_with)
    # The defaults passed as data give the floats of the round with its values built in.
    state = alg.init(key, data)
    rtol = 1e-5 if name in ROUNDING else 0.0
    assert_bitwise(jax.jit(alg.init_with)(key, data, alg.hp()), state, rtol)
    plain = jax.jit(alg.round)(state, data)
    traced = round_with(state, data, alg.hp())
    assert_bitwise(traced, plain, rtol)
    assert_bitwise(jax.jit(alg.evaluate_with)(traced[0], data, alg.hp()),
                   jax.jit(alg.evaluate)(plain[0], data), rtol)
    # Other values through the same compiled round give what an algorithm built with them
    # computes.
    other = build(name, tiny, **values)
    assert_bitwise(round_with(alg.init_with(key, data, alg.hp(**values)), data,
                              alg.hp(**values)),
                   jax.jit(other.round)(other.init(key, data), data), rtol)
    # Built for its defaults alone, momentum and weight decay 0 are compiled in (plain SGD,
    # no FedOBP EMA state): the models are those of the traced zeros above.
    narrow = build(name, tiny)
    assert "momentum" not in narrow.hp() and "momentum" in alg.hp()
    assert_bitwise(models(jax.jit(narrow.round)(narrow.init(key, data), data)[0]),
                   models(traced[0]))
    # And other values do change the round.
    changed = round_with(state, data, alg.hp(**values))
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves((changed[0].server, changed[0].clients)),
        jax.tree.leaves((plain[0].server, plain[0].clients)), strict=True))


def test_zero_momentum_and_decay_give_plain_sgd_floats(small_data):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    params = model.init(jax.random.key(0))
    loss = cross_entropy_loss(model)
    x, y, n = (jnp.asarray(a[0]) for a in (small_data.train_x, small_data.train_y,
                                            small_data.train_counts))
    key = jax.random.key(2)

    def train(optimizer):
        return local.train(loss, optimizer, params, x, y, n, key, batch_size=4, epochs=3)

    plain = jax.jit(lambda: train(optax.sgd(0.05)))()
    zero = {"lr": jnp.float32(0.05), "momentum": jnp.float32(0.0),
            "weight_decay": jnp.float32(0.0)}
    traced = jax.jit(lambda hp: train(client_optimizer(hp)))(zero)
    assert_bitwise(traced, plain)
    # Not vacuous: a momentum above 0 moves the result.
    moved = jax.jit(lambda hp: train(client_optimizer(hp)))({**zero, "momentum": 0.5})
    assert not np.array_equal(moved[1], plain[1])


def test_hp_refuses_what_the_round_does_not_take(tiny):
    fedavg = build("fedavg", tiny)
    # Momentum and weight decay 0 everywhere are compiled in, not traced.
    assert sorted(fedavg.hp()) == ["lr"]
    assert fedavg.hp(lr=0.5)["lr"] == np.float32(0.5)
    assert sorted(fedavg.hp(momentum=0.0)) == ["lr"]
    with pytest.raises(ValueError, match=r"momentum=0\.5: this fedavg round was built with "
                                         "momentum 0 only"):
        fedavg.hp(momentum=0.5)
    with_momentum = build("fedavg", tiny, cover=[{"momentum": 0.5}])
    assert sorted(with_momentum.hp(momentum=0.0)) == ["lr", "momentum"]
    with pytest.raises(ValueError, match="batch_size is not a traced hyperparameter of fedavg"):
        fedavg.hp(batch_size=4)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        fedavg.hp(lr=float("inf"))
    with pytest.raises(ValueError, match=r"cover\[0\]: join_ratio is not a traced"):
        build("fedavg", tiny, cover=[{"join_ratio": 0.5}])
    with pytest.raises(ValueError, match=r"cover\[1\].momentum must be in \[0, 1\)"):
        build("fedavg", tiny, cover=[{}, {"momentum": 1.0}])
    # The distillation lr is its own, not the client lr.
    dsfl = build("dsfl", tiny)
    assert dsfl.numeric["distill_lr"] == np.float32(0.1) and dsfl.numeric["lr"] == 0.01
    assert dsfl.hp(lr=0.2)["distill_lr"] == np.float32(0.1)
    # FedOBP's program depends on the values it was built for.
    obp = build("fedobp", tiny)
    with pytest.raises(ValueError, match=r"ig_ratio=0\.5 is outside the values"):
        obp.hp(ig_ratio=0.5)
    with pytest.raises(ValueError, match="keeps no EMA state"):
        obp.hp(ema_alpha=0.3)
    covered = build("fedobp", tiny, cover=[{"ig_ratio": 0.5}])
    covered.hp(ig_ratio=0.5)
    covered.hp(ig_ratio=0.7)  # fewer order statistics from the top than 0.5 needs
    with pytest.raises(ValueError, match=r"ig_ratio=0\.0 is outside"):
        covered.hp(ig_ratio=0.0)
    control = build("fedobp", tiny, obp_variant="random", cover=[{"ig_ratio": 0.5}])
    with pytest.raises(ValueError, match="ema_alpha must be 0 with obp_variant='random'"):
        control.hp(ema_alpha=0.3)
    with pytest.raises(ValueError, match="ema_alpha must be 0 with obp_variant='random'"):
        build("fedobp", tiny, obp_variant="random", cover=[{"ema_alpha": 0.3}])


@pytest.mark.slow
def test_fedobp_wider_program_gives_the_narrow_ones_floats(tiny):
    # Built for EMA, ig_ratio 0 and a top-k search of half the scores, the round still
    # computes, for each value, what the algorithm built with that value alone computes.
    data = tiny[0]
    key = jax.random.key(4)
    wide = build("fedobp", tiny, cover=[{"ema_alpha": 0.4}, {"ig_ratio": 0.0},
                                         {"ig_ratio": 0.5}])
    round_with = jax.jit(wide.round_with)
    assert "ema" in wide.init(key, data).clients
    for values in ({}, {"ig_ratio": 0.0}, {"ig_ratio": 0.5}, {"ema_alpha": 0.4}):
        narrow = build("fedobp", tiny, **values)
        state, want = wide.init(key, data), narrow.init(key, data)
        for _ in range(2):
            state, metrics = round_with(state, data, wide.hp(**values))
            want, want_metrics = jax.jit(narrow.round)(want, data)
        assert_bitwise(state.server, want.server)
        assert_bitwise(state.clients["params"], want.clients["params"])
        assert_bitwise(metrics, want_metrics)
        assert_bitwise(jax.jit(wide.evaluate_with)(state, data, wide.hp(**values)),
                       jax.jit(narrow.evaluate)(want, data))
