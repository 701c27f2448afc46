"""The ViT: shapes, the pinned numerics, and torch <-> Flax parity at every named intermediate.

Tolerance: 1e-5 max abs difference on logits and every intermediate (float32, eval mode,
highest matmul precision), HuggingFace's bar for PyTorch-to-Flax equivalence (REFERENCE.md).
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxvision.core.errors import ConversionError, UserError
from jaxvision.core.model_configs import VIT_PRESETS, ViTConfig
from jaxvision.core.positional import sinusoidal_encoding
from jaxvision.interop import convert
from jaxvision.models import vit as fvit
from torch_reference.models import vit as tvit

ATOL = 1e-5
# Pinned parameter counts at 28x28x1 and 10 classes, equal in both frameworks.
PARAMS = {"lab": 1_994, "tiny": 139_018, "mnistvit": 11_072_965, "micro": 3_514}
# Beside the presets: mean pooling (no [CLS] token) with sinusoidal positions, and 7x7 patches.
VARIANTS = {
    **VIT_PRESETS,
    "mean_sinusoidal": dataclasses.replace(
        VIT_PRESETS["micro"], pool="mean", pos_encoding="sinusoidal", depth=2
    ),
    "patch7": dataclasses.replace(VIT_PRESETS["micro"], patch_size=7),
}


def flax_vit(c: ViTConfig, seed=0) -> fvit.ViT:
    return nnx.view(fvit.ViT(c, rngs=nnx.Rngs(params=seed)), deterministic=True)


def torch_vit(c: ViTConfig, seed=0) -> tvit.ViT:
    torch.manual_seed(seed)
    return tvit.ViT(c).eval()


@pytest.mark.parametrize("preset", VIT_PRESETS)
def test_parameter_counts_are_pinned_and_equal(preset):
    c = VIT_PRESETS[preset]
    n_flax = sum(x.size for x in jax.tree.leaves(nnx.state(flax_vit(c), nnx.Param)))
    n_torch = sum(p.numel() for p in torch_vit(c).parameters())
    assert n_flax == n_torch == PARAMS[preset]


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes(name):
    c = VARIANTS[name]
    b, n, t, d = 3, c.num_patches, c.num_tokens, c.dim
    logits, out = flax_vit(c).forward_intermediates(jnp.zeros((b, 28, 28, 1)))
    chex.assert_shape(out["patches"], (b, n, c.patch_size**2))
    chex.assert_shape(out["patch_embed"], (b, n, d))
    chex.assert_shape(out["embed"], (b, t, d))
    for i in range(c.depth):
        chex.assert_shape(out[f"block{i}"], (b, t, d))
        chex.assert_shape(out[f"attn{i}"], (b, c.heads, t, t))
    chex.assert_shape(out["pre_logits"], (b, d))
    chex.assert_shape(logits, (b, 10))
    assert t == n + (c.pool == "cls")


@pytest.mark.parametrize("name", VARIANTS)
def test_torch_to_flax_parity_at_every_intermediate(name, digits):
    c = VARIANTS[name]
    x = digits[0][:8]  # (8, 28, 28, 1) real digits
    tmodel = torch_vit(c, seed=1)
    fmodel = convert.load_torch_state_dict(flax_vit(c, seed=2), tmodel.state_dict())
    with torch.no_grad():
        t_logits, t_out = tmodel.forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2))
    f_logits, f_out = fmodel.forward_intermediates(jnp.asarray(x))
    assert set(f_out) == set(t_out)
    for key in f_out:
        np.testing.assert_allclose(
            np.asarray(f_out[key]), t_out[key].numpy(), atol=ATOL, rtol=0, err_msg=key
        )
    np.testing.assert_allclose(np.asarray(f_logits), t_logits.numpy(), atol=ATOL, rtol=0)


def test_flax_to_torch_parity_and_round_trip(digits, assert_same_params):
    c = VIT_PRESETS["lab"]
    x = digits[0][:8]
    fmodel = flax_vit(c, seed=3)
    state_dict = convert.to_torch_state_dict(fmodel)
    tmodel = torch_vit(c, seed=4)
    tmodel.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        t_logits = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(fmodel(jnp.asarray(x))), t_logits, atol=ATOL, rtol=0)
    assert_same_params(fmodel, convert.load_torch_state_dict(flax_vit(c, seed=5), state_dict))


def test_converter_rejects_another_preset():
    sd = torch_vit(VIT_PRESETS["micro"]).state_dict()
    with pytest.raises(
        ConversionError, match=r"lacks 16 key\(s\) the ViT needs: \['blocks.1.norm1"
    ):
        convert.load_torch_state_dict(flax_vit(VIT_PRESETS["lab"]), sd)
    deeper = torch_vit(dataclasses.replace(VIT_PRESETS["micro"], depth=2)).state_dict()
    with pytest.raises(ConversionError, match=r"does not use: \['blocks.1.norm1.weight'"):
        convert.load_torch_state_dict(flax_vit(VIT_PRESETS["micro"]), deeper)


def test_layer_norm_epsilon_and_gelu_form_are_pinned_alike():
    c = VIT_PRESETS["micro"]
    fmodel, tmodel = flax_vit(c), torch_vit(c)
    assert fmodel.norm.epsilon == tmodel.norm.eps == c.ln_eps == 1e-6
    assert all(b.norm1.epsilon == b.norm2.epsilon == 1e-6 for b in fmodel.blocks)
    assert all(b.norm1.eps == b.norm2.eps == 1e-6 for b in tmodel.blocks)
    # The exact GELU, not jax.nn.gelu's default tanh form: they differ by up to ~5e-4.
    z = np.linspace(-4, 4, 1001).astype(np.float32)
    exact = torch.nn.functional.gelu(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(np.asarray(fvit.gelu(jnp.asarray(z))), exact, atol=1e-6, rtol=0)
    assert np.abs(np.asarray(jax.nn.gelu(jnp.asarray(z))) - exact).max() > 1e-4


def _gelu_erfc(x):
    """The GELU as jax.nn.gelu(approximate=False) writes it (x/2 * erfc(-x/sqrt 2)): the form
    the model used before the erf form (docs/performance.md)."""
    return jax.nn.gelu(x, approximate=False)


def test_gelu_erf_form_is_the_erfc_form_value_and_gradient():
    z = np.concatenate([np.linspace(-12, 12, 24001), np.random.default_rng(0).normal(0, 3, 4000)])
    # The same function: in float64 the two forms and torch's agree to 1e-12, value and slope.
    with jax.enable_x64(True):
        z64 = jnp.asarray(z, jnp.float64)
        t = torch.from_numpy(z).requires_grad_()
        exact = torch.nn.functional.gelu(t)
        exact.sum().backward()
        value = exact.detach().numpy()
        for f in (fvit.gelu, _gelu_erfc):
            np.testing.assert_allclose(np.asarray(f(z64)), value, atol=1e-12, rtol=0)
            slope = jax.grad(lambda v, f=f: f(v).sum())(z64)
            np.testing.assert_allclose(np.asarray(slope), t.grad.numpy(), atol=1e-12, rtol=0)
    # In float32 each is within float32 rounding of the exact value (|gelu| <= 12 here).
    z32 = jnp.asarray(z, jnp.float32)
    for f in (fvit.gelu, _gelu_erfc):
        np.testing.assert_allclose(np.asarray(f(z32)), exact.detach().numpy(), atol=2e-6, rtol=0)
        slope = jax.grad(lambda v, f=f: f(v).sum())(z32)
        np.testing.assert_allclose(np.asarray(slope), t.grad.numpy(), atol=1e-6, rtol=0)


def tiny_vit_gradient(digits):
    """A function of nothing: the `tiny` ViT's logits and every parameter's gradient on 32 real
    digits, traced afresh per call, so that a module attribute patched between calls counts."""
    x, y = jnp.asarray(digits[0][:32]), jnp.asarray(digits[1][:32])
    graphdef, params = nnx.split(flax_vit(VIT_PRESETS["tiny"]))

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean(), logits

    def run():
        grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
        assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(params))
        return logits, jax.tree.leaves(grads)

    return run


def assert_equal_to_float32_rounding(mine, theirs):
    """(logits, gradients) against (logits, gradients): 1e-5, relative to each gradient's scale."""
    np.testing.assert_allclose(np.asarray(mine[0]), np.asarray(theirs[0]), atol=1e-5, rtol=0)
    for a, b in zip(mine[1], theirs[1], strict=True):
        scale = max(float(jnp.abs(b).max()), 1e-3)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0)


def test_vit_loss_and_gradient_are_todays_with_the_erfc_gelu(digits, monkeypatch):
    """The whole `tiny` ViT, logits and every parameter's gradient, with the erf GELU against
    the erfc GELU it replaced: equal to float32 rounding."""
    run = tiny_vit_gradient(digits)
    erf = run()
    monkeypatch.setattr(fvit, "gelu", _gelu_erfc)
    assert_equal_to_float32_rounding(erf, run())


def test_linear_gradient_written_out_is_autodiffs():
    """`fvit.linear`'s hand-written backward against JAX's own gradient of x @ w + b: equal to
    1e-12 in float64, and to float32 rounding in float32, for a 3-D input as the ViT feeds it."""
    rng = np.random.default_rng(0)
    x, w, b, ct = (rng.normal(size=s) for s in ((4, 17, 24), (24, 40), (40,), (4, 17, 40)))

    def plain(x, w, b):
        return x @ w + b

    for dtype, atol in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
        with jax.enable_x64(dtype == jnp.float64):
            args = [jnp.asarray(a, dtype) for a in (x, w, b)]
            for f in (fvit.linear, plain):
                assert f(*args).dtype == dtype
            np.testing.assert_allclose(fvit.linear(*args), plain(*args), atol=atol, rtol=0)
            mine = jax.vjp(fvit.linear, *args)[1](jnp.asarray(ct, dtype))
            theirs = jax.vjp(plain, *args)[1](jnp.asarray(ct, dtype))
            for a, t in zip(mine, theirs, strict=True):
                assert a.shape == t.shape and a.dtype == t.dtype
                scale = float(jnp.abs(t).max())
                np.testing.assert_allclose(a, t, atol=atol * scale, rtol=0)


def test_vit_loss_and_gradient_are_nnx_linears(digits, monkeypatch):
    """The whole `tiny` ViT, logits and every parameter's gradient, with `fvit.Linear` against
    nnx.Linear's own call (the model before the hand-written gradient): float32 rounding."""
    run = tiny_vit_gradient(digits)
    mine = run()
    monkeypatch.setattr(fvit.Linear, "__call__", nnx.Linear.__call__)
    assert_equal_to_float32_rounding(mine, run())


def test_a_layer_norm_epsilon_mismatch_would_be_caught(digits):
    """torch's default eps (1e-5) on one side breaks the 1e-5 parity bar on real inputs."""
    c = VIT_PRESETS["micro"]
    x = digits[0][:8]
    tmodel = torch_vit(dataclasses.replace(c, ln_eps=1e-5), seed=1)
    fmodel = convert.load_torch_state_dict(flax_vit(c), tmodel.state_dict())
    with torch.no_grad():
        t_out = tmodel.forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2))[1]
    f_out = fmodel.forward_intermediates(jnp.asarray(x))[1]
    # The raw patch embeddings have a large spread; after the first LayerNorm the eps shows.
    diff = max(np.abs(np.asarray(f_out[k]) - t_out[k].numpy()).max() for k in f_out)
    assert diff > ATOL


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_attention_rows_sum_to_one(framework, digits):
    c = VIT_PRESETS["tiny"]
    x = digits[0][:4]
    if framework == "flax":
        out = flax_vit(c).forward_intermediates(jnp.asarray(x))[1]
        attns = [np.asarray(out[f"attn{i}"]) for i in range(c.depth)]
    else:
        with torch.no_grad():
            out = torch_vit(c).forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2))[1]
        attns = [out[f"attn{i}"].numpy() for i in range(c.depth)]
    for a in attns:
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
        assert (a >= 0).all()


def test_sinusoidal_encoding_matches_the_closed_form():
    n, d = 50, 10
    pe = sinusoidal_encoding(n, d)
    for pos in range(n):
        for i in range(d // 2):
            w = 1.0 / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i] == pytest.approx(math.sin(pos * w), abs=1e-6)
            assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(pos * w), abs=1e-6)
    # Both models add exactly this (the torch one as a non-persistent buffer).
    c = VIT_PRESETS["lab"]
    np.testing.assert_array_equal(
        np.asarray(flax_vit(c).position_encoding())[0], sinusoidal_encoding(c.num_tokens, c.dim)
    )
    np.testing.assert_array_equal(
        torch_vit(c).position_encoding()[0].numpy(), sinusoidal_encoding(c.num_tokens, c.dim)
    )
    assert "sinusoidal" not in torch_vit(c).state_dict()


def test_patchify_order_matches_between_frameworks(digits):
    x = digits[0][:2]
    f = np.asarray(fvit.patchify(jnp.asarray(x), 4))
    t = tvit.patchify(torch.from_numpy(x).permute(0, 3, 1, 2), 4).numpy()
    np.testing.assert_array_equal(f, t)
    # Patch 1 is the second 4x4 tile of the top row, flattened row by row.
    np.testing.assert_array_equal(f[0, 1], x[0, 0:4, 4:8, 0].reshape(-1))


def test_bad_configs_are_clear_errors():
    with pytest.raises(UserError, match=r"patch size 5 does not divide the image size 28"):
        ViTConfig(patch_size=5)
    with pytest.raises(UserError, match=r"dim 64 is not divisible by heads 5"):
        ViTConfig(heads=5)
    with pytest.raises(ValueError, match=r"ViT expects \(B, 28, 28, 1\) NHWC input"):
        flax_vit(VIT_PRESETS["micro"])(jnp.zeros((2, 1, 28, 28)))
