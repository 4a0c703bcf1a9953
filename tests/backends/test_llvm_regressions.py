"""Shapes and attribute spellings that once broke the llvm lowering (found by the CUDA
backend's op table, which runs the same lowering)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, TensorType


def check(op: str, shape, attrs: dict) -> None:
    b = GraphBuilder(op)
    x = b.input("x", TensorType(shape))
    b.output(b.op(op, [x], attrs))
    g = b.build()
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(compile_graph(g, cache=False)([a])[0], run_graph(g, [a])[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_of_a_scalar(op):
    check(op, (), {"axis": 0})


@pytest.mark.parametrize("op", ["max_pool", "avg_pool"])
def test_2d_pool_with_one_int_stride(op):
    check(op, (1, 2, 9, 9), {"kernel": [3, 3], "stride": 2})
