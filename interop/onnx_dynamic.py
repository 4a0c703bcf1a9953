"""ONNX export of a model with dynamic dimensions: ``dim_param``s, and no frozen sizes.

kiln's graphs are static, so the exporter (``graph_to_onnx``) writes one size. This module
writes the model at every probe size (kiln.interop.size_fit) and compares the files: they must
have the same nodes and attributes; an initializer that moves with the sizes (a Reshape or
Expand target, a Slice end, a Split's sizes) must be an integer tensor whose moving entries are
size terms, and becomes a small computation from the inputs' shapes (``Shape`` of the input
dimension that carries each size, ``Mul`` for products and coefficients, ``Concat`` with the
static entries), so the file runs at any size. Inputs and outputs get ``dim_param``s named
after the sizes (dimensions tied by one name share it), static dimensions ``dim_value``s.

Anything else that moves (a float constant, a constant whose shape changes, such as a
position table slice or a causal mask folded at compile time, or a different graph at another
size) raises a KilnError naming the kiln node: such a file would only be right at one size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kiln.interop.size_fit import Size, SizeTerm, fit, fit_shape, probe_sizes
from kiln.interop.to_onnx import MIN_OPSET, graph_to_onnx
from kiln.ir import Graph, KilnError

_HINT = ("export one size (kiln.export(model.specialize(*inputs), path)), or declare only the "
         "dynamic dimensions this model can take (dynamic={input: {dim: name}})")


MAX_TABLE = 1 << 16
"""The largest size at which a constant that grows with a size (a position table slice) is
built to be sliced in the file: a bound on that size must be at most this."""


class DynamicSource(Protocol):
    """What this exporter needs of a model (``kiln.dynamic.DynamicModel`` is one)."""

    dims: Mapping[int, Mapping[int, str]]
    bounds: Mapping[str, tuple[int, int]]

    def graph_at(self, sizes: Mapping[str, int]) -> Graph: ...


def dynamic_graph_to_onnx(model: DynamicSource, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """One ONNX model for every size of ``model``: its graph is built at the points of
    ``size_fit.probe_sizes`` (``model.dims`` maps input index -> {dimension: size name}) and
    the first point's ONNX model is kept, with its moving numbers made computations. A
    constant that grows with a size (a folded slice of a position table, a causal mask) is
    written whole at the size's upper bound and sliced to the call's sizes.

    Raises:
        KilnError: naming the kiln node whose export would hold only at one size.
    """
    points = probe_sizes(model.bounds)
    graphs = [model.graph_at(p) for p in points]
    protos = [graph_to_onnx(g, opset) for g in graphs]
    base = protos[0]
    nodes = {n.name: n for n in graphs[0].nodes}
    _check_same_nodes(protos, points, nodes)
    builder = _ShapeBuilder(base, _size_sources(graphs[0], model.dims))
    inits = [list(p.graph.initializer) for p in protos]
    kept, growing = [], {}
    for k, init in enumerate(inits[0]):
        arrays = [numpy_helper.to_array(t[k]) for t in inits]
        if all(a.shape == arrays[0].shape and np.array_equal(a, arrays[0]) for a in arrays):
            kept.append(init)
            continue
        entries = _fit_entries(arrays, points)
        if entries is not None:
            builder.emit(init.name, entries, arrays[0])
            continue
        axes = fit_shape([a.shape for a in arrays], points)
        if axes is None or any(a is None for a in axes) or all(isinstance(a, int) for a in axes):
            raise _moving(init.name, arrays, points, base, nodes)
        growing[k] = (init.name, arrays, axes)
    if growing:
        kept += _tables(model, growing, points, builder, opset, base, nodes)
    del base.graph.initializer[:]
    base.graph.initializer.extend(kept + builder.initializers)
    made = list(builder.nodes)
    rest = list(base.graph.node)
    del base.graph.node[:]
    base.graph.node.extend(made + rest)
    _symbolic_dims(base, graphs, points)
    return base


def _tables(model: DynamicSource, growing: Mapping[int, tuple], points, builder, opset: int,
            base: onnx.ModelProto, nodes: Mapping[str, object]) -> list[onnx.TensorProto]:
    """Constants whose shape grows with sizes, as the constant at the sizes' upper bounds
    sliced to each call's sizes (checked: every probe's constant is such a slice)."""
    needed = {n for _, _, axes in growing.values() for a in axes if not isinstance(a, int)
              for n, _ in a.powers}
    for name in needed:
        if model.bounds[name][1] > MAX_TABLE:
            k = next(k for k, (_, _, axes) in growing.items()
                     if any(not isinstance(a, int) and name in dict(a.powers) for a in axes))
            init, arrays, _ = growing[k]
            raise _moving(init, arrays, points, base, nodes,
                          hint=f"bound {name} (a torch.export.Dim('{name}', max=...) in "
                               "dynamic=, such as the length of a position table): the file "
                               "then holds the constant at that size and slices it")
    top = {**points[0], **{n: model.bounds[n][1] for n in needed}}
    proto = graph_to_onnx(model.graph_at(top), opset)
    _check_same_nodes([base, proto], [points[0], top], nodes)
    at_top = list(proto.graph.initializer)
    tables = []
    for k, (name, arrays, axes) in growing.items():
        table = numpy_helper.to_array(at_top[k])
        moving = [d for d, a in enumerate(axes) if not isinstance(a, int)]
        for a in arrays:
            window = table[tuple(slice(0, n) for n in a.shape)]
            if window.shape != a.shape or not np.array_equal(window, a):
                raise _moving(name, arrays, points, base, nodes)
        table_name = builder.fresh(f"{name}/table")
        tables.append(numpy_helper.from_array(np.ascontiguousarray(table), table_name))
        ends = builder.sizes([axes[d] for d in moving], f"{name}/ends")
        starts = builder.const([0] * len(moving), f"{name}/starts")
        builder.nodes.append(helper.make_node(
            "Slice", [table_name, starts, ends, builder.const(moving, f"{name}/axes")], [name],
            name=builder.fresh(f"{name}_node")))
    return tables


def _check_same_nodes(protos: Sequence[onnx.ModelProto], points,
                      nodes: Mapping[str, object]) -> None:
    """A KilnError naming the first kiln node whose ONNX nodes differ between two sizes."""
    base = protos[0]
    for proto, sizes in zip(protos[1:], points[1:]):
        a, b = base.graph, proto.graph
        same_inits = [i.name for i in a.initializer] == [i.name for i in b.initializer]
        pairs = list(zip(a.node, b.node))
        for x, y in pairs:
            if (x.op_type, list(x.input), list(x.output)) != \
                    (y.op_type, list(y.input), list(y.output)) or x.attribute != y.attribute:
                what = "attributes" if x.op_type == y.op_type else "nodes"
                raise _refusal(_kiln_node(x.name, nodes),
                               f"its ONNX {what} differ between sizes {_show(points[0])} and "
                               f"{_show(sizes)}")
        if len(a.node) != len(b.node) or not same_inits:
            at = a.node[len(pairs)].name if len(a.node) > len(pairs) else \
                b.node[len(pairs)].name if len(b.node) > len(pairs) else ""
            raise _refusal(_kiln_node(at, nodes) if at else None,
                           "the optimized graph differs between sizes "
                           f"{_show(points[0])} and {_show(sizes)}")


def _fit_entries(arrays: Sequence[np.ndarray], points) -> list[Size] | None:
    """Per entry of a rank-0/1 integer tensor, its fit over the probes (None if any has none)."""
    a0 = arrays[0]
    if a0.dtype not in (np.int64, np.int32) or a0.ndim > 1 or \
            any(a.shape != a0.shape or a.dtype != a0.dtype for a in arrays):
        return None
    flat = [a.reshape(-1) for a in arrays]
    entries = [fit([int(f[i]) for f in flat], points) for i in range(flat[0].size)]
    return None if any(e is None for e in entries) else entries


def _size_sources(graph: Graph, dims: Mapping[int, Mapping[int, str]]
                  ) -> dict[str, tuple[str, int]]:
    """Size name -> (graph input, dimension) it is read from (the first that carries it)."""
    out: dict[str, tuple[str, int]] = {}
    for i in sorted(dims):
        for d in sorted(dims[i]):
            out.setdefault(dims[i][d], (graph.inputs[i], d))
    return out


class _ShapeBuilder:
    """Writes integer tensors whose entries are size terms as nodes over the inputs' shapes."""

    def __init__(self, model: onnx.ModelProto, sources: Mapping[str, tuple[str, int]]) -> None:
        self.sources = sources
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        g = model.graph
        self._used = {n for node in g.node for n in (*node.input, *node.output)}
        self._used |= {i.name for i in g.initializer} | {i.name for i in g.input}
        self._terms: dict[SizeTerm, str] = {}

    def fresh(self, hint: str) -> str:
        name, k = hint, 0
        while name in self._used:
            k += 1
            name = f"{hint}_{k}"
        self._used.add(name)
        return name

    def node(self, op_type: str, inputs: Sequence[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=self.fresh(f"{hint}_node"), **attrs))
        return out

    def const(self, values: Sequence[int], hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def term(self, term: SizeTerm) -> str:
        """A 1-d int64 tensor [term], computed once per term."""
        if term in self._terms:
            return self._terms[term]
        factors = []
        for name, power in term.powers:
            value, dim = self.sources[name]
            size = self._terms.get(SizeTerm(1, ((name, 1),)))
            if size is None:
                size = self.node("Shape", [value], f"size/{name}", start=dim, end=dim + 1)
                self._terms[SizeTerm(1, ((name, 1),))] = size
            factors += [size] * power
        if term.coef != 1:
            factors.append(self.const([term.coef], f"size/{term.coef}"))
        out = factors[0]
        for f in factors[1:]:
            out = self.node("Mul", [out, f], f"size/{term}")
        self._terms[term] = out
        return out

    def sizes(self, entries: Sequence[Size], hint: str) -> str:
        """A 1-d int64 tensor of ``entries`` at the call's sizes."""
        out = self.fresh(hint)
        self.emit(out, entries, np.zeros(len(entries), np.int64))
        return out

    def emit(self, name: str, entries: Sequence[Size], like: np.ndarray) -> None:
        """The nodes computing initializer ``name`` (its entries at any size)."""
        pieces, static = [], []
        for e in entries:
            if isinstance(e, int):
                static.append(e)
                continue
            if static:
                pieces.append(self.const(static, f"{name}/static"))
                static = []
            pieces.append(self.term(e))
        if static:
            pieces.append(self.const(static, f"{name}/static"))
        dtype = helper.np_dtype_to_tensor_dtype(like.dtype)
        steps: list[tuple[str, list[str], dict]] = []
        if len(pieces) > 1:
            steps.append(("Concat", pieces, {"axis": 0}))
        if like.ndim == 0:
            steps.append(("Squeeze", [self.const([0], f"{name}/axis")], {}))
        if dtype != onnx.TensorProto.INT64:
            steps.append(("Cast", [], {"to": dtype}))
        value = pieces[0] if len(pieces) == 1 else None
        for k, (op_type, operands, attrs) in enumerate(steps or [("Identity", [], {})]):
            inputs = operands if value is None else [value, *operands]
            last = k == max(len(steps), 1) - 1
            if last:
                self.nodes.append(helper.make_node(op_type, inputs, [name],
                                                   name=self.fresh(f"{name}_node"), **attrs))
            else:
                value = self.node(op_type, inputs, f"{name}/{op_type}", **attrs)


def _symbolic_dims(model: onnx.ModelProto, graphs: Sequence[Graph], points) -> None:
    """Inputs', outputs' and intermediates' dimensions as dim_param (a size), dim_value
    (static) or left unknown (a product of sizes, which ONNX cannot name)."""
    g0 = graphs[0]
    graph = model.graph
    # Outputs may be renamed (Identity to a fresh name): they pair with the kiln outputs.
    named = [(vi, vi.name) for vi in [*graph.input, *graph.value_info]]
    named += list(zip(graph.output, g0.outputs))
    for vi, src in named:
        if src not in g0.types:
            continue
        sizes = fit_shape([g.types[src].shape for g in graphs], points)
        for dim, size in zip(vi.type.tensor_type.shape.dim, sizes or ()):
            if isinstance(size, int):
                continue
            dim.Clear()
            if size is not None and size.name is not None:
                dim.dim_param = size.name


def _kiln_node(onnx_name: str, nodes: Mapping[str, object]):
    """The kiln node an ONNX node or initializer was written for (named ``kiln_node/...``)."""
    head = onnx_name.split("/")[0]
    for key in (onnx_name, head, head.removesuffix("_output")):
        if key in nodes:
            return nodes[key]
    return None


def _reader(model: onnx.ModelProto, value: str) -> str:
    return next((n.name for n in model.graph.node if value in n.input), value)


def _moving(name: str, arrays: Sequence[np.ndarray], points, model: onnx.ModelProto,
            nodes: Mapping[str, object], hint: str = _HINT) -> KilnError:
    """The refusal for an initializer that moves with the sizes but has no size formula."""
    node = _kiln_node(name, nodes) or _kiln_node(_reader(model, name), nodes)
    if any(a.shape != arrays[0].shape for a in arrays):
        what = (f"constant {name!r} changes shape with the sizes "
                f"({', '.join(f'{list(a.shape)} at {_show(p)}' for a, p in zip(arrays, points))})"
                ": kiln computed it for one size (a table slice, a mask or an arange folded at "
                "compile time)")
    elif arrays[0].dtype.kind == "f":
        seen = ", ".join(f"{a.ravel()[:1]} at {_show(p)}" for a, p in zip(arrays, points))
        what = (f"constant {name!r} ({arrays[0].dtype}) is a number kiln computed from the "
                f"sizes ({seen}), which the file would hold for one size only")
    else:
        what = (f"constant {name!r} ({arrays[0].dtype}) changes with the sizes in a way "
                "that is not a product of them")
    return _refusal(node, what, hint)


def _refusal(node, what: str, hint: str = _HINT) -> KilnError:
    label = f"{node.name} ({node.op})" if node is not None else "the model"
    return KilnError(f"cannot export {label} to ONNX with dynamic sizes: {what}",
                     node=getattr(node, "name", None), op=getattr(node, "op", None),
                     source=getattr(node, "source", None), hint=hint)


def _show(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())
