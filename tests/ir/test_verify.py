"""The verifier accepts well-formed graphs and names the first broken invariant otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir import (
    DType,
    Graph,
    GraphBuilder,
    KilnError,
    Node,
    TensorType,
    UnsupportedOpError,
    VerificationError,
    verify,
)


def small_graph() -> Graph:
    """x -> relu -> add(w) -> softmax; three nodes, one constant."""
    b = GraphBuilder("small")
    x = b.input("x", TensorType((2, 3)))
    w = b.constant(np.ones((3,), np.float32), "w")
    h = b.op("relu", [x])
    h = b.op("add", [h, w])
    b.output(b.op("softmax", [h], {"axis": -1}))
    return b.build()


def test_well_formed_graph_passes():
    g = small_graph()
    verify(g)
    verify(g.copy())


def test_use_before_def():
    g = small_graph()
    g.nodes = [g.nodes[1], g.nodes[0], g.nodes[2]]
    with pytest.raises(VerificationError, match="used before it is defined") as info:
        verify(g)
    assert info.value.node == "add"


def test_operand_never_defined():
    g = small_graph()
    g.nodes[0] = g.nodes[0].with_(inputs=("ghost",))
    with pytest.raises(VerificationError, match="used before it is defined"):
        verify(g)


def test_node_output_defined_twice():
    g = small_graph()
    g.nodes[1] = g.nodes[1].with_(outputs=("relu",))
    with pytest.raises(VerificationError, match="defined twice"):
        verify(g)


def test_node_output_shadows_input():
    g = small_graph()
    g.nodes[0] = g.nodes[0].with_(outputs=("x",))
    g.nodes[1] = g.nodes[1].with_(inputs=("x", "w"))
    with pytest.raises(VerificationError, match="defined twice"):
        verify(g)


def test_constant_shadows_input():
    g = small_graph()
    g.constants["x"] = np.zeros((2, 3), np.float32)
    with pytest.raises(VerificationError, match="defined twice"):
        verify(g)


def test_wrong_output_type():
    g = small_graph()
    g.types["relu"] = TensorType((2, 3), DType.i32)
    with pytest.raises(VerificationError, match="typed i32"):
        verify(g)
    g.types["relu"] = TensorType((3, 2))
    with pytest.raises(VerificationError):
        verify(g)


def test_type_rule_failure_is_a_verification_error():
    g = small_graph()
    g.types["w"] = TensorType((4,))
    g.constants["w"] = np.ones((4,), np.float32)
    with pytest.raises(VerificationError, match="type rule fails") as info:
        verify(g)
    assert info.value.op == "add"


def test_wrong_number_of_outputs():
    b = GraphBuilder()
    x = b.input("x", TensorType((4,)))
    b.output(*b.op_multi("split", [x], {"axis": 0, "sizes": [1, 3]}))
    g = b.build()
    g.nodes[0] = g.nodes[0].with_(outputs=g.nodes[0].outputs[:1])
    g.outputs = g.outputs[:1]
    g.types.pop("split.1")
    with pytest.raises(VerificationError, match="makes 2 outputs"):
        verify(g)


def test_unknown_op():
    g = small_graph()
    g.nodes[0] = g.nodes[0].with_(op="frobnicate")
    with pytest.raises((UnsupportedOpError, VerificationError), match="frobnicate"):
        verify(g)


def test_unnormalized_attrs():
    g = small_graph()
    # leaky_relu's default negative_slope is missing from the node.
    g.nodes[0] = Node("leaky_relu", g.nodes[0].inputs, g.nodes[0].outputs, {})
    with pytest.raises(VerificationError, match="not normalized"):
        verify(g)


def test_unknown_or_missing_attrs():
    g = small_graph()
    g.nodes[0] = g.nodes[0].with_(attrs={"inplace": True})
    with pytest.raises(KilnError, match="unknown attribute"):
        verify(g)
    g = small_graph()
    g.nodes[2] = g.nodes[2].with_(attrs={})
    with pytest.raises(KilnError, match="missing attribute 'axis'"):
        verify(g)


def test_constant_type_mismatch():
    g = small_graph()
    g.constants["w"] = np.ones((3,), np.int64)
    with pytest.raises(VerificationError, match="holds i64"):
        verify(g)


def test_undefined_graph_output():
    g = small_graph()
    g.outputs = ["softmax", "nowhere"]
    with pytest.raises(VerificationError, match="never defined"):
        verify(g)


def test_value_without_type():
    g = small_graph()
    del g.types["relu"]
    with pytest.raises(VerificationError, match="has no type"):
        verify(g)


def test_type_for_missing_value():
    g = small_graph()
    g.types["stale"] = TensorType((1,))
    with pytest.raises(VerificationError, match="do not exist"):
        verify(g)


def test_builder_prunes_stale_types_and_verifies():
    b = GraphBuilder()
    x = b.input("x", TensorType((2,)))
    b.graph.types["leftover"] = TensorType((1,))
    b.output(b.op("neg", [x]))
    g = b.build()
    assert "leftover" not in g.types
