"""Convolutions as GEMMs over an im2col matrix (or, for 1x1 convolutions, the input itself):
one GEMM per image and group, out[n, g] = W_g[og, K] @ cols(x[n, g])[K, OH*OW], or one GEMM
over the columns of a whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Const, Expr, For, as_expr
from kiln.passes.lower.conv_context import ConvContext, ImageLoop
from kiln.passes.lower.conv_geometry import ConvGeometry
from kiln.passes.lower.core import Lowering, clamp_index, f32
from kiln.passes.lower.microkernel import PackedA, StridedRows, gemm_loops, pack_rows


@dataclass(frozen=True)
class Im2colLayout:
    """Where ``im2col`` writes one image's columns: into ``buffer`` from ``col_base`` on, in
    rows of ``row_len`` columns (longer than the image's pixels when several images share
    the rows). Its zero-padded copy of the input goes to slot ``pad_slot`` (None: the only
    slot) of a workspace with one slot per image of ``images``."""

    buffer: str
    col_base: Expr
    row_len: int
    images: int = 1
    pad_slot: Expr | None = None


def im2col(low: Lowering, geo: ConvGeometry, xb: str, x_base: Expr, layout: Im2colLayout,
           kind: str) -> list:
    """Fill col[k, n] = x[ci, o*stride + kk*dil - pad] (0 outside), k = (ci, kernel offsets),
    for the group's input at ``x_base`` of ``xb``.

    The input is first copied into a zero-padded workspace, so the im2col loops need no
    bounds checks and their innermost loop is a plain (vectorizable) copy when stride is 1."""
    in_sp, sp_out, ksp = geo.in_sp, geo.out_sp, geo.kernel
    stride, pad, dil, cg, nd = geo.stride, geo.pad, geo.dil, geo.cg, geo.nd
    stmts: list = []
    src_buf, src_sp = xb, list(in_sp)
    if any(pad):
        src_sp = [n + 2 * p for n, p in zip(in_sp, pad)]
        per_image = cg * math.prod(src_sp)
        src_buf = low.workspace("padded", "f32", per_image * layout.images)
        slot = layout.pad_slot
        pad_base = slot * per_image if slot is not None else Const(0, INDEX)
        ci, ivs = low.fresh("ci"), [low.fresh("p") for _ in range(nd)]
        ok, src, dst = None, Const(0, INDEX), Const(0, INDEX)
        for d in range(nd):
            i = ivs[d] - pad[d]
            inside = K.Binary("and", K.cmp("ge", i, as_expr(0)), K.cmp("lt", i, as_expr(in_sp[d])))
            ok = inside if ok is None else K.Binary("and", ok, inside)
            src = src * in_sp[d] + clamp_index(i, in_sp[d])
            dst = dst * src_sp[d] + ivs[d]
        value = K.Select(ok, K.Load(xb, x_base + ci * math.prod(in_sp) + src, "f32"), f32(0.0))
        inner: list = [K.Store(src_buf, pad_base + ci * math.prod(src_sp) + dst, value)]
        for d in reversed(range(nd)):
            inner = [For(ivs[d], as_expr(0), as_expr(src_sp[d]), tuple(inner))]
        stmts.append(For(ci, as_expr(0), as_expr(cg), tuple(inner), kind))
        x_base = pad_base
    kk = math.prod(ksp)
    ci = low.fresh("ci")
    kvs = [low.fresh("kk") for _ in range(nd)]
    ovs = [low.fresh("o") for _ in range(nd)]
    src, kidx, flat = Const(0, INDEX), Const(0, INDEX), Const(0, INDEX)
    for d in range(nd):
        src = src * src_sp[d] + ovs[d] * stride[d] + kvs[d] * dil[d]
        kidx = kidx * ksp[d] + kvs[d]
        flat = flat * sp_out[d] + ovs[d]
    inner = [K.Store(layout.buffer, layout.col_base + (ci * kk + kidx) * layout.row_len + flat,
                     K.Load(src_buf, x_base + ci * math.prod(src_sp) + src, "f32"))]
    for d in reversed(range(nd)):
        okind = "vectorized" if d == nd - 1 and stride[d] == 1 else "serial"
        inner = [For(ovs[d], as_expr(0), as_expr(sp_out[d]), tuple(inner), okind)]
    for d in reversed(range(nd)):
        inner = [For(kvs[d], as_expr(0), as_expr(ksp[d]), tuple(inner))]
    stmts.append(For(ci, as_expr(0), as_expr(cg), tuple(inner), kind))
    return stmts


def image_gemm(job: ConvContext, weights: PackedA, loop: ImageLoop, width: int) -> list:
    """One GEMM per image and group. B is the input itself for 1x1 stride-1 convolutions
    (read in place, or packed into panels first), else an im2col workspace."""
    low, node, geo, shape = job.low, job.node, job.geo, weights.shape
    Kd, Nn, og, image, images = geo.kd, geo.pixels, geo.og, loop.image, loop.images
    xb, x_base, hw_in = job.x, loop.x_base, geo.in_pixels
    stmts: list = []
    b_cols = Nn + width
    if geo.pointwise and weights.m_tiles <= low.tuning.direct_unpacked_max_row_tiles:
        # Few output channels: each column of B is read by few row tiles, so the micro-kernel
        # reads it straight from the input's K rows (packing it first would copy the whole
        # input for little reuse). Nothing past a row's end is read.
        b_cols = Nn

        def b(k, col, lanes):
            return K.Load(xb, x_base + k * hw_in + col, "f32", lanes)
    elif geo.pointwise:
        # Pack B (the input's rows) into [N/NR][K][NR] panels first: the micro-kernel then
        # reads one contiguous stream instead of K rows a whole image apart.
        nr = shape.nr
        b_cols = -(-Nn // nr) * nr
        tiles = -(-Nn // nr)
        per_image = tiles * Kd * nr
        bpk = low.workspace(f"{node.name}_packed_b", "f32", per_image * images)
        pbase = image * per_image if image is not None else Const(0, INDEX)
        stmts += pack_rows(low, StridedRows(xb, x_base, Kd, Nn, hw_in), bpk, pbase, nr,
                           job.par())

        def b(k, col, lanes):
            return K.Load(bpk, pbase + (col // nr) * (Kd * nr) + k * nr + col % nr, "f32",
                          lanes)
    else:
        # One vector of slack: the last row's tail vector reads past it into junk.
        per_image = Kd * Nn + width
        col_buf = low.workspace(f"{node.name}_cols", "f32", per_image * images)
        col_base = image * per_image if image is not None else Const(0, INDEX)
        stmts += im2col(low, geo, xb, x_base, Im2colLayout(col_buf, col_base, Nn, images, image),
                        job.par())

        def b(k, col, lanes):
            return K.Load(col_buf, col_base + k * Nn + col, "f32", lanes)

    def a(row, k):
        return weights.element(row, k, loop.g)

    def store(row, col, value):
        co = loop.g * og + row
        return job.store([loop.n, co, col], job.add_bias(value, co))

    stmts += gemm_loops(low, og, Nn, Kd, a, b, store, shape, b_cols=b_cols)
    return [For(loop.n, as_expr(0), as_expr(geo.n), (
        For(loop.g, as_expr(0), as_expr(geo.groups), tuple(stmts)),), loop.kind)]


def batched_im2col(job: ConvContext, weights: PackedA, width: int) -> list:
    """Several images as one GEMM: the im2col columns of image n follow those of image n-1,
    so N = images x pixels and small feature maps still fill whole register tiles. When the
    pixels per image are not a multiple of the vector width, vectors that may straddle two
    images are stored element by element."""
    low, node, geo, shape = job.low, job.node, job.geo, weights.shape
    images, Nn, Kd = geo.n, geo.pixels, geo.kd
    Nt = images * Nn
    col_buf = low.workspace(f"{node.name}_cols", "f32", Kd * Nt + width)
    n_var = low.fresh("n")
    x_base = n_var * (geo.cg * geo.in_pixels)
    # Threads take whole images (one thread-pool round trip, not one per image).
    fill = im2col(low, geo, job.x, x_base, Im2colLayout(col_buf, n_var * Nn, Nt, images, n_var),
                  "serial")

    # Then pack the columns into contiguous [N/NR][K][NR] panels for the micro-kernel.
    nr = shape.nr
    tiles = -(-Nt // nr)
    packed = low.workspace(f"{node.name}_packed_b", "f32", tiles * Kd * nr)
    pack = pack_rows(low, StridedRows(col_buf, Const(0, INDEX), Kd, Nt, Nt), packed,
                     Const(0, INDEX), nr, job.par())

    def b(k, col, lanes):
        return K.Load(packed, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

    lane_tile = None
    if Nn % width:
        # Vectors may straddle two images: they go through a small scratch and are stored one
        # element at a time.
        lane_tile = f"lanes_{low.fresh('t').name}"
        low.scratch.append(K.Buffer(lane_tile, "f32", width))

    def store(row, col, value):
        value = job.add_bias(value, row)
        if lane_tile is None or value.lanes == 1:
            return job.store([col // Nn, row, col % Nn], value)
        j = low.fresh("j")
        c = col + j
        return [K.Store(lane_tile, Const(0, INDEX), value),
                For(j, as_expr(0), as_expr(value.lanes), (
                    job.store([c // Nn, row, c % Nn], K.Load(lane_tile, j, "f32")),))]

    gemm = gemm_loops(low, geo.og, Nt, Kd, weights.element, b, store, shape, b_cols=tiles * nr)
    return [For(n_var, as_expr(0), as_expr(images), tuple(fill), job.par()), *pack, *gemm]
