"""The rewrite driver: fixed point, cycle detection, rule contracts, use counts, names."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir import GraphBuilder, KilnError, TensorType, UnsupportedOpError, print_graph
from kiln.passes import RuleTable, rewrite_graph


def chain():
    b = GraphBuilder("chain")
    x = b.input("x", TensorType((2, 3)))
    m = b.op("mul", [x, b.constant(np.full((3,), 2.0, np.float32), "two")], name="m")
    n = b.op("neg", [m], name="n")
    b.output(b.op("relu", [n], name="out"), m)
    return b.build()


def test_cycle_raises_naming_the_rules():
    table = RuleTable("swap")

    @table.rule("mul")
    def swap_operands(node, rw):
        a, b = node.inputs
        return [rw.emit("mul", [b, a], name=node.outputs[0])]

    with pytest.raises(KilnError, match="swap.*after 5 sweeps") as e:
        rewrite_graph(chain(), table, max_sweeps=5)
    assert "swap_operands" in str(e.value)


def test_rules_see_earlier_rewrites():
    # Four negs cancel in pairs; the second pair's rule sees x, the first pair's result.
    table = RuleTable("double_neg")

    @table.rule("neg")
    def cancel(node, rw):
        inner = rw.producer(node.inputs[0])
        return [inner.inputs[0]] if inner is not None and inner.op == "neg" else None

    b = GraphBuilder("negs")
    v = b.input("x", TensorType((2,)))
    for i in range(4):
        v = b.op("neg", [v], name=f"n{i}")
    b.output(b.op("relu", [v], name="out"))
    out, fired = rewrite_graph(b.build(), table)
    assert fired == {"cancel": 2}
    assert print_graph(out) == """\
graph negs(%x: f32[2]) -> (%out) {
  %out: f32[2] = relu(%x) {}
  return %out
}
"""


def test_use_counts_follow_rewrites():
    seen = {}
    table = RuleTable("count")

    @table.rule("neg")
    def drop_neg(node, rw):
        return [node.inputs[0]]

    @table.rule("relu")
    def record(node, rw):
        # After neg(m) -> m, m is read by relu and is a graph output: two uses.
        seen[node.inputs[0]] = rw.num_uses(node.inputs[0])
        return None

    rewrite_graph(chain(), table)
    assert seen["m"] == 2


@pytest.mark.parametrize("mistake, message", [
    ("wrong_type", "undefined or of another type"),
    ("emit_then_decline", "emitted code but returned no replacement"),
    ("foreign_name", "may reuse only an output name"),
    ("wrong_count", "gave 0 values for 1 outputs"),
    ("float64_constant", "float64 has no kiln dtype"),
    ("reads_later_value", "not defined yet"),
])
def test_rule_contract_violations_raise(mistake, message):
    table = RuleTable("broken")

    @table.rule("neg")
    def bad(node, rw):
        if mistake == "wrong_type":
            return [rw.emit("reshape", [node.inputs[0]], {"shape": [6]})]
        if mistake == "emit_then_decline":
            rw.emit("relu", [node.inputs[0]])
            return None
        if mistake == "foreign_name":
            return [rw.emit("relu", [node.inputs[0]], name="x")]
        if mistake == "wrong_count":
            return []
        if mistake == "reads_later_value":
            return [rw.emit("relu", ["out"])]
        return [rw.add_constant(np.zeros((2, 3)))]

    with pytest.raises(KilnError, match=message):
        rewrite_graph(chain(), table)


def test_unknown_op_in_a_table_fails_at_declaration():
    with pytest.raises(UnsupportedOpError):
        RuleTable("typo").rule("rehsape")


def test_no_rule_fires_returns_an_equal_graph():
    table = RuleTable("nothing")
    g = chain()
    out, fired = rewrite_graph(g, table)
    assert not fired
    assert print_graph(out) == print_graph(g)
