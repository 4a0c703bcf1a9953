"""Every convolution schedule of the LLVM backend (direct 1x1, im2col, padded stride-1 GEMM,
depthwise) at batch 1 and 4 (threads split images) against PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln

CONFIGS = [  # (cin, cout, size, kernel, stride, padding, dilation, groups)
    (64, 64, 32, 3, 1, 1, 1, 1),      # padded stride-1 GEMM
    (512, 512, 4, 3, 1, 1, 1, 1),     # im2col (too many dropped columns for the padded GEMM)
    (64, 96, 7, 3, 1, 1, 1, 1),       # im2col, 7x7 maps: images folded, vectors straddle images
    (16, 24, 13, 3, 2, 2, 2, 1),      # im2col, stride and dilation
    (8, 12, 9, 5, 1, 2, 1, 2),        # grouped
    (64, 128, 14, 1, 1, 0, 1, 1),     # direct 1x1, GEMM tail columns
    (32, 16, 15, 1, 1, 0, 1, 1),      # direct 1x1, few output channels: input read unpacked,
                                      # vector and scalar tail columns
    (96, 24, 6, 1, 1, 0, 1, 1),       # unpacked, fewer pixels than one register tile
    (3, 64, 56, 7, 2, 3, 1, 1),       # ImageNet stem
    (32, 32, 28, 3, 2, 1, 1, 32),     # depthwise, stride 2
    (24, 24, 17, 3, 1, 1, 1, 24),     # depthwise, stride 1, odd width (padded copy)
    (16, 16, 12, 5, 1, 2, 1, 16),     # depthwise 5x5 (padded copy)
    (16, 16, 12, 3, 1, 2, 2, 16),     # depthwise, dilation 2 (in place)
    (8, 8, 72, 3, 1, 1, 1, 8),        # depthwise, large map (in place)
    (64, 128, 16, 1, 2, 0, 1, 1),     # strided 1x1 (downsample)
]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_conv_schedule_matches_pytorch(config, batch: int) -> None:
    cin, cout, size, k, s, p, d, g = config
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, dilation=d, groups=g), nn.ReLU()).eval()
    x = torch.randn(batch, cin, size, size)
    compiled = kiln.compile(model, (x,), backend="llvm")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


POOLS = [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
         nn.MaxPool2d(3, 1, 1, dilation=2), nn.AvgPool2d(3, 2, 1), nn.AvgPool2d(2),
         nn.AvgPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(3, 2, 1, count_include_pad=False)]


@pytest.mark.parametrize("size", [7, 10, 57])
@pytest.mark.parametrize("pool", POOLS, ids=[repr(p) for p in POOLS])
def test_pool_schedule_matches_pytorch(pool: nn.Module, size: int) -> None:
    x = torch.randn(2, 5, size, size)
    x[0, 0, 0, 0] = float("nan")  # max pooling propagates NaN like PyTorch
    compiled = kiln.compile(pool.eval(), (x,), backend="llvm")
    torch.testing.assert_close(compiled(x), pool(x), equal_nan=True)
