"""Packed GEMM schedules of linear layers and matmuls: x @ W^T with W packed at compile time,
and batched products of runtime operands whose B rows are read in place.
"""

from __future__ import annotations

import math
from dataclasses import replace

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
    # Weights stored in half precision (a float32 layer's f16 storage) stay half in the
    # panels, half the bytes to stream, and widen to f32 as they are loaded.
    half = wv.dtype == np.float16
    bp = low.constant(pack_b(np.asarray(wv.T, np.float16 if half else np.float32), shape.nr),
                      f"{node.name}_packed")
    bias = low.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    bias_buf = low.constant(bias.astype(np.float32), f"{node.name}_bias") \
        if bias is not None else None
    if len(node.inputs) > 2 and bias is None:
        return None
    nr = shape.nr
    a = rows_of(low, x, T, Kd)

    def b(k, col, lanes):
        # Panel layout: column col of tile col // NR at position col % NR.
        load = K.Load(bp, (col // nr) * (Kd * nr) + k * nr + col % nr,
                      "f16" if half else "f32", lanes)
        return K.Cast(load, "f32") if half else load

    def store(row, col, value):
        if bias_buf is not None:
            value = value + K.Load(bias_buf, col, "f32", value.lanes)
        return low.store_at(final, [row, col], value, out)

    # The tile may span several NR-wide panels: ``b`` finds each column's panel.
    run = replace(shape, nv=shape.nv * gemv_panels(low, T, N, nr))
    return gemm_loops(low, T, N, Kd, a, b, store, run, b_cols=-(-N // nr) * nr)


def gemv_panels(low: Lowering, T: int, N: int, nr: int) -> int:
    """Packed B panels one register tile reads side by side: 4 for a one-row product (a
    GEMV, a decoder's step at batch 1), else 1. A GEMV streams its weight from memory once
    and does 2 FLOPs per 4 bytes: its time is memory bandwidth, and a core reading four
    panels (four sequential streams the prefetchers follow at once) reads faster than one
    reading one. Measured on the 2-core VM, one thread: GPT-2 small's 12 MLPs and its
    768 x 50257 head (380 MB) 10-20% more GB/s (one stream 13-14 GB/s, four 15-16; eight no
    better than four). Fewer panels where the threads would be left without at least 4 tiles
    each. Each output's sum runs in the same order: results are bit-identical."""
    if T != 1:
        return 1
    threads = max(1, low.target.cores if low.target is not None else 1)
    panels = 4
    while panels > 1 and N // (nr * panels) < 4 * threads:
        panels //= 2
    return panels



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
        # B must be read along its rows with stride 1 (a stored tensor), or be a transposed
        # view of one (q @ k^T), copied to rows first.
        kv, cv = Var("__k"), Var("__col")
        probe = low.element(b_v, ib + [kv, cv])
        if not isinstance(probe, K.Load):
            return None
        copy: list = []
        if M == 1 and affine_coef(probe.index, cv.name) != 1:
            # One row against a transposed B (a decode step's q @ k^T): the plain nest's dot
            # products read B's rows in place, stride 1 along k, where copying B to rows
            # first read and wrote it once more (GPT-2 small's 24 attention products per
            # step at a 128-token cache: 1.02 -> 0.46 ms).
            return None
        if affine_coef(probe.index, cv.name) != 1:
            transposed = _transposed_b(low, node, b_v, ib, probe, Kd, N,
                                       shared=math.prod(batch) <= 1)
            if transposed is None:
                return None
            rows, copy = transposed

            def b(k, col, lanes):  # noqa: F811
                return K.Load(rows, k * N + col, "f32", lanes)
        try:
            body = copy + gemm_loops(low, M, N, Kd, a, b, store, shape,
                                     parallel=math.prod(batch) <= 1)
        except _Unsupported:
            return None
    kinds = ["serial"] * len(batch)
    if batch and math.prod(batch) > 1 and \
            math.prod(batch) * M * N * Kd >= low.tuning.batched_parallel_min_macs:
        # The first batch dimension with more than one entry: (1, heads, L, S) runs its
        # heads in parallel, not all on one thread.
        kinds[next(i for i, n in enumerate(batch) if n > 1)] = "parallel"
    for v, n, kind in reversed(list(zip(bvars, batch, kinds))):
        body = [For(v, as_expr(0), as_expr(n), tuple(body), kind)]
    return body


TRANSPOSED_B_MAX = 16384
"""The most elements of a transposed B per batch entry copied to rows for the packed schedule
when batch entries run in parallel: a per-thread stack array of at most 64 KB."""

TRANSPOSED_B_SHARED_MAX = 1 << 22
"""The same for one matrix (no batch), copied once into the arena before a parallel product."""


def _transposed_b(low: Lowering, node: Node, b_v: str, ib: list, probe: K.Load, Kd: int,
                  N: int, shared: bool) -> tuple[str, list] | None:
    """An array and the statements copying B (read as a transposed view: stride 1 along k) to
    it as rows, B[k, col] at k * N + col, so the micro-kernel reads them as vectors. For
    q @ k^T the dot-product nest did one horizontal sum per score (BERT's 32x32x64 heads: 12
    us per layer); the copy is Kd * N moves, written in order. ``shared``: one copy in the
    arena, made before the (parallel) product; otherwise a stack array per thread, filled by
    each batch entry inside the parallel batch loop. ``probe``: B's element at (__k, __col)."""
    limit = TRANSPOSED_B_SHARED_MAX if shared else TRANSPOSED_B_MAX
    if affine_coef(probe.index, "__k") != 1 or Kd * N > limit:
        return None
    if shared:
        rows = low.workspace(f"bt_{node.name}", "f32", Kd * N)
    else:
        rows = f"bt_{node.name}".replace(".", "_")
        low.scratch.append(K.Buffer(rows, "f32", Kd * N))
    k, col = low.fresh("k"), low.fresh("col")
    # k outer, columns inner: the rows are written in order, B read with a stride (vector
    # gathers). The other order read B in order and scattered the stores (vscatterqps on
    # AVX-512, lane-by-lane stores on AVX2): BERT's 32x64 q @ k^T heads 6.8 -> 4.4 us on
    # AVX-512, 8.3 -> 7.1 with the AVX2 target, one thread.
    return rows, [For(k, as_expr(0), as_expr(Kd), (
        For(col, as_expr(0), as_expr(N), (
            K.Store(rows, k * N + col, low.element(b_v, ib + [k, col])),), "serial"),),
        "serial")]


class _Unsupported(Exception):
    """B is read in a form the micro-kernel cannot load as vectors: the plain nest runs."""
