"""ResNet-18 with an ImageNet stem (224x224, 1000 classes) or a CIFAR stem (32x32, 10 classes)."""

from __future__ import annotations

import torch
from torch import nn

from ._common import ModelAndInputs, lecun_normal_init, randomize_norms, seeded

STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a residual connection (1x1 conv/BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; the spatial size shrinks by ``stride``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNet18(nn.Module):
    """ResNet-18: a stem, four stages of two BasicBlocks, global average pooling, a classifier."""

    def __init__(self, num_classes: int, imagenet_stem: bool) -> None:
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
            )
        stages = []
        in_channels = 64
        for index, out_channels in enumerate(STAGE_CHANNELS):
            blocks = []
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(STAGE_CHANNELS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, H, W) images to (B, num_classes) logits."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _build(
    batch: int, seed: int, num_classes: int, imagenet_stem: bool, size: int
) -> ModelAndInputs:
    with seeded(seed) as generator:
        model = ResNet18(num_classes, imagenet_stem)
        lecun_normal_init(model, generator)
        randomize_norms(model, generator)
        x = torch.randn(batch, 3, size, size, generator=generator)
    return model.eval(), (x,)


def resnet18(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build ImageNet ResNet-18 (1000 classes) with a (batch, 3, 224, 224) float input."""
    return _build(batch, seed, num_classes=1000, imagenet_stem=True, size=224)


def resnet18_cifar(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build CIFAR ResNet-18 (3x3 stem, no max-pool, 10 classes) with a (batch, 3, 32, 32) input."""
    return _build(batch, seed, num_classes=10, imagenet_stem=False, size=32)
