"""int8 ops on the llvm backend: the same integers as the reference backend, bit for bit.

Each case runs through the packed VNNI/widening schedule (the host's vector width), the plain
loop nests (width 1, through the kernel interpreter) and, where the host runs AVX2 code, the
AVX2 target's widening dot product."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.llvm import compile_graph
from kiln.backends.llvm.compiler import Target, host_target
from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, TensorType
from kiln.ir import kernel as K
from kiln.passes.lower import lower_graph
from kiln.passes.lower.qgemm import WIDE_TILES, tile_cost, tile_shape


def q_graph(op: str, x_shape, w_shape, attrs: dict, seed: int = 0, epilogue: bool = False,
            w_max: int = 127):
    rng = np.random.default_rng(seed)
    cout = w_shape[0]
    x = rng.integers(0, 256, x_shape).astype(np.uint8)
    b = GraphBuilder(op)
    xin = b.input("x", TensorType.of(x))
    w = b.constant(rng.integers(-w_max, w_max + 1, w_shape).astype(np.int8), "w")
    bias = b.constant(rng.integers(-4000, 4000, cout).astype(np.int32), "bias")
    fan_in = int(np.prod(w_shape[1:]))
    scale = b.constant((rng.uniform(0.5, 2.0, cout) / (fan_in ** 0.5 * 3000))
                       .astype(np.float32), "scale")
    y = b.op(op, [xin, w, bias, scale], attrs)
    if epilogue:  # a residual add in float, requantized: what a quantized ResNet block does
        other = b.input("other", TensorType(b.type_of(y).shape))
        deq = b.op("dequantize", [y], {"scale": 0.05, "zero_point": attrs["out_zero_point"]})
        s = b.op("relu", [b.op("add", [deq, other])])
        y = b.op("quantize", [s], {"scale": 0.04, "zero_point": 0})
        b.output(y)
        g = b.build()
        return g, [x, rng.standard_normal(g.types[other].shape).astype(np.float32)]
    b.output(y)
    return b.build(), [x]


CASES = {
    "linear_u8": ("qlinear", (5, 64), (48, 64), {"x_zero_point": 128, "out_zero_point": 7}),
    "linear_f32_relu_odd": ("qlinear", (3, 37), (21, 37),
                            {"x_zero_point": 3, "out_dtype": "f32", "relu": True}),
    "linear_3d_many_rows": ("qlinear", (2, 9, 32), (64, 32), {"x_zero_point": 90,
                                                              "out_zero_point": 100,
                                                              "relu": True}),
    "conv3x3_pad": ("qconv", (1, 8, 8, 16), (32, 3, 3, 16),
                    {"padding": 1, "x_zero_point": 11, "out_zero_point": 0, "relu": True}),
    "conv_first_layer_c3": ("qconv", (2, 9, 9, 3), (16, 3, 3, 3),
                            {"padding": 1, "stride": 2, "x_zero_point": 128,
                             "out_zero_point": 128}),
    "conv1x1_stride2_f32": ("qconv", (1, 8, 8, 32), (64, 1, 1, 32),
                            {"stride": 2, "x_zero_point": 5, "out_dtype": "f32"}),
    "conv_dilated_odd_cout": ("qconv", (1, 9, 10, 8), (20, 3, 2, 8),
                              {"padding": 2, "dilation": 2, "x_zero_point": 200,
                               "out_zero_point": 30}),
    "conv_48_cols_rows_remainder": ("qconv", (1, 5, 5, 12), (48, 3, 3, 12),
                                    {"padding": 1, "x_zero_point": 1, "out_zero_point": 9}),
    # One case per register tile of qgemm.WIDE_TILES (16 lanes), with ragged rows and columns
    # where the tile leaves them: 8x2 (BERT's 32 tokens), 8x3, 12x2 and 6x4.
    "linear_32_tokens_tile_8x2": ("qlinear", (1, 32, 64), (256, 64),
                                  {"x_zero_point": 60, "out_zero_point": 3}),
    "linear_13_rows_tile_8x3": ("qlinear", (13, 40), (40, 40),
                                {"x_zero_point": 7, "out_dtype": "f32"}),
    "linear_20_rows_tile_12x2": ("qlinear", (20, 32), (96, 32),
                                 {"x_zero_point": 250, "out_zero_point": 128, "relu": True}),
    "linear_50_rows_tile_6x4": ("qlinear", (50, 20), (64, 20),
                                {"x_zero_point": 0, "out_dtype": "f32"}),
}


def test_tile_shape_fits_the_registers_and_the_rows():
    """Every 16-lane tile keeps accumulators and weight vectors within 28 of the 32 vector
    registers with at least 16 accumulators (vpdpbusd's latency times two ports), and BERT's
    32-token GEMMs get a tile whose rows divide 32: (6, 4) tiles computed 36 rows for 32,
    11% of every product wasted (measured: 546 us of int8 linears where (8, 2) takes 491)."""
    for mr, nv in WIDE_TILES:
        assert mr * nv + nv <= 28 and mr * nv >= 16
    for cols in (256, 1024):
        mr, nv = tile_shape(16, cols, 32)
        assert 32 % mr == 0 and (cols // 16) % nv == 0
    # Many rows: the waste of a row remainder no longer matters; a narrow output keeps all
    # of its vectors in one tile.
    assert tile_shape(16, 64, 1 << 20) in WIDE_TILES
    assert tile_shape(16, 16, 32)[1] == 1
    for cols, rows in ((40, 13), (96, 20), (64, 50)):
        assert tile_shape(16, cols, rows) in WIDE_TILES
    assert tile_shape(8, 256, 32) == (4, 2)   # AVX2: unchanged
    assert tile_cost(32, 16, 8, 2) < tile_cost(32, 16, 6, 4)


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_llvm_matches_reference_exactly(case):
    op, xs, ws, attrs = CASES[case]
    g, inputs = q_graph(op, xs, ws, attrs)
    _same(compile_graph(g, cache=False)(inputs)[0], run_graph(g, inputs)[0])


@pytest.mark.parametrize("case", ["conv3x3_pad", "linear_u8"])
def test_requantizing_epilogue_fuses_and_matches(case):
    op, xs, ws, attrs = CASES[case]
    g, inputs = q_graph(op, xs, ws, attrs, epilogue=True)
    prog = compile_graph(g, cache=False)
    _same(prog(inputs)[0], run_graph(g, inputs)[0])
    assert len(prog.image.steps) == 1, "dequantize-add-relu-quantize should fuse into the store"


SMALL = {  # the kernel interpreter runs Python per element: small shapes
    "linear": ("qlinear", (3, 7), (5, 7), {"x_zero_point": 3, "out_dtype": "f32",
                                           "relu": True}),
    "conv_dilated": ("qconv", (1, 5, 6, 3), (4, 3, 2, 3),
                     {"padding": 2, "dilation": 2, "stride": 2, "x_zero_point": 200,
                      "out_zero_point": 30}),
}


@pytest.mark.parametrize("case", sorted(SMALL))
def test_plain_loop_nests_match_reference(case):
    """The width-1 lowering (no packed schedule), run by the kernel interpreter."""
    op, xs, ws, attrs = SMALL[case]
    g, inputs = q_graph(op, xs, ws, attrs)
    lowered = lower_graph(g, width=1)
    (step,) = lowered.steps
    bufs = {}
    for p in step.kernel.params:
        value = step.reads.get(p.name) or step.writes.get(p.name)
        if value in g.inputs:
            bufs[p.name] = inputs[g.inputs.index(value)].reshape(-1).copy()
        elif value in lowered.constants or value in g.constants:
            src = lowered.constants.get(value, g.constants.get(value))
            bufs[p.name] = np.asarray(src).reshape(-1).copy()
        else:
            bufs[p.name] = np.zeros(p.size, K.np_dtype(p.dtype))
    K.run_kernel(step.kernel, bufs)
    out = g.outputs[0]
    got = bufs[next(n for n, v in step.writes.items() if v == out)]
    _same(got.reshape(g.types[out].shape), run_graph(g, inputs)[0])


ISAS = ["avx2", "sse2", "avx512", "avx512-vnni"]


def _isa_target(isa: str):
    from kiln.ir import KilnError
    from kiln.passes.target import named_target

    try:
        return named_target(isa, host_target())
    except KilnError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("w_max", [64, 127])
@pytest.mark.parametrize("case", ["conv3x3_pad", "linear_f32_relu_odd", "linear_3d_many_rows"])
def test_each_isa_dot_product_matches_exactly(case, w_max, isa):
    """Every target's int8 dot product gives the reference's integers: VNNI; pmaddubsw where
    the weights stay within +-64 (the extreme activations 255 with weights of +-64 reach
    the edge of its 16-bit pair sums); 16-bit widening for full-range weights without VNNI."""
    target = _isa_target(isa)
    op, xs, ws, attrs = CASES[case]
    g, inputs = q_graph(op, xs, ws, attrs, w_max=w_max)
    inputs[0][..., ::3] = 255
    w = g.constants["w"].copy()
    w[..., ::2] = np.where(w[..., ::2] >= 0, w_max, -w_max)
    g.constants["w"] = w
    prog = compile_graph(g, target=target, cache=False)
    _same(prog(inputs)[0], run_graph(g, inputs)[0])
    expected = target.dot4_instruction(target.f32_lanes, w_max)
    ir = prog.ir_text
    assert ("vpdpbusd" in ir) == (expected == "vnni")
    assert ("pmadd.ub.sw" in ir or "pmaddubs" in ir) == (expected == "maddubs")


def test_dot_product_instruction_per_target():
    from kiln.passes.target import Target

    def t(features: str, bits: int) -> Target:
        return Target("x86_64-unknown-linux-gnu", "x", features, bits)

    avx2 = t("+avx,+avx2,+fma", 256)
    assert avx2.dot4_instruction(8, 64) == "maddubs"
    assert avx2.dot4_instruction(8, 65) == "widen"
    assert avx2.int8_weight_max == 64 and avx2.int8_dot == "maddubs"
    alder = t("+avx,+avx2,+fma,+avxvnni", 256)
    assert alder.dot4_instruction(8, 127) == "vnni" and alder.int8_weight_max == 127
    vnni = t("+avx2,+avx512f,+avx512bw,+avx512vl,+avx512vnni", 512)
    assert vnni.dot4_instruction(16, 127) == "vnni" and vnni.int8_weight_max == 127
    skx = t("+avx2,+avx512f,+avx512bw,+avx512vl", 512)
    assert skx.dot4_instruction(16, 64) == "maddubs" and skx.int8_weight_max == 64
    sse2 = t("+sse2", 128)
    assert sse2.dot4_instruction(4, 64) == "widen" and sse2.int8_weight_max == 127


def test_interpreter_holds_lowering_to_its_weight_bound():
    """The bound a lowering promises on dot_add4's weights is checked when the kernel IR is
    interpreted: a promise the weights break is a kiln bug, not a wrong number."""
    acc, i = K.Var("acc", "i32", 4), K.Var("i", K.INDEX)
    bad = K.DotAdd4(acc, K.Load("u", K.Const(0, K.INDEX), "u8", 16),
                    K.Load("w", K.Const(0, K.INDEX), "i8", 16), s_max=64)
    kernel = K.Kernel("k", (K.Buffer("u", "u8", 16), K.Buffer("w", "i8", 16),
                            K.Buffer("o", "i32", 4)),
                      (K.Decl(acc, K.Broadcast(K.Const(0, "i32"), 4)),
                       K.Assign(acc, bad), K.Store("o", K.Const(0, K.INDEX), acc)))
    del i
    w = np.full(16, 65, np.int8)
    with pytest.raises(Exception, match="promised bound"):
        K.run_kernel(kernel, {"u": np.ones(16, np.uint8), "w": w, "o": np.zeros(4, np.int32)})
    w[:] = 64
    out = np.zeros(4, np.int32)
    K.run_kernel(kernel, {"u": np.ones(16, np.uint8), "w": w, "o": out})
    assert (out == 256).all()


def test_avx2_widening_dot_product_matches():
    host = host_target()
    if "+avx2" not in host.features:
        pytest.skip("this CPU cannot run AVX2 code")
    feats = ",".join(f for f in host.features.split(",")
                     if not f[1:].startswith(("avx512", "avxvnni", "amx")))
    avx2 = Target(host.triple, "haswell", feats, 256)
    for case in ("conv3x3_pad", "linear_f32_relu_odd"):
        op, xs, ws, attrs = CASES[case]
        g, inputs = q_graph(op, xs, ws, attrs)
        _same(compile_graph(g, target=avx2, cache=False)(inputs)[0], run_graph(g, inputs)[0])


def w8_graph(op: str, x_shape, n: int, bias: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = x_shape[-1]
    b = GraphBuilder(op)
    x = b.input("x", TensorType(x_shape))
    operands = [x, b.constant(rng.integers(-127, 128, (n, k)).astype(np.int8), "w"),
                b.constant(rng.uniform(1e-3, 1e-2, n).astype(np.float32), "scale")]
    if bias:
        operands.append(b.constant(rng.standard_normal(n).astype(np.float32), "bias"))
    b.output(b.op(op, operands))
    return b.build(), [rng.standard_normal(x_shape).astype(np.float32)]


W8_CASES = [((4, 64), 48, True), ((1, 37), 21, False), ((2, 5, 96), 130, True)]


@pytest.mark.parametrize("op", ["linear_w8", "dynamic_qlinear"])
@pytest.mark.parametrize("x_shape, n, bias", W8_CASES)
def test_int8_weight_linears_match_reference(op, x_shape, n, bias):
    g, inputs = w8_graph(op, x_shape, n, bias)
    want = run_graph(g, inputs)[0]
    got = compile_graph(g, cache=False)(inputs)[0]
    # dynamic_qlinear: the int32 products are exact; only the float epilogue may round
    # differently (a fused multiply-add). linear_w8 sums in float32 like linear.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("op", ["linear_w8", "dynamic_qlinear"])
def test_int8_weight_linears_plain_loops(op):
    g, inputs = w8_graph(op, (2, 7), 5, True)
    lowered = lower_graph(g, width=1)
    (step,) = lowered.steps
    bufs = {}
    for p in step.kernel.params:
        value = step.reads.get(p.name) or step.writes.get(p.name)
        if value in g.inputs:
            bufs[p.name] = inputs[0].reshape(-1).copy()
        elif value in g.constants:
            bufs[p.name] = np.asarray(g.constants[value]).reshape(-1).copy()
        else:
            bufs[p.name] = np.zeros(p.size, K.np_dtype(p.dtype))
    K.run_kernel(step.kernel, bufs)
    got = bufs[next(n for n, v in step.writes.items() if v == g.outputs[0])]
    want = run_graph(g, inputs)[0]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
