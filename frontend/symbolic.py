"""One graph with named sizes from a model traced at a few probe sizes.

PyTorch's tracers give kiln a graph of one call. To get the graph that holds for every size of
a model's dynamic dimensions (``batch``, ``seq``), kiln traces it at the probe points of
``kiln.interop.size_fit.probe_sizes`` and compares: the graphs must have the same nodes and
attributes; a number that moves between them (a dimension of a type, a reshape's target, a
slice's end, a split's sizes) is fitted as a formula of the sizes (``c*batch*seq``, or such a
term plus a number: ``past+1``) and becomes a ``kiln.ir.sizes.SymDim``. The result is checked
by the verifier: every type rule must give the fitted types from the fitted attributes, so a
wrong fit cannot pass unnoticed.

A constant that moves with the sizes (a position table folded to the traced length, a causal
mask) has no symbolic form here yet, and neither has a graph that changes shape between sizes:
both raise a KilnError naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from kiln.interop.size_fit import SizeTerm, fit, probe_sizes
from kiln.ir import Graph, KilnError, Node, SymDim, TensorType, verify
from kiln.ir.sizes import Dim

_HINT = ("compile each size on its own (kiln.compile(..., dynamic=...) does), or declare only "
         "the dimensions the model can vary")


def fit_dim(values: Sequence[int], points: Sequence[Mapping[str, int]],
            bounds: Mapping[str, tuple[int, int]]) -> Dim | None:
    """The dimension giving ``values[k]`` at ``points[k]``: a number, a term of the sizes, or a
    term plus a number (``past+1``); None when none fits every point."""
    values = [int(v) for v in values]
    found = fit(values, points)
    if found is not None:
        return _as_dim(found, bounds)
    base, v0 = points[0], values[0]
    for name in base:
        k = next((i for i, p in enumerate(points[1:], 1) if p[name] != base[name]
                  and all(p[m] == base[m] for m in base if m != name)), None)
        if k is None:
            continue
        b, m = base[name], points[k][name]
        for power in range(1, 5):
            step, rest = divmod(values[k] - v0, m ** power - b ** power)
            if rest or not step:
                continue
            offset = v0 - step * b ** power
            term = fit([v - offset for v in values], points)
            if term is not None and not isinstance(term, int):
                return _as_dim(term, bounds) + offset
    return None


def _as_dim(size: int | SizeTerm, bounds: Mapping[str, tuple[int, int]]) -> Dim:
    if isinstance(size, int):
        return size
    return size.coef * math.prod(SymDim.named(n, *bounds[n]) ** k for n, k in size.powers)


def symbolic_graph(graph_at: Callable[[Mapping[str, int]], Graph],
                   bounds: Mapping[str, tuple[int, int]]) -> Graph:
    """The graph that holds for every size within ``bounds`` ({size name: (min, max)}), from
    ``graph_at(sizes)``, the model's graph at given sizes (see the module docstring)."""
    points = probe_sizes(bounds)
    graphs = [graph_at(p) for p in points]
    base = graphs[0]
    _same_structure(graphs, points)
    out = Graph(base.name, base.inputs, base.outputs, (), {}, base.constants, dict(bounds))
    moving = {}
    for name, arr in base.constants.items():
        arrays = [g.constants[name] for g in graphs]
        if any(a.shape != arr.shape or not np.array_equal(a, arr, equal_nan=True)
               for a in arrays[1:]):
            moving[name] = arrays
    tables = _tables(graph_at, moving, graphs, points, bounds) if moving else {}
    for name in moving:
        del out.constants[name]
    for name in base.types:
        if name in tables:
            continue
        out.types[name] = _fit_type(name, [g.types[name] for g in graphs], points, bounds, base)
    for table, array, nodes, types in tables.values():
        out.constants[table] = array
        out.types[table] = TensorType.of(array)
        out.types.update(types)
        out.nodes.extend(nodes)
    for k, node in enumerate(base.nodes):
        attrs = {key: _fit_attr([g.nodes[k].attrs[key] for g in graphs], points, bounds, node,
                                key) for key in node.attrs}
        out.nodes.append(node.with_(attrs=attrs))
    try:
        verify(out)
    except KilnError as e:
        raise KilnError(f"the graph fitted across sizes does not hold for every size: "
                        f"{e.message}", node=e.node, op=e.op, source=e.source,
                        hint=_HINT) from None
    return out


MAX_TABLE = 1 << 16
"""The largest upper bound of a size under which a constant that grows with it (a position
table slice, a causal mask) is kept whole, at that bound, and sliced to each call's sizes."""


def _tables(graph_at, moving: Mapping[str, Sequence[np.ndarray]], graphs, points, bounds
            ) -> dict[str, tuple]:
    """For each constant that grows with sizes: (table name, the table, the nodes making the
    constant from it at the call's sizes, their output types). Along an axis where the
    constant repeats one slice (a row expanded to the batch) the table holds that slice and
    an ``expand`` makes the size; along the others it holds the constant at the size's upper
    bound, sliced to the size. Checked: at every probe the constant is what the nodes make."""
    base = graphs[0]

    def refuse(name: str, why: str, hint: str = _HINT) -> KilnError:
        user = next((n for n in base.nodes if name in n.inputs), None)
        arrays = moving[name]
        shapes = [list(a.shape) for a in arrays]
        return KilnError(f"constant %{name} changes with the sizes ({shapes} at "
                         f"{list(points)}): {why}", node=user.name if user else None,
                         op=user.op if user else None, source=user.source if user else None,
                         hint=hint)

    fitted: dict[str, tuple[list, list[int], list[int]]] = {}
    for name, arrays in moving.items():
        if any(a.ndim != arrays[0].ndim or a.dtype != arrays[0].dtype for a in arrays):
            raise refuse(name, "its rank or dtype moves")
        dims = [fit_dim([a.shape[d] for a in arrays], points, bounds)
                for d in range(arrays[0].ndim)]
        if any(d is None for d in dims) or all(isinstance(d, int) for d in dims):
            raise refuse(name, "its values were computed from a size and folded into it")
        moved = [k for k, d in enumerate(dims) if isinstance(d, SymDim)]
        repeated = [k for k in moved if all(
            np.array_equal(a, np.broadcast_to(a.take([0], axis=k), a.shape), equal_nan=True)
            for a in arrays)]
        fitted[name] = (dims, [k for k in moved if k not in repeated], repeated)
    needed = {n for dims, sliced, _ in fitted.values() for k in sliced for n in dims[k].names}
    for n in sorted(needed):
        if bounds[n][1] > MAX_TABLE:
            name = next(k for k, (dims, sliced, _) in fitted.items()
                        if any(n in dims[a].names for a in sliced))
            raise refuse(name, f"it grows with {n}, which has no bound up to {MAX_TABLE}",
                         hint=f"bound {n} (torch.export.Dim('{n}', max=...) in dynamic=, such "
                              "as the length of a position table)")
    top_point = {**points[0], **{n: bounds[n][1] for n in needed}}
    top = None
    if needed:
        top = graph_at(top_point)
        _same_structure([base, top], [points[0], top_point])
    out = {}
    for name, (dims, sliced, repeated) in fitted.items():
        source = top.constants[name] if sliced else moving[name][0]
        at = top_point if sliced else points[0]
        if [d if isinstance(d, int) else d.evaluate(at) for d in dims] != list(source.shape):
            raise refuse(name, "its shape at the sizes' upper bounds is not the fitted one")
        table = source
        for k in repeated:
            table = table.take([0], axis=k)
        table = np.array(table, order="C", copy=True)
        table.setflags(write=False)             # a graph's constants are never written
        for a in moving[name]:
            window = table[tuple(slice(0, n) for n in a.shape)]
            window = np.broadcast_to(window, a.shape) if window.ndim == a.ndim else window
            if window.shape != a.shape or not np.array_equal(window, a, equal_nan=True):
                raise refuse(name, "it is not a leading window of the constant at the sizes' "
                                   "upper bounds")
        table_name = base.fresh_name(f"{name}.table")
        dtype = base.types[name].dtype
        nodes, types, src, shape = [], {}, table_name, list(table.shape)
        steps = [("slice", k) for k in sliced] + ([("expand", None)] if repeated else [])
        for j, (op, axis) in enumerate(steps):
            dst = name if j == len(steps) - 1 else base.fresh_name(f"{name}.{op}{j}")
            if op == "slice":
                shape[axis] = dims[axis]
                nodes.append(Node("slice", (src,), (dst,), {"axis": axis, "start": 0,
                                                             "end": dims[axis], "step": 1}))
            else:
                shape = list(dims)
                nodes.append(Node("expand", (src,), (dst,), {"shape": tuple(dims)}))
            types[dst] = TensorType(tuple(shape), dtype)
            src = dst
        out[name] = (table_name, table, nodes, types)
    return out


def _same_structure(graphs: Sequence[Graph], points) -> None:
    base = graphs[0]
    for g, p in zip(graphs[1:], points[1:]):
        if (g.inputs, g.outputs, list(g.constants)) != (base.inputs, base.outputs,
                                                          list(base.constants)) \
                or len(g.nodes) != len(base.nodes):
            raise KilnError(f"the model's graph at {p} is not the graph at {points[0]} (its "
                            "inputs, outputs, constants or node count differ)", hint=_HINT)
        for a, b in zip(base.nodes, g.nodes):
            if (a.op, a.inputs, a.outputs, sorted(a.attrs)) != \
                    (b.op, b.inputs, b.outputs, sorted(b.attrs)):
                raise KilnError(f"the model's graph differs between sizes {points[0]} and {p} "
                                f"here ({a.op} vs {b.op})", node=a.name, op=a.op,
                                source=a.source, hint=_HINT)


def _fit_type(name: str, types: Sequence[TensorType], points, bounds, base: Graph
              ) -> TensorType:
    first = types[0]
    if any(t.dtype != first.dtype or t.rank != first.rank for t in types):
        raise _refuse(base, name, f"%{name} changes dtype or rank with the sizes")
    dims = []
    for d in range(first.rank):
        dim = fit_dim([t.shape[d] for t in types], points, bounds)
        if dim is None:
            raise _refuse(base, name, f"dimension {d} of %{name} "
                                      f"({[t.shape[d] for t in types]} at {list(points)}) is no "
                                      "formula of the sizes")
        dims.append(dim)
    return TensorType(tuple(dims), first.dtype)


def _fit_attr(values: Sequence, points, bounds, node: Node, key: str):
    first = values[0]
    if all(v == first and type(v) is type(first) for v in values):
        return first
    if isinstance(first, tuple) and all(isinstance(v, tuple) and len(v) == len(first)
                                        for v in values):
        return tuple(_fit_attr([v[i] for v in values], points, bounds, node, key)
                     for i in range(len(first)))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        dim = fit_dim(values, points, bounds)
        if dim is not None:
            return dim
    raise KilnError(f"attribute {key} of {node.op} changes with the sizes ({list(values)} at "
                    f"{list(points)}) and is no formula of them", node=node.name, op=node.op,
                    source=node.source, hint=_HINT)


def _refuse(base: Graph, value: str, what: str) -> KilnError:
    node = next((n for n in base.nodes if value in n.outputs), None)
    return KilnError(what, node=node.name if node else None, op=node.op if node else None,
                     source=node.source if node else None, hint=_HINT)
