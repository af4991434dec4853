"""Tests of fedjax_sim.models: conv / pool equivalences, parameter counts, shapes, registry.

Shape-only checks go through ``jax.eval_shape``, which compiles nothing, to keep the file
fast on CPU; value checks are jitted once per case.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_sim.models import MODELS, TOKEN_MODELS, count_params, make_model, winograd
from fedjax_sim.models.layers import (
    Conv,
    conv2d,
    max_pool_2x2,
    resolve_conv_impl,
    uses_winograd,
)

KEY = jax.random.key(0)


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _lax_conv(x, kernel, bias, padding):
    y = lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + bias


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize(
    "x_shape,k_shape",
    [((2, 9, 9, 1), (5, 5, 1, 4)), ((3, 7, 6, 3), (3, 2, 3, 5)), ((2, 5, 5, 4), (1, 1, 4, 3)),
     # 32 input channels: row patches 5 * 32 wide, kernel gradient transposed
     ((2, 7, 8, 32), (3, 5, 32, 8)),
     # 8 input channels: row patches 3 * 8 wide, kernel gradient direct
     ((2, 6, 7, 8), (2, 3, 8, 4)),
     # Winograd F(2x2, 5x5) and F(2x2, 4x3) with odd output sides
     ((2, 9, 10, 8), (5, 5, 8, 6)), ((1, 11, 9, 9), (4, 3, 9, 3))],
)
def test_conv_impls_match_lax_conv(padding, x_shape, k_shape):
    x, kernel = _normal(0, x_shape), _normal(1, k_shape)
    bias = _normal(2, k_shape[-1:])

    def outputs_and_grads(conv):
        out = conv(x, kernel, bias)
        # A random cotangent, so that every output position weighs differently.
        g = _normal(3, out.shape)
        grads = jax.grad(lambda *a: jnp.sum(conv(*a) * g), argnums=(0, 1, 2))(x, kernel, bias)
        return out, grads

    ref_out, ref_grads = jax.jit(outputs_and_grads, static_argnums=0)(
        lambda x, k, b: _lax_conv(x, k, b, padding)
    )
    for impl in ("im2col", "winograd", "xla"):
        out, grads = jax.jit(outputs_and_grads, static_argnums=0)(
            lambda x, k, b, impl=impl: conv2d(x, k, b, padding=padding, impl=impl)
        )
        assert out.shape == ref_out.shape
        # Errors relative to each array's largest entry: float32 rounding of sums of up
        # to 480 products; Winograd's transforms (weights up to 5) add a few units more.
        for a, b in zip((out, *grads), (ref_out, *ref_grads), strict=True):
            scale = float(np.abs(b).max())
            np.testing.assert_allclose(a, b, rtol=0, atol=5e-6 * scale, err_msg=impl)


def test_conv_rejects_bad_names():
    x, k = jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2))
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, k, padding="FULL")
    with pytest.raises(ValueError, match="im2col, winograd"):
        conv2d(x, k, impl="cudnn")
    assert resolve_conv_impl("auto") == ("winograd" if jax.default_backend() == "cpu" else "xla")


@pytest.mark.parametrize("r", range(1, winograd.MAX_KERNEL + 1))
def test_winograd_transforms_compute_correlation(r):
    a_t, g, b_t = winograd.transforms(r)
    rng = np.random.default_rng(r)
    for _ in range(3):
        d, k = rng.standard_normal(r + 1), rng.standard_normal(r)
        direct = [d[i : i + r] @ k for i in range(2)]
        np.testing.assert_allclose(a_t @ ((g @ k) * (b_t @ d)), direct, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="kernel side"):
        winograd.transforms(winograd.MAX_KERNEL + 1)


def test_winograd_applies_to_deep_small_kernels():
    # The FedAvg CNN: conv1 (1 input channel) stays im2col, conv2 runs as Winograd.
    assert not uses_winograd((5, 5, 1, 32)) and uses_winograd((5, 5, 32, 64))
    assert uses_winograd((3, 2, 8, 4)) and not uses_winograd((3, 3, 7, 4))
    assert not uses_winograd((1, 1, 64, 64)) and not uses_winograd((7, 7, 64, 64))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_matches_flax(shape):
    x = _normal(4, shape)

    @jax.jit
    def pools(x):
        ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
        grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) ** 2))(x)
        return max_pool_2x2(x), ref(x), grad(max_pool_2x2), grad(ref)

    out, ref, g, g_ref = pools(x)
    np.testing.assert_array_equal(out, ref)
    # Normal samples have no ties, so the gradients agree too.
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def test_conv_module_matches_nn_conv():
    x = _normal(5, (2, 6, 6, 3))
    ours = Conv(4, (3, 3), padding="SAME", impl="im2col", param_init="flax")
    ref = nn.Conv(4, (3, 3), padding="SAME")

    @jax.jit
    def run(key):
        p_ours, p_ref = ours.init(key, x), ref.init(key, x)
        return p_ours, p_ref, ours.apply(p_ref, x), ref.apply(p_ref, x)

    p_ours, p_ref, y_ours, y_ref = run(KEY)
    # Same names, shapes and (with flax's initialization) initial values as nn.Conv.
    jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)
    np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,shape,expected",
    [("mlp", (28, 28, 1), 199_210), ("cnn", (28, 28, 1), 582_026), ("cnn", (32, 32, 3), 878_538)],
)
def test_param_counts(name, shape, expected):
    model = make_model(name, shape, 10)
    assert count_params(jax.eval_shape(model.init, KEY)) == expected


SHAPES = [(28, 28, 1), (8, 8, 1), (32, 32, 3)]
# Image and vector models here; the token models are tested in tests/test_token_models.py.
CASES = [(n, s) for n in MODELS if n not in TOKEN_MODELS for s in SHAPES] + [
    ("mlp", (40, 1)), ("mlp", (60,))]


@pytest.mark.parametrize("name,shape", CASES)
def test_apply_shapes_and_head(name, shape):
    model = make_model(name, shape, 7)
    params = jax.eval_shape(model.init, KEY)
    assert type(params) is dict and "params" not in params and model.head == ("head",)
    assert set(params["head"]) == {"kernel", "bias"}
    logits = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((3, *shape), jnp.float32))
    assert logits.shape == (3, 7)

    mask = model.head_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for top, sub in mask.items():
        assert all(leaf is (top == "head") for leaf in jax.tree.leaves(sub))


@pytest.mark.parametrize(
    "name,shape", [("cnn", (28, 28, 1)), ("cnn", (8, 8, 1)), ("resnet", (8, 8, 3))]
)
def test_conv_impls_agree(name, shape):
    models = {impl: make_model(name, shape, 10, conv_impl=impl)
              for impl in ("xla", "im2col", "winograd")}
    x = _normal(6, (4, *shape))

    @jax.jit
    def run(key):
        params = models["xla"].init(key)
        return {impl: model.apply(params, x) for impl, model in models.items()}

    outs = run(KEY)
    assert outs["xla"].shape == (4, 10) and bool(jnp.all(jnp.isfinite(outs["xla"])))
    for impl in ("im2col", "winograd"):
        np.testing.assert_allclose(outs[impl], outs["xla"], rtol=1e-4, atol=1e-5)


def test_cnn_padding_choice():
    # 8x8 digits are too small for two valid 5x5 convolutions; SAME keeps 2x2x64 features.
    small = jax.eval_shape(make_model("cnn", (8, 8, 1), 10).init, KEY)
    assert small["fc1"]["kernel"].shape == (2 * 2 * 64, 512)
    with pytest.raises(ValueError, match="too small"):
        make_model("cnn", (3, 3, 1), 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mlp, cnn, resnet"):
        make_model("vgg", (28, 28, 1), 10)
    with pytest.raises(ValueError, match="num_classes"):
        make_model("mlp", (28, 28, 1), 1)
    for name in ("cnn", "resnet"):
        with pytest.raises(ValueError, match="input_shape"):
            make_model(name, (40, 1), 10)
    with pytest.raises(ValueError, match="conv impl"):
        make_model("cnn", (28, 28, 1), 10, conv_impl="fast")


def test_init_vmaps_over_clients():
    # Per-client parameters are stacked on a leading client axis (K, ...).
    model = make_model("cnn", (28, 28, 1), 10)
    params = jax.eval_shape(jax.vmap(model.init), jax.random.split(KEY, 5))
    assert params["conv1"]["kernel"].shape == (5, 5, 5, 1, 32)
    assert params["head"]["bias"].shape == (5, 10)
