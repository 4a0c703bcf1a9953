"""kiln.compile on ONNX files: the file's symbolic dimensions (dim_param) stay dynamic, tied by
name; static files give a plain CompiledModel; input_shapes fixes sizes; answers match eager
PyTorch (the model the file was exported from)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import kiln
from kiln.api import CompiledModel
from kiln.dynamic import DynamicModel
from kiln.zoo import get_model


def assert_matches(got, want, tol=1e-4) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(np.abs(want).max(), 1e-6)


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    model, (ids,) = get_model("bert")
    path = tmp_path_factory.mktemp("onnx") / "bert.onnx"
    torch.onnx.export(model, (ids,), str(path), input_names=["ids"],
                      dynamic_axes={"ids": {0: "batch", 1: "seq"}}, dynamo=False)
    return model, path


def test_dim_params_become_dynamic_dimensions(bert_onnx) -> None:
    model, path = bert_onnx
    compiled = kiln.compile(path)
    assert isinstance(compiled, DynamicModel)
    assert compiled.dynamic_dims == {"ids": {0: "batch", 1: "seq"}}
    gen = torch.Generator().manual_seed(0)
    for batch, seq in ((1, 32), (3, 16), (2, 7)):
        ids = torch.randint(0, 1000, (batch, seq), generator=gen)
        with torch.no_grad():
            assert_matches(compiled(ids), model(ids))


def test_input_shapes_fix_dimensions_and_dynamic_false_refuses(bert_onnx) -> None:
    model, path = bert_onnx
    fixed = kiln.compile(str(path), input_shapes={"ids": (2, 9)})
    assert isinstance(fixed, CompiledModel) and fixed.frontend == "onnx"
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert_matches(fixed(ids), model(ids))
    with pytest.raises(kiln.KilnError, match="dynamic dimensions .*dynamic=False"):
        kiln.compile(path, dynamic=False)
    with pytest.raises(kiln.KilnError, match="come from the file"):
        kiln.compile(path, dynamic={"ids": {0: "n"}})


def _add_model(dims_a, dims_b) -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, dims_a)
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, dims_b)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_one_dim_param_in_two_inputs_ties_them_and_unnamed_dims_get_names() -> None:
    compiled = kiln.compile(_add_model(["n", 3], ["n", None]))
    assert compiled.dynamic_dims == {"a": {0: "n"}, "b": {0: "n", 1: "b_1"}}
    a, b = np.ones((4, 3), np.float32), np.full((4, 3), 2.0, np.float32)
    np.testing.assert_array_equal(compiled(a, b), a + b)
    with pytest.raises(kiln.KilnError, match="must be equal"):
        compiled(np.ones((4, 3), np.float32), np.ones((5, 3), np.float32))


def test_static_file_gives_a_compiled_model_without_example_inputs() -> None:
    compiled = kiln.compile(_add_model([2, 3], [2, 3]), backend="reference")
    assert isinstance(compiled, CompiledModel)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(compiled(a, a), 2 * a)


def test_compressing_an_onnx_model_is_refused_clearly() -> None:
    with pytest.raises(kiln.KilnError, match="compression of an ONNX model"):
        kiln.compile(_add_model([2, 3], [2, 3]), quantize=True)
