"""`jaxvision.models.initializers` draws what `jax.nn.initializers` draws, bit for bit, from one
compiled program per size class instead of one per parameter shape; every model's initial
parameters are those of the exact-shape draws."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvision.core.archs import get_config
from jaxvision.models import build_model, initializers

J = jax.nn.initializers
FLOOR = initializers.FLOOR
# a bias, the CNN's and the ViT's kernels, a 4-D conv kernel, sizes either side of the floor and
# of a power of two above it, and one past the cap (drawn at its own shape)
SHAPES = [(1,), (7,), (1, 1, 16), (3, 3, 1, 32), (3136, 128), (128, 10), (3, 3, 512, 512),
          (FLOOR - 1,), (FLOOR,), (FLOOR + 1,), (2 * FLOOR + 3, 2),
          (2, initializers.CAP // 2 + 1)]  # fmt: skip


def same(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    np.testing.assert_array_equal(got, want, err_msg=what)


def test_size_classes():
    assert [initializers.size_class(n) for n in (0, 1, FLOOR - 1, FLOOR)] == [FLOOR] * 4
    assert initializers.size_class(FLOOR + 1) == 2 * FLOOR
    assert initializers.size_class(3 * FLOOR) == 4 * FLOOR


@pytest.mark.parametrize(
    "scale, mode, distribution",
    list(itertools.product((1 / 3, 1.0, 2.0), ("fan_in", "fan_out", "fan_avg"),
                           ("normal", "uniform", "truncated_normal"))),
)  # fmt: skip
def test_variance_scaling_is_jaxs(scale, mode, distribution):
    ours = initializers.variance_scaling(scale, mode, distribution)
    theirs = J.variance_scaling(scale, mode, distribution)
    for i, shape in enumerate(s for s in SHAPES if len(s) >= 2):
        key = jax.random.key(i)
        same(ours(key, shape), theirs(key, shape), f"{shape}")


@pytest.mark.parametrize("exact", [False, True])
def test_the_normals_round_as_jax_0_12_does_where_it_does(exact, monkeypatch):
    """jax 0.12 draws its normal initialisers as (sqrt(2) * scale) * erf_inv(u) (`SCALED_NORMAL`,
    set by the installed jax; the other tests check the installed form). The other form, here
    against that formula written out in JAX, by size class and at each parameter's own shape."""
    monkeypatch.setattr(initializers, "SCALED_NORMAL", not initializers.SCALED_NORMAL)
    monkeypatch.setattr(initializers, "EXACT", exact)
    f32 = jnp.float32
    low = np.nextafter(np.float32(-1), np.float32(0))

    def formula(key, shape, scale):
        if not initializers.SCALED_NORMAL:  # this jax is 0.12's: the earlier form
            return (jnp.array(np.sqrt(2), f32) * jax.lax.erf_inv(
                jax.random.uniform(key, shape, f32, low, 1.0))) * jnp.array(scale, f32)  # fmt: skip
        u = jax.random.uniform(key, shape, f32, low, 1.0)
        return (jnp.array(np.sqrt(2), f32) * jnp.array(scale, f32)) * jax.lax.erf_inv(u)

    for i, shape in enumerate([(7,), (3, 3, 1, 32), (3136, 128)]):
        key = jax.random.key(200 + i)
        same(initializers.normal(0.02)(key, shape), formula(key, shape, 0.02), f"normal {shape}")
        if len(shape) >= 2:
            fan_in = np.prod(shape[:-1])
            want = formula(key, shape, jnp.sqrt(jnp.array(2.0 / fan_in, f32)))
            got = initializers.variance_scaling(2.0, "fan_in", "normal")(key, shape)
            same(got, want, f"variance_scaling {shape}")


def test_the_other_initialisers_are_jaxs():
    assert initializers.lecun_normal()(jax.random.key(0), (5, 3)).shape == (5, 3)
    for i, shape in enumerate(SHAPES):
        key = jax.random.key(100 + i)
        same(initializers.normal(0.02)(key, shape), J.normal(0.02)(key, shape), f"normal {shape}")
        if len(shape) >= 2:
            same(initializers.lecun_normal()(key, shape), J.lecun_normal()(key, shape),
                 f"lecun_normal {shape}")  # fmt: skip
        bound = 1 / np.sqrt(shape[0])  # torch's default bias, U(-1/sqrt(fan_in), +)
        want = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        same(initializers.uniform_between(-bound, bound)(key, shape), want, f"uniform {shape}")
        same(initializers.zeros(key, shape), J.zeros(key, shape, jnp.float32), f"zeros {shape}")
        same(initializers.ones(key, shape), J.ones(key, shape, jnp.float32), f"ones {shape}")
    same(initializers.zeros(None, (), jnp.int32), jnp.zeros((), jnp.int32), "int32 zeros")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, None])
def test_other_dtypes_are_jaxs(dtype):
    """Half-precision parameters, and the default dtype (float32 here), as JAX draws them."""
    key = jax.random.key(5)
    for shape in ((30, 20), (3, 3, 8, 16)):
        for ours, theirs in ((initializers.lecun_normal(), J.lecun_normal()),
                             (initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                              J.variance_scaling(1 / 3, "fan_in", "uniform")),
                             (initializers.normal(0.01), J.normal(0.01)),
                             (initializers.zeros, J.zeros),
                             (initializers.ones, J.ones)):  # fmt: skip
            same(ours(key, shape, dtype), theirs(key, shape, dtype), f"{dtype} {shape}")


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")  # JAX's, without x64
def test_float64_under_x64_is_jaxs():
    """With x64 on, the default dtype is float64 (a BatchNorm's ones too) and the scale is
    computed in float64; with it off, a float64 request draws float32, as JAX does."""
    key = jax.random.key(6)
    same(initializers.lecun_normal()(key, (30, 20), jnp.float64),
         J.lecun_normal()(key, (30, 20), jnp.float64), "float64 without x64")  # fmt: skip
    with jax.enable_x64(True):
        for dtype in (None, jnp.float64):
            same(initializers.lecun_normal()(key, (30, 20), dtype),
                 J.lecun_normal()(key, (30, 20), dtype), f"x64 {dtype}")  # fmt: skip
            same(initializers.normal(0.02)(key, (9,), dtype), J.normal(0.02)(key, (9,), dtype),
                 f"x64 {dtype}")  # fmt: skip
        same(initializers.ones(None, 4), jnp.ones(4), "x64 ones")


def test_keys_the_shortcut_does_not_cover_draw_at_their_own_shape():
    """Another generator (rbg), a raw uint32 key, a concrete key inside `jit`, and a key committed
    to a device: JAX's values, on JAX's device."""
    shape, init = (3, 3, 8, 16), initializers.variance_scaling(2.0, "fan_out", "normal")
    want = J.variance_scaling(2.0, "fan_out", "normal")
    for key in (jax.random.key(1, impl="rbg"), jax.random.PRNGKey(1)):
        same(init(key, shape), want(key, shape), str(key.dtype))
    key = jax.random.key(2)
    # (under jit, as JAX's own under jit: XLA fuses the draw and its scale either way)
    same(jax.jit(lambda: init(key, shape))(), jax.jit(lambda: want(key, shape))(), "under jit")
    committed = jax.device_put(key, jax.devices()[0])
    got, expected = init(committed, shape), want(committed, shape)
    same(got, expected, "committed key")
    assert got.committed and got.sharding == expected.sharding


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="unknown mode 'fan_geo'"):
        initializers.variance_scaling(1.0, "fan_geo", "normal")
    with pytest.raises(ValueError, match="unknown distribution 'cauchy'"):
        initializers.variance_scaling(1.0, "fan_in", "cauchy")
    with pytest.raises(ValueError, match="rank 2 or more"):
        initializers.lecun_normal()(jax.random.key(0), (5,))


def test_without_partitionable_threefry_the_draw_is_at_its_own_shape():
    """The prefix property holds only for the partitionable threefry; under the older one the
    draw is made at the parameter's own shape, and is still JAX's."""
    with jax.threefry_partitionable(False):
        key = jax.random.key(3)
        got = initializers.variance_scaling(2.0, "fan_out", "normal")(key, (3, 3, 8, 16))
        same(got, J.variance_scaling(2.0, "fan_out", "normal")(key, (3, 3, 8, 16)), "old")


# VGG16 and AlexNet draw with the initialisers the detector draws with (kaiming-normal fan-out
# and N(0, 0.01) in its backbone and RPN head, torch's default uniform kernel and bias in its box
# head), each checked above against JAX's; their exact-shape builds (5-10 s of compilation
# each) are left out here.
CONFIGS = {
    "cnn": lambda: get_config("cnn"),
    "vit": lambda: get_config("vit", "tiny"),
    "faster_rcnn": lambda: get_config("faster_rcnn"),  # the MobileNet detector, 330 variables
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_models_initial_parameters_are_the_exact_shape_draws(arch, monkeypatch):
    """Every variable of each arch's model, built by size class, equals its build with each
    parameter drawn at its own shape (the way JAX's initialisers draw), bit for bit."""
    config = CONFIGS[arch]()

    def leaves():
        model = build_model(config, rngs=nnx.Rngs(params=jax.random.key(7)))
        return jax.tree.leaves_with_path(nnx.state(model))

    fast = leaves()
    monkeypatch.setattr(initializers, "EXACT", True)
    exact = leaves()
    assert len(fast) == len(exact) > 0
    for (path, a), (_, b) in zip(fast, exact, strict=True):
        same(a, b, f"{arch} {jax.tree_util.keystr(path)}")


def test_an_abstract_build_traces_the_draws():
    """`nnx.eval_shape` (a checkpoint's or pretrained weights' model) traces the initialisers:
    no draw reaches the host, and the shapes are the eager build's."""
    config = get_config("vit", "tiny")
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    eager = build_model(config, rngs=nnx.Rngs(0))
    shapes = jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(abstract))
    assert shapes == jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(eager))
