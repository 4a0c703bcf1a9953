"""load_graph: the MODEL argument as a kiln graph with example inputs, for zoo names,
file.py:factory specs and ONNX files."""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest
import torch

from kiln.backends.reference import run_graph
from kiln.debug.model_arg import SPEC_HELP, load_graph, load_model, random_inputs
from kiln.ir import DType, GraphBuilder, KilnError, TensorType
from kiln.zoo import get_model


def export(name: str, path, **kwargs):
    model, inputs = get_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=False, opset_version=17,
                          **kwargs)
    return model, str(path)


def test_zoo_name_gives_the_traced_graph_and_the_factory_inputs() -> None:
    graph, arrays, name = load_graph("lenet5")
    _, inputs = get_model("lenet5")
    assert name == "lenet5" and graph.name == "LeNet5"
    assert len(arrays) == 1 and np.array_equal(arrays[0], inputs[0].numpy())
    assert {"conv", "max_pool", "linear"} <= {n.op for n in graph.nodes}


def test_file_factory_spec_is_traced_with_the_frontend(tmp_path) -> None:
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent("""
        import torch

        def build(batch=2):
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval(), \\
                torch.randn(batch, 4)
    """))
    for frontend in ("fx", "export"):
        graph, arrays, name = load_graph(f"{path}:build", batch=5, frontend=frontend)
        assert name == "tiny:build" and arrays[0].shape == (5, 4)
        assert [n.op for n in graph.nodes] == ["linear", "relu"]


@pytest.mark.parametrize("name", ["resnet18_cifar", "bert"])
def test_onnx_file_is_imported_with_seeded_random_inputs(name: str, tmp_path) -> None:
    model, path = export(name, tmp_path / f"{name}.onnx")
    graph, arrays, got_name = load_graph(path)
    assert got_name == name
    again = load_graph(path)[1]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again))
    if arrays[0].dtype.kind == "i":  # token ids: valid rows of the table they index
        # ONNX Gather imports as take (the table first), a torch embedding the other way
        rows = [graph.types[n.inputs[1]].shape[0] for n in graph.nodes
                if n.op == "embedding" and n.inputs[0] == graph.inputs[0]]
        rows += [graph.types[n.inputs[0]].shape[0] for n in graph.nodes
                 if n.op == "take" and n.inputs[1] == graph.inputs[0]]
        assert rows and 0 <= arrays[0].min() and 1 < arrays[0].max() < min(rows)
    with torch.no_grad():
        expected = model(*[torch.from_numpy(a) for a in arrays]).numpy()
    got = run_graph(graph, arrays)[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_dynamic_batch_of_an_onnx_file_becomes_batch(tmp_path) -> None:
    _, path = export("mlp", tmp_path / "mlp.onnx", input_names=["x"],
                     dynamic_axes={"x": {0: "batch"}})
    graph, arrays, _ = load_graph(path)
    assert arrays[0].shape == (1, 64) and graph.types["x"] == TensorType((1, 64))
    graph, arrays, _ = load_graph(path, batch=3)
    assert arrays[0].shape == (3, 64) and graph.types[graph.outputs[0]].shape[0] == 3


def test_static_batch_of_an_onnx_file_cannot_change(tmp_path) -> None:
    _, path = export("mlp", tmp_path / "mlp.onnx")
    with pytest.raises(KilnError, match="cannot be compiled for batch 2"):
        load_graph(path, batch=2)


def test_onnx_errors_are_kiln_errors(tmp_path) -> None:
    with pytest.raises(KilnError, match="does not exist"):
        load_graph(str(tmp_path / "missing.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(KilnError, match="ONNX"):
        load_graph(str(bad))


def test_load_model_points_onnx_files_to_load_graph(tmp_path) -> None:
    _, path = export("mlp", tmp_path / "mlp.onnx")
    with pytest.raises(KilnError, match="load_graph"):
        load_model(path)


def test_spec_help_mentions_onnx_files() -> None:
    assert ".onnx" in SPEC_HELP


def test_random_inputs_follow_the_input_types() -> None:
    b = GraphBuilder("g")
    x = b.input("x", TensorType((2, 3)))
    ids = b.input("ids", TensorType((4,), DType.i32))
    mask = b.input("mask", TensorType((3,), DType.bool))
    table = b.constant(np.zeros((7, 2), np.float32), "table")
    rows = b.op("embedding", [b.op("reshape", [ids], {"shape": (2, 2)}), table])
    b.output(x, rows, mask)
    arrays = random_inputs(b.build(), seed=3)
    assert [a.dtype for a in arrays] == [np.float32, np.int32, np.bool_]
    assert arrays[1].min() >= 0 and arrays[1].max() < 7
    assert all(np.array_equal(a, c) for a, c in zip(arrays, random_inputs(b.build(), seed=3)))
