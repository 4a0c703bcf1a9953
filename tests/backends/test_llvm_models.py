"""Every zoo model and every frontend op case on the LLVM backend matches eager PyTorch."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import kiln
from kiln.examples.models import ZOO, get_model

_HERE = pathlib.Path(__file__).parent
_spec = importlib.util.spec_from_file_location("torch_op_cases",
                                               _HERE.parent / "frontend" / "test_torch_ops.py")
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
CASES = _cases.CASES


def _close(got, expected) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        worst = max(worst, (g - e).abs().max().item() / max(e.abs().max().item(), 1e-6))
    return worst


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_on_llvm_matches_eager(name: str, batch: int) -> None:
    model, inputs = get_model(name, batch=batch)
    compiled = kiln.compile(model, inputs, backend="llvm")
    with torch.no_grad():
        expected = model(*inputs)
    assert _close(compiled(*inputs), expected) <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_case_on_llvm_matches_eager(case: str) -> None:
    model, inputs = CASES[case]
    compiled = kiln.compile(model.eval(), inputs, backend="llvm", pipeline="O0")
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(compiled(*inputs), expected)
