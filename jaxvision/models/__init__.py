"""Flax NNX models, one architecture per file, mirrored in `torch_reference.models`."""

from flax import nnx

from jaxvision.configs import AlexNetConfig, CNNConfig, VGGConfig, ViTConfig
from jaxvision.models.alexnet import AlexNet
from jaxvision.models.cnn import CNN
from jaxvision.models.vgg import VGG
from jaxvision.models.vit import ViT


def build_model(config, *, rngs: nnx.Rngs) -> nnx.Module:
    """The Flax model for a config from `jaxvision.configs.get_config`."""
    if isinstance(config, CNNConfig):
        return CNN(config, rngs=rngs)
    if isinstance(config, ViTConfig):
        return ViT(config, rngs=rngs)
    if isinstance(config, VGGConfig):
        return VGG(config, rngs=rngs)
    if isinstance(config, AlexNetConfig):
        return AlexNet(config, rngs=rngs)
    raise TypeError(f"no Flax model for {type(config).__name__}")


__all__ = ["CNN", "ViT", "VGG", "AlexNet", "build_model"]
