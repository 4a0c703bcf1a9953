"""Depthwise 2-d convolution (one filter per channel), vectorized along output rows: in place
for large maps, over a padded phase-split copy of each channel (pooling's window nest) for
small ones.
"""

from __future__ import annotations

import numpy as np

from kiln.ir import Node
from kiln.ir import kernel as K
from kiln.ir.kernel import Assign, Decl, For, as_expr
from kiln.passes.lower.anchors import parallel_kind
from kiln.passes.lower.conv_geometry import ConvGeometry
from kiln.passes.lower.core import Lowering, clamp_index, f32
from kiln.passes.lower.pool import Planes, WindowFold, fill_padded, padded_scratch, window_nest


def lower_depthwise(low: Lowering, node: Node, final: str, geo: ConvGeometry,
                    wv: np.ndarray) -> list | None:
    """Depthwise convolution ``node`` (weights ``wv``), vectorized along output rows.

    Large maps are read in place: the output plane splits into an interior, where every
    kernel tap lands inside the image (plain vector loads, strided ones for stride 2), and a
    border of a few rows and columns whose taps test their bounds one element at a time. No
    padded copy is made: on large maps the layer is limited by memory traffic, and a copy
    would double it."""
    x = low.stored_view(node.inputs[0])  # read in place, through any reshape
    if wv.ndim != 4 or x is None:
        return None
    n_, c_, (H, W) = geo.n, geo.c, geo.in_sp
    if wv.shape[:2] != (c_, 1):
        return None  # one filter per input channel only (no channel multiplier)
    (sh, sw), (ph_, pw), (dh, dw) = geo.stride, geo.pad, geo.dil
    out = node.outputs[0]
    (OH, OW), (kh_, kw_) = geo.out_sp, geo.kernel
    wb = low.constant(wv.reshape(c_, kh_ * kw_).astype(np.float32), f"{node.name}_w")
    bias = low.constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if len(node.inputs) > 2 and bias is None:
        return None
    bb = low.constant(bias.astype(np.float32), f"{node.name}_b") if bias is not None else None
    xb = low.buffer(x)
    nv, cv = low.fresh("n"), low.fresh("c")
    base = (nv * c_ + cv) * (H * W)
    init = K.Load(bb, cv, "f32") if bb is not None else f32(0.0)

    def store(idx, value):
        return low.store_at(final, idx, value, out)

    if H * W <= low.tuning.depthwise_padded_max_pixels and (sh, sw, dw) == (1, 1, 1):
        # A small map: over a zero-padded, phase-split copy of each channel (a per-thread
        # scratch, as for pooling) every output row is one vector loop without bounds tests.
        # On small maps the border, tested element by element in place, is most of the
        # plane, and the copy costs little.
        def read(r, col):
            return K.Load(xb, base + r * W + col, "f32")

        def tap(acc, v, p, q):
            return acc + K.Load(wb, cv * (kh_ * kw_) + (p * kw_ + q), "f32") * v

        scratch = padded_scratch(low, geo, "dw")
        fill = fill_padded(low, geo, read, scratch, f32(0.0))
        return window_nest(low, node, geo, Planes(nv, cv, scratch, fill),
                           WindowFold(init, tap, lambda acc: acc), store)

    def interior_range(n_out, size, stride, pad, taps, dil):
        # Outputs o with 0 <= o*stride - pad and o*stride - pad + (taps-1)*dil < size.
        lo = -(-pad // stride)
        hi = (size - 1 - (taps - 1) * dil + pad) // stride + 1
        lo, hi = min(max(lo, 0), n_out), min(max(hi, 0), n_out)
        return (lo, hi) if hi > lo else (n_out, n_out)

    r0, r1 = interior_range(OH, H, sh, ph_, kh_, dh)
    c0, c1 = interior_range(OW, W, sw, pw, kw_, dw)

    def body(oh, ow, guarded):
        acc = low.fresh("acc", "f32")
        stmts: list = [Decl(acc, init)]
        for a in range(kh_):
            for b in range(kw_):
                ih, iw = oh * sh + (a * dh - ph_), ow * sw + (b * dw - pw)
                wt = K.Load(wb, cv * (kh_ * kw_) + (a * kw_ + b), "f32")
                if guarded:
                    ok = K.Binary("and", K.Binary("and", K.cmp("ge", ih, as_expr(0)),
                                                  K.cmp("lt", ih, as_expr(H))),
                                  K.Binary("and", K.cmp("ge", iw, as_expr(0)),
                                           K.cmp("lt", iw, as_expr(W))))
                    v = K.Select(ok, K.Load(xb, base + clamp_index(ih, H) * W
                                            + clamp_index(iw, W), "f32"), f32(0.0))
                else:
                    v = K.Load(xb, base + ih * W + iw, "f32")
                stmts.append(Assign(acc, acc + wt * v))
        stmts.append(store([nv, cv, oh, ow], acc))
        return stmts

    def cols(oh, lo, hi, guarded, kind="serial"):
        ow = low.fresh("ow")
        return For(ow, as_expr(lo), as_expr(hi - lo), tuple(body(oh, ow, guarded)), kind)

    def rows(lo, hi, interior):
        if hi <= lo:
            return []
        oh = low.fresh("oh")
        if interior:
            inner = [cols(oh, 0, c0, True), cols(oh, c0, c1, False, "vectorized"),
                     cols(oh, c1, OW, True)]
            inner = [f for f in inner if int(f.extent.value) > 0]
        else:
            inner = [cols(oh, 0, OW, True)]
        return [For(oh, as_expr(lo), as_expr(hi - lo), tuple(inner))]

    compute = rows(0, r0, False) + rows(r0, r1, True) + rows(r1, OH, False)
    kind = parallel_kind(low, node)
    return [For(nv, as_expr(0), as_expr(n_), (
        For(cv, as_expr(0), as_expr(c_), tuple(compute), kind if n_ == 1 else "serial"),),
        kind if n_ > 1 else "serial")]
