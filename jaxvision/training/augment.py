"""Random affine augmentation on the device, vectorised over the batch, inside the jitted step.

Each image gets its own rotation (up to +-15 degrees), translation (up to 10% of the size on each
axis) and scale (0.9 to 1.1), like torchvision's RandomAffine(15, (0.1, 0.1), (0.9, 1.1)) and
asnelt/mnistvit's recipe, but drawn per image rather than per batch.

The warp is defined exactly as torch's `F.affine_grid` + `F.grid_sample` (bilinear, zero padding,
align_corners=False), which `torch_reference.augment` uses, so the two agree pixel for pixel on
the same parameters (a parity test checks it).
"""

import math

import jax
import jax.numpy as jnp

from jaxvision.core.preprocess import MAX_DEGREES, MAX_TRANSLATE, SCALE_RANGE


def sample_params(key: jax.Array, batch: int) -> tuple[jax.Array, ...]:
    """Per-image (angle in radians, tx, ty as fractions of the size, scale), each (B,)."""
    ka, kx, ky, ks = jax.random.split(key, 4)
    max_angle = math.radians(MAX_DEGREES)
    angle = jax.random.uniform(ka, (batch,), minval=-max_angle, maxval=max_angle)
    tx = jax.random.uniform(kx, (batch,), minval=-MAX_TRANSLATE, maxval=MAX_TRANSLATE)
    ty = jax.random.uniform(ky, (batch,), minval=-MAX_TRANSLATE, maxval=MAX_TRANSLATE)
    scale = jax.random.uniform(ks, (batch,), minval=SCALE_RANGE[0], maxval=SCALE_RANGE[1])
    return angle, tx, ty, scale


def affine_theta(angle, tx, ty, scale) -> jax.Array:
    """(B, 2, 3): output -> input map in normalised [-1, 1] coordinates (torch's `theta`).

    The image is rotated by `angle`, scaled by `scale` and shifted by (tx, ty) of its size; the
    sampler needs the inverse: in = R(-angle) / scale @ (out - t), with t = 2 (tx, ty).
    """
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale  # (B,)
    t_x, t_y = 2.0 * tx, 2.0 * ty  # a full width is 2 in normalised units
    row0 = jnp.stack([cos, sin, -(cos * t_x + sin * t_y)], axis=-1)  # (B, 3)
    row1 = jnp.stack([-sin, cos, -(-sin * t_x + cos * t_y)], axis=-1)  # (B, 3)
    return jnp.stack([row0, row1], axis=1)  # (B, 2, 3)


def _warp_one(image: jax.Array, theta: jax.Array) -> jax.Array:
    """Bilinear resampling of one (H, W, C) image through theta (2, 3), zeros outside."""
    h, w, _ = image.shape
    xs = (2.0 * jnp.arange(w) + 1.0) / w - 1.0  # pixel centres, align_corners=False
    ys = (2.0 * jnp.arange(h) + 1.0) / h - 1.0
    gx = theta[0, 0] * xs[None, :] + theta[0, 1] * ys[:, None] + theta[0, 2]  # (H, W)
    gy = theta[1, 0] * xs[None, :] + theta[1, 1] * ys[:, None] + theta[1, 2]  # (H, W)
    ix = ((gx + 1.0) * w - 1.0) / 2.0  # normalised -> pixel coordinates
    iy = ((gy + 1.0) * h - 1.0) / 2.0
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    wx1, wy1 = ix - x0, iy - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1

    def tap(yy, xx):
        inside = (xx >= 0) & (xx <= w - 1) & (yy >= 0) & (yy <= h - 1)  # (H, W)
        yi = jnp.clip(yy, 0, h - 1).astype(jnp.int32)
        xi = jnp.clip(xx, 0, w - 1).astype(jnp.int32)
        return image[yi, xi] * inside[..., None]  # (H, W, C)

    return (
        tap(y0, x0) * (wy0 * wx0)[..., None]
        + tap(y0, x0 + 1) * (wy0 * wx1)[..., None]
        + tap(y0 + 1, x0) * (wy1 * wx0)[..., None]
        + tap(y0 + 1, x0 + 1) * (wy1 * wx1)[..., None]
    )


def warp_affine(images: jax.Array, theta: jax.Array) -> jax.Array:
    """(B, H, W, C) float images resampled through per-image theta (B, 2, 3)."""
    return jax.vmap(_warp_one)(images, theta)


def random_affine(key: jax.Array, images: jax.Array) -> jax.Array:
    """(B, H, W, C) float images, each with its own random rotation, shift and scale."""
    return warp_affine(images, affine_theta(*sample_params(key, images.shape[0])))
