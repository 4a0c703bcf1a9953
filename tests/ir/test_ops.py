"""Every registered op: its NumPy reference against PyTorch (through graph_to_module).

Each test builds a one-node graph with GraphBuilder, runs it on the reference backend and in
eager PyTorch, and compares fp32 with torch.testing's default tolerances (integers and bools
exactly). Hypothesis draws shapes, attributes and a seed; the seed draws the data, so values are
well-conditioned normals unless an op needs a narrower domain.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln.backends.llvm import compile_graph as compile_llvm
from kiln.backends.reference import run_graph
from kiln.interop.to_torch import TORCH_IMPL, run_torch
from kiln.ir import DType, GraphBuilder, ShapeError, TensorType, all_ops, get_op

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=12)

INT_DTYPES = [np.int8, np.uint8, np.int32, np.int64]

COVERED: set[str] = set()


def covers(*ops: str):
    """Record that the decorated test checks ``ops`` (see test_every_op_is_tested)."""

    def mark(fn):
        COVERED.update(ops)
        return fn

    return mark


# ---- helpers ---------------------------------------------------------------------------------
def rng_of(data) -> np.random.Generator:
    """A NumPy generator seeded by hypothesis (so a failing example replays exactly)."""
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def randn(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    """f32 normals times ``scale``."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def positive(rng: np.random.Generator, shape) -> np.ndarray:
    """f32 values >= 0.1 (the domain of log, sqrt, rsqrt, reciprocal, pow's base)."""
    return (np.abs(rng.standard_normal(shape)) + 0.1).astype(np.float32)


def ints(rng: np.random.Generator, shape, dtype, lo: int = -20, hi: int = 20) -> np.ndarray:
    """Integers in [lo, hi] clipped to what ``dtype`` holds."""
    info = np.iinfo(dtype)
    return rng.integers(max(lo, info.min), min(hi, info.max) + 1, shape).astype(dtype)


def shapes(min_dims: int = 0, max_dims: int = 4, min_side: int = 1, max_side: int = 5):
    """A hypothesis strategy for small shapes (rank 0 included by default)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def check_op(op: str, operands: list[np.ndarray], attrs: dict | None = None, *,
             equal_nan: bool = False) -> list[np.ndarray]:
    """Run ``op`` on ``operands`` (as graph inputs) in the reference and in PyTorch; compare.

    Also checks the type rule against the reference's outputs and that the op's cost is a
    non-negative int. Returns the reference outputs.
    """
    b = GraphBuilder(op)
    names = [b.input(f"in{k}", TensorType.of(a)) for k, a in enumerate(operands)]
    outs = b.op_multi(op, names, attrs)
    b.output(*outs)
    g = b.build()
    ref = run_graph(g, operands)
    got = run_torch(g, operands)
    assert len(got) == len(ref) == len(outs)
    for name, r, t in zip(outs, ref, got):
        want = g.types[name]
        assert (r.shape, r.dtype) == (want.shape, want.dtype.numpy), name
        torch.testing.assert_close(torch.from_numpy(t), torch.from_numpy(np.array(r)),
                                   equal_nan=equal_nan)
    node = g.nodes[0]
    in_types = [g.types[i] for i in node.inputs]
    flops = get_op(op).flops(in_types, [g.types[o] for o in outs], dict(node.attrs))
    assert type(flops) is int and flops >= 0
    return ref


# ---- registry coverage -----------------------------------------------------------------------
def test_torch_impl_covers_the_registry():
    assert set(TORCH_IMPL) == set(all_ops())


def test_every_op_is_tested():
    assert COVERED == set(all_ops())


# ---- elementwise -----------------------------------------------------------------------------
UNARY_ATTRS = {
    "leaky_relu": st.fixed_dictionaries({"negative_slope": st.sampled_from([0.01, 0.2, 1.5])}),
    "gelu": st.fixed_dictionaries({"approximate": st.sampled_from(["none", "tanh"])}),
}
UNARY = ["relu", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
         "softsign", "exp", "erf", "neg", "abs", "round", "sin", "cos", "atan"]
POSITIVE_UNARY = ["log", "sqrt", "rsqrt", "reciprocal"]


@covers(*UNARY, *POSITIVE_UNARY)
@pytest.mark.parametrize("op", UNARY + POSITIVE_UNARY)
@SETTINGS
@given(data=st.data())
def test_unary_float(op, data):
    rng = rng_of(data)
    shape = data.draw(shapes())
    # Scale 3 reaches past hardswish's and hardsigmoid's knees at +-3.
    x = positive(rng, shape) if op in POSITIVE_UNARY else randn(rng, shape, 3.0)
    attrs = data.draw(UNARY_ATTRS.get(op, st.just({})))
    check_op(op, [x], attrs)


def unary_variants(op: str) -> list[dict]:
    """Every formula of ``op``: its decomposition cases (gelu's erf and tanh forms)."""
    return [get_op(op).normalize_attrs(case) for case in get_op(op).decomposition_cases]


@pytest.mark.parametrize("op", UNARY + POSITIVE_UNARY)
def test_unary_float_on_llvm(op):
    """The op's lowering (its decomposition, for a composite) compiled by LLVM against the NumPy
    reference and PyTorch, over a row of vector bodies and a tail, past every knee."""
    rng = np.random.default_rng(0)
    shape = (3, 37)
    x = positive(rng, shape) if op in POSITIVE_UNARY else randn(rng, shape, 3.0)
    x.flat[:5] = [0.0, -3.0, 3.0, 1e-3, -1e-3] if op not in POSITIVE_UNARY else 1.0
    for attrs in unary_variants(op):
        b = GraphBuilder(op)
        b.output(b.op(op, [b.input("x", TensorType.of(x))], attrs))
        g = b.build()
        got = compile_llvm(g, cache=False)([x])[0]
        for want in (run_graph(g, [x])[0], run_torch(g, [x])[0]):
            torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want))


@covers("relu", "neg", "abs")
@pytest.mark.parametrize("op", ["relu", "neg", "abs"])
@FEW
@given(data=st.data())
def test_unary_integer(op, data):
    rng = rng_of(data)
    dtype = data.draw(st.sampled_from(INT_DTYPES))
    check_op(op, [ints(rng, data.draw(shapes()), dtype, -128, 255)])


CLAMP_BOUNDS = st.one_of(st.none(), st.floats(-2, 2, width=32))


@covers("clamp")
@SETTINGS
@given(data=st.data())
def test_clamp_float(data):
    rng = rng_of(data)
    attrs = {"min": data.draw(CLAMP_BOUNDS), "max": data.draw(CLAMP_BOUNDS)}
    check_op("clamp", [randn(rng, data.draw(shapes()))], attrs)


@covers("clamp")
@FEW
@given(data=st.data())
def test_clamp_integer(data):
    rng = rng_of(data)
    dtype = data.draw(st.sampled_from(INT_DTYPES))
    bound = st.one_of(st.none(), st.integers(0, 20), st.floats(0.5, 20.5))
    attrs = {"min": data.draw(bound), "max": data.draw(bound)}
    check_op("clamp", [ints(rng, data.draw(shapes()), dtype, 0, 30)], attrs)


CAST_DTYPES = ["f32", "f16", "i8", "u8", "i32", "i64", "bool"]


def cast_source(rng: np.random.Generator, shape, src: str, dst: str) -> np.ndarray:
    """Values of dtype ``src`` that convert to ``dst`` without undefined behaviour."""
    if src == "bool":
        return rng.random(shape) < 0.5
    np_src = DType(src).numpy
    lo, hi = (0, 250) if dst == "u8" else (-120, 120)
    if np_src.kind == "f":
        # Integers and halves among the values exercise truncation toward zero.
        values = rng.uniform(lo, hi, shape)
        values[rng.random(shape) < 0.3] = 0.0
        values = np.where(rng.random(shape) < 0.3, np.round(values * 2) / 2, values)
        return values.astype(np_src)
    return ints(rng, shape, np_src, -1000, 1000)


@covers("cast")
@pytest.mark.parametrize("src", CAST_DTYPES)
@FEW
@given(data=st.data())
def test_cast(src, data):
    rng = rng_of(data)
    dst = data.draw(st.sampled_from(CAST_DTYPES))
    check_op("cast", [cast_source(rng, data.draw(shapes()), src, dst)], {"dtype": dst})


def binary_operands(data, rng, op: str, dtype) -> list[np.ndarray]:
    """Two broadcastable operands for ``op`` in its domain (divisors away from 0...)."""
    sa, sb = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4,
                                                         max_side=4)).input_shapes
    if np.dtype(dtype).kind != "f":
        return [ints(rng, sa, dtype), ints(rng, sb, dtype)]
    if op == "pow":
        return [positive(rng, sa), rng.uniform(-2, 2, sb).astype(np.float32)]
    if op == "div":
        b = positive(rng, sb) * np.where(rng.random(sb) < 0.5, -1, 1).astype(np.float32)
        return [randn(rng, sa), b]
    a, b = randn(rng, sa), randn(rng, sb)
    if op in ("maximum", "minimum") and sa == sb:
        b = np.where(rng.random(sb) < 0.3, a, b)  # ties
    return [a, b]


@covers("add", "sub", "mul", "div", "pow", "maximum", "minimum")
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow", "maximum", "minimum"])
@SETTINGS
@given(data=st.data())
def test_binary_float(op, data):
    rng = rng_of(data)
    check_op(op, binary_operands(data, rng, op, np.float32))


@covers("add", "sub", "mul", "maximum", "minimum")
@pytest.mark.parametrize("op", ["add", "sub", "mul", "maximum", "minimum"])
@FEW
@given(data=st.data())
def test_binary_integer(op, data):
    rng = rng_of(data)
    dtype = data.draw(st.sampled_from(INT_DTYPES))
    # int8 products of values in [-20, 20] wrap around: both sides must wrap the same way.
    check_op(op, binary_operands(data, rng, op, dtype))


@covers("maximum", "minimum")
@pytest.mark.parametrize("op", ["maximum", "minimum"])
def test_maximum_minimum_propagate_nan(op):
    a = np.array([np.nan, 1.0, 2.0, np.nan], np.float32)
    b = np.array([0.0, np.nan, 3.0, np.nan], np.float32)
    (out,) = check_op(op, [a, b], equal_nan=True)
    assert np.isnan(out).tolist() == [True, True, False, True]


COMPARISONS = ["eq", "ne", "lt", "le", "gt", "ge"]


@covers(*COMPARISONS)
@pytest.mark.parametrize("op", COMPARISONS)
@SETTINGS
@given(data=st.data())
def test_comparison(op, data):
    rng = rng_of(data)
    sa, sb = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4,
                                                         max_side=4)).input_shapes
    dtype = data.draw(st.sampled_from(["f32", "i32", "i64", "u8", "bool"]))
    # Few distinct values, so that ties (eq, le, ge) happen often.
    a = rng.integers(0, 3, sa).astype(DType(dtype).numpy)
    b = rng.integers(0, 3, sb).astype(DType(dtype).numpy)
    check_op(op, [a, b])


@covers("where")
@SETTINGS
@given(data=st.data())
def test_where(data):
    rng = rng_of(data)
    shapes3 = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=4,
                                                          max_side=4)).input_shapes
    dtype = data.draw(st.sampled_from(["f32", "i64", "bool"]))
    cond = rng.random(shapes3[0]) < 0.5
    a, b = (rng.integers(-5, 5, s).astype(DType(dtype).numpy) for s in shapes3[1:])
    check_op("where", [cond, a, b])


@covers("logical_not")
@FEW
@given(data=st.data())
def test_logical_not(data):
    rng = rng_of(data)
    check_op("logical_not", [rng.random(data.draw(shapes())) < 0.5])


# ---- normalization ---------------------------------------------------------------------------
@covers("softmax", "log_softmax")
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@SETTINGS
@given(data=st.data())
def test_softmax(op, data):
    rng = rng_of(data)
    shape = data.draw(shapes())
    axis = data.draw(st.integers(-max(len(shape), 1), max(len(shape), 1) - 1))
    check_op(op, [randn(rng, shape, 3.0)], {"axis": axis})


@covers("batch_norm")
@SETTINGS
@given(data=st.data())
def test_batch_norm(data):
    rng = rng_of(data)
    shape = data.draw(shapes(min_dims=2, max_dims=5, max_side=4))
    c = shape[1]
    eps = data.draw(st.sampled_from([1e-5, 1e-3]))
    operands = [randn(rng, shape), randn(rng, c), positive(rng, c), randn(rng, c), randn(rng, c)]
    check_op("batch_norm", operands, {"eps": eps})


@covers("layer_norm")
@SETTINGS
@given(data=st.data())
def test_layer_norm(data):
    rng = rng_of(data)
    shape = data.draw(shapes(min_dims=1, max_dims=4))
    k = data.draw(st.integers(1, min(2, len(shape))))
    if math.prod(shape[-k:]) < 4:
        # Two or three nearly equal values normalize to rounding noise amplified up to
        # 1/sqrt(eps): no fp32 implementation can meet the default tolerance there.
        shape = (*shape[:-1], 4)
    n_affine = data.draw(st.integers(0, 2))
    affine = [randn(rng, shape[-k:]) for _ in range(n_affine)]
    check_op("layer_norm", [randn(rng, shape), *affine], {"normalized_ndim": k})


@covers("group_norm")
@SETTINGS
@given(data=st.data())
def test_group_norm(data):
    rng = rng_of(data)
    groups = data.draw(st.integers(1, 3))
    c = groups * data.draw(st.integers(1, 3))
    spatial = data.draw(shapes(min_dims=0, max_dims=2, min_side=2, max_side=4))
    shape = (data.draw(st.integers(1, 2)), c) + spatial
    if c // groups * math.prod(spatial) < 4:
        # Like layer_norm: a group of few, nearly equal values is ill-conditioned in fp32.
        shape += (4,)
    affine = [randn(rng, c) for _ in range(data.draw(st.integers(0, 2)))]
    check_op("group_norm", [randn(rng, shape), *affine], {"groups": groups, "eps": 1e-5})


# ---- pooling ---------------------------------------------------------------------------------
def window(data, nd: int, *, dilation: bool):
    """Kernel, stride, padding, dilation and an input size per spatial dim that fit."""
    kernel = data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    stride = data.draw(st.one_of(st.none(), st.lists(st.integers(1, 3), min_size=nd,
                                                     max_size=nd)))
    padding = [data.draw(st.integers(0, k // 2)) for k in kernel]
    dil = data.draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd)) if dilation \
        else [1] * nd
    sizes = [data.draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + 6))
             for k, p, d in zip(kernel, padding, dil)]
    return kernel, stride, padding, dil, sizes


@covers("max_pool")
@pytest.mark.parametrize("nd", [1, 2, 3])
@SETTINGS
@given(data=st.data())
def test_max_pool(nd, data):
    rng = rng_of(data)
    kernel, stride, padding, dilation, sizes = window(data, nd, dilation=True)
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation,
             "ceil_mode": data.draw(st.booleans())}
    x = randn(rng, [data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), *sizes])
    check_op("max_pool", [x], attrs)


@covers("avg_pool")
@pytest.mark.parametrize("nd", [1, 2, 3])
@SETTINGS
@given(data=st.data())
def test_avg_pool(nd, data):
    rng = rng_of(data)
    kernel, stride, padding, _, sizes = window(data, nd, dilation=False)
    attrs = {"kernel": kernel, "stride": stride, "padding": padding,
             "ceil_mode": data.draw(st.booleans()),
             "count_include_pad": data.draw(st.booleans())}
    x = randn(rng, [data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), *sizes])
    check_op("avg_pool", [x], attrs)


@covers("max_pool", "avg_pool")
def test_pool_scalar_attrs_and_ceil_mode_edge():
    # A ceil-mode window that would start in the right padding is dropped (PyTorch's rule).
    x = np.arange(2 * 5, dtype=np.float32).reshape(1, 2, 5)
    attrs = {"kernel": [2], "stride": 2, "padding": 1, "ceil_mode": True}
    (out,) = check_op("max_pool", [x], attrs)
    assert out.shape == (1, 2, 3)
    check_op("avg_pool", [x], {**attrs, "count_include_pad": False})


@covers("avg_pool")
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_3d_input_smaller_than_kernel(count_include_pad):
    # avg_pool3d refuses this input (PyTorch checks it without the padding); kiln allows it,
    # and the PyTorch twin takes a separable route.
    x = randn(np.random.default_rng(1), (2, 3, 1, 2, 3))
    attrs = {"kernel": [2, 3, 2], "stride": [1, 2, 2], "padding": [1, 1, 1], "ceil_mode": True,
             "count_include_pad": count_include_pad}
    check_op("avg_pool", [x], attrs)


@covers("adaptive_avg_pool")
@pytest.mark.parametrize("nd", [1, 2, 3])
@SETTINGS
@given(data=st.data())
def test_adaptive_avg_pool(nd, data):
    rng = rng_of(data)
    sizes = data.draw(st.lists(st.integers(1, 7), min_size=nd, max_size=nd))
    out = [data.draw(st.integers(1, s + 2)) for s in sizes]
    x = randn(rng, [data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), *sizes])
    check_op("adaptive_avg_pool", [x], {"output_size": out})


# ---- reductions ------------------------------------------------------------------------------
def reduce_attrs(data, rank: int) -> dict:
    """axes (None, or 1-3 possibly repeated or negative axes) and keepdim."""
    axes = data.draw(st.one_of(
        st.none(),
        st.lists(st.integers(-max(rank, 1), max(rank, 1) - 1), min_size=1, max_size=3)))
    return {"axes": axes, "keepdim": data.draw(st.booleans())}


REDUCTIONS = ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min"]


@covers(*REDUCTIONS)
@pytest.mark.parametrize("op", REDUCTIONS)
@SETTINGS
@given(data=st.data())
def test_reduce_float(op, data):
    rng = rng_of(data)
    shape = data.draw(shapes())
    check_op(op, [randn(rng, shape)], reduce_attrs(data, len(shape)))


@covers("reduce_sum", "reduce_max", "reduce_min")
@pytest.mark.parametrize("op", ["reduce_sum", "reduce_max", "reduce_min"])
@FEW
@given(data=st.data())
def test_reduce_integer(op, data):
    rng = rng_of(data)
    shape = data.draw(shapes())
    dtype = data.draw(st.sampled_from(INT_DTYPES))
    check_op(op, [ints(rng, shape, dtype, -128, 255)], reduce_attrs(data, len(shape)))


@covers("reduce_sum", "softmax")
def test_scalar_axis_zero():
    # Regression: a scalar accepts axis 0 and -1 (PyTorch does); the reference used to fail.
    x = np.array(2.5, np.float32)
    assert check_op("reduce_sum", [x], {"axes": [0], "keepdim": True})[0].shape == ()
    assert check_op("softmax", [x], {"axis": -1})[0] == 1.0


# ---- shape ops -------------------------------------------------------------------------------
def factorization(data, n: int) -> list[int]:
    """A random shape (rank 0-4) with ``n`` elements."""
    dims = []
    rest = n
    for _ in range(data.draw(st.integers(0, 3))):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        d = data.draw(st.sampled_from(divisors))
        dims.append(d)
        rest //= d
    if rest != 1 or not dims and data.draw(st.booleans()):
        dims.append(rest)
    return data.draw(st.permutations(dims))


@covers("reshape")
@SETTINGS
@given(data=st.data())
def test_reshape(data):
    rng = rng_of(data)
    shape = data.draw(shapes())
    check_op("reshape", [randn(rng, shape)], {"shape": factorization(data, math.prod(shape))})


@covers("permute")
@SETTINGS
@given(data=st.data())
def test_permute(data):
    rng = rng_of(data)
    shape = data.draw(shapes())
    perm = data.draw(st.permutations(range(len(shape))))
    check_op("permute", [randn(rng, shape)], {"perm": perm})


@covers("slice")
@SETTINGS
@given(data=st.data())
def test_slice(data):
    rng = rng_of(data)
    shape = data.draw(shapes(min_dims=1, max_side=7))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    size = shape[axis]
    start = data.draw(st.integers(0, size))
    end = data.draw(st.integers(start, size))
    step = data.draw(st.integers(1, 3))
    dtype = data.draw(st.sampled_from([np.float32, np.int64]))
    x = randn(rng, shape) if dtype == np.float32 else ints(rng, shape, dtype)
    check_op("slice", [x], {"axis": axis, "start": start, "end": end, "step": step})


@covers("concat")
@SETTINGS
@given(data=st.data())
def test_concat(data):
    rng = rng_of(data)
    shape = list(data.draw(shapes(min_dims=1)))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    dtype = data.draw(st.sampled_from(["f32", "i32", "bool"]))
    operands = []
    for _ in range(data.draw(st.integers(1, 3))):
        shape[axis] = data.draw(st.integers(0, 4))
        operands.append(rng.integers(-3, 3, shape).astype(DType(dtype).numpy))
    check_op("concat", operands, {"axis": axis})


@covers("split")
@SETTINGS
@given(data=st.data())
def test_split(data):
    rng = rng_of(data)
    shape = data.draw(shapes(min_dims=1, max_side=7))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    cuts = sorted(data.draw(st.lists(st.integers(0, shape[axis]), max_size=3)))
    sizes = np.diff([0, *cuts, shape[axis]]).tolist()
    outs = check_op("split", [randn(rng, shape)], {"axis": axis, "sizes": sizes})
    assert [o.shape[axis] for o in outs] == sizes


@covers("expand")
@SETTINGS
@given(data=st.data())
def test_expand(data):
    rng = rng_of(data)
    shape = data.draw(shapes(max_side=3))
    target = [data.draw(st.integers(1, 4)) if d == 1 else d for d in shape]
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2))
    check_op("expand", [randn(rng, shape)], {"shape": lead + target})


@covers("pad")
@SETTINGS
@given(data=st.data())
def test_pad(data):
    rng = rng_of(data)
    shape = data.draw(shapes(max_side=5))
    pads = []
    for d in shape:
        lo = data.draw(st.integers(-d, 3))
        hi = data.draw(st.integers(-(d + min(lo, 0)), 3))
        pads += [lo, hi]
    dtype = data.draw(st.sampled_from([np.float32, np.int32]))
    value = data.draw(st.sampled_from([0.0, 1.5, -2.0]))
    x = randn(rng, shape) if dtype == np.float32 else ints(rng, shape, dtype)
    check_op("pad", [x], {"pads": pads, "value": value})


@covers("embedding")
@SETTINGS
@given(data=st.data())
def test_embedding(data):
    rng = rng_of(data)
    num, dim = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 6))
    idx_dtype = data.draw(st.sampled_from([np.int32, np.int64]))
    indices = rng.integers(0, num, data.draw(shapes(max_dims=2))).astype(idx_dtype)
    check_op("embedding", [indices, randn(rng, (num, dim))])


# ---- indexing (kiln.ir.ops.index) ------------------------------------------------------------
@covers("take", "gather_elements")
@FEW
@given(data=st.data())
def test_take_and_gather_elements(data):
    rng = rng_of(data)
    x = randn(rng, data.draw(shapes(min_dims=2, max_dims=4)))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 2))
    k = data.draw(st.integers(1, x.ndim - axis % x.ndim))
    wrap = data.draw(st.booleans())
    idx_dtype = data.draw(st.sampled_from([np.int32, np.int64]))
    inds = [rng.integers(-n if wrap else 0, n, data.draw(shapes(max_dims=2, max_side=3)))
            .astype(idx_dtype) for n in x.shape[axis % x.ndim:axis % x.ndim + k]]
    try:
        np.broadcast_shapes(*[i.shape for i in inds])
    except ValueError:
        inds = inds[:1]
    check_op("take", [x, *inds], {"axis": axis, "wrap": wrap})
    idx_shape = tuple(data.draw(st.integers(1, d)) for d in x.shape)
    n = x.shape[axis]
    idx = rng.integers(-n if wrap else 0, n, idx_shape).astype(idx_dtype)
    check_op("gather_elements", [x, idx], {"axis": axis, "wrap": wrap})


@covers("argmax", "argmin", "topk", "cumsum")
@FEW
@given(data=st.data())
def test_arg_reductions_topk_and_cumsum(data):
    rng = rng_of(data)
    shape = data.draw(shapes(min_dims=1, max_dims=3))
    # Small integers as floats: ties, which must resolve to the lower index.
    x = rng.integers(-2, 3, shape).astype(np.float32)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    keepdim = data.draw(st.booleans())
    for op in ("argmax", "argmin"):
        check_op(op, [x], {"axis": data.draw(st.sampled_from([None, axis])),
                           "keepdim": keepdim})
    k = data.draw(st.integers(0, shape[axis]))
    check_op("topk", [x], {"k": k, "axis": axis, "largest": data.draw(st.booleans())})
    check_op("cumsum", [randn(rng, shape)], {"axis": axis, "exclusive": data.draw(
        st.booleans()), "reverse": data.draw(st.booleans())})


@covers("resize")
@FEW
@given(data=st.data())
def test_resize(data):
    rng = rng_of(data)
    x = randn(rng, data.draw(shapes(min_dims=3, max_dims=4)))
    nd = data.draw(st.integers(1, 2))
    mode = data.draw(st.sampled_from(["nearest", "linear", "cubic"]))
    sizes = [data.draw(st.integers(1, 9)) for _ in range(nd)]
    check_op("resize", [x], {
        "sizes": sizes, "mode": mode,
        "coordinate": data.draw(st.sampled_from(["half_pixel", "pytorch_half_pixel",
                                                 "align_corners", "asymmetric"])),
        "nearest": data.draw(st.sampled_from(["floor", "ceil", "round_prefer_floor",
                                              "round_prefer_ceil"]))})


# ---- dense -----------------------------------------------------------------------------------
@covers("matmul")
@SETTINGS
@given(data=st.data())
def test_matmul(data):
    rng = rng_of(data)
    batch_a, batch_b = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=2, max_dims=2, max_side=3)).input_shapes
    m, k, n = (data.draw(st.integers(1, 6)) for _ in range(3))
    check_op("matmul", [randn(rng, batch_a + (m, k)), randn(rng, batch_b + (k, n))])


@covers("linear")
@SETTINGS
@given(data=st.data())
def test_linear(data):
    rng = rng_of(data)
    x_shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=6))
    out = data.draw(st.integers(1, 6))
    operands = [randn(rng, x_shape), randn(rng, (out, x_shape[-1]))]
    if data.draw(st.booleans()):
        operands.append(randn(rng, out))
    check_op("linear", operands)


def conv_setup(data, nd: int, *, transpose: bool):
    """Channels, groups, kernel and attrs for a (transposed) convolution with ``nd`` dims."""
    groups = data.draw(st.integers(1, 3))
    if data.draw(st.booleans()):  # depthwise: one input channel per group
        cin, cout = groups, groups * data.draw(st.integers(1, 2))
    else:
        cin = groups * data.draw(st.integers(1, 2))
        cout = groups * data.draw(st.integers(1, 2))
    kernel = data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    stride = data.draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    dilation = data.draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    padding = data.draw(st.lists(st.integers(0, 2), min_size=nd, max_size=nd))
    # kiln attrs may be an int, a one-entry list or one entry per dim: try all three.
    spell = data.draw(st.sampled_from(["list", "scalar", "one"]))
    if spell != "list" and nd > 1:
        stride, dilation, padding = ([v[0]] * nd for v in (stride, dilation, padding))

    def as_attr(v):
        return v if spell == "list" else (v[0] if spell == "scalar" else [v[0]])

    attrs = {"stride": as_attr(stride), "padding": as_attr(padding),
             "dilation": as_attr(dilation), "groups": groups}
    if transpose:
        out_pad = [data.draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
        attrs["output_padding"] = out_pad
        # The smallest input whose output is not cropped to nothing by the padding.
        smallest = [next(n for n in range(1, 9) if (n - 1) * s - 2 * p + d * (k - 1) + o >= 0)
                    for s, p, d, k, o in zip(stride, padding, dilation, kernel, out_pad)]
        sizes = [data.draw(st.integers(n, n + 4)) for n in smallest]
        weight = (cin, cout // groups, *kernel)
    else:
        sizes = [data.draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 8))
                 for k, d, p in zip(kernel, dilation, padding)]
        weight = (cout, cin // groups, *kernel)
    return cin, cout, weight, sizes, attrs


@covers("conv")
@pytest.mark.parametrize("nd", [1, 2, 3])
@SETTINGS
@given(data=st.data())
def test_conv(nd, data):
    rng = rng_of(data)
    cin, cout, wshape, sizes, attrs = conv_setup(data, nd, transpose=False)
    operands = [randn(rng, [data.draw(st.integers(1, 2)), cin, *sizes]), randn(rng, wshape)]
    if data.draw(st.booleans()):
        operands.append(randn(rng, cout))
    check_op("conv", operands, attrs)


@covers("conv_transpose")
@pytest.mark.parametrize("nd", [1, 2, 3])
@SETTINGS
@given(data=st.data())
def test_conv_transpose(nd, data):
    rng = rng_of(data)
    cin, cout, wshape, sizes, attrs = conv_setup(data, nd, transpose=True)
    operands = [randn(rng, [data.draw(st.integers(1, 2)), cin, *sizes]), randn(rng, wshape)]
    if data.draw(st.booleans()):
        operands.append(randn(rng, cout))
    check_op("conv_transpose", operands, attrs)


# ---- quantized ops ---------------------------------------------------------------------------
def qparams(data) -> dict:
    """A scale exactly representable in float32 and a u8 zero point."""
    scale = float(np.float32(data.draw(st.sampled_from([0.007, 0.02, 0.1, 0.5]))))
    return {"scale": scale, "zero_point": data.draw(st.integers(0, 255))}


@covers("quantize", "dequantize")
@SETTINGS
@given(data=st.data())
def test_quantize_dequantize(data):
    rng = rng_of(data)
    shape = data.draw(shapes())
    attrs = qparams(data)
    dtype = data.draw(st.sampled_from(["u8", "i8"]))
    if dtype == "i8":
        attrs["zero_point"] -= 128
    x = randn(rng, shape, 3.0)
    # Values exactly half-way between two steps: rounding must be half to even everywhere.
    halves = (rng.integers(-40, 40, shape) + 0.5).astype(np.float32) * np.float32(attrs["scale"])
    x = np.where(rng.random(shape) < 0.3, halves, x).astype(np.float32)
    q = check_op("quantize", [x], {**attrs, "dtype": dtype})[0]
    back = check_op("dequantize", [q], attrs)[0]
    lo, hi = (0, 255) if dtype == "u8" else (-128, 127)
    steps = x / attrs["scale"] + attrs["zero_point"]
    inside = (steps > lo) & (steps < hi)
    assert np.all(np.abs(back - x)[inside] <= attrs["scale"] / 2 * 1.0001 + 1e-7)


def qanchor_operands(rng, data, x_shape, cout: int, k: int) -> tuple[list[np.ndarray], dict]:
    x = rng.integers(0, 256, x_shape).astype(np.uint8)
    w = rng.integers(-127, 128, (cout, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, cout).astype(np.int32)
    out_dtype = data.draw(st.sampled_from(["u8", "f32"]))
    scale = rng.uniform(1e-4, 3e-3, cout).astype(np.float32)
    attrs = {"x_zero_point": data.draw(st.integers(0, 255)),
             "out_zero_point": data.draw(st.integers(0, 255)), "out_dtype": out_dtype,
             "relu": data.draw(st.booleans())}
    return [x, w, bias, scale], attrs


@covers("qlinear")
@SETTINGS
@given(data=st.data())
def test_qlinear(data):
    rng = rng_of(data)
    x_shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=6))
    operands, attrs = qanchor_operands(rng, data, x_shape, data.draw(st.integers(1, 6)),
                                       x_shape[-1])
    check_op("qlinear", operands, attrs)


@covers("qconv")
@SETTINGS
@given(data=st.data())
def test_qconv(data):
    rng = rng_of(data)
    c, cout = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    kh, kw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    x_shape = [data.draw(st.integers(1, 2)), data.draw(st.integers(5, 7)),
               data.draw(st.integers(5, 7)), c]
    operands, attrs = qanchor_operands(rng, data, x_shape, cout, kh * kw * c)
    operands[1] = operands[1].reshape(cout, kh, kw, c)
    attrs.update(stride=data.draw(st.integers(1, 2)), padding=data.draw(st.integers(0, 1)),
                 dilation=data.draw(st.integers(1, 2)))
    check_op("qconv", operands, attrs)


@covers("linear_w8", "dynamic_qlinear")
@pytest.mark.parametrize("op", ["linear_w8", "dynamic_qlinear"])
@SETTINGS
@given(data=st.data())
def test_int8_weight_linears(op, data):
    rng = rng_of(data)
    x_shape = data.draw(shapes(min_dims=1, max_dims=3, max_side=6))
    n, k = data.draw(st.integers(1, 6)), x_shape[-1]
    operands = [randn(rng, x_shape), rng.integers(-127, 128, (n, k)).astype(np.int8),
                rng.uniform(0.001, 0.01, n).astype(np.float32)]
    if data.draw(st.booleans()):
        operands.append(randn(rng, n))
    check_op(op, operands)


@covers("attention")
@SETTINGS
@given(data=st.data())
def test_attention(data):
    rng = rng_of(data)
    (bq, bk, bv), batch = data.draw(hnp.mutually_broadcastable_shapes(
        num_shapes=3, max_dims=2, max_side=3))
    # The mask broadcasts to the scores' shape (batch, L, S), never beyond it.
    bm = tuple(d if data.draw(st.booleans()) else 1
               for d in batch[len(batch) - data.draw(st.integers(0, len(batch))):])
    L, S, E, Ev = (data.draw(st.integers(1, 6)) for _ in range(4))
    operands = [randn(rng, bq + (L, E)), randn(rng, bk + (S, E)), randn(rng, bv + (S, Ev))]
    mask_kind = data.draw(st.sampled_from(["none", "bool", "float"]))
    mask_shape = bm + (data.draw(st.sampled_from([1, L])), S)
    if mask_kind == "bool":
        mask = rng.random(mask_shape) < 0.7
        mask[..., 0] = True  # fully masked rows have their own test
        operands.append(mask)
    elif mask_kind == "float":
        operands.append(randn(rng, mask_shape))
    attrs = {"causal": data.draw(st.booleans()),
             "scale": data.draw(st.sampled_from([None, 0.5]))}
    check_op("attention", operands, attrs)


@covers("attention")
@pytest.mark.parametrize("mask_dtype", ["bool", "f32"])
def test_attention_fully_masked_row_is_zero(mask_dtype):
    # Regression: PyTorch's SDPA gives zeros for a row that attends to nothing; the reference
    # used to give NaN.
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, (2, 3, 4)), randn(rng, (2, 5, 4)), randn(rng, (2, 5, 3))
    keep = np.ones((3, 5), bool)
    keep[1] = False
    mask = keep if mask_dtype == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    (out,) = check_op("attention", [q, k, v, mask], {"causal": True, "scale": None})
    assert np.all(out[:, 1] == 0.0)


# ---- errors ----------------------------------------------------------------------------------
def build_error(op: str, types: list[TensorType], attrs: dict | None = None) -> None:
    """Add one ``op`` node on inputs of ``types`` (expected to raise)."""
    b = GraphBuilder()
    b.op(op, [b.input(f"in{k}", t) for k, t in enumerate(types)], attrs)


F32, I64, BOOL = DType.f32, DType.i64, DType.bool
BAD_SHAPES = [
    ("add", [TensorType((2, 3)), TensorType((4,))], None),
    ("add", [TensorType((2,)), TensorType((2,), I64)], None),
    ("sub", [TensorType((2,), BOOL), TensorType((2,), BOOL)], None),
    ("matmul", [TensorType((2, 3)), TensorType((4, 5))], None),
    ("matmul", [TensorType((3,)), TensorType((3, 5))], None),
    ("linear", [TensorType((2, 3)), TensorType((4, 5))], None),
    ("conv", [TensorType((1, 3, 8, 8)), TensorType((4, 2, 3, 3))], None),
    ("conv", [TensorType((1, 3, 2, 2)), TensorType((4, 3, 3, 3))], None),
    ("where", [TensorType((2,)), TensorType((2,)), TensorType((2,))], None),
    ("concat", [TensorType((2, 3)), TensorType((2, 4))], {"axis": 0}),
    ("reshape", [TensorType((2, 3))], {"shape": [4, 2]}),
    ("slice", [TensorType((4,))], {"axis": 0, "start": 2, "end": 5}),
    ("split", [TensorType((4,))], {"axis": 0, "sizes": [1, 2]}),
    ("softmax", [TensorType((2, 3))], {"axis": 2}),
    ("max_pool", [TensorType((1, 1, 4, 4))], {"kernel": [3, 3], "padding": 2}),
    ("embedding", [TensorType((3,), F32), TensorType((5, 2))], None),
    ("log", [TensorType((3,), I64)], None),
    # Regressions for rules that used to accept these or fail with a non-kiln error:
    ("neg", [TensorType((3,), BOOL)], None),
    ("relu", [TensorType((3,), BOOL)], None),
    ("cast", [TensorType((3,))], {"dtype": "f64"}),
    ("slice", [TensorType(())], {"axis": 0, "start": 0, "end": 0}),
    ("split", [TensorType(())], {"axis": 0, "sizes": [1]}),
    ("concat", [TensorType(()), TensorType(())], {"axis": 0}),
    ("pad", [TensorType((3,))], {"pads": [-4, 2]}),
    ("attention", [TensorType((2, 3)), TensorType((4, 3)), TensorType((4, 3)),
                   TensorType((5, 2, 4), BOOL)], None),
]


@pytest.mark.parametrize(("op", "types", "attrs"), BAD_SHAPES,
                         ids=[f"{op}-{k}" for k, (op, _, _) in enumerate(BAD_SHAPES)])
def test_bad_operands_raise_shape_error(op, types, attrs):
    with pytest.raises(ShapeError) as info:
        build_error(op, types, attrs)
    assert info.value.op == op


def test_wrong_operand_count_raises_shape_error():
    with pytest.raises(ShapeError):
        build_error("add", [TensorType((2,))])
    with pytest.raises(ShapeError):
        build_error("linear", [TensorType((2, 3))] * 4)


# ---- recurrent -------------------------------------------------------------------------------
RECURRENT_GATES = {"lstm_seq": ["ifgo", "iofg"], "gru_seq": ["rzn", "zrn"]}


def recurrent_operands(rng: np.random.Generator, op: str, steps: int, batch: int,
                       hidden: int) -> list[np.ndarray]:
    """xproj, w_hh and the states (and GRU's b_hh) of a recurrent op, at a scale whose gates
    neither saturate nor vanish."""
    g = 4 if op == "lstm_seq" else 3
    xproj, w = randn(rng, (steps, batch, g * hidden)), randn(rng, (g * hidden, hidden), 0.5)
    state = [randn(rng, (1, batch, hidden))]
    if op == "lstm_seq":
        return [xproj, w, *state, randn(rng, (1, batch, hidden))]
    return [xproj, w, randn(rng, g * hidden), *state]


@covers("lstm_seq", "gru_seq")
@pytest.mark.parametrize("op", ["lstm_seq", "gru_seq"])
@FEW
@given(data=st.data())
def test_recurrent_seq(op, data):
    rng = rng_of(data)
    steps, batch, hidden = (data.draw(st.integers(1, n)) for n in (5, 3, 6))
    attrs = {"gates": data.draw(st.sampled_from(RECURRENT_GATES[op])),
             "reverse": data.draw(st.booleans())}
    check_op(op, recurrent_operands(rng, op, steps, batch, hidden), attrs)


@pytest.mark.parametrize("op", ["lstm_seq", "gru_seq"])
@pytest.mark.parametrize("reverse", [False, True])
def test_recurrent_seq_on_llvm(op, reverse):
    """The one-kernel lowering compiled by LLVM against the reference and PyTorch, with a
    hidden size that leaves vector tails and gate rows that fill several row blocks."""
    rng = np.random.default_rng(1)
    operands = recurrent_operands(rng, op, 7, 2, 21)
    b = GraphBuilder(op)
    names = [b.input(f"in{k}", TensorType.of(a)) for k, a in enumerate(operands)]
    b.output(b.op(op, names, {"gates": RECURRENT_GATES[op][1], "reverse": reverse}))
    g = b.build()
    got = compile_llvm(g, cache=False)(operands)[0]
    for want in (run_graph(g, operands)[0], run_torch(g, operands)[0]):
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want))


@pytest.mark.parametrize("op", ["lstm_seq", "gru_seq"])
def test_recurrent_seq_shape_errors(op):
    g = 4 if op == "lstm_seq" else 3
    ok = [TensorType((5, 2, g * 3), DType.f32), TensorType((g * 3, 3), DType.f32)]
    state = TensorType((1, 2, 3), DType.f32)
    rest = [state, state] if op == "lstm_seq" else [TensorType((g * 3,), DType.f32), state]
    get_op(op).infer(ok + rest, get_op(op).normalize_attrs({}))
    with pytest.raises(ShapeError):
        get_op(op).infer([TensorType((5, 2, g * 3 + 1), DType.f32), *ok[1:], *rest],
                         get_op(op).normalize_attrs({}))
    with pytest.raises(ShapeError):
        get_op(op).infer(ok + rest, get_op(op).normalize_attrs({"gates": "abcd"[:g]}))
