"""Convolutions as GEMMs that read their input without im2col (2-d): the padded direct GEMM of
one image (stride 1), and the batched direct GEMMs over stride phases, plain and transposed,
whose phase layout Winograd shares.

Each reads B(k, col) = P[koff[k] + col] from a zero-padded copy P of the input, koff[k] the
offset of channel and kernel tap k from the output position; columns that fall between rows
or images are computed and dropped. The GEMM writes a workspace, and the epilogue copies the
real columns out through the fused ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.ir import kernel as K
from kiln.ir.kernel import INDEX, Const, For, as_expr
from kiln.passes.lower.conv_context import ConvContext, ImageLoop
from kiln.passes.lower.conv_geometry import ConvGeometry
from kiln.passes.lower.core import clamp_index, f32
from kiln.passes.lower.microkernel import (
    Gemm,
    GemmShape,
    PackedA,
    gemm_kblocked,
    gemm_loops,
    k_block,
    micro_shape,
    pack_b,
)


def padded_direct(job: ConvContext, weights: PackedA, loop: ImageLoop) -> list:
    """Stride-1 2-d convolution without im2col, one GEMM per image and group.

    The input is copied once into a zero-padded image; output position (oh, ow) is then
    column oh*Wp + ow of a GEMM whose B element (k, col) is padded[koff[k] + col], with
    koff[k] the offset of channel and kernel tap k. Columns with ow >= OW are computed and
    dropped; the results go to a workspace and the epilogue copies the real ones out."""
    low, node, geo, shape = job.low, job.node, job.geo, weights.shape
    (H, W), (OH, OW), (kh_, kw_), pad, dil = geo.in_sp, geo.out_sp, geo.kernel, geo.pad, geo.dil
    cg, og, images, n_var, g_var = geo.cg, geo.og, loop.images, loop.n, loop.g
    Hp, Wp = H + 2 * pad[0], W + 2 * pad[1]
    npad = cg * Hp * Wp
    slack = dil[1] * (kw_ - 1) + 2 * shape.nr  # reads past the image land in dropped columns
    padded = low.workspace(f"{node.name}_padded", "f32", (npad + slack) * images)
    Nc = OH * Wp
    cbuf = low.workspace(f"{node.name}_acc", "f32", og * Nc * images)
    pbase = n_var * (npad + slack) if images > 1 else Const(0, INDEX)
    cbase = n_var * (og * Nc) if images > 1 else Const(0, INDEX)
    koff = np.array([ci * Hp * Wp + a * dil[0] * Wp + b * dil[1]
                     for ci in range(cg) for a in range(kh_) for b in range(kw_)], np.int64)
    kb = low.constant(koff, f"{node.name}_koff")
    ci, r, c = low.fresh("ci"), low.fresh("r"), low.fresh("c")
    ir, ic = r - pad[0], c - pad[1]
    ok = K.Binary("and", K.Binary("and", K.cmp("ge", ir, as_expr(0)), K.cmp("lt", ir, as_expr(H))),
                  K.Binary("and", K.cmp("ge", ic, as_expr(0)), K.cmp("lt", ic, as_expr(W))))
    src = loop.x_base + (ci * H + clamp_index(ir, H)) * W + clamp_index(ic, W)
    fill = For(ci, as_expr(0), as_expr(cg), (For(r, as_expr(0), as_expr(Hp), (
        For(c, as_expr(0), as_expr(Wp), (
            K.Store(padded, pbase + (ci * Hp + r) * Wp + c,
                    K.Select(ok, K.Load(job.x, src, "f32"), f32(0.0))),)),)),), job.par())

    def a(row, k):
        return weights.element(row, k, g_var)

    def b(k, col, lanes):
        return K.Load(padded, pbase + K.Load(kb, k, "i64") + col, "f32", lanes)

    def to_acc(row, col, value):
        return K.Store(cbuf, cbase + row * Nc + col, value)

    gemm = gemm_loops(low, og, Nc, geo.kd, a, b, to_acc, shape, b_cols=Nc + shape.w)
    co, oh, ow = low.fresh("co"), low.fresh("oh"), low.fresh("ow")
    value = job.add_bias(K.Load(cbuf, cbase + co * Nc + oh * Wp + ow, "f32"), g_var * og + co)
    epilogue = For(co, as_expr(0), as_expr(og), (For(oh, as_expr(0), as_expr(OH), (
        For(ow, as_expr(0), as_expr(OW), (
            job.store([n_var, g_var * og + co, oh * OW + ow], value),),
            "vectorized"),)),), job.par())
    return [For(n_var, as_expr(0), as_expr(geo.n), (
        For(g_var, as_expr(0), as_expr(geo.groups), (fill, *gemm, epilogue)),), loop.kind)]


@dataclass(frozen=True)
class PhaseLayout:
    """Where the batched direct convolutions put their input (see ``direct_batch``): per
    input channel, one plane of Hq rows x Wrow columns for each stride phase, images S columns
    apart along the rows; ``koff[k]``: the offset of tap k = (ci, a, b) from its output
    position; ``nc``: the GEMM columns up to the last image's last output."""

    phases: list
    hq: int
    wq: int
    s: int
    wrow: int
    plane: int
    per_ci: int
    nc: int
    koff: np.ndarray


def phase_layout(geo: ConvGeometry) -> PhaseLayout:
    """The phase layout of a 2-d convolution's batch (every image of ``geo``)."""
    (OH, OW), (kh_, kw_), (sh, sw), (dh, dw) = geo.out_sp, geo.kernel, geo.stride, geo.dil
    n_img = geo.n
    rph = sorted({(a * dh) % sh for a in range(kh_)})
    cph = sorted({(b * dw) % sw for b in range(kw_)})
    phases = [(pr, pc) for pr in rph for pc in cph]
    hq = OH + ((kh_ - 1) * dh) // sh
    wq = OW + ((kw_ - 1) * dw) // sw
    s = wq - geo.pad[1] if sw == 1 else wq   # stride 1: neighbours share their zero padding
    wrow = (n_img - 1) * s + wq
    plane = hq * wrow
    tap = np.array([phases.index(((a * dh) % sh, (b * dw) % sw)) * plane
                    + ((a * dh) // sh) * wrow + (b * dw) // sw
                    for a in range(kh_) for b in range(kw_)], np.int64)
    koff = (np.arange(geo.cg, dtype=np.int64)[:, None] * (len(phases) * plane)
            + tap).reshape(-1)
    return PhaseLayout(phases, hq, wq, s, wrow, plane, len(phases) * plane,
                       (OH - 1) * wrow + (n_img - 1) * s + OW, koff)


def direct_batch_waste(geo: ConvGeometry) -> float:
    """Columns the batched direct GEMM computes per output pixel (1.0: none wasted)."""
    return phase_layout(geo).nc / (geo.n * geo.pixels)


def fill_phases(job: ConvContext, q: str, lay: PhaseLayout) -> list:
    """Q[ci, phase (pr, pc), i, n*S + j] = P_n[ci, i*sh + pr, j*sw + pc] (P: the zero-padded
    input of image n): zero each channel's phases, then copy the images' rows in."""
    low, geo = job.low, job.geo
    (H, W), (sh, sw), (ph, pw), cg = geo.in_sp, geo.stride, geo.pad, geo.cg
    per_ci, plane, Hq, Wq, Wrow, S = lay.per_ci, lay.plane, lay.hq, lay.wq, lay.wrow, lay.s
    ci, i0v = low.fresh("ci"), low.fresh("i")
    fill: list = [For(i0v, as_expr(0), as_expr(per_ci),
                      (K.Store(q, ci * per_ci + i0v, f32(0.0)),), "vectorized")]
    for p, (pr, pc) in enumerate(lay.phases):
        r0 = max(0, -(-(ph - pr) // sh))
        r1 = min(Hq, -(-(H + ph - pr) // sh))
        j0 = max(0, -(-(pw - pc) // sw))
        j1 = min(Wq, -(-(W + pw - pc) // sw))
        if r1 <= r0 or j1 <= j0:
            continue
        n, r, j = low.fresh("n"), low.fresh("r"), low.fresh("j")
        src = ((n * cg + ci) * H + (r * sh + pr - ph)) * W + j * sw + (pc - pw)
        dst = ci * per_ci + p * plane + r * Wrow + n * S + j
        fill.append(For(n, as_expr(0), as_expr(geo.n), (For(r, as_expr(r0), as_expr(r1 - r0), (
            For(j, as_expr(j0), as_expr(j1 - j0), (K.Store(q, dst, K.Load(job.x, src, "f32")),),
                "vectorized"),)),)))   # strided loads when sw > 1 (see passes/vectorize)
    return [For(ci, as_expr(0), as_expr(cg), tuple(fill), job.par())]


def direct_batch(job: ConvContext, weights: PackedA) -> list:
    """All images of a batch as one GEMM without im2col, for any stride (2-d, one group).

    Each image's zero-padded input P is split into its stride phases, Q[pr, pc][i, j] =
    P[i*sh + pr, j*sw + pc] (only the phases some kernel tap reads), and the images lie side
    by side along every phase row, S columns apart. Tap (a, b) of output (oh, ow) of image n
    reads phase ((a*dh) % sh, (b*dw) % sw) at row oh + a*dh//sh, column n*S + ow + b*dw//sw:
    at a fixed offset koff[k] from column oh*Wrow + n*S + ow. So B(k, col) = Q[koff[k] + col]
    and the whole batch is one GEMM with N ~ OH * Wrow columns, its weights read once per batch
    rather than once per image. Columns between images are computed and dropped: with stride
    1 neighbouring images share their zero padding (S = W + pad), so few are. The GEMM writes
    a workspace; the epilogue copies the real columns out through the fused ops."""
    low, node, geo, shape = job.low, job.node, job.geo, weights.shape
    n_img, (OH, OW), og = geo.n, geo.out_sp, geo.og
    lay = phase_layout(geo)
    Wrow, S, Nc = lay.wrow, lay.s, lay.nc
    ldc = -(-Nc // shape.nr) * shape.nr      # every column tile full
    slack = Wrow + 3 * shape.nr   # reads past the last plane land in dropped columns
    q = low.workspace(f"{node.name}_phases", "f32", geo.cg * lay.per_ci + slack)
    cbuf = low.workspace(f"{node.name}_acc", "f32", og * ldc)
    kb = low.constant(lay.koff, f"{node.name}_koff")
    stmts = fill_phases(job, q, lay)

    def b(k, col, lanes):
        return K.Load(q, K.Load(kb, k, "i64") + col, "f32", lanes)

    def to_acc(row, col, value):
        return K.Store(cbuf, row * ldc + col, value)

    stmts += gemm_loops(low, og, Nc, geo.kd, weights.element, b, to_acc, shape, b_cols=ldc)
    co, n, oh, ow = low.fresh("co"), low.fresh("n"), low.fresh("oh"), low.fresh("ow")
    value = job.add_bias(K.Load(cbuf, co * ldc + oh * Wrow + n * S + ow, "f32"), co)
    stmts.append(For(co, as_expr(0), as_expr(og), (For(n, as_expr(0), as_expr(n_img), (
        For(oh, as_expr(0), as_expr(OH), (
            For(ow, as_expr(0), as_expr(OW), (
                job.store([n, co, oh * OW + ow], value),), "vectorized"),)),)),),
        job.par()))
    return stmts


def direct_batch_t(job: ConvContext, wv: np.ndarray, width: int) -> list:
    """The batched direct convolution transposed: output pixels are the GEMM's rows and output
    channels its vector columns, C^T[pixel, co] = sum_k Q[koff[k] + pos[pixel]] * W^T[k, co].

    The phase buffer Q is the one of ``direct_batch``; but a pixel's value is broadcast from
    its own position pos[pixel], so no column between images is computed, and the weights are
    packed at compile time into contiguous [K][NR] panels that stream from memory once per
    batch (each stays in L2 while every pixel tile runs over it). For small feature maps,
    where the gaps between images cost most. The result goes to a workspace ([pixel, co]) and
    the epilogue writes it out in NCHW order through the fused ops."""
    low, node, geo = job.low, job.node, job.geo
    (OH, OW) = geo.out_sp
    lay = phase_layout(geo)
    q = low.workspace(f"{node.name}_phases", "f32", geo.cg * lay.per_ci)
    nn, oo, ww = np.meshgrid(np.arange(geo.n), np.arange(OH), np.arange(OW), indexing="ij")
    stmts = fill_phases(job, q, lay)
    pos = (nn * lay.s + oo * lay.wrow + ww).reshape(-1)
    return stmts + _gemm_transposed(job, wv, width, q, lay.koff, pos)


def _gemm_transposed(job: ConvContext, wv: np.ndarray, width: int, q: str, koff: np.ndarray,
                     pos: np.ndarray) -> list:
    """out[n, co, s] = sum_k q[koff[k] + pos[p]] * W[co, k] for pixel p = (n, s): output pixels
    are the GEMM's rows (each broadcast from its own position), output channels its vector
    columns over weights packed at compile time into contiguous [K][NR] panels, in K blocks
    (gemm_kblocked). The result goes to a workspace ([pixel, co]) that the epilogue writes out
    in NCHW order through the fused ops."""
    low, node, geo = job.low, job.node, job.geo
    n_img, hw, og, Kd = geo.n, geo.pixels, geo.og, geo.kd
    P = n_img * hw
    kb = low.constant(koff.astype(np.int64), f"{node.name}_koff")
    pb = low.constant(pos.astype(np.int64), f"{node.name}_pos")
    if width >= 16 and og % (4 * width) == 0:
        shape = GemmShape(6, 4, width)
    elif og <= width:  # one vector of output channels: more pixel rows per tile instead
        shape = GemmShape(min(12, P), 1, width)
    else:
        shape = micro_shape(width, P)
    nr = shape.nr
    wt = np.asarray(wv.reshape(og, Kd).T, np.float32)
    wp = low.constant(pack_b(wt, nr), f"{node.name}_packed_t")
    ldc = -(-og // nr) * nr

    def a(row, k):
        return K.Load(q, K.Load(kb, k, "i64") + K.Load(pb, row, "i64"), "f32")

    def b(k, col, lanes):
        return K.Load(wp, (col // nr) * (Kd * nr) + k * nr + col % nr, "f32", lanes)

    cbuf = low.workspace(f"{node.name}_acc", "f32", P * ldc)
    stmts = gemm_kblocked(low, Gemm(P, og, Kd, a, b), cbuf, ldc, shape,
                          k_block(Kd, low.tuning.direct_t_kc))
    n, co, sp = low.fresh("n"), low.fresh("co"), low.fresh("s")
    value = job.add_bias(K.Load(cbuf, (n * hw + sp) * ldc + co, "f32"), co)
    stmts.append(For(co, as_expr(0), as_expr(og), (For(n, as_expr(0), as_expr(n_img), (
        For(sp, as_expr(0), as_expr(hw), (
            job.store([n, co, sp], value),), "vectorized"),)),), job.par()))
    return stmts
