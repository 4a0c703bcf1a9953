"""The LLVM backend's vector math (backends/llvm/vmath.py) against float64 references over a
dense grid and the special values, on the target's full vectors and the scalar tail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special

import kiln


class Unary(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _grid() -> np.ndarray:
    dense = np.linspace(-6.0, 6.0, 400_003, dtype=np.float32)   # odd: a scalar tail too
    tiny = np.float32(1) / np.logspace(1, 37, 200).astype(np.float32)
    special_values = np.array([0.0, -0.0, np.inf, -np.inf, 3.92, -3.92, 3.9200001, 1e-45,
                               np.finfo(np.float32).max], np.float32)
    return np.concatenate([dense, tiny, -tiny, special_values]).astype(np.float32)


@pytest.mark.parametrize(("name", "fn", "ref", "bound"), [
    ("erf", torch.erf, special.erf, 4e-7),
    ("tanh", torch.tanh, np.tanh, 2e-7),
])
def test_vector_math_error_is_within_its_bound(name, fn, ref, bound) -> None:
    x = _grid()
    compiled = kiln.compile(Unary(fn).eval(), (torch.from_numpy(x),))
    got = compiled(x)
    want = ref(x.astype(np.float64))
    assert np.abs(got.astype(np.float64) - want).max() <= bound
    # Odd functions, signed zeros, and saturation.
    np.testing.assert_array_equal(compiled(-x), -got)
    zeros = compiled(np.zeros(x.shape, np.float32) * np.float32(-1))
    assert np.all(np.signbit(zeros))
    assert got[x == np.inf].tolist() == [1.0] and got[x == -np.inf].tolist() == [-1.0]


def test_nan_goes_through_erf_and_gelu() -> None:
    x = np.array([np.nan, 1.0, -np.nan, 0.5] * 5, np.float32)
    for fn in (torch.erf, torch.nn.functional.gelu):
        out = kiln.compile(Unary(fn).eval(), (torch.from_numpy(x),))(x)
        assert np.isnan(out[::2]).all() and not np.isnan(out[1::2]).any()
