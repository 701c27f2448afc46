"""Model inputs in PyTorch, the twin of `jaxvision.training.preprocess`: NHWC uint8 -> NCHW,
standardisation, and the ImageNet archs' resize to RGB."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from jaxvision.core.archs import Arch
from jaxvision.core.preprocess import IMAGENET_MEAN, IMAGENET_STD


def to_nchw(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)  # (N,H,W,C)->(N,C,H,W)


def standardize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float images (B, C, H, W) in [0, 1] -> standardised with per-channel statistics."""
    shape = (1, -1, 1, 1)  # per-channel statistics, broadcast over (B, C, H, W)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x - mean) / std


def imagenet_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] images (B, C, H, W) -> (B, 3, size, size), ImageNet-normalised, for VGG / AlexNet."""
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=False
        )
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB
    return standardize(x, IMAGENET_MEAN, IMAGENET_STD)


def model_input(x: torch.Tensor, arch: Arch, model_cfg, mean, std) -> torch.Tensor:
    """[0, 1] images (B, C, H, W) -> what `arch`'s model takes: ImageNet-normalised at its
    image size, or standardised with the training set's `mean` and `std`."""
    if arch.imagenet:
        return imagenet_input(x, model_cfg.image_size)
    return standardize(x, mean, std)
