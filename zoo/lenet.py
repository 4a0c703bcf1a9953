"""LeNet-5 on 32x32 single-channel images."""

from __future__ import annotations

import torch
from torch import nn

from ._common import ModelAndInputs, lecun_normal_init, seeded

NUM_CLASSES = 10


class LeNet5(nn.Module):
    """Two conv/ReLU/max-pool stages followed by three fully connected layers."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 1, 32, 32) images to (B, num_classes) logits."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


def lenet5(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build LeNet-5 with seeded weights and a (batch, 1, 32, 32) float input."""
    with seeded(seed) as generator:
        model = LeNet5()
        lecun_normal_init(model, generator)
        x = torch.randn(batch, 1, 32, 32, generator=generator)
    return model.eval(), (x,)
