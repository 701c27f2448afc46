"""The lab's small CNN for MNIST (seeds 001, 002, 004), in Flax NNX.

conv(1->32, 3x3, pad 1), ReLU, maxpool 2; conv(32->64, 3x3, pad 1), ReLU, maxpool 2; flatten;
FC(3136->128), ReLU, Dropout(0.5), FC(128->10). 421,642 parameters at 28x28x1 and 10 classes.

`torch_reference.models.cnn.CNN` is the PyTorch twin, with the same attribute names. Deviation
from a literal port: Flax flattens (H, W, C) where torch flattens (C, H, W), so `fc1`'s input rows
are permuted by the converter (`jaxvision.interop.convert`), not by a transpose at run time.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvision.core.model_configs import CNN_PRESETS as PRESETS  # noqa: F401  (re-exported)
from jaxvision.core.model_configs import CNNConfig
from jaxvision.models import initializers


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 on NHWC, written as reshape + max.

    Computes the same function as `lax.reduce_window(max)` (and torch's MaxPool2d(2), flooring an
    odd size), but its gradient is a cheap masked broadcast where XLA's `select_and_scatter` for
    reduce_window is about 4x slower on CPU (REFERENCE.md). On ties the gradient is split between
    the tied inputs instead of going to the first one; after a ReLU the only realistic ties are at
    zero, where the ReLU's own gradient is zero, so training is unaffected.
    """
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)  # (B, H/2, 2, W/2, 2, C)
    return x.max(axis=(2, 4))  # (B, H/2, W/2, C)


class CNN(nnx.Module):
    def __init__(self, config: CNNConfig = CNNConfig(), *, rngs: nnx.Rngs):
        self.config = config
        pad = ((1, 1), (1, 1))  # torch's padding=1; 'SAME' would be the same here, but be explicit
        # Flax's default initialisers (LeCun normal, zero bias), drawn by size class
        inits = dict(kernel_init=initializers.lecun_normal(), bias_init=initializers.zeros)
        self.conv1 = nnx.Conv(
            config.in_channels, config.conv1_features, (3, 3), padding=pad, rngs=rngs, **inits
        )
        self.conv2 = nnx.Conv(
            config.conv1_features, config.conv2_features, (3, 3), padding=pad, rngs=rngs, **inits
        )
        flat = config.pooled_size**2 * config.conv2_features
        self.fc1 = nnx.Linear(flat, config.hidden, rngs=rngs, **inits)
        self.dropout = nnx.Dropout(config.dropout)
        self.fc2 = nnx.Linear(config.hidden, config.num_classes, rngs=rngs, **inits)

    def forward_intermediates(
        self, x: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: (B, H, W, C) float32. Returns the logits and the named activations of every layer."""
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.image_size, c.image_size, c.in_channels):
            raise ValueError(
                f"CNN expects (B, {c.image_size}, {c.image_size}, {c.in_channels}) NHWC input, "
                f"got {x.shape}"
            )
        out = {}
        out["conv1"] = x = nnx.relu(self.conv1(x))  # (B, H, W, 32)
        out["pool1"] = x = max_pool_2x2(x)  # (B, H/2, W/2, 32)
        out["conv2"] = x = nnx.relu(self.conv2(x))  # (B, H/2, W/2, 64)
        out["pool2"] = x = max_pool_2x2(x)  # (B, H/4, W/4, 64)
        out["flatten"] = x = x.reshape(x.shape[0], -1)  # (B, H/4 * W/4 * 64), (H, W, C) order
        out["fc1"] = x = nnx.relu(self.fc1(x))  # (B, 128)
        x = self.dropout(x, rngs=rngs)
        out["logits"] = x = self.fc2(x)  # (B, num_classes)
        return x, out

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        return self.forward_intermediates(x, rngs=rngs)[0]


def reference_max_pool_2x2(x: jax.Array) -> jax.Array:
    """The plain formulation (`lax.reduce_window`), kept to test `max_pool_2x2` against."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
