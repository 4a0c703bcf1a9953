"""An int8 convolution whose input an epilogue also reads (a residual add of the conv's
input: ``conv(h) + h``) lowers with the input's own NHWC shape; the epilogue's collapsed view
of it made ``lower_qconv`` fail ("not enough values to unpack"). Checked against the int8
graph on the reference interpreter and against the float model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.backends.reference import run_graph


class Residual(nn.Module):
    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, kernel, padding=kernel // 2)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.c2(h) + h


@pytest.mark.parametrize("kernel", [1, 3])
def test_qconv_reading_its_residual_input(kernel):
    torch.manual_seed(kernel)
    model = Residual(kernel).eval()
    x = torch.randn(32, 8, 6, 6)
    example = (x[:4],)
    llvm = kiln.compile(model, example, data=x, quantize=True)
    assert "qconv" in [n.op for n in llvm.graph.nodes]
    got = llvm(*example).numpy()
    want = run_graph(llvm.graph, [example[0].numpy()])[0]   # the same int8 graph
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    with torch.no_grad():
        fp32 = model(*example).numpy()
    assert np.abs(got - fp32).max() <= 0.05 * np.abs(fp32).max()
