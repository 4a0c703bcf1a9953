"""Common-subexpression elimination: golden IR, purity, outputs unchanged."""

from __future__ import annotations

import numpy as np
from passes_testlib import fingerprint, run_pass

from kiln.backends.reference import run_graph
from kiln.ir import GraphBuilder, TensorType, print_graph
from kiln.passes import CommonSubexpressionElimination


def graph_with_repeats():
    b = GraphBuilder("repeats")
    x = b.input("x", TensorType((2, 5)))
    w1 = b.constant(np.arange(25, dtype=np.float32).reshape(5, 5), "w1")
    w2 = b.constant(np.arange(25, dtype=np.float32).reshape(5, 5), "w2")
    h1 = b.op("linear", [x, w1], name="h1", source="m.py:1 fc1(x)")
    h2 = b.op("linear", [x, w2], name="h2", source="m.py:2 fc2(x)")
    # Operands merge first (w2 -> w1, then h2 -> h1), so these merge too; add commutes. The
    # survivor s1 takes the name of the graph output s2 it now stands for.
    s1 = b.op("add", [h1, x], name="s1")
    s2 = b.op("add", [x, h2], name="s2")
    # Same op and operands, other attributes: stays.
    r1 = b.op("reshape", [s1], {"shape": [10]}, name="r1")
    r2 = b.op("reshape", [s2], {"shape": [5, 2]}, name="r2")
    b.output(r1, r2, s2)
    return b.build()


def test_golden():
    result = run_pass(CommonSubexpressionElimination(), graph_with_repeats())
    assert result.changed
    assert print_graph(result.graph) == """\
graph repeats(%x: f32[2,5]) -> (%r1, %r2, %s2) {
  const %w1: f32[5,5]
  %h1: f32[2,5] = linear(%x, %w1) {}  # m.py:1 fc1(x)
  %s2: f32[2,5] = add(%h1, %x) {}
  %r1: f32[10] = reshape(%s2) {shape=[10]}
  %r2: f32[5,2] = reshape(%s2) {shape=[5, 2]}
  return %r1, %r2, %s2
}
"""


def test_input_graph_unchanged():
    g = graph_with_repeats()
    before = fingerprint(g)
    CommonSubexpressionElimination().run(g)
    assert fingerprint(g) == before


def test_constants_differing_in_dtype_shape_or_sign_of_zero_stay_apart():
    b = GraphBuilder("consts")
    x = b.input("x", TensorType((2,)))
    xi = b.input("xi", TensorType((2,), "i32"))
    zeros = [
        b.constant(np.zeros((2,), np.float32), "pz"),
        b.constant(np.array([-0.0, 0.0], np.float32), "nz"),
        b.constant(np.zeros((1, 2), np.float32), "pz2d"),
        b.constant(np.zeros((2,), np.float32), "pz_again"),
    ]
    iz = b.constant(np.zeros((2,), np.int32), "iz")  # the same bytes as pz
    b.output(*[b.op("add", [x, z]) for z in zeros], b.op("add", [xi, iz]))
    result = run_pass(CommonSubexpressionElimination(), b.build())
    # add_3 repeats add; "add" names an output already, so it is not renamed.
    assert print_graph(result.graph) == """\
graph consts(%x: f32[2], %xi: i32[2]) -> (%add, %add_1, %add_2, %add, %add_4) {
  const %pz: f32[2] = [0.0, 0.0]
  const %nz: f32[2] = [-0.0, 0.0]
  const %pz2d: f32[1,2] = [0.0, 0.0]
  const %iz: i32[2] = [0, 0]
  %add: f32[2] = add(%x, %pz) {}
  %add_1: f32[2] = add(%x, %nz) {}
  %add_2: f32[1,2] = add(%x, %pz2d) {}
  %add_4: i32[2] = add(%xi, %iz) {}
  return %add, %add_1, %add_2, %add, %add_4
}
"""


def test_large_constants_merge_by_all_their_bytes_not_a_prefix():
    b = GraphBuilder("big")
    x = b.input("x", TensorType((1000,)))
    base = np.arange(1000, dtype=np.float32)
    late = base.copy()
    late[-1] = -1.0                      # differs after the first 64 bytes only
    names = [b.constant(base, "w"), b.constant(late, "w_late"),
             b.constant(base.copy(), "w_again")]
    b.output(*[b.op("add", [x, w]) for w in names])
    graph = run_pass(CommonSubexpressionElimination(), b.build()).graph
    assert sorted(graph.constants) == ["w", "w_late"]
    assert graph.outputs[2] == graph.outputs[0] != graph.outputs[1]


def test_multi_output_nodes_merge():
    b = GraphBuilder("splits")
    x = b.input("x", TensorType((6,)))
    a = b.op_multi("split", [x], {"axis": 0, "sizes": [2, 4]}, name="a")
    c = b.op_multi("split", [x], {"axis": 0, "sizes": [2, 4]}, name="c")
    b.output(b.op("relu", [a[1]], name="ra"), b.op("relu", [c[1]], name="rc"))
    result = run_pass(CommonSubexpressionElimination(), b.build())
    assert print_graph(result.graph) == """\
graph splits(%x: f32[6]) -> (%ra, %ra) {
  %a: f32[2], %a.1: f32[4] = split(%x) {axis=0, sizes=[2, 4]}
  %ra: f32[4] = relu(%a.1) {}
  return %ra, %ra
}
"""


def test_nothing_to_merge():
    b = GraphBuilder("distinct")
    x = b.input("x", TensorType((3,)))
    b.output(b.op("relu", [x]), b.op("neg", [x]))
    g = b.build()
    result = run_pass(CommonSubexpressionElimination(), g)
    assert not result.changed
    assert print_graph(result.graph) == print_graph(g)


def test_repeated_operand_runs_on_the_reference_backend():
    b = GraphBuilder("twins")
    x = b.input("x", TensorType((2,)))
    s = b.op("add", [b.op("relu", [x]), b.op("relu", [x])], name="s")
    b.output(b.op("neg", [s], name="out"))
    g = b.build()
    out = CommonSubexpressionElimination().run(g).graph
    assert out.nodes[1].inputs == ("relu", "relu")
    x_val = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(run_graph(out, [x_val])[0], run_graph(g, [x_val])[0])
