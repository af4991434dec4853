"""Next-token LSTMs of the natural federated benchmarks, as pure (init, apply) pairs.

* ``char_lstm``: the Shakespeare character model of McMahan et al., "Communication-
  Efficient Learning of Deep Networks from Decentralized Data" (AISTATS 2017) and LEAF
  (Caldas et al. 2018): embedding 8, two LSTM layers of 256 units, a dense output over
  the characters.
* ``so_lstm``: the StackOverflow next-word model of Reddi et al., "Adaptive Federated
  Optimization" (ICLR 2021): embedding 96, one LSTM layer of 670 units, a dense projection
  to 96, the output over the 10,000 words and 4 special tokens (4,050,748 parameters, the
  paper's count).
* ``sent_lstm``: LEAF's Sent140 classifier (its ``stacked_lstm``): a learned embedding of
  100, two LSTM layers of 100 units, the last position's state through a linear layer of
  128 and the output over the classes.

The first two read int tokens (B, L) and predict the next token at every position:
logits (B, L, V); ``sent_lstm`` gives one prediction per sequence, (B, C). Gates are in
PyTorch's order (input, forget, cell, output) with one bias per gate under
``init="flax"`` (Keras' layout, whose parameter counts the papers report) and PyTorch's
two under ``init="torch"``. The input projection of every time step is one matmul before
the scan; only the recurrent matmul runs inside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.models.base import Model, Params
from fedjax_sim.models.layers import DEFAULT_INIT, check_init


def check_tokens(input_shape: Sequence[int], vocab: int, *, model: str) -> tuple[int]:
    """``(L,)`` for a token model, or a ValueError naming the model and the argument."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"{model}: input_shape must be (L,), a sequence of L >= 1 tokens, "
                         f"got {shape}")
    if int(vocab) < 2:
        raise ValueError(f"{model}: num_classes (the vocabulary) must be >= 2, got {vocab}")
    return shape


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def embedding_init(key: jax.Array, vocab: int, dim: int, init: str) -> Params:
    """``torch``: nn.Embedding's N(0, 1); ``flax``: Keras' U(-0.05, 0.05)."""
    if init == "torch":
        return {"table": jax.random.normal(key, (vocab, dim), jnp.float32)}
    return {"table": _uniform(key, (vocab, dim), 0.05)}


def dense_init(key: jax.Array, fan_in: int, features: int, init: str) -> Params:
    """``torch``: nn.Linear's U(+-1/sqrt(fan_in)) kernel and bias; ``flax``: LeCun normal
    kernel, zero bias."""
    k_key, b_key = jax.random.split(key)
    if init == "torch":
        bound = 1.0 / math.sqrt(fan_in)
        return {"kernel": _uniform(k_key, (fan_in, features), bound),
                "bias": _uniform(b_key, (features,), bound)}
    kernel = jax.nn.initializers.lecun_normal()(k_key, (fan_in, features), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((features,), jnp.float32)}


def lstm_init(key: jax.Array, fan_in: int, hidden: int, init: str) -> Params:
    """``torch``: nn.LSTM's layout and draws, U(+-1/sqrt(hidden)) for both matrices and its
    two biases (each trained, as PyTorch trains them); ``flax``: Keras' layout and
    defaults (Glorot-uniform input kernel, orthogonal recurrent kernel, one zero bias with
    the forget gate at 1), whose parameter count the papers report."""
    keys = jax.random.split(key, 4)
    if init == "torch":
        bound = 1.0 / math.sqrt(hidden)
        return {"w_in": _uniform(keys[0], (fan_in, 4 * hidden), bound),
                "w_rec": _uniform(keys[1], (hidden, 4 * hidden), bound),
                "bias": _uniform(keys[2], (4 * hidden,), bound),
                "bias_rec": _uniform(keys[3], (4 * hidden,), bound)}
    w_in = jax.nn.initializers.glorot_uniform()(keys[0], (fan_in, 4 * hidden), jnp.float32)
    w_rec = jnp.concatenate([jax.nn.initializers.orthogonal()(k, (hidden, hidden), jnp.float32)
                             for k in jax.random.split(keys[1], 4)], axis=1)
    bias = jnp.zeros((4 * hidden,), jnp.float32).at[hidden:2 * hidden].set(1.0)
    return {"w_in": w_in, "w_rec": w_rec, "bias": bias}


def lstm_layer(params: Params, x: jax.Array) -> jax.Array:
    """An LSTM over (B, L, D) from zero state: (B, L, H) hidden states.

    i, f, g, o = split(x_t W_in + h_{t-1} W_rec + b); c_t = σ(f) c_{t-1} + σ(i) tanh(g);
    h_t = σ(o) tanh(c_t).
    """
    hidden = params["w_rec"].shape[0]
    bias = params["bias"] + params["bias_rec"] if "bias_rec" in params else params["bias"]
    projected = jnp.einsum("bld,dg->lbg", x, params["w_in"]) + bias

    def step(carry, gates_in):
        h, c = carry
        gates = gates_in + h @ params["w_rec"]
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), projected)
    return jnp.swapaxes(hs, 0, 1)


def _dense(params: Params, x: jax.Array) -> jax.Array:
    return x @ params["kernel"] + params["bias"]


def lstm_model(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    name: str,
    embedding: int,
    hidden: Sequence[int],
    projection: int | None = None,
    init: str = DEFAULT_INIT,
) -> Model:
    """Embedding -> LSTM layers -> optional dense projection -> dense ``head``.

    Args:
      input_shape: (L,), the sequence length.
      num_classes: the vocabulary V (logits per position).
      name: registry name.
      embedding: embedding width.
      hidden: units of each LSTM layer.
      projection: width of a linear projection after the last LSTM, or None.
      init: ``"torch"`` or ``"flax"`` (see the helpers above).

    Returns:
      The model; parameters ``embedding``, ``lstm1``, ..., [``projection``], ``head``.
    """
    shape = check_tokens(input_shape, num_classes, model=name)
    init = check_init(init)
    vocab = int(num_classes)
    for value, what in ((embedding, "embedding"), *((h, "hidden") for h in hidden),
                        *(((projection, "projection"),) if projection is not None else ())):
        if int(value) < 1:
            raise ValueError(f"{name}: {what} must be >= 1, got {value}")
    if not hidden:
        raise ValueError(f"{name}: hidden must list at least one LSTM layer")
    layers = ["embedding", *(f"lstm{i + 1}" for i in range(len(hidden)))]
    if projection is not None:
        layers.append("projection")
    layers.append("head")

    def init_fn(key: jax.Array) -> Params:
        keys = iter(jax.random.split(key, len(layers)))
        params = {"embedding": embedding_init(next(keys), vocab, embedding, init)}
        width = embedding
        for i, units in enumerate(hidden):
            params[f"lstm{i + 1}"] = lstm_init(next(keys), width, units, init)
            width = units
        if projection is not None:
            params["projection"] = dense_init(next(keys), width, projection, init)
            width = projection
        params["head"] = dense_init(next(keys), width, vocab, init)
        return params

    def apply_fn(params: Params, x: jax.Array) -> jax.Array:
        # Ids past the vocabulary clip to its last entry (a gather would fill NaN).
        h = jnp.take(params["embedding"]["table"], jnp.asarray(x, jnp.int32), axis=0,
                     mode="clip")
        for i in range(len(hidden)):
            h = lstm_layer(params[f"lstm{i + 1}"], h)
        if projection is not None:
            h = _dense(params["projection"], h)
        return _dense(params["head"], h)

    return Model(name=name, input_shape=shape, num_classes=vocab, head=("head",),
                 init_fn=jax.jit(init_fn), apply_fn=apply_fn, layers=tuple(layers))


def char_lstm(input_shape: Sequence[int], num_classes: int, *, embedding: int = 8,
              hidden: Sequence[int] = (256, 256), init: str = DEFAULT_INIT) -> Model:
    """The Shakespeare character LSTM (FedAvg paper, LEAF): embedding 8, LSTM 256 x 2."""
    return lstm_model(input_shape, num_classes, name="char_lstm", embedding=embedding,
                      hidden=tuple(hidden), init=init)


def so_lstm(input_shape: Sequence[int], num_classes: int, *, embedding: int = 96,
            hidden: int = 670, projection: int = 96, init: str = DEFAULT_INIT) -> Model:
    """The StackOverflow next-word LSTM of Reddi et al. (2021): embedding 96, LSTM 670,
    projection 96, output over the vocabulary (10,004 with the special tokens)."""
    return lstm_model(input_shape, num_classes, name="so_lstm", embedding=embedding,
                      hidden=(hidden,), projection=projection, init=init)


def sent_lstm(input_shape: Sequence[int], num_classes: int, *, vocab: int | None = None,
              embedding: int = 100, hidden: Sequence[int] = (100, 100), dense: int = 128,
              init: str = DEFAULT_INIT) -> Model:
    """LEAF's Sent140 LSTM: embedding 100 -> LSTM 100 x 2 -> the last position's state ->
    linear 128 -> the output over ``num_classes`` (LEAF's ``stacked_lstm`` with its
    n_hidden of 100; no activation between the two dense layers, as in LEAF).

    Args:
      input_shape: (L,), the words per tweet.
      num_classes: labels (2 for Sent140).
      vocab: input ids 0..vocab-1 (the embedding's rows).
    """
    shape = check_tokens(input_shape, num_classes, model="sent_lstm")
    init = check_init(init)
    if isinstance(vocab, bool) or not isinstance(vocab, int | np.integer) or vocab < 2:
        raise ValueError(f"sent_lstm: vocab (the input ids) must be an integer >= 2, "
                         f"got {vocab!r}")
    for value, what in ((embedding, "embedding"), (dense, "dense"),
                        *((h, "hidden") for h in hidden)):
        if int(value) < 1:
            raise ValueError(f"sent_lstm: {what} must be >= 1, got {value}")
    hidden = tuple(int(h) for h in hidden)
    if not hidden:
        raise ValueError("sent_lstm: hidden must list at least one LSTM layer")
    lstms = tuple(f"lstm{i + 1}" for i in range(len(hidden)))
    layers = ("embedding", *lstms, "dense", "head")
    classes, vocab = int(num_classes), int(vocab)

    def init_fn(key: jax.Array) -> Params:
        keys = iter(jax.random.split(key, len(layers)))
        params = {"embedding": embedding_init(next(keys), vocab, embedding, init)}
        width = embedding
        for name, units in zip(lstms, hidden, strict=True):
            params[name] = lstm_init(next(keys), width, units, init)
            width = units
        params["dense"] = dense_init(next(keys), width, dense, init)
        params["head"] = dense_init(next(keys), dense, classes, init)
        return params

    def apply_fn(params: Params, x: jax.Array) -> jax.Array:
        h = jnp.take(params["embedding"]["table"], jnp.asarray(x, jnp.int32), axis=0,
                     mode="clip")
        for name in lstms:
            h = lstm_layer(params[name], h)
        return _dense(params["head"], _dense(params["dense"], h[:, -1]))

    return Model(name="sent_lstm", input_shape=shape, num_classes=classes, head=("head",),
                 init_fn=jax.jit(init_fn), apply_fn=apply_fn, layers=layers)
