"""An elementwise kernel reading through a reshape that merges dims (attention's heads back
into the hidden size: [1, 32, 4, 64] -> [1, 32, 256]) iterates the finer shape, so its
indices stay affine and its loads vectorize (``passes/lower._split_view``); before, every
element split its index back with a division and a modulo. Checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.compiler import default_target
from kiln.ir import GraphBuilder, TensorType
from kiln.passes.compile import compile_kernels


def _heads_back(extra: str):
    b = GraphBuilder("heads")
    x = b.input("x", TensorType((1, 4, 32, 64)))
    t = b.op("permute", [x], {"perm": [0, 2, 1, 3]})
    r = b.op("reshape", [t], {"shape": [1, 32, 256]})
    y = b.op("relu", [r])
    if extra == "residual":
        y = b.op("add", [y, b.input("res", TensorType((1, 32, 256)))])
    elif extra == "bias":
        y = b.op("add", [y, b.constant(np.linspace(-1, 1, 256, dtype=np.float32))])
    elif extra == "quantize":
        y = b.op("quantize", [y], {"scale": 0.01, "zero_point": 3, "dtype": "u8"})
    b.output(y)
    return b.build()


def _want(extra, x, res):
    y = np.maximum(x.transpose(0, 2, 1, 3).reshape(1, 32, 256), 0)
    if extra == "residual":
        return y + res
    if extra == "bias":
        return y + np.linspace(-1, 1, 256, dtype=np.float32)
    if extra == "quantize":
        return np.clip(np.rint(y / np.float32(0.01)) + 3, 0, 255).astype(np.uint8)
    return y


@pytest.mark.parametrize("extra, split", [("none", True), ("residual", True),
                                          ("quantize", True), ("bias", False)])
def test_elementwise_through_merging_reshape(extra, split):
    graph = _heads_back(extra)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 32, 64)).astype(np.float32)
    res = rng.standard_normal((1, 32, 256)).astype(np.float32)
    args = [x, res] if extra == "residual" else [x]
    got = compile_graph(graph, cache=False)(args)[0]
    want = _want(extra, x, res)
    if want.dtype == np.uint8:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    target = default_target()
    (step,) = [s for s in compile_kernels(graph, width=target.f32_lanes,
                                          target=target).lowered.steps]
    text = str(step.kernel)
    # the finer loop nest: no division or modulo in any index, vector loads of x
    assert ("%" not in text) == split
    if split:
        assert f", {target.f32_lanes}]" in text
