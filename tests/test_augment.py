"""CIFAR augmentation in the jitted step: crops and flips as torchvision makes them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import algorithms
from fedjax_sim.core import local
from fedjax_sim.kernels.augment import augment_batch, random_crop_flip
from fedjax_sim.models import make_model


def test_each_image_is_a_padded_crop_maybe_mirrored():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(64, 6, 5, 2)), jnp.float32)
    out = np.asarray(random_crop_flip(jax.random.key(3), images, padding=2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    seen_offsets, flips = set(), 0
    for b in range(64):
        matches = [(i, j, f) for i in range(5) for j in range(5) for f in (False, True)
                   if np.array_equal(out[b], (lambda c, f=f: c[:, ::-1] if f else c)(
                       padded[b, i:i + 6, j:j + 5]))]
        assert matches, f"image {b} is no crop of its padded image"
        seen_offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(seen_offsets) > 10 and 16 < flips < 48


def test_augmentation_draws_fresh_crops_every_step_and_leaves_unset_runs_alone():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 6, 6, 1)), jnp.float32)
    y = jnp.zeros((8,), jnp.int32)
    seen = []

    def step(carry, xb, yb, wb):
        return carry + 1, jnp.sum(xb)

    key = jax.random.key(0)
    _, plain = local.scan_batches(step, 0, x, y, jnp.int32(8), key, batch_size=8, epochs=1)
    _, plain_none = local.scan_batches(step, 0, x, y, jnp.int32(8), key, batch_size=8,
                                       epochs=1, augment="none")
    assert float(plain) == float(plain_none)
    for epochs in (1, 2):
        _, loss = local.scan_batches(step, 0, x, y, jnp.int32(8), key, batch_size=8,
                                     epochs=epochs, augment="crop_flip")
        seen.append(float(loss))
    assert seen[0] != float(plain) and seen[1] != seen[0]
    with pytest.raises(ValueError, match="fixed batch order"):
        local.scan_batches(step, 0, x, y, jnp.int32(8), local.FixedOrder(jnp.zeros((1, 8),
                           jnp.int32)), batch_size=8, epochs=1, augment="crop_flip")
    with pytest.raises(ValueError, match="augment must be one of"):
        augment_batch("rotate", key, x)


def test_augment_is_refused_for_inputs_that_are_not_images():
    model = make_model("mlp", (40,), 10)
    with pytest.raises(ValueError, match="augment='crop_flip' needs image inputs"):
        algorithms.make("fedavg", model, augment="crop_flip")
    with pytest.raises(ValueError, match="augment must be one of"):
        algorithms.make("fedavg", model, augment="mixup")
