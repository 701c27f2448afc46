"""AlexNet in Flax NNX, laid out as torchvision's `models.alexnet`.

Krizhevsky 2014 ("One weird trick"), the variant torchvision ships. `features`, `avgpool` and
`classifier` keep torchvision's names and Sequential indices, so conversion is a lookup
(`jaxvision.interop.convert.alexnet_rules`). The torch twin is torchvision's own model;
random weights follow torch's default initialisation, as torchvision's AlexNet does.
"""

from flax import nnx

from jaxvision.core.model_configs import ALEXNET_PRESETS as PRESETS  # noqa: F401  (re-exported)
from jaxvision.core.model_configs import AlexNetConfig
from jaxvision.models.layers import (
    AdaptiveAvgPool,
    Dropout,
    MaxPool,
    ReLU,
    TorchvisionClassifier,
    torch_conv,
    torch_linear,
)


class AlexNet(TorchvisionClassifier):
    def __init__(self, config: AlexNetConfig = AlexNetConfig(), *, rngs: nnx.Rngs):
        self.config = c = config
        self.features = nnx.List([
            torch_conv(c.in_channels, 64, 11, 4, 2, rngs), ReLU(), MaxPool(3, 2),
            torch_conv(64, 192, 5, 1, 2, rngs), ReLU(), MaxPool(3, 2),
            torch_conv(192, 384, 3, 1, 1, rngs), ReLU(),
            torch_conv(384, 256, 3, 1, 1, rngs), ReLU(),
            torch_conv(256, 256, 3, 1, 1, rngs), ReLU(), MaxPool(3, 2),
        ])  # fmt: skip
        self.avgpool = AdaptiveAvgPool(c.pool_size)
        self.classifier = nnx.List([
            Dropout(c.dropout), torch_linear(256 * c.pool_size**2, c.hidden, rngs), ReLU(),
            Dropout(c.dropout), torch_linear(c.hidden, c.hidden, rngs), ReLU(),
            torch_linear(c.hidden, c.num_classes, rngs),
        ])  # fmt: skip
