"""ONNX export: every op has a mapping, and exported graphs run in ONNX Runtime with kiln's
outputs (every zoo model, and single-op graphs against the reference backend)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.backends.reference import run_graph
from kiln.interop.to_onnx import ONNX_IMPL, export_onnx, graph_to_onnx
from kiln.ir import DType, Graph, GraphBuilder, KilnError, TensorType, all_ops
from kiln.zoo import ZOO, get_model

RNG_SEED = 0


def run_onnx(proto: onnx.ModelProto, g: Graph, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Check ``proto`` strictly, then run it in ONNX Runtime (CPU, all graph optimizations)."""
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == g.inputs
    return session.run(None, dict(zip(g.inputs, arrays)))


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    """fp32: within rtol 1e-4 / atol 1e-5 of the output's scale; other dtypes exactly."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.dtype.kind != "f":
        np.testing.assert_array_equal(got, expected)
        return
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(float(finite.max()) if finite.size else 0.0, 1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_every_op_has_an_onnx_mapping() -> None:
    """An ONNX_IMPL entry, or a decomposition written with the entries of the ops inside it."""
    composite = {name for name, opdef in all_ops().items() if opdef.decomposition is not None}
    assert set(all_ops()) <= set(ONNX_IMPL) | composite
    assert set(ONNX_IMPL) <= set(all_ops())


def test_composite_op_is_written_as_its_decomposition() -> None:
    """silu has no entry: x * sigmoid(x), whose sigmoid has one (one Sigmoid node); the last
    node writes the kiln output."""
    b = GraphBuilder("g")
    b.output(b.op("silu", [b.input("x", TensorType((2, 3), DType.f32))], name="y"))
    nodes = graph_to_onnx(b.build()).graph.node
    assert [n.op_type for n in nodes] == ["Sigmoid", "Mul"]
    assert list(nodes[-1].output) == ["y"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_matches_kiln_in_onnx_runtime(name: str, tmp_path) -> None:
    model, inputs = get_model(name, batch=1)
    compiled = kiln.compile(model, inputs, backend="reference")
    arrays = [x.numpy() for x in inputs]
    expected = compiled(*arrays)
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    path = export_onnx(compiled, tmp_path / f"{name}.onnx")
    got = run_onnx(onnx.load(path), compiled.graph, arrays)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, e)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_int8_zoo_model_matches_kiln_in_onnx_runtime(name: str) -> None:
    """The quantized graph as QDQ ONNX: ONNX Runtime's float convolutions may land a value
    one int8 step away from kiln's int32 arithmetic now and then, nothing more."""
    model, inputs = get_model(name, batch=1)
    gen = torch.Generator().manual_seed(0)
    data = [tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x
                  for x in inputs) for _ in range(2)]
    graph = kiln.compress(model, data, example_inputs=inputs, quantize=True).graph
    assert any(n.op in ("qconv", "qlinear") for n in graph.nodes)
    proto = graph_to_onnx(graph)
    onnx.checker.check_model(proto, full_check=True)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    arrays = [x.numpy() for x in data[0]]
    expected = run_graph(graph, arrays)
    got = run_onnx(proto, graph, arrays)
    for g, e in zip(got, expected):
        assert np.abs(g - e).max() <= 2e-2 * np.abs(e).max()


# ---- single-op round trips -------------------------------------------------------------------
def f32(*shape: int, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def roundtrip(op: str, operands: list[np.ndarray], attrs: dict | None = None, *,
              constant: tuple[int, ...] = (), opset: int = 17) -> None:
    """A one-node graph of ``op`` (operands at ``constant`` positions as constants): ONNX
    Runtime's outputs equal the reference backend's."""
    b = GraphBuilder(op)
    names, feeds = [], []
    for k, a in enumerate(operands):
        if k in constant:
            names.append(b.constant(a, f"c{k}"))
        else:
            names.append(b.input(f"in{k}", TensorType.of(a)))
            feeds.append(a)
    b.output(*b.op_multi(op, names, attrs))
    g = b.build()
    expected = run_graph(g, feeds)
    got = run_onnx(graph_to_onnx(g, opset), g, feeds)
    assert len(got) == len(expected)
    for x, e in zip(got, expected):
        assert_close(x, e)


def causal_blocking_mask(L: int, S: int) -> np.ndarray:
    """A bool mask whose first row attends to nothing (kiln gives that row zeros)."""
    mask = np.random.default_rng(1).random((1, L, S)) > 0.3
    mask[:, 0, :] = False
    return mask


CASES = {
    "linear_2d": ("linear", [f32(3, 8), f32(5, 8), f32(5)], {}, (1, 2)),
    "linear_3d_const": ("linear", [f32(2, 3, 8), f32(5, 8), f32(5)], {}, (1, 2)),
    "linear_3d_input_weight": ("linear", [f32(2, 3, 8), f32(5, 8)], {}, ()),
    "matmul_batched": ("matmul", [f32(2, 1, 3, 4), f32(5, 4, 6)], {}, ()),
    "conv_groups": ("conv", [f32(1, 4, 9, 9), f32(6, 2, 3, 3), f32(6)],
                    {"stride": 2, "padding": 1, "dilation": 1, "groups": 2}, (1, 2)),
    "conv_1d_dilated": ("conv", [f32(1, 3, 12), f32(4, 3, 3)],
                        {"padding": 2, "dilation": 2}, (1,)),
    "conv_transpose": ("conv_transpose", [f32(1, 4, 5, 5), f32(4, 3, 3, 3), f32(6)],
                       {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2}, (1, 2)),
    "attention": ("attention", [f32(2, 4, 5, 8), f32(2, 4, 6, 8), f32(2, 4, 6, 3)], {}, ()),
    "attention_causal_scale": ("attention", [f32(1, 2, 5, 8), f32(1, 2, 5, 8), f32(1, 2, 5, 8)],
                               {"causal": True, "scale": 0.3}, ()),
    "attention_bool_mask_empty_row": (
        "attention", [f32(2, 5, 4), f32(2, 6, 4), f32(2, 6, 3), causal_blocking_mask(5, 6)],
        {}, ()),
    "attention_causal_float_mask": (
        "attention", [f32(2, 5, 4), f32(2, 5, 4), f32(2, 5, 3), f32(5, 5)],
        {"causal": True}, ()),
    "relu": ("relu", [f32(3, 4)], {}, ()),
    "relu_int": ("relu", [np.arange(-4, 4, dtype=np.int32)], {}, ()),
    "clamp_both": ("clamp", [f32(3, 4)], {"min": -0.5, "max": 0.5}, ()),
    "clamp_max_only": ("clamp", [f32(3, 4)], {"max": 0.2}, ()),
    "clamp_none": ("clamp", [f32(3, 4)], {}, ()),
    "leaky_relu": ("leaky_relu", [f32(3, 4)], {"negative_slope": 0.2}, ()),
    "gelu": ("gelu", [f32(3, 4)], {}, ()),
    "gelu_tanh": ("gelu", [f32(3, 4)], {"approximate": "tanh"}, ()),
    "silu": ("silu", [f32(3, 4)], {}, ()),
    "hardswish": ("hardswish", [f32(3, 4) * 4], {}, ()),
    "hardsigmoid": ("hardsigmoid", [f32(3, 4) * 4], {}, ()),
    "softsign": ("softsign", [f32(3, 4) * 4], {}, ()),
    "sigmoid": ("sigmoid", [f32(3, 4) * 4], {}, ()),
    "reciprocal": ("reciprocal", [np.abs(f32(3, 4)) + 0.1], {}, ()),
    "rsqrt": ("rsqrt", [np.abs(f32(3, 4)) + 0.1], {}, ()),
    "log": ("log", [np.abs(f32(3, 4)) + 0.1], {}, ()),
    "erf": ("erf", [f32(3, 4)], {}, ()),
    "sin": ("sin", [f32(3, 4) * 4], {}, ()),
    "cos": ("cos", [f32(3, 4) * 4], {}, ()),
    "atan": ("atan", [f32(3, 4) * 4], {}, ()),
    "neg_int": ("neg", [np.arange(-4, 4, dtype=np.int64)], {}, ()),
    "cast_float_to_int": ("cast", [f32(3, 4) * 5], {"dtype": "i32"}, ()),
    "cast_int_to_float": ("cast", [np.arange(6, dtype=np.int64)], {"dtype": "f32"}, ()),
    "cast_to_bool": ("cast", [np.array([0.0, 1.5, -2.0], np.float32)], {"dtype": "bool"}, ()),
    "sub_broadcast": ("sub", [f32(3, 1), f32(4)], {}, ()),
    "div": ("div", [f32(3, 4), np.abs(f32(4)) + 0.5], {}, ()),
    "pow": ("pow", [np.abs(f32(3, 4)) + 0.1, f32(4)], {}, ()),
    "maximum": ("maximum", [f32(3, 4), f32(3, 4, seed=1)], {}, ()),
    "ne": ("ne", [np.array([1, 2, 3]), np.array([1, 0, 3])], {}, ()),
    "le": ("le", [f32(3, 4), f32(4, seed=1)], {}, ()),
    "where": ("where", [f32(3, 4) > 0, f32(3, 4), f32(4)], {}, ()),
    "logical_not": ("logical_not", [f32(3, 4) > 0], {}, ()),
    "log_softmax": ("log_softmax", [f32(3, 4)], {"axis": 0}, ()),
    "batch_norm": ("batch_norm", [f32(2, 3, 4, 4), f32(3), np.abs(f32(3)) + 0.5, f32(3),
                                  f32(3)], {"eps": 1e-3}, (1, 2, 3, 4)),
    "layer_norm_2d": ("layer_norm", [f32(2, 3, 4, 5), f32(4, 5), f32(4, 5)],
                      {"normalized_ndim": 2}, (1, 2)),
    "layer_norm_no_affine": ("layer_norm", [f32(2, 3, 6)], {}, ()),
    "group_norm": ("group_norm", [f32(2, 6, 3, 3), f32(6), f32(6)], {"groups": 3}, (1,)),
    "group_norm_no_affine": ("group_norm", [f32(2, 4, 5)], {"groups": 2}, ()),
    "max_pool_ceil": ("max_pool", [f32(1, 2, 7, 8)],
                      {"kernel": (3, 3), "stride": 2, "padding": 1, "ceil_mode": True}, ()),
    # PyTorch drops a last ceil-mode window that would start in the right padding.
    "max_pool_ceil_drops_last": ("max_pool", [f32(1, 2, 5, 5)],
                                 {"kernel": (2, 2), "stride": 2, "padding": 1,
                                  "ceil_mode": True}, ()),
    "avg_pool_ceil_drops_last": ("avg_pool", [f32(1, 2, 5, 5)],
                                 {"kernel": (2, 2), "stride": 2, "padding": 1,
                                  "ceil_mode": True}, ()),
    "avg_pool_1d_ceil_exclude_pad": ("avg_pool", [f32(1, 2, 8)],
                                     {"kernel": (3,), "stride": 2, "padding": 1,
                                      "ceil_mode": True, "count_include_pad": False}, ()),
    "max_pool_ceil_mixed_axes": ("max_pool", [f32(1, 2, 5, 8)],
                                 {"kernel": (2, 3), "stride": 2, "padding": 1,
                                  "ceil_mode": True}, ()),
    "avg_pool_ceil_mixed_axes": ("avg_pool", [f32(1, 2, 5, 8)],
                                 {"kernel": (2, 3), "stride": 2, "padding": 1,
                                  "ceil_mode": True}, ()),
    "max_pool_dilated": ("max_pool", [f32(1, 2, 9, 9)],
                         {"kernel": (2, 2), "dilation": 2}, ()),
    "avg_pool_ceil": ("avg_pool", [f32(1, 2, 7, 8)],
                      {"kernel": (3, 3), "stride": 2, "padding": 1, "ceil_mode": True}, ()),
    "avg_pool_exclude_pad": ("avg_pool", [f32(1, 2, 6, 6)],
                             {"kernel": (3, 3), "stride": 1, "padding": 1,
                              "count_include_pad": False}, ()),
    "adaptive_avg_pool_global": ("adaptive_avg_pool", [f32(1, 3, 5, 6)],
                                 {"output_size": (1, 1)}, ()),
    "adaptive_avg_pool_uneven": ("adaptive_avg_pool", [f32(1, 3, 7, 6)],
                                 {"output_size": (3, 6)}, ()),
    "reduce_sum_all": ("reduce_sum", [f32(3, 4, 2)], {}, ()),
    "reduce_sum_int": ("reduce_sum", [np.arange(12, dtype=np.int64).reshape(3, 4)],
                       {"axes": (1,), "keepdim": True}, ()),
    "reduce_mean_axes": ("reduce_mean", [f32(3, 4, 2)], {"axes": (0, -1)}, ()),
    "reduce_max_all_keep": ("reduce_max", [f32(3, 4)], {"keepdim": True}, ()),
    "reduce_min_scalar": ("reduce_min", [np.array(2.5, np.float32)], {}, ()),
    "reshape": ("reshape", [f32(2, 6)], {"shape": (3, 4)}, ()),
    "permute": ("permute", [f32(2, 3, 4)], {"perm": (2, 0, 1)}, ()),
    "slice_step": ("slice", [f32(4, 9)], {"axis": 1, "start": 1, "end": 8, "step": 3}, ()),
    "concat": ("concat", [f32(2, 3), f32(2, 1)], {"axis": -1}, ()),
    "split": ("split", [f32(2, 7)], {"axis": 1, "sizes": (2, 4, 1)}, ()),
    "expand": ("expand", [f32(3, 1)], {"shape": (2, 3, 4)}, ()),
    "pad_negative": ("pad", [f32(4, 5)], {"pads": (-1, 2, 1, -2), "value": 1.5}, ()),
    "embedding": ("embedding", [np.array([[0, 3], [2, 2]], np.int64), f32(4, 3)], {}, (1,)),
}


def quant_operands(x_shape, w_shape, seed: int = 0, w_max: int = 64) -> list[np.ndarray]:
    """Operands of qlinear / qconv. Weights stay within +-64, as kiln quantizes them for CPUs
    without VNNI, where ONNX Runtime's u8 x s8 kernels saturate larger ones (see
    test_wide_int8_weights_warn_on_export)."""
    rng = np.random.default_rng(seed)
    cout = w_shape[0]
    return [rng.integers(0, 256, x_shape).astype(np.uint8),
            rng.integers(-w_max, w_max + 1, w_shape).astype(np.int8),
            rng.integers(-3000, 3000, cout).astype(np.int32),
            rng.uniform(2e-4, 1e-3, cout).astype(np.float32)]


CASES["quantize_u8"] = ("quantize", [f32(3, 8) * 3], {"scale": 0.03125, "zero_point": 100}, ())
CASES["quantize_i8"] = ("quantize", [f32(3, 8) * 3], {"scale": 0.0625, "zero_point": -3,
                                                     "dtype": "i8"}, ())
CASES["dequantize"] = ("dequantize", [np.arange(256, dtype=np.uint8).reshape(16, 16)],
                       {"scale": 0.05, "zero_point": 7}, ())
_W8 = [np.random.default_rng(3).integers(-127, 128, (5, 8)).astype(np.int8),
       np.random.default_rng(4).uniform(1e-3, 1e-2, 5).astype(np.float32)]
CASES["linear_w8"] = ("linear_w8", [f32(3, 8), *_W8, f32(5)], {}, (1, 2, 3))
CASES["dynamic_qlinear"] = ("dynamic_qlinear", [f32(2, 3, 8), *_W8], {}, (1, 2))
Q_CASES = {
    "qlinear_u8_relu": ("qlinear", quant_operands((3, 8), (5, 8)),
                        {"x_zero_point": 120, "out_zero_point": 3, "relu": True}),
    "qlinear_f32": ("qlinear", quant_operands((2, 3, 8), (5, 8)), {"out_dtype": "f32"}),
    "qconv_u8": ("qconv", quant_operands((1, 6, 7, 3), (4, 2, 3, 3)),
                 {"stride": 2, "padding": 1, "x_zero_point": 9, "out_zero_point": 128}),
    "qconv_f32_relu": ("qconv", quant_operands((2, 5, 5, 4), (3, 3, 3, 4)),
                       {"padding": 1, "dilation": 2, "out_dtype": "f32", "relu": True}),
}


@pytest.mark.parametrize("case", sorted(Q_CASES))
def test_quantized_anchor_matches_reference_in_qdq_form(case: str) -> None:
    """ONNX's QDQ form computes in float what kiln computes in int32: u8 outputs may differ by
    one step where a value lands next to a rounding boundary, f32 ones by float rounding."""
    op, operands, attrs = Q_CASES[case]
    b = GraphBuilder(op)
    x = b.input("x", TensorType.of(operands[0]))
    consts = [b.constant(a, f"c{k}") for k, a in enumerate(operands[1:], 1)]
    b.output(*b.op_multi(op, [x, *consts], attrs))
    g = b.build()
    model = graph_to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    expected = run_graph(g, operands[:1])[0]
    got = run_onnx(model, g, operands[:1])[0]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == np.uint8:
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_wide_int8_weights_warn_on_export() -> None:
    """Weights past +-64 export (VNNI CPUs run them exactly) with a warning that names the
    layer and says how to make a model that ONNX Runtime runs right on AVX2 CPUs too."""
    def graph(w_max: int):
        operands = quant_operands((3, 8), (5, 8), w_max=w_max)
        b = GraphBuilder("q")
        x = b.input("x", TensorType.of(operands[0]))
        consts = [b.constant(a, f"c{k}") for k, a in enumerate(operands[1:], 1)]
        b.output(b.op("qlinear", [x, *consts], {"out_dtype": "f32"}, name="fc"))
        return b.build()

    with pytest.warns(UserWarning, match=r"fc use more than \+-64.*weight_max"):
        graph_to_onnx(graph(127))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph_to_onnx(graph(64))


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_op_matches_reference(case: str) -> None:
    op, operands, attrs, constant = CASES[case]
    roundtrip(op, operands, attrs, constant=constant)


@pytest.mark.parametrize("case", ["reduce_mean_axes", "attention_bool_mask_empty_row",
                                  "group_norm", "split", "pad_negative"])
def test_newer_opset_matches_reference(case: str) -> None:
    # From opset 18 on ReduceMean/Max/Min take their axes as an input.
    op, operands, attrs, constant = CASES[case]
    roundtrip(op, operands, attrs, constant=constant, opset=21)


def test_outputs_that_are_inputs_constants_or_repeated() -> None:
    b = GraphBuilder("passthrough")
    x = b.input("x", TensorType((2, 3), DType.f32))
    c = b.constant(f32(2, 3), "c")
    y = b.op("add", [x, c])
    b.output(y, x, c, y)
    g = b.build()
    arrays = [f32(2, 3, seed=3)]
    got = run_onnx(graph_to_onnx(g), g, arrays)
    for x_, e in zip(got, run_graph(g, arrays)):
        assert_close(x_, e)


def test_op_without_mapping_names_the_node(monkeypatch) -> None:
    b = GraphBuilder("g")
    b.output(b.op("relu", [b.input("x", TensorType((2,), DType.f32))], name="act"))
    monkeypatch.delitem(ONNX_IMPL, "relu")
    with pytest.raises(KilnError, match="no ONNX mapping") as info:
        graph_to_onnx(b.build())
    assert (info.value.node, info.value.op) == ("act", "relu")


def test_unsupported_opset_is_refused() -> None:
    b = GraphBuilder("g")
    b.output(b.op("relu", [b.input("x", TensorType((2,), DType.f32))]))
    with pytest.raises(KilnError, match="opset 13"):
        graph_to_onnx(b.build(), opset=13)


def test_export_refuses_to_overwrite(tmp_path) -> None:
    b = GraphBuilder("g")
    b.output(b.op("relu", [b.input("x", TensorType((2,), DType.f32))]))
    g = b.build()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(KilnError, match="already exists"):
        export_onnx(g, path)
    assert path.read_bytes() == b"keep me"
    assert export_onnx(g, path, overwrite=True) == path
    onnx.checker.check_model(onnx.load(path), full_check=True)


def test_export_refuses_other_objects(tmp_path) -> None:
    with pytest.raises(KilnError, match="cannot export"):
        export_onnx(object(), tmp_path / "x.onnx")
