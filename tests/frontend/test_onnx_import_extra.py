"""Limits of the ONNX ops imported as decompositions (kiln.frontend.onnx_import_extra) that the
onnx node-test suite does not reach: integer matmuls too long for exact f32 sums are refused,
and ops ONNX defines by no function stay unsupported with the op named."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.reference import run_graph
from kiln.frontend.onnx_import import import_onnx
from kiln.ir import UnsupportedOpError


def _matmul_integer(k: int):
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi")
    graph = helper.make_graph(
        [node], "mmi", [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])],
        [numpy_helper.from_array(np.full((k, 3), 255, np.uint8), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_matmul_integer_is_exact_at_the_longest_sum_it_accepts() -> None:
    graph = import_onnx(_matmul_integer(258))
    a = np.full((2, 258), 255, np.uint8)
    (y,) = run_graph(graph, [a])
    np.testing.assert_array_equal(y, np.full((2, 3), 258 * 255 * 255, np.int32))


def test_matmul_integer_beyond_exact_f32_sums_is_refused() -> None:
    with pytest.raises(UnsupportedOpError, match="exact only up to 258 terms"):
        import_onnx(_matmul_integer(259))


def test_op_without_importer_or_function_names_the_op() -> None:
    # NonZero: its output's shape depends on the data, and ONNX defines it by no function.
    node = helper.make_node("NonZero", ["x"], ["y"], name="nonzero")
    graph = helper.make_graph(
        [node], "nonzero", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 9])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError, match="kiln cannot import ONNX op NonZero") as info:
        import_onnx(model)
    assert info.value.node == "nonzero"
