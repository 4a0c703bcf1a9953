"""Winograd convolution along the rows: F(4, 3) for 3x3 stride-1 convolutions.

A 3-tap correlation produces 4 outputs from 6 inputs with 6 multiplications instead of 12:
y = AT [(G g) * (BT d)] (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
2015, interpolation points 0, 1, -1, 2, -2 and infinity). kiln applies it along the output
rows only: each tile of 4 output rows reads 6 input rows, transformed into 6 rows V[xi]; the
3 kernel columns stay a direct correlation along the row. That leaves 6 GEMMs of K = 3 * Cin
(one per transformed row xi, with the transformed weights U[xi] = G-combinations of the kernel
rows) instead of one of K = 9 * Cin per 4 output rows: half the multiply-adds. Along the rows
everything stays contiguous, so the row transform, the GEMMs (which read V like the padded
direct convolution reads its image: B(k, col) = V[koff[k] + col]) and the output transform
are plain vector loops; images lie side by side along the rows, sharing their zero padding.

Rounding: the transforms scale values by up to 8 and 1/24, so the result differs from a
direct convolution by a few float32 ulps of the largest partial sums (tests bound it).
Non-finite inputs: an inf or NaN in an input row reaches every output row of the tiles that
read it (inf - inf is NaN), where a direct convolution spreads it only to the rows whose
window covers it; compile with ``winograd=False`` to debug where a NaN starts.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import kernel as K
from kiln.ir.kernel import For, as_expr
from kiln.passes.lower.conv_context import ConvContext
from kiln.passes.lower.conv_direct import PhaseLayout, fill_phases
from kiln.passes.lower.conv_geometry import ConvGeometry
from kiln.passes.lower.core import f32
from kiln.passes.lower.microkernel import PackedA, gemm_loops, micro_shape, pack_a
from kiln.passes.tuning import Tuning

M_OUT = 4          # outputs per tile
ALPHA = M_OUT + 2  # inputs per tile (and transformed rows)

BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float64)


def fits(geo: ConvGeometry) -> bool:
    """Whether a convolution can take the Winograd path at all (2-d 3x3, stride and dilation
    1, one group, at least one tile of rows)."""
    return (geo.kernel == (3, 3) and geo.groups == 1 and geo.stride == (1, 1)
            and geo.dil == (1, 1) and geo.out_sp[0] >= M_OUT)


def applies(geo: ConvGeometry, tuning: Tuning) -> bool:
    """Whether a convolution takes the Winograd path by default: it fits, and it has at least
    ``tuning.winograd_min_pixels`` output pixels per batch (images x rows x columns: on fewer
    the transformed weights, twice the kernel's size, cost more to stream than the multiplies
    saved) and ``tuning.winograd_min_cin`` input channels (with fewer, an RGB stem, the
    GEMMs' K = 3 * Cin is too short to pay for the transforms)."""
    return (tuning.winograd and fits(geo) and geo.cg >= tuning.winograd_min_cin
            and geo.n * geo.pixels >= tuning.winograd_min_pixels)


def _combine(coefs, terms):
    """sum(c * t) over the nonzero coefficients, as a kernel-IR expression."""
    out = None
    for c, t in zip(coefs, terms):
        if c == 0:
            continue
        term = t if c == 1 else (-t if c == -1 else t * f32(float(c)))
        out = term if out is None else out + term
    return out if out is not None else f32(0.0)


def lower_winograd(job: ConvContext, wv: np.ndarray, width: int) -> list:
    """The F(4, 3)-along-rows convolution of ``job`` (weights ``wv``; see the module
    docstring)."""
    low, node, geo = job.low, job.node, job.geo
    low.algorithm = "winograd"
    n_img, cout, cin = geo.n, geo.k, geo.c
    OH, OW = geo.out_sp
    pw = geo.pad[1]
    TH = -(-OH // M_OUT)
    rows = TH * M_OUT + 2                 # padded input rows the tiles read
    Wq = OW + 2
    S = Wq - pw                           # images share their zero padding
    Wrow = (n_img - 1) * S + Wq
    p_plane = rows * Wrow
    v_plane = TH * Wrow
    Nc = (TH - 1) * Wrow + (n_img - 1) * S + OW
    shape = micro_shape(width, cout)
    ldc = -(-Nc // shape.nr) * shape.nr
    slack = Wrow + 3 * shape.nr           # reads past the last plane land in dropped columns

    # Input: zero-padded rows, images side by side; then the 6 transformed rows per tile.
    padded = low.workspace(f"{node.name}_rows", "f32", cin * p_plane)
    lay = PhaseLayout([(0, 0)], rows, Wq, S, Wrow, p_plane, p_plane, 0, np.zeros(0, np.int64))
    stmts = fill_phases(job, padded, lay)
    v = low.workspace(f"{node.name}_wino_in", "f32", ALPHA * cin * v_plane + slack)
    ci, th, x = low.fresh("ci"), low.fresh("th"), low.fresh("x")
    d = [K.Load(padded, ci * p_plane + (th * M_OUT + i) * Wrow + x, "f32") for i in range(ALPHA)]
    transform = tuple(K.Store(v, (j * cin + ci) * v_plane + th * Wrow + x, _combine(BT[j], d))
                      for j in range(ALPHA))
    stmts.append(For(ci, as_expr(0), as_expr(cin), (For(th, as_expr(0), as_expr(TH), (
        For(x, as_expr(0), as_expr(Wrow), transform, "vectorized"),)),), job.par()))

    # Weights: U[xi][co][ci*3 + b] = sum_a G[xi, a] w[co, ci, a, b], packed for the GEMM.
    u = np.einsum("xa,oiab->xoib", G, wv.astype(np.float64)).astype(np.float32)
    u = u.reshape(ALPHA, cout, cin * 3)
    kd = cin * 3
    ap = PackedA(low.constant(np.stack([pack_a(u[xi], shape.mr) for xi in range(ALPHA)]),
                              f"{node.name}_wino_w"), shape, cout, kd)
    koff = low.constant(np.array([c * v_plane + b for c in range(cin) for b in range(3)],
                                 np.int64), f"{node.name}_koff")
    mbuf = low.workspace(f"{node.name}_wino_out", "f32", ALPHA * cout * ldc)
    xi = low.fresh("xi")   # one loop over the 6 GEMMs: one copy of the micro-kernel's code

    def a(row, k):
        return ap.element(row, k, xi)

    def b(k, col, lanes):
        return K.Load(v, K.Load(koff, k, "i64") + xi * (cin * v_plane) + col, "f32", lanes)

    def to_acc(row, col, value):
        return K.Store(mbuf, (xi * cout + row) * ldc + col, value)

    stmts.append(For(xi, as_expr(0), as_expr(ALPHA),
                     tuple(gemm_loops(low, cout, Nc, kd, a, b, to_acc, shape, b_cols=ldc))))

    # Output: 4 rows per tile from the 6 GEMM results, through the fused epilogue.
    co, n, t, ow = low.fresh("co"), low.fresh("n"), low.fresh("t"), low.fresh("ow")

    def tile_rows(th_e, count):
        col = th_e * Wrow + n * S + ow
        mv = [K.Load(mbuf, (j * cout + co) * ldc + col, "f32") for j in range(ALPHA)]
        body = []
        for r in range(count):
            y = job.add_bias(_combine(AT[r], mv), co)
            body.append(job.store([n, co, (th_e * M_OUT + r) * OW + ow], y))
        return For(ow, as_expr(0), as_expr(OW), tuple(body), "vectorized")

    full, last = OH // M_OUT, OH % M_OUT
    per_image: list = []
    if full:
        per_image.append(For(t, as_expr(0), as_expr(full), (tile_rows(t, M_OUT),)))
    if last:
        per_image.append(tile_rows(as_expr(full), last))
    stmts.append(For(co, as_expr(0), as_expr(cout), (
        For(n, as_expr(0), as_expr(n_img), tuple(per_image)),), job.par()))
    return stmts
