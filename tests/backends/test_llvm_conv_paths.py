"""The batched convolution paths of the LLVM backend: Winograd F(4, 3) along the rows, the
batched direct GEMM over stride phases, and its transposed, K-blocked form. Each case checks
that the intended path was taken (by its workspaces) and that the result matches PyTorch and
kiln's reference backend; Winograd is also compared with the direct path it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.backends.llvm.compiler import default_target
from kiln.passes.lower import lower_graph, winograd


def test_winograd_matrices_compute_a_3_tap_correlation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, g = rng.standard_normal(winograd.ALPHA), rng.standard_normal(3)
        y = winograd.AT @ ((winograd.G @ g) * (winograd.BT @ d))
        want = np.array([d[i:i + 3] @ g for i in range(winograd.M_OUT)])
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


class _Block(nn.Module):
    """relu(conv(x) [* 0.5 + r]): the paths' epilogues run fused ops and read a second tensor."""

    def __init__(self, conv: nn.Conv2d, residual: bool) -> None:
        super().__init__()
        self.conv, self.residual = conv, residual

    def forward(self, x, r):
        y = self.conv(x)
        if self.residual:
            y = y * 0.5 + r
        return torch.relu(y)


def _markers(compiled) -> set[str]:
    lowered = lower_graph(compiled.graph, width=default_target().f32_lanes)
    names = " ".join(b.name for s in lowered.steps for b in s.kernel.params + s.kernel.scratch)
    return {m for m in ("wino_in", "phases", "pos", "dw_") if m in names}


PATHS = [  # (cin, cout, (h, w), kernel, stride, padding, dilation, batch, path)
    (16, 24, (12, 12), 3, 1, 1, 1, 2, "winograd"),       # rows a multiple of 4
    (16, 20, (13, 13), 3, 1, 1, 1, 1, "winograd"),       # 13 rows: a last tile of 1
    (32, 16, (14, 9), 3, 1, 1, 1, 3, "winograd"),        # 2 left over, not square
    (16, 40, (17, 15), 3, 1, 0, 1, 2, "winograd"),       # no padding: 15 rows, 3 left
    (24, 16, (10, 11), 3, 1, 2, 1, 2, "winograd"),       # padding 2
    (16, 32, (33, 33), 3, 2, 1, 1, 3, "direct"),         # stride 2: stride phases
    (16, 24, (12, 12), 3, 1, 2, 2, 2, "direct"),         # dilation 2 (no Winograd)
    (3, 64, (56, 56), 7, 2, 3, 1, 1, "direct"),          # ImageNet stem at batch 1
    (16, 24, (21, 19), 3, 2, 2, 2, 1, "direct"),         # stride and dilation, batch 1
    (32, 64, (16, 16), 3, 2, 1, 1, 2, "transposed"),     # 8x8 output maps
    (32, 40, (15, 15), 3, 2, 1, 1, 3, "transposed"),     # channels not a multiple of 64
    (64, 64, (16, 16), 1, 2, 0, 1, 2, "transposed"),     # strided 1x1 (downsample)
    (16, 32, (7, 7), 3, 1, 1, 1, 2, "transposed"),       # small map, too few pixels for Winograd
    (64, 32, (28, 28), 3, 1, 12, 12, 1, "transposed"),   # dilated, padding too wide to copy
    (24, 24, (14, 13), 3, 1, 1, 1, 2, "depthwise padded"),   # groups = channels, stride 1
    (24, 24, (14, 13), 5, 1, 2, (2, 1), 1, "depthwise padded"),  # dilation along rows only
    (24, 24, (14, 13), 3, 2, 1, 1, 2, "depthwise in place"),  # stride 2
]
EXPECT = {"winograd": {"wino_in"}, "direct": {"phases"}, "transposed": {"phases", "pos"},
          "depthwise padded": {"dw_"}, "depthwise in place": set()}


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("case", PATHS, ids=[str(c) for c in PATHS])
def test_conv_path_matches_pytorch_and_reference(case, residual: bool) -> None:
    cin, cout, (h, w), k, s, p, d, batch, path = case
    torch.manual_seed(0)
    groups = cin if path.startswith("depthwise") else 1
    model = _Block(nn.Conv2d(cin, cout, k, s, p, dilation=d, groups=groups), residual).eval()
    x = torch.randn(batch, cin, h, w)
    with torch.no_grad():
        r = torch.randn_like(model.conv(x))
        want = model(x, r)
    compiled = kiln.compile(model, (x, r), backend="llvm")
    assert _markers(compiled) == EXPECT[path], "a different schedule was chosen"
    ref = kiln.compile(model, (x, r), backend="reference")
    got = compiled(x, r)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, ref(x, r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_winograd_error_stays_within_a_few_ulps_of_direct(size: int) -> None:
    """Winograd reassociates the sums: against float64, its error is at most a small multiple
    of the direct GEMM's (observed 2-3x); both are far inside the backend's tolerances."""
    torch.manual_seed(1)
    conv = nn.Conv2d(64, 64, 3, 1, 1).eval()
    x = torch.randn(8, 64, size, size)
    with torch.no_grad():
        exact = nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(),
                                     padding=1)
    wino = kiln.compile(conv, (x,), backend="llvm")
    assert "wino_in" in _markers(wino)
    direct = kiln.compile(conv, (x,), backend="llvm", winograd=False)
    schedules = [s["schedule"] for s in direct.executable.program.image.steps]
    assert schedules and "winograd" not in schedules
    scale = exact.abs().max().item()
    e_wino = (wino(x).double() - exact).abs().max().item() / scale
    e_direct = (direct(x).double() - exact).abs().max().item() / scale
    assert e_wino <= max(8 * e_direct, 1e-6), (e_wino, e_direct)
    assert e_wino < 2e-5


@pytest.mark.parametrize("seed", range(4))
def test_random_conv_shapes_match_pytorch(seed: int) -> None:
    """Seeded random convolutions (kernel 1-7, stride 1-3, padding 0-3, dilation 1-2, odd
    channel counts, batch 1-8, maps 3-24) through whichever schedule each one takes."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < 8:
        k, s, d = (int(rng.choice(v)) for v in ([1, 3, 3, 5, 7], [1, 1, 2, 3], [1, 1, 2]))
        p = int(rng.integers(0, 4))
        cin, cout = int(rng.choice([1, 3, 16, 17, 48])), int(rng.choice([4, 24, 40, 64, 65]))
        lo = max(3, d * (k - 1) + 1 - 2 * p)
        h, w = (int(rng.integers(lo, 25)) for _ in range(2))
        batch = int(rng.choice([1, 2, 8]))
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, dilation=d), nn.ReLU()).eval()
        x = torch.randn(batch, cin, h, w)
        with torch.no_grad():
            want = model(x)
        got = kiln.compile(model, (x,), backend="llvm")(x)
        case = (cin, cout, k, s, p, d, batch, h, w)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                   msg=lambda m, case=case: f"{case}: {m}")
        done += 1
