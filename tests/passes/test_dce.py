"""Dead-code elimination: golden IR, purity, outputs unchanged."""

from __future__ import annotations

import numpy as np
from passes_testlib import fingerprint, run_pass

from kiln.ir import GraphBuilder, TensorType, print_graph
from kiln.passes import DeadCodeElimination


def graph_with_dead_code():
    b = GraphBuilder("dead")
    x = b.input("x", TensorType((2, 6)))
    b.input("unused", TensorType((3,)))
    w = b.constant(np.full((6,), 2.0, np.float32), "w")
    b.constant(np.zeros((2,), np.float32), "dead_const")
    y = b.op("mul", [x, w], name="y", source="m.py:1 y = x * w")
    d1 = b.op("relu", [x], name="d1")
    b.op("neg", [d1], name="d2")
    # A split with one output used stays whole; one with no output used goes.
    s = b.op_multi("split", [y], {"axis": 1, "sizes": [2, 4]}, name="s")
    b.op_multi("split", [y], {"axis": 1, "sizes": [3, 3]}, name="t")
    b.output(s[1])
    return b.build()


def test_golden():
    g = graph_with_dead_code()
    result = run_pass(DeadCodeElimination(), g)
    assert result.changed
    assert print_graph(result.graph) == """\
graph dead(%x: f32[2,6], %unused: f32[3]) -> (%s.1) {
  const %w: f32[6] = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
  %y: f32[2,6] = mul(%x, %w) {}  # m.py:1 y = x * w
  %s: f32[2,2], %s.1: f32[2,4] = split(%y) {axis=1, sizes=[2, 4]}
  return %s.1
}
"""


def test_input_graph_unchanged():
    g = graph_with_dead_code()
    before = fingerprint(g)
    DeadCodeElimination().run(g)
    assert fingerprint(g) == before


def test_no_dead_code_reports_unchanged():
    g = graph_with_dead_code()
    once = DeadCodeElimination().run(g).graph
    again = run_pass(DeadCodeElimination(), once)
    assert not again.changed
    assert print_graph(again.graph) == print_graph(once)


def test_graph_output_that_is_an_input_or_constant():
    b = GraphBuilder("passthrough")
    x = b.input("x", TensorType((2,)))
    c = b.constant(np.arange(2, dtype=np.float32), "c")
    b.op("add", [x, c], name="dead")
    b.output(x, c)
    result = run_pass(DeadCodeElimination(), b.build())
    assert print_graph(result.graph) == """\
graph passthrough(%x: f32[2]) -> (%x, %c) {
  const %c: f32[2] = [0.0, 1.0]
  return %x, %c
}
"""
