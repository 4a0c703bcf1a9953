"""The LLVM backend's sin, cos and atan (backends/llvm/vmath.py), and the tan, asin and acos
the frontends build from them, against NumPy in float64: relative error over a dense grid, a
logarithmic sweep up to 3e9, the float32 values nearest to multiples of pi/2 (where the
argument reduction is tested hardest), the huge arguments that take the libm branch, and the
special values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln


class Unary(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


SWEEP = np.logspace(-30, 9.5, 20_001).astype(np.float32)
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45], np.float32)


def _wide() -> np.ndarray:
    """Arguments for sin, cos, tan and atan."""
    dense = np.linspace(-10.0, 10.0, 40_001, dtype=np.float32)
    near = (np.arange(1, 2_000_000, 97) * (np.pi / 2)).astype(np.float32)
    near = np.concatenate([near, np.nextafter(near, np.float32(np.inf)),
                           np.nextafter(near, np.float32(0))])
    huge = np.array([1.1e9, 2e9, 1e10, 1e20, 3e38, np.finfo(np.float32).max], np.float32)
    return np.concatenate([dense, SWEEP, -SWEEP, near, -near, huge, -huge, SPECIAL])


def _unit() -> np.ndarray:
    """Arguments for asin and acos: [-1, 1] densely, near +-1 and 0, and outside."""
    small = SWEEP[SWEEP < 1]
    return np.concatenate([np.linspace(-1.0, 1.0, 40_001, dtype=np.float32),
                           np.float32(1) - small, small - np.float32(1), small, -small,
                           np.array([1.0, -1.0, 1.5, -1.5, 3e38], np.float32), SPECIAL])


@pytest.mark.parametrize(("fn", "ref", "args"), [
    (torch.sin, np.sin, _wide), (torch.cos, np.cos, _wide), (torch.atan, np.arctan, _wide),
    (torch.tan, np.tan, _wide), (torch.asin, np.arcsin, _unit), (torch.acos, np.arccos, _unit),
], ids=["sin", "cos", "atan", "tan", "asin", "acos"])
def test_relative_error_is_within_1e6(fn, ref, args) -> None:
    x = args().astype(np.float32)
    got = kiln.compile(Unary(fn).eval(), (torch.from_numpy(x),))(x).astype(np.float64)
    with np.errstate(all="ignore"):
        want = ref(x.astype(np.float64))
    # NaN exactly where NumPy has NaN (inf, |x| > 1 for asin / acos, NaN itself).
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    rel = np.abs(got[finite] - want[finite]) / np.maximum(np.abs(want[finite]), 1e-38)
    assert rel.max() <= 1e-6, x[finite][np.argmax(rel)]


def test_odd_functions_keep_the_sign_of_zero() -> None:
    x = np.array([0.0, -0.0] * 9, np.float32)
    for fn in (torch.sin, torch.atan, torch.tan, torch.asin):
        got = kiln.compile(Unary(fn).eval(), (torch.from_numpy(x),))(x)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(x))

