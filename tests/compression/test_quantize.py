"""int8 quantization: golden IR, calibration, error budget, exact llvm vs reference, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from passes_testlib import fingerprint

from kiln.backends.reference import run_graph
from kiln.compression.calibration import RangeObserver, entropy_threshold
from kiln.compression.quantize import activation_qparams, weight_qparams
from kiln.ir import GraphBuilder, KilnError, TensorType, print_graph, verify
from kiln.passes import PassContext, get_pass


def tiny():
    """conv -> relu -> conv -> residual add with the input: both quantized layer kinds of
    output (u8 into the next conv, f32 into the float add)."""
    b = GraphBuilder("tiny")
    x = b.input("x", TensorType((1, 2, 4, 4)))
    w1 = b.constant(np.array([1, -2, 0.5, 1], np.float32).reshape(2, 2, 1, 1), "c1.w")
    r1 = b.op("relu", [b.op("conv", [x, w1], name="c1")], name="r1")
    w2 = b.constant(np.array([1, 1, -1, 0.5], np.float32).reshape(2, 2, 1, 1), "c2.w")
    b.output(b.op("add", [b.op("conv", [r1, w2], name="c2"), x], name="y"))
    return b.build()


TINY_RANGES = {"x": (-2.0, 2.0), "r1": (0.0, 6.0), "c2": (-8.0, 8.0), "y": (-10.0, 10.0)}


def quantize(graph, ranges, **options):
    opts = {f"quantize_int8.{k}": v for k, v in options.items()}
    if ranges is not None:
        opts["quantize_int8.ranges"] = ranges
    ctx = PassContext(options=opts)
    before = fingerprint(graph)
    out = get_pass("quantize_int8").run(graph, ctx)
    assert fingerprint(graph) == before, "quantize_int8 modified its input"
    verify(out.graph)
    return out


def test_golden_tiny():
    result = quantize(tiny(), TINY_RANGES)
    assert result.changed
    text = print_graph(get_pass("sink_permutes").run(result.graph).graph)
    assert text == """\
graph tiny(%x: f32[1,2,4,4]) -> (%y) {
  const %c1.w.i8: i8[2,1,1,2] = [64, -127, 64, 127]
  const %c1.bias_i32: i32[2] = [0, 0]
  const %c1.requant: f32[2] = [0.010498688, 0.005249344]
  const %c2.w.i8: i8[2,1,1,2] = [127, 127, -127, 64]
  const %c2.bias_i32: i32[2] = [0, 0]
  const %c2.requant: f32[2] = [0.00018527097, 0.00018527097]
  %x.q_1: u8[1,2,4,4] = quantize(%x) {scale=0.01568627543747425, zero_point=127, dtype="u8"}
  %x.q: u8[1,4,4,2] = permute(%x.q_1) {perm=[0, 2, 3, 1]}
  %x.dq_2: f32[1,2,4,4] = dequantize(%x.q_1) {scale=0.01568627543747425, zero_point=127}
  %r1.u8: u8[1,4,4,2] = qconv(%x.q, %c1.w.i8, %c1.bias_i32, %c1.requant) {stride=[1, 1], \
padding=[0, 0], dilation=[1, 1], x_zero_point=127, out_zero_point=0, out_dtype="u8", relu=true}
  %c2.nhwc: f32[1,4,4,2] = qconv(%r1.u8, %c2.w.i8, %c2.bias_i32, %c2.requant) {stride=[1, 1], \
padding=[0, 0], dilation=[1, 1], x_zero_point=0, out_zero_point=0, out_dtype="f32", relu=false}
  %c2: f32[1,2,4,4] = permute(%c2.nhwc) {perm=[0, 3, 1, 2]}
  %y: f32[1,2,4,4] = add(%c2, %x.dq_2) {}
  return %y
}
"""
    x = np.random.default_rng(0).uniform(-2, 2, (1, 2, 4, 4)).astype(np.float32)
    want = run_graph(tiny(), [x])[0]
    got = run_graph(result.graph, [x])[0]
    # Two layers of about half a step each (input step 4/255, output step 12/255 * ...).
    assert np.abs(got - want).max() < 0.1


def test_qparams():
    scale, zp = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == 64
    assert activation_qparams(0.5, 2.0)[1] == 0        # widened to hold 0
    assert activation_qparams(0.0, 0.0) == (float(np.float32(1 / 255)), 0)
    with pytest.raises(KilnError, match="finite"):
        activation_qparams(float("nan"), 1.0)
    w = np.array([[0.5, -1.0], [0.0, 0.0]], np.float32)
    q, s = weight_qparams(w)
    assert q.tolist() == [[64, -127], [0, 0]] and s.tolist() == [np.float32(1 / 127), 1.0]


def test_weight_max_bounds_the_weights():
    """weight_max=64 (targets whose int8 dot product is pmaddubsw) quantizes every layer's
    weights into [-64, 64]; nothing else of the graph changes."""
    full = quantize(tiny(), TINY_RANGES).graph
    g = quantize(tiny(), TINY_RANGES, weight_max=64).graph
    for name in ("c1.w.i8", "c2.w.i8"):
        assert np.abs(g.constants[name].astype(int)).max() == 64
        assert np.abs(full.constants[name].astype(int)).max() == 127
    assert [n.op for n in g.nodes] == [n.op for n in full.nodes]
    q, s = weight_qparams(np.array([[0.5, -1.0]], np.float32), 64)
    assert q.tolist() == [[32, -64]] and s.tolist() == [np.float32(1 / 64)]
    for bad in (0, 128, 64.0, "64"):
        with pytest.raises(KilnError, match="weight_max"):
            quantize(tiny(), TINY_RANGES, weight_max=bad)


def _target(isa: str):
    from kiln.passes.target import Target, named_target

    host = Target("x86_64-unknown-linux-gnu", "host", "+" + ",+".join(
        "sse2 ssse3 sse4.2 popcnt avx avx2 fma f16c bmi bmi2 avx512f avx512cd avx512bw "
        "avx512dq avx512vl avx512vnni".split()), 512)
    return named_target(isa, host)


def test_layers_stay_float_where_int8_is_slower_and_say_why():
    """A target whose int8 dot product widens to 16 bits (SSE2) keeps every layer float;
    AVX2 and VNNI targets quantize. Each layer's precision and reason are noted."""
    for isa, weight_max, expect in (("sse2", 127, "fp32"), ("avx2", 64, "int8"),
                                    ("avx512-vnni", 127, "int8")):
        target = _target(isa)
        ctx = PassContext(options={"quantize_int8.ranges": TINY_RANGES,
                                   "quantize_int8.target": target,
                                   "quantize_int8.weight_max": target.int8_weight_max})
        assert target.int8_weight_max == weight_max
        out = get_pass("quantize_int8").run(tiny(), ctx)
        layers = ctx.notes["quantize_int8.layers"]
        assert set(layers) == {"c1", "c2"}
        assert {prec for prec, _ in layers.values()} == {expect}, layers
        if expect == "fp32":
            assert not out.changed
            assert "neither VNNI nor pmaddubsw" in layers["c1"][1]
        else:
            assert f"|w| <= {weight_max}" in layers["c1"][1]
            assert [n.op for n in out.graph.nodes].count("qconv") == 2
    ctx = PassContext(options={"quantize_int8.ranges": TINY_RANGES,
                               "quantize_int8.protect": ["c2"]})
    get_pass("quantize_int8").run(tiny(), ctx)
    assert ctx.notes["quantize_int8.layers"]["c2"] == ("fp32", "protected")


def test_missing_ranges_and_bad_protect_are_clear():
    with pytest.raises(KilnError, match="calibrat"):
        get_pass("quantize_int8").run(tiny(), PassContext())
    with pytest.raises(KilnError, match="nothing in the graph"):
        quantize(tiny(), TINY_RANGES, protect=["no_such_layer"])


def test_protected_and_uncalibrated_layers_stay_float():
    g = quantize(tiny(), TINY_RANGES, protect=["c2"]).graph
    assert [n.op for n in g.nodes].count("qconv") == 1
    assert any(n.op == "conv" and n.name == "c2" for n in g.nodes)
    g = quantize(tiny(), {"x": (-2.0, 2.0)}).graph   # r1 has no range: c2 stays float
    assert [n.op for n in g.nodes].count("conv") == 1


# ---- calibration -----------------------------------------------------------------------------
def test_observer_methods():
    rng = np.random.default_rng(0)
    data = rng.standard_normal(100_000).astype(np.float32)
    data[:3] = [40.0, -35.0, 50.0]   # outliers
    ranges = {}
    for method in ("minmax", "percentile", "entropy"):
        obs = RangeObserver(method)
        for part in np.split(data, 4):
            obs.observe("v", part)
        ranges[method] = obs.ranges()["v"]
    assert ranges["minmax"] == (-35.0, 50.0)
    assert 3.0 < ranges["percentile"][1] < 6.0 and -6.0 < ranges["percentile"][0] < -3.0
    assert ranges["entropy"][1] < 50.0


def test_entropy_threshold_keeps_a_uniform_range():
    data = np.random.default_rng(1).uniform(0, 1, 50_000).astype(np.float32)
    assert entropy_threshold(data) > 0.9


def test_non_finite_calibration_values(caplog):
    obs = RangeObserver()
    obs.observe("v", np.array([1.0, np.nan, -2.0, np.inf], np.float32))
    obs.observe("w", np.array([np.nan, np.inf], np.float32))
    with pytest.raises(KilnError, match="no finite value of w"):
        obs.ranges()
    obs = RangeObserver()
    obs.observe("v", np.array([1.0, np.nan, -2.0, np.inf], np.float32))
    with caplog.at_level(logging.WARNING, logger="kiln.calibration"):
        assert obs.ranges() == {"v": (-2.0, 1.0)}
    assert "ignored 2 non-finite values of %v" in caplog.text


def test_bad_observer_options():
    with pytest.raises(KilnError, match="unknown calibration method"):
        RangeObserver("mse")
    with pytest.raises(KilnError, match="percentile"):
        RangeObserver("percentile", percentile=20)


# ---- layout cleanup --------------------------------------------------------------------------
def test_sink_permutes_cancels_pairs():
    b = GraphBuilder("perm")
    x = b.input("x", TensorType((1, 3, 2, 2)))
    y = b.input("y", TensorType((1, 3, 2, 2)))
    px = b.op("permute", [x], {"perm": [0, 2, 3, 1]})
    py = b.op("permute", [y], {"perm": [0, 2, 3, 1]})
    s = b.op("relu", [b.op("add", [px, py])])
    b.output(b.op("permute", [s], {"perm": [0, 3, 1, 2]}, name="out"))
    g = b.build()
    out = get_pass("sink_permutes").run(g).graph
    assert [n.op for n in out.nodes] == ["add", "relu"]
    a = [np.random.default_rng(k).standard_normal((1, 3, 2, 2)).astype(np.float32)
         for k in range(2)]
    np.testing.assert_array_equal(run_graph(out, a)[0], run_graph(g, a)[0])


# ---- modes without calibration ---------------------------------------------------------------
def mlp_graph():
    rng = np.random.default_rng(0)
    b = GraphBuilder("mlp")
    x = b.input("x", TensorType((2, 16)))
    w1 = b.constant(rng.standard_normal((32, 16)).astype(np.float32), "fc1.w")
    b1 = b.constant(rng.standard_normal(32).astype(np.float32), "fc1.b")
    h = b.op("relu", [b.op("linear", [x, w1, b1], name="fc1")])
    w2 = b.constant(rng.standard_normal((4, 32)).astype(np.float32), "fc2.w")
    b.output(b.op("linear", [h, w2], name="fc2"))
    return b.build()


@pytest.mark.parametrize("mode, op", [("dynamic", "dynamic_qlinear"),
                                      ("weight_only", "linear_w8")])
def test_modes_without_calibration(mode, op):
    g = mlp_graph()
    out = quantize(g, None, mode=mode).graph
    assert [n.op for n in out.nodes] == [op, "relu", op]
    assert out.constants["fc1.w.i8"].dtype == np.int8
    assert "fc1.w" not in out.constants
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    want, got = run_graph(g, [x])[0], run_graph(out, [x])[0]
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    kept = quantize(g, None, mode=mode, protect=["fc2"]).graph
    assert [n.op for n in kept.nodes][-1] == "linear"


def test_unknown_mode_is_refused():
    with pytest.raises(KilnError, match="unknown quantization mode"):
        quantize(mlp_graph(), None, mode="fp8")


def test_convs_next_to_a_depthwise_conv_stay_float():
    """An inverted-residual block: expand 1x1 -> relu -> depthwise 3x3 -> project 1x1. The
    depthwise conv stays float, and so do its neighbours (their layout changes would cost more
    than int8 saves); a 1x1 conv two layers away is quantized."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("block")
    x = b.input("x", TensorType((1, 8, 6, 6)))

    def w(*shape):
        return b.constant(rng.standard_normal(shape).astype(np.float32), "w")

    head = b.op("conv", [x, w(8, 8, 1, 1)], name="head")
    e = b.op("relu", [b.op("conv", [b.op("relu", [head]), w(16, 8, 1, 1)], name="expand")])
    d = b.op("relu", [b.op("conv", [e, w(16, 1, 3, 3)], {"padding": 1, "groups": 16},
                           name="dw")])
    b.output(b.op("conv", [d, w(8, 16, 1, 1)], name="project"))
    g = b.build()
    ranges = {}
    for v in g.types:
        if v not in g.constants:
            ranges[v] = (-5.0, 5.0)
    out = quantize(g, ranges).graph
    ops = {n.name: n.op for n in out.nodes}
    assert [n.op for n in out.nodes].count("qconv") == 1     # only head
    assert ops["expand"] == "conv" and ops["project"] == "conv" and ops["dw"] == "conv"


def qkv_graph():
    """Three linear layers reading one input (attention's projections) and a fourth layer
    reading another value."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("qkv")
    x = b.input("x", TensorType((1, 5, 16)))

    def linear(inp, n, name):
        w = b.constant(rng.standard_normal((n, 16)).astype(np.float32), f"{name}.w")
        bias = b.constant(rng.standard_normal(n).astype(np.float32), f"{name}.b")
        return b.op("linear", [inp, w, bias], name=name)

    q, k, v = linear(x, 16, "q"), linear(x, 16, "k"), linear(x, 24, "v")
    scores = b.op("matmul", [q, b.op("permute", [k], {"perm": [0, 2, 1]})])
    mixed = b.op("matmul", [b.op("softmax", [scores], {"axis": -1}), v])
    b.output(linear(b.op("slice", [mixed], {"axis": 2, "start": 0, "end": 16}), 16, "out"))
    return b.build()


def test_sibling_linears_merge_into_one_exactly(monkeypatch):
    """query, key and value become one qlinear (their rows stacked) and three slices: the
    same integers and epilogues, so the same outputs bit for bit (merge_qlinear.py)."""
    import kiln.compression.quantize as qmod
    from kiln.backends.llvm import compile_graph
    from kiln.compression.compress import calibrate

    g = qkv_graph()
    x = np.random.default_rng(1).standard_normal((1, 5, 16)).astype(np.float32)
    ranges = calibrate(g, [[x]], method="minmax")
    out = quantize(g, ranges).graph
    ops = [n.op for n in out.nodes]
    assert ops.count("qlinear") == 2 and ops.count("slice") == 4
    merged = next(n for n in out.nodes if n.op == "qlinear")
    assert out.types[merged.outputs[0]].shape == (1, 5, 56)
    monkeypatch.setattr(qmod, "merge_sibling_qlinears", lambda graph: (graph, 0))
    separate = quantize(g, ranges).graph
    assert [n.op for n in separate.nodes].count("qlinear") == 4
    want = run_graph(separate, [x])[0]
    np.testing.assert_array_equal(run_graph(out, [x])[0], want)
    np.testing.assert_array_equal(compile_graph(out, cache=False)([x])[0],
                                  compile_graph(separate, cache=False)([x])[0])
    fp32 = run_graph(g, [x])[0]
    assert np.abs(want - fp32).max() <= 0.05 * np.abs(fp32).max()
