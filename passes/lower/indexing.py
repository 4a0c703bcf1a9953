"""Loop nests of the indexing ops (kiln.ir.ops.index): gathers, arg-reductions, top-k, running
sums and resizing. Each is an anchor: its kernel writes its output through ``store`` (so
elementwise consumers fuse into the store) and its operands' producers inline into its loads.

Data-dependent indices are clamped into their axis before they address memory: the generated
code never reads outside a tensor. An index outside its axis is a KilnError on the reference
backend; a compiled backend checks the indices that are graph inputs before a call
(kiln.ir.ops.index.index_operands names them). An index computed inside the graph is clamped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.ir import Node
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Const, Decl, Expr, For, Var, as_expr
from kiln.ir.ops._rules import norm_axis
from kiln.ir.ops.index import resize_taps
from kiln.passes.lower.anchors import StoreFn, anchor_rule, parallel_first
from kiln.passes.lower.core import (
    Lowering,
    buffer_name,
    clamp_index,
    default_kinds,
    f32,
    loop_nest,
)


def _loop(var: Var, extent: int, body: Sequence, start: int = 0) -> For:
    return For(var, as_expr(start), as_expr(extent), tuple(body), "serial")


def _index_value(low: Lowering, value: str, idx: Sequence[Expr], n: int, wrap: bool) -> Expr:
    """An element of an index tensor as a position inside an axis of ``n`` entries: negative
    indices wrap when ``wrap``; the result is clamped into [0, n) so it never leaves the
    tensor."""
    i = K.Cast(low.element(value, low.broadcast_index(value, idx)), INDEX)
    if wrap:
        i = K.Select(K.cmp("lt", i, as_expr(0)), i + n, i)
    return clamp_index(i, n)


def _nest(low: Lowering, node: Node, shape: Sequence[int], body) -> list:
    """A loop nest over ``shape`` around ``body(idx)``, innermost vectorized where the body
    allows it (the vectorizer keeps gathers scalar), outermost parallel for enough work."""
    kinds = default_kinds(shape, parallel_min=1 << 62)
    return loop_nest(low, shape, body, parallel_first(shape, kinds, low, node))


# ---- gathers ---------------------------------------------------------------------------------
@anchor_rule("take")
def _take(low: Lowering, node: Node, store: StoreFn) -> list:
    x, *inds = node.inputs
    xs = low.shape(x)
    axis = norm_axis(node.attrs["axis"], len(xs))
    out = low.shape(node.outputs[0])
    nb = len(out) - len(xs) + len(inds)  # dims of the broadcast indices

    def body(idx):
        b = idx[axis:axis + nb]
        src = list(idx[:axis])
        src += [_index_value(low, v, b, xs[axis + j], node.attrs["wrap"])
                for j, v in enumerate(inds)]
        src += idx[axis + nb:]
        return [store(idx, low.element(x, src))]

    return _nest(low, node, out, body)


@anchor_rule("gather_elements")
def _gather_elements(low: Lowering, node: Node, store: StoreFn) -> list:
    x, ind = node.inputs
    xs = low.shape(x)
    out = low.shape(node.outputs[0])

    def body(idx):
        if not xs:
            return [store(idx, low.element(x, []))]
        axis = norm_axis(node.attrs["axis"], len(xs))
        src = list(idx)
        src[axis] = _index_value(low, ind, idx, xs[axis], node.attrs["wrap"])
        return [store(idx, low.element(x, src))]

    return _nest(low, node, out, body)


# ---- arg-reductions and top-k ------------------------------------------------------------------
def _rows(low: Lowering, node: Node, shape: Sequence[int], axis: int):
    """Loop variables over every dim of ``shape`` but ``axis``; returns ``index(j)`` (the
    full index with ``j`` on the axis) and ``wrap(body)`` (the loops around a row's body)."""
    outer = [d for d in range(len(shape)) if d != axis]
    vars_ = [low.fresh("i") for _ in outer]
    kinds = parallel_first([shape[d] for d in outer], ["serial"] * len(outer), low, node)

    def index(j: Expr) -> list[Expr]:
        full: list = [None] * len(shape)
        for d, v in zip(outer, vars_):
            full[d] = v
        full[axis] = j
        return full

    def wrap(body: list) -> list:
        for v, d, kind in reversed(list(zip(vars_, outer, kinds))):
            body = [For(v, as_expr(0), as_expr(shape[d]), tuple(body), kind)]
        return body

    return index, wrap


def _gt(a: Expr, b: Expr) -> Expr:
    """a > b in the order where NaN is above every number (PyTorch's for max and sort)."""
    if not K.is_float(a.dtype):
        return K.cmp("gt", a, b)
    return K.Binary("or", K.cmp("gt", a, b),
                    K.Binary("and", K.cmp("ne", a, a), K.cmp("eq", b, b)))


def _same(a: Expr, b: Expr) -> Expr:
    """a == b in that order (two NaNs are equal)."""
    if not K.is_float(a.dtype):
        return K.cmp("eq", a, b)
    return K.Binary("or", K.cmp("eq", a, b),
                    K.Binary("and", K.cmp("ne", a, a), K.cmp("ne", b, b)))


@anchor_rule("argmax", "argmin")
def _arg(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    shape = low.shape(x)
    dt = low.dtype(x)
    largest = node.op == "argmax"
    axis, keep = node.attrs["axis"], node.attrs["keepdim"]
    if axis is None or not shape:
        n = math.prod(shape)

        def element(j: Expr) -> Expr:
            return low.element_flat(x, j)

        def wrap(body: list) -> list:
            return body

        out_idx: list = [Const(0, INDEX)] * (len(shape) if keep else 0)
    else:
        a = norm_axis(axis, len(shape))
        n = shape[a]
        index, wrap = _rows(low, node, shape, a)

        def element(j: Expr) -> Expr:
            return low.element(x, index(j))

        full = index(Const(0, INDEX))
        out_idx = [e for d, e in enumerate(full) if d != a or keep]
    best, at, v, j = low.fresh("best", dt), low.fresh("at"), low.fresh("v", dt), low.fresh("j")
    # PyTorch: the first NaN wins for argmax and argmin alike.
    better = K.cmp("gt" if largest else "lt", v, best)
    if K.is_float(dt):
        better = K.Binary("or", better, K.Binary("and", K.cmp("ne", v, v), K.cmp("eq", best, best)))
    body = [Decl(best, element(Const(0, INDEX))), Decl(at, Const(0, INDEX)),
            _loop(j, n - 1, [Decl(v, element(j)),
                             K.Assign(at, K.Select(better, j, at)),
                             K.Assign(best, K.Select(better, v, best))], start=1),
            store(out_idx, at)]
    return wrap(body)


@anchor_rule("topk")
def _topk(low: Lowering, node: Node, store: StoreFn) -> list:
    """Few of many (k up to 2 log2 n): k passes over each row, each picking the best element
    after the previous pick in the order (value, then index), O(n k) and no scratch memory.
    More: a bottom-up merge sort of each row in two scratch rows, O(n log n). Both put ties
    in index order."""
    x = node.inputs[0]
    shape = low.shape(x)
    dt = low.dtype(x)
    a = norm_axis(node.attrs["axis"], len(shape))
    n, k = shape[a], node.attrs["k"]
    largest = node.attrs["largest"]
    index, wrap = _rows(low, node, shape, a)

    def before(u: Expr, w: Expr) -> Expr:  # u comes strictly before w in the output order
        return _gt(u, w) if largest else _gt(w, u)

    row = _Row(x, index, n, dt, before)
    if k <= 2 * max(n - 1, 1).bit_length():
        return wrap(_select_k(low, row, k, store))
    return wrap(_merge_sort(low, node, row, k, store))


@dataclass(frozen=True)
class _Row:
    """The row topk ranks: element j of ``x`` at ``index(j)``, ``n`` of them of dtype
    ``dt``; ``before(u, w)``: whether value u comes strictly before w in the output."""

    x: str
    index: Callable[[Expr], list[Expr]]
    n: int
    dt: str
    before: Callable[[Expr, Expr], Expr]


def _select_k(low: Lowering, row: _Row, k: int, store: StoreFn) -> list:
    x, index, n, dt, before = row.x, row.index, row.n, row.dt, row.before
    p, j = low.fresh("p"), low.fresh("j")
    prev_v, prev_i = low.fresh("prev", dt), low.fresh("prev_at")
    best, at, v = low.fresh("best", dt), low.fresh("at"), low.fresh("v", dt)
    take = low.fresh("take", "bool")
    after_prev = K.Binary("or", K.cmp("eq", p, as_expr(0)), K.Binary(
        "or", before(prev_v, v), K.Binary("and", _same(v, prev_v), K.cmp("gt", j, prev_i))))
    better = K.Binary("and", after_prev,
                      K.Binary("or", K.cmp("lt", at, as_expr(0)), before(v, best)))
    zero = Const(0.0 if K.is_float(dt) else 0, dt)
    scan = [Decl(best, zero), Decl(at, Const(-1, INDEX)),
            _loop(j, n, [Decl(v, low.element(x, index(j))), Decl(take, better),
                         K.Assign(at, K.Select(take, j, at)),
                         K.Assign(best, K.Select(take, v, best))]),
            store(index(p), at),
            K.Assign(prev_v, best), K.Assign(prev_i, at)]
    return [Decl(prev_v, zero), Decl(prev_i, Const(-1, INDEX)), _loop(p, k, scan)]


def _merge_sort(low: Lowering, node: Node, row: _Row, k: int, store: StoreFn) -> list:
    """Sort a row's (value, index) pairs by merging runs of 1, 2, 4 ... between two scratch
    rows; a run's left element wins ties, so equal values keep their index order."""
    x, index, n, dt, before = row.x, row.index, row.n, row.dt, row.before
    stem = buffer_name(f"sort_{node.name}")
    rows = [(f"{stem}_v{t}", f"{stem}_i{t}") for t in range(2)]
    for vb, ib in rows:
        low.scratch += [K.Buffer(vb, dt, n), K.Buffer(ib, INDEX, n)]
    j = low.fresh("j")
    body: list = [_loop(j, n, [K.Store(rows[0][0], j, low.element(x, index(j))),
                               K.Store(rows[0][1], j, j)])]
    one, zero = Const(1, INDEX), Const(0, INDEX)
    src, dst = rows
    width = 1
    while width < n:
        blk, t, i, r = low.fresh("blk"), low.fresh("t"), low.fresh("l"), low.fresh("r")
        take = low.fresh("left", "bool")
        lo = blk * (2 * width)
        mid = K.minimum(lo + width, as_expr(n))
        hi = K.minimum(lo + 2 * width, as_expr(n))
        lv, rv = K.Load(src[0], clamp_index(i, n), dt), K.Load(src[0], clamp_index(r, n), dt)
        left = K.Binary("and", K.cmp("lt", i, mid), K.Binary(
            "or", K.cmp("ge", r, hi), K.Unary("not", before(rv, lv))))
        merge = [Decl(take, left),
                 K.Store(dst[0], lo + t, K.Select(take, lv, rv)),
                 K.Store(dst[1], lo + t, K.Select(take, K.Load(src[1], clamp_index(i, n), INDEX),
                                                  K.Load(src[1], clamp_index(r, n), INDEX))),
                 K.Assign(i, i + K.Select(take, one, zero)),
                 K.Assign(r, r + K.Select(take, zero, one))]
        body.append(_loop(blk, -(-n // (2 * width)), [
            Decl(i, lo), Decl(r, mid),
            _loop(t, 2 * width, [K.If(K.cmp("lt", lo + t, hi), merge)])]))
        src, dst = dst, src
        width *= 2
    p = low.fresh("p")
    body.append(_loop(p, k, [store(index(p), K.Load(src[1], p, INDEX))]))
    return body


# ---- cumsum ----------------------------------------------------------------------------------
@anchor_rule("cumsum")
def _cumsum(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    shape = low.shape(x)
    dt = low.dtype(x)
    if not shape:
        zero = Const(0.0 if K.is_float(dt) else 0, dt)
        return [store([], zero if node.attrs["exclusive"] else low.element(x, []))]
    # Floats sum in f64, as PyTorch's CPU cumsum does: a long f32 running sum drifts.
    at = "f64" if K.is_float(dt) else dt
    a = norm_axis(node.attrs["axis"], len(shape))
    n = shape[a]
    index, wrap = _rows(low, node, shape, a)
    acc, v, j = low.fresh("acc", at), low.fresh("v", at), low.fresh("j")
    pos = (as_expr(n - 1) - j) if node.attrs["reverse"] else j

    def element() -> Expr:
        e = low.element(x, index(pos))
        return e if at == dt else K.Cast(e, at)

    def out() -> Expr:
        return acc if at == dt else K.Cast(acc, dt)

    if node.attrs["exclusive"]:
        step = [Decl(v, element()), store(index(pos), out()), K.Assign(acc, acc + v)]
    else:
        step = [K.Assign(acc, acc + element()), store(index(pos), out())]
    return wrap([Decl(acc, Const(0.0 if K.is_float(dt) else 0, at)), _loop(j, n, step)])


# ---- resize ----------------------------------------------------------------------------------
@anchor_rule("resize")
def _resize(low: Lowering, node: Node, store: StoreFn) -> list:
    """Each resized axis gets a table of source indices and weights (computed here, stored
    as constants); an output element is the weighted sum of its taps' input elements."""
    x = node.inputs[0]
    xs = low.shape(x)
    a = node.attrs
    sizes = a["sizes"]
    lead = len(xs) - len(sizes)
    dt = low.dtype(x)
    tables = []
    for k, n_out in enumerate(sizes):
        idx, w = resize_taps(xs[lead + k], n_out, None if a["scales"] is None else
                             a["scales"][k], a["mode"], a["coordinate"], a["nearest"],
                             a["cubic_a"])
        taps = idx.shape[1]
        ib = low.constant(idx.reshape(-1).astype(np.int64), f"{node.name}_src{k}")
        wb = (low.constant(w.reshape(-1).astype(K.np_dtype(dt)), f"{node.name}_w{k}")
              if a["mode"] != "nearest" else None)
        tables.append((ib, wb, taps))

    def body(idx):
        terms: list[tuple[list, Expr | None]] = [([], None)]
        for k, (ib, wb, taps) in enumerate(tables):
            o = idx[lead + k]
            nxt = []
            for src, weight in terms:
                for t in range(taps):
                    at = o * taps + t
                    s = K.Load(ib, at, INDEX)
                    if wb is None:
                        nxt.append((src + [s], weight))
                        continue
                    w = K.Load(wb, at, dt)
                    nxt.append((src + [s], w if weight is None else weight * w))
            terms = nxt
        total: Expr | None = None
        for src, weight in terms:
            e = low.element(x, list(idx[:lead]) + src)
            e = e if weight is None else e * weight
            total = e if total is None else total + e
        return [store(idx, total if total is not None else f32(0.0, dt))]

    return _nest(low, node, low.shape(node.outputs[0]), body)
