"""Bad input to the frontend gets a KilnError that names the node, the op and the source line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln
from kiln.ir import UnsupportedOpError


class UsesCumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return torch.cumsum(y, dim=1)  # kiln has no cumsum


class ItemControlFlow(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_unsupported_op_names_op_and_source_line(frontend: str) -> None:
    with pytest.raises(UnsupportedOpError) as info:
        kiln.compile(UsesCumsum().eval(), (torch.randn(2, 4),), frontend=frontend)
    msg = str(info.value)
    assert "cumsum" in msg
    assert "test_errors.py" in msg and "torch.cumsum(y, dim=1)" in msg
    assert info.value.source is not None and info.value.node is not None


def test_training_mode_is_refused() -> None:
    with pytest.raises(kiln.KilnError, match="eval"):
        kiln.compile(nn.Linear(3, 3).train(), (torch.randn(1, 3),))


def test_wrong_input_shape_at_call_time() -> None:
    compiled = kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(4, 3),))
    with pytest.raises(kiln.KilnError, match=r"expects f32\[4,3\]"):
        compiled(torch.randn(5, 3))
    with pytest.raises(kiln.KilnError, match="takes 1 inputs"):
        compiled(torch.randn(4, 3), torch.randn(4, 3))


def test_wrong_input_dtype_at_call_time() -> None:
    compiled = kiln.compile(nn.Linear(3, 2).eval(), (torch.randn(4, 3),))
    with pytest.raises(kiln.KilnError, match="expects f32"):
        compiled(torch.randn(4, 3, dtype=torch.float64).numpy())


def test_float64_model_is_refused_with_hint() -> None:
    with pytest.raises(kiln.KilnError, match="float64"):
        kiln.compile(nn.Linear(3, 2).double().eval(), (torch.randn(1, 3).double(),))


def test_data_dependent_python_value_is_refused() -> None:
    with pytest.raises(kiln.KilnError):
        kiln.compile(ItemControlFlow().eval(), (torch.randn(2, 2),), frontend="export")


def test_unknown_backend_and_pipeline() -> None:
    model, x = nn.Linear(2, 2).eval(), (torch.randn(1, 2),)
    with pytest.raises(kiln.KilnError, match="unknown backend"):
        kiln.compile(model, x, backend="tpu")
    with pytest.raises(kiln.KilnError):
        kiln.compile(model, x, pipeline="O9")
