"""Symbolic shape rules: every op's type rule on dimensions that are named sizes.

For each registered op, a case with dynamic dimensions (``batch``, ``seq``, ``h``): the rule
run on the sizes, then specialized at several values, must equal the rule run on the numbers
(the static rule is the reference). Adding an op without a case here fails
``test_every_op_has_a_symbolic_case``.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir import (
    DType,
    Graph,
    KilnError,
    Node,
    ParseError,
    ShapeError,
    SymDim,
    TensorType,
    VerificationError,
    all_ops,
    bind_sizes,
    get_op,
    infer_types,
    parse_graph,
    print_graph,
    specialize,
    verify,
)
from kiln.ir.sizes import parse_dim, substitute

B = SymDim.named("batch", 1, 64)
S = SymDim.named("seq", 1, 512)
H = SymDim.named("h", 1, 1024)
VALUES = ({"batch": 1, "seq": 1, "h": 1}, {"batch": 3, "seq": 7, "h": 5},
          {"batch": 8, "seq": 512, "h": 32})

f32, f16, u8, i8, i32, i64, b8 = (DType.f32, DType.f16, DType.u8, DType.i8, DType.i32,
                                  DType.i64, DType.bool)


def T(*shape, dtype=f32) -> TensorType:
    return TensorType(shape, dtype)


UNARY_ATTRS = {"cast": {"dtype": "i32"}, "clamp": {"min": -1.0, "max": 1.0}}
SEQ = T(B, S, 16)

CASES: dict[str, list[tuple[list[TensorType], dict]]] = {}


def case(op: str, ins: list[TensorType], **attrs) -> None:
    CASES.setdefault(op, []).append((ins, attrs))


for _op, _d in all_ops().items():
    if _op == "dequantize":
        case(_op, [T(B, S, 16, dtype=u8)], scale=0.1, zero_point=128)
    elif _d.kind == "elementwise" and _d.inputs == ("x",):
        if _op == "logical_not":
            case(_op, [T(B, S, 16, dtype=b8)])
        elif _op == "quantize":
            case(_op, [SEQ], scale=0.1, zero_point=128)
        else:
            case(_op, [SEQ], **UNARY_ATTRS.get(_op, {}))
    elif _d.kind == "elementwise" and _d.inputs == ("a", "b"):
        case(_op, [SEQ, T(1, S, 1)])
        case(_op, [T(B, 1, 16), T(S, 1)])
case("where", [T(B, 1, 16, dtype=b8), SEQ, T(16)])
case("matmul", [T(B, 4, S, 16), T(B, 4, 16, S)])
case("matmul", [T(B * S, 64), T(64, 32)])
case("linear", [T(B, S, 64), T(32, 64), T(32)])
case("linear", [T(B * S, 64), T(32, 64, dtype=f16)])
case("conv", [T(B, 3, 32, 32), T(8, 3, 3, 3), T(8)], stride=2, padding=1)
case("conv", [T(B, 3, H, H), T(8, 3, 3, 3)], padding=1)           # dynamic spatial, stride 1
case("conv", [T(B, 4, 2 * H, 2 * H), T(8, 4, 2, 2)], stride=2)    # the stride divides
case("conv_transpose", [T(B, 8, H, H), T(8, 4, 2, 2)], stride=2)
case("attention", [T(B, 4, S, 16), T(B, 4, S, 16), T(B, 4, S, 8), T(B, 1, 1, S, dtype=b8)])
case("attention", [T(B, 4, 1, 16), T(B, 4, S + 1, 16), T(B, 4, S + 1, 16)])   # a decode step
case("embedding", [T(B, S, dtype=i64), T(100, 16)])
case("take", [T(100, 16), T(B, S, dtype=i64)], axis=0)
case("gather_elements", [SEQ, T(B, S, 4, dtype=i64)], axis=2)
case("argmax", [SEQ], axis=2)
case("argmin", [SEQ], axis=1, keepdim=True)
case("topk", [SEQ], k=3)
case("cumsum", [T(B, S, dtype=i64)], axis=1)
case("resize", [T(B, 3, 8, 8)], sizes=(16, 16), mode="linear")
case("softmax", [T(B, 4, S, S)], axis=-1)
case("log_softmax", [T(B, 4, S, S)], axis=1)
case("batch_norm", [T(B, 8, 4, 4), T(8), T(8), T(8), T(8)])
case("layer_norm", [T(B, S, 64), T(64), T(64)])
case("group_norm", [T(B, 8, H, 4), T(8), T(8)], groups=2)
case("max_pool", [T(B, 8, 8, 8)], kernel=(2, 2))
case("max_pool", [T(B, 8, H, H)], kernel=(3, 3), stride=(1, 1), padding=(1, 1))
case("avg_pool", [T(B, 8, 2 * H, 8)], kernel=(2, 2))
case("adaptive_avg_pool", [T(B, 8, H, H)], output_size=(1, 1))
case("qlinear", [T(B, S, 64, dtype=u8), T(32, 64, dtype=i8), T(32, dtype=i32), T(32)])
case("qconv", [T(B, 8, 8, 16, dtype=u8), T(8, 3, 3, 16, dtype=i8), T(8, dtype=i32), T(8)],
     padding=1)
case("linear_w8", [T(B, S, 64), T(32, 64, dtype=i8), T(32), T(32)])
case("dynamic_qlinear", [T(B, S, 64), T(32, 64, dtype=i8), T(32)])
case("lstm_seq", [T(S, B, 64), T(64, 16), T(1, B, 16), T(1, B, 16)])
case("gru_seq", [T(S, B, 48), T(48, 16), T(48), T(1, B, 16)])
for _op in ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min"):
    case(_op, [SEQ], axes=(2,))
    case(_op, [SEQ], axes=(1,), keepdim=True)
case("reshape", [T(B, S, 64)], shape=(B, S, 4, 16))
case("reshape", [T(B, S, 64)], shape=(B * S, 64))
case("permute", [T(B, S, 4, 16)], perm=(0, 2, 1, 3))
case("slice", [T(512, 64)], axis=0, start=0, end=S)                 # a position table
case("slice", [T(B, S + 1, 16)], axis=1, start=1, end=S + 1)
case("slice", [SEQ], axis=2, start=1, end=16, step=2)
case("concat", [T(B, 4, S, 16), T(B, 4, 1, 16)], axis=2)            # a KV cache grows
case("split", [T(B, S, 48)], axis=2, sizes=(16, 16, 16))
case("split", [T(B, S + 1, 16)], axis=1, sizes=(S, 1))
case("expand", [T(1, 1, 16)], shape=(B, S, 16))
case("pad", [SEQ], pads=(0, 0, 0, 2, 1, 1))


def _at(t: TensorType, sizes) -> TensorType:
    return TensorType(substitute(t.shape, sizes), t.dtype)


def test_every_op_has_a_symbolic_case() -> None:
    assert set(CASES) == set(all_ops()), sorted(set(all_ops()) ^ set(CASES))


@pytest.mark.parametrize("op,index", [(op, i) for op in sorted(CASES)
                                      for i in range(len(CASES[op]))])
def test_symbolic_rule_matches_static_rule(op: str, index: int) -> None:
    ins, attrs = CASES[op][index]
    attrs = get_op(op).normalize_attrs(attrs)
    sym = infer_types(op, ins, attrs)
    # The sizes reach the outputs: the rule propagated them, it did not drop them.
    assert any(not t.is_static for t in sym), (op, [str(t) for t in sym])
    for sizes in VALUES:
        static = infer_types(op, [_at(t, sizes) for t in ins], substitute(attrs, sizes))
        assert [_at(t, sizes) for t in sym] == static, (op, sizes)


def test_size_arithmetic_and_text() -> None:
    assert str(B * S * 768) == "768*batch*seq"
    assert (B * S * 768) // (B * S) == 768
    assert (2 * H + 1) // 2 == H
    assert B + 1 - B == 1 and isinstance(B - B, int)
    assert S <= 512 and not S > 512 and S >= 1
    assert (S + 1).interval() == (2, 513)
    bounds = {"batch": (1, 64), "seq": (1, 512)}
    for d in (B, B * S, 2 * B * S + 1, S * S - S, 3 - S + 512, -B + 70):
        assert parse_dim(str(d), bounds) == d
    assert B != SymDim.named("other") and B != 1 and hash(B) == hash(B * 1)


@pytest.mark.parametrize("text", ["2**3", "batch+", "__import__('os')", "1e5", "batch^99",
                                  "(batch)", "batch*", "seq*", "x", "9" * 20, "b" * 300])
def test_bad_dimension_text_is_refused(text: str) -> None:
    with pytest.raises(ShapeError):
        parse_dim(text, {"batch": (1, 64), "b" * 300: (1, 2)})


def test_undecidable_rules_name_the_sizes() -> None:
    with pytest.raises(ShapeError, match="do not broadcast"):
        infer_types("add", [T(B, 16), T(3, 16)], {})
    # A table of 100 rows cannot be sliced to seq <= 512 rows for every seq.
    with pytest.raises(ShapeError, match=r"seq .*1 <= seq <= 512"):
        infer_types("slice", [T(100, 64)], get_op("slice").normalize_attrs(
            {"axis": 0, "start": 0, "end": S}))
    # A strided window over a dynamic dimension has no polynomial size.
    with pytest.raises(ShapeError, match="no formula"):
        infer_types("conv", [T(B, 3, H, H), T(8, 3, 3, 3)],
                    get_op("conv").normalize_attrs({"stride": 2, "padding": 1}))
    with pytest.raises(ShapeError, match="dynamic"):
        int(B)
    with pytest.raises(ShapeError, match="negative"):
        TensorType((S - 3,))


def _decoder_step() -> Graph:
    """A symbolic graph: x [batch, 1, 16] attends over a cache [batch, past, 16] grown by one."""
    past = SymDim.named("past", 1, 511)
    b = SymDim.named("batch", 1, 64)
    g = Graph("step", inputs=["x", "cache"], outputs=["y", "grown"],
              sizes={"batch": (1, 64), "past": (1, 511)})
    g.types.update(x=T(b, 1, 16), cache=T(b, past, 16))
    w = np.ones((16, 16), np.float32)
    w.setflags(write=False)
    g.constants["w"] = w
    g.types["w"] = T(16, 16)
    g.nodes += [
        Node("concat", ("cache", "x"), ("grown",), {"axis": 1}),
        Node("linear", ("grown", "w"), ("k",)),
        Node("attention", ("x", "k", "grown"), ("a",), {"causal": False, "scale": None}),
        Node("reshape", ("a",), ("y",), {"shape": (b, 16)}),
    ]
    g.types.update(grown=T(b, past + 1, 16), k=T(b, past + 1, 16), a=T(b, 1, 16), y=T(b, 16))
    return g


def test_symbolic_graph_verifies_prints_parses_and_specializes() -> None:
    g = _decoder_step()
    verify(g)
    text = print_graph(g)
    assert "size batch in 1..64" in text and "f32[batch,past+1,16]" in text
    assert '{"size": "batch"}' in text
    back = parse_graph(text, constants=g.constants)
    verify(back)
    assert print_graph(back) == text and back.sizes == g.sizes
    s = specialize(g, {"batch": 3, "past": 10})
    verify(s)
    assert s.is_static and not g.is_static
    assert str(s.types["grown"]) == "f32[3,11,16]"
    assert s.nodes[-1].attrs["shape"] == (3, 16)
    part = specialize(g, {"past": 10})             # batch stays a size
    verify(part)
    assert str(part.types["grown"]) == "f32[batch,11,16]" and part.sizes == {"batch": (1, 64)}


def test_bind_sizes_checks_the_guards() -> None:
    g = _decoder_step()
    assert bind_sizes(g, [(3, 1, 16), (3, 10, 16)]) == {"batch": 3, "past": 10}
    with pytest.raises(KilnError, match=r"input %cache dimension 0 is 4.*size batch = 3"):
        bind_sizes(g, [(3, 1, 16), (4, 10, 16)])
    with pytest.raises(KilnError, match=r"input %x dimension 1 is 2; it is static"):
        bind_sizes(g, [(3, 2, 16), (3, 10, 16)])
    with pytest.raises(KilnError, match=r"size past = 600 \(input %cache dimension 1\) is "
                                        r"outside its bounds \[1, 511\]"):
        bind_sizes(g, [(3, 1, 16), (3, 600, 16)])
    with pytest.raises(KilnError, match="outside its bounds"):
        specialize(g, {"batch": 0})


def test_verifier_refuses_undeclared_or_mismatched_sizes() -> None:
    g = _decoder_step()
    g.sizes.pop("past")
    with pytest.raises(VerificationError, match="does not declare"):
        verify(g)
    g = _decoder_step()
    g.sizes["batch"] = (1, 32)
    with pytest.raises(VerificationError, match="bounds"):
        verify(g)
    text = print_graph(_decoder_step())
    with pytest.raises(ParseError):
        parse_graph(text.replace("size past in 1..511", "size past in 0..511"),
                    constants=_decoder_step().constants)
    with pytest.raises(ParseError, match="not declared"):
        parse_graph(text.replace("  size past in 1..511\n", ""),
                    constants=_decoder_step().constants)


def test_static_graph_text_is_unchanged() -> None:
    g = Graph("s", inputs=["x"], outputs=["y"], types={"x": T(2, 3), "y": T(2, 3)},
              nodes=[Node("relu", ("x",), ("y",))])
    assert print_graph(g) == ("graph s(%x: f32[2,3]) -> (%y) {\n  %y: f32[2,3] = relu(%x) {}\n"
                              "  return %y\n}\n")


# ---- rows of a size ----------------------------------------------------------------------------
def test_every_op_says_whether_it_keeps_rows_apart() -> None:
    from kiln.ir.symbolic import ROW_RULES

    missing = {op for op, d in all_ops().items() if d.kind != "elementwise"} - set(ROW_RULES)
    assert not missing, sorted(missing)


def _one_node(op: str, ins: list[TensorType], outs: int = 1, **attrs) -> Graph:
    attrs = get_op(op).normalize_attrs(attrs)
    types = infer_types(op, ins, attrs)
    names = [f"x{i}" for i in range(len(ins))]
    g = Graph("g", inputs=names, outputs=[f"y{k}" for k in range(len(types))],
              sizes={"batch": (1, 64), "seq": (1, 512)})
    g.types.update(zip(names, ins))
    g.types.update({f"y{k}": t for k, t in enumerate(types)})
    g.nodes.append(Node(op, tuple(names), tuple(g.outputs), attrs))
    verify(g)
    return g


@pytest.mark.parametrize("op,ins,attrs", [
    ("conv", [T(B, 3, 8, 8), T(4, 3, 3, 3)], {}),
    ("linear", [T(B, S, 8), T(4, 8)], {}),
    ("matmul", [T(B, 8), T(8, 4)], {}),
    ("matmul", [T(B, 4, 8), T(B, 8, 4)], {}),
    ("softmax", [T(B, 4)], {"axis": -1}),
    ("reduce_sum", [T(B, 4, 3)], {"axes": (1, 2)}),
    ("reshape", [T(B, 4, 3)], {"shape": (B, 12)}),
    ("permute", [T(B, 4, 3)], {"perm": (0, 2, 1)}),
    ("concat", [T(B, 4), T(B, 2)], {"axis": 1}),
    ("take", [T(100, 8), T(B, S, dtype=i64)], {"axis": 0}),
    ("layer_norm", [T(B, 8)], {}),
    ("attention", [T(B, 2, S, 8), T(B, 2, S, 8), T(B, 2, S, 8)], {}),
])
def test_rowwise_nodes(op: str, ins, attrs) -> None:
    from kiln.ir.symbolic import rows_independent

    assert rows_independent(_one_node(op, ins, **attrs), "batch") is None


@pytest.mark.parametrize("op,ins,attrs,why", [
    ("softmax", [T(B, 4)], {"axis": 0}, "axis is the rows' axis"),
    ("reduce_sum", [T(B, 4)], {"axes": None}, "leading dimension"),
    ("reduce_max", [T(B, 4)], {"axes": (0,), "keepdim": True}, "leading dimension"),
    ("matmul", [T(4, B), T(B, 4)], {}, "leading dimension"),
    ("attention", [T(4, 8), T(B, 8), T(B, 8)], {}, "leading dimension"),   # S = batch
    ("layer_norm", [T(B, 8)], {"normalized_ndim": 2}, "normalizes over the rows"),
    ("permute", [T(B, 4)], {"perm": (1, 0)}, "leading dimension"),
    ("reshape", [T(B, 4)], {"shape": (4 * B,)}, "leading dimension"),
    ("concat", [T(B, 4), T(B, 4)], {"axis": 0}, "leading dimension"),
    ("take", [T(B, 8), T(B, dtype=i64)], {"axis": 0}, "indexes the rows"),
    ("lstm_seq", [T(S, B, 64), T(64, 16), T(1, B, 16), T(1, B, 16)], {}, "leading dimension"),
    # The steps as the leading size: the recurrence carries state from row to row.
    ("lstm_seq", [T(B, 2, 64), T(64, 16), T(1, 2, 16), T(1, 2, 16)], {}, "recurrence"),
    ("gru_seq", [T(B, 2, 48), T(48, 16), T(48), T(1, 2, 16)], {}, "recurrence"),
    # Dynamic quantization: one scale from the largest magnitude of all rows.
    ("dynamic_qlinear", [T(B, 8), T(4, 8, dtype=i8), T(4)], {}, "one scale"),
])
def test_nodes_that_mix_rows_are_named(op: str, ins, attrs, why: str) -> None:
    from kiln.ir.symbolic import rows_independent

    g = _one_node(op, ins, **attrs)
    reason = rows_independent(g, "batch")
    assert reason is not None and why in reason, reason
