"""The lab CNN: shapes, parameter count, and torch <-> Flax parity on real digits.

Tolerance: logits within 1e-5 max abs difference (float32, eval mode, highest matmul precision),
HuggingFace's bar for PyTorch-to-Flax equivalence (REFERENCE.md).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxvision.core.errors import ConversionError
from jaxvision.core.model_configs import CNN_PRESETS, CNNConfig
from jaxvision.interop import convert
from jaxvision.models.cnn import CNN, max_pool_2x2, reference_max_pool_2x2
from torch_reference.models.cnn import CNN as TorchCNN

ATOL = 1e-5
CNN_PARAMS = 421_642  # conv1 320 + conv2 18,496 + fc1 401,536 + fc2 1,290


def flax_cnn(config=CNNConfig(), seed=0) -> CNN:
    return nnx.view(CNN(config, rngs=nnx.Rngs(params=seed)), deterministic=True)


def torch_cnn(config=CNNConfig(), seed=0) -> TorchCNN:
    torch.manual_seed(seed)
    return TorchCNN(config).eval()


def test_parameter_count_is_pinned_and_equal():
    model = flax_cnn()
    n_flax = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_torch = sum(p.numel() for p in torch_cnn().parameters())
    assert n_flax == n_torch == CNN_PARAMS


@pytest.mark.parametrize("preset", CNN_PRESETS)
def test_layer_shapes(preset):
    c = CNN_PRESETS[preset]
    x = jnp.zeros((3, 28, 28, 1))
    logits, out = flax_cnn(c).forward_intermediates(x)
    chex.assert_shape(out["conv1"], (3, 28, 28, c.conv1_features))
    chex.assert_shape(out["pool1"], (3, 14, 14, c.conv1_features))
    chex.assert_shape(out["conv2"], (3, 14, 14, c.conv2_features))
    chex.assert_shape(out["pool2"], (3, 7, 7, c.conv2_features))
    chex.assert_shape(out["flatten"], (3, 7 * 7 * c.conv2_features))
    chex.assert_shape(out["fc1"], (3, c.hidden))
    chex.assert_shape(logits, (3, 10))
    chex.assert_type(logits, jnp.float32)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"expects \(B, 28, 28, 1\) NHWC input, got \(2, 1, 28, 28\)"
    ):
        flax_cnn()(jnp.zeros((2, 1, 28, 28)))


def nchw(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1)  # torch (B, C, H, W) -> (B, H, W, C) for comparison


@pytest.mark.parametrize("preset", CNN_PRESETS)
def test_torch_to_flax_parity_on_real_digits(preset, digits):
    c = CNN_PRESETS[preset]
    x, _ = digits  # (32, 28, 28, 1)
    tmodel = torch_cnn(c, seed=1)
    fmodel = convert.load_torch_state_dict(flax_cnn(c, seed=2), tmodel.state_dict())
    with torch.no_grad():
        t_logits, t_out = tmodel.forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2))
    f_logits, f_out = fmodel.forward_intermediates(jnp.asarray(x))
    for name in ("conv1", "pool1", "conv2", "pool2", "fc1"):
        t = t_out[name].numpy()
        np.testing.assert_allclose(
            np.asarray(f_out[name]), nchw(t) if t.ndim == 4 else t, atol=ATOL, rtol=0, err_msg=name
        )
    np.testing.assert_allclose(np.asarray(f_logits), t_logits.numpy(), atol=ATOL, rtol=0)
    assert np.abs(np.asarray(f_logits)).max() > 0.1  # the comparison is not between zeros


def test_flax_to_torch_parity_and_round_trip(digits, assert_same_params):
    x, _ = digits
    fmodel = flax_cnn(seed=3)
    state_dict = convert.to_torch_state_dict(fmodel)
    tmodel = torch_cnn(seed=4)
    tmodel.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        t_logits = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(fmodel(jnp.asarray(x))), t_logits, atol=ATOL, rtol=0)
    # Back again: exactly the weights we started from.
    assert_same_params(fmodel, convert.load_torch_state_dict(flax_cnn(seed=5), state_dict))


def test_flatten_order_is_handled():
    """Without the (C,H,W) -> (H,W,C) row permutation fc1 would get scrambled inputs."""
    tmodel = torch_cnn(seed=6)
    rule = next(r for r in convert.cnn_rules(CNNConfig()) if r.torch_key == "fc1.weight")
    w = tmodel.fc1.weight.detach().numpy()
    assert not np.array_equal(rule.to_flax(w), w.T)
    np.testing.assert_array_equal(rule.to_torch(rule.to_flax(w)), w)


def test_converter_rejects_leftover_missing_and_misshapen_keys():
    sd = torch_cnn().state_dict()
    with pytest.raises(ConversionError, match=r"does not use: \['extra.weight'\]"):
        convert.load_torch_state_dict(flax_cnn(), {**sd, "extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"lacks 1 key\(s\) the CNN needs: \['fc2.bias'\]"):
        convert.load_torch_state_dict(flax_cnn(), {k: v for k, v in sd.items() if k != "fc2.bias"})
    tiny = TorchCNN(CNN_PRESETS["tiny"]).state_dict()
    with pytest.raises(ConversionError, match=r"conv1.weight: torch shape \(4, 1, 3, 3\)"):
        convert.load_torch_state_dict(flax_cnn(), tiny)


def test_failed_conversion_leaves_the_model_untouched():
    model = flax_cnn(seed=7)
    before = [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]
    sd = torch_cnn().state_dict()
    sd["fc2.bias"] = torch.zeros(11)
    with pytest.raises(ConversionError, match="fc2.bias"):
        convert.load_torch_state_dict(model, sd)
    for a, b in zip(before, jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("shape", [(4, 28, 28, 32), (2, 15, 9, 3)])
def test_reshape_max_pool_equals_reduce_window(shape):
    """The fast pool computes the plain one's function, forward and gradient (no ties here)."""
    x = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_array_equal(max_pool_2x2(x), reference_max_pool_2x2(x))
    w = jax.random.normal(jax.random.key(1), max_pool_2x2(x).shape)
    g_fast = jax.grad(lambda a: jnp.sum(max_pool_2x2(a) * w))(x)
    g_ref = jax.grad(lambda a: jnp.sum(reference_max_pool_2x2(a) * w))(x)
    np.testing.assert_array_equal(g_fast, g_ref)


def test_max_pool_matches_torch_on_odd_sizes():
    x = np.random.default_rng(0).normal(size=(2, 15, 9, 3)).astype(np.float32)
    want = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2)
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(jnp.asarray(x))), nchw(want.numpy()))
