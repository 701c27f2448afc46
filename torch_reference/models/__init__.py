"""PyTorch twins of `jaxvision.models`, with the same class, attribute and preset names."""

from torch import nn

from jaxvision.core.archs import arch_of
from torch_reference.models.alexnet import AlexNet
from torch_reference.models.cnn import CNN
from torch_reference.models.vgg import VGG
from torch_reference.models.vit import ViT


def build_model(config, pretrained: bool = False) -> nn.Module:
    """The torch model for a model config (`jaxvision.core.archs.get_config`), as the arch
    registry names it. `pretrained`: the structure pretrained weights load into, where it
    differs (the detector's FrozenBatchNorm2d and frozen early layers)."""
    arch = arch_of(config)
    if arch.detector:
        return arch.load("torch_model")(config, pretrained, config.detector_classes)
    return arch.load("torch_model")(config)


__all__ = ["CNN", "ViT", "VGG", "AlexNet", "build_model"]
