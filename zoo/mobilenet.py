"""MobileNetV2 (width 1.0) on 224x224 images, 1000 classes."""

from __future__ import annotations

import torch
from torch import nn

from ._common import ModelAndInputs, lecun_normal_init, randomize_norms, seeded

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias, "same" padding) -> BatchNorm -> ReLU6."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            (kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise conv, 1x1 linear bottleneck; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expansion != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; ``use_residual`` is fixed at construction, so tracing sees no branch."""
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: stem conv, 17 inverted residual blocks, 1x1 conv to 1280, classifier."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, STEM_CHANNELS, 3, 2)]
        in_channels = STEM_CHANNELS
        for expansion, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(in_channels, out_channels, stride, expansion))
                in_channels = out_channels
        layers.append(conv_bn_relu6(in_channels, LAST_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST_CHANNELS, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, 224, 224) images to (B, num_classes) logits."""
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def mobilenetv2(batch: int = 1, seed: int = 0) -> ModelAndInputs:
    """Build MobileNetV2 with seeded weights and a (batch, 3, 224, 224) float input."""
    with seeded(seed) as generator:
        model = MobileNetV2()
        lecun_normal_init(model, generator)
        randomize_norms(model, generator)
        x = torch.randn(batch, 3, 224, 224, generator=generator)
    return model.eval(), (x,)
