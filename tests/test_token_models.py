"""Next-token models (char_lstm, so_lstm, transformer) and the EMNIST CNN: the published
parameter counts, the LSTM against a NumPy loop of PyTorch's equations, causality, and
that they train."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.core.local import weighted_cross_entropy
from fedjax_sim.models import count_params, make_model
from fedjax_sim.models.lstm import lstm_layer


def test_published_parameter_counts():
    # Reddi et al. (2021): StackOverflow LSTM 4,050,748; EMNIST CNN 1,206,590.
    so_lstm = make_model("so_lstm", (20,), 10_004, init="flax")  # Keras' one bias a gate
    assert count_params(so_lstm.init(jax.random.key(0))) == 4_050_748
    torch_layout = make_model("so_lstm", (20,), 10_004, init="torch")  # PyTorch's two
    assert count_params(torch_layout.init(jax.random.key(0))) == 4_050_748 + 4 * 670
    assert count_params(make_model("emnist_cnn", (28, 28, 1), 62).init(jax.random.key(0))) \
        == 1_206_590
    # Shakespeare: 8 x V embedding, 4 x 256 x (8 + 256 + 1), 4 x 256 x (256 + 256 + 1),
    # head 256 x V + V.
    v = 90
    expected = 8 * v + 4 * 256 * 266 + 4 * 256 * 514 + 256 * v + v  # two biases (torch)
    assert count_params(make_model("char_lstm", (80,), v).init(jax.random.key(0))) == expected


def test_sent140_lstm_has_leafs_layers_and_reads_the_last_position():
    model = make_model("sent_lstm", (25,), 2, vocab=50, init="flax")
    params = model.init(jax.random.key(0))
    # LEAF: embedding V x 100, two LSTMs of 100 (one bias a gate), dense 128, output 2.
    lstm = 4 * 100 * (100 + 100 + 1)
    assert count_params(params) == 50 * 100 + 2 * lstm + 100 * 128 + 128 + 128 * 2 + 2
    assert model.head == ("head",)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 25)), jnp.int32)
    assert model.apply(params, x).shape == (3, 2)
    # Every position feeds the last state: changing the first word changes the output.
    assert not np.allclose(model.apply(params, x), model.apply(params, x.at[:, 0].add(1)))
    with pytest.raises(ValueError, match="vocab"):
        make_model("sent_lstm", (25,), 2)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("init", ["torch", "flax"])
def test_lstm_equals_a_numpy_loop_of_the_pytorch_equations(init):
    from fedjax_sim.models.lstm import lstm_init

    params = lstm_init(jax.random.key(1), 5, 7, init)
    x = np.random.default_rng(0).normal(size=(3, 6, 5)).astype(np.float32)
    got = np.asarray(lstm_layer(params, jnp.asarray(x)))
    w_in, w_rec, b = (np.asarray(params[k], np.float64) for k in ("w_in", "w_rec", "bias"))
    if init == "torch":
        assert "bias_rec" in params  # PyTorch's b_hh, trained on its own
        b = b + np.asarray(params["bias_rec"], np.float64)
    h = np.zeros((3, 7))
    c = np.zeros((3, 7))
    for t in range(6):
        gates = x[:, t] @ w_in + h @ w_rec + b
        i, f, g, o = np.split(gates, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        np.testing.assert_allclose(got[:, t], h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["char_lstm", "transformer"])
def test_logits_at_a_position_do_not_see_later_tokens(name):
    model = make_model(name, (12,), 30, **({"dim": 32, "heads": 2} if name == "transformer"
                                           else {}))
    params = model.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(1).integers(0, 30, (2, 12)), jnp.int32)
    changed = x.at[:, 7].set((x[:, 7] + 1) % 30)
    a, b = model.apply(params, x), model.apply(params, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


@pytest.mark.parametrize("name", ["char_lstm", "so_lstm", "transformer"])
def test_token_models_train_and_map_over_clients(name):
    options = {"char_lstm": {"hidden": (32,)}, "so_lstm": {"hidden": 24, "projection": 8},
               "transformer": {"dim": 32, "heads": 2, "depth": 1}}[name]
    model = make_model(name, (10,), 17, **options)
    params = model.init(jax.random.key(0))
    # Counting sequences: the next token is the current one + 1 (mod 17).
    start = np.random.default_rng(2).integers(0, 17, (8, 1))
    x = jnp.asarray((start + np.arange(10)) % 17, jnp.int32)
    y = ((x + 1) % 17).at[:, -1].set(-1)  # the last label is a pad: not trained
    w = jnp.ones((8,))
    loss = lambda p: weighted_cross_entropy(model.apply(p, x), y, w)
    opt = optax.adam(0.02)
    state = opt.init(params)
    first = float(loss(params))
    for _ in range(30):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * first
    stacked = jax.vmap(model.init)(jax.random.split(jax.random.key(3), 3))
    out = jax.vmap(model.apply, in_axes=(0, None))(stacked, x)
    assert out.shape == (3, 8, 10, 17)


def test_token_ids_past_the_vocabulary_give_finite_logits():
    for name in ("char_lstm", "transformer"):
        model = make_model(name, (6,), 9, **({"dim": 16, "heads": 2} if name ==
                                               "transformer" else {"hidden": (8,)}))
        logits = model.apply(model.init(jax.random.key(0)), jnp.full((1, 6), 50, jnp.int32))
        assert np.isfinite(np.asarray(logits)).all()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="input_shape must be \\(L,\\)"):
        make_model("char_lstm", (28, 28, 1), 80)
    with pytest.raises(ValueError, match="dim \\(30\\) must be a multiple of heads"):
        make_model("transformer", (20,), 100, dim=30, heads=4)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        make_model("transformer", (20,), 100, depth=0)
    with pytest.raises(ValueError, match="too small"):
        make_model("emnist_cnn", (5, 5, 1), 10)
