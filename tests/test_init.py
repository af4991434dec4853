"""Parameter initialization schemes: flax's defaults (unchanged) and PyTorch's."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from fedjax_sim.models import make_model

KEY = jax.random.key(0)

# Small inputs: every layer kind of each model, compiled quickly.
CASES = [("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)), ("resnet", (8, 8, 3))]


def _layers(params):
    """``(path, kernel, bias or None)`` of every dense / conv layer, and the norm layers."""
    dense, norms = [], []

    def walk(tree, path):
        if "kernel" in tree:
            dense.append((path, np.asarray(tree["kernel"]),
                          None if "bias" not in tree else np.asarray(tree["bias"])))
        elif "scale" in tree:
            norms.append((path, np.asarray(tree["scale"]), np.asarray(tree["bias"])))
        else:
            for name, sub in tree.items():
                walk(sub, f"{path}/{name}")

    walk(params, "")
    return dense, norms


def _fan_in(kernel):
    # Dense (in, out); conv HWIO: kh * kw * Cin inputs feed each output.
    return math.prod(kernel.shape[:-1])


def _check_uniform(values, bound, label):
    """Bounds, mean and std of U(-bound, bound), to about 5 standard errors."""
    n = values.size
    assert np.abs(values).max() <= bound * (1 + 1e-6), label
    std = bound / math.sqrt(3)
    assert abs(values.mean()) <= 5 * std / math.sqrt(n) + 1e-7, label
    # The sample std of n uniform draws has a standard error of about 0.26 * bound / sqrt(n).
    assert abs(values.std() - std) <= 5 * 0.26 * bound / math.sqrt(n) + 1e-7, label
    if n >= 200:  # many draws reach close to the bound (a normal with this std passes it)
        assert np.abs(values).max() >= 0.95 * bound, label


def _torch_layer(torch, kernel, has_bias):
    """The PyTorch module whose default initialization the layer reproduces."""
    if kernel.ndim == 2:
        return torch.nn.Linear(kernel.shape[0], kernel.shape[1], bias=has_bias)
    kh, kw, cin, cout = kernel.shape
    return torch.nn.Conv2d(cin, cout, (kh, kw), bias=has_bias)


@pytest.mark.parametrize("name, shape", CASES)
def test_torch_init_is_uniform_over_fan_in(name, shape):
    params = make_model(name, shape, 10, init="torch").init(KEY)
    dense, norms = _layers(params)
    assert len(dense) >= (3 if name == "mlp" else 4)
    for path, kernel, bias in dense:
        bound = 1 / math.sqrt(_fan_in(kernel))
        _check_uniform(kernel, bound, f"{name}{path}/kernel")
        if bias is not None:
            _check_uniform(bias, bound, f"{name}{path}/bias")
    for path, scale, bias in norms:
        assert (scale == 1).all() and (bias == 0).all(), f"{name}{path}"
    assert (name == "resnet") == bool(norms)


@pytest.mark.parametrize("name, shape", CASES)
def test_torch_init_matches_freshly_built_torch_modules(name, shape):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    params = make_model(name, shape, 10, init="torch").init(KEY)
    for path, kernel, bias in _layers(params)[0]:
        layer = _torch_layer(torch, kernel, bias is not None)
        pairs = [(kernel, layer.weight.detach().numpy())]
        if bias is not None:
            pairs.append((bias, layer.bias.detach().numpy()))
        for ours, theirs in pairs:
            # Same element count (PyTorch lays the conv weight out OIHW, ours is HWIO).
            assert ours.size == theirs.size, path
            n = ours.size
            bound = 1 / math.sqrt(_fan_in(kernel))
            # Both are draws of one distribution: their statistics agree to within the
            # sampling error of the two together, and neither passes the bound.
            assert np.abs(theirs).max() <= bound * (1 + 1e-6), path
            assert abs(ours.mean() - theirs.mean()) <= 5 * math.sqrt(2 / (3 * n)) * bound, path
            assert abs(ours.std() - theirs.std()) <= 5 * math.sqrt(2) * 0.26 * bound / math.sqrt(
                n), path
            assert abs(np.abs(ours).max() - np.abs(theirs).max()) <= (
                bound if n < 200 else 0.05 * bound), path


@pytest.mark.parametrize("name, shape", CASES)
def test_torch_norm_layers_match_torch_defaults(name, shape):
    torch = pytest.importorskip("torch")
    _, norms = _layers(make_model(name, shape, 10, init="torch").init(KEY))
    for path, scale, bias in norms:
        reference = torch.nn.GroupNorm(4, scale.size)
        np.testing.assert_array_equal(scale, reference.weight.detach().numpy(), err_msg=path)
        np.testing.assert_array_equal(bias, reference.bias.detach().numpy(), err_msg=path)


# Sums of kernels drawn with key 0 by the models before the init option existed: flax's
# initialization must keep giving these exact parameters.
_FLAX_KERNEL_SUMS = {
    "mlp": ("fc1", 16.479599),
    "cnn": ("conv2", -2.7166352),
    "resnet": ("stem", 0.50725573),
}


@pytest.mark.parametrize("name, shape", CASES)
def test_flax_init_is_unchanged_and_torch_is_the_default(name, shape):
    default = make_model(name, shape, 10, init="flax").init(KEY)
    layer, total = _FLAX_KERNEL_SUMS[name]
    np.testing.assert_allclose(float(default[layer]["kernel"].sum()), total, rtol=1e-5)
    for path, kernel, bias in _layers(default)[0]:
        assert bias is None or not bias.any(), path  # zero biases
        # LeCun normal: std 1/sqrt(fan_in), truncated at 2 std, so draws pass the torch bound
        assert abs(kernel.std() - 1 / math.sqrt(_fan_in(kernel))) < 0.2 / math.sqrt(
            _fan_in(kernel)), path
    torch_params = make_model(name, shape, 10, init="torch").init(KEY)
    assert not np.array_equal(torch_params[layer]["kernel"], default[layer]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, make_model(name, shape, 10).init(KEY),
                 torch_params)


def test_torch_init_is_the_same_for_every_conv_impl():
    params = [make_model("cnn", (8, 8, 1), 10, conv_impl=impl, init="torch").init(KEY)
              for impl in ("xla", "im2col", "winograd")]
    for other in params[1:]:
        jax.tree.map(np.testing.assert_array_equal, params[0], other)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("init", ["pytorch", "", None, "Torch"])
def test_unknown_init_is_refused(name, init):
    with pytest.raises(ValueError, match=r"init must be one of flax, torch, got"):
        make_model(name, (8, 8, 3), 10, init=init)


def test_cli_records_init(tmp_path, capsys):
    from fedjax_sim.cli import main

    out = tmp_path / "run"
    for init, flags in [("flax", ["--init", "flax"]), ("torch", [])]:
        main(["run", "--algorithm", "fedavg", *flags, "--output", str(out / init),
              "--num-clients", "3", "--rounds", "1", "--local-epochs", "1", "--no-progress"])
        summary = json.loads((out / init / "summary.json").read_text())
        assert summary["init"] == init and summary["model"] == "mlp"
        config = json.loads((out / init / "config.json").read_text())
        assert config["identity"]["init"] == init
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--init", "kaiming", "--output", str(tmp_path / "bad"), "--no-progress"])
    assert exit_info.value.code == 2
    assert "--init must be one of flax, torch" in capsys.readouterr().err
