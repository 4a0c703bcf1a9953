"""Every registered op on the CUDA backend (simulator) matches the reference interpreter.

Each case is a one-node graph on tiny operands (graph inputs, or constants where ``consts``
says so, to exercise the uploaded constant blob). Cases cover each lowering path an op has:
broadcasting, integer wrap-around, reductions over inner, outer and all axes (the last runs in
one thread), multi-output ops, rank 0, padding, groups, masks.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.cuda import compile_graph_cuda
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, KilnError, TensorType, all_ops

# The integer cases wrap around on purpose; NumPy scalars (the simulator's values) warn.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

RNG = np.random.default_rng(7)


def f32(*shape, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def pos(*shape) -> np.ndarray:
    return (np.abs(RNG.standard_normal(shape)) + 0.1).astype(np.float32)


def ints(dtype, *shape, lo: int = -20, hi: int = 20) -> np.ndarray:
    return RNG.integers(lo, hi + 1, shape).astype(dtype)


def mask(*shape) -> np.ndarray:
    return RNG.random(shape) < 0.5


# name -> (op, operands, attrs, indices of operands that are graph constants)
CASES: dict[str, tuple[str, list[np.ndarray], dict, tuple[int, ...]]] = {}


def case(name: str, op: str, operands: list[np.ndarray], attrs: dict | None = None,
         consts: tuple[int, ...] = ()) -> None:
    CASES[name] = (op, operands, attrs or {}, consts)


# ---- elementwise -----------------------------------------------------------------------------
for _op in ["relu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "softsign", "exp",
            "erf", "neg", "abs", "round", "sin", "cos", "atan"]:
    case(_op, _op, [f32(2, 3, scale=3.0)])
for _op in ["log", "sqrt", "rsqrt", "reciprocal"]:
    case(_op, _op, [pos(2, 3)])
case("leaky_relu", "leaky_relu", [f32(2, 3)], {"negative_slope": 0.2})
case("gelu_tanh", "gelu", [f32(2, 3, scale=3.0)], {"approximate": "tanh"})
case("gelu_rank0", "gelu", [np.array(0.7, np.float32)])
case("relu_i8", "relu", [ints(np.int8, 5, lo=-128, hi=127)])
case("neg_i32", "neg", [ints(np.int32, 2, 3)])
case("abs_i64", "abs", [ints(np.int64, 4)])
case("clamp", "clamp", [f32(2, 3)], {"min": -0.5, "max": 0.5})
case("clamp_i32_min_only", "clamp", [ints(np.int32, 5, lo=0, hi=30)], {"min": 10, "max": None})
case("cast_f32_i32", "cast", [f32(6, scale=50.0)], {"dtype": "i32"})
case("cast_f32_u8", "cast", [RNG.uniform(0, 250, 6).astype(np.float32)], {"dtype": "u8"})
case("cast_f32_bool", "cast", [np.array([0.0, 1.5, -2.0, 0.0], np.float32)], {"dtype": "bool"})
case("cast_f32_f16", "cast", [f32(5)], {"dtype": "f16"})
case("cast_f16_f32", "cast", [f32(5).astype(np.float16)], {"dtype": "f32"})
case("cast_bool_f32", "cast", [mask(5)], {"dtype": "f32"})
case("cast_i64_f32", "cast", [ints(np.int64, 5, lo=-1000, hi=1000)], {"dtype": "f32"})
case("cast_i32_i8", "cast", [ints(np.int32, 5, lo=-100, hi=100)], {"dtype": "i8"})
case("cast_u8_i64", "cast", [ints(np.uint8, 5, lo=0, hi=255)], {"dtype": "i64"})
for _op in ["add", "sub", "mul", "maximum", "minimum"]:
    case(_op, _op, [f32(2, 3), f32(3)])
case("div", "div", [f32(2, 3), pos(2, 1)])
case("pow", "pow", [pos(2, 3), RNG.uniform(-2, 2, (2, 3)).astype(np.float32)])
case("add_rank0", "add", [f32(2, 2), np.array(1.5, np.float32)])
case("maximum_nan", "maximum", [np.array([np.nan, 1, 2, np.nan], np.float32),
                                 np.array([0, np.nan, 3, np.nan], np.float32)])
case("minimum_nan", "minimum", [np.array([np.nan, 1, 2, np.nan], np.float32),
                                 np.array([0, np.nan, 3, np.nan], np.float32)])
case("add_i8_wraps", "add", [ints(np.int8, 6, lo=60, hi=127), ints(np.int8, 6, lo=60, hi=127)])
case("sub_u8_wraps", "sub", [ints(np.uint8, 6, lo=0, hi=10), ints(np.uint8, 6, lo=20, hi=90)])
case("mul_i32", "mul", [ints(np.int32, 2, 3), ints(np.int32, 3)])
case("maximum_i64", "maximum", [ints(np.int64, 2, 3), ints(np.int64, 2, 3)])
for _op in ["eq", "ne", "lt", "le", "gt", "ge"]:
    case(_op, _op, [RNG.integers(0, 3, (2, 3)).astype(np.float32),
                    RNG.integers(0, 3, (3,)).astype(np.float32)])
case("eq_bool", "eq", [mask(2, 3), mask(2, 3)])
case("lt_i64", "lt", [ints(np.int64, 4), ints(np.int64, 4)])
case("where", "where", [mask(2, 3), f32(2, 3), f32(3)])
case("where_i64", "where", [mask(3), ints(np.int64, 3), ints(np.int64, 1)])
case("logical_not", "logical_not", [mask(2, 3)])

# ---- normalization ---------------------------------------------------------------------------
case("softmax_last", "softmax", [f32(2, 5, scale=3.0)], {"axis": -1})
case("softmax_first", "softmax", [f32(3, 4, scale=3.0)], {"axis": 0})
case("log_softmax", "log_softmax", [f32(2, 3, 4, scale=3.0)], {"axis": 1})
case("batch_norm", "batch_norm", [f32(2, 3, 2, 2), f32(3), pos(3), f32(3), f32(3)],
     {"eps": 1e-5}, consts=(1, 2, 3, 4))
case("layer_norm_affine", "layer_norm", [f32(3, 4), f32(4), f32(4)], {"normalized_ndim": 1})
case("layer_norm_2d", "layer_norm", [f32(2, 2, 4)], {"normalized_ndim": 2})
case("group_norm", "group_norm", [f32(2, 4, 3), f32(4), f32(4)], {"groups": 2, "eps": 1e-5})

# ---- pooling ---------------------------------------------------------------------------------
case("max_pool2d", "max_pool", [f32(1, 2, 4, 4)], {"kernel": [2, 2], "stride": 2})
case("max_pool2d_pad_ceil_dil", "max_pool", [f32(1, 1, 5, 6)],
     {"kernel": [3, 2], "stride": [2, 1], "padding": [1, 1], "dilation": [1, 2],
      "ceil_mode": True})
case("max_pool1d", "max_pool", [f32(2, 2, 7)], {"kernel": [3], "stride": 2})
case("avg_pool2d", "avg_pool", [f32(1, 2, 5, 5)],
     {"kernel": [3, 3], "stride": 2, "padding": 1, "count_include_pad": False,
      "ceil_mode": True})
case("avg_pool1d_include_pad", "avg_pool", [f32(1, 2, 6)], {"kernel": [2], "padding": 1})
case("adaptive_avg_pool2d", "adaptive_avg_pool", [f32(1, 2, 5, 7)], {"output_size": [2, 3]})
case("adaptive_avg_pool1d", "adaptive_avg_pool", [f32(2, 1, 5)], {"output_size": [1]})

# ---- reductions ------------------------------------------------------------------------------
case("reduce_sum_inner", "reduce_sum", [f32(3, 4)], {"axes": [1], "keepdim": True})
case("reduce_sum_outer", "reduce_sum", [f32(4, 3)], {"axes": [0], "keepdim": False})
case("reduce_mean_all", "reduce_mean", [f32(2, 3, 2)], {"axes": None, "keepdim": False})
case("reduce_max_middle", "reduce_max", [f32(2, 3, 2)], {"axes": [1], "keepdim": False})
case("reduce_min_i32", "reduce_min", [ints(np.int32, 3, 4)], {"axes": [-1], "keepdim": False})
case("reduce_sum_u8", "reduce_sum", [ints(np.uint8, 2, 5, lo=0, hi=255)],
     {"axes": [1], "keepdim": False})

# ---- shape ops -------------------------------------------------------------------------------
case("reshape", "reshape", [f32(2, 6)], {"shape": [3, 4]})
case("permute", "permute", [f32(2, 3, 4)], {"perm": [2, 0, 1]})
case("slice_step", "slice", [f32(3, 7)], {"axis": 1, "start": 1, "end": 7, "step": 2})
case("concat", "concat", [f32(2, 1), f32(2, 3), f32(2, 2)], {"axis": 1})
case("concat_bool", "concat", [mask(1, 2), mask(2, 2)], {"axis": 0})
case("split", "split", [f32(2, 5)], {"axis": 1, "sizes": [1, 0, 4]})
case("expand", "expand", [f32(3, 1)], {"shape": [2, 3, 4]})
case("pad", "pad", [f32(3, 4)], {"pads": [1, 2, -1, 1], "value": 1.5})
case("pad_i32", "pad", [ints(np.int32, 2, 2)], {"pads": [0, 1, 2, 0], "value": -2.0})
case("embedding_i64", "embedding", [RNG.integers(0, 5, (2, 3)), f32(5, 4)], consts=(1,))
case("embedding_i32", "embedding", [RNG.integers(0, 3, (4,)).astype(np.int32), f32(3, 2)])
# indexing (kiln.ir.ops.index): negative indices, ties, several index tensors
case("take_negative", "take", [f32(3, 5), np.array([[-1, 0], [4, -5]])], {"axis": 1})
case("take_two_indices", "take", [f32(2, 3, 4), np.array([0, -1]),
                                  np.array([[3], [1]], np.int32)], {"axis": 1}, consts=(0,))
case("gather_elements", "gather_elements", [f32(3, 4), RNG.integers(-4, 4, (2, 4))],
     {"axis": 1})
case("argmax_ties", "argmax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], {"axis": 1})
case("argmin_all", "argmin", [ints(np.int32, 3, 4)], {"axis": None, "keepdim": True})
case("topk_ties", "topk", [np.array([[1, 3, 3, 0, 3]], np.float32)], {"k": 4})
case("topk_smallest", "topk", [f32(4, 3)], {"k": 2, "axis": 0, "largest": False})
case("topk_merge_sort", "topk", [ints(np.int32, 2, 9, lo=-3, hi=3)], {"k": 9, "largest": False})
case("cumsum_reverse", "cumsum", [f32(3, 4)], {"axis": 0, "reverse": True, "exclusive": True})
case("resize_cubic", "resize", [f32(1, 2, 3, 4)], {"sizes": (5, 3), "mode": "cubic"})
case("resize_nearest", "resize", [f32(1, 2, 3)], {"sizes": (7,), "scales": (2.5,),
                                                   "coordinate": "asymmetric"})

# ---- dense -----------------------------------------------------------------------------------
case("matmul", "matmul", [f32(2, 3, 4), f32(4, 5)])
case("matmul_batch_broadcast", "matmul", [f32(1, 3, 4), f32(2, 4, 2)])
case("linear_bias_const", "linear", [f32(3, 5), f32(4, 5), f32(4)], consts=(1, 2))
case("linear_3d", "linear", [f32(2, 2, 3), f32(2, 3)])
case("lstm_seq_reverse", "lstm_seq", [f32(3, 2, 8), f32(8, 2, scale=0.5), f32(1, 2, 2),
                                      f32(1, 2, 2)], {"gates": "iofg", "reverse": True},
     consts=(1,))
case("gru_seq", "gru_seq", [f32(3, 2, 9), f32(9, 3, scale=0.5), f32(9), f32(1, 2, 3)],
     {"gates": "zrn"})
case("conv2d_stride_pad", "conv", [f32(1, 2, 5, 5), f32(3, 2, 3, 3), f32(3)],
     {"stride": 2, "padding": 1}, consts=(1, 2))
case("conv2d_depthwise_dilated", "conv", [f32(2, 3, 5, 5), f32(3, 1, 2, 2)],
     {"groups": 3, "dilation": 2, "padding": 1})
case("conv2d_grouped", "conv", [f32(1, 4, 4, 4), f32(2, 2, 3, 3)],
     {"groups": 2, "padding": [1, 0]})
case("conv1d", "conv", [f32(2, 2, 6), f32(3, 2, 3)], {"stride": 2})
case("conv3d", "conv", [f32(1, 1, 3, 3, 3), f32(2, 1, 2, 2, 2)], {"padding": 1})
case("conv_transpose2d", "conv_transpose", [f32(1, 2, 3, 3), f32(2, 2, 3, 3), f32(2)],
     {"stride": 2, "padding": 1, "output_padding": 1})
case("conv_transpose1d_grouped", "conv_transpose", [f32(1, 4, 4), f32(4, 1, 2)],
     {"groups": 2, "dilation": 2})

# ---- attention -------------------------------------------------------------------------------
case("attention_causal", "attention", [f32(2, 3, 4), f32(2, 5, 4), f32(2, 5, 3)],
     {"causal": True})
case("attention_bool_mask", "attention",
     [f32(3, 4), f32(5, 4), f32(5, 2), np.array(RNG.random((3, 5)) < 0.7) | (np.arange(5) == 0)],
     {"scale": 0.5})
_keep = np.ones((3, 5), bool)
_keep[1] = False
case("attention_float_mask_masked_row", "attention",
     [f32(2, 3, 4), f32(2, 5, 4), f32(2, 5, 3), np.where(_keep, 0.0, -np.inf).astype(np.float32)],
     {"causal": True})

# ---- quantized ops ---------------------------------------------------------------------------
_halves = ((RNG.integers(-40, 40, (2, 4)) + 0.5) * 0.5).astype(np.float32)
case("quantize_u8", "quantize", [np.concatenate([f32(2, 4, scale=30.0), _halves])],
     {"scale": 0.5, "zero_point": 100, "dtype": "u8"})
case("quantize_i8", "quantize", [f32(2, 3, scale=10.0)],
     {"scale": 0.125, "zero_point": -3, "dtype": "i8"})
case("dequantize", "dequantize", [ints(np.uint8, 2, 3, lo=0, hi=255)],
     {"scale": 0.05, "zero_point": 7})


def _q_operands(x_shape, w_shape):
    cout = w_shape[0]
    return [ints(np.uint8, *x_shape, lo=0, hi=255), ints(np.int8, *w_shape, lo=-127, hi=127),
            ints(np.int32, cout, lo=-3000, hi=3000),
            RNG.uniform(2e-4, 1e-3, cout).astype(np.float32)]


case("qlinear_u8_relu", "qlinear", _q_operands((3, 8), (5, 8)),
     {"x_zero_point": 120, "out_zero_point": 3, "relu": True}, consts=(1, 2, 3))
case("qlinear_f32", "qlinear", _q_operands((2, 8), (3, 8)), {"out_dtype": "f32"})
case("qconv_u8", "qconv", _q_operands((1, 5, 5, 3), (4, 2, 2, 3)),
     {"stride": 2, "padding": 1, "x_zero_point": 9, "out_zero_point": 128}, consts=(1, 2, 3))
case("linear_w8", "linear_w8", [f32(3, 8), ints(np.int8, 5, 8, lo=-127, hi=127),
                                 RNG.uniform(1e-3, 1e-2, 5).astype(np.float32), f32(5)],
     consts=(1, 2, 3))
case("dynamic_qlinear", "dynamic_qlinear", [f32(4, 8, scale=3.0), ints(np.int8, 3, 8, lo=-127,
                                                                        hi=127),
                                             RNG.uniform(1e-3, 1e-2, 3).astype(np.float32)],
     consts=(1, 2))


def one_op_graph(op: str, operands: list[np.ndarray], attrs: dict, consts: tuple[int, ...]):
    """A graph of one ``op`` node; returns it and the arrays of its inputs."""
    b = GraphBuilder(op)
    names, inputs = [], []
    for k, a in enumerate(operands):
        if k in consts:
            names.append(b.constant(a, f"c{k}"))
        else:
            names.append(b.input(f"in{k}", TensorType.of(a)))
            inputs.append(a)
    b.output(*b.op_multi(op, names, attrs))
    return b.build(), inputs


def assert_matches(expected: list[np.ndarray], got: list[np.ndarray]) -> None:
    """Same shapes and dtypes; floats within 1e-5 (NaN where the reference has NaN), the rest
    exactly."""
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        e = np.asarray(e)
        assert isinstance(g, np.ndarray)
        assert (g.shape, g.dtype) == (e.shape, e.dtype)
        if e.dtype.kind == "f":
            np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=1e-5,
                                       atol=1e-5, equal_nan=True)
        else:
            np.testing.assert_array_equal(g, e)


LIVE = sorted(name for name, (op, *_) in CASES.items() if op in all_ops())


def test_every_registered_op_has_a_case():
    assert set(all_ops()) <= {op for op, *_ in CASES.values()}


@pytest.mark.parametrize("name", LIVE)
def test_op_matches_reference(name: str) -> None:
    op, operands, attrs, consts = CASES[name]
    graph, inputs = one_op_graph(op, operands, attrs, consts)
    expected = run_graph(graph, inputs)
    program = compile_graph_cuda(graph)
    assert_matches(expected, program.run(*inputs))
    # A second run reuses the device buffers: same answer.
    assert_matches(expected, program(inputs))


def test_wrong_input_is_a_kiln_error():
    graph, inputs = one_op_graph("relu", [f32(2, 3)], {}, ())
    program = compile_graph_cuda(graph)
    with pytest.raises(KilnError, match="expects"):
        program.run(np.zeros((3, 2), np.float32))
    with pytest.raises(KilnError, match="takes 1 inputs"):
        program.run()
