"""Loop nests of the anchor ops: reductions, softmax, normalizations, pooling, attention and the
straightforward (unpacked) dense ops. Dense ops with a packed GEMM schedule live in matmul.py,
conv.py and pool.py; these loop nests are their fallback and their oracle.

Every rule gets ``store(idx, value)``, which writes the group's output at the anchor's output
index ``idx`` with the fused epilogue applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from kiln.ir import Node
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Const, Decl, Expr, For, Var, as_expr
from kiln.ir.ops._rules import as_tuple
from kiln.passes.lower.core import Lowering, clamp_index, default_kinds, f32, loop_nest

StoreFn = Callable[[Sequence[Expr], Expr], K.Stmt]
AnchorRule = Callable[[Lowering, Node, StoreFn], list]
ANCHOR_RULES: dict[str, AnchorRule] = {}

NEG_INF = float("-inf")


def anchor_rule(*ops: str):
    def deco(fn: AnchorRule) -> AnchorRule:
        for op in ops:
            ANCHOR_RULES[op] = fn
        return fn

    return deco


def _loop(var: Var, extent, body, kind: str = "serial", start=0) -> For:
    return For(var, as_expr(start), as_expr(extent), tuple(body), kind)


def node_work(low: Lowering, node: Node) -> int:
    """The node's FLOPs, or the elements it touches for data-movement ops."""
    from kiln.ir import get_op

    t = low.graph.types
    flops = get_op(node.op).flops([t[i] for i in node.inputs], [t[o] for o in node.outputs],
                                  node.attrs)
    return max(int(flops), sum(t[o].numel for o in node.outputs))


def parallel_kind(low: Lowering, node: Node) -> str:
    """Parallel when the op has enough work to pay for waking the thread pool."""
    return "parallel" if node_work(low, node) >= low.tuning.parallel_min_work else "serial"


def parallel_first(shape: Sequence[int], kinds: list[str], low: Lowering | None = None,
                   node: Node | None = None) -> list[str]:
    """Make the first loop with more than one iteration parallel; given ``low`` and ``node``,
    only when the node has enough work to pay for waking the thread pool
    (``tuning.parallel_min_work`` operations)."""
    if low is not None and node_work(low, node) < low.tuning.parallel_min_work:
        return kinds
    for k, n in enumerate(shape):
        if n > 1:
            if kinds[k] == "serial":
                kinds[k] = "parallel"
            break
    return kinds


# ---- reductions ------------------------------------------------------------------------------
@anchor_rule("reduce_sum", "reduce_mean", "reduce_max", "reduce_min")
def _reduce(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    shape = low.shape(x)
    rank = len(shape)
    axes = tuple(range(rank)) if node.attrs["axes"] is None else tuple(
        sorted({a % rank for a in node.attrs["axes"]}))
    keep = [d for d in range(len(shape)) if d not in axes]
    op = {"reduce_sum": "add", "reduce_mean": "add", "reduce_max": "max",
          "reduce_min": "min"}[node.op]
    dt = low.dtype(x)
    count = math.prod(shape[a] for a in axes)
    last_reduced = (len(shape) - 1) in axes
    keep_vars = [low.fresh("i") for _ in keep]
    red_vars = [low.fresh("r") for _ in axes]
    acc = low.fresh("acc", dt)
    full = [None] * len(shape)
    for d, v in zip(keep, keep_vars):
        full[d] = v
    for d, v in zip(axes, red_vars):
        full[d] = v
    combine = K.Binary(op, acc, low.element(x, full))
    inner: list = [K.Assign(acc, combine)]
    for k, (d, v) in enumerate(reversed(list(zip(axes, red_vars)))):
        kind = "vectorized" if k == 0 and last_reduced and shape[d] > 1 else "serial"
        inner = [_loop(v, shape[d], inner, kind)]
    result: Expr = acc
    if node.op == "reduce_mean":
        result = acc * f32(1.0 / count, dt)
    out_idx = []
    ki = iter(keep_vars)
    for d in range(len(shape)):
        if d in axes:
            if node.attrs["keepdim"]:
                out_idx.append(Const(0, INDEX))
        else:
            out_idx.append(next(ki))
    body = [Decl(acc, K.reduction_identity(op, dt)), *inner, store(out_idx, result)]
    keep_shape = [shape[d] for d in keep]
    kinds = ["serial"] * len(keep)
    if keep and not last_reduced and keep_shape[-1] > 1:
        kinds[-1] = "vectorized"
    kinds = parallel_first(keep_shape, kinds) if math.prod(shape) >= 1 << 16 else kinds
    for v, n, kind in reversed(list(zip(keep_vars, keep_shape, kinds))):
        body = [_loop(v, n, body, kind)]
    return body


# ---- softmax ---------------------------------------------------------------------------------
def _rows(low: Lowering, shape: Sequence[int], axis: int):
    """Loop variables over every dim but ``axis``, their kinds and the full index builder."""
    outer = [d for d in range(len(shape)) if d != axis]
    vars_ = [low.fresh("i") for _ in outer]
    kinds = ["serial"] * len(outer)
    if axis != len(shape) - 1 and outer and shape[outer[-1]] > 1:
        kinds[-1] = "vectorized"
    if math.prod(shape) >= 1 << 15:
        kinds = parallel_first([shape[d] for d in outer], kinds)

    def index(j: Expr) -> list[Expr]:
        if not shape:  # a scalar is its own (one-element) row
            return []
        full: list = [None] * len(shape)
        for d, v in zip(outer, vars_):
            full[d] = v
        full[axis] = j
        return full

    def wrap(body: list) -> list:
        for v, d, kind in reversed(list(zip(vars_, outer, kinds))):
            body = [_loop(v, shape[d], body, kind)]
        return body

    inner_kind = ("vectorized" if shape and axis == len(shape) - 1 and shape[axis] > 1
                  else "serial")
    return index, wrap, inner_kind


SOFTMAX_ROW_MAX = 4096
"""The longest softmax row whose exponentials are kept in a (stack) array between sweeps."""


@anchor_rule("softmax", "log_softmax")
def _softmax(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    shape = low.shape(x)
    axis = node.attrs["axis"] % max(len(shape), 1)
    n = shape[axis] if shape else 1
    dt = low.dtype(x)
    index, wrap, ik = _rows(low, shape, axis)
    m, s = low.fresh("max", dt), low.fresh("sum", dt)
    j1, j2, j3 = low.fresh("j"), low.fresh("j"), low.fresh("j")
    body = [
        Decl(m, f32(NEG_INF, dt)),
        _loop(j1, n, [K.Assign(m, K.maximum(m, low.element(x, index(j1))))], ik),
        Decl(s, f32(0.0, dt)),
    ]
    # On a CPU, a contiguous row keeps its exponentials in a per-thread array for the last
    # sweep instead of computing them twice (the same values, summed in the same order; BERT's
    # 32-wide rows: 32 -> 21 us for 4 layers). The GPU's block-reduce schedule wants the
    # plain form.
    keep = (node.op == "softmax" and ik == "vectorized" and n <= SOFTMAX_ROW_MAX
            and low.target is not None)
    if keep:
        row = f"exp_{node.name}".replace(".", "_")
        low.scratch.append(K.Buffer(row, dt, n))
        body.append(_loop(j2, n, [K.Store(row, j2, K.call("exp", low.element(x, index(j2)) - m)),
                                  K.Assign(s, s + K.Load(row, j2, dt))], ik))
    else:
        body.append(_loop(j2, n, [K.Assign(s, s + K.call("exp", low.element(x, index(j2)) - m))],
                          ik))
    if node.op == "softmax":
        inv = low.fresh("inv", dt)
        body.append(Decl(inv, f32(1.0, dt) / s))
        e = K.Load(row, j3, dt) if keep else K.call("exp", low.element(x, index(j3)) - m)
        value = e * inv
    else:
        lse = low.fresh("lse", dt)
        body.append(Decl(lse, m + K.call("log", s)))
        value = low.element(x, index(j3)) - lse
    body.append(_loop(j3, n, [store(index(j3), value)], ik))
    return wrap(body)


# ---- normalizations --------------------------------------------------------------------------
@anchor_rule("layer_norm")
def _layer_norm(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    shape = low.shape(x)
    k = node.attrs["normalized_ndim"]
    dt = low.dtype(x)
    lead, norm = shape[:-k], shape[-k:]
    count = math.prod(norm)
    lead_vars = [low.fresh("i") for _ in lead]

    def sweep(body_fn, kind_last="vectorized"):
        vs = [low.fresh("j") for _ in norm]
        inner = body_fn(lead_vars + vs, vs)
        for t, (v, n) in enumerate(reversed(list(zip(vs, norm)))):
            kind = kind_last if t == 0 and n > 1 else "serial"
            inner = [_loop(v, n, inner, kind)]
        return inner

    mean, var, rstd = low.fresh("mean", dt), low.fresh("var", dt), low.fresh("rstd", dt)
    s1 = low.fresh("s", dt)
    s2 = low.fresh("s", dt)
    body = [Decl(s1, f32(0.0, dt))]
    body += sweep(lambda idx, vs: [K.Assign(s1, s1 + low.element(x, idx))])
    body.append(Decl(mean, s1 * f32(1.0 / count, dt)))
    body.append(Decl(s2, f32(0.0, dt)))

    def sq(idx, vs):
        d = low.element(x, idx) - mean
        return [K.Assign(s2, s2 + d * d)]

    body += sweep(sq)
    body.append(Decl(var, s2 * f32(1.0 / count, dt)))
    body.append(Decl(rstd, f32(1.0, dt) / K.call("sqrt", var + f32(node.attrs["eps"], dt))))

    def write(idx, vs):
        y = (low.element(x, idx) - mean) * rstd
        if len(node.inputs) > 1:
            y = y * low.element(node.inputs[1], vs)
        if len(node.inputs) > 2:
            y = y + low.element(node.inputs[2], vs)
        return [store(idx, y)]

    body += sweep(write)
    kinds = ["serial"] * len(lead)
    if math.prod(shape) >= 1 << 15:
        kinds = parallel_first(list(lead), kinds)
    for v, n, kind in reversed(list(zip(lead_vars, lead, kinds))):
        body = [_loop(v, n, body, kind)]
    return body


@anchor_rule("group_norm")
def _group_norm(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    shape = low.shape(x)
    n_, c_ = shape[:2]
    sp = shape[2:]
    g = node.attrs["groups"]
    cg = c_ // g
    dt = low.dtype(x)
    count = cg * math.prod(sp)
    nv, gv = low.fresh("n"), low.fresh("g")

    def sweep(body_fn):
        cv = low.fresh("c")
        svs = [low.fresh("s") for _ in sp]
        ch = gv * cg + cv
        inner = body_fn([nv, ch, *svs], ch)
        for t, (v, n) in enumerate(reversed(list(zip(svs, sp)))):
            inner = [_loop(v, n, inner, "vectorized" if t == 0 and n > 1 else "serial")]
        return [_loop(cv, cg, inner)]

    s1, s2 = low.fresh("s", dt), low.fresh("s", dt)
    mean, rstd = low.fresh("mean", dt), low.fresh("rstd", dt)
    body = [Decl(s1, f32(0.0, dt))]
    body += sweep(lambda idx, ch: [K.Assign(s1, s1 + low.element(x, idx))])
    body.append(Decl(mean, s1 * f32(1.0 / count, dt)))
    body.append(Decl(s2, f32(0.0, dt)))

    def sq(idx, ch):
        d = low.element(x, idx) - mean
        return [K.Assign(s2, s2 + d * d)]

    body += sweep(sq)
    body.append(Decl(rstd, f32(1.0, dt) / K.call(
        "sqrt", s2 * f32(1.0 / count, dt) + f32(node.attrs["eps"], dt))))

    def write(idx, ch):
        y = (low.element(x, idx) - mean) * rstd
        if len(node.inputs) > 1:
            y = y * low.element(node.inputs[1], [ch])
        if len(node.inputs) > 2:
            y = y + low.element(node.inputs[2], [ch])
        return [store(idx, y)]

    body += sweep(write)
    kind = "parallel" if n_ * g > 1 else "serial"
    return [_loop(nv, n_, [_loop(gv, g, body, "parallel" if n_ == 1 and g > 1 else "serial")],
                  kind if n_ > 1 else "serial")]


# ---- pooling ---------------------------------------------------------------------------------
def _in_range(i: Expr, size: int) -> Expr:
    return K.Binary("and", K.cmp("ge", i, as_expr(0)), K.cmp("lt", i, as_expr(size)))


@anchor_rule("max_pool", "avg_pool")
def _pool(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    a = node.attrs
    in_shape, out_shape = low.shape(x), low.shape(node.outputs[0])
    nd = len(a["kernel"])
    kernel = as_tuple(a["kernel"], nd, "kernel")
    stride = as_tuple(a["stride"] if a["stride"] is not None else kernel, nd, "stride")
    pad = as_tuple(a["padding"], nd, "padding")
    dil = as_tuple(a.get("dilation", 1), nd, "dilation")
    dt = low.dtype(x)
    is_max = node.op == "max_pool"

    def body(idx):
        acc = low.fresh("acc", dt)
        kvs = [low.fresh("k") for _ in range(nd)]
        src = list(idx[:2])
        ok = None
        for d in range(nd):
            i = idx[2 + d] * stride[d] + kvs[d] * dil[d] - pad[d]
            inside = _in_range(i, in_shape[2 + d])
            ok = inside if ok is None else K.Binary("and", ok, inside)
            src.append(clamp_index(i, in_shape[2 + d]))
        v = low.element(x, src)
        if is_max:
            upd = K.Assign(acc, K.Select(ok, K.maximum(acc, v), acc))
        else:
            upd = K.Assign(acc, acc + K.Select(ok, v, f32(0.0, dt)))
        inner: list = [upd]
        for d in reversed(range(nd)):
            inner = [_loop(kvs[d], kernel[d], inner, "unrolled" if kernel[d] <= 4 else "serial")]
        stmts: list = [Decl(acc, f32(NEG_INF if is_max else 0.0, dt)), *inner]
        if is_max:
            stmts.append(store(idx, acc))
            return stmts
        count: Expr = Const(1, INDEX)
        for d in range(nd):
            start = idx[2 + d] * stride[d] - pad[d]
            lim = in_shape[2 + d] + (pad[d] if a["count_include_pad"] else 0)
            lo = start if a["count_include_pad"] else K.maximum(start, as_expr(0))
            hi = K.minimum(start + kernel[d], as_expr(lim))
            count = count * (hi - lo)
        stmts.append(store(idx, acc / K.Cast(count, dt)))
        return stmts

    kinds = ["serial"] * len(out_shape)
    kinds = parallel_first(out_shape, kinds, low, node)
    return loop_nest(low, out_shape, body, kinds)


@anchor_rule("adaptive_avg_pool")
def _adaptive(low: Lowering, node: Node, store: StoreFn) -> list:
    x = node.inputs[0]
    in_shape, out_shape = low.shape(x), low.shape(node.outputs[0])
    nd = len(out_shape) - 2
    dt = low.dtype(x)

    def body(idx):
        acc = low.fresh("acc", dt)
        kvs = [low.fresh("k") for _ in range(nd)]
        starts, counts = [], []
        for d in range(nd):
            n_in, n_out = in_shape[2 + d], out_shape[2 + d]
            if n_out == 1:
                starts.append(as_expr(0))
                counts.append(as_expr(n_in))
            else:
                o = idx[2 + d]
                start = (o * n_in) // n_out
                end = ((o + 1) * n_in + (n_out - 1)) // n_out
                starts.append(start)
                counts.append(end - start)
        src = list(idx[:2]) + [s + k for s, k in zip(starts, kvs)]
        inner: list = [K.Assign(acc, acc + low.element(x, src))]
        for d in reversed(range(nd)):
            kind = "vectorized" if d == nd - 1 and out_shape[2 + d] == 1 else "serial"
            inner = [For(kvs[d], as_expr(0), counts[d], tuple(inner), kind)]
        total: Expr = counts[0]
        for c in counts[1:]:
            total = total * c
        return [Decl(acc, f32(0.0, dt)), *inner, store(idx, acc / K.Cast(total, dt))]

    kinds = parallel_first(out_shape, ["serial"] * len(out_shape), low, node)
    return loop_nest(low, out_shape, body, kinds)


# ---- attention -------------------------------------------------------------------------------
@anchor_rule("attention")
def _attention(low: Lowering, node: Node, store: StoreFn) -> list:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    out_shape = low.shape(node.outputs[0])
    batch = out_shape[:-2]
    L, S, E = low.shape(q)[-2], low.shape(k)[-2], low.shape(q)[-1]
    Ev = low.shape(v)[-1]
    dt = low.dtype(q)
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(E)
    scores = f"scores_{node.name}".replace(".", "_")
    accbuf = f"acc_{node.name}".replace(".", "_")
    low.scratch.append(K.Buffer(scores, dt, S))
    low.scratch.append(K.Buffer(accbuf, dt, Ev))

    def bidx(value: str, b: Sequence[Expr]) -> list[Expr]:
        shape = low.shape(value)[:-2]
        lead = len(b) - len(shape)
        return [Const(0, INDEX) if d == 1 else b[lead + t] for t, d in enumerate(shape)]

    def body(idx):
        b, l_ = idx[:-1], idx[-1]
        s, e = low.fresh("s"), low.fresh("e")
        m, tot, dot = low.fresh("m", dt), low.fresh("tot", dt), low.fresh("dot", dt)
        extent = K.minimum(l_ + 1, as_expr(S)) if node.attrs["causal"] else as_expr(S)
        sc: Expr = dot * f32(scale, dt)
        if mask is not None:
            mshape = low.shape(mask)
            full = list(b) + [l_, s]
            midx = [Const(0, INDEX) if dd == 1 else full[len(full) - len(mshape) + t]
                    for t, dd in enumerate(mshape)]
            mv = low.element(mask, midx)
            sc = K.Select(mv, sc, f32(NEG_INF, dt)) if mv.dtype == "bool" else sc + mv
        s2, s3, e2, e3 = low.fresh("s"), low.fresh("s"), low.fresh("e"), low.fresh("e")
        # A row whose every score is masked gives zeros, as PyTorch does: shift by 0 instead
        # of -inf so the exponentials are 0, and scale the sum by 0.
        shift, inv = low.fresh("shift", dt), low.fresh("inv", dt)
        return [
            Decl(m, f32(NEG_INF, dt)),
            For(s, as_expr(0), extent, (
                Decl(dot, f32(0.0, dt)),
                _loop(e, E, [K.Assign(dot, dot + low.element(q, bidx(q, b) + [l_, e])
                                      * low.element(k, bidx(k, b) + [s, e]))], "vectorized"),
                K.Store(scores, s, sc),
                K.Assign(m, K.maximum(m, K.Load(scores, s, dt))),
            )),
            Decl(shift, K.Select(K.cmp("eq", m, f32(NEG_INF, dt)), f32(0.0, dt), m)),
            Decl(tot, f32(0.0, dt)),
            For(s2, as_expr(0), extent, (
                K.Store(scores, s2, K.call("exp", K.Load(scores, s2, dt) - shift)),
                K.Assign(tot, tot + K.Load(scores, s2, dt)),
            ), "vectorized"),
            Decl(inv, K.Select(K.cmp("gt", tot, f32(0.0, dt)), f32(1.0, dt) / tot,
                               f32(0.0, dt))),
            _loop(e2, Ev, [K.Store(accbuf, e2, f32(0.0, dt))], "vectorized"),
            For(s3, as_expr(0), extent, (
                _loop(e3, Ev, [K.Store(accbuf, e3, K.Load(accbuf, e3, dt)
                                       + K.Load(scores, s3, dt)
                                       * low.element(v, bidx(v, b) + [s3, e3]))],
                      "vectorized"),
            )),
            _loop(e, Ev, [store(list(b) + [l_, e], K.Load(accbuf, e, dt) * inv)],
                  "vectorized"),
        ]

    shape = list(batch) + [L]
    kinds = parallel_first(shape, ["serial"] * len(shape), low, node)
    return loop_nest(low, shape, body, kinds)


# ---- dense fallbacks -------------------------------------------------------------------------
@anchor_rule("matmul")
def _matmul(low: Lowering, node: Node, store: StoreFn) -> list:
    a, b = node.inputs
    out_shape = low.shape(node.outputs[0])
    kdim = low.shape(a)[-1]
    dt = low.dtype(a)
    # Vectorize along the output columns when B's rows are contiguous; when B is a transposed
    # view (q @ k^T) its columns are, so vectorize the dot products along k instead.
    probe_k, probe_j = Var("__k"), Var("__j")
    zeros = [Const(0, INDEX)] * (len(out_shape) - 2)
    probe = low.element(b, low.broadcast_index(b, zeros + [Const(0, INDEX)] * 2)[:-2]
                        + [probe_k, probe_j])
    along_k = (isinstance(probe, K.Load) and K.affine_coef(probe.index, "__j") != 1
               and K.affine_coef(probe.index, "__k") == 1)

    def body(idx):
        acc, kv = low.fresh("acc", dt), low.fresh("k")
        batch = idx[:-2]
        ia = low.broadcast_index(a, list(batch) + [Const(0, INDEX), Const(0, INDEX)])[:-2]
        ib = low.broadcast_index(b, list(batch) + [Const(0, INDEX), Const(0, INDEX)])[:-2]
        prod = (low.element(a, ia + [idx[-2], kv]) * low.element(b, ib + [kv, idx[-1]]))
        return [Decl(acc, f32(0.0, dt)),
                _loop(kv, kdim, [K.Assign(acc, acc + prod)],
                      "vectorized" if along_k else "serial"),
                store(idx, acc)]

    kinds = default_kinds(out_shape, innermost_vector=not along_k)
    return loop_nest(low, out_shape, body,
                     parallel_first(out_shape, kinds, low, node))


@anchor_rule("linear")
def _linear(low: Lowering, node: Node, store: StoreFn) -> list:
    x, w = node.inputs[:2]
    out_shape = low.shape(node.outputs[0])
    n, kdim = low.shape(w)
    dt = low.dtype(x)
    wv = low.constant_value(w)
    narrow = n < 16 and kdim >= 16 and dt == "f32"
    # The weight transposed to [in, out] so the output loop reads it contiguously (kept as
    # [out, in] when the reduction is the vectorized loop).
    wt = (low.constant(np.ascontiguousarray(wv.T), f"{node.name}_wt")
          if wv is not None and not narrow else None)

    def body(idx):
        acc, kv = low.fresh("acc", dt), low.fresh("k")
        wel = (K.Load(wt, kv * n + idx[-1], dt) if wt is not None
               else low.element(w, [idx[-1], kv]))
        prod = low.element(x, list(idx[:-1]) + [kv]) * wel
        # Few outputs per row (a classifier head): the vectors go along the reduction instead.
        k_kind = "vectorized" if narrow else "serial"
        stmts = [Decl(acc, f32(0.0, dt)), _loop(kv, kdim, [K.Assign(acc, acc + prod)], k_kind)]
        val: Expr = acc
        if len(node.inputs) > 2:
            val = acc + low.element(node.inputs[2], [idx[-1]])
        return stmts + [store(idx, val)]

    return loop_nest(low, out_shape, body, default_kinds(out_shape, innermost_vector=not narrow))


def _window_sum(low: Lowering, node: Node, store: StoreFn, channels_per_group: int,
                tap: Callable[[Sequence[Expr], Expr, Expr, list[Var]], tuple[list, Expr | None,
                                                                         list]]) -> list:
    """The unpacked convolution loop nest shared by conv and conv_transpose: for each output
    element, sum over the group's input channels and the kernel taps of input * weight.

    ``tap(idx, co, ci, kvs)`` gives the input index, a bounds condition (or None) and the
    weight index of one tap."""
    x, w = node.inputs[:2]
    w_shape = low.shape(w)
    out_shape = low.shape(node.outputs[0])
    nd = len(w_shape) - 2
    dt = low.dtype(x)

    def body(idx):
        acc, ci = low.fresh("acc", dt), low.fresh("ci")
        kvs = [low.fresh("k") for _ in range(nd)]
        co = idx[1]
        src, ok, widx = tap(idx, co, ci, kvs)
        xv = low.element(x, src)
        if ok is not None:
            xv = K.Select(ok, xv, f32(0.0, dt))
        inner: list = [K.Assign(acc, acc + xv * low.element(w, widx))]
        for d in reversed(range(nd)):
            inner = [_loop(kvs[d], w_shape[2 + d], inner)]
        stmts = [Decl(acc, f32(0.0, dt)), _loop(ci, channels_per_group, inner)]
        val: Expr = acc
        if len(node.inputs) > 2:
            val = acc + low.element(node.inputs[2], [co])
        return stmts + [store(idx, val)]

    return loop_nest(low, out_shape, body, parallel_first(out_shape, ["serial"] * len(out_shape),
                                                           low, node))


def _and(a: Expr | None, b: Expr) -> Expr:
    return b if a is None else K.Binary("and", a, b)


@anchor_rule("conv")
def _conv(low: Lowering, node: Node, store: StoreFn) -> list:
    x, w = node.inputs[:2]
    a = node.attrs
    in_shape, w_shape = low.shape(x), low.shape(w)
    nd = len(w_shape) - 2
    stride = as_tuple(a["stride"], nd, "stride")
    pad = as_tuple(a["padding"], nd, "padding")
    dil = as_tuple(a["dilation"], nd, "dilation")
    g = a["groups"]
    cout, cg = w_shape[:2]
    og = cout // g

    def tap(idx, co, ci, kvs):
        src = [idx[0], (co // og) * cg + ci if g > 1 else ci]
        ok = None
        for d in range(nd):
            i = idx[2 + d] * stride[d] + kvs[d] * dil[d] - pad[d]
            if pad[d]:
                ok = _and(ok, _in_range(i, in_shape[2 + d]))
                i = clamp_index(i, in_shape[2 + d])
            src.append(i)
        return src, ok, [co, ci, *kvs]

    return _window_sum(low, node, store, cg, tap)


@anchor_rule("conv_transpose")
def _conv_transpose(low: Lowering, node: Node, store: StoreFn) -> list:
    x, w = node.inputs[:2]
    a = node.attrs
    in_shape, w_shape = low.shape(x), low.shape(w)
    nd = len(w_shape) - 2
    stride = as_tuple(a["stride"], nd, "stride")
    pad = as_tuple(a["padding"], nd, "padding")
    dil = as_tuple(a["dilation"], nd, "dilation")
    g = a["groups"]
    cin, og = w_shape[:2]
    cig = cin // g

    def tap(idx, co, ci, kvs):
        ch = (co // og) * cig + ci if g > 1 else ci
        src = [idx[0], ch]
        ok = None
        for d in range(nd):
            # out = i * stride + k * dilation - pad  =>  i = (out + pad - k * dilation) / stride
            num = idx[2 + d] + pad[d] - kvs[d] * dil[d]
            i = num // stride[d]
            ok = _and(ok, K.Binary("and", K.cmp("ge", num, as_expr(0)),
                                   K.Binary("and", K.cmp("eq", num % stride[d], as_expr(0)),
                                            K.cmp("lt", i, as_expr(in_shape[2 + d])))))
            src.append(clamp_index(i, in_shape[2 + d]))
        return src, ok, [ch, co % og if g > 1 else co, *kvs]

    return _window_sum(low, node, store, cig, tap)
