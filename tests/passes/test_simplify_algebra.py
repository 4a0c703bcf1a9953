"""Algebraic simplification: golden IR, purity, outputs unchanged, types kept."""

from __future__ import annotations

import numpy as np
from passes_testlib import fingerprint, run_pass

from kiln.ir import GraphBuilder, TensorType, print_graph
from kiln.passes import SimplifyAlgebra


def shape_chains():
    b = GraphBuilder("chains")
    x = b.input("x", TensorType((2, 3, 4)))
    r1 = b.op("reshape", [x], {"shape": [6, 4]}, name="r1")
    r2 = b.op("reshape", [r1], {"shape": [4, 6]}, name="r2", source="m.py:7 view(4, 6)")
    r3 = b.op("reshape", [r2], {"shape": [24]}, name="r3")
    same = b.op("reshape", [x], {"shape": [2, 3, 4]}, name="same")
    p1 = b.op("permute", [same], {"perm": [1, 2, 0]}, name="p1")
    p2 = b.op("permute", [p1], {"perm": [0, 2, 1]}, name="p2", source="m.py:8 permute")
    back1 = b.op("permute", [x], {"perm": [0, 2, 1]}, name="back1")
    back2 = b.op("permute", [back1], {"perm": [0, 2, 1]}, name="back2")
    y = b.op("relu", [back2], name="y")
    b.output(r3, p2, y)
    return b.build()


def test_golden_shape_chains():
    result = run_pass(SimplifyAlgebra(), shape_chains())
    assert result.changed
    assert print_graph(result.graph) == """\
graph chains(%x: f32[2,3,4]) -> (%r3, %p2, %y) {
  %r3: f32[24] = reshape(%x) {shape=[24]}
  %p2: f32[3,2,4] = permute(%x) {perm=[1, 0, 2]}  # m.py:8 permute
  %y: f32[2,3,4] = relu(%x) {}
  return %r3, %p2, %y
}
"""


def identities():
    b = GraphBuilder("identities")
    x = b.input("x", TensorType((2, 3)))
    one = b.constant(np.ones((3,), np.float32), "one")
    zero = b.constant(np.zeros((1, 1), np.float32), "zero")
    v = b.op("mul", [x, one], name="v")
    v = b.op("mul", [one, v], name="v")
    v = b.op("add", [v, zero], name="v")
    v = b.op("add", [zero, v], name="v")
    v = b.op("sub", [v, zero], name="v")
    v = b.op("div", [v, one], name="v")
    v = b.op("slice", [v], {"axis": 1, "start": 0, "end": 3}, name="v")
    v = b.op("cast", [v], {"dtype": "f32"}, name="v")
    v = b.op("expand", [v], {"shape": [2, 3]}, name="v")
    v = b.op("concat", [v], {"axis": 0}, name="v")
    v = b.op("pad", [v], {"pads": [0, 0, 0, 0]}, name="v")
    w = b.op("tanh", [v], name="w", source="m.py:9 torch.tanh(v)")
    out = b.op("mul", [w, one], name="out")
    # These stay: 0 - x is not x; x * ones broadcasts x to a bigger shape; the pad shifts.
    neg = b.op("sub", [zero, x], name="neg")
    big = b.op("mul", [x, b.constant(np.ones((4, 2, 3), np.float32), "ones3d")], name="big")
    shifted = b.op("pad", [x], {"pads": [0, 0, 1, -1]}, name="shifted")
    b.output(out, neg, big, shifted)
    return b.build()


def test_golden_identities():
    result = run_pass(SimplifyAlgebra(), identities())
    assert result.changed
    # The tanh takes the name of the graph output its value now is.
    assert print_graph(result.graph) == """\
graph identities(%x: f32[2,3]) -> (%out, %neg, %big, %shifted) {
  const %zero: f32[1,1] = [0.0]
  const %ones3d: f32[4,2,3]
  %out: f32[2,3] = tanh(%x) {}  # m.py:9 torch.tanh(v)
  %neg: f32[2,3] = sub(%zero, %x) {}
  %big: f32[4,2,3] = mul(%x, %ones3d) {}
  %shifted: f32[2,3] = pad(%x) {pads=[0, 0, 1, -1], value=0.0}
  return %out, %neg, %big, %shifted
}
"""


def test_input_graph_unchanged():
    for g in (shape_chains(), identities()):
        before = fingerprint(g)
        SimplifyAlgebra().run(g)
        assert fingerprint(g) == before


def test_output_that_becomes_an_input():
    b = GraphBuilder("passthrough")
    x = b.input("x", TensorType((3,)))
    y = b.op("reshape", [x], {"shape": [3]}, name="y")
    z = b.op("neg", [y], name="z")
    b.output(y, z)
    result = run_pass(SimplifyAlgebra(), b.build())
    assert print_graph(result.graph) == """\
graph passthrough(%x: f32[3]) -> (%x, %z) {
  %z: f32[3] = neg(%x) {}
  return %x, %z
}
"""


def test_inner_op_with_other_users_stays():
    b = GraphBuilder("shared")
    x = b.input("x", TensorType((2, 6)))
    r1 = b.op("reshape", [x], {"shape": [3, 4]}, name="r1")
    r2 = b.op("reshape", [r1], {"shape": [12]}, name="r2")
    b.output(r1, r2)
    result = run_pass(SimplifyAlgebra(), b.build())
    assert print_graph(result.graph) == """\
graph shared(%x: f32[2,6]) -> (%r1, %r2) {
  %r1: f32[3,4] = reshape(%x) {shape=[3, 4]}
  %r2: f32[12] = reshape(%x) {shape=[12]}
  return %r1, %r2
}
"""


def test_integer_and_cast_identities():
    b = GraphBuilder("ints")
    x = b.input("x", TensorType((3,), "i64"))
    one = b.constant(np.ones((1,), np.int64), "one")
    y = b.op("mul", [x, one], name="y")
    f = b.op("cast", [y], {"dtype": "f32"}, name="f")
    b.output(f)
    result = run_pass(SimplifyAlgebra(), b.build())
    assert print_graph(result.graph) == """\
graph ints(%x: i64[3]) -> (%f) {
  %f: f32[3] = cast(%x) {dtype="f32"}
  return %f
}
"""


def test_nothing_to_simplify():
    b = GraphBuilder("plain")
    x = b.input("x", TensorType((2, 3)))
    b.output(b.op("permute", [x], {"perm": [1, 0]}))
    g = b.build()
    result = run_pass(SimplifyAlgebra(), g)
    assert not result.changed
    assert print_graph(result.graph) == print_graph(g)


def dilated_convs():
    """A 3x3 conv of dilation 36 on a 28x28 map (only its centre tap reads the image), one of
    dilation 24 (every tap reads some of it), and a 1-d conv whose two outer taps read only
    padding."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("dilated")
    x = b.input("x", TensorType((1, 4, 28, 28)))
    y = b.input("y", TensorType((1, 4, 12)))
    w2 = b.constant(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), "w2")
    w1 = b.constant(rng.standard_normal((2, 4, 5)).astype(np.float32), "w1")
    a = b.op("conv", [x, w2], {"padding": 36, "dilation": 36}, name="aspp36")
    c = b.op("conv", [x, w2], {"padding": 24, "dilation": 24}, name="aspp24")
    d = b.op("conv", [y, w1], {"padding": 20, "dilation": 10}, name="wide1d")
    b.output(a, c, d)
    return b.build()


def test_dead_conv_taps_are_dropped():
    from kiln.backends.reference import run_graph

    g = dilated_convs()
    result = run_pass(SimplifyAlgebra(), g)
    assert result.changed
    text = print_graph(result.graph)
    assert ("%aspp36: f32[1,2,28,28] = conv(%x, %aspp36.live) {stride=1, padding=[0, 0], "
            "dilation=[1, 1], groups=1}") in text
    assert ("%aspp24: f32[1,2,28,28] = conv(%x, %w2) {stride=1, padding=24, dilation=24, "
            "groups=1}") in text
    assert ("%wide1d: f32[1,2,12] = conv(%y, %wide1d.live) {stride=1, padding=[10], "
            "dilation=[10], groups=1}") in text
    assert result.graph.types["aspp36.live"].shape == (2, 4, 1, 1)
    np.testing.assert_array_equal(result.graph.constants["wide1d.live"],
                                  g.constants["w1"][:, :, 1:4])
    inputs = [np.random.default_rng(1).standard_normal(g.types[v].shape).astype(np.float32)
              for v in g.inputs]
    for want, got in zip(run_graph(g, inputs), run_graph(result.graph, inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
