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


@pytest.mark.parametrize("isa", ["host", "avx2", "sse2"])
@pytest.mark.parametrize("op", ["linear", "linear_w8"])
def test_dense_layer_over_an_inlined_3d_permute(op, isa):
    """A linear layer whose input is a permute computed inside its kernel: the GEMM's rows
    must index the permute's own 3-d shape (random graph 131 crashed lowering linear_w8 with
    a 2-d index, on 8-lane targets only: wider ones had refused the 9 output columns)."""
    from kiln.backends.llvm.compiler import host_target
    from kiln.passes.target import named_target

    rng = np.random.default_rng(1)
    b = GraphBuilder(op)
    x = b.input("x", TensorType((4, 8, 8)))
    p = b.op("permute", [x], {"perm": [2, 0, 1]})
    if op == "linear":
        w = b.constant(rng.standard_normal((9, 8)).astype(np.float32), "w")
        operands = [p, w]
    else:
        w = b.constant(rng.integers(-127, 128, (9, 8)).astype(np.int8), "w")
        operands = [p, w, b.constant(rng.uniform(1e-3, 1e-2, 9).astype(np.float32), "s")]
    b.output(b.op(op, operands, {}))
    g = b.build()
    a = rng.standard_normal((4, 8, 8)).astype(np.float32)
    target = named_target(isa, host_target())
    np.testing.assert_allclose(compile_graph(g, target=target, cache=False)([a])[0],
                               run_graph(g, [a])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["host", "avx2", "sse2"])
@pytest.mark.parametrize("width", [8, 16, 32])
def test_residual_add_of_a_sliced_input_in_a_gemm_epilogue(isa, width):
    """x + linear(x) where x is a slice of an input reshaped: the epilogue's collapsed view
    once indexed the slice's input by its merged axes and read the wrong elements (every
    target, whenever the layer took the GEMM path: found by the AVX2 run of the Transformer
    encoder-layer test)."""
    from kiln.backends.llvm.compiler import host_target
    from kiln.passes.target import named_target

    rng = np.random.default_rng(2)
    b = GraphBuilder("residual")
    flat = b.input("flat", TensorType((width + 10 * width,)))
    piece = b.op("slice", [flat], {"axis": 0, "start": width, "end": 11 * width})
    x = b.op("reshape", [piece], {"shape": [2, 5, width]})
    w = b.constant(rng.standard_normal((width, width)).astype(np.float32), "w")
    bias = b.constant(rng.standard_normal(width).astype(np.float32), "b")
    b.output(b.op("add", [x, b.op("linear", [x, w, bias], {})]))
    g = b.build()
    a = rng.standard_normal(11 * width).astype(np.float32)
    target = named_target(isa, host_target())
    np.testing.assert_allclose(compile_graph(g, target=target, cache=False)([a])[0],
                               run_graph(g, [a])[0], rtol=1e-5, atol=1e-5)
