"""Softmax on the CPU keeps a row's exponentials in a per-thread array between its sum and its
output sweep (``passes/lower/anchors._softmax``), for contiguous rows up to SOFTMAX_ROW_MAX;
longer rows and other axes compute them twice. Checked against NumPy and PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.compiler import default_target
from kiln.ir import GraphBuilder, TensorType
from kiln.passes.compile import compile_kernels
from kiln.passes.lower.anchors import SOFTMAX_ROW_MAX


@pytest.mark.parametrize("shape, axis, kept", [
    ((4, 32, 32), -1, True),
    ((3, 7, 33), -1, True),                    # a vector tail
    ((2, SOFTMAX_ROW_MAX), -1, True),
    ((2, SOFTMAX_ROW_MAX + 3), -1, False),     # too long for the stack array
    ((5, 40, 3), 1, False),                    # not the last axis
])
def test_softmax_rows_match_numpy_and_torch(shape, axis, kept):
    b = GraphBuilder("softmax")
    x = b.input("x", TensorType(shape))
    b.output(b.op("softmax", [x], {"axis": axis}))
    graph = b.build()
    rng = np.random.default_rng(sum(shape))
    a = (rng.standard_normal(shape) * 4).astype(np.float32)
    a64 = a.astype(np.float64)
    e = np.exp(a64 - a64.max(axis=axis, keepdims=True))
    want = e / e.sum(axis=axis, keepdims=True)
    prog = compile_graph(graph, cache=False)
    for threads in (1, 2):
        prog.threads(threads, adaptive=False)
        got = prog([a])[0]
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(a), axis).numpy(),
                                   rtol=2e-6, atol=1e-7)
    target = default_target()
    text = "\n".join(str(s.kernel) for s in compile_kernels(
        graph, width=target.f32_lanes, target=target).lowered.steps)
    assert ("scratch exp_" in text) == kept
    stores = [line for line in text.splitlines() if line.strip().startswith("v_softmax[")]
    assert stores and all(("exp(" in line) != kept for line in stores)
