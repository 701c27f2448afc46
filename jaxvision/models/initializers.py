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
on the host too. Past `CAP` values, under a trace, or for a generator without the prefix
property, a draw is JAX's own at its own shape. parity_tests/test_initializers.py checks each
initialiser against JAX's, and every model against its build with each parameter drawn at its own
shape.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

FLOOR = 2**18  # draws of fewer elements share one program; 2**18 normals take ~3 ms on a CPU
# Larger parameters are drawn at their own shape: a power of two would draw up to twice the values
# (VGG16's 103M-value fc1 as 134M) and hold them on the host, to save one 0.17 s compilation.
CAP = 2**22
EXACT = False  # True: draw at each parameter's own shape (JAX's way; the tests' reference)
KINDS = ("normal", "uniform", "truncated_normal")
DRAWS = (*KINDS, "erf_inv")  # what `draw` takes

# jax 0.12 draws its normal initialisers as (sqrt(2) * scale) * erf_inv(u), a rounding apart
# from 0.10's and 0.11's (sqrt(2) * erf_inv(u)) * scale (jax's note: XLA now reassociates the
# constants under jit), through a helper of its own; its presence tells which. The project pins
# jax < 0.12 (docs/performance.md), and parity_tests/test_initializers.py checks both forms.
try:
    from jax._src.nn import initializers as jax_initializers  # private: only to tell the form
except ImportError:  # a jax that moved it
    jax_initializers = None
SCALED_NORMAL = hasattr(jax_initializers, "_scaled_normal")


def size_class(n: int) -> int:
    """The number of values actually drawn for n: the next power of two, at least FLOOR."""
    return max(FLOOR, 1 << max(n - 1, 0).bit_length())


def as_shape(shape) -> tuple:
    """A shape as JAX's initialisers take it: an int or a sequence of ints."""
    return (shape,) if isinstance(shape, int) else tuple(shape)


def canonical(dtype):
    """The dtype JAX's initialisers draw in: its default float for None, and float64 as float32
    unless x64 is on."""
    return jax.dtypes.canonicalize_dtype(float if dtype is None else dtype)


def _sample(kind: str, key: jax.Array, shape: tuple, dtype, low, high) -> jax.Array:
    if kind == "normal":
        return jax.random.normal(key, shape, dtype)
    if kind == "erf_inv":  # a standard normal / sqrt(2), as jax.random.normal draws it
        # (jax 0.12's normal initialisers scale this; `_scaled_normal`)
        low = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
        return jax.lax.erf_inv(jax.random.uniform(key, shape, dtype, low, 1.0))
    if kind == "uniform":
        return jax.random.uniform(key, shape, dtype, low, high)
    return jax.random.truncated_normal(key, low, high, shape, dtype)


def _threefry(key: jax.Array) -> bool:
    """Whether `key` draws with threefry, whose partitionable form has the prefix property (a
    typed key's own generator; a raw uint32 key the default one)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == "threefry2x32"
    return jax.config.jax_default_prng_impl == "threefry2x32"


def draw(kind: str, key: jax.Array, shape, dtype, low=0.0, high=1.0) -> np.ndarray | jax.Array:
    """`jax.random.<kind>(key, shape, dtype, ...)`'s values: `normal`, `uniform` on [low, high),
    or `truncated_normal` to (low, high); or `erf_inv`, a standard normal / sqrt(2).

    By size class, on the host, where that gives JAX's values; otherwise JAX's own draw at its
    own shape: under a trace (`nnx.eval_shape`, `jit`: one traced program either way), for a
    generator other than partitionable threefry, and past `CAP` values."""
    if kind not in DRAWS:
        raise ValueError(f"unknown distribution {kind!r}; available: {', '.join(DRAWS)}")
    shape = as_shape(shape)
    n = math.prod(shape)
    exact = (EXACT or n > CAP or not jax.config.jax_threefry_partitionable
             or not _threefry(key))  # fmt: skip
    if not exact:
        drawn = _sample(kind, key, (size_class(n),), dtype, low, high)
        if not isinstance(drawn, jax.core.Tracer):  # a concrete key inside a trace is traced
            values = np.asarray(drawn)[:n].reshape(shape)
            return values if not key.committed else jax.device_put(values, key.sharding)
    return _sample(kind, key, shape, dtype, low, high)


def _scaled(values, factor) -> jax.Array:
    """values * factor, factor rounded to the values' dtype first, as JAX promotes it (in numpy
    for a host draw: the same correctly rounded product)."""
    return jnp.asarray(values * np.asarray(factor, values.dtype))


def _scaled_normal(key, shape, dtype, scale) -> jax.Array:
    """A normal draw times `scale`, rounded as the installed jax's normal initialisers round."""
    if SCALED_NORMAL:
        factor = np.asarray(np.sqrt(2), dtype) * np.asarray(scale, dtype)  # rounded to dtype
        return _scaled(draw("erf_inv", key, shape, dtype), factor)
    return _scaled(draw("normal", key, shape, dtype), scale)


def normal(stddev: float):
    """jax.nn.initializers.normal(stddev)."""

    def init(key, shape, dtype=None):
        return _scaled_normal(key, shape, canonical(dtype), stddev)

    return init


def uniform_between(low: float, high: float):
    """`jax.random.uniform(key, shape, dtype, low, high)` as an initialiser."""

    def init(key, shape, dtype=None):
        return jnp.asarray(draw("uniform", key, shape, canonical(dtype), low, high))

    return init


MODES = ("fan_in", "fan_out", "fan_avg")


def variance_scaling(scale: float, mode: str, distribution: str):
    """jax.nn.initializers.variance_scaling(scale, mode, distribution) with its default axes:
    the input dimension second to last, the output dimension last, the rest receptive field."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available: {', '.join(MODES)}")
    if distribution not in KINDS:
        raise ValueError(f"unknown distribution {distribution!r}; available: {', '.join(KINDS)}")

    def init(key, shape, dtype=None):
        dtype = canonical(dtype)
        shape = as_shape(shape)
        if len(shape) < 2:
            raise ValueError(f"variance scaling needs a shape of rank 2 or more, got {shape}")
        receptive = math.prod(shape) / shape[-2] / shape[-1] / 1  # JAX's arithmetic, in order
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
        variance = np.asarray(scale / denominator[mode], dtype)
        if distribution == "normal":
            return _scaled_normal(key, shape, dtype, np.sqrt(variance))
        if distribution == "uniform":
            return _scaled(draw("uniform", key, shape, dtype, -1.0), np.sqrt(3 * variance))
        # the standard deviation of a standard normal truncated to (-2, 2), as JAX divides
        stddev = np.sqrt(variance) / np.asarray(0.87962566103423978, dtype)
        return _scaled(draw("truncated_normal", key, shape, dtype, -2.0, 2.0), stddev)

    return init


def lecun_normal():
    """jax.nn.initializers.lecun_normal(): Flax's default for Linear and Conv kernels."""
    return variance_scaling(1.0, "fan_in", "truncated_normal")


def zeros(key, shape, dtype=None) -> jax.Array:
    """jax.nn.initializers.zeros, made on the host (no compilation per shape)."""
    return jnp.asarray(np.zeros(shape, canonical(dtype)))


def ones(key, shape, dtype=None) -> jax.Array:
    """jax.nn.initializers.ones, made on the host."""
    return jnp.asarray(np.ones(shape, canonical(dtype)))
