"""ONNX import: the zoo as torch.onnx.export writes it matches eager PyTorch (reference and llvm
backends), kiln's own ONNX export round-trips, single ONNX ops match ONNX's reference
implementation, and bad files, unsupported ops and dynamic shapes stop with a KilnError."""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import kiln
from kiln.backends.llvm import compile_graph
from kiln.backends.reference import run_graph
from kiln.frontend.onnx_import import ONNX_IMPORT, import_onnx
from kiln.frontend.trace import trace_module
from kiln.interop.to_onnx import export_onnx, graph_to_onnx
from kiln.ir import GraphBuilder, KilnError, TensorType, UnsupportedOpError, parse_graph
from kiln.zoo import ZOO, get_model

_HERE = pathlib.Path(__file__).parent
_spec = importlib.util.spec_from_file_location("onnx_export_cases",
                                               _HERE.parent / "interop" / "test_onnx_export.py")
_export_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_export_cases)
EXPORT_CASES = _export_cases.CASES
Q_CASES = _export_cases.Q_CASES


def assert_close(got: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    """fp32 within ``rtol`` of the output's largest magnitude; other dtypes exactly."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.dtype.kind != "f":
        np.testing.assert_array_equal(got, expected)
        return
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-6)
    assert float(np.abs(got[finite] - expected[finite]).max(initial=0.0)) <= rtol * scale


def torch_export(model: torch.nn.Module, inputs, path: pathlib.Path, **kwargs) -> pathlib.Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=False, opset_version=17,
                          **kwargs)
    return path


# ---- the zoo ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_from_torch_onnx_export_matches_eager(name: str, tmp_path) -> None:
    model, inputs = get_model(name, batch=1)
    graph = import_onnx(torch_export(model, inputs, tmp_path / f"{name}.onnx"))
    arrays = [x.numpy() for x in inputs]
    with torch.no_grad():
        expected = model(*inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    expected = [e.numpy() for e in expected]
    assert graph.name == name
    assert all(n.source and n.source.startswith("onnx:") for n in graph.nodes)
    for backend_outputs in (run_graph(graph, arrays), compile_graph(graph)(arrays)):
        assert len(backend_outputs) == len(expected)
        for got, want in zip(backend_outputs, expected):
            assert_close(got, want)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_kiln_onnx_export_of_zoo_graph_round_trips(name: str) -> None:
    model, inputs = get_model(name, batch=1)
    graph, _ = trace_module(model, inputs)
    arrays = [x.numpy() for x in inputs]
    back = import_onnx(graph_to_onnx(graph))
    # kiln's names survive the trip: inputs and outputs keep theirs.
    assert back.inputs == graph.inputs and back.outputs == graph.outputs
    for got, want in zip(run_graph(back, arrays), run_graph(graph, arrays), strict=True):
        assert_close(got, want)


def test_exported_file_round_trips_and_prints(tmp_path) -> None:
    model, inputs = get_model("lenet5")
    compiled = kiln.compile(model, inputs, backend="reference")
    graph = import_onnx(export_onnx(compiled, tmp_path / "lenet.onnx", opset=21))
    assert parse_graph(str(graph), graph.constants).nodes == graph.nodes
    arrays = [x.numpy() for x in inputs]
    assert_close(run_graph(graph, arrays)[0], run_graph(compiled.graph, arrays)[0])


def test_int8_zoo_graph_round_trips_within_one_step() -> None:
    """QDQ ONNX of an int8 graph imports as float ops between quantize / dequantize: the
    same function up to float rounding of the int32 products (as in ONNX Runtime)."""
    model, inputs = get_model("lenet5", batch=1)
    gen = torch.Generator().manual_seed(0)
    data = [tuple(torch.randn(x.shape, generator=gen) for x in inputs) for _ in range(2)]
    graph = kiln.compress(model, data, example_inputs=inputs, quantize=True).graph
    back = import_onnx(graph_to_onnx(graph))
    assert {"quantize", "dequantize"} <= {n.op for n in back.nodes}
    arrays = [x.numpy() for x in data[0]]
    for got, want in zip(run_graph(back, arrays), run_graph(graph, arrays)):
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


# ---- kiln's single-op exports come back -------------------------------------------------------
def _one_op_graph(op: str, operands, attrs, constant):
    b = GraphBuilder(op)
    names, feeds = [], []
    for k, a in enumerate(operands):
        if k in constant:
            names.append(b.constant(a, f"c{k}"))
        else:
            names.append(b.input(f"in{k}", TensorType.of(a)))
            feeds.append(a)
    b.output(*b.op_multi(op, names, attrs))
    return b.build(), feeds


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_kiln_single_op_export_round_trips(case: str, opset: int) -> None:
    graph, feeds = _one_op_graph(*EXPORT_CASES[case])
    back = import_onnx(graph_to_onnx(graph, opset))
    for got, want in zip(run_graph(back, feeds), run_graph(graph, feeds), strict=True):
        assert_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(Q_CASES))
def test_quantized_anchor_qdq_form_round_trips(case: str) -> None:
    op, operands, attrs = Q_CASES[case]
    graph, feeds = _one_op_graph(op, operands, attrs, tuple(range(1, len(operands))))
    got = run_graph(import_onnx(graph_to_onnx(graph)), feeds)[0]
    want = run_graph(graph, feeds)[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == np.uint8:
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05
    else:
        assert_close(got, want, rtol=1e-5)


# ---- single ONNX ops against ONNX's reference implementation -----------------------------------
def f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def make_model(nodes, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray],
               outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    """A model of ``nodes``, its outputs typed by what ONNX's reference implementation
    computes (the checker wants typed outputs)."""

    def build(output_infos):
        graph = helper.make_graph(
            nodes, "case",
            [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                           v.shape) for k, v in inputs.items()],
            output_infos, [numpy_helper.from_array(v, k) for k, v in consts.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    results = ReferenceEvaluator(build([onnx.ValueInfoProto(name=o) for o in outputs])).run(
        None, inputs)
    return build([helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(
        np.asarray(r).dtype), np.asarray(r).shape) for o, r in zip(outputs, results)])


def check_against_onnx(nodes, inputs, consts=None, outputs=("y",), opset=17) -> None:
    model = make_model(nodes, inputs, consts or {}, list(outputs), opset)
    expected = ReferenceEvaluator(model).run(None, inputs)
    graph = import_onnx(model)
    got = run_graph(graph, list(inputs.values()))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, np.asarray(e), rtol=1e-5)


N = helper.make_node
ONNX_CASES = {
    "gemm_transA_alpha_beta": (
        [N("Gemm", ["a", "b", "c"], ["y"], transA=1, alpha=0.5, beta=2.0)],
        {"a": f32(4, 3), "b": f32(4, 5, seed=1), "c": f32(3, 5, seed=2)}, {}),
    "gemm_transB_const_bias_row": (
        [N("Gemm", ["a", "w", "c"], ["y"], transB=1, alpha=1.5, beta=0.5)],
        {"a": f32(3, 4)}, {"w": f32(5, 4, seed=1), "c": f32(1, 5, seed=2)}),
    "gemm_const_b_scalar_c": (
        [N("Gemm", ["a", "w", "c"], ["y"], alpha=2.0)],
        {"a": f32(3, 4)}, {"w": f32(4, 5, seed=1), "c": np.array(0.25, np.float32)}),
    "matmul_vector_left": ([N("MatMul", ["a", "b"], ["y"])],
                           {"a": f32(4), "b": f32(2, 4, 3, seed=1)}, {}),
    "matmul_vector_right": ([N("MatMul", ["a", "b"], ["y"])],
                            {"a": f32(2, 3, 4), "b": f32(4, seed=1)}, {}),
    "slice_negative_and_steps": (
        [N("Slice", ["x", "s", "e", "a", "st"], ["y"])],
        {"x": f32(6, 7, 8)},
        {"s": i64(-1, 1, -2), "e": i64(-9223372036854775807, 100, 0), "a": i64(0, -2, 2),
         "st": i64(-2, 3, -1)}),
    "slice_default_axes": ([N("Slice", ["x", "s", "e"], ["y"])], {"x": f32(5, 6)},
                           {"s": i64(1, -4), "e": i64(-1, 6)}),
    "pad_constant_value": ([N("Pad", ["x", "p", "v"], ["y"])], {"x": f32(2, 3)},
                           {"p": i64(1, 0, 2, 1), "v": np.array(1.5, np.float32)}),
    "pad_axes_opset18": ([N("Pad", ["x", "p", "", "ax"], ["y"])], {"x": f32(2, 3, 4)},
                         {"p": i64(2, 1, 0, 3), "ax": i64(-1, 0)}, 18),
    "clip_min_max_inputs": ([N("Clip", ["x", "lo", "hi"], ["y"])], {"x": f32(3, 4)},
                            {"lo": np.array(-0.5, np.float32), "hi": np.array(0.3, np.float32)}),
    "clip_max_only": ([N("Clip", ["x", "", "hi"], ["y"])], {"x": f32(3, 4)},
                      {"hi": np.array(0.1, np.float32)}),
    "clip_computed_min": ([N("Clip", ["x", "lo"], ["y"])],
                          {"x": f32(3, 4), "lo": np.array(-0.2, np.float32)}, {}),
    "squeeze_axes_input": ([N("Squeeze", ["x", "ax"], ["y"])], {"x": f32(1, 3, 1, 4)},
                           {"ax": i64(0, -2)}),
    "squeeze_all_ones": ([N("Squeeze", ["x"], ["y"])], {"x": f32(1, 3, 1, 4)}, {}),
    "unsqueeze_axes_input": ([N("Unsqueeze", ["x", "ax"], ["y"])], {"x": f32(3, 4)},
                             {"ax": i64(-1, 0, 2)}),
    "unsqueeze_axes_attr_opset11": ([N("Unsqueeze", ["x"], ["y"], axes=[1])],
                                    {"x": f32(3, 4)}, {}, 11),
    "gather_constant_indices": ([N("Gather", ["x", "i"], ["y"], axis=1)], {"x": f32(3, 5, 2)},
                                {"i": np.array([[4, -5], [2, 3]], np.int64)}),
    "gather_computed_indices_axis1": (
        [N("Gather", ["x", "i"], ["y"], axis=1)],
        {"x": f32(3, 5, 2), "i": np.array([[4, 0, 1]], np.int64)}, {}),
    "gather_table_scalar_index": ([N("Gather", ["t", "i"], ["y"])],
                                  {"i": np.array(2, np.int64)}, {"t": f32(4, 3)}),
    "conv_same_upper_stride": ([N("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER",
                                  strides=[2, 2])], {"x": f32(1, 2, 7, 8)},
                               {"w": f32(3, 2, 2, 3, seed=1)}),
    "conv_asymmetric_pads": ([N("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 0])],
                             {"x": f32(1, 2, 5, 5)}, {"w": f32(3, 2, 3, 3, seed=1),
                                                      "b": f32(3, seed=2)}),
    "max_pool_asymmetric_ceil": ([N("MaxPool", ["x"], ["y"], kernel_shape=[3, 2],
                                    pads=[1, 0, 0, 1], strides=[2, 2], ceil_mode=1)],
                                 {"x": f32(1, 2, 6, 7)}, {}),
    "avg_pool_exclude_pad_asymmetric": ([N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                           pads=[0, 1, 2, 1], strides=[2, 1])],
                                        {"x": f32(1, 2, 6, 5)}, {}),
    "avg_pool_include_pad": ([N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2],
                                pads=[1, 1, 1, 1], count_include_pad=1)],
                             {"x": f32(1, 2, 4, 4)}, {}),
    "global_max_pool": ([N("GlobalMaxPool", ["x"], ["y"])], {"x": f32(2, 3, 4, 5)}, {}),
    "split_num_outputs": ([N("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)],
                          {"x": f32(2, 7)}, {}, 18),
    "shape_constant_of_shape_range_expand": (
        [N("Shape", ["x"], ["s"], start=1), N("ConstantOfShape", ["s"], ["z"],
                                              value=numpy_helper.from_array(
                                                  np.array([2.0], np.float32))),
         N("Range", ["r0", "r1", "r2"], ["r"]), N("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
         N("Add", ["z", "rf"], ["zr"]), N("Expand", ["x", "s2"], ["xe"]),
         N("Mul", ["xe", "zr"], ["y"])],
        {"x": f32(3, 1)}, {"r0": np.array(0, np.int64), "r1": np.array(1, np.int64),
                           "r2": np.array(1, np.int64), "s2": i64(2, 3, 1)}),
    "reduce_axes_input_keepdims0": ([N("ReduceMax", ["x", "ax"], ["y"], keepdims=0)],
                                    {"x": f32(2, 3, 4)}, {"ax": i64(-1, 0)}, 18),
    "reduce_mean_attr_axes": ([N("ReduceMean", ["x"], ["y"], axes=[1])], {"x": f32(2, 3, 4)},
                              {}),
    "reduce_noop_empty_axes": ([N("ReduceSum", ["x"], ["y"], noop_with_empty_axes=1)],
                               {"x": f32(2, 3)}, {}),
    "trilu_computed": ([N("Trilu", ["x", "k"], ["y"], upper=0)], {"x": f32(2, 4, 5)},
                       {"k": np.array(1, np.int64)}),
    "quantize_dequantize_per_tensor": (
        [N("QuantizeLinear", ["x", "s", "z"], ["q"]), N("DequantizeLinear", ["q", "s", "z"],
                                                        ["y"])],
        {"x": f32(3, 4) * 4}, {"s": np.array(0.05, np.float32), "z": np.array(10, np.uint8)},
        19),
    "dequantize_per_channel_weight": (
        [N("DequantizeLinear", ["w", "s"], ["wf"], axis=0), N("MatMul", ["x", "wf"], ["y"])],
        {"x": f32(2, 3)}, {"w": np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
                           "s": np.array([0.1, 0.2, 0.3], np.float32)}, 19),
    "integer_div_truncates": ([N("Div", ["a", "b"], ["q"]), N("Cast", ["q"], ["qf"], to=1),
                               N("Mul", ["x", "qf"], ["y"])], {"x": f32(4)},
                              {"a": i64(7, -7, 9, -9), "b": i64(2, 2, -4, -4)}),
    "hard_sigmoid_onnx_default": ([N("HardSigmoid", ["x"], ["y"])], {"x": f32(3, 4) * 4}, {}),
    "is_inf_and_nan": ([N("IsInf", ["x"], ["y"], detect_negative=0), N("IsNaN", ["x"], ["n"])],
                       {"x": np.array([1.0, np.inf, -np.inf, np.nan], np.float32)}, {},
                       17, ("y", "n")),
    "dropout_identity_mask_unused": ([N("Dropout", ["x"], ["y", "m"])], {"x": f32(3, 4)}, {}),
    "flatten_axis0_and_transpose_default": (
        [N("Transpose", ["x"], ["t"]), N("Flatten", ["t"], ["y"], axis=0)], {"x": f32(2, 3, 4)},
        {}),
    "reshape_zero_and_minus_one": ([N("Reshape", ["x", "s"], ["y"])], {"x": f32(2, 3, 4)},
                                   {"s": i64(0, -1)}),
    "variadic_max_min_sum_mean": (
        [N("Max", ["a", "b", "c"], ["m"]), N("Min", ["a", "b"], ["n"]),
         N("Sum", ["m", "n", "c"], ["s"]), N("Mean", ["s", "a"], ["y"])],
        {"a": f32(3, 4), "b": f32(4, seed=1), "c": f32(3, 1, seed=2)}, {}),
    "pow_int_exponent": ([N("Pow", ["x", "e"], ["y"])], {"x": np.abs(f32(3, 4)) + 0.5},
                         {"e": np.array(3, np.int64)}),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_single_onnx_op_matches_onnx_reference(case: str) -> None:
    nodes, inputs, consts, *rest = ONNX_CASES[case]
    opset = rest[0] if rest else 17
    outputs = rest[1] if len(rest) > 1 else ([o for o in nodes[-1].output if o != "m"])
    check_against_onnx(nodes, inputs, consts, outputs, opset)


def test_softmax_before_opset13_normalizes_the_trailing_axes_together() -> None:
    # ONNX's Python reference implements only the opset-13 meaning; this is the spec's.
    x = f32(2, 3, 4)
    nodes = [N("Softmax", ["x"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "case", [helper.make_tensor_value_info("x", 1, x.shape)],
                              [helper.make_tensor_value_info("y", 1, x.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    rows = np.exp(x.reshape(2, 12).astype(np.float64))
    expected = (rows / rows.sum(axis=1, keepdims=True)).reshape(x.shape).astype(np.float32)
    assert_close(run_graph(import_onnx(model), [x])[0], expected, rtol=1e-5)


def test_table_covers_what_the_exporters_write() -> None:
    written = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Relu", "Clip",
               "Sigmoid", "Tanh", "Erf", "Sqrt", "Reciprocal", "Neg", "Exp", "Log", "Softmax",
               "LayerNormalization", "BatchNormalization", "MaxPool", "AveragePool",
               "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
               "Concat", "Split", "Slice", "Gather", "Shape", "Constant", "ConstantOfShape",
               "Cast", "Where", "Equal", "Less", "Greater", "Not", "ReduceMean", "ReduceSum",
               "ReduceMax", "Expand", "Pad", "Identity", "Dropout", "QuantizeLinear",
               "DequantizeLinear", "Trilu", "IsInf", "ConvTranspose", "LeakyRelu", "HardSwish",
               "HardSigmoid", "LogSoftmax", "Max", "Min", "Abs", "ReduceMin", "Softsign",
               "Sin", "Cos", "Atan"}
    assert written <= set(ONNX_IMPORT)


# ---- names -----------------------------------------------------------------------------------
def test_values_keep_sanitized_onnx_names() -> None:
    nodes = [N("Relu", ["in:put/0"], ["relu/out"], name="/block/relu"),
             N("Neg", ["relu/out"], ["out put"], name="")]
    graph = import_onnx(make_model(nodes, {"in:put/0": f32(2)}, {}, ["out put"]))
    assert graph.inputs == ["in_put_0"] and graph.outputs == ["out_put"]
    assert [n.outputs[0] for n in graph.nodes] == ["relu_out", "out_put"]
    assert graph.nodes[0].source == "onnx:/block/relu"
    assert graph.nodes[1].source == "onnx:Neg(out put)"


# ---- errors ----------------------------------------------------------------------------------
def test_corrupt_file_is_a_kiln_error(tmp_path) -> None:
    model, inputs = get_model("mlp")
    good = torch_export(model, inputs, tmp_path / "mlp.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(KilnError, match="cannot parse"):
        import_onnx(bad)
    bad.write_bytes(b"\x08\x07")  # parses as a ModelProto with no graph
    with pytest.raises(KilnError, match="not valid"):
        import_onnx(bad)


def test_missing_file_and_directory_are_refused(tmp_path) -> None:
    with pytest.raises(KilnError, match="does not exist"):
        import_onnx(tmp_path / "nothing.onnx")
    with pytest.raises(KilnError, match="is not a file"):
        import_onnx(tmp_path)
    with pytest.raises(KilnError, match="cannot import a int"):
        import_onnx(3)


def test_unsupported_op_names_the_node_and_op() -> None:
    nodes = [N("Relu", ["x"], ["r"]), N("Unique", ["r"], ["y"], name="my_unique")]
    with pytest.raises(UnsupportedOpError) as info:
        import_onnx(make_model(nodes, {"x": f32(3)}, {}, ["y"]))
    assert info.value.node == "my_unique" and info.value.op == "Unique"
    assert "ONNX_IMPORT" in str(info.value) and "onnx:my_unique" in str(info.value)


def test_custom_domain_op_is_unsupported() -> None:
    node = N("FusedGemm", ["x", "x"], ["y"], domain="com.microsoft", name="fused")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", 1, [3, 3])],
                              [helper.make_tensor_value_info("y", 1, [3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOpError, match="com.microsoft"):
        import_onnx(model)


def test_used_optional_output_is_unsupported() -> None:
    nodes = [N("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2], name="pool"),
             N("Cast", ["idx"], ["z"], to=1)]
    with pytest.raises(UnsupportedOpError, match="output 1"):
        import_onnx(make_model(nodes, {"x": f32(1, 1, 4)}, {}, ["y", "z"]))


def test_dynamic_dim_needs_input_shapes(tmp_path) -> None:
    model, inputs = get_model("mlp")
    path = torch_export(model, inputs, tmp_path / "mlp_dyn.onnx", input_names=["x"],
                        dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(KilnError, match="input_shapes") as info:
        import_onnx(path)
    assert "batch" in str(info.value)
    graph = import_onnx(path, input_shapes={"x": (3, 64)})
    assert graph.types[graph.inputs[0]].shape == (3, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_close(run_graph(graph, [x.numpy()])[0], model(x).numpy())
    with pytest.raises(KilnError, match="fix only the dynamic dims"):
        import_onnx(path, input_shapes={"x": (3, 65)})
    with pytest.raises(KilnError, match="not inputs of the model"):
        import_onnx(path, input_shapes={"y": (3, 64)})


def test_computed_reshape_shape_must_be_constant() -> None:
    nodes = [N("Reshape", ["x", "s"], ["y"], name="reshape")]
    with pytest.raises(KilnError, match="must be a constant") as info:
        import_onnx(make_model(nodes, {"x": f32(2, 3), "s": i64(3, 2)}, {}, ["y"]))
    assert info.value.node == "reshape"


def _external_model(location: str) -> onnx.ModelProto:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3])
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph([N("Add", ["x", "w"], ["y"])], "ext",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_external_data_outside_the_model_directory_is_refused(tmp_path) -> None:
    (tmp_path / "secret.bin").write_bytes(np.ones(3, np.float32).tobytes())
    (tmp_path / "models").mkdir()
    for location in ("../secret.bin", str(tmp_path / "secret.bin")):
        path = tmp_path / "models" / "m.onnx"
        path.write_bytes(_external_model(location).SerializeToString())
        with pytest.raises(KilnError, match="outside the model's directory"):
            import_onnx(path)
    with pytest.raises(KilnError, match="external data is not loaded"):
        import_onnx(_external_model("w.bin"))


def test_external_data_next_to_the_model_loads(tmp_path) -> None:
    w = np.arange(3, dtype=np.float32)
    graph = helper.make_graph([N("Add", ["x", "w"], ["y"])], "ext",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.weights",
                    size_threshold=0)
    assert (tmp_path / "m.weights").is_file()
    x = f32(3)
    assert_close(run_graph(import_onnx(path), [x])[0], x + w)
