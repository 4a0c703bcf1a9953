"""CompiledModel's calls: plain CPU tensors of the compiled signature take the short path;
everything else (NumPy arrays, a tensor that requires grad, a subclass of Tensor, a
non-contiguous view) takes the general one; all give eager's answers, and a wrong dtype or
shape is a KilnError on either."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.ir import KilnError


class Flagged(torch.Tensor):
    """A Tensor subclass (as some libraries pass)."""


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 16)
    return model, kiln.compile(model, (x,)), x


def test_every_call_path_gives_eagers_answer(compiled, monkeypatch):
    model, c, x = compiled
    with torch.no_grad():
        want = model(x)
    calls = []
    general = type(c).__call__

    def spy(self, *args):
        calls.append(self._fast_call(args) is not None)
        return general(self, *args)

    monkeypatch.setattr(type(c), "__call__", spy)
    inputs = {
        "tensor": x,
        "requires_grad": x.clone().requires_grad_(True),
        "subclass": x.clone().as_subclass(Flagged),
        "non_contiguous": torch.randn(16, 3).t().copy_(x),
    }
    for name, arg in inputs.items():
        got = c(arg)
        assert isinstance(got, torch.Tensor), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert calls == [True, False, False, True]
    got = c(x.numpy())
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(3, 16, dtype=torch.float64), torch.zeros(2, 16),
                                 torch.zeros(3, 16, dtype=torch.bfloat16)])
def test_wrong_inputs_are_kiln_errors(compiled, bad):
    _, c, _ = compiled
    assert c._fast_call((bad,)) is None
    with pytest.raises(KilnError):
        c(bad)
