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
