"""Random affine augmentation in PyTorch: the twin of `jaxvision.training.augment` (same ranges,
same warp via `F.affine_grid` + `F.grid_sample`), drawn per image and applied to the whole batch
at once.
"""

import math

import torch
import torch.nn.functional as F

from jaxvision.core.preprocess import MAX_DEGREES, MAX_TRANSLATE, SCALE_RANGE


def sample_params(batch: int, generator: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """Per-image (angle in radians, tx, ty as fractions of the size, scale), each (B,)."""

    def uniform(lo, hi):
        return torch.rand(batch, generator=generator, device=device) * (hi - lo) + lo

    max_angle = math.radians(MAX_DEGREES)
    return (
        uniform(-max_angle, max_angle),
        uniform(-MAX_TRANSLATE, MAX_TRANSLATE),
        uniform(-MAX_TRANSLATE, MAX_TRANSLATE),
        uniform(*SCALE_RANGE),
    )


def affine_theta(angle, tx, ty, scale) -> torch.Tensor:
    """(B, 2, 3) output -> input map in normalised coordinates; see `jaxvision.training.augment`."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    t_x, t_y = 2.0 * tx, 2.0 * ty
    row0 = torch.stack([cos, sin, -(cos * t_x + sin * t_y)], dim=-1)  # (B, 3)
    row1 = torch.stack([-sin, cos, -(-sin * t_x + cos * t_y)], dim=-1)  # (B, 3)
    return torch.stack([row0, row1], dim=1)  # (B, 2, 3)


def warp_affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float images resampled through per-image theta (B, 2, 3)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    params = sample_params(images.shape[0], generator, images.device)
    return warp_affine(images, affine_theta(*params))
