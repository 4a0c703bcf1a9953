"""Indexing and data-movement ops (kiln.ir.ops.index) through every layer: PyTorch programs
through fx, torch.export and Dynamo on the reference and llvm backends against eager PyTorch;
the kiln graphs exported to ONNX (run in ONNX Runtime), imported back and run in PyTorch again;
ONNX models using Gather, GatherElements, ArgMax, TopK, CumSum and Resize against ONNX Runtime.

Inputs have odd sizes, negative dims and negative indices; integer-valued floats make ties,
which must resolve to the index PyTorch picks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import kiln
from kiln.api import compile_graph
from kiln.backends.reference import run_graph
from kiln.frontend.onnx_import import import_onnx
from kiln.interop.to_onnx import graph_to_onnx
from kiln.interop.to_torch import run_torch
from kiln.ir import DType, GraphBuilder, TensorType
from kiln.ir.ops.index import index_operands

G = torch.Generator().manual_seed(0)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def small_ints(*shape) -> torch.Tensor:
    """Floats that are small integers: plenty of ties."""
    return torch.randint(-2, 3, shape, generator=G).float()


class _Program1(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, a):
        return self.fn(a)


class _Program2(_Program1):
    def forward(self, a, b):
        return self.fn(a, b)


class _Program3(_Program1):
    def forward(self, a, b, c):
        return self.fn(a, b, c)


def Program(fn) -> nn.Module:
    """A module computing ``fn(*inputs)`` (fx needs a fixed number of inputs)."""
    return {1: _Program1, 2: _Program2, 3: _Program3}[fn.__code__.co_argcount](fn)


def _gathers(x, i, j):
    return (torch.gather(x, 1, j), x.index_select(-1, i.abs()),
            torch.index_select(x, 0, i[:2].abs()), torch.take_along_dim(x, j - 2, dim=1),
            torch.take_along_dim(x, j.abs()),
            x[:, i], x[i[:2], :, i[1:3, None]], x[:, i[:3], i[1:]])


def _args(x):
    return (x.argmax(1), x.argmin(-1, keepdim=True), x.argmax(), torch.argmin(x, 0),
            torch.max(x, 1), x.min(-1, keepdim=True))


def _sorts(x, y):
    # PyTorch's topk leaves the order of ties open: its operand has none.
    return (y.topk(3, dim=1), torch.topk(y, 2, largest=False), x.sort(dim=1, stable=True),
            torch.sort(x, dim=-1, descending=True, stable=True), x.argsort(dim=0, stable=True))


def _cumsum_roll(x, n):
    # RoBERTa's position ids: an int32 mask's running count, back in the mask's dtype.
    ids = torch.cumsum((n > 1).int(), 1).type_as(n) * n
    return (x.cumsum(1), torch.cumsum(x, -1), torch.cumsum(n, 0), ids, torch.roll(x, 2, 1),
            x.roll((-1, 3), (0, 2)), torch.roll(x, 7))


def _interpolate(mode, align_corners, **how):
    def fn(x):
        return F.interpolate(x, mode=mode, align_corners=align_corners, **how)

    return fn


_X = randn(3, 5, 4)
_I = torch.tensor([-1, 0, 2, -3])
_J = torch.randint(0, 5, (3, 2, 4), generator=G)
_IMG = randn(1, 2, 5, 6)

CASES = {
    "gathers": (Program(_gathers), (_X, _I, _J)),
    "argmax_max_dim": (Program(_args), (small_ints(3, 5, 4),)),
    "topk_sort": (Program(_sorts), (small_ints(3, 5, 4), randn(3, 5, 4))),
    # Rows long enough for the merge sort (short ones and small k take k passes).
    "sort_long_rows": (Program(lambda x: (x.sort(dim=-1, descending=True, stable=True),
                                          torch.topk(-x.abs() + torch.arange(37) / 64, 20))),
                       (small_ints(3, 37),)),
    "cumsum_roll": (Program(_cumsum_roll), (_X, torch.randint(0, 5, (4, 3), generator=G))),
    "upsample_module": (nn.Upsample(scale_factor=3, mode="bilinear"), (_IMG,)),
    "nearest_scale": (Program(_interpolate("nearest", None, scale_factor=1.7)), (_IMG,)),
    "nearest_size": (Program(_interpolate("nearest", None, size=(7, 4))), (_IMG,)),
    "nearest_exact": (Program(_interpolate("nearest-exact", None, size=(9, 4))), (_IMG,)),
    "bilinear_scale": (Program(_interpolate("bilinear", False, scale_factor=2)), (_IMG,)),
    "bilinear_size_corners": (Program(_interpolate("bilinear", True, size=(3, 8))), (_IMG,)),
    "bicubic_scale": (Program(_interpolate("bicubic", False, scale_factor=1.5)), (_IMG,)),
    "bicubic_size_corners": (Program(_interpolate("bicubic", True, size=(8, 7))), (_IMG,)),
}


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flat(r)]
    return [torch.as_tensor(np.asarray(result))]


def assert_matches_eager(got, want) -> None:
    """Every output as PyTorch computes it: same dtypes, indices exactly, values within
    torch.testing's fp32 tolerances."""
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(("frontend", "backend"), [("fx", "reference"), ("fx", "llvm"),
                                                   ("export", "llvm")])
@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_eager(case: str, frontend: str, backend: str) -> None:
    model, inputs = CASES[case]
    model.eval()
    with torch.no_grad():
        want = model(*inputs)
    compiled = kiln.compile(model, inputs, backend=backend, frontend=frontend)
    assert_matches_eager(compiled(*inputs), want)


@pytest.mark.parametrize("case", ["gathers", "argmax_max_dim", "topk_sort", "cumsum_roll",
                                  "bicubic_scale"])
def test_dynamo_matches_eager(case: str) -> None:
    torch._dynamo.reset()
    model, inputs = CASES[case]
    model.eval()
    with torch.no_grad():
        want = model(*inputs)
        got = torch.compile(model, backend="kiln")(*inputs)
    assert_matches_eager(got, want)


def test_argmax_picks_the_first_of_ties_and_nan_like_torch() -> None:
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("nan"), 2.0, float("nan"), 5.0],
                      [-1.0, -1.0, -1.0, -1.0]])
    model = Program(lambda t: (t.argmax(1), t.argmin(1), t.argmax(0))).eval()
    want = model(x)
    assert want[0].tolist() == [1, 0, 0]
    for backend in ("reference", "llvm"):
        assert_matches_eager(kiln.compile(model, (x,), backend=backend)(x), want)


# ---- out-of-range indices ------------------------------------------------------------------------
OUT_OF_RANGE = {
    "index_select_negative": (lambda x, i: x.index_select(1, i), -1),
    "index_select_past_end": (lambda x, i: x.index_select(1, i), 5),
    "gather_negative": (lambda x, i: torch.gather(x, 1, i.reshape(1, 2).expand(3, 2)), -2),
    "advanced_index_past_start": (lambda x, i: x[:, i], -6),
}


def _index_model(case: str):
    fn, bad = OUT_OF_RANGE[case]
    x, good = randn(3, 5), torch.tensor([4, 0])
    worse = good.clone()
    worse[1] = bad
    return Program(fn).eval(), x, good, worse


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_out_of_range_index_raises_on_reference(case: str) -> None:
    model, x, good, bad = _index_model(case)
    compiled = kiln.compile(model, (x, good), backend="reference")
    with pytest.raises((RuntimeError, IndexError)):
        model(x, bad)  # PyTorch refuses it too
    with pytest.raises(kiln.KilnError, match="out of range"):
        compiled(x, bad)
    assert_matches_eager(compiled(x, good), model(x, good))


def test_out_of_range_index_raises_on_llvm() -> None:
    model, x, good, bad = _index_model("index_select_past_end")
    compiled = kiln.compile(model, (x, good), backend="llvm")
    with pytest.raises(kiln.KilnError, match="out of range"):
        compiled(x, bad)


def test_negative_indices_never_read_outside_on_llvm() -> None:
    """Negative indices that PyTorch accepts (advanced indexing) give PyTorch's values."""
    model = Program(lambda x, i: (x[:, i], torch.take_along_dim(x, i.reshape(1, 2), dim=1)))
    model.eval()
    x, i = randn(3, 5), torch.tensor([-5, -1])
    assert_matches_eager(kiln.compile(model, (x, i))(x, i), model(x, i))


# ---- ONNX: export, import back, and to PyTorch again ---------------------------------------------
def run_ort(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``proto`` checked strictly and run in ONNX Runtime (CPU)."""
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_all_close(got, want) -> None:
    """Same dtypes and shapes; floats within 1e-5 relative / 1e-5 absolute, the rest exactly."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["gathers", "argmax_max_dim", "topk_sort", "cumsum_roll",
                                  "nearest_scale", "nearest_size", "bilinear_scale",
                                  "bilinear_size_corners", "bicubic_scale",
                                  "bicubic_size_corners"])
def test_onnx_round_trip(case: str) -> None:
    model, inputs = CASES[case]
    compiled = kiln.compile(model.eval(), inputs, backend="reference")
    g = compiled.graph
    arrays = [t.numpy() for t in inputs]
    want = run_graph(g, arrays)
    proto = graph_to_onnx(g)
    assert_all_close(run_ort(proto, dict(zip(g.inputs, arrays))), want)
    back = import_onnx(proto)
    assert_all_close(run_graph(back, arrays), want)
    assert_all_close(run_torch(back, arrays), want)


def _onnx_model(node: onnx.NodeProto, inputs: list[tuple[str, int, list[int]]],
                outputs: list[tuple[str, int]], initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "m", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
        initializer=list(initializers))
    # ONNX shape inference fills in the outputs' shapes, which the strict checker wants.
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _check_import(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """The imported model on the reference and llvm backends matches ONNX Runtime."""
    want = run_ort(proto, feeds)
    g = import_onnx(proto)
    arrays = [feeds[name] for name in g.inputs]
    assert_all_close(run_graph(g, arrays), want)
    compiled = compile_graph(g, [torch.from_numpy(a) for a in arrays], backend="llvm")
    got = compiled(*arrays)
    assert_all_close(got if isinstance(got, (list, tuple)) else [got], want)


def test_onnx_gather_with_negative_indices_on_llvm() -> None:
    # onnx's node test test_gather_negative_indices gave NaN on the llvm backend.
    node = helper.make_node("Gather", ["x", "i"], ["y"], axis=0)
    proto = _onnx_model(node, [("x", TensorProto.FLOAT, [10]), ("i", TensorProto.INT64, [3])],
                        [("y", TensorProto.FLOAT)])
    x = np.arange(10, dtype=np.float32)
    _check_import(proto, {"x": x, "i": np.array([0, -9, -10])})
    g = import_onnx(proto)
    with pytest.raises(kiln.KilnError, match="out of range"):
        run_graph(g, [x, np.array([0, -11, 2])])


@pytest.mark.parametrize(("op_type", "attrs"), [
    ("GatherElements", {"axis": 1}), ("ArgMax", {"axis": 1, "keepdims": 0}),
    ("ArgMin", {"axis": -1}), ("TopK", {"axis": 1, "largest": 0}), ("CumSum", {"reverse": 1}),
])
def test_onnx_import_of_index_ops(op_type: str, attrs: dict) -> None:
    x = np.random.default_rng(0).integers(-2, 3, (3, 5)).astype(np.float32)
    feeds = {"x": x}
    inputs = [("x", TensorProto.FLOAT, [3, 5])]
    extra, inits, outs = [], [], [("y", TensorProto.FLOAT)]
    if op_type == "GatherElements":
        inputs.append(("i", TensorProto.INT64, [3, 2]))
        feeds["i"] = np.array([[-1, 0], [4, -5], [2, 2]])
        extra = ["i"]
    elif op_type in ("ArgMax", "ArgMin"):
        outs = [("y", TensorProto.INT64)]
    elif op_type == "TopK":
        inits = [helper.make_tensor("k", TensorProto.INT64, [1], [3])]
        extra, outs = ["k"], [("y", TensorProto.FLOAT), ("yi", TensorProto.INT64)]
    else:
        inits = [helper.make_tensor("axis", TensorProto.INT64, [], [1])]
        extra = ["axis"]
    node = helper.make_node(op_type, ["x", *extra], [n for n, _ in outs], **attrs)
    _check_import(_onnx_model(node, inputs, outs, inits), feeds)


@pytest.mark.parametrize(("mode", "coordinate", "how"), [
    ("nearest", "asymmetric", "scales"), ("nearest", "half_pixel", "sizes"),
    ("linear", "half_pixel", "scales"), ("linear", "align_corners", "sizes"),
    ("linear", "pytorch_half_pixel", "sizes"), ("linear", "asymmetric", "scales"),
    ("cubic", "half_pixel", "sizes"), ("cubic", "align_corners", "scales"),
])
def test_onnx_resize_import(mode: str, coordinate: str, how: str) -> None:
    x = np.random.default_rng(1).standard_normal((1, 2, 4, 5)).astype(np.float32)
    if how == "scales":
        inits = [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 1.5, 0.6])]
        names = ["x", "", "scales"]
    else:
        inits = [helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 2, 7, 1])]
        names = ["x", "", "", "sizes"]
    node = helper.make_node("Resize", names, ["y"], mode=mode,
                            coordinate_transformation_mode=coordinate)
    proto = _onnx_model(node, [("x", TensorProto.FLOAT, [1, 2, 4, 5])],
                        [("y", TensorProto.FLOAT)], inits)
    _check_import(proto, {"x": x})


def test_index_operands_name_what_a_backend_checks() -> None:
    b = GraphBuilder("g")
    x = b.input("x", TensorType((3, 5, 4)))
    i = b.input("i", TensorType((2,), DType.i64))
    j = b.input("j", TensorType((3, 1, 4), DType.i32))
    t = b.op("take", [x, i, i], {"axis": 1})
    ge = b.op("gather_elements", [x, j], {"axis": -2, "wrap": False})
    b.output(t, ge)
    g = b.build()
    found = [index_operands(n, g.types) for n in g.nodes]
    assert found == [[("i", 5, True), ("i", 4, True)], [("j", 5, False)]]
