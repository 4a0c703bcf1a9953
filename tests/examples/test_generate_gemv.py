"""The decode step at batch 1 is a chain of one-row linears (GEMVs), which read several packed
weight panels per register tile (passes/lower/matmul.py, ``gemv_panels``): every width, the
partial last tile and the bias epilogue included, gives torch's result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln


@pytest.mark.parametrize("n_out", [16, 47, 100, 200, 385, 777, 2304, 3001])
def test_one_row_linear_matches_torch(n_out: int) -> None:
    torch.manual_seed(n_out)
    model = torch.nn.Sequential(torch.nn.Linear(96, n_out), torch.nn.GELU(approximate="tanh"),
                                torch.nn.Linear(n_out, 33, bias=False)).eval()
    x = torch.randn(1, 96)
    got = kiln.compile(model, (x,), threads=2)(x)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_row_linear_inside_a_3d_activation() -> None:
    """(B, 1, D) activations, as the decode step's blocks see them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1000).eval()
    x = torch.randn(1, 1, 64)
    got = kiln.compile(model, (x,))(x)
    with torch.no_grad():
        np.testing.assert_allclose(got.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
