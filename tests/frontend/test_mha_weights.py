"""nn.MultiheadAttention's attention weights (need_weights, average_attn_weights) and masks,
through fx, torch.export and torch.compile, against eager PyTorch; a forward() whose trailing
arguments keep their defaults (``forward(x, mask=None)`` called with one input); a None among
the outputs (need_weights=False) comes back as None."""

from __future__ import annotations

import warnings

import pytest
import torch

import kiln
from kiln.frontend.trace import FrontendFallbackWarning


class Attend(torch.nn.Module):
    def __init__(self, need_weights: bool, average: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.need_weights, self.average = need_weights, average

    def forward(self, x, mask=None):
        return self.mha(x, x, x, need_weights=self.need_weights,
                        average_attn_weights=self.average, attn_mask=mask)


def _masks():
    g = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(7, 7, generator=g) > 0.6
    bool_mask.fill_diagonal_(False)          # no row masked whole (eager gives NaN there)
    return {"none": None, "bool": bool_mask, "float": torch.randn(7, 7, generator=g)}


def _check(compiled, model, args):
    with torch.no_grad():
        want = model(*args)
    got = compiled(*args)
    assert isinstance(got, tuple) and len(got) == 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    if want[1] is None:
        assert got[1] is None
    else:
        assert got[1].shape == want[1].shape
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
def test_mha_weights_match_eager(frontend, mask, need_weights, average):
    model = Attend(need_weights, average).eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    m = _masks()[mask]
    args = (x,) if m is None else (x, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = kiln.compile(model, args, frontend=frontend)
    _check(compiled, model, args)


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_weights_through_torch_compile(need_weights):
    torch._dynamo.reset()
    model = Attend(need_weights).eval()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    _check(torch.compile(model, backend="kiln"), model, (x,))


def test_defaulted_argument_is_not_an_input_under_fx():
    model = Attend(True).eval()
    x = torch.randn(1, 7, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = kiln.compile(model, (x,), frontend="fx")
    assert not [w for w in caught if issubclass(w.category, FrontendFallbackWarning)]
    assert len(compiled.graph.inputs) == 1
    _check(compiled, model, (x,))
