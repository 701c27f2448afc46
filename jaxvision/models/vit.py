"""A Vision Transformer from scratch, in Flax NNX.

Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words": split the image into patches, embed each
linearly, prepend a [CLS] token, add a position encoding, run pre-LN encoder blocks (LayerNorm,
multi-head self-attention, LayerNorm, MLP, each with a residual), classify the [CLS] token.

`torch_reference.models.vit.ViT` is the PyTorch twin, with the same attribute names. Attention is
written out (q, k, v projections, scaled dot product, softmax, output projection) rather than
taken from a library. Deviations from the paper, all configurable
(`jaxvision.core.model_configs.ViTConfig`):
  * the patch embedding is an explicit patchify and a Linear (the paper's formulation; most code
    uses a strided conv, which is the same function);
  * `pos_encoding='sinusoidal'` (Vaswani et al. 2017) as in the lab, besides learned embeddings;
  * `pool='mean'` classifies the mean of the patch tokens, with no [CLS] token;
  * the head is a single Linear after a final LayerNorm (the paper fine-tunes with one too).
LayerNorm epsilon is pinned (1e-6) and its variance is computed in two passes, as torch does;
GELU is the exact erf form, torch's default (jax.nn.gelu defaults to the tanh approximation).
It is written as torch's CPU kernel writes it, `0.5 x (1 + erf(x / sqrt 2))`, not as
`jax.nn.gelu(approximate=False)`'s `erfc`: XLA expands `erfc` into two polynomial branches and
their selects, on the forward pass and again in the gradient: about 8 ms of the `tiny` ViT's 55 ms
training step on CPU by the profile, against 1.4 ms for `erf`, one polynomial (docs/performance.md).
Every Linear is `Linear`, nnx.Linear with its gradient written out (`linear`): the same function
and the same parameters, and a backward pass that XLA:CPU runs about 1.5x faster (see `linear`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvision.core.model_configs import VIT_PRESETS as PRESETS  # noqa: F401  (re-exported)
from jaxvision.core.model_configs import ViTConfig
from jaxvision.core.positional import sinusoidal_encoding
from jaxvision.models import initializers


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, p*p*C), patches in row-major order, each flattened (py, px, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c)  # (B, gh, p, gw, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)  # (B, N, p*p*C)


def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU, x * Phi(x), like torch.nn.GELU(); see the module docstring for the form."""
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """`x @ kernel + bias` over x's last axis, differentiated by `_linear_bwd`.

    JAX's own gradient of the kernel is a dot of the output gradient g with x followed by a
    transpose, which XLA:CPU folds into a transposed copy of g. In the ViT g is the residual
    stream's gradient, a chain of adds through every later block that XLA fuses rather than
    stores, so each copy recomputes the chain: quadratic in depth, about a third of the `tiny`
    ViT's training step (docs/performance.md). Here the kernel's gradient contracts x and g over
    their leading (token) axis directly, which needs no copy of g. Forward-mode (jax.jvp) is not
    defined for a custom_vjp; nothing here uses it.
    """
    return x @ kernel + bias


def _linear_fwd(x, kernel, bias):
    return linear(x, kernel, bias), (x, kernel, bias)


def _linear_bwd(res, g):
    x, kernel, bias = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # (B*T, in), (B*T, out)
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))  # g @ kernel.T
    dkernel = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))  # x.T @ g: (in, out)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype), g2.sum(0).astype(bias.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Linear(nnx.Linear):
    """nnx.Linear (its parameters, initialisers and names) computed by `linear`."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        # Flax's default initialisers (LeCun normal, zero bias), drawn by size class
        super().__init__(din, dout, kernel_init=initializers.lecun_normal(),
                         bias_init=initializers.zeros, rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.kernel[...], self.bias[...])


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs,
                         scale_init=initializers.ones, bias_init=initializers.zeros)  # fmt: skip


class Attention(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        d = config.dim
        self.heads = config.heads
        self.q = Linear(d, d, rngs=rngs)
        self.k = Linear(d, d, rngs=rngs)
        self.v = Linear(d, d, rngs=rngs)
        self.proj = Linear(d, d, rngs=rngs)
        self.attn_drop = nnx.Dropout(config.attn_dropout)
        self.proj_drop = nnx.Dropout(config.dropout)

    def __call__(self, x: jax.Array, *, rngs=None) -> tuple[jax.Array, jax.Array]:
        """x: (B, T, D). Returns (B, T, D) and the attention weights (B, heads, T, T)."""
        b, t, d = x.shape
        h = self.heads

        def split_heads(y):
            return y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)  # (B, T, D) -> (B, h, T, hd)

        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        scores = q @ k.transpose(0, 1, 3, 2) * (d // h) ** -0.5  # (B, h, T, T)
        attn = jax.nn.softmax(scores, axis=-1)  # (B, h, T, T), rows sum to 1
        y = self.attn_drop(attn, rngs=rngs) @ v  # (B, h, T, hd)
        y = y.transpose(0, 2, 1, 3).reshape(b, t, d)  # (B, h, T, hd) -> (B, T, D)
        return self.proj_drop(self.proj(y), rngs=rngs), attn


class MLP(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.fc1 = Linear(config.dim, config.mlp_dim, rngs=rngs)
        self.fc2 = Linear(config.mlp_dim, config.dim, rngs=rngs)
        self.drop = nnx.Dropout(config.dropout)

    def __call__(self, x: jax.Array, *, rngs=None) -> jax.Array:
        x = self.drop(gelu(self.fc1(x)), rngs=rngs)  # (B, T, mlp_dim)
        return self.drop(self.fc2(x), rngs=rngs)  # (B, T, D)


class Block(nnx.Module):
    """Pre-LN encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = layer_norm(config.dim, config.ln_eps, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.norm2 = layer_norm(config.dim, config.ln_eps, rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs=None) -> tuple[jax.Array, jax.Array]:
        y, attn = self.attn(self.norm1(x), rngs=rngs)
        x = x + y
        x = x + self.mlp(self.norm2(x), rngs=rngs)
        return x, attn


class ViT(nnx.Module):
    def __init__(self, config: ViTConfig = ViTConfig(), *, rngs: nnx.Rngs):
        self.config = c = config
        self.patch_embed = Linear(c.patch_dim, c.dim, rngs=rngs)
        init = initializers.normal(0.02)
        if c.pool == "cls":
            self.cls_token = nnx.Param(init(rngs.params(), (1, 1, c.dim)))
        if c.pos_encoding == "learned":
            self.pos_embed = nnx.Param(init(rngs.params(), (1, c.num_tokens, c.dim)))
        self.pos_drop = nnx.Dropout(c.dropout)
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.depth)])
        self.norm = layer_norm(c.dim, c.ln_eps, rngs)
        self.head = Linear(c.dim, c.num_classes, rngs=rngs)

    def position_encoding(self) -> jax.Array:
        c = self.config
        if c.pos_encoding == "learned":
            return self.pos_embed[...]  # (1, T, D)
        return jnp.asarray(sinusoidal_encoding(c.num_tokens, c.dim))[None]  # (1, T, D), constant

    def forward_features(self, x: jax.Array, *, rngs=None) -> tuple[jax.Array, dict]:
        """x: (B, H, W, C). Returns the normalised tokens (B, T, D) and named intermediates."""
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.image_size, c.image_size, c.in_channels):
            raise ValueError(
                f"ViT expects (B, {c.image_size}, {c.image_size}, {c.in_channels}) "
                f"NHWC input, got {x.shape}"
            )
        out = {}
        out["patches"] = x = patchify(x, c.patch_size)  # (B, N, p*p*C)
        out["patch_embed"] = x = self.patch_embed(x)  # (B, N, D)
        if c.pool == "cls":
            cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, c.dim))  # (B, 1, D)
            x = jnp.concatenate([cls, x], axis=1)  # (B, N+1, D)
        out["embed"] = x = x + self.position_encoding()  # (B, T, D)
        x = self.pos_drop(x, rngs=rngs)
        for i, block in enumerate(self.blocks):
            x, attn = block(x, rngs=rngs)
            out[f"block{i}"], out[f"attn{i}"] = x, attn  # (B, T, D), (B, heads, T, T)
        out["features"] = x = self.norm(x)  # (B, T, D)
        return x, out

    def pool(self, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, D): the [CLS] token, or the mean of the patch tokens."""
        return x[:, 0] if self.config.pool == "cls" else x.mean(axis=1)

    def forward_intermediates(self, x: jax.Array, *, rngs=None) -> tuple[jax.Array, dict]:
        x, out = self.forward_features(x, rngs=rngs)
        out["pre_logits"] = x = self.pool(x)  # (B, D)
        out["logits"] = x = self.head(x)  # (B, num_classes)
        return x, out

    def __call__(self, x: jax.Array, *, rngs=None) -> jax.Array:
        return self.forward_intermediates(x, rngs=rngs)[0]
