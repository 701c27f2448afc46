"""Parameter-free layers that mirror torch.nn ones, so that Flax models can keep torchvision's
Sequential indices (`features.3`, `classifier.6`) and convert key for key."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import canonicalize_padding

from jaxvision.models import initializers
from jaxvision.models.cnn import max_pool_2x2


class ReLU(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(x)


class MaxPool(nnx.Module):
    """torch.nn.MaxPool2d(kernel, stride) on NHWC, no padding, floor mode."""

    def __init__(self, kernel: int, stride: int):
        self.kernel, self.stride = kernel, stride

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel == self.stride == 2:
            return max_pool_2x2(x)  # same function, a much cheaper gradient (see cnn.py)
        k, s = (self.kernel, self.kernel), (self.stride, self.stride)
        return nnx.max_pool(x, k, strides=s, padding="VALID")


class Dropout(nnx.Dropout):
    """nnx.Dropout with the `rngs` keyword every layer here takes."""

    def __call__(self, x: jax.Array, *, rngs=None) -> jax.Array:
        return super().__call__(x, rngs=rngs)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging weights with torch's AdaptiveAvgPool bins:
    bin i covers [floor(i * size / out), ceil((i + 1) * size / out))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AdaptiveAvgPool(nnx.Module):
    """torch.nn.AdaptiveAvgPool2d(out) on NHWC; the identity when the input is already out x out."""

    def __init__(self, out: int):
        self.out = out

    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, _ = x.shape
        if (h, w) == (self.out, self.out):
            return x
        ph = jnp.asarray(adaptive_pool_matrix(h, self.out))  # (out, H)
        pw = jnp.asarray(adaptive_pool_matrix(w, self.out))  # (out, W)
        return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw)  # (B, H, W, C) -> (B, out, out, C)


class TorchvisionClassifier(nnx.Module):
    """The shape torchvision's VGG and AlexNet share: features, avgpool, flatten, classifier.

    Subclasses build `features` and `classifier` (nnx.Lists in torchvision's index order) and
    `avgpool`. The flatten runs in (H, W, C) order; the converter permutes the first classifier
    layer's rows to match torch's (C, H, W).
    """

    features: nnx.List
    avgpool: AdaptiveAvgPool
    classifier: nnx.List

    def forward_intermediates(self, x: jax.Array, *, rngs=None) -> tuple[jax.Array, dict]:
        """x: (B, S, S, 3) normalised. Returns the logits and `features`, `avgpool`, `logits`."""
        out = {}
        out["features"] = x = sequential(self.features, x, rngs=rngs)  # (B, h, w, C)
        out["avgpool"] = x = self.avgpool(x)  # (B, p, p, C)
        x = x.reshape(x.shape[0], -1)  # (B, p*p*C), (H, W, C) order
        out["logits"] = x = sequential(self.classifier, x, rngs=rngs)  # (B, num_classes)
        return x, out

    def __call__(self, x: jax.Array, *, rngs=None) -> jax.Array:
        return self.forward_intermediates(x, rngs=rngs)[0]


def sequential(layers, x: jax.Array, out: dict | None = None, name: str = "", *, rngs=None):
    """Runs an nnx.List of layers; records each output as `name.i` when `out` is given."""
    for i, layer in enumerate(layers):
        # Only Dropout draws randomness; Conv and Linear take no rngs argument.
        x = layer(x, rngs=rngs) if isinstance(layer, Dropout) else layer(x)
        if out is not None:
            out[f"{name}.{i}"] = x
    return x


# torchvision's initialisation schemes, so that --no-pretrained starts where torchvision does.
def torch_default_kernel_init():
    """torch's default for Conv/Linear weights: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    return initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """torch's default bias: U(+-1/sqrt(fan_in)) with the layer's fan_in."""
    bound = 1.0 / np.sqrt(fan_in)
    return initializers.uniform_between(-bound, bound)


# XLA:CPU's convolution falls off its fast path on maps of a pixel or two a side: VGG16's last
# block at 32 px (3x3, 512 -> 512 channels on a 2x2 map, batch 64) took 1,100 ms forward and
# backward, against 13 ms as one matmul over the patches (44 ms against 62 ms on a 4x4 map,
# where the convolution stays); the detector's FPN and RPN head (3x3, 256 channels, 2x2 maps,
# batch 100) 96 ms forward against 3.5 ms (docs/performance.md).
SMALL_MAP = 2


class Conv(nnx.Conv):
    """nnx.Conv (its parameters, initialisers and names); where its output map is at most
    `SMALL_MAP` pixels a side, with equal strides and no dilation or groups, computed as one
    matmul of the k*k shifted windows of the padded input against the kernel laid out
    (k*k*cin, cout). A convolution that sets anything the matmul does not compute (a kernel
    mask, a compute dtype, a precision, a preferred element type, its own convolution or dtype
    promotion, an output sharding) or whose input is not one NHWC batch is nnx.Conv's own."""

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        stride = self.strides if isinstance(self.strides, int) else self.strides[0]
        steps = (self.input_dilation, self.kernel_dilation)
        padding = canonicalize_padding(self.padding, 2)
        plain = (
            x.ndim == 4
            and all(v in (1, (1, 1)) for v in steps)
            and self.strides in (stride, (stride, stride))
            and self.feature_group_count == 1
            and not isinstance(padding, str)
            and self.mask is None
            and self.dtype is None
            and self.precision is None
            and self.preferred_element_type is None
            and self.conv_general_dilated is jax.lax.conv_general_dilated
            and self.promote_dtype is dtypes.promote_dtype
            and out_sharding is None
        )
        if not plain:
            return super().__call__(x, out_sharding=out_sharding)
        (top, bottom), (left, right) = padding
        kh, kw = self.kernel_size
        out = ((x.shape[1] + top + bottom - kh) // stride + 1,
               (x.shape[2] + left + right - kw) // stride + 1)  # fmt: skip
        if max(out) > SMALL_MAP:
            return super().__call__(x, out_sharding=out_sharding)
        bias = self.bias[...] if self.bias is not None else None
        return patch_conv(x, self.kernel[...], bias, padding, stride)


def windows(x: jax.Array, kh: int, kw: int, padding, stride: int = 1) -> list[jax.Array]:
    """The kh*kw shifted, strided windows of x (B, H, W, C) zero-padded by ((top, bottom),
    (left, right)), one per kernel tap in row-major order: each (B, H', W', C), the inputs
    that tap multiplies."""
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    b, h, w, c = x.shape
    span_h, span_w = stride * ((h - kh) // stride) + 1, stride * ((w - kw) // stride) + 1
    step = (1, stride, stride, 1)
    return [
        jax.lax.slice(x, (0, i, j, 0), (b, i + span_h, j + span_w, c), step)
        for i in range(kh)
        for j in range(kw)
    ]


def patch_conv(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, padding, stride: int = 1
) -> jax.Array:
    """A convolution, NHWC by (kh, kw, cin, cout) with ((top, bottom), (left, right)) zero
    padding, as one matmul: the (B, H', W', kh*kw*cin) windows, in the kernel's order."""
    kh, kw, cin, cout = kernel.shape
    y = jnp.concatenate(windows(x, kh, kw, padding, stride), axis=-1)
    y = y @ kernel.reshape(kh * kw * cin, cout)
    return y + bias if bias is not None else y


def torch_conv(
    cin: int, cout: int, k: int, stride: int, pad: int, rngs: nnx.Rngs, *, vgg: bool = False
) -> Conv:
    """A Conv laid out like torch's Conv2d(cin, cout, k, stride, pad), with torchvision's init:
    kaiming_normal(fan_out, relu) and zero bias for VGG, torch's default otherwise."""
    if vgg:
        inits = dict(kernel_init=initializers.variance_scaling(2.0, "fan_out", "normal"),
                     bias_init=initializers.zeros)  # fmt: skip
    else:
        inits = dict(kernel_init=torch_default_kernel_init(),
                     bias_init=torch_default_bias_init(cin * k * k))  # fmt: skip
    return Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                rngs=rngs, **inits)  # fmt: skip


def torch_linear(din: int, dout: int, rngs: nnx.Rngs, *, vgg: bool = False) -> nnx.Linear:
    """A Linear with torchvision's init: N(0, 0.01) and zero bias for VGG, torch's default
    otherwise."""
    if vgg:
        inits = dict(kernel_init=initializers.normal(0.01), bias_init=initializers.zeros)
    else:
        inits = dict(kernel_init=torch_default_kernel_init(),
                     bias_init=torch_default_bias_init(din))  # fmt: skip
    return nnx.Linear(din, dout, rngs=rngs, **inits)
