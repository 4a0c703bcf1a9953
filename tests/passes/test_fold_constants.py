"""Constant folding: golden IR, purity, outputs unchanged, size cap."""

from __future__ import annotations

import numpy as np
from passes_testlib import fingerprint, run_pass

from kiln.ir import GraphBuilder, TensorType, print_graph
from kiln.passes import FoldConstants, PassContext


def graph_with_constant_subexpressions():
    b = GraphBuilder("consts")
    x = b.input("x", TensorType((2, 3)))
    a = b.constant(np.array([1.0, 2.0, 3.0], np.float32), "a")
    two = b.constant(np.array(2.0, np.float32), "two")
    scaled = b.op("mul", [a, two], name="scaled", source="m.py:4 a * 2")
    shifted = b.op("add", [scaled, two], name="shifted")
    y = b.op("add", [x, shifted], name="y", source="m.py:5 x + shifted")
    # Multi-output: both pieces become constants named like the outputs.
    parts = b.op_multi("split", [a], {"axis": 0, "sizes": [1, 2]}, name="parts")
    z = b.op("mul", [y, parts[0]], name="z")
    b.output(z, parts[1])
    return b.build()


def test_golden():
    g = graph_with_constant_subexpressions()
    result = run_pass(FoldConstants(), g)
    assert result.changed
    assert print_graph(result.graph) == """\
graph consts(%x: f32[2,3]) -> (%z, %parts.1) {
  const %shifted: f32[3] = [4.0, 6.0, 8.0]
  const %parts: f32[1] = [1.0]
  const %parts.1: f32[2] = [2.0, 3.0]
  %y: f32[2,3] = add(%x, %shifted) {}  # m.py:5 x + shifted
  %z: f32[2,3] = mul(%y, %parts) {}
  return %z, %parts.1
}
"""


def test_input_graph_unchanged():
    g = graph_with_constant_subexpressions()
    before = fingerprint(g)
    FoldConstants().run(g)
    assert fingerprint(g) == before


def test_nothing_to_fold():
    b = GraphBuilder("plain")
    x = b.input("x", TensorType((4,)))
    b.output(b.op("relu", [x]))
    g = b.build()
    result = run_pass(FoldConstants(), g)
    assert not result.changed
    assert print_graph(result.graph) == print_graph(g)


def expand_graph(size: int):
    b = GraphBuilder("expand")
    x = b.input("x", TensorType((size,)))
    one = b.constant(np.ones((1,), np.float32), "one")
    big = b.op("expand", [one], {"shape": [size]}, name="big")
    b.output(b.op("add", [x, big], name="y"))
    return b.build()


def test_does_not_blow_up_a_small_constant():
    g = expand_graph(100_000)
    result = run_pass(FoldConstants(), g)
    assert not result.changed
    assert [n.op for n in result.graph.nodes] == ["expand", "add"]


def test_folds_below_the_cap_and_the_cap_is_an_option():
    g = expand_graph(1000)
    assert [n.op for n in run_pass(FoldConstants(), g).graph.nodes] == ["add"]
    ctx = PassContext(options={"fold_constants.max_elements": 10})
    assert not run_pass(FoldConstants(), g, ctx).changed


def test_op_error_is_left_for_run_time():
    b = GraphBuilder("bad_index")
    idx = b.constant(np.array([7], np.int64), "idx")
    table = b.constant(np.zeros((3, 2), np.float32), "table")
    x = b.input("x", TensorType((1, 2)))
    e = b.op("embedding", [idx, table], name="e")
    b.output(b.op("add", [x, e]))
    g = b.build()
    result = FoldConstants().run(g)
    assert not result.changed
    assert [n.op for n in result.graph.nodes] == ["embedding", "add"]


def test_folds_integer_and_bool_ops():
    b = GraphBuilder("ints")
    x = b.input("x", TensorType((3,), "i64"))
    a = b.constant(np.array([1, 5, 3], np.int64), "a")
    three = b.constant(np.array(3, np.int64), "three")
    mask = b.op("gt", [a, three], name="mask")
    picked = b.op("where", [mask, a, three], name="picked")
    b.output(b.op("add", [x, picked], name="y"))
    result = run_pass(FoldConstants(), b.build())
    assert print_graph(result.graph) == """\
graph ints(%x: i64[3]) -> (%y) {
  const %picked: i64[3] = [3, 5, 3]
  %y: i64[3] = add(%x, %picked) {}
  return %y
}
"""
