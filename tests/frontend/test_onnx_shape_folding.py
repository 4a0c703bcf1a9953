"""Shape-valued operands that follow from the graph inputs' static shapes are computed while
importing: Shape -> Gather -> Concat -> Reshape chains, Range, Expand and Slice with tensor
bounds become constants, so the kiln graph keeps only the data ops, and the results match
ONNX's reference implementation on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.frontend.onnx_import import import_onnx

N = helper.make_node


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _model(nodes, inputs: dict[str, list[int]], consts: dict[str, np.ndarray], out: list[int]):
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CHAINS = {
    # y = x.reshape(x.shape[0], -1)
    "shape_gather_concat_reshape": (
        [N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["n"], axis=0),
         N("Unsqueeze", ["n", "axes0"], ["n1"]), N("Concat", ["n1", "minus1"], ["t"], axis=0),
         N("Reshape", ["x", "t"], ["y"])],
        {"x": [2, 3, 4]}, {"zero": _i64(0).reshape(()), "axes0": _i64(0), "minus1": _i64(-1)},
        [2, 12], {"reshape"}),
    # y = x + arange(x.shape[-1])
    "range_of_a_dim": (
        [N("Shape", ["x"], ["s"]), N("Gather", ["s", "last"], ["n"], axis=0),
         N("Range", ["zero", "n", "one"], ["r"]), N("Cast", ["r"], ["rf"], to=1),
         N("Add", ["x", "rf"], ["y"])],
        {"x": [2, 5]}, {"last": _i64(1).reshape(()), "zero": _i64(0).reshape(()),
                        "one": _i64(1).reshape(())}, [2, 5], {"add"}),
    # y = b expanded to a's shape
    "expand_to_another_inputs_shape": (
        [N("Shape", ["a"], ["s"]), N("Expand", ["b", "s"], ["e"]), N("Add", ["a", "e"], ["y"])],
        {"a": [4, 3], "b": [1, 3]}, {}, [4, 3], {"expand", "add"}),
    # y = x[:, x.shape[1] // 2:]
    "slice_with_computed_start": (
        [N("Shape", ["x"], ["s"]), N("Slice", ["s", "one1", "two1"], ["d"]),
         N("Div", ["d", "two"], ["h"]), N("Slice", ["x", "h", "big", "one1"], ["y"])],
        {"x": [3, 6]}, {"one1": _i64(1), "two1": _i64(2), "two": _i64(2), "big": _i64(1 << 30)},
        [3, 3], {"slice"}),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_shape_chain_folds_to_constants_and_matches_onnx(name: str) -> None:
    nodes, inputs, consts, out, kept_ops = CHAINS[name]
    model = _model(nodes, inputs, consts, out)
    graph = import_onnx(model)
    assert {n.op for n in graph.nodes} == kept_ops
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in inputs.values()]
    (expected,) = ReferenceEvaluator(model).run(None, dict(zip(inputs, arrays)))
    for got in (run_graph(graph, arrays)[0], compile_graph(graph)(arrays)[0]):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
