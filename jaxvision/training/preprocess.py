"""Model inputs on the device: standardisation, and the ImageNet archs' resize to RGB.
`torch_reference.preprocess` is the torch twin (a test checks the two agree)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvision.core.archs import Arch
from jaxvision.core.preprocess import IMAGENET_MEAN, IMAGENET_STD


def standardize(x: jax.Array, mean, std) -> jax.Array:
    """float32 images in [0, 1] -> standardised with the training set's statistics."""
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def imagenet_input(x: jax.Array, size: int) -> jax.Array:
    """[0, 1] images (B, H, W, C) -> (B, size, size, 3), ImageNet-normalised, for VGG / AlexNet.

    Bilinear without antialiasing: torch's interpolate(mode='bilinear', align_corners=False,
    antialias=False), which the torch backend uses.
    """
    b, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), "bilinear", antialias=False)
    if c == 1:
        x = jnp.broadcast_to(x, (b, size, size, 3))  # grey -> RGB
    return standardize(x, IMAGENET_MEAN, IMAGENET_STD)


def model_input(x: jax.Array, arch: Arch, model_cfg, mean, std) -> jax.Array:
    """[0, 1] images (B, H, W, C) -> what `arch`'s model takes: ImageNet-normalised at its
    image size, or standardised with the training set's `mean` and `std`."""
    if arch.imagenet:
        return imagenet_input(x, model_cfg.image_size)
    return standardize(x, mean, std)
