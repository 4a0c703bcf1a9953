"""Graphs with named sizes: binding a call's shapes to the sizes, and specializing.

A graph whose types use sizes (``f32[batch,128,768]``, kiln.ir.sizes) holds for every value of
those sizes within their bounds (``Graph.sizes``). ``bind_sizes`` reads the sizes off the
shapes of a call's inputs and checks the call against the graph's guards (every dimension
that is a number has that number, every dimension that is a size or a formula of sizes agrees
with the others, every size lies in its bounds); ``specialize`` makes the static graph of one
set of sizes: the types and the attributes (a reshape's target, a slice's end) get numbers,
and every node's type rule is run again on them and must give those numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kiln.ir.errors import KilnError, ShapeError
from kiln.ir.graph import Graph
from kiln.ir.registry import infer_types
from kiln.ir.sizes import SymDim, substitute
from kiln.ir.types import TensorType


def bind_sizes(graph: Graph, shapes: Sequence[Sequence[int]]) -> dict[str, int]:
    """The value of every size of ``graph`` at a call whose inputs have ``shapes``; a
    KilnError naming the input and the dimension when the call does not fit the graph."""
    if len(shapes) != len(graph.inputs):
        raise KilnError(f"graph {graph.name} takes {len(graph.inputs)} inputs, got "
                        f"{len(shapes)}")
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    formulas: list[tuple[SymDim, int, str]] = []
    for name, shape in zip(graph.inputs, shapes):
        want = graph.types[name].shape
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(want):
            raise KilnError(f"input %{name} has rank {len(shape)}, the graph wants "
                            f"{len(want)} ({graph.types[name]})")
        for k, (w, d) in enumerate(zip(want, shape)):
            at = f"input %{name} dimension {k}"
            if isinstance(w, int):
                if w != d:
                    raise KilnError(f"{at} is {d}; it is static and must be {w}",
                                    hint="declare it dynamic to vary it "
                                         "(dynamic={input: {dim: name}})")
            elif w.name is not None:
                if w.name in sizes and sizes[w.name] != d:
                    raise KilnError(f"{at} is {d}, but {where[w.name]} gave size {w.name} = "
                                    f"{sizes[w.name]}", hint="dimensions sharing a size name "
                                                             "must be equal")
                sizes.setdefault(w.name, d)
                where.setdefault(w.name, at)
            else:
                formulas.append((w, d, at))
    missing = set(graph.sizes) - set(sizes)
    if missing:
        raise KilnError(f"sizes {sorted(missing)} of graph {graph.name} are not the "
                        "dimension of any input", hint="give each size an input dimension")
    check_bounds(graph, sizes, where)
    for f, d, at in formulas:
        if f.evaluate(sizes) != d:
            raise KilnError(f"{at} is {d}, but it must be {f} = {f.evaluate(sizes)} here")
    return sizes


def check_bounds(graph: Graph, sizes: Mapping[str, int],
                 where: Mapping[str, str] | None = None) -> None:
    """A KilnError naming the size (and the input dimension that carries it) when a value
    lies outside the graph's bounds for it."""
    for name, value in sizes.items():
        if name not in graph.sizes:
            raise KilnError(f"graph {graph.name} has no size {name}",
                            hint=f"its sizes are {sorted(graph.sizes)}")
        lo, hi = graph.sizes[name]
        if not lo <= int(value) <= hi:
            at = f" ({where[name]})" if where and name in where else ""
            raise KilnError(f"size {name} = {value}{at} is outside its bounds [{lo}, {hi}]",
                            hint="compile with wider bounds for this size "
                                 "(torch.export.Dim(name, min=..., max=...))")


def specialize(graph: Graph, sizes: Mapping[str, int]) -> Graph:
    """The graph at ``sizes``: every given size replaced by its value in types and attributes
    (sizes left out stay named). The type rules run again and must agree; a KilnError names
    the node where they do not."""
    check_bounds(graph, sizes)
    sizes = {k: int(v) for k, v in sizes.items()}
    g = Graph(graph.name, graph.inputs, graph.outputs, (), {}, graph.constants,
              {k: b for k, b in graph.sizes.items() if k not in sizes})
    for name in list(graph.inputs) + list(graph.constants):
        g.types[name] = _at(graph.types[name], sizes)
    for n in graph.nodes:
        attrs = {k: substitute(v, sizes) for k, v in n.attrs.items()}
        try:
            types = infer_types(n.op, [g.types[i] for i in n.inputs], attrs, node=n.name)
        except ShapeError as e:
            raise KilnError(f"at sizes {sizes}: {e.message}", node=n.name, op=n.op,
                            source=n.source, hint=e.hint) from None
        for out, t in zip(n.outputs, types):
            recorded = _at(graph.types[out], sizes)
            if recorded != t:
                raise KilnError(f"at sizes {sizes} %{out} is typed {recorded} but {n.op} "
                                f"makes {t}", node=n.name, op=n.op, source=n.source)
            g.types[out] = t
        g.nodes.append(n.with_(attrs=attrs) if attrs != dict(n.attrs) else n)
    return g


def _at(t: TensorType, sizes: Mapping[str, int]) -> TensorType:
    return t if t.is_static else t.with_shape(substitute(t.shape, sizes))


# ---- rows of a size ----------------------------------------------------------------------------
def _axis_not(axis_attr: str, what: str = "the rows' axis"):
    def rule(node, ins, attrs) -> str | None:
        axes = attrs[axis_attr]
        if axes is None:
            return f"{axis_attr} is every axis, {what} included"
        axes = axes if isinstance(axes, tuple) else (axes,)
        rank = next(t.rank for t in ins if t is not None)
        return f"{axis_attr} is {what}" if any(a % max(rank, 1) == 0 for a in axes) else None
    return rule


def _rank3(node, ins, attrs) -> str | None:
    # matmul / attention contract over dimension -2 of b (k, v): the rows must lie above it.
    return "the rows are a matrix dimension" if any(t.rank < 3 for t in ins[1:] if t) else None


def _zero_pads(node, ins, attrs) -> str | None:
    return "it pads the rows" if tuple(attrs["pads"][:2]) != (0, 0) else None


def _perm(node, ins, attrs) -> str | None:
    return "it moves the rows' axis" if attrs["perm"][0] != 0 else None


def _take(node, ins, attrs) -> str | None:
    x, rest = ins[0], ins[1:]
    if x is None:                        # a table looked up by rows of indices
        return None
    if attrs["axis"] % x.rank == 0 or any(t is not None for t in rest):
        return "it indexes the rows"
    return None


_ROWWISE = {"conv", "conv_transpose", "qconv", "max_pool", "avg_pool", "adaptive_avg_pool",
            "batch_norm", "group_norm", "resize", "linear", "linear_w8", "qlinear",
            "embedding", "reshape", "expand"}
ROW_RULES: dict = {
    **{op: None for op in _ROWWISE},
    "matmul": _rank3, "attention": _rank3,
    "layer_norm": lambda n, ins, a: ("it normalizes over the rows" if a["normalized_ndim"]
                                     >= ins[0].rank else None),
    "softmax": _axis_not("axis"), "log_softmax": _axis_not("axis"),
    "cumsum": _axis_not("axis"), "argmax": _axis_not("axis"), "argmin": _axis_not("axis"),
    "topk": _axis_not("axis"), "slice": _axis_not("axis"), "concat": _axis_not("axis"),
    "split": _axis_not("axis"), "gather_elements": _axis_not("axis"),
    "reduce_sum": _axis_not("axes"), "reduce_mean": _axis_not("axes"),
    "reduce_max": _axis_not("axes"), "reduce_min": _axis_not("axes"),
    "permute": _perm, "pad": _zero_pads, "take": _take,
    # One scale for the whole input, from its largest magnitude: every row changes it.
    "dynamic_qlinear": lambda n, ins, a: "it quantizes all rows with one scale",
    # The recurrent ops hold the batch in dimension 1 (refused by the leading-axis check) and
    # the steps in dimension 0, which the recurrence runs along.
    "lstm_seq": lambda n, ins, a: "its recurrence runs along the leading dimension",
    "gru_seq": lambda n, ins, a: "its recurrence runs along the leading dimension",
}
"""Per op that is not elementwise: None when output row i is computed from input rows i
only (given that every operand carrying the size holds it as its leading dimension), or a
rule ``(node, input types or None for an operand without the size, attrs) -> reason or None``.
Elementwise ops are row-wise by broadcasting. ``tests/ir/test_symbolic_shapes.py`` holds
every registered op to having an entry here or being elementwise."""


def rows_independent(graph: Graph, size: str) -> str | None:
    """None when ``graph`` computes row ``i`` of every output from row ``i`` of its inputs
    along size ``size``: each value that uses the size holds it as exactly its leading
    dimension, and each node keeps rows apart (ROW_RULES). Then a call of ``n`` rows can run
    as calls of fewer rows on row slices, their outputs concatenated. Otherwise the reason,
    naming the node."""
    from kiln.ir.registry import get_op

    def leading(value: str) -> bool | None:
        t = graph.types[value]
        uses = [k for k, d in enumerate(t.shape) if isinstance(d, SymDim) and size in d.names]
        if not uses:
            return None
        return uses == [0] and t.shape[0] == SymDim.named(size, *graph.sizes[size])

    for value in graph.inputs:
        if leading(value) is False:
            return (f"input %{value} does not hold {size} as its leading dimension alone "
                    f"({graph.types[value]})")
    for value in graph.outputs:
        if not leading(value):
            return (f"output %{value} does not hold {size} as its leading dimension alone "
                    f"({graph.types[value]})")
    for n in graph.nodes:
        ins = [graph.types[i] if leading(i) else None for i in n.inputs]
        for v in list(n.inputs) + list(n.outputs):
            if leading(v) is False:
                return (f"node {n.name} ({n.op}): %{v} is {graph.types[v]}, {size} is not its "
                        "leading dimension alone")
        if not any(ins):
            continue
        if not all(leading(o) for o in n.outputs):
            return f"node {n.name} ({n.op}) makes an output without the rows of {size}"
        if get_op(n.op).kind == "elementwise":
            continue
        if n.op not in ROW_RULES:
            return f"node {n.name} ({n.op}): kiln does not know whether {n.op} keeps rows apart"
        rule = ROW_RULES[n.op]
        why = rule(n, ins, n.attrs) if rule is not None else None
        if why:
            return f"node {n.name} ({n.op}): {why}"
    return None
