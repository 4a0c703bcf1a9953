"""The text form: print -> parse -> print is the identity, and broken text is a ParseError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.ir import (
    DType,
    Graph,
    GraphBuilder,
    Node,
    ParseError,
    TensorType,
    parse_graph,
    print_graph,
    verify,
)
from kiln.ir.text import INLINE_LIMIT


def round_trip(g: Graph) -> Graph:
    """Print ``g``, parse it back (large constants from ``g``), check the text is stable and
    the parsed graph equals ``g``; return the parsed graph."""
    text = print_graph(g)
    parsed = parse_graph(text, constants=g.constants)
    assert print_graph(parsed) == text
    assert parsed.name == g.name
    assert (parsed.inputs, parsed.outputs) == (g.inputs, g.outputs)
    assert parsed.nodes == g.nodes
    assert parsed.types == g.types
    assert parsed.constants.keys() == g.constants.keys()
    for name, array in g.constants.items():
        assert parsed.constants[name].dtype == array.dtype
        np.testing.assert_array_equal(parsed.constants[name], array)
    verify(parsed)
    return parsed


def mixed_graph() -> Graph:
    b = GraphBuilder("net.v2")
    x = b.input("x.in", TensorType((2, 6)))
    w = b.constant(np.arange(24, dtype=np.float32).reshape(4, 6) / 7, "fc.weight")  # not inline
    bias = b.constant(np.array([0.1, -2.5e-8, 3e38, -0.0], np.float32), "fc.bias")
    scale = b.constant(np.float32(1.5), "scale")  # a scalar
    idx = b.constant(np.array([[0, 1], [1, 1]], np.int64), "idx")
    flags = b.constant(np.array([True, False, True, True]), "flags")
    empty = b.constant(np.zeros((0, 3), np.float32), "empty")
    y = b.op("linear", [x, w, bias], source="model.py:12 y = self.fc(x)  # fc {layer} \"q\"")
    y = b.op("mul", [y, scale], source="'single' and \"double\" quotes, a } and a {")
    halves = b.op_multi("split", [y], {"axis": 1, "sizes": [1, 3]}, name="parts")
    act = b.op("gelu", [halves[1]], {"approximate": "tanh"})
    act = b.op("clamp", [act], {"min": None, "max": 6.0})
    act = b.op("leaky_relu", [act], {"negative_slope": 1e-3})
    act = b.op("pad", [act], {"pads": [0, 0, -1, 2], "value": float("-inf")})
    sel = b.op("where", [flags, act, b.op("neg", [act])])
    emb = b.op("embedding", [idx, y])
    ints = b.op("cast", [b.op("reduce_sum", [emb], {"axes": [-1], "keepdim": True})],
                {"dtype": "i32"})
    b.output(sel, halves[0], ints, b.op("concat", [empty, empty], {"axis": 0}))
    return b.build()


def test_round_trip_mixed_graph():
    g = mixed_graph()
    text = print_graph(g)
    # Small constants are printed inline, large ones only by type.
    assert "const %fc.weight: f32[4,6]\n" in text
    assert "const %scale: f32[] = [1.5]" in text
    assert "const %flags: bool[4] = [true, false, true, true]" in text
    assert "const %empty: f32[0,3] = []" in text
    assert "approximate=\"tanh\"" in text and "min=null" in text
    round_trip(g)


def test_round_trip_keeps_sources_with_special_characters():
    parsed = round_trip(mixed_graph())
    sources = [n.source for n in parsed.nodes if n.source]
    assert sources == ["model.py:12 y = self.fc(x)  # fc {layer} \"q\"",
                       "'single' and \"double\" quotes, a } and a {"]


def test_print_without_sources_leaves_out_only_the_comments():
    g = mixed_graph()
    with_sources, without = print_graph(g), print_graph(g, sources=False)
    assert "model.py:12" in with_sources and "#" not in without
    assert [line.split("  # ")[0] for line in with_sources.splitlines()] == without.splitlines()
    moved = parse_graph(with_sources.replace("model.py:12", "<stdin>:40"), dict(g.constants))
    assert print_graph(moved) != with_sources
    assert print_graph(moved, sources=False) == without


def test_round_trip_attr_strings_with_delimiters():
    b = GraphBuilder()
    x = b.input("x", TensorType((3,)))
    # Attribute strings may hold the characters the parser splits on.
    node = Node("gelu", (x,), ("y",), {"approximate": 'a, "b" = {c} [d] # e \\ f'})
    b.add_node(node, [TensorType((3,))])
    b.output("y")
    g = b.build(check=False)
    parsed = parse_graph(print_graph(g))
    assert parsed.nodes[0].attrs == node.attrs
    assert print_graph(parsed) == print_graph(g)


def test_round_trip_multi_output_and_nested_lists():
    b = GraphBuilder("split3")
    x = b.input("x", TensorType((1, 2, 7, 5)))
    a, c, d = b.op_multi("split", [x], {"axis": -2, "sizes": [2, 0, 5]})
    p = b.op("max_pool", [d], {"kernel": [2, 2], "stride": None, "padding": [1, 0],
                               "ceil_mode": True})
    b.output(a, c, p)
    g = round_trip(b.build())
    assert len(g.nodes[0].outputs) == 3


def test_round_trip_empty_signature():
    b = GraphBuilder("consts_only")
    c = b.constant(np.array([1, 2, 3], np.int32))
    b.output(b.op("neg", [c]))
    round_trip(b.build())
    round_trip(Graph("nothing"))


FLOAT_VALUES = st.floats(width=32, allow_nan=False) | st.sampled_from(
    [float("inf"), float("-inf"), 0.0, -0.0, 1e-45, 3.4028235e38])


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(values=st.lists(FLOAT_VALUES, min_size=1, max_size=INLINE_LIMIT),
       dtype=st.sampled_from(["f32", "f16"]))
def test_inline_floats_are_bit_exact(values, dtype):
    with np.errstate(over="ignore"):
        array = np.array(values, dtype=DType(dtype).numpy)
    b = GraphBuilder()
    c = b.constant(array)
    b.output(b.op("abs", [c]))
    parsed = round_trip(b.build())
    assert parsed.constants[c].tobytes() == array.tobytes()


def test_inline_nan_round_trips():
    b = GraphBuilder()
    c = b.constant(np.array([np.nan, 1.0], np.float32))
    b.output(b.op("abs", [c]))
    g = b.build()
    parsed = parse_graph(print_graph(g))
    assert np.isnan(parsed.constants[c][0]) and parsed.constants[c][1] == 1.0
    assert print_graph(parsed) == print_graph(g)


@pytest.mark.parametrize("dtype", ["i8", "u8", "i32", "i64"])
def test_inline_integer_extremes(dtype):
    info = np.iinfo(DType(dtype).numpy)
    b = GraphBuilder()
    c = b.constant(np.array([info.min, -1 if info.min else 0, info.max], DType(dtype).numpy))
    b.output(b.op("abs", [c]))
    round_trip(b.build())


def test_parse_hand_written_text():
    text = """
        // comments and blank lines are skipped
        graph mlp(%x: f32[1,4]) -> (%out) {
          const %w: f32[2,4]
          const %b: f32[2] = [0.5, -1.0]
          %h: f32[1,2] = linear(%x, %w, %b) {}  # model.py:3
          %out: f32[1,2] = softmax(%h) {axis=-1}
          return %out
        }
    """
    g = parse_graph(text, constants={"w": np.ones((2, 4), np.float32)})
    verify(g)
    assert [n.op for n in g.nodes] == ["linear", "softmax"]
    assert g.nodes[0].source == "model.py:3"
    assert g.nodes[1].attrs == {"axis": -1}
    round_trip(g)


GOOD = """graph g(%x: f32[2]) -> (%y) {
  const %c: f32[2] = [1.0, 2.0]
  %y: f32[2] = add(%x, %c) {}
  return %y
}
"""


@pytest.mark.parametrize(("broken", "message"), [
    ("", "empty"),
    ("// only a comment\n", "empty"),
    (GOOD.replace("graph g(", "graf g("), "expected 'graph"),
    (GOOD.replace("%x: f32[2]) ->", "x: f32[2]) ->"), "bad graph input"),
    (GOOD.replace("%x: f32[2]) ->", "%x: f64[2]) ->"), "bad type"),
    (GOOD[:GOOD.rindex("}")], "no closing"),
    (GOOD.replace("  return %y\n", ""), "no 'return'"),
    (GOOD.replace("return %y", "return %x"), "does not match"),
    (GOOD.replace("[1.0, 2.0]", "[1.0, 2.0, 3.0]"), "bad values"),
    (GOOD.replace("[1.0, 2.0]", "[1.0, two]"), "bad values"),
    (GOOD.replace(" = [1.0, 2.0]", ""), "no values for constant"),
    (GOOD.replace("const %c: f32[2]", "const c: f32[2]"), "bad constant"),
    (GOOD.replace("add(%x, %c)", "add(x, %c)"), "bad operand"),
    (GOOD.replace("%y: f32[2] = add", "%y: f32[2] add"), "expected '%out"),
    (GOOD.replace("%y: f32[2] = add", "%y: f32[2 = add"), "bad output"),
    (GOOD.replace("%y: f32[2] = add", "y: f32[2] = add"), "bad output"),
    (GOOD.replace("{}\n", "{axis=1\n"), "unclosed"),
    (GOOD.replace("{}\n", "{axis}\n"), "has no '='"),
    (GOOD.replace("{}\n", "{axis=[1,]}\n"), "bad value for attribute"),
    (GOOD.replace("{}\n", "{} trailing\n"), "unexpected text"),
])
def test_broken_text_is_a_parse_error(broken, message):
    with pytest.raises(ParseError, match=message):
        parse_graph(broken)


def test_supplied_constant_must_match_its_declared_type():
    text = GOOD.replace(" = [1.0, 2.0]", "")
    with pytest.raises(ParseError, match="text says"):
        parse_graph(text, constants={"c": np.zeros(3, np.float32)})
    g = parse_graph(text, constants={"c": np.zeros(2, np.float32)})
    assert not g.constants["c"].flags.writeable
