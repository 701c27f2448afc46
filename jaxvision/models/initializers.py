"""The parameter initialisers the models use: `jax.nn.initializers`' values, bit for bit, from
a handful of compiled programs instead of one per parameter shape.

A model is built eagerly, and JAX compiles each random draw for its shape: about 0.17 s of
XLA:CPU time for every new shape (the threefry generator alone). The MobileNet detector's 330
variables took 135 compilations, 15-18 s before its first step; the CNN's 8 variables 2 s.

With JAX's partitionable threefry (the default), element i of a draw depends on the key and i
alone, and every distribution here maps each element on its own (an inverse error function, an
affine map), so the draw of n values is the first n values of a larger draw with the same key.
`draw` therefore samples at a size class (the next power of two, and at least `FLOOR` elements,
whose draw takes ~3 ms) and keeps the first n on the host; the scale is then one float32
multiply in numpy, the same correctly rounded product XLA computes. The zeros and ones are made
on the host too. parity_tests/test_initializers.py checks each initialiser against JAX's, and
every model against its build with each parameter drawn at its own shape.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

FLOOR = 2**18  # draws of fewer elements share one program; 2**18 normals take ~3 ms on a CPU
EXACT = False  # True: draw at each parameter's own shape (JAX's way; the tests' reference)


def size_class(n: int) -> int:
    """The number of values actually drawn for n: the next power of two, at least FLOOR."""
    return max(FLOOR, 1 << max(n - 1, 0).bit_length())


def _sample(kind: str, key: jax.Array, shape: tuple, dtype, low, high) -> jax.Array:
    if kind == "normal":
        return jax.random.normal(key, shape, dtype)
    if kind == "uniform":
        return jax.random.uniform(key, shape, dtype, low, high)
    return jax.random.truncated_normal(key, low, high, shape, dtype)


def draw(kind: str, key: jax.Array, shape, dtype, low=0.0, high=1.0) -> np.ndarray | jax.Array:
    """`jax.random.<kind>(key, shape, dtype, ...)`'s values: `normal`, `uniform` on [low, high),
    or `truncated_normal` to (low, high). On the host, except under a trace (`nnx.eval_shape`,
    `jit`), where the draw is JAX's own, at its own shape, in the one traced program."""
    shape = tuple(shape)
    n = math.prod(shape)
    exact = EXACT or not jax.config.jax_threefry_partitionable  # no prefix property without it
    if exact or isinstance(key, jax.core.Tracer):
        return _sample(kind, key, shape, dtype, low, high)
    return np.asarray(_sample(kind, key, (size_class(n),), dtype, low, high))[:n].reshape(shape)


def _scaled(values, factor) -> jax.Array:
    """values * factor, factor rounded to the values' dtype first, as JAX promotes it."""
    return jnp.asarray(values * np.asarray(factor, values.dtype))


def normal(stddev: float):
    """jax.nn.initializers.normal(stddev)."""

    def init(key, shape, dtype=jnp.float32):
        return _scaled(draw("normal", key, shape, dtype), stddev)

    return init


def uniform_between(low: float, high: float):
    """`jax.random.uniform(key, shape, dtype, low, high)` as an initialiser."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.asarray(draw("uniform", key, shape, dtype, low, high))

    return init


def variance_scaling(scale: float, mode: str, distribution: str):
    """jax.nn.initializers.variance_scaling(scale, mode, distribution) with its default axes:
    the input dimension second to last, the output dimension last, the rest receptive field."""

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(shape)
        receptive = math.prod(shape) / shape[-2] / shape[-1] / 1  # JAX's arithmetic, in order
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
        variance = np.asarray(scale / denominator[mode], dtype)
        if distribution == "normal":
            return _scaled(draw("normal", key, shape, dtype), np.sqrt(variance))
        if distribution == "uniform":
            return _scaled(draw("uniform", key, shape, dtype, -1.0), np.sqrt(3 * variance))
        if distribution == "truncated_normal":
            # the standard deviation of a standard normal truncated to (-2, 2), as JAX divides
            stddev = np.sqrt(variance) / np.asarray(0.87962566103423978, dtype)
            return _scaled(draw("truncated_normal", key, shape, dtype, -2.0, 2.0), stddev)
        raise ValueError(f"unknown distribution {distribution!r}")

    return init


def lecun_normal():
    """jax.nn.initializers.lecun_normal(): Flax's default for Linear and Conv kernels."""
    return variance_scaling(1.0, "fan_in", "truncated_normal")


def zeros(key, shape, dtype=jnp.float32) -> jax.Array:
    """jax.nn.initializers.zeros, made on the host (no compilation per shape)."""
    return jnp.asarray(np.zeros(shape, dtype))


def ones(key, shape, dtype=jnp.float32) -> jax.Array:
    """jax.nn.initializers.ones, made on the host."""
    return jnp.asarray(np.ones(shape, dtype))
