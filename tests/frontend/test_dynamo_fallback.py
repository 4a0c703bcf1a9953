"""torch.compile(backend="kiln") never fails on an op kiln lacks: the graph is partitioned, the
regions kiln compiles run as kiln programs and the refused ops in eager PyTorch, with eager's
answers, at fixed and changing batch sizes; a warning says what fell back and why."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kiln.frontend import dynamo


class BesselBetweenLinears(nn.Module):
    """Two linear layers around an op kiln has no lowering for, plus a skip reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        z = torch.special.bessel_j0(y)
        return self.b(z) + y.sum(-1, keepdim=True)


class TwoRefusedOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.special.bessel_j0(self.a(x))
        return torch.special.bessel_j1(torch.tanh(y)) * 2


def assert_eager(got: torch.Tensor, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_backend_partitions_around_a_refused_op() -> None:
    model = BesselBetweenLinears().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"1 of \d+ ops run in eager PyTorch.*bessel_j0"):
        run = dynamo.kiln_backend(gm, [x])
    assert isinstance(run, dynamo._Partitioned)
    assert run.kiln_regions == 2 and list(run.refused) == ["special_bessel_j0"]
    regions = [m for m in run.fused.children() if isinstance(m, dynamo._KilnRegion)]
    assert len(regions) == 2           # both linear regions are kiln programs
    assert_eager(run(x), model, x)


def test_each_refused_op_is_found_and_the_rest_still_compiles() -> None:
    model = TwoRefusedOps().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="2 of"):
        run = dynamo.kiln_backend(gm, [x])
    assert set(run.refused) == {"special_bessel_j0", "special_bessel_j1"}
    assert run.kiln_regions >= 2
    assert_eager(run(x), model, x)


def test_torch_compile_with_a_refused_op_at_changing_batch_sizes() -> None:
    torch._dynamo.reset()
    model = BesselBetweenLinears().eval()
    compiled = torch.compile(model, backend="kiln")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (2, 3, 5, 3):
            x = torch.randn(batch, 4)
            with torch.no_grad():
                assert_eager(compiled(x), model, x)
