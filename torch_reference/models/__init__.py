"""PyTorch twins of `jaxvision.models`, with the same class, attribute and preset names."""

from torch import nn

from jaxvision.configs import AlexNetConfig, CNNConfig, VGGConfig, ViTConfig
from torch_reference.models.alexnet import AlexNet
from torch_reference.models.cnn import CNN
from torch_reference.models.vgg import VGG
from torch_reference.models.vit import ViT


def build_model(config) -> nn.Module:
    """The torch model for a config from `jaxvision.configs.get_config`."""
    if isinstance(config, CNNConfig):
        return CNN(config)
    if isinstance(config, ViTConfig):
        return ViT(config)
    if isinstance(config, VGGConfig):
        return VGG(config)
    if isinstance(config, AlexNetConfig):
        return AlexNet(config)
    raise TypeError(f"no torch model for {type(config).__name__}")


__all__ = ["CNN", "ViT", "VGG", "AlexNet", "build_model"]
