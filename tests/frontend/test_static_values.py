"""Values that depend on the inputs' shapes only, and torch.fx.wrap'd functions.

``x.new_zeros(...)`` and ``zeros_like(x)`` stay plain tensors while importing, so a mask built
from one in place, slice by slice (as Swin's shifted-window attention builds its mask), is
computed by PyTorch and reaches kiln as a constant, through fx and torch.export. A function
torch.fx kept whole (``torch.fx.wrap``) that kiln has no handler for makes the fx frontend
fall back to torch.export, which traces into it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
from torch import nn

import kiln
from kiln.frontend.trace import FrontendFallbackWarning
from kiln.ir import KilnError

BACKENDS = ("reference", "llvm")


class WindowMask(nn.Module):
    """Adds a mask made as Swin makes its own: zeros from the input, regions filled in place."""

    def __init__(self, make: str) -> None:
        super().__init__()
        self.make = make

    def forward(self, x):
        if self.make == "new_zeros":
            mask = x.new_zeros((x.shape[-2], x.shape[-1]))
        elif self.make == "new_full":
            mask = x.new_full((x.shape[-2], x.shape[-1]), 0.5)
        else:
            mask = torch.zeros_like(x)
        count = 0
        for h in ((0, -3), (-3, -1), (-1, None)):
            for w in ((0, -2), (-2, None)):
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.masked_fill(mask != 0, -100.0)
        return x + mask


def compile_quietly(model: nn.Module, x: torch.Tensor, **kwargs) -> kiln.CompiledModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's own deprecation notes
        return kiln.compile(model, (x,), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ["new_zeros", "new_full", "zeros_like"])
def test_mask_built_in_place_folds(make: str, backend: str) -> None:
    """torch.export (item assignment stops fx, which falls back to it) gives new_zeros, then
    slice and fill.Tensor / slice_scatter per region."""
    model = WindowMask(make).eval()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    compiled = compile_quietly(model, x, backend=backend, frontend="export")
    # The mask is one constant: no fill, slice or scatter of it is left to run.
    assert [n.op for n in compiled.source_graph.nodes] == ["add"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


class CausalBias(nn.Module):
    def forward(self, x):
        n = x.shape[-1]
        return x + x.new_ones((n, n)).triu(1) * -1e4 + torch.ones_like(x).cumsum(-1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_values_built_from_a_shape_only_tensor_fold(frontend: str) -> None:
    model = CausalBias().eval()
    x = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(0))
    compiled = compile_quietly(model, x, backend="reference", frontend=frontend)
    assert compiled.frontend == frontend  # fx traced it itself
    assert {n.op for n in compiled.source_graph.nodes} == {"add"}
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def window_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sums of ``window`` consecutive rows, padding the rows to a multiple of ``window``:
    Python control flow on a size, so symbolic tracing cannot follow it."""
    pad = (window - x.shape[0] % window) % window
    if pad:
        x = torch.cat([x, x.new_zeros((pad, x.shape[1]))])
    return x.reshape(-1, window, x.shape[1]).sum(1)


torch.fx.wrap("window_sum")  # as torchvision wraps shifted_window_attention


class WindowSum(nn.Module):
    def forward(self, x):
        return window_sum(x * 2.0, 4) + 1.0


def test_wrapped_function_falls_back_to_export() -> None:
    model = WindowSum().eval()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(FrontendFallbackWarning, match=r"window_sum whole.*frontend='export'"):
        compiled = kiln.compile(model, (x,), backend="reference")
    assert compiled.frontend == "export"
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


class Unsupported(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real


def test_unsupported_torch_op_does_not_fall_back() -> None:
    """Only a wrapped function makes fx fall back: an op kiln lacks is refused at once."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrontendFallbackWarning)
        with pytest.raises(KilnError, match="kiln does not support"):
            kiln.compile(Unsupported().eval(), (torch.randn(4, 4),), backend="reference")


class FilledWithData(nn.Module):
    def forward(self, x):
        return torch.full_like(x, x.sum())


def test_fill_value_from_the_inputs_is_refused() -> None:
    """Such a tensor depends on the inputs' data: it must not become a constant."""
    with pytest.raises(KilnError, match="filled with a value computed from the inputs"):
        kiln.compile(FilledWithData().eval(), (torch.randn(4),), backend="reference")
