"""Image augmentation inside the jitted step: every sample its own random crop and flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "crop_flip")


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """The CIFAR training augmentation of the PFL benchmarks (torchvision's
    ``RandomCrop(H, padding=4)`` then ``RandomHorizontalFlip()``): each image is padded
    with ``padding`` zeros on every side, an H x W window is cut at a uniformly random
    offset, and the result is mirrored left-right with probability 1/2.

    Args:
      key: PRNG key of this batch.
      images: (B, H, W, C) floats.
      padding: zero rows / columns added on each side before cropping.

    Returns:
      (B, H, W, C) augmented images.
    """
    batch, height, width = images.shape[:3]
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                     (height, width, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def augment_batch(name: str | None, key: jax.Array, images: jax.Array) -> jax.Array:
    """``images`` under the augmentation ``name`` (one of :data:`AUGMENTATIONS`)."""
    if name in (None, "none"):
        return images
    if name == "crop_flip":
        if images.ndim != 4:
            raise ValueError(f"augment='crop_flip' needs (B, H, W, C) images, got inputs of "
                             f"shape {images.shape[1:]}")
        return random_crop_flip(key, images)
    raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
