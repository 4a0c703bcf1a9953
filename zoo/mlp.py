"""A three-layer perceptron: the smallest model in the zoo."""

from __future__ import annotations

import torch
from torch import nn

from ._common import ModelAndInputs, lecun_normal_init, seeded

IN_FEATURES = 64
HIDDEN = 128
NUM_CLASSES = 10


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> GELU -> Linear."""

    def __init__(
        self, in_features: int = IN_FEATURES, hidden: int = HIDDEN, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.gelu = nn.GELU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_features) features to (B, num_classes) logits."""
        x = self.relu(self.fc1(x))
        x = self.gelu(self.fc2(x))
        return self.fc3(x)


def mlp(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build the MLP with seeded weights and a (batch, 64) float input."""
    with seeded(seed) as generator:
        model = MLP()
        lecun_normal_init(model, generator)
        x = torch.randn(batch, IN_FEATURES, generator=generator)
    return model.eval(), (x,)
