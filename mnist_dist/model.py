"""The reference MNIST CNN, and nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network; the defaults are the reference architecture (31,898 parameters)."""

    image_size: int = 28  # input height and width, pixels (single channel)
    num_classes: int = 10  # output logits
    conv1_channels: int = 16  # 5x5 conv, then 2x2 max-pool
    conv2_channels: int = 32  # 3x3 conv, then 2x2 max-pool
    conv3_channels: int = 16  # 1x1 conv
    hidden: int = 64  # width of the fully connected hidden layer

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def flat_features(self) -> int:
        """Inputs to the first fully connected layer: 16 x 5 x 5 = 400 for the reference."""
        side = ((self.image_size - 4) // 2 - 2) // 2
        return self.conv3_channels * side * side


class MnistCNN(nn.Module):
    """conv5-relu-pool, conv3-relu-pool, conv1-relu, fc-relu, fc; module names match the
    reference implementation, so its ``state_dict`` loads strictly."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or ModelConfig()
        self.conv_layer1 = nn.Sequential(nn.Conv2d(1, c.conv1_channels, kernel_size=5), nn.ReLU())
        self.maxpool1 = nn.MaxPool2d(kernel_size=2)
        self.conv_layer2 = nn.Sequential(
            nn.Conv2d(c.conv1_channels, c.conv2_channels, kernel_size=3), nn.ReLU()
        )
        self.maxpool2 = nn.MaxPool2d(kernel_size=2)
        self.conv_layer3 = nn.Sequential(
            nn.Conv2d(c.conv2_channels, c.conv3_channels, kernel_size=1), nn.ReLU()
        )
        self.fc_layer1 = nn.Sequential(nn.Linear(c.flat_features, c.hidden), nn.ReLU())
        self.fc_layer2 = nn.Linear(c.hidden, c.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU and 2x2 max-pooling commute exactly (ReLU is monotonic, so the max of ReLUs is
        # the ReLU of the max, and gradients reach the same elements), so pooling first gives
        # bit-identical outputs and gradients with 4x less ReLU work, forward and backward.
        conv1, relu1 = self.conv_layer1
        conv2, relu2 = self.conv_layer2
        x = relu1(self.maxpool1(conv1(x)))
        x = relu2(self.maxpool2(conv2(x)))
        x = torch.flatten(self.conv_layer3(x), 1)
        return self.fc_layer2(self.fc_layer1(x))
