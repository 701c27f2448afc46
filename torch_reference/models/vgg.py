"""VGG16 in PyTorch: torchvision's own model, so state_dicts and pretrained weights load as-is."""

import torchvision
from torch import nn

from jaxvision.core.model_configs import VGG16_LAYERS, VGGConfig
from jaxvision.core.model_configs import VGG_PRESETS as PRESETS  # noqa: F401  (re-exported)


def VGG(config: VGGConfig = VGGConfig()) -> nn.Module:  # noqa: N802  (a constructor)
    if config.layers != VGG16_LAYERS or config.hidden != 4096 or config.pool_size != 7:
        raise ValueError("torch_reference builds torchvision's VGG16 only")
    model = torchvision.models.vgg16(
        weights=None, num_classes=config.num_classes, dropout=config.dropout
    )
    model.config = config
    return model
