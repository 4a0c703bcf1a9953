"""Matmuls whose B operand is a transposed view of a runtime tensor (attention's q @ k^T).

The packed schedule reads B's rows as vectors; a transposed view has stride 1 along k instead,
so lowering copies it to rows first (``passes/lower/matmul._transposed_b``): into a stack array
per thread when batch entries run in parallel, into the arena when one matrix is multiplied
by a parallel product; a single row of A (a decode step) takes dot products along B's rows
instead. Checked against NumPy and PyTorch on the host and the AVX2 target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.compiler import default_target
from kiln.ir import GraphBuilder, TensorType
from kiln.passes.compile import compile_kernels
from kiln.passes.lower.matmul import TRANSPOSED_B_MAX
from kiln.passes.target import named_target


def _graph(a_shape, b_shape):
    """a @ b^T with b^T a permute of a graph input (its last two axes swapped)."""
    b = GraphBuilder("qk")
    a = b.input("a", TensorType(a_shape))
    k = b.input("k", TensorType(b_shape))
    perm = list(range(len(b_shape) - 2)) + [len(b_shape) - 1, len(b_shape) - 2]
    kt = b.op("permute", [k], {"perm": perm})
    b.output(b.op("mul", [b.op("matmul", [a, kt]), b.constant(np.float32(0.125))]))
    return b.build()


def _targets():
    host = default_target()
    return ["host"] + (["avx2"] if host.vector_bits > 256 and host.has("avx2") else [])


CASES = {
    # name: (a shape, b shape, copied to rows?)
    "heads": ((1, 4, 32, 64), (1, 4, 32, 64), "scratch"),
    "batch_heads": ((2, 3, 17, 40), (2, 3, 29, 40), "scratch"),
    "one_matrix": ((70, 50), (45, 50), "workspace"),
    "too_large": ((2, 5, 300), (2, 64, 300), None),
    # One query row (a decode step): dot products read k's rows in place, nothing copied.
    "decode_step": ((1, 12, 1, 64), (1, 12, 128, 64), "not one row"),
}


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("case", list(CASES))
def test_transposed_b_matches_numpy_and_torch(case, target):
    a_shape, b_shape, copied = CASES[case]
    graph = _graph(a_shape, b_shape)
    host = default_target()
    tgt = host if target == "host" else named_target(target, host)
    rng = np.random.default_rng(len(a_shape) * 7 + a_shape[-1])
    a = rng.standard_normal(a_shape).astype(np.float32)
    k = rng.standard_normal(b_shape).astype(np.float32)
    want = (a.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)) * 0.125
    eager = (torch.from_numpy(a) @ torch.from_numpy(k).transpose(-1, -2) * 0.125).numpy()
    prog = compile_graph(graph, target=tgt, cache=False)
    for threads in (1, 2):
        prog.threads(threads, adaptive=False)
        got = prog([a, k])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, eager, rtol=1e-5, atol=1e-5)
    text = "\n".join(str(s.kernel) for s in
                     compile_kernels(graph, width=tgt.f32_lanes, target=tgt).lowered.steps)
    if copied == "scratch":
        assert "scratch bt_" in text
    elif copied == "workspace":
        assert "ws_bt_" in text and "scratch bt_" not in text
    elif copied == "not one row":
        assert a_shape[-2] == 1 and "bt_" not in text
    else:
        assert b_shape[-1] * b_shape[-2] > TRANSPOSED_B_MAX
        assert "bt_" not in text
