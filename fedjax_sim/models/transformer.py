"""A small causal (decoder-only) transformer for next-token prediction.

Token and learned position embeddings, ``depth`` pre-LayerNorm blocks (causal multi-head
self-attention, then a GELU MLP, each with a residual), a final LayerNorm and the output
``head`` over the vocabulary: int tokens (B, L) -> logits (B, L, V), the same interface
as the LSTMs (``models.lstm``), so every algorithm runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.models.base import Model, Params
from fedjax_sim.models.layers import DEFAULT_INIT, check_init
from fedjax_sim.models.lstm import check_tokens, dense_init, embedding_init


def _layer_norm(params: Params, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * params["scale"] + params["bias"]


def _norm_init(dim: int) -> Params:
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def _dense(params: Params, x: jax.Array) -> jax.Array:
    return x @ params["kernel"] + params["bias"]


def _attention(params: Params, x: jax.Array, heads: int) -> jax.Array:
    batch, length, dim = x.shape
    q, k, v = jnp.split(_dense(params["qkv"], x), 3, axis=-1)
    split = lambda t: t.reshape(batch, length, heads, dim // heads)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(dim // heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), split(v))
    return _dense(params["out"], out.reshape(batch, length, dim))


def transformer(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dim: int = 128,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 4,
    init: str = DEFAULT_INIT,
) -> Model:
    """The causal transformer.

    Args:
      input_shape: (L,), the sequence length (positions are learned for L).
      num_classes: the vocabulary V.
      dim: model width, a multiple of ``heads``.
      depth: number of blocks, >= 1.
      heads: attention heads.
      mlp_ratio: MLP width / ``dim``.
      init: ``"torch"`` (nn.Embedding N(0, 1), nn.Linear uniforms) or ``"flax"``.

    Returns:
      The model; parameters ``embedding``, ``position``, ``block1`` .. ``block{depth}``,
      ``final_norm``, ``head``.

    Raises:
      ValueError: naming the option and its allowed range.
    """
    (length,) = check_tokens(input_shape, num_classes, model="transformer")
    init = check_init(init)
    for value, what in ((dim, "dim"), (depth, "depth"), (heads, "heads"),
                        (mlp_ratio, "mlp_ratio")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"transformer: {what} must be an integer >= 1, got {value!r}")
    if dim % heads:
        raise ValueError(f"transformer: dim ({dim}) must be a multiple of heads ({heads})")
    vocab = int(num_classes)
    blocks = [f"block{i + 1}" for i in range(depth)]
    layers = ("embedding", "position", *blocks, "final_norm", "head")

    def init_fn(key: jax.Array) -> Params:
        keys = jax.random.split(key, 3 + 4 * depth)
        params = {"embedding": embedding_init(keys[0], vocab, dim, init),
                  "position": {"table": 0.02 * jax.random.normal(keys[1], (length, dim))}}
        for i, name in enumerate(blocks):
            k = keys[3 + 4 * i: 7 + 4 * i]
            params[name] = {
                "norm1": _norm_init(dim), "qkv": dense_init(k[0], dim, 3 * dim, init),
                "out": dense_init(k[1], dim, dim, init), "norm2": _norm_init(dim),
                "fc": dense_init(k[2], dim, mlp_ratio * dim, init),
                "proj": dense_init(k[3], mlp_ratio * dim, dim, init)}
        params["final_norm"] = _norm_init(dim)
        params["head"] = dense_init(keys[2], dim, vocab, init)
        return params

    def apply_fn(params: Params, x: jax.Array) -> jax.Array:
        tokens = jnp.asarray(x, jnp.int32)
        h = jnp.take(params["embedding"]["table"], tokens, axis=0, mode="clip")
        h = h + params["position"]["table"][: tokens.shape[1]]
        for name in blocks:
            block = params[name]
            h = h + _attention(block, _layer_norm(block["norm1"], h), heads)
            inner = jax.nn.gelu(_dense(block["fc"], _layer_norm(block["norm2"], h)))
            h = h + _dense(block["proj"], inner)
        return _dense(params["head"], _layer_norm(params["final_norm"], h))

    return Model(name="transformer", input_shape=(length,), num_classes=vocab,
                 head=("head",), init_fn=jax.jit(init_fn), apply_fn=apply_fn, layers=layers)
