"""AlexNet in PyTorch: torchvision's own model, so state_dicts and pretrained weights load as-is."""

import torchvision
from torch import nn

from jaxvision.core.model_configs import ALEXNET_PRESETS as PRESETS  # noqa: F401  (re-exported)
from jaxvision.core.model_configs import AlexNetConfig


def AlexNet(config: AlexNetConfig = AlexNetConfig()) -> nn.Module:  # noqa: N802  (a constructor)
    if config.hidden != 4096 or config.pool_size != 6:
        raise ValueError("torch_reference builds torchvision's AlexNet only")
    model = torchvision.models.alexnet(
        weights=None, num_classes=config.num_classes, dropout=config.dropout
    )
    model.config = config
    return model
