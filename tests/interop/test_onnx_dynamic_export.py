"""ONNX export of dynamic models (kiln.interop.onnx_dynamic): the file's dynamic dimensions are
dim_params named after their sizes, no size is frozen inside the graph, and ONNX Runtime
matches the DynamicModel and eager PyTorch at several sizes; kiln.compile of the file gives
back a DynamicModel with the same names. What would hold at one size only is refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.debug.cli import _dynamic_dims, main
from kiln.dynamic import DynamicModel
from kiln.zoo import get_model

SEQ = torch.export.Dim("seq", max=64)
CASES = {
    "mlp": (True, [{"batch": 1}, {"batch": 4}, {"batch": 7}]),
    "resnet18_cifar": (True, [{"batch": 1}, {"batch": 3}]),
    "bert": ({"input_ids": {0: "batch", 1: SEQ}},
             [{"batch": 1, "seq": 32}, {"batch": 3, "seq": 16}, {"batch": 2, "seq": 5}]),
}


def dims_of(values) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in values}


def assert_close(got, want, tol=1e-4) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(np.abs(want).max(), 1e-6)


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    name = request.param
    dynamic, sizes = CASES[name]
    model, inputs = get_model(name)
    compiled = kiln.compile(model, inputs, dynamic=dynamic)
    path = kiln.export(compiled, tmp_path_factory.mktemp("onnx") / f"{name}.onnx")
    return name, model, compiled, path, sizes


def test_dynamic_dimensions_are_dim_params(exported) -> None:
    name, _, compiled, path, _ = exported
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    want = {"mlp": {"x": ["batch", 64]}, "resnet18_cifar": {"x": ["batch", 3, 32, 32]},
            "bert": {"input_ids": ["batch", "seq"]}}[name]
    assert dims_of(proto.graph.input) == want
    assert all(d[0] == "batch" for d in dims_of(proto.graph.output).values())


def test_no_size_is_frozen_in_the_graph(exported) -> None:
    """Reshape targets are computed from the inputs' shapes: no initializer a Reshape reads
    holds a probe's batch size."""
    name, _, _, path, _ = exported
    proto = onnx.load(path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    reshapes = [n for n in proto.graph.node if n.op_type == "Reshape"]
    for node in reshapes:
        target = inits.get(node.input[1])
        assert target is None or (target[:1] != 3).all(), node.name
    if name != "mlp":   # mlp has no reshape
        assert any(n.op_type == "Shape" for n in proto.graph.node)


def test_onnx_runtime_matches_kiln_and_eager_at_several_sizes(exported) -> None:
    name, model, compiled, path, sizes = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for at in sizes:
        xs = tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x
                   for x in compiled.inputs_at(at))
        got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)})
        with torch.no_grad():
            want = model(*xs)
        assert_close(got[0], want)
        assert_close(got[0], compiled(*xs))


def test_compiling_the_file_gives_the_same_dynamic_dimensions(exported) -> None:
    name, model, compiled, path, sizes = exported
    again = kiln.compile(path)
    assert isinstance(again, DynamicModel)
    assert list(again.dynamic_dims.values()) == list(compiled.dynamic_dims.values())
    xs = compiled.inputs_at(sizes[-1])
    with torch.no_grad():
        assert_close(again(*xs), model(*xs))


def test_a_table_slice_needs_a_bound_on_its_size(tmp_path) -> None:
    """bert's position embedding is folded to a [1, seq, d] constant: with seq bounded the
    file holds the table at the bound and slices it; unbounded, the export is refused."""
    model, inputs = get_model("bert")
    compiled = kiln.compile(model, inputs, dynamic={"input_ids": {0: "batch", 1: "seq"}})
    with pytest.raises(kiln.KilnError, match="constant 'const' changes shape") as info:
        kiln.export(compiled, tmp_path / "bert.onnx")
    assert info.value.node == "add" and "bound seq" in info.value.hint
    assert not (tmp_path / "bert.onnx").exists()


class DividesBySize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.shape[0]


def test_a_number_computed_from_a_size_is_refused(tmp_path) -> None:
    compiled = kiln.compile(DividesBySize().eval(), (torch.randn(2, 4),), dynamic=True)
    with pytest.raises(kiln.KilnError, match="cannot export truediv.*one size only") as info:
        kiln.export(compiled, tmp_path / "div.onnx")
    assert info.value.op == "div"
    # one size exports
    kiln.export(compiled.specialize(torch.randn(2, 4)), tmp_path / "div.onnx")


def test_static_models_and_signing(tmp_path) -> None:
    model, inputs = get_model("mlp")
    path = kiln.export(kiln.compile(model, inputs), tmp_path / "mlp.onnx")
    assert dims_of(onnx.load(path).graph.input) == {"x": [1, 64]}
    with pytest.raises(kiln.KilnError, match="already exists"):
        kiln.export(kiln.compile(model, inputs), tmp_path / "mlp.onnx")
    with pytest.raises(kiln.KilnError, match="carries no signature"):
        kiln.export(kiln.compile(model, inputs), tmp_path / "m2.onnx", sign_key=b"key")


def test_cli_exports_dynamic_onnx(tmp_path, capsys) -> None:
    out = tmp_path / "bert.onnx"
    assert main(["export", "bert", "-o", str(out), "--format", "onnx",
                 "--dynamic", "0=batch,1=seq<=64"]) == 0
    assert dims_of(onnx.load(out).graph.input) == {"input_ids": ["batch", "seq"]}
    assert main(["export", "mlp", "-o", str(tmp_path / "m.kiln"), "--dynamic"]) == 2
    assert "--format onnx" in capsys.readouterr().err


def test_cli_dynamic_spec() -> None:
    assert _dynamic_dims(None) is None and _dynamic_dims("") is True
    spec = _dynamic_dims("0=batch,input_ids:1=seq<=512")
    assert spec[0] == {0: "batch"} and spec["input_ids"][1].max == 512
    with pytest.raises(kiln.KilnError, match="is not"):
        _dynamic_dims("batch")
