"""The Faster R-CNN backbones in Flax NNX, laid out as torchvision's: MobileNetV3-Large and
ResNet-50, each with a feature pyramid (`BackboneWithFPN`).

Howard et al. 2019 (MobileNetV3), He et al. 2016 (ResNet), Lin et al. 2017 (FPN). Every module
keeps torchvision's attribute names and Sequential indices (`body.4.block.2.fc1`,
`body.layer1.0.downsample.1`, `fpn.inner_blocks.0.0`), and batch norm keeps torch's buffer
names, so conversion is a lookup (`jaxvision.interop.convert.faster_rcnn_rules`). Input is NHWC.

Batch norm comes in torchvision's two forms: `BatchNorm2d` from scratch (trainable, running
statistics with the unbiased variance, momentum 0.1, eps 1e-5) and `FrozenBatchNorm2d` under
pretrained weights (four constant buffers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvision.models import initializers
from jaxvision.models.box_ops import nearest_indices
from jaxvision.models.layers import (
    Conv,
    ReLU,
    torch_default_bias_init,
    torch_default_kernel_init,
    windows,
)


class Buffer(nnx.Variable):
    """A constant of the model that is neither trained nor updated: FrozenBatchNorm2d's."""


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d on NHWC. Training normalises with the batch's biased variance and
    moves the running variance toward the unbiased one, as torch does; `model.eval()` sets
    `use_running_average`."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        self.eps, self.momentum = eps, momentum
        self.use_running_average = False
        self.weight = nnx.Param(initializers.ones(None, channels))
        self.bias = nnx.Param(initializers.zeros(None, channels))
        self.running_mean = nnx.BatchStat(initializers.zeros(None, channels))
        self.running_var = nnx.BatchStat(initializers.ones(None, channels))
        self.num_batches_tracked = nnx.BatchStat(initializers.zeros(None, (), jnp.int32))

    def set_view(self, use_running_average: bool | None = None, deterministic: bool | None = None):
        """Eval mode: `nnx.view(model, use_running_average=True)`, or `deterministic=True`, the
        flag the trainers' eval views set."""
        if use_running_average is None:
            use_running_average = deterministic
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
            n = x.size // x.shape[-1]
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean[...] + m * mean
            self.running_var[...] = (1 - m) * self.running_var[...] + m * var * (n / max(n - 1, 1))
            self.num_batches_tracked[...] += 1
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class FrozenBatchNorm2d(nnx.Module):
    """torchvision.ops.FrozenBatchNorm2d: a fixed affine map from four buffers."""

    def __init__(self, channels: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = Buffer(initializers.ones(None, channels))
        self.bias = Buffer(initializers.zeros(None, channels))
        self.running_mean = Buffer(initializers.zeros(None, channels))
        self.running_var = Buffer(initializers.ones(None, channels))

    def set_view(self, use_running_average: bool | None = None, deterministic: bool | None = None):
        """Always the same affine map; accepts the eval-mode views for uniformity."""

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
        return x * scale + (self.bias[...] - self.running_mean[...] * scale)


def norm(channels: int, frozen: bool) -> nnx.Module:
    return FrozenBatchNorm2d(channels) if frozen else BatchNorm2d(channels)


class Hardswish(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.hard_swish(x)  # x * relu6(x + 3) / 6, as torch


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The depthwise convolution (groups = channels) of x (B, H, W, C) with kernel (k, k, 1, C)
    and symmetric zero padding, as k * k shifted, strided slices of the padded input, each
    scaled by its tap's per-channel weight, and summed.

    XLA:CPU lowers a grouped convolution to a slow generic loop (jax#23713); on MobileNetV3's
    shapes the slices are 10-30x faster, forward and backward, and their gradient is slices
    and pads, not a scatter (`docs/performance.md`)."""
    k = kernel.shape[0]
    taps = windows(x, k, k, ((pad, pad), (pad, pad)), stride)
    return sum(t * kernel[i // k, i % k, 0] for i, t in enumerate(taps))


class DepthwiseConv(nnx.Conv):
    """A depthwise nnx.Conv (the same `kernel`, so the same conversion) computed by
    `depthwise_conv`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        (pad, _), _ = self.padding  # as `conv` builds it: ((p, p), (p, p)), an int stride
        y = depthwise_conv(x, self.kernel[...], self.strides, pad)
        return y + self.bias[...] if self.bias is not None else y


def conv(
    cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, groups: int = 1,
    bias: bool = False, init: str = "kaiming_out",
) -> nnx.Conv:  # fmt: skip
    """torch's Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups) on NHWC, with the
    initialisation torchvision gives that layer (a `DepthwiseConv` when groups = cin = cout)."""
    kernel_init = {
        "kaiming_out": initializers.variance_scaling(2.0, "fan_out", "normal"),
        "kaiming_uniform_a1": initializers.variance_scaling(1.0, "fan_in", "uniform"),
        "normal_0.01": initializers.normal(0.01),
        "torch_default": torch_default_kernel_init(),
    }[init]
    bias_init = (
        torch_default_bias_init(cin // groups * k * k)
        if init == "torch_default"
        else initializers.zeros
    )
    p = (k - 1) // 2
    cls = DepthwiseConv if groups > 1 and groups == cin == cout else Conv
    return cls(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)),
                    feature_group_count=groups, use_bias=bias, kernel_init=kernel_init,
                    bias_init=bias_init, rngs=rngs)  # fmt: skip


def conv_norm_act(
    cin: int, cout: int, k: int, rngs: nnx.Rngs, *, frozen: bool, stride: int = 1,
    groups: int = 1, act: type[nnx.Module] | None = ReLU,
) -> Sequential:  # fmt: skip
    """torchvision's Conv2dNormActivation: [conv, norm, activation] (no activation if None)."""
    layers = [conv(cin, cout, k, rngs, stride=stride, groups=groups), norm(cout, frozen)]
    return Sequential(layers + ([act()] if act else []))


class Sequential(nnx.List):
    """torch.nn.Sequential: an nnx.List (so parameters sit at `.0`, `.1`, ...) that runs its
    layers in order."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


# --- MobileNetV3-Large -----------------------------------------------------------------------
def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, losing at most 10%."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


# (input, kernel, expanded, output, squeeze-excitation, activation, stride): torchvision's
# `_mobilenet_v3_conf("mobilenet_v3_large")`, undilated.
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1), (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)  # fmt: skip


class SqueezeExcitation(nnx.Module):
    """torchvision's: global average, fc1 (1x1 conv), ReLU, fc2, hardsigmoid, rescale."""

    def __init__(self, channels: int, squeeze: int, rngs: nnx.Rngs):
        self.fc1 = conv(channels, squeeze, 1, rngs, bias=True)
        self.fc2 = conv(squeeze, channels, 1, rngs, bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = x.mean((1, 2), keepdims=True)  # (B, 1, 1, C)
        s = self.fc2(nnx.relu(self.fc1(s)))
        return x * jax.nn.hard_sigmoid(s)  # relu6(s + 3) / 6, as torch


class InvertedResidual(nnx.Module):
    """torchvision's MobileNetV3 block: [expand 1x1], depthwise kxk, [SE], project 1x1; a
    residual when the stride is 1 and the width is kept."""

    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, act: str,
                 stride: int, rngs: nnx.Rngs, frozen: bool):  # fmt: skip
        act_layer = Hardswish if act == "HS" else ReLU
        layers = []
        if expanded != cin:
            layers.append(conv_norm_act(cin, expanded, 1, rngs, frozen=frozen, act=act_layer))
        layers.append(conv_norm_act(expanded, expanded, k, rngs, frozen=frozen, stride=stride,
                                    groups=expanded, act=act_layer))  # fmt: skip
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), rngs))
        layers.append(conv_norm_act(expanded, cout, 1, rngs, frozen=frozen, act=None))
        self.block = Sequential(layers)
        self.residual = stride == 1 and cin == cout
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.block(x)
        return x + y if self.residual else y


def mobilenet_v3_body(rngs: nnx.Rngs, frozen: bool) -> tuple[Sequential, list[int], list[int]]:
    """MobileNetV3-Large's `features` (stem, 15 blocks, 1x1 to 960); the indices the FPN reads
    (the last strided block and the last layer, both stride 32) and their widths."""
    layers = [conv_norm_act(3, 16, 3, rngs, frozen=frozen, stride=2, act=Hardswish)]
    layers += [InvertedResidual(*c, rngs=rngs, frozen=frozen) for c in MOBILENET_V3_LARGE]
    layers.append(conv_norm_act(160, 960, 1, rngs, frozen=frozen, act=Hardswish))
    # torchvision's `_mobilenet_extractor`: stages end at the strided blocks; the FPN takes the
    # last two stages' outputs.
    stages = [0] + [i for i, b in enumerate(layers) if getattr(b, "stride", 1) > 1] + [16]
    return Sequential(layers), stages[-2:], [160, 960]


# --- ResNet-50 -------------------------------------------------------------------------------
class Bottleneck(nnx.Module):
    """torchvision's ResNet-50 block (v1.5: the stride on the 3x3)."""

    def __init__(self, cin: int, width: int, stride: int, rngs: nnx.Rngs, frozen: bool):
        cout = width * 4
        self.conv1 = conv(cin, width, 1, rngs)
        self.bn1 = norm(width, frozen)
        self.conv2 = conv(width, width, 3, rngs, stride=stride)
        self.bn2 = norm(width, frozen)
        self.conv3 = conv(width, cout, 1, rngs)
        self.bn3 = norm(cout, frozen)
        self.downsample = (
            Sequential([conv(cin, cout, 1, rngs, stride=stride), norm(cout, frozen)])
            if stride != 1 or cin != cout
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = self.downsample(x) if self.downsample is not None else x
        return nnx.relu(y + identity)


class ResNet50Body(nnx.Module):
    """ResNet-50 up to layer4, returning layer1..layer4 (strides 4, 8, 16, 32)."""

    def __init__(self, rngs: nnx.Rngs, frozen: bool):
        self.conv1 = nnx.Conv(3, 64, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                              kernel_init=initializers.variance_scaling(2.0, "fan_out", "normal"),
                              rngs=rngs)  # fmt: skip
        self.bn1 = norm(64, frozen)
        cin = 64
        for i, (blocks, width, stride) in enumerate(((3, 64, 1), (4, 128, 2), (6, 256, 2),
                                                     (3, 512, 2)), start=1):  # fmt: skip
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(cin, width, stride if j == 0 else 1, rngs, frozen))
                cin = width * 4
            setattr(self, f"layer{i}", Sequential(layer))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


def upsample_nearest(x: jax.Array, h: int, w: int) -> jax.Array:
    """F.interpolate(mode="nearest") of x (B, H, W, C) to (B, h, w, C). Each axis is kept, or
    repeated where the source indices are an integer repeat (the FPN's usual x2), or gathered:
    the first two have no scatter in their gradient, which XLA:CPU runs slowly."""
    for axis, out in ((1, h), (2, w)):
        size = x.shape[axis]
        idx = nearest_indices(size, out)
        if out % size == 0 and np.array_equal(idx, np.arange(out) // (out // size)):
            x = jnp.repeat(x, out // size, axis) if out != size else x
        else:
            x = jnp.take(x, idx, axis)
    return x


# --- the feature pyramid ---------------------------------------------------------------------
class FeaturePyramidNetwork(nnx.Module):
    """torchvision's FPN: 1x1 lateral convs (`inner_blocks`), top-down nearest upsampling, 3x3
    output convs (`layer_blocks`), and the extra `pool` level (max_pool2d(1, stride 2))."""

    def __init__(self, in_channels: list[int], out: int, rngs: nnx.Rngs):
        init = dict(bias=True, init="kaiming_uniform_a1")
        self.inner_blocks = nnx.List([Sequential([conv(c, out, 1, rngs, **init)])
                                      for c in in_channels])  # fmt: skip
        self.layer_blocks = nnx.List([Sequential([conv(out, out, 3, rngs, **init)])
                                      for _ in in_channels])  # fmt: skip

    def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
        last = self.inner_blocks[-1](xs[-1])
        results = [self.layer_blocks[-1](last)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.inner_blocks[i](xs[i])
            last = lateral + upsample_nearest(last, *lateral.shape[1:3])  # (B, h, w, C)
            results.insert(0, self.layer_blocks[i](last))
        results.append(
            results[-1][:, ::2, ::2]
        )  # (B, ceil(h/2), ceil(w/2), C): `pool`, max_pool2d(1, 2)
        return results


class BackboneWithFPN(nnx.Module):
    """`body` and `fpn`, as torchvision's; returns the pyramid's levels, finest first."""

    def __init__(self, detector: str, rngs: nnx.Rngs, frozen: bool):
        self.detector = detector
        if detector == "mobilenet_v3_320":
            self.body, self.returned, widths = mobilenet_v3_body(rngs, frozen)
        else:
            self.body, widths = ResNet50Body(rngs, frozen), [256, 512, 1024, 2048]
        self.fpn = FeaturePyramidNetwork(widths, 256, rngs)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if isinstance(self.body, ResNet50Body):
            feats = self.body(x)
        else:
            feats = []
            for i, layer in enumerate(self.body):
                x = layer(x)
                if i in self.returned:
                    feats.append(x)
        return self.fpn(feats)
