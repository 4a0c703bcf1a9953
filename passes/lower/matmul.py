"""Packed GEMM schedules of linear layers and matmuls: x @ W^T with W packed at compile time,
and batched products of runtime operands whose B rows are read in place.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir import Node
from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Const, For, Var, affine_coef, as_expr
from kiln.passes.lower.core import Lowering
from kiln.passes.lower.matrix_views import collapsed_views, rows_of
from kiln.passes.lower.microkernel import gemm_loops, micro_shape, pack_b


def lower_linear(low: Lowering, node: Node, final: str, inline: set[str],
                 width: int) -> list | None:
    """x[T, K] @ W^T with W packed at compile time."""
    x, w = node.inputs[:2]
    wv = low.constant_value(w)
    if wv is None or low.dtype(x) != "f32":
        return None
    out = node.outputs[0]
    oshape = low.graph.types[out].shape
    if len(oshape) < 2:
        return None
    T, N = math.prod(oshape[:-1]), oshape[-1]
    Kd = wv.shape[1]
    views = collapsed_views(low, final, out, inline, list(range(len(oshape) - 1)))
    if views is None or N < width:
        return None
    low.view_shapes.update(views)
    shape = micro_shape(width, T)
    bp = low.constant(pack_b(np.asarray(wv.T, np.float32), shape.nr), f"{node.name}_packed")
    bias = low.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    bias_buf = low.constant(bias.astype(np.float32), f"{node.name}_bias") \
        if bias is not None else None
    if len(node.inputs) > 2 and bias is None:
        return None
    nr = shape.nr
    a = rows_of(low, x, T, Kd)

    def b(k, col, lanes):
        # Panel layout: column col of tile col // NR at position col % NR.
        return K.Load(bp, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

    def store(row, col, value):
        if bias_buf is not None:
            value = value + K.Load(bias_buf, col, "f32", value.lanes)
        return low.store_at(final, [row, col], value, out)

    return gemm_loops(low, T, N, Kd, a, b, store, shape, b_cols=-(-N // nr) * nr)



def lower_matmul(low: Lowering, node: Node, final: str, inline: set[str],
                 width: int) -> list | None:
    """Batched matmul of runtime operands: rows of B are read as vectors directly."""
    a_v, b_v = node.inputs
    if low.dtype(a_v) != "f32":
        return None
    out = node.outputs[0]
    oshape = low.graph.types[out].shape
    M, N = oshape[-2:]
    Kd = low.shape(a_v)[-1]
    if N < width:
        return None
    batch = oshape[:-2]
    bvars = [low.fresh("bt") for _ in batch]
    ia = low.broadcast_index(a_v, list(bvars) + [Const(0, INDEX)] * 2)[:-2]
    ib = low.broadcast_index(b_v, list(bvars) + [Const(0, INDEX)] * 2)[:-2]
    shape = micro_shape(width, M)

    def a(row, k):
        return low.element(a_v, ia + [row, k])

    def b(k, col, lanes):
        e = low.element(b_v, ib + [k, col])
        if lanes == 1:
            return e
        if not isinstance(e, K.Load):
            raise _Unsupported
        return K.Load(e.buffer, e.index, e.dtype, lanes)

    def store(row, col, value):
        return low.store_at(final, list(bvars) + [row, col], value, out)

    bv = low.constant_value(b_v)
    if bv is not None and all(d == 1 for d in bv.shape[:-2]):
        # A constant B (x @ W): packed once at compile time, like linear's weight.
        nr = shape.nr
        bp = low.constant(pack_b(np.asarray(bv.reshape(bv.shape[-2:]), np.float32), nr),
                          f"{node.name}_packed")

        def b(k, col, lanes):  # noqa: F811
            return K.Load(bp, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

        body = gemm_loops(low, M, N, Kd, a, b, store, shape, parallel=math.prod(batch) <= 1,
                          b_cols=-(-N // nr) * nr)
    else:
        # B must be read along its rows with stride 1 (a stored tensor, not a transposed view).
        kv, cv = Var("__k"), Var("__col")
        probe = low.element(b_v, ib + [kv, cv])
        if not isinstance(probe, K.Load) or affine_coef(probe.index, cv.name) != 1:
            return None
        try:
            body = gemm_loops(low, M, N, Kd, a, b, store, shape,
                              parallel=math.prod(batch) <= 1)
        except _Unsupported:
            return None
    kinds = ["serial"] * len(batch)
    if batch and math.prod(batch) > 1:
        kinds[0] = "parallel"
    for v, n, kind in reversed(list(zip(bvars, batch, kinds))):
        body = [For(v, as_expr(0), as_expr(n), tuple(body), kind)]
    return body


class _Unsupported(Exception):
    """B is read in a form the micro-kernel cannot load as vectors: the plain nest runs."""
