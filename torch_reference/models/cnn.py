"""The lab's small CNN for MNIST in PyTorch: the twin of `jaxvision.models.cnn` (same names)."""

import torch
from torch import nn

from jaxvision.core.model_configs import CNN_PRESETS as PRESETS  # noqa: F401  (re-exported)
from jaxvision.core.model_configs import CNNConfig


class CNN(nn.Module):
    def __init__(self, config: CNNConfig = CNNConfig()):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(config.in_channels, config.conv1_features, 3, padding=1)
        self.conv2 = nn.Conv2d(config.conv1_features, config.conv2_features, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(config.pooled_size**2 * config.conv2_features, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.hidden, config.num_classes)

    def forward_intermediates(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: (B, C, H, W) float32. Returns the logits and the named activations of every layer."""
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"CNN expects (B, {c.in_channels}, {c.image_size}, {c.image_size}) NCHW input, "
                f"got {tuple(x.shape)}"
            )
        out = {}
        out["conv1"] = x = torch.relu(self.conv1(x))  # (B, 32, H, W)
        out["pool1"] = x = self.pool(x)  # (B, 32, H/2, W/2)
        out["conv2"] = x = torch.relu(self.conv2(x))  # (B, 64, H/2, W/2)
        out["pool2"] = x = self.pool(x)  # (B, 64, H/4, W/4)
        out["flatten"] = x = torch.flatten(x, 1)  # (B, 64 * H/4 * W/4), (C, H, W) order
        out["fc1"] = x = torch.relu(self.fc1(x))  # (B, 128)
        x = self.dropout(x)
        out["logits"] = x = self.fc2(x)  # (B, num_classes)
        return x, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[0]
