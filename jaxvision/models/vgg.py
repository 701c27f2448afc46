"""VGG16 in Flax NNX, laid out as torchvision's `models.vgg16` (config 'D').

Simonyan & Zisserman 2015. `features`, `avgpool` and `classifier` keep torchvision's names and
Sequential indices (ReLU, pooling and dropout slots included), so `features.28.weight` converts to
`features[28].kernel` by lookup (`jaxvision.interop.convert.vgg_rules`). The torch twin is
torchvision's own model (`torch_reference.models.vgg`), and random weights follow torchvision's
initialisation (kaiming-normal convs, N(0, 0.01) linears). Input is NHWC; the adaptive pool
follows torch's bin rule, so inputs other than 224x224 give torchvision's result too.
"""

from flax import nnx

from jaxvision.core.model_configs import VGG_PRESETS as PRESETS  # noqa: F401  (re-exported)
from jaxvision.core.model_configs import VGGConfig
from jaxvision.models.layers import (
    AdaptiveAvgPool,
    Dropout,
    MaxPool,
    ReLU,
    TorchvisionClassifier,
    torch_conv,
    torch_linear,
)


class VGG(TorchvisionClassifier):
    def __init__(self, config: VGGConfig = VGGConfig(), *, rngs: nnx.Rngs):
        self.config = c = config
        layers, width = [], c.in_channels
        for v in c.layers:
            if v == "M":
                layers.append(MaxPool(2, 2))
            else:
                layers += [torch_conv(width, v, 3, 1, 1, rngs, vgg=True), ReLU()]
                width = v
        self.features = nnx.List(layers)
        self.avgpool = AdaptiveAvgPool(c.pool_size)
        flat = width * c.pool_size**2
        self.classifier = nnx.List([
            torch_linear(flat, c.hidden, rngs, vgg=True), ReLU(), Dropout(c.dropout),
            torch_linear(c.hidden, c.hidden, rngs, vgg=True), ReLU(), Dropout(c.dropout),
            torch_linear(c.hidden, c.num_classes, rngs, vgg=True),
        ])  # fmt: skip
