"""Flax NNX models, one architecture per file, mirrored in `torch_reference.models`."""

from flax import nnx

from jaxvision.core.archs import arch_of
from jaxvision.models.alexnet import AlexNet
from jaxvision.models.cnn import CNN
from jaxvision.models.vgg import VGG
from jaxvision.models.vit import ViT


def build_model(config, *, rngs: nnx.Rngs, pretrained: bool = False) -> nnx.Module:
    """The Flax model for a model config (`jaxvision.core.archs.get_config`), as the arch
    registry names it. `pretrained`: the structure pretrained weights load into, where it
    differs (the detector's FrozenBatchNorm2d)."""
    arch = arch_of(config)
    if arch.detector:
        return arch.load("flax_model")(config, frozen=pretrained, rngs=rngs)
    return arch.load("flax_model")(config, rngs=rngs)


__all__ = ["CNN", "ViT", "VGG", "AlexNet", "build_model"]
